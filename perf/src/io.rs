//! The disk benchmark: virtio-blk in atoll-vmm against QEMU's virtio-mmio block
//! device (microvm), same vmlinux, same initramfs, same guest command, same 64 MiB
//! raw image, inside one node run (or on the host's KVM).
//!
//! Three halves of one binary:
//! - `io` (outer, developer machine): builds an initramfs that also holds this
//!   binary, carries everything to where the KVM is, runs `io-inner`, saves JSON.
//! - `io-inner` (where the KVM is): creates the disk image and boots both VMMs,
//!   alternating, several times; prints one JSON line.
//! - `io-guest` (inside the guest): `O_DIRECT` reads of `/dev/vda`, timed with the
//!   guest's monotonic clock: sequential 1 MiB reads, then 4 KiB reads at random
//!   aligned offsets, one at a time (queue depth 1). Prints one `ATOLL-IO` line.
//!
//! VM exits per I/O are counted, not timed: atoll-vmm's `--metrics` for a guest that
//! does N reads minus one that does none, divided by N.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use atoll_node::Runner;
use serde_json::{json, Value};

use crate::common::{
    guest_initramfs, inner_result, need, place_line, qemu_microvm, save, JSON_PREFIX,
};
use crate::proc::run_timed;
use crate::stats::{r1, summarize};

const GUEST_PREFIX: &str = "ATOLL-IO ";
const DISK_MIB: u64 = 64;
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";

/// Arguments of `atoll-bench io`.
#[derive(Debug)]
pub struct OuterArgs {
    pub runs: u32,
    pub rand_ios: u32,
    pub json: PathBuf,
    pub artifacts: PathBuf,
    pub bin: PathBuf,
}

/// Arguments of `atoll-bench io-inner`.
#[derive(clap::Args, Debug)]
pub struct InnerArgs {
    #[arg(long)]
    runs: u32,
    #[arg(long)]
    rand_ios: u32,
    #[arg(long, default_value = "./atoll-vmm")]
    vmm: PathBuf,
    #[arg(long, default_value = "vmlinux")]
    kernel: PathBuf,
    #[arg(long, default_value = "io-initramfs.cpio")]
    initrd: PathBuf,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
}

/// Arguments of `atoll-bench io-guest`.
#[derive(clap::Args, Debug)]
pub struct GuestArgs {
    #[arg(long, default_value = "/dev/vda")]
    dev: PathBuf,
    /// MiB to read sequentially (1 MiB reads).
    #[arg(long, default_value_t = 0)]
    seq_mib: u64,
    /// 4 KiB reads at random offsets.
    #[arg(long, default_value_t = 0)]
    rand_ios: u32,
}

pub fn outer(args: &OuterArgs) -> anyhow::Result<()> {
    // The guest runs this very binary: put it into a copy of the usual initramfs.
    let work = std::env::temp_dir().join(format!("atoll-bench-io-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let initrd = work.join("io-initramfs.cpio");
    let bench = need(&args.bin, "atoll-bench")?;
    guest_initramfs(&args.bin, &bench, "atoll-bench", &initrd)?;
    let runner = Runner::detect();
    let place = runner.place().clone();
    eprintln!("atoll-bench: {}", place_line(&place));
    let out = runner
        .file(need(&args.bin, "atoll-vmm")?, "atoll-vmm")?
        .file(bench.clone(), "atoll-bench")?
        .file(need(&args.artifacts, "vmlinux")?, "vmlinux")?
        .file(initrd.clone(), "io-initramfs.cpio")?
        .with_qemu(true)
        .timeout(Duration::from_secs(120 + u64::from(args.runs) * 180))
        .on_line(|_, line| {
            if !line.starts_with(JSON_PREFIX) {
                eprintln!("  | {line}");
            }
        })
        .run(&format!(
            "./atoll-bench io-inner --runs {} --rand-ios {}",
            args.runs, args.rand_ios
        ))?;
    let _ = std::fs::remove_dir_all(&work);
    let result = inner_result(&out, &place)?;
    print_table(&result);
    save(&args.json, &result)?;
    Ok(())
}

fn print_table(r: &Value) {
    println!(
        "io: virtio-blk, {} MiB raw image, O_DIRECT in the guest, {} runs each, {}",
        DISK_MIB, r["runs"], r["where"]
    );
    println!(
        "{:<22} {:>14} {:>16}",
        "", "seq read MiB/s", "4K rand read IOPS"
    );
    for (name, key) in [("atoll-vmm", "atoll"), ("qemu microvm", "qemu_microvm")] {
        println!(
            "{name:<22} {:>14} {:>16}",
            r[key]["seq_mib_s_median"], r[key]["rand_iops_median"]
        );
    }
    println!(
        "ratio atoll/qemu: seq {}  rand {}",
        r["ratio_seq"], r["ratio_rand"]
    );
    println!(
        "atoll-vmm per 4K read: {} VM exits to userspace, {} device requests, {} interrupts",
        r["atoll"]["exits_per_rand_io"],
        r["atoll"]["requests_per_rand_io"],
        r["atoll"]["interrupts_per_rand_io"]
    );
    println!(
        "atoll-vmm per MiB sequential: {} VM exits, {} requests",
        r["atoll"]["exits_per_seq_mib"], r["atoll"]["requests_per_seq_mib"]
    );
}

/// The guest command line: the same for both VMMs (atoll-init runs what follows `--`).
fn cmdline(seq_mib: u64, rand_ios: u32) -> String {
    format!(
        "{BASE_CMDLINE} -- /bin/atoll-bench io-guest --dev /dev/vda --seq-mib {seq_mib} --rand-ios {rand_ios}"
    )
}

fn atoll_cmd(a: &InnerArgs, disk: &Path, metrics: &Path, cmdline: &str) -> Command {
    let mut c = Command::new(&a.vmm);
    c.arg("--kernel")
        .arg(&a.kernel)
        .arg("--initrd")
        .arg(&a.initrd)
        .arg("--cmdline")
        .arg(cmdline)
        .arg("--mem")
        .arg("256")
        .arg("--timeout")
        .arg("150")
        .arg("--disk")
        .arg(disk)
        .arg("--metrics")
        .arg(metrics);
    c
}

fn qemu_cmd(a: &InnerArgs, disk: &Path, cmdline: &str) -> Command {
    let mut c = qemu_microvm(&a.qemu);
    c.args(["-m", "256"])
        .arg("-kernel")
        .arg(&a.kernel)
        .arg("-initrd")
        .arg(&a.initrd)
        .arg("-append")
        .arg(cmdline)
        .arg("-drive")
        .arg(format!(
            "id=d,file={},format=raw,if=none,cache=writeback",
            disk.display()
        ))
        .args(["-device", "virtio-blk-device,drive=d"]);
    c
}

/// The guest's `ATOLL-IO` result, from a VMM's console output.
fn guest_result(name: &str, output: &str) -> anyhow::Result<Value> {
    let line = output
        .lines()
        .find_map(|l| l.find(GUEST_PREFIX).map(|i| &l[i + GUEST_PREFIX.len()..]))
        .with_context(|| format!("{name}: the guest printed no result:\n{output}"))?;
    serde_json::from_str(line.trim()).with_context(|| format!("{name}: bad guest line {line:?}"))
}

/// One atoll-vmm boot; returns the guest result and the VMM metrics.
fn run_atoll(
    a: &InnerArgs,
    disk: &Path,
    metrics: &Path,
    cmd: &str,
) -> anyhow::Result<(Value, Value)> {
    let t = run_timed(
        &mut atoll_cmd(a, disk, metrics, cmd),
        GUEST_PREFIX.as_bytes(),
        Duration::from_secs(180),
    )?;
    if t.status != 0 {
        bail!("atoll-vmm failed (status {}):\n{}", t.status, t.output);
    }
    let m: Value = serde_json::from_slice(&std::fs::read(metrics).context("no metrics")?)?;
    Ok((guest_result("atoll-vmm", &t.output)?, m))
}

fn run_qemu(a: &InnerArgs, disk: &Path, cmd: &str) -> anyhow::Result<Value> {
    let t = run_timed(
        &mut qemu_cmd(a, disk, cmd),
        GUEST_PREFIX.as_bytes(),
        Duration::from_secs(180),
    )?;
    // isa-debug-exit turns guest status 0 into QEMU exit code 1.
    if t.status != 1 {
        bail!("qemu failed (status {}):\n{}", t.status, t.output);
    }
    guest_result("qemu", &t.output)
}

/// Counters of a run: total exits, and the block device's requests and interrupts.
fn counters(m: &Value) -> (f64, f64, f64) {
    let dev = m["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["kind"] == "block"))
        .cloned()
        .unwrap_or(Value::Null);
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    (
        f(&m["exits_total"]),
        f(&dev["requests"]),
        f(&dev["interrupts"]),
    )
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Runs the VMs here and prints one JSON line.
pub fn inner(a: &InnerArgs) -> anyhow::Result<()> {
    if a.runs == 0 || a.rand_ios == 0 {
        bail!("--runs and --rand-ios must be at least 1");
    }
    let disk = std::env::temp_dir().join(format!("atoll-io-{}.img", std::process::id()));
    let metrics = std::env::temp_dir().join(format!("atoll-io-{}.json", std::process::id()));
    // Real data (not a sparse file): every block differs.
    let mut data = vec![0u8; (DISK_MIB << 20) as usize];
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    }
    std::fs::write(&disk, &data).context("cannot write the disk image")?;
    drop(data);

    let seq_cmd = cmdline(DISK_MIB, 0);
    let rand_cmd = cmdline(0, a.rand_ios);
    let idle_cmd = cmdline(0, 0);
    let (mut a_seq, mut a_rand, mut q_seq, mut q_rand) = (vec![], vec![], vec![], vec![]);
    let (mut exits_rand, mut exits_seq) = (vec![], vec![]);
    let (mut req_rand, mut req_seq, mut irq_rand) = (vec![], vec![], vec![]);
    let n = f64::from(a.rand_ios);
    for round in 0..a.runs {
        // Alternate which VMM goes first.
        for atoll_turn in [round % 2 == 0, round % 2 != 0] {
            if atoll_turn {
                let (_, idle) = run_atoll(a, &disk, &metrics, &idle_cmd)?;
                let (g, seq) = run_atoll(a, &disk, &metrics, &seq_cmd)?;
                a_seq.push(g["seq_mib_s"].as_f64().unwrap_or(0.0));
                let (g, rand) = run_atoll(a, &disk, &metrics, &rand_cmd)?;
                a_rand.push(g["rand_iops"].as_f64().unwrap_or(0.0));
                let (e0, r0, i0) = counters(&idle);
                let (es, rs, _) = counters(&seq);
                let (er, rr, ir) = counters(&rand);
                exits_rand.push((er - e0) / n);
                req_rand.push((rr - r0) / n);
                irq_rand.push((ir - i0) / n);
                exits_seq.push((es - e0) / DISK_MIB as f64);
                req_seq.push((rs - r0) / DISK_MIB as f64);
                eprintln!(
                    "round {round}: atoll-vmm seq {} MiB/s, rand {} IOPS, {:.2} exits/IO",
                    a_seq.last().unwrap_or(&0.0),
                    a_rand.last().unwrap_or(&0.0),
                    exits_rand.last().unwrap_or(&0.0)
                );
            } else {
                let g = run_qemu(a, &disk, &seq_cmd)?;
                q_seq.push(g["seq_mib_s"].as_f64().unwrap_or(0.0));
                let g = run_qemu(a, &disk, &rand_cmd)?;
                q_rand.push(g["rand_iops"].as_f64().unwrap_or(0.0));
                eprintln!(
                    "round {round}: qemu seq {} MiB/s, rand {} IOPS",
                    q_seq.last().unwrap_or(&0.0),
                    q_rand.last().unwrap_or(&0.0)
                );
            }
        }
    }
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(&metrics);
    let med = |v: &[f64]| summarize(v).map(|s| s.median).unwrap_or(0.0);
    let (as_, ar, qs, qr) = (med(&a_seq), med(&a_rand), med(&q_seq), med(&q_rand));
    let result = json!({
        "runs": a.runs,
        "disk_mib": DISK_MIB,
        "rand_ios_per_run": a.rand_ios,
        "guest": "O_DIRECT reads of /dev/vda, queue depth 1: 1 MiB sequential over the whole disk; 4 KiB at random aligned offsets",
        "atoll": {
            "seq_mib_s_median": r1(as_),
            "seq_mib_s_samples": a_seq,
            "rand_iops_median": r1(ar),
            "rand_iops_samples": a_rand,
            "exits_per_rand_io": round3(med(&exits_rand)),
            "requests_per_rand_io": round3(med(&req_rand)),
            "interrupts_per_rand_io": round3(med(&irq_rand)),
            "exits_per_seq_mib": round3(med(&exits_seq)),
            "requests_per_seq_mib": round3(med(&req_seq)),
        },
        "qemu_microvm": {
            "seq_mib_s_median": r1(qs),
            "seq_mib_s_samples": q_seq,
            "rand_iops_median": r1(qr),
            "rand_iops_samples": q_rand,
        },
        "ratio_seq": if qs > 0.0 { round3(as_ / qs) } else { 0.0 },
        "ratio_rand": if qr > 0.0 { round3(ar / qr) } else { 0.0 },
        "cmdline_seq": seq_cmd,
        "cmdline_rand": rand_cmd,
    });
    println!("{JSON_PREFIX}{result}");
    Ok(())
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> anyhow::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len, 4096)?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            bail!("cannot allocate {len} bytes");
        }
        Ok(Self { ptr, layout })
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

fn pread_full(fd: i32, buf: &Aligned, offset: u64) -> anyhow::Result<()> {
    let off = i64::try_from(offset)?;
    // SAFETY: `buf` owns `layout.size()` writable bytes.
    let n = unsafe { libc::pread64(fd, buf.ptr.cast(), buf.layout.size(), off) };
    if n < 0 {
        return Err(std::io::Error::last_os_error()).context("pread");
    }
    if n as usize != buf.layout.size() {
        bail!("short read at {offset}: {n}");
    }
    Ok(())
}

/// Inside the guest: the timed reads.
pub fn guest(a: &GuestArgs) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&a.dev)
        .with_context(|| format!("cannot open {}", a.dev.display()))?;
    let fd = f.as_raw_fd();
    // SAFETY: plain syscall on our fd.
    let size = unsafe { libc::lseek64(fd, 0, libc::SEEK_END) };
    if size <= 0 {
        bail!("{} has no size", a.dev.display());
    }
    let size = size as u64;
    let mut out = json!({ "disk_bytes": size });
    if a.seq_mib > 0 {
        let buf = Aligned::new(1 << 20)?;
        let mibs = a.seq_mib.min(size >> 20);
        let t = Instant::now();
        for i in 0..mibs {
            pread_full(fd, &buf, i << 20)?;
        }
        let s = t.elapsed().as_secs_f64();
        out["seq_mib"] = json!(mibs);
        out["seq_s"] = json!(s);
        out["seq_mib_s"] = json!(r1(mibs as f64 / s));
    }
    if a.rand_ios > 0 {
        let buf = Aligned::new(4096)?;
        let blocks = size / 4096;
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let t = Instant::now();
        for _ in 0..a.rand_ios {
            // xorshift64: a fixed sequence, the same for both VMMs.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            pread_full(fd, &buf, (x % blocks) * 4096)?;
        }
        let s = t.elapsed().as_secs_f64();
        out["rand_ios"] = json!(a.rand_ios);
        out["rand_s"] = json!(s);
        out["rand_iops"] = json!(r1(f64::from(a.rand_ios) / s));
    }
    println!("{GUEST_PREFIX}{out}");
    Ok(())
}
