//! The cost of confinement: atoll-vmm jailed and under its per-thread seccomp
//! filters (the default) against `--no-jail --no-seccomp`, same binary, same guest,
//! alternating in one node run. Two starts: a cold boot (launch -> `ATOLL-READY`) and a restore from
//! one snapshot (launch -> the restored guest's first line), with VM exits per run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use atoll_node::Runner;
use serde_json::{json, Value};

use crate::boot::CMDLINE;
use crate::common::{inner_result, need, place_line, save, JSON_PREFIX};
use crate::proc::{run_timed, Timed};
use crate::stats::{r1, summarize};

/// Arguments of `atoll-bench confine`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Measured starts per mode and kind (after one warm-up each).
    #[arg(long, default_value_t = 10)]
    runs: u32,
    /// Where to save the JSON.
    #[arg(long, default_value = "perf/results/confine.json")]
    json: PathBuf,
    /// Directory with vmlinux and initramfs.cpio.
    #[arg(long, default_value = "build")]
    artifacts: PathBuf,
    /// Directory with the static atoll-vmm, atoll-vmm-api and atoll-bench.
    #[arg(long, default_value = "target/x86_64-unknown-linux-gnu/release")]
    bin: PathBuf,
}

/// Arguments of `atoll-bench confine-inner`.
#[derive(clap::Args, Debug)]
pub struct InnerArgs {
    #[arg(long)]
    runs: u32,
}

pub fn outer(args: &Args) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let runner = Runner::detect();
    let place = runner.place().clone();
    eprintln!("atoll-bench: {}", place_line(&place));
    let out = runner
        .file(need(&args.bin, "atoll-vmm")?, "atoll-vmm")?
        .file(need(&args.bin, "atoll-vmm-api")?, "atoll-vmm-api")?
        .file(need(&args.bin, "atoll-bench")?, "atoll-bench")?
        .file(need(&args.artifacts, "vmlinux")?, "vmlinux")?
        .file(need(&args.artifacts, "initramfs.cpio")?, "initramfs.cpio")?
        .timeout(Duration::from_secs(120 + u64::from(args.runs) * 60))
        .on_line(|_, line| {
            if !line.starts_with(JSON_PREFIX) {
                eprintln!("  | {line}");
            }
        })
        .run(&format!("./atoll-bench confine-inner --runs {}", args.runs))?;
    let result = inner_result(&out, &place)?;
    print_table(&result);
    save(&args.json, &result)?;
    Ok(())
}

fn print_table(r: &Value) {
    println!(
        "confinement: jail + seccomp filters (confined) vs --no-jail --no-seccomp, {} runs each, {}",
        r["runs"], r["where"]
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>8}",
        "", "median", "min", "max", "exits"
    );
    for kind in ["boot", "restore"] {
        for mode in ["confined", "unconfined"] {
            let v = &r[kind][mode];
            println!(
                "{:<22} {:>10} {:>10} {:>10} {:>8}",
                format!("{kind} {mode}"),
                format!("{} ms", v["median_ms"]),
                format!("{} ms", v["min_ms"]),
                format!("{} ms", v["max_ms"]),
                v["exits_median"],
            );
        }
        println!(
            "{kind}: confined/unconfined median ratio {}, difference {} ms; entering the jail \
             itself (the VMM's phases) median {} ms",
            r[kind]["ratio_median"],
            r[kind]["difference_median_ms"],
            r[kind]["confined"]["jail_median_ms"]
        );
    }
}

/// The guest of both kinds: counts to 30 in 0.1 s steps and exits 0. The snapshot is
/// taken at its 5th line, so a restore prints `tick 6` first.
const GUEST: &str = "i=0; while [ $i -lt 30 ]; do i=$((i+1)); echo tick $i; sleep 0.1; done";

/// Builds the command of one start, confined or not, writing metrics to the path.
type StartCmd = fn(bool, &Path) -> Command;

fn vmm(confined: bool) -> Command {
    let mut c = Command::new("./atoll-vmm");
    if confined {
        // As a pod runs: under a uid of its own.
        c.args(["--jail-uid", "2000000001"]);
    } else {
        c.args(["--no-jail", "--no-seccomp"]);
    }
    c
}

fn boot_cmd(confined: bool, metrics: &Path) -> Command {
    let mut c = vmm(confined);
    c.args(["--kernel", "vmlinux", "--initrd", "initramfs.cpio"])
        .args(["--cmdline", CMDLINE, "--mem", "128", "--timeout", "60"])
        .arg("--metrics")
        .arg(metrics)
        .args(["--", "/bin/sh", "-c", GUEST]);
    c
}

fn restore_cmd(confined: bool, metrics: &Path) -> Command {
    let mut c = vmm(confined);
    c.args(["--restore", "snap.state", "--mem-file", "snap.mem"])
        .args(["--timeout", "60", "--metrics"])
        .arg(metrics);
    c
}

/// Boots the guest with an API socket and snapshots it at its 5th tick.
fn make_snapshot() -> anyhow::Result<()> {
    let _ = std::fs::remove_file("api.sock");
    let mut child = vmm(true)
        .args(["--kernel", "vmlinux", "--initrd", "initramfs.cpio"])
        .args(["--cmdline", CMDLINE, "--mem", "128", "--timeout", "120"])
        .args(["--api-sock", "api.sock", "--", "/bin/sh", "-c", GUEST])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start atoll-vmm")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let seen = lines.any(|l| l.is_ok_and(|l| l.trim() == "tick 5"));
    if !seen {
        let _ = child.kill();
        bail!("the snapshot guest never reached tick 5");
    }
    let api = |method: &str, path: &str, body: &str| -> anyhow::Result<()> {
        let st = Command::new("./atoll-vmm-api")
            .args(["api.sock", method, path, body])
            .stdout(std::process::Stdio::null())
            .status()?;
        if !st.success() {
            bail!("{method} {path} failed ({st})");
        }
        Ok(())
    };
    api("PATCH", "/vm", r#"{"state":"Paused"}"#)?;
    api(
        "PUT",
        "/snapshot/create",
        r#"{"snapshot_path":"snap.state","mem_file_path":"snap.mem"}"#,
    )?;
    api("PUT", "/actions", r#"{"action_type":"Stop"}"#)?;
    // Drain the rest of the output so the VMM never blocks on a full pipe.
    for _ in lines {}
    let _ = child.wait();
    Ok(())
}

struct Samples {
    ms: Vec<f64>,
    exits: Vec<f64>,
    jail_ms: Vec<f64>,
}

fn measure(t: &Timed, metrics: &Path, what: &str) -> anyhow::Result<(f64, f64, f64)> {
    let Some(ms) = t.marker_ms.filter(|_| t.status == 0) else {
        bail!("{what} failed (status {}):\n{}", t.status, t.output);
    };
    let m: Value = serde_json::from_slice(
        &std::fs::read(metrics).with_context(|| format!("{what}: no metrics"))?,
    )?;
    // The VMM's own time in the jail step: from its last set-up phase to "jailed".
    let phase = |name: &str| {
        m["vmm_phases_us"]
            .as_array()
            .and_then(|p| p.iter().find(|e| e[0] == name).and_then(|e| e[1].as_f64()))
    };
    let jail_ms = match (phase("vcpus_configured"), phase("jailed")) {
        (Some(a), Some(b)) => (b - a) / 1000.0,
        _ => 0.0,
    };
    Ok((ms, m["exits_total"].as_f64().unwrap_or(0.0), jail_ms))
}

fn summary(s: &Samples) -> Value {
    let t = summarize(&s.ms).expect("samples");
    let e = summarize(&s.exits).expect("samples");
    let j = summarize(&s.jail_ms).expect("samples");
    json!({
        "jail_median_ms": r1(j.median),
        "median_ms": r1(t.median),
        "min_ms": r1(t.min),
        "max_ms": r1(t.max),
        "samples_ms": s.ms.iter().map(|x| r1(*x)).collect::<Vec<_>>(),
        "exits_median": e.median,
    })
}

/// Runs both kinds here, alternating the mode first in each round; prints one JSON line.
pub fn inner(a: &InnerArgs) -> anyhow::Result<()> {
    let metrics = std::env::temp_dir().join(format!("atoll-confine-{}.json", std::process::id()));
    let timeout = Duration::from_secs(90);
    make_snapshot()?;
    let mut out = json!({ "runs": a.runs });
    for kind in ["boot", "restore"] {
        let (marker, cmd): (&[u8], StartCmd) = match kind {
            "boot" => (b"ATOLL-READY", boot_cmd),
            _ => (b"tick 6", restore_cmd),
        };
        let mut on = Samples {
            ms: Vec::new(),
            exits: Vec::new(),
            jail_ms: Vec::new(),
        };
        let mut off = Samples {
            ms: Vec::new(),
            exits: Vec::new(),
            jail_ms: Vec::new(),
        };
        for round in 0..=a.runs {
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for confined in order {
                let t = run_timed(&mut cmd(confined, &metrics), marker, timeout)?;
                let what = format!("{kind} (confined: {confined})");
                let (ms, exits, jail_ms) = measure(&t, &metrics, &what)?;
                if round == 0 {
                    continue; // warm-up
                }
                let s = if confined { &mut on } else { &mut off };
                s.ms.push(ms);
                s.exits.push(exits);
                s.jail_ms.push(jail_ms);
                eprintln!("{kind} round {round}: confined={confined} {ms:.1} ms");
            }
        }
        let (a_on, a_off) = (summary(&on), summary(&off));
        let m_on = a_on["median_ms"].as_f64().unwrap_or(0.0);
        let m_off = a_off["median_ms"].as_f64().unwrap_or(0.0);
        out[kind] = json!({
            "confined": a_on,
            "unconfined": a_off,
            "ratio_median": if m_off > 0.0 { (m_on / m_off * 1000.0).round() / 1000.0 } else { 0.0 },
            "difference_median_ms": r1(m_on - m_off),
        });
    }
    let _ = std::fs::remove_file(&metrics);
    println!("{JSON_PREFIX}{out}");
    Ok(())
}
