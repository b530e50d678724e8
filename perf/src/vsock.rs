//! The vsock benchmark: round-trip latency of small echoes and echo throughput
//! between a host program and a guest, through atoll-vmm's virtio-vsock (Unix
//! socket on the host, AF_VSOCK in the guest).
//!
//! Runs where a real KVM is (host or nested node). The guest runs
//! `atoll-vsock-probe listen` (an echo server); the host runs `atoll-vsock-probe
//! bench`, which dials it with `CONNECT`, times N 64-byte round trips, then streams
//! B bytes while reading the echo back. Then, in the same node run, the peer: QEMU
//! microvm with `vhost-vsock-device,guest-cid=3` (virtio-mmio) boots the same
//! vmlinux and initramfs with the same guest command, and `atoll-vsock-probe
//! vsock-bench 3 5000` does the same measurement over AF_VSOCK from the node (which
//! loads vhost_vsock for this run only).

use std::path::PathBuf;
use std::time::Duration;

use crate::common::{guest_initramfs, need, save};
use anyhow::{bail, Context};
use atoll_node::kernel::VHOST_VSOCK;
use atoll_node::{Runner, Where};
use serde_json::{json, Value};

/// Arguments of `atoll-bench vsock`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// 64-byte round trips timed.
    #[arg(long, default_value_t = 1000)]
    rtt: u32,
    /// Bytes streamed through the echo (each way).
    #[arg(long, default_value_t = 64 << 20)]
    bytes: u64,
    /// Where to save the JSON.
    #[arg(long, default_value = "perf/results/vsock.json")]
    json: PathBuf,
    /// Directory with vmlinux.
    #[arg(long, default_value = "build")]
    artifacts: PathBuf,
    /// Directory with the static atoll-vmm, atoll-init, atoll-image, atoll-vsock-probe.
    #[arg(long, default_value = "target/x86_64-unknown-linux-gnu/release")]
    bin: PathBuf,
}

const METRICS_PREFIX: &str = "ATOLL-VSOCK-METRICS ";
const QEMU_PREFIX: &str = "ATOLL-VSOCK-QEMU ";
/// QEMU's guest command line: atoll-vmm's default plus the same guest command.
const QEMU_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet \
    -- /bin/atoll-vsock-probe listen 5000 --exit-after 1";

pub fn outer(args: &Args) -> anyhow::Result<()> {
    let probe = need(&args.bin, "atoll-vsock-probe")?;
    let work = tempfile_dir()?;
    let initrd = work.join("vsock-initramfs.cpio");
    guest_initramfs(&args.bin, &probe, "atoll-vsock-probe", &initrd)?;
    let runner = Runner::detect();
    let place = runner.place().clone();
    let script = format!(
        "./atoll-vmm --kernel vmlinux --initrd initramfs.cpio --timeout 600 \
           --vsock cid=3,uds=./v.sock --metrics m.json \
           -- /bin/atoll-vsock-probe listen 5000 --exit-after 1 > vmm.log 2>&1 & VMM=$!; \
         ./atoll-vsock-probe bench ./v.sock 5000 --rtt {} --bytes {} || cat vmm.log; \
         wait $VMM; echo \"vmm=$?\"; echo \"{METRICS_PREFIX}$(tr -d '\\n' < m.json)\"; \
         qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,isa-serial=on -accel kvm \
           -cpu host -nodefaults -no-user-config -display none -serial stdio -no-reboot \
           -device isa-debug-exit,iobase=0xf4,iosize=1 -m 256 \
           -kernel vmlinux -initrd initramfs.cpio -append '{QEMU_CMDLINE}' \
           -device vhost-vsock-device,guest-cid=3 > qemu.log 2>&1 & QEMU=$!; \
         ./atoll-vsock-probe vsock-bench 3 5000 --rtt {} --bytes {} > q.out 2>&1 || {{ cat qemu.log; kill $QEMU; }}; \
         echo \"{QEMU_PREFIX}$(cat q.out)\"; wait $QEMU; echo \"qemu=$?\"",
        args.rtt, args.bytes, args.rtt, args.bytes
    );
    let out = runner
        .file(need(&args.bin, "atoll-vmm")?, "atoll-vmm")?
        .file(probe, "atoll-vsock-probe")?
        .file(need(&args.artifacts, "vmlinux")?, "vmlinux")?
        .file(initrd.clone(), "initramfs.cpio")?
        .with_qemu(true)
        .extra_modules(&VHOST_VSOCK)
        .timeout(Duration::from_secs(1500))
        .stream_to_stderr(false)
        .run(&script)?;
    let _ = std::fs::remove_dir_all(&work);
    let line = out
        .output
        .lines()
        .find(|l| l.starts_with("{\"rtt_n\""))
        .with_context(|| format!("the benchmark printed no result:\n{}", out.output))?;
    let mut result: Value = serde_json::from_str(line).context("bad benchmark JSON")?;
    if !out.output.contains("vmm=0") {
        bail!("atoll-vmm did not exit cleanly:\n{}", out.output);
    }
    if let Some(m) = out
        .output
        .lines()
        .find_map(|l| l.strip_prefix(METRICS_PREFIX))
        .and_then(|m| serde_json::from_str::<Value>(m).ok())
    {
        result["vmm_rss_kib"] = m["vmm_rss_kib"].clone();
        result["exits_total"] = m["exits_total"].clone();
        result["vsock_device"] = m["devices"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["kind"] == "vsock"))
            .cloned()
            .unwrap_or(Value::Null);
    }
    result["where"] = json!(match &place {
        Where::HostKvm => "host-kvm".to_string(),
        Where::NestedNode(_) => "nested-node".to_string(),
    });
    let qemu: Value = out
        .output
        .lines()
        .find_map(|l| l.strip_prefix(QEMU_PREFIX))
        .and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| {
            format!(
                "the QEMU vhost-vsock benchmark printed no result:\n{}",
                out.output
            )
        })?;
    // isa-debug-exit: QEMU exits with (guest status << 1) | 1, so 1 is a clean exit.
    if !out.output.contains("qemu=1") {
        bail!("QEMU's guest did not exit cleanly:\n{}", out.output);
    }
    let ratio = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => json!((a / b * 1000.0).round() / 1000.0),
        _ => Value::Null,
    };
    result["ratio_rtt_median_atoll_over_qemu"] =
        ratio(&result["rtt_median_us"], &qemu["rtt_median_us"]);
    result["ratio_rtt_p99_atoll_over_qemu"] = ratio(&result["rtt_p99_us"], &qemu["rtt_p99_us"]);
    result["ratio_mib_s_atoll_over_qemu"] =
        ratio(&result["mib_per_s_each_way"], &qemu["mib_per_s_each_way"]);
    result["qemu_vhost_vsock"] = qemu;
    result["qemu_peer"] =
        json!("qemu microvm, vhost-vsock-device,guest-cid=3 (virtio-mmio), AF_VSOCK from the node");
    println!(
        "vsock ({}): {} x 64 B round trips: median {} us, p99 {} us; echo of {} MiB: {} MiB/s each way; VMM peak RSS {} KiB",
        result["where"],
        result["rtt_n"],
        result["rtt_median_us"],
        result["rtt_p99_us"],
        args.bytes >> 20,
        result["mib_per_s_each_way"],
        result["vmm_rss_kib"]
    );
    let q = &result["qemu_vhost_vsock"];
    println!(
        "vsock qemu microvm vhost-vsock: {} x 64 B round trips: median {} us, p99 {} us; echo of {} MiB: {} MiB/s each way",
        q["rtt_n"],
        q["rtt_median_us"],
        q["rtt_p99_us"],
        args.bytes >> 20,
        q["mib_per_s_each_way"]
    );
    println!(
        "ratio atoll/qemu: rtt median {}  rtt p99 {}  MiB/s {}",
        result["ratio_rtt_median_atoll_over_qemu"],
        result["ratio_rtt_p99_atoll_over_qemu"],
        result["ratio_mib_s_atoll_over_qemu"]
    );
    save(&args.json, &result)?;
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("atoll-bench-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    Ok(d)
}
