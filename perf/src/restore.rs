//! Pod VMs from the warm pool, measured where a real KVM is:
//!
//! - `restore`: the same pod VM brought to "agent answers" (vsock connected, Hello
//!   answered) by a cold boot and by a restore of the pod template, alternating, with
//!   the exact atoll-vmm arguments `atoll run` uses for each (`PodConfig::vmm_args`);
//!   plus what each touched: resident KiB of guest RAM (the memfd of a boot, the
//!   memory file's mapping of a restore, split into pages read from the page cache and
//!   pages copied on write) and VM exits, both at the moment the agent answered.
//!   A fourth mode, `standby`, is the pool's: atoll-vmm started with `--standby`
//!   (jailed, KVM open, sockets bound) and given the template's snapshot with
//!   `PUT /snapshot/preload` (VM, vCPUs, memory and working set prepared) before
//!   the clock starts, then timed from its `PUT /snapshot/load` to the agent's
//!   answer; the pre-start and the preload are reported apart. A fifth,
//!   `standby_no_preload`, is the same VMM loading without a preload. A sixth,
//!   `restore_uffd`, restores with `--mem-backend uffd`: guest memory anonymous,
//!   filled from the memory file by a userfaultfd page server (the working set
//!   copied in first), the alternative the default (MAP_PRIVATE) is measured against.
//! - `density`: N idle clones of one template at once: the rate they come up at, and
//!   each one's proportional set size (PSS) beyond the snapshot pages all of them
//!   share, until N or until one fails (the closing line says how far it got).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use atoll_cri::agent::AgentClient;
use atoll_cri::pod::template::{self, Template, TemplateSpec};
use atoll_cri::pod::{Boot, PodConfig, API_SOCK};
use atoll_node::Runner;
use serde_json::{json, Value};

use crate::common::{inner_result, need, place_line, save, JSON_PREFIX};
use crate::stats::{r1, summarize};

/// Arguments of `atoll-bench restore` and `atoll-bench density`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Measured starts per mode (after one warm-up each), or clones for `density`.
    #[arg(long, default_value_t = 10)]
    runs: u32,
    /// Where to save the JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Directory with vmlinux and initramfs.cpio.
    #[arg(long, default_value = "build")]
    artifacts: PathBuf,
    /// Directory with the static atoll-vmm and atoll-bench.
    #[arg(long, default_value = "target/x86_64-unknown-linux-gnu/release")]
    bin: PathBuf,
    /// Memory of the pod VM in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
}

/// Arguments of the inner halves.
#[derive(clap::Args, Debug)]
pub struct InnerArgs {
    #[arg(long)]
    runs: u32,
    #[arg(long)]
    mem: u64,
}

/// Which measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Restore,
    Density,
}

pub fn outer(kind: Kind, args: &Args) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let (name, default_json) = match kind {
        Kind::Restore => ("restore", "perf/results/restore.json"),
        Kind::Density => ("density", "perf/results/density.json"),
    };
    let runner = Runner::detect();
    let place = runner.place().clone();
    eprintln!("atoll-bench: {}", place_line(&place));
    // Density wants room for many guests in the node, and one node CPU: creating and
    // destroying many VMs makes L1's kernel patch its text (static keys) often, which
    // multi-threaded TCG now and then executes half-patched (an int3 oops in L1).
    let (node_mib, node_cpus) = if kind == Kind::Density {
        (8192, 1)
    } else {
        (2048, 2)
    };
    let out = runner
        .file(need(&args.bin, "atoll-vmm")?, "atoll-vmm")?
        .file(need(&args.bin, "atoll-bench")?, "atoll-bench")?
        .file(need(&args.artifacts, "vmlinux")?, "vmlinux")?
        .file(need(&args.artifacts, "initramfs.cpio")?, "initramfs.cpio")?
        .node_size(node_mib, node_cpus)
        .timeout(Duration::from_secs(300 + u64::from(args.runs) * 60))
        .on_line(|_, line| {
            if !line.starts_with(JSON_PREFIX) {
                eprintln!("  | {line}");
            }
        })
        .run(&format!(
            "./atoll-bench {name}-inner --runs {} --mem {}",
            args.runs, args.mem
        ))?;
    let result = inner_result(&out, &place)?;
    match kind {
        Kind::Restore => print_restore(&result),
        Kind::Density => print_density(&result),
    }
    let json = args.json.clone().unwrap_or_else(|| default_json.into());
    save(&json, &result)
}

/// What one start measured.
struct Sample {
    /// Launch to Hello answered.
    ms: f64,
    /// Resident guest RAM at that moment, KiB.
    ram_rss_kib: u64,
    /// Of which copied on write (anonymous), KiB.
    ram_private_kib: u64,
    exits: u64,
    /// The VMM's set-up phases (name, µs since its clock started: the launch, or
    /// for a standby VMM the load request), in order.
    phases_us: Vec<(String, u64)>,
}

/// Where the pieces live in the node.
struct Setup {
    kernel: PathBuf,
    initramfs: PathBuf,
    vmm: PathBuf,
    run_dir: PathBuf,
    template: Template,
    template_build_ms: Option<u64>,
}

fn setup(mem: u64) -> anyhow::Result<Setup> {
    let here = std::env::current_dir()?;
    let run_dir = std::env::temp_dir().join("atoll-bench-pods");
    std::fs::create_dir_all(&run_dir)?;
    // Templates of the benchmark stay apart from the node's others.
    std::env::set_var(
        "ATOLL_CACHE",
        std::env::temp_dir().join("atoll-bench-cache"),
    );
    let spec = TemplateSpec {
        kernel: here.join("vmlinux"),
        initramfs: here.join("initramfs.cpio"),
        vmm: here.join("atoll-vmm"),
        vcpus: 1,
        mem_mib: mem,
        net: false,
    };
    let (template, ensured) = template::ensure(&spec, &run_dir)?;
    let template_build_ms = match ensured {
        template::Ensured::Built(meta) => Some(meta.build_ms),
        template::Ensured::Found => None,
    };
    Ok(Setup {
        kernel: spec.kernel,
        initramfs: spec.initramfs,
        vmm: spec.vmm,
        run_dir,
        template,
        template_build_ms,
    })
}

/// A pod VM started the way `atoll run` starts it, with its own directory.
struct Vm {
    child: Child,
    dir: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn(s: &Setup, id: &str, boot: Boot, mem: u64, lazy: bool, uffd: bool) -> anyhow::Result<Vm> {
    let dir = s.run_dir.join(id);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut cfg = PodConfig::new(id, s.kernel.clone(), s.initramfs.clone(), s.vmm.clone());
    cfg.mem_mib = mem;
    cfg.boot = boot;
    let mut args = cfg.vmm_args(&dir, None);
    if lazy {
        // Without the working set: every page faults in as the guest touches it.
        if let Some(i) = args.iter().position(|a| a == "--working-set") {
            args.drain(i..i + 2);
        }
    }
    // Both modes get the API socket, so exits can be read at the moment that counts.
    let tail = args.iter().position(|a| a == "--").unwrap_or(args.len());
    args.splice(
        tail..tail,
        [
            "--api-sock".to_string(),
            dir.join(API_SOCK).display().to_string(),
        ],
    );
    if uffd {
        let tail = args.iter().position(|a| a == "--").unwrap_or(args.len());
        args.splice(
            tail..tail,
            ["--mem-backend".to_string(), "uffd".to_string()],
        );
    }
    let child = Command::new(&s.vmm)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", s.vmm.display()))?;
    Ok(Vm { child, dir })
}

/// A VMM started with `--standby` for a clone in its own directory, once it
/// answers on its API socket.
fn spawn_standby(s: &Setup, id: &str) -> anyhow::Result<Vm> {
    let dir = s.run_dir.join(id);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let child = Command::new(&s.vmm)
        .args(Template::standby_args(&dir))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", s.vmm.display()))?;
    let mut vm = Vm { child, dir };
    let start = Instant::now();
    loop {
        if let Some(status) = vm.child.try_wait()? {
            bail!("atoll-vmm --standby exited ({status})");
        }
        if template::api_call(&vm.dir.join(API_SOCK), "GET", "/vm", "").is_ok() {
            return Ok(vm);
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("atoll-vmm --standby did not answer within 30 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A clone loaded into a standby VMM (the template preloaded into it first when
/// `preload`, as the pool does): the clock runs from the load request. Returns
/// the sample, how long the pre-start took and how long the preload (neither on
/// the clock).
fn measure_standby(s: &Setup, id: &str, preload: bool) -> anyhow::Result<(Sample, f64, f64)> {
    let pre = Instant::now();
    let mut vm = spawn_standby(s, id)?;
    let prestart_ms = pre.elapsed().as_secs_f64() * 1000.0;
    let mut preload_ms = 0.0;
    if preload {
        let t = Instant::now();
        template::api_call(
            &vm.dir.join(API_SOCK),
            "PUT",
            "/snapshot/preload",
            &s.template.preload_body(),
        )?;
        preload_ms = t.elapsed().as_secs_f64() * 1000.0;
    }
    let t0 = Instant::now();
    template::api_call(
        &vm.dir.join(API_SOCK),
        "PUT",
        "/snapshot/load",
        &s.template.load_body(&[], None, true),
    )?;
    let client = agent(&mut vm, Duration::from_secs(120))?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let (ram_rss_kib, ram_private_kib) = guest_ram_kib(vm.child.id());
    let (exits, phases_us) = vmm_metrics(&vm);
    drop(client);
    Ok((
        Sample {
            ms,
            ram_rss_kib,
            ram_private_kib,
            exits,
            phases_us,
        },
        prestart_ms,
        preload_ms,
    ))
}

/// Connects to the agent (retrying until it listens) and says Hello.
fn agent(vm: &mut Vm, timeout: Duration) -> anyhow::Result<AgentClient> {
    let start = Instant::now();
    loop {
        if let Some(status) = vm.child.try_wait()? {
            bail!("atoll-vmm exited ({status}) before the agent answered");
        }
        match AgentClient::connect(&vm.dir.join("vsock.sock"), Duration::from_millis(200)) {
            Ok(c) => return Ok(c),
            Err(_) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => bail!("the agent did not answer within {timeout:?}: {e}"),
        }
    }
}

/// (Rss, Anonymous) in KiB of the guest RAM mapping of process `pid`: pages mapped,
/// and of those the ones copied on write. (Not Private_Dirty: page-cache pages of a
/// file on tmpfs count as dirty without ever being copied.)
fn guest_ram_kib(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut rss, mut private, mut inside) = (0, 0, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            inside = line.contains("atoll-guest-ram") || line.ends_with("/memory");
            continue;
        }
        let kib = |l: &str| -> u64 {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        if inside && line.starts_with("Rss:") {
            rss += kib(line);
        } else if inside && line.starts_with("Anonymous:") {
            private += kib(line);
        }
    }
    (rss, private)
}

/// The sum of `fields` of process `pid`'s smaps_rollup, in KiB.
fn rollup_kib(pid: u32, fields: &[&str]) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .filter(|l| fields.iter().any(|f| l.starts_with(f)))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// PSS of process `pid` in KiB: its own pages plus its share of shared ones.
fn pss_kib(pid: u32) -> u64 {
    rollup_kib(pid, &["Pss:"])
}

/// USS of process `pid` in KiB: the pages only it maps (what one more clone costs).
fn uss_kib(pid: u32) -> u64 {
    rollup_kib(pid, &["Private_Clean:", "Private_Dirty:"])
}

/// The VMM's exit count and set-up phases, from its API's metrics.
fn vmm_metrics(vm: &Vm) -> (u64, Vec<(String, u64)>) {
    vmm_metrics_value(&vmm_metrics_json(vm))
}

/// The VMM's `GET /metrics` answer (null if there is none).
fn vmm_metrics_json(vm: &Vm) -> Value {
    template::api_call(&vm.dir.join(API_SOCK), "GET", "/metrics", "")
        .ok()
        .and_then(|b| serde_json::from_str::<Value>(&b).ok())
        .unwrap_or(Value::Null)
}

/// The exit count and phases of a metrics answer.
fn vmm_metrics_value(v: &Value) -> (u64, Vec<(String, u64)>) {
    let exits = v["metrics"]["exits_total"].as_u64().unwrap_or(0);
    let phases = v["metrics"]["vmm_phases_us"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[0].as_str()?.to_owned(), p[1].as_u64()?)))
                .collect()
        })
        .unwrap_or_default();
    (exits, phases)
}

fn measure(
    s: &Setup,
    id: &str,
    boot: Boot,
    mem: u64,
    lazy: bool,
    uffd: bool,
) -> anyhow::Result<Sample> {
    let t0 = Instant::now();
    let mut vm = spawn(s, id, boot, mem, lazy, uffd)?;
    let client = agent(&mut vm, Duration::from_secs(120))?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let (mut ram_rss_kib, mut ram_private_kib) = guest_ram_kib(vm.child.id());
    let metrics = vmm_metrics_json(&vm);
    let (exits, phases_us) = vmm_metrics_value(&metrics);
    let pages = &metrics["uffd_pages"];
    if uffd && pages.is_object() {
        // Anonymous memory (unnamed where the kernel cannot name it): the page
        // server's counts say what it holds; all of it is this clone's own, but
        // the zero pages, which map the shared zero page until written.
        let n = |k: &str| pages[k].as_u64().unwrap_or(0);
        ram_rss_kib = (n("prefetched") + n("copied") + n("zero")) * 4;
        ram_private_kib = (n("prefetched") + n("copied")) * 4;
    }
    drop(client);
    Ok(Sample {
        ms,
        ram_rss_kib,
        ram_private_kib,
        exits,
        phases_us,
    })
}

fn summary(samples: &[Sample]) -> Value {
    let ms: Vec<f64> = samples.iter().map(|s| s.ms).collect();
    let med = |f: &dyn Fn(&Sample) -> u64| {
        let v: Vec<f64> = samples.iter().map(|s| f(s) as f64).collect();
        summarize(&v).map(|s| s.median)
    };
    let s = summarize(&ms).unwrap_or(crate::stats::Summary {
        median: 0.0,
        min: 0.0,
        max: 0.0,
    });
    // Each VMM phase's median time (ms since the VMM's clock started), in the
    // order the first sample has them: where the time to "agent answers" goes.
    let mut phases = Vec::new();
    for (name, _) in samples.first().map_or(&[][..], |s| &s.phases_us[..]) {
        let v: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.phases_us.iter().find(|(n, _)| n == name))
            .map(|(_, us)| *us as f64 / 1000.0)
            .collect();
        if let Some(m) = summarize(&v) {
            phases.push(json!([name, r1(m.median)]));
        }
    }
    json!({
        "median_ms": r1(s.median), "min_ms": r1(s.min), "max_ms": r1(s.max),
        "vmm_phases_ms_median": phases,
        "samples_ms": ms.iter().map(|x| r1(*x)).collect::<Vec<_>>(),
        "guest_ram_rss_kib_median": med(&|s| s.ram_rss_kib),
        "guest_ram_copied_kib_median": med(&|s| s.ram_private_kib),
        "exits_median": med(&|s| s.exits),
    })
}

/// `restore-inner`: alternating cold boots and restores; one JSON line.
pub fn restore_inner(a: &InnerArgs) -> anyhow::Result<()> {
    let s = setup(a.mem)?;
    let (mut cold, mut restored, mut lazy, mut standby, mut standby_full, mut uffd) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let (mut prestart, mut preload) = (Vec::new(), Vec::new());
    for round in 0..=a.runs {
        // 0 cold, 1 restore with the working set prefetched, 2 restore without,
        // 3 a standby VMM with the template preloaded loading it (the pool's way),
        // 4 a standby VMM loading it without a preload, 5 a restore whose memory
        // a userfaultfd page server brings in (working set prefetched).
        let mut order = [0, 1, 2, 3, 4, 5];
        order.rotate_left(round as usize % 6);
        for mode in order {
            let boot = || Boot::Template(s.template.clone());
            let sample = match mode {
                0 => measure(&s, &format!("c{round}"), Boot::Cold, a.mem, false, false)?,
                1 => measure(&s, &format!("r{round}"), boot(), a.mem, false, false)?,
                2 => measure(&s, &format!("l{round}"), boot(), a.mem, true, false)?,
                5 => measure(&s, &format!("u{round}"), boot(), a.mem, false, true)?,
                _ => {
                    let preloaded = mode == 3;
                    let (sample, pre, load) =
                        measure_standby(&s, &format!("s{mode}-{round}"), preloaded)?;
                    if round > 0 {
                        prestart.push(pre);
                        if preloaded {
                            preload.push(load);
                        }
                    }
                    sample
                }
            };
            if round > 0 {
                [
                    &mut cold,
                    &mut restored,
                    &mut lazy,
                    &mut standby,
                    &mut standby_full,
                    &mut uffd,
                ][mode]
                    .push(sample);
            }
        }
    }
    let meta: Value = std::fs::read(s.template.dir.join("meta.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let (c, r, l, sb, sf, u) = (
        summary(&cold),
        summary(&restored),
        summary(&lazy),
        summary(&standby),
        summary(&standby_full),
        summary(&uffd),
    );
    let pre = summarize(&prestart);
    let pl = summarize(&preload);
    let ratio = |x: &Value| {
        let v = x["median_ms"].as_f64().unwrap_or(0.0) / c["median_ms"].as_f64().unwrap_or(1.0);
        (v * 1000.0).round() / 1000.0
    };
    let result = json!({
        "runs": a.runs,
        "mem_mib": a.mem,
        "ratio_median": ratio(&r),
        "ratio_median_lazy": ratio(&l),
        "ratio_median_uffd": ratio(&u),
        "ratio_median_standby": ratio(&sb),
        "ratio_median_standby_no_preload": ratio(&sf),
        "cold": c,
        "restore": r,
        "restore_lazy": l,
        "restore_uffd": u,
        "standby": sb,
        "standby_no_preload": sf,
        "standby_prestart_ms": {
            "median": pre.as_ref().map(|p| r1(p.median)),
            "min": pre.as_ref().map(|p| r1(p.min)),
            "max": pre.as_ref().map(|p| r1(p.max)),
        },
        "standby_preload_ms": {
            "median": pl.as_ref().map(|p| r1(p.median)),
            "min": pl.as_ref().map(|p| r1(p.min)),
            "max": pl.as_ref().map(|p| r1(p.max)),
        },
        "template": {
            "build_ms": s.template_build_ms,
            "snapshot": meta["snapshot"],
            "working_set": meta["working_set"],
        },
        "restore_mode": "MAP_PRIVATE of the memory file (page cache shared by clones); \
            restore: the recorded working set populated (MADV_POPULATE_READ) and \
            prefaulted into KVM (KVM_PRE_FAULT_MEMORY) first; restore_lazy: every page on \
            first touch; restore_uffd: anonymous memory filled by a userfaultfd page \
            server from the memory file (working set copied in first, UFFDIO_COPY; other \
            pages on first touch; no page cache shared); standby: a VMM started with --standby (exec, KVM, sockets, jail \
            done before the clock) and given the template as PUT /snapshot/preload (state \
            read, memory mapped, VM and vCPUs created, working set prefetched, also before \
            the clock: the pool's way) loads it as PUT /snapshot/load; standby_no_preload: \
            the same without the preload",
    });
    println!("{JSON_PREFIX}{result}");
    Ok(())
}

/// `density-inner`: up to `runs` idle clones at once; one JSON line.
pub fn density_inner(a: &InnerArgs) -> anyhow::Result<()> {
    let s = setup(a.mem)?;
    let mut vms = Vec::new();
    let mut clients = Vec::new();
    let mut up_ms = Vec::new();
    let t0 = Instant::now();
    let mut stopped = None;
    for n in 0..a.runs {
        let started = Instant::now();
        let boot = Boot::Template(s.template.clone());
        let mut vm = match spawn(&s, &format!("d{n}"), boot, a.mem, false, false) {
            Ok(vm) => vm,
            Err(e) => {
                stopped = Some(format!("clone {n} could not start: {e:#}"));
                break;
            }
        };
        match agent(&mut vm, Duration::from_secs(120)) {
            Ok(c) => clients.push(c),
            Err(e) => {
                stopped = Some(format!("clone {n}'s agent did not answer: {e:#}"));
                break;
            }
        }
        up_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        vms.push(vm);
        if n % 10 == 9 {
            eprintln!(
                "{} clones up after {:.1} s",
                n + 1,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let total_s = t0.elapsed().as_secs_f64();
    // Let them settle idle, then measure.
    std::thread::sleep(Duration::from_secs(2));
    let pss: Vec<f64> = vms.iter().map(|vm| pss_kib(vm.child.id()) as f64).collect();
    let uss: Vec<f64> = vms.iter().map(|vm| uss_kib(vm.child.id()) as f64).collect();
    let ram: Vec<(u64, u64)> = vms.iter().map(|vm| guest_ram_kib(vm.child.id())).collect();
    let shared_kib = std::fs::metadata(s.template.memory())
        .map(|_| {
            // The snapshot's data pages in the page cache (what clones share).
            let meta: Value = std::fs::read(s.template.dir.join("meta.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(Value::Null);
            meta["snapshot"]["memory"]["written"].as_u64().unwrap_or(0) / 1024
        })
        .unwrap_or(0);
    let n = vms.len();
    let copied: Vec<f64> = ram.iter().map(|(_, p)| *p as f64).collect();
    let stat = |v: &[f64]| {
        summarize(v).map(|s| json!({"median": r1(s.median), "min": r1(s.min), "max": r1(s.max)}))
    };
    let mut per_clone = BTreeMap::new();
    per_clone.insert("pss_kib", stat(&pss));
    per_clone.insert("uss_kib", stat(&uss));
    per_clone.insert("guest_ram_copied_kib", stat(&copied));
    per_clone.insert("up_ms", stat(&up_ms));
    let result = json!({
        "asked": a.runs,
        "clones": n,
        "stopped_because": stopped,
        "mem_mib": a.mem,
        "total_s": r1(total_s),
        "clones_per_s": if total_s > 0.0 { r1(n as f64 / total_s) } else { 0.0 },
        "node_cpus": std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1),
        "snapshot_data_kib": shared_kib,
        "per_clone": per_clone,
        "pss_total_mib": r1(pss.iter().sum::<f64>() / 1024.0),
    });
    drop(clients);
    drop(vms);
    println!("{JSON_PREFIX}{result}");
    Ok(())
}

fn print_restore(r: &Value) {
    println!(
        "pod VM to agent answering: cold boot vs restore of the pod template, {} runs each, {}",
        r["runs"], r["where"]
    );
    println!(
        "{:<18} {:>10} {:>10} {:>10} {:>14} {:>14} {:>8}",
        "", "median", "min", "max", "RAM touched", "RAM copied", "exits"
    );
    for key in [
        "cold",
        "restore",
        "restore_lazy",
        "restore_uffd",
        "standby",
        "standby_no_preload",
    ] {
        let v = &r[key];
        println!(
            "{key:<18} {:>10} {:>10} {:>10} {:>14} {:>14} {:>8}",
            format!("{} ms", v["median_ms"]),
            format!("{} ms", v["min_ms"]),
            format!("{} ms", v["max_ms"]),
            format!("{} KiB", v["guest_ram_rss_kib_median"]),
            format!("{} KiB", v["guest_ram_copied_kib_median"]),
            v["exits_median"]
        );
    }
    println!(
        "ratio_median (restore/cold): {}; without the working set: {}; userfaultfd: {}; \
         standby VMM: {} (without the preload: {})",
        r["ratio_median"],
        r["ratio_median_lazy"],
        r["ratio_median_uffd"],
        r["ratio_median_standby"],
        r["ratio_median_standby_no_preload"]
    );
    println!(
        "standby pre-start (spawn to API answering, off the clock): median {} ms, min {} ms; \
         its preload (off the clock): median {} ms, min {} ms",
        r["standby_prestart_ms"]["median"],
        r["standby_prestart_ms"]["min"],
        r["standby_preload_ms"]["median"],
        r["standby_preload_ms"]["min"]
    );
    for key in ["restore", "restore_uffd", "standby", "standby_no_preload"] {
        if let Some(p) = r[key]["vmm_phases_ms_median"].as_array() {
            let line: Vec<String> = p
                .iter()
                .map(|p| format!("{} {}", p[0].as_str().unwrap_or("?"), p[1]))
                .collect();
            println!(
                "{key}: VMM phases, median ms from its clock: {}",
                line.join(", ")
            );
        }
    }
}

fn print_density(r: &Value) {
    println!(
        "idle clones of one pod template ({} MiB each), {}",
        r["mem_mib"], r["where"]
    );
    println!(
        "{} of {} clones up in {} s ({} clones/s on {} CPUs)",
        r["clones"], r["asked"], r["total_s"], r["clones_per_s"], r["node_cpus"]
    );
    if let Some(why) = r["stopped_because"].as_str() {
        println!("stopped early: {why}");
    }
    println!(
        "per clone (medians): USS {} KiB (its own pages), PSS {} KiB, guest RAM copied {} KiB, up in {} ms; all clones {} MiB PSS; snapshot data shared: {} KiB",
        r["per_clone"]["uss_kib"]["median"],
        r["per_clone"]["pss_kib"]["median"],
        r["per_clone"]["guest_ram_copied_kib"]["median"],
        r["per_clone"]["up_ms"]["median"],
        r["pss_total_mib"],
        r["snapshot_data_kib"]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_is_found_in_smaps_of_this_process() {
        // This process has no guest RAM: zero, not a parse failure.
        assert_eq!(guest_ram_kib(std::process::id()), (0, 0));
        assert!(pss_kib(std::process::id()) > 0);
    }
}
