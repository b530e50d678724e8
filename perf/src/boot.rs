//! The boot benchmark: atoll-vmm against QEMU's microvm machine on the same `vmlinux`
//! (PVH entry in both) and initramfs, alternating, launch -> `ATOLL-READY`.
//!
//! `outer` runs on the developer's machine: it decides where a real KVM is, carries
//! the binaries and guest artefacts there, runs `boot-inner`, and saves the JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use atoll_node::Runner;
use serde_json::{json, Value};

use crate::common::{inner_result, need, place_line, qemu_microvm, save, JSON_PREFIX};
use crate::proc::{run_timed, Timed};
use crate::stats::{r1, summarize};

/// The kernel command line both VMMs give the guest.
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";
const READY: &[u8] = b"ATOLL-READY";

/// Arguments of `atoll-bench boot`.
#[derive(Debug)]
pub struct OuterArgs {
    pub runs: u32,
    pub json: PathBuf,
    pub artifacts: PathBuf,
    pub bin: PathBuf,
    pub vcpus: u8,
    pub mem: u32,
}

/// Arguments of `atoll-bench boot-inner`.
#[derive(clap::Args, Debug)]
pub struct InnerArgs {
    #[arg(long)]
    runs: u32,
    #[arg(long, default_value = "./atoll-vmm")]
    vmm: PathBuf,
    #[arg(long, default_value = "vmlinux")]
    kernel: PathBuf,
    #[arg(long, default_value = "initramfs.cpio")]
    initrd: PathBuf,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    #[arg(long, default_value_t = 128)]
    mem: u32,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
}

pub fn outer(args: &OuterArgs) -> anyhow::Result<()> {
    let runner = Runner::detect();
    let place = runner.place().clone();
    eprintln!("atoll-bench: {}", place_line(&place));
    let out = runner
        .file(need(&args.bin, "atoll-vmm")?, "atoll-vmm")?
        .file(need(&args.bin, "atoll-bench")?, "atoll-bench")?
        .file(need(&args.artifacts, "vmlinux")?, "vmlinux")?
        .file(need(&args.artifacts, "initramfs.cpio")?, "initramfs.cpio")?
        .with_qemu(true)
        .timeout(Duration::from_secs(60 + u64::from(args.runs) * 40))
        .on_line(|_, line| {
            if !line.starts_with(JSON_PREFIX) {
                eprintln!("  | {line}");
            }
        })
        .run(&format!(
            "./atoll-bench boot-inner --runs {} --vcpus {} --mem {}",
            args.runs, args.vcpus, args.mem
        ))?;
    let mut result = inner_result(&out, &place)?;
    if let Some(node) = &out.node {
        result["node"] = json!({
            "boot_to_command_ms": node.boot_to_command_ms,
            "command_ms": node.command_ms,
            "initramfs_bytes": node.initramfs_bytes,
        });
    }
    print_table(&result);
    save(&args.json, &result)?;
    Ok(())
}

fn print_table(r: &Value) {
    let row = |name: &str, v: &Value| {
        println!(
            "{name:<14} {:>9} {:>9} {:>9} {:>10}",
            format!("{} ms", v["median_ms"]),
            format!("{} ms", v["min_ms"]),
            format!("{} ms", v["max_ms"]),
            format!("{} KiB", v["vmm_rss_kib"]),
        );
    };
    println!(
        "boot: launch -> ATOLL-READY, {} runs each, {}",
        r["atoll"]["runs"], r["where"]
    );
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>10}",
        "", "median", "min", "max", "peak RSS"
    );
    row("atoll-vmm", &r["atoll"]);
    row("qemu microvm", &r["qemu_microvm"]);
    println!("ratio_median (atoll/qemu): {}", r["ratio_median"]);
    println!(
        "atoll-vmm set-up (launch -> vCPUs running), median: {} ms; first guest exit: {} ms",
        r["atoll"]["vmm_setup_median_ms"], r["atoll"]["first_guest_exit_median_ms"]
    );
    println!(
        "atoll exits per boot (median): {}  by reason: {}  top ports: {}",
        r["atoll"]["exits_median"], r["atoll"]["exits_by_reason"], r["atoll"]["top_io_ports"]
    );
}

fn atoll_cmd(a: &InnerArgs, metrics: &Path) -> Command {
    let mut c = Command::new(&a.vmm);
    c.arg("--kernel")
        .arg(&a.kernel)
        .arg("--initrd")
        .arg(&a.initrd)
        .arg("--cmdline")
        .arg(CMDLINE)
        .arg("--vcpus")
        .arg(a.vcpus.to_string())
        .arg("--mem")
        .arg(a.mem.to_string())
        .arg("--timeout")
        .arg("30")
        .arg("--metrics")
        .arg(metrics);
    c
}

fn qemu_cmd(a: &InnerArgs) -> Command {
    let mut c = qemu_microvm(&a.qemu);
    c.arg("-smp")
        .arg(a.vcpus.to_string())
        .arg("-m")
        .arg(a.mem.to_string())
        .arg("-kernel")
        .arg(&a.kernel)
        .arg("-initrd")
        .arg(&a.initrd)
        .arg("-append")
        .arg(CMDLINE);
    c
}

fn check(name: &str, t: &Timed, ok_status: i32) -> anyhow::Result<f64> {
    match t.marker_ms {
        Some(ms) if t.status == ok_status => Ok(ms),
        _ => bail!(
            "{name} boot failed (status {}, marker {}):\n{}",
            t.status,
            if t.marker_ms.is_some() {
                "seen"
            } else {
                "missing"
            },
            t.output
        ),
    }
}

/// Runs the boots here and prints one JSON line.
pub fn inner(a: &InnerArgs) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let metrics_path =
        std::env::temp_dir().join(format!("atoll-bench-{}.json", std::process::id()));
    let timeout = Duration::from_secs(60);
    let mut atoll_ms = Vec::new();
    let mut qemu_ms = Vec::new();
    let mut atoll_rss = Vec::new();
    let mut atoll_total = Vec::new();
    let mut qemu_total = Vec::new();
    let mut qemu_rss = Vec::new();
    let mut exits: Vec<(f64, Value)> = Vec::new();
    // Where atoll-vmm's time goes: its own set-up (launch -> vCPUs running) and the
    // guest's first exit to userspace (the end of the kernel's earliest code).
    let mut setup_ms = Vec::new();
    let mut first_exit_ms = Vec::new();
    // One warm-up boot each (page cache, first-touch of the binaries), then
    // alternate which VMM goes first in each round.
    for round in 0..=a.runs {
        let warm_up = round == 0;
        let order: [bool; 2] = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_atoll in order {
            if is_atoll {
                let t = run_timed(&mut atoll_cmd(a, &metrics_path), READY, timeout)?;
                let ms = check("atoll-vmm", &t, 0)?;
                if !warm_up {
                    let m: Value = serde_json::from_slice(
                        &std::fs::read(&metrics_path).context("atoll-vmm wrote no metrics")?,
                    )?;
                    atoll_ms.push(ms);
                    if let Some(us) = m["vmm_phases_us"]
                        .as_array()
                        .and_then(|p| p.last())
                        .and_then(|last| last[1].as_f64())
                    {
                        setup_ms.push(us / 1000.0);
                    }
                    if let Some(us) = m["first_exit_us"].as_f64() {
                        first_exit_ms.push(us / 1000.0);
                    }
                    atoll_rss.push(t.maxrss_kib as f64);
                    atoll_total.push(t.total_ms);
                    exits.push((m["exits_total"].as_f64().unwrap_or(0.0), m));
                    eprintln!("round {round}: atoll-vmm {ms:.1} ms");
                }
            } else {
                // isa-debug-exit turns status 0 into QEMU exit code 1.
                let t = run_timed(&mut qemu_cmd(a), READY, timeout)?;
                let ms = check("qemu microvm", &t, 1)?;
                if !warm_up {
                    qemu_ms.push(ms);
                    qemu_rss.push(t.maxrss_kib as f64);
                    qemu_total.push(t.total_ms);
                    eprintln!("round {round}: qemu microvm {ms:.1} ms");
                }
            }
        }
    }
    let _ = std::fs::remove_file(&metrics_path);
    let (Some(at), Some(qm)) = (summarize(&atoll_ms), summarize(&qemu_ms)) else {
        bail!("no samples");
    };
    exits.sort_by(|x, y| x.0.total_cmp(&y.0));
    let (exits_median, median_metrics) = exits[exits.len() / 2].clone();
    let mut ports: Vec<(String, u64)> = median_metrics["io_ports"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    ports.sort_by_key(|p| std::cmp::Reverse(p.1));
    let top_ports: BTreeMap<String, u64> = ports.into_iter().take(6).collect();
    let med = |v: &[f64]| summarize(v).map(|s| s.median).unwrap_or(0.0);
    let result = json!({
        "atoll": {
            "runs": atoll_ms.len(),
            "median_ms": r1(at.median),
            "min_ms": r1(at.min),
            "max_ms": r1(at.max),
            "samples_ms": atoll_ms.iter().map(|x| r1(*x)).collect::<Vec<_>>(),
            "exits_median": exits_median,
            "exits_by_reason": median_metrics["exits"],
            "top_io_ports": top_ports,
            "guest_stages_us": median_metrics["stages_us"],
            "vmm_setup_median_ms": r1(med(&setup_ms)),
            "first_guest_exit_median_ms": r1(med(&first_exit_ms)),
            "vmm_rss_kib": med(&atoll_rss),
            "launch_to_exit_median_ms": r1(med(&atoll_total)),
        },
        "qemu_microvm": {
            "runs": qemu_ms.len(),
            "median_ms": r1(qm.median),
            "min_ms": r1(qm.min),
            "max_ms": r1(qm.max),
            "samples_ms": qemu_ms.iter().map(|x| r1(*x)).collect::<Vec<_>>(),
            "vmm_rss_kib": med(&qemu_rss),
            "launch_to_exit_median_ms": r1(med(&qemu_total)),
        },
        "ratio_median": (at.median / qm.median * 1000.0).round() / 1000.0,
        "cmdline": CMDLINE,
        "vcpus": a.vcpus,
        "mem_mib": a.mem,
    });
    println!("{JSON_PREFIX}{result}");
    Ok(())
}
