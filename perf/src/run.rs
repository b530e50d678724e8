//! The pod-start benchmark: `atoll run IMAGE -- echo MARKER` (a restored clone of the
//! pod template, as by default) and `atoll run --cold` (a kernel boot) against `runc
//! run` of the same image's bundle, in turn, in one run where a real KVM is.
//!
//! runc is a dynamically linked Go program: in the nested node, loading it costs far
//! more than on hardware (TCG emulates the loader's page faults). That cost is
//! measured (`runc --version`, launch to exit) and the ratio reported with and
//! without it.
//!
//! Both start from a cold process each time; the clock runs from the launch of the
//! command to the container's first output line. For atoll, `atoll run --timings`
//! also gives the phases (VMM start, kernel and init up to the agent, image, create,
//! start): the outer half summarises every numeric field it finds there, so new
//! phases show up without changes here.
//!
//! The host prepares everything the node needs: a store holding the built-in busybox
//! image with its erofs already converted (so conversion is not timed; `atoll-image
//! bench` measures that), and an OCI bundle of the same image for runc.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use atoll_node::Runner;
use serde_json::{json, Value};

use crate::common::{inner_result, need, place_line, save, JSON_PREFIX};
use crate::proc::run_timed;
use crate::stats::{r1, summarize};

/// What the container prints first.
const MARKER: &str = "ATOLL-BENCH-FIRST-OUTPUT";
/// The image both run.
const IMAGE: &str = "atoll/busybox:latest";
/// Debian's runc.
const RUNC: &str = "/usr/sbin/runc";

/// Arguments of `atoll-bench run`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Measured starts per runtime (after one warm-up each).
    #[arg(long, default_value_t = 10)]
    runs: u32,
    /// Where to save the JSON.
    #[arg(long, default_value = "perf/results/run.json")]
    json: PathBuf,
    /// Directory with vmlinux and initramfs.cpio.
    #[arg(long, default_value = "build")]
    artifacts: PathBuf,
    /// Directory with the static atoll, atoll-vmm, atoll-image and atoll-bench.
    #[arg(long, default_value = "target/x86_64-unknown-linux-gnu/release")]
    bin: PathBuf,
    /// Memory of the pod VM in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u32,
}

/// Arguments of `atoll-bench run-inner`.
#[derive(clap::Args, Debug)]
pub struct InnerArgs {
    #[arg(long)]
    runs: u32,
    #[arg(long)]
    mem: u32,
    #[arg(long, default_value = "./atoll")]
    atoll: PathBuf,
    #[arg(long, default_value = "bundle")]
    bundle: PathBuf,
    #[arg(long, default_value = RUNC)]
    runc: PathBuf,
}

fn atoll_image(bin: &Path, store: &Path, args: &[&str]) -> anyhow::Result<()> {
    let tool = need(bin, "atoll-image")?;
    let out = Command::new(&tool)
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", tool.display()))?;
    if !out.status.success() {
        bail!(
            "atoll-image {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The store (busybox image + its cached erofs) and runc's bundle, under `work`.
fn prepare(bin: &Path, work: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let store = work.join("store");
    atoll_image(bin, &store, &["builtin"])?;
    let erofs = work.join("busybox.erofs");
    atoll_image(
        bin,
        &store,
        &["convert", IMAGE, "-o", &erofs.to_string_lossy()],
    )?;
    std::fs::remove_file(&erofs).ok();
    std::fs::remove_file(work.join("busybox.erofs.config.json")).ok();

    let bundle = work.join("bundle");
    std::fs::create_dir_all(&bundle)?;
    let rootfs = bundle.join("rootfs");
    atoll_image(bin, &store, &["unpack", IMAGE, &rootfs.to_string_lossy()])?;
    let spec = Command::new(RUNC)
        .arg("spec")
        .current_dir(&bundle)
        .output()
        .with_context(|| format!("cannot run {RUNC} (apt-get install runc)"))?;
    if !spec.status.success() {
        bail!(
            "runc spec failed: {}",
            String::from_utf8_lossy(&spec.stderr)
        );
    }
    let path = bundle.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    config["process"]["terminal"] = json!(false);
    config["process"]["args"] = json!(["echo", MARKER]);
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    Ok((store, bundle))
}

pub fn outer(args: &Args) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let work = std::env::temp_dir().join(format!("atoll-bench-run-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = outer_in(args, &work);
    let _ = std::fs::remove_dir_all(&work);
    let result = result?;
    print_table(&result);
    save(&args.json, &result)
}

fn outer_in(args: &Args, work: &Path) -> anyhow::Result<Value> {
    let (store, bundle) = prepare(&args.bin, work)?;
    let runner = Runner::detect();
    let place = runner.place().clone();
    eprintln!("atoll-bench: {}", place_line(&place));
    let out = runner
        .file(need(&args.bin, "atoll")?, "atoll")?
        .file(need(&args.bin, "atoll-vmm")?, "atoll-vmm")?
        .file(need(&args.bin, "atoll-bench")?, "atoll-bench")?
        .file(need(&args.artifacts, "vmlinux")?, "vmlinux")?
        .file(need(&args.artifacts, "initramfs.cpio")?, "initramfs.cpio")?
        .file(store, "store")?
        .file(bundle, "bundle")?
        .host_program(RUNC)
        .timeout(Duration::from_secs(120 + u64::from(args.runs) * 60))
        .on_line(|_, line| {
            if !line.starts_with(JSON_PREFIX) {
                eprintln!("  | {line}");
            }
        })
        .run(&format!(
            "export ATOLL_STORE=$ATOLL_ARTIFACTS/store ATOLL_RUN_DIR=/run/atoll; \
             ./atoll-bench run-inner --runs {} --mem {}",
            args.runs, args.mem
        ))?;
    let mut result = inner_result(&out, &place)?;
    result["image"] = json!(IMAGE);
    result["command"] = json!(format!("echo {MARKER}"));
    Ok(result)
}

fn print_table(r: &Value) {
    println!(
        "pod start: launch -> first output line, {} runs each, {}",
        r["runs"], r["where"]
    );
    println!("{:<22} {:>10} {:>10} {:>10}", "", "median", "min", "max");
    for (name, key) in [
        ("atoll run (clone)", "atoll"),
        ("atoll run --cold", "atoll_cold"),
        ("runc run (same image)", "runc"),
        ("runc --version (load)", "runc_load"),
    ] {
        let v = &r[key];
        println!(
            "{name:<22} {:>10} {:>10} {:>10}",
            format!("{} ms", v["median_ms"]),
            format!("{} ms", v["min_ms"]),
            format!("{} ms", v["max_ms"])
        );
    }
    println!("ratio_median (atoll/runc): {}", r["ratio_median"]);
    println!(
        "ratio_median without runc's loading (atoll/(runc - load)): {}",
        r["ratio_median_without_runc_load"]
    );
    println!(
        "ratio_median (atoll --cold/runc): {}",
        r["ratio_median_cold"]
    );
    if let Some(phases) = r["atoll"]["phases_median"].as_object() {
        println!("atoll phases (median of --timings fields):");
        for (k, v) in phases {
            println!("  {k:<28} {v}");
        }
    }
}

/// Runs both runtimes here (inside the node, or on a host with a usable KVM) and
/// prints one JSON line.
pub fn inner(a: &InnerArgs) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let timeout = Duration::from_secs(120);
    let timings =
        std::env::temp_dir().join(format!("atoll-run-timings-{}.json", std::process::id()));
    let (mut atoll_ms, mut cold_ms, mut runc_ms, mut load_ms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut atoll_total, mut runc_total) = (Vec::new(), Vec::new());
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut cold_phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    // Round 0 warms up (and builds the pod template); each round rotates the order.
    for round in 0..=a.runs {
        let warm_up = round == 0;
        let mut order = [
            Runtime::Clone,
            Runtime::Cold,
            Runtime::Runc,
            Runtime::RuncLoad,
        ];
        order.rotate_left(round as usize % 4);
        for rt in order {
            match rt {
                Runtime::Clone | Runtime::Cold => {
                    let mut c = Command::new(&a.atoll);
                    c.args(["run", "--mem", &a.mem.to_string(), "--timings"])
                        .arg(&timings);
                    if rt == Runtime::Cold {
                        c.arg("--cold");
                    }
                    c.args([IMAGE, "--", "echo", MARKER]);
                    let t = run_timed(&mut c, MARKER.as_bytes(), timeout)?;
                    let ms = match t.marker_ms {
                        Some(ms) if t.status == 0 => ms,
                        _ => bail!("atoll run failed (status {}):\n{}", t.status, t.output),
                    };
                    if warm_up {
                        continue;
                    }
                    let v: Value = std::fs::read(&timings)
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or(Value::Null);
                    if rt == Runtime::Clone {
                        atoll_ms.push(ms);
                        atoll_total.push(t.total_ms);
                        collect_numbers("", &v, &mut phases);
                    } else {
                        cold_ms.push(ms);
                        collect_numbers("", &v, &mut cold_phases);
                    }
                }
                Runtime::Runc => {
                    let id = format!("bench-{round}");
                    let mut c = Command::new(&a.runc);
                    // The node's root is its initramfs (rootfs), where pivot_root(2) is
                    // refused; runc's documented way around that is --no-pivot (MS_MOVE +
                    // chroot), the same amount of work.
                    c.args(["run", "--no-pivot", "-b"]).arg(&a.bundle).arg(&id);
                    let t = run_timed(&mut c, MARKER.as_bytes(), timeout)?;
                    let _ = Command::new(&a.runc).args(["delete", "-f", &id]).output();
                    let ms = match t.marker_ms {
                        Some(ms) if t.status == 0 => ms,
                        _ => bail!("runc run failed (status {}):\n{}", t.status, t.output),
                    };
                    if !warm_up {
                        runc_ms.push(ms);
                        runc_total.push(t.total_ms);
                    }
                }
                Runtime::RuncLoad => {
                    let mut c = Command::new(&a.runc);
                    c.arg("--version");
                    let t = run_timed(&mut c, b"runc version", timeout)?;
                    if t.status != 0 {
                        bail!("runc --version failed:\n{}", t.output);
                    }
                    if !warm_up {
                        load_ms.push(t.total_ms);
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_file(&timings);
    let s_atoll = summarize(&atoll_ms).context("no atoll samples")?;
    let s_cold = summarize(&cold_ms).context("no atoll --cold samples")?;
    let s_runc = summarize(&runc_ms).context("no runc samples")?;
    let s_load = summarize(&load_ms).context("no runc --version samples")?;
    let median = |v: &[f64]| summarize(v).map(|s| r1(s.median));
    let medians = |p: &BTreeMap<String, Vec<f64>>| -> BTreeMap<String, Value> {
        p.iter()
            .filter_map(|(k, v)| median(v).map(|m| (k.clone(), json!(m))))
            .collect()
    };
    let ratio = |a: f64, b: f64| (a / b * 1000.0).round() / 1000.0;
    let result = json!({
        "runs": a.runs,
        "atoll": {
            "median_ms": r1(s_atoll.median), "min_ms": r1(s_atoll.min), "max_ms": r1(s_atoll.max),
            "samples_ms": atoll_ms.iter().map(|x| r1(*x)).collect::<Vec<_>>(),
            "exit_median_ms": median(&atoll_total),
            "phases_median": medians(&phases),
        },
        "atoll_cold": {
            "median_ms": r1(s_cold.median), "min_ms": r1(s_cold.min), "max_ms": r1(s_cold.max),
            "samples_ms": cold_ms.iter().map(|x| r1(*x)).collect::<Vec<_>>(),
            "phases_median": medians(&cold_phases),
        },
        "runc_load": {
            "median_ms": r1(s_load.median), "min_ms": r1(s_load.min), "max_ms": r1(s_load.max),
        },
        "runc": {
            "median_ms": r1(s_runc.median), "min_ms": r1(s_runc.min), "max_ms": r1(s_runc.max),
            "samples_ms": runc_ms.iter().map(|x| r1(*x)).collect::<Vec<_>>(),
            "exit_median_ms": median(&runc_total),
        },
        "ratio_median": ratio(s_atoll.median, s_runc.median),
        "ratio_median_without_runc_load": ratio(s_atoll.median, (s_runc.median - s_load.median).max(1.0)),
        "ratio_median_cold": ratio(s_cold.median, s_runc.median),
    });
    println!("{JSON_PREFIX}{result}");
    Ok(())
}

/// What one turn of a round starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Runtime {
    Clone,
    Cold,
    Runc,
    RuncLoad,
}

/// Every number in `v`, keyed by its dotted path.
fn collect_numbers(prefix: &str, v: &Value, out: &mut BTreeMap<String, Vec<f64>>) {
    match v {
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.entry(prefix.to_owned()).or_default().push(x);
            }
        }
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                collect_numbers(&key, v, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_collected_by_dotted_path() {
        let mut out = BTreeMap::new();
        collect_numbers(
            "",
            &json!({"vmm_spawn_ms": 3, "guest": {"create_us": 1.5, "name": "x"}, "l": [1]}),
            &mut out,
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out["vmm_spawn_ms"], vec![3.0]);
        assert_eq!(out["guest.create_us"], vec![1.5]);
    }
}
