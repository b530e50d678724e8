//! The CRI benchmark: what kubelet waits for when it starts a pod — RunPodSandbox,
//! CreateContainer, StartContainer — for atoll-cri (a microVM cloned from the warm
//! pool) and for Debian's containerd with its CRI plugin and runc, in the same node
//! run, through the same CRI client, with the same image pulled from the same
//! registry beforehand. Rounds alternate which runtime goes first. Then `--parallel`
//! pods started at once, for each runtime in turn.
//!
//! The node has one vCPU (see `outer_in`): both runtimes share it.
//!
//! Same inputs on both sides: a busybox image, the container runs `sleep 3600`, the
//! pod asks for the node's network namespace (so containerd needs no CNI set-up;
//! atoll-cri does no pod networking yet either), no log file. containerd's side
//! carries two costs of the nested node that hardware does not have: runc and the
//! shim are dynamically linked Go programs, loaded under TCG for every pod; and the
//! node's root is its initramfs, which runc cannot pivot_root away from, so
//! containerd runs chrooted in a bind mount of it; and it uses the `native`
//! snapshotter (a copy of the image per container instead of an overlay mount, which
//! the node has no module for; busybox is 1 MB). Both are said in the JSON.
//!
//! Then exec, on one running pod of each: ExecSync of `true`; streaming Exec of
//! `true` over SPDY and over WebSocket (the RPC, the connection to the runtime's
//! streaming server, the command, its status); and 8 MiB of stdout through a
//! streaming Exec. The same Rust client talks to both streaming servers
//! (containerd's is kubelet's own streaming library), so the exit codes and byte
//! counts checked here are an interoperability test too.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use atoll_cri::cri::client::Client;
use atoll_cri::cri::stream::client as streaming;
use atoll_cri::cri::stream::Outcome;
use atoll_node::Runner;
use k8s_cri::v1 as cri;
use serde_json::{json, Value};

use crate::common::{inner_result, need, place_line, save, JSON_PREFIX};
use crate::stats::{r1, summarize};

/// The image every container runs.
const IMAGE: &str = "registry.k8s.io/e2e-test-images/busybox:1.29-2";
/// containerd's sandbox ("pause") image, from the same registry.
const PAUSE: &str = "registry.k8s.io/pause:3.6";
const ATOLL_SOCK: &str = "/run/atoll/atoll-cri.sock";
const CONTAINERD_SOCK: &str = "/run/containerd/containerd.sock";
const HOST_PROGRAMS: [&str; 5] = [
    "/usr/bin/docker-registry",
    "/usr/bin/mkfs.erofs",
    "/usr/bin/containerd",
    "/usr/bin/containerd-shim-runc-v2",
    "/usr/sbin/runc",
];

/// Arguments of `atoll-bench cri`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Measured pod starts per runtime (after one warm-up each).
    #[arg(long, default_value_t = 10)]
    runs: u32,
    /// Pods started at once in the parallel part.
    #[arg(long, default_value_t = 10)]
    parallel: u32,
    /// Rounds of the parallel part per runtime.
    #[arg(long, default_value_t = 3)]
    parallel_rounds: u32,
    /// Where to save the JSON [default: perf/results/cri.json, or cri-probe.json
    /// with `--probe-calls`].
    #[arg(long)]
    json: Option<PathBuf>,
    /// Directory with vmlinux and initramfs.cpio.
    #[arg(long, default_value = "build")]
    artifacts: PathBuf,
    /// Directory with the static atoll-cri, atoll-vmm and atoll-bench.
    #[arg(long, default_value = "target/x86_64-unknown-linux-gnu/release")]
    bin: PathBuf,
    /// Instead of the pod-start benchmark: this many ExecSync calls on one atoll-cri
    /// pod (a liveness probe's life), sampling the guest agent's and atoll-cri's
    /// memory and descriptors every tenth of the way (saved to `--json`).
    #[arg(long, default_value_t = 0)]
    probe_calls: u32,
}

/// Arguments of `atoll-bench cri-inner`.
#[derive(clap::Args, Debug)]
pub struct InnerArgs {
    #[arg(long)]
    runs: u32,
    #[arg(long)]
    parallel: u32,
    #[arg(long)]
    parallel_rounds: u32,
    #[arg(long, default_value_t = 0)]
    probe_calls: u32,
}

/// The node-side set-up: a registry on 127.0.0.1:5000 serving the carried storage,
/// atoll-cri and containerd both mirroring registry.k8s.io to it.
const SETUP: &str = r#"
set -e
A=$ATOLL_ARTIFACTS
ip link set lo up
mkdir -p /run/reg /etc/containerd /tmp/cfg
touch /etc/hosts /etc/resolv.conf
# runc pivot_roots into each container; the node's root is the initramfs, which
# cannot be pivoted away from. containerd runs chrooted in a bind mount of it
# instead (a mount with a parent), as switch_root would give it on a real node.
mkdir -p /newroot
mount --bind / /newroot
for d in proc sys dev run tmp; do mount --rbind /$d /newroot/$d; done
cp -r $A/registry /run/reg/data
/usr/bin/docker-registry serve $A/registry.yml >/run/reg/log 2>&1 &
cat > /tmp/cfg/atoll-cri.toml <<EOF
state_dir = "/run/atoll-cri-state"
run_dir = "/run/atoll/cri"
image_store = "/run/atoll-images"
kernel = "$A/vmlinux"
initramfs = "$A/initramfs.cpio"
vmm = "$A/atoll-vmm"
[registry.mirrors]
"registry.k8s.io" = ["http://127.0.0.1:5000"]
EOF
cat > /etc/containerd/config.toml <<EOF
version = 2
root = "/run/containerd-root"
state = "/run/containerd-state"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.6"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."registry.k8s.io"]
    endpoint = ["http://127.0.0.1:5000"]
EOF
export ATOLL_CACHE=/run/atoll-cache
$A/atoll-cri --config /tmp/cfg/atoll-cri.toml >/tmp/atoll-cri.log 2>&1 &
chroot /newroot /usr/bin/containerd --config /etc/containerd/config.toml >/tmp/containerd.log 2>&1 &
for i in $(seq 300); do
  [ -S /run/atoll/atoll-cri.sock ] && [ -S /run/containerd/containerd.sock ] && break
  sleep 0.1
done
set +e
./atoll-bench cri-inner --runs $RUNS --parallel $PARALLEL --parallel-rounds $PROUNDS --probe-calls $PROBE
st=$?
# Which sandboxes started in a standby VMM of the pool, and which had to spawn one.
echo "sandboxes from the standby pool: $(grep -c 'standby VMM .* takes it' /tmp/atoll-cri.log), spawned: $(grep -c 'no standby VMM waits' /tmp/atoll-cri.log)"
if [ $st != 0 ]; then
  echo "--- atoll-cri"; tail -20 /tmp/atoll-cri.log
  for d in /run/atoll/cri/pods/*/; do echo "--- $d console"; tail -15 $d/console.log; done
  echo "--- containerd"; tail -30 /tmp/containerd.log
fi
exit $st
"#;

pub fn outer(args: &Args) -> anyhow::Result<()> {
    if args.runs == 0 || args.parallel == 0 {
        bail!("--runs and --parallel must be at least 1");
    }
    let work = std::env::temp_dir().join(format!("atoll-bench-cri-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = outer_in(args, &work);
    let _ = std::fs::remove_dir_all(&work);
    let result = result?;
    if args.probe_calls > 0 {
        print_probe(&result);
    } else {
        print_table(&result);
    }
    let json = args.json.clone().unwrap_or_else(|| {
        PathBuf::from(if args.probe_calls > 0 {
            "perf/results/cri-probe.json"
        } else {
            "perf/results/cri.json"
        })
    });
    save(&json, &result)
}

fn print_probe(r: &Value) {
    println!(
        "ExecSync `true` {} times on one atoll-cri pod, {}",
        r["calls"], r["where"]
    );
    if !r["failed"].is_null() {
        println!("stopped at a failed call: {}", r["failed"]);
    }
    println!(
        "{:>7} {:>9} {:>11} {:>10} {:>11} {:>11} {:>10}",
        "calls", "elapsed", "agent RSS", "agent fds", "agent thr", "server RSS", "server fds"
    );
    for s in r["samples"].as_array().into_iter().flatten() {
        println!(
            "{:>7} {:>8}s {:>7} KiB {:>10} {:>11} {:>7} KiB {:>10}",
            s["calls"],
            s["elapsed_s"],
            s["agent"]["rss_kib"],
            s["agent"]["fds"],
            s["agent"]["threads"],
            s["server"]["rss_kib"],
            s["server"]["fds"]
        );
    }
    let g = &r["growth_after_warm_up"];
    println!(
        "growth from the first tenth to the end: agent RSS {} KiB, agent fds {}, agent processes {}, server RSS {} KiB, server fds {}",
        g["agent_rss_kib"], g["agent_fds"], g["agent_processes"], g["server_rss_kib"], g["server_fds"]
    );
    let l = &r["latency_ms"];
    println!(
        "ExecSync latency: median {} ms (min {}, max {}); first tenth median {} ms, last tenth {} ms",
        l["median"], l["min"], l["max"], l["first_tenth_median"], l["last_tenth_median"]
    );
}

fn outer_in(args: &Args, work: &Path) -> anyhow::Result<Value> {
    use atoll_node::oci;
    let busybox = work.join("busybox");
    oci::write_layout(
        &busybox,
        &[oci::busybox_layer()],
        json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}),
    );
    let pause = work.join("pause");
    oci::write_layout(
        &pause,
        &[oci::busybox_layer()],
        json!({"Entrypoint": ["/bin/sleep", "2147483647"], "Env": ["PATH=/bin"]}),
    );
    let storage = oci::registry_dir(work);
    oci::fill_registry(
        work,
        &storage,
        &[
            (&busybox, IMAGE.trim_start_matches("registry.k8s.io/")),
            (&pause, PAUSE.trim_start_matches("registry.k8s.io/")),
        ],
    );
    let mut runner = Runner::detect();
    let place = runner.place().clone();
    eprintln!("atoll-bench: {}", place_line(&place));
    for p in HOST_PROGRAMS {
        if !Path::new(p).exists() {
            bail!("{p} is missing: run scripts/install-deps.sh (containerd, docker-registry, erofs-utils, runc)");
        }
        runner = runner.host_program(p);
    }
    let out = runner
        .file(need(&args.bin, "atoll-cri")?, "atoll-cri")?
        .file(need(&args.bin, "atoll-vmm")?, "atoll-vmm")?
        .file(need(&args.bin, "atoll-bench")?, "atoll-bench")?
        .file(need(&args.artifacts, "vmlinux")?, "vmlinux")?
        .file(need(&args.artifacts, "initramfs.cpio")?, "initramfs.cpio")?
        .file(storage, "registry")?
        .file(oci::node_registry_config(work), "registry.yml")?
        // One node CPU: KVM toggles static keys (text patching) as VMs come and go,
        // and multi-threaded TCG has been seen executing half-patched text (an int3
        // oops in kvm's apic_has_pending_timer, three boots in a row with 2 CPUs).
        // The probe runs one pod for a long time: two node CPUs, as the CRI
        // end-to-end test has (a one-CPU node lost its heartbeat under host load).
        .node_size(4096, if args.probe_calls > 0 { 2 } else { 1 })
        .timeout(Duration::from_secs(if args.probe_calls > 0 {
            600 + u64::from(args.probe_calls) / 2
        } else {
            300 + u64::from(args.runs) * 70 + u64::from(args.parallel * args.parallel_rounds) * 30
        }))
        .on_line(|_, line| {
            if !line.starts_with(JSON_PREFIX) {
                eprintln!("  | {line}");
            }
        })
        .run(&format!(
            "RUNS={} PARALLEL={} PROUNDS={} PROBE={}\n{SETUP}",
            args.runs, args.parallel, args.parallel_rounds, args.probe_calls
        ))?;
    let mut result = inner_result(&out, &place)?;
    if args.probe_calls > 0 {
        return Ok(result);
    }
    result["image"] = json!(IMAGE);
    result["container"] = json!("sleep 3600");
    Ok(result)
}

fn print_table(r: &Value) {
    println!(
        "CRI pod start: RunPodSandbox + CreateContainer + StartContainer, {} runs each, {}",
        r["runs"], r["where"]
    );
    println!("{:<34} {:>10} {:>10} {:>10}", "", "median", "min", "max");
    for (name, key) in [
        ("atoll-cri (microVM clone)", "atoll"),
        ("containerd + runc", "containerd"),
    ] {
        let v = &r[key];
        println!(
            "{name:<34} {:>10} {:>10} {:>10}",
            format!("{} ms", v["median_ms"]),
            format!("{} ms", v["min_ms"]),
            format!("{} ms", v["max_ms"])
        );
        for (step, s) in v["steps_median_ms"].as_object().into_iter().flatten() {
            println!("  {step:<32} {s:>7} ms");
        }
    }
    println!("ratio_median (atoll-cri/containerd): {}", r["ratio_median"]);
    println!(
        "loading containerd's Go helpers here (median): runc {} ms, shim {} ms per launch",
        r["containerd"]["load_median_ms"]["runc --version"],
        r["containerd"]["load_median_ms"]["containerd-shim-runc-v2 -v"]
    );
    println!(
        "{} pods at once, wall time until all run (median of {} rounds): atoll-cri {} ms, containerd {} ms, ratio {}",
        r["parallel"]["pods"],
        r["parallel"]["rounds"],
        r["parallel"]["atoll_median_ms"],
        r["parallel"]["containerd_median_ms"],
        r["parallel"]["ratio_median"]
    );
    let e = &r["exec"];
    println!(
        "exec on a running pod, median (min..max) of {} runs:",
        e["runs"]
    );
    for (what, key, unit) in [
        ("ExecSync true", "exec_sync_true_ms", "ms"),
        ("Exec true, SPDY", "exec_spdy_true_ms", "ms"),
        ("Exec true, WebSocket", "exec_websocket_true_ms", "ms"),
        ("8 MiB stdout, SPDY", "stdout_mb_per_s", "MB/s"),
    ] {
        let cell = |rt: &str| {
            let v = &e[rt][key];
            format!("{} {unit} ({}..{})", v["median"], v["min"], v["max"])
        };
        println!(
            "  {what:<24} atoll-cri {:<26} containerd {}",
            cell("atoll"),
            cell("containerd")
        );
    }
}

/// Bytes of stdout the throughput exec writes.
const EXEC_BYTES: u64 = 8 << 20;

/// Counts what is written to it.
struct Count(u64);

impl std::io::Write for Count {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A streaming Exec of `cmd` through `transport`: the RPC, then the session on a
/// blocking thread. Returns its outcome and the stdout bytes.
async fn exec_stream(
    c: &mut Client,
    ctr: &str,
    cmd: &[&str],
    transport: streaming::Transport,
) -> anyhow::Result<(Outcome, u64)> {
    let url = c
        .runtime
        .exec(cri::ExecRequest {
            container_id: ctr.to_owned(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty: false,
            stdin: false,
            stdout: true,
            stderr: true,
        })
        .await
        .context("Exec")?
        .into_inner()
        .url;
    tokio::task::spawn_blocking(move || {
        let (mut out, mut err) = (Count(0), Count(0));
        let o = streaming::remote_command(
            &url,
            transport,
            streaming::Stdio {
                stdin: None,
                stdout: Some(&mut out),
                stderr: Some(&mut err),
                tty: false,
                size: None,
            },
        )?;
        Ok((o, out.0))
    })
    .await?
}

/// The first container of pod `pod`.
async fn first_container(c: &mut Client, pod: &str) -> anyhow::Result<String> {
    c.runtime
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: pod.to_owned(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .containers
        .into_iter()
        .next()
        .map(|c| c.id)
        .context("the pod's container")
}

/// The pid of the process whose command name is `comm`.
fn pid_of(comm: &str) -> anyhow::Result<u32> {
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm) {
            return Ok(pid);
        }
    }
    bail!("no {comm} process")
}

/// Resident KiB, open descriptors and threads of process `pid`.
fn process_figures(pid: u32) -> Value {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    json!({"rss_kib": field("VmRSS:"), "fds": fds, "threads": field("Threads:")})
}

/// The pod VMM's vsock counters (connections open now, host clients refused or
/// failed), from its control API: whether the VMM is where connections pile up.
fn vmm_vsock_figures(pod_dir: &Path) -> Value {
    let sock = pod_dir.join(atoll_cri::pod::API_SOCK);
    let metrics = atoll_cri::pod::template::api_call(&sock, "GET", "/metrics", "")
        .ok()
        .and_then(|b| serde_json::from_str::<Value>(&b).ok());
    let Some(m) = metrics else {
        return json!({"error": format!("no metrics from {}", sock.display())});
    };
    let devices = m["devices"].as_array().cloned().unwrap_or_default();
    devices
        .into_iter()
        .find(|d| d["kind"] == "vsock")
        .map_or_else(
            || json!({"error": "no vsock device in the metrics"}),
            |d| json!({"open": d["open"], "errors": d["errors"]}),
        )
}

/// Entry `key` of sandbox `pod`'s PodSandboxStatus verbose info, as JSON.
async fn verbose_info(c: &mut Client, pod: &str, key: &str) -> anyhow::Result<Value> {
    let r = c
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.to_owned(),
            verbose: true,
        })
        .await?
        .into_inner();
    let entry = r
        .info
        .get(key)
        .with_context(|| format!("no {key} in the sandbox's verbose info"))?;
    Ok(serde_json::from_str(entry)?)
}

/// atoll-cri's own description of sandbox `pod` (its pod directory, the kept
/// console of a VM that ended...).
async fn sandbox_info(c: &mut Client, pod: &str) -> anyhow::Result<Value> {
    verbose_info(c, pod, "info").await
}

/// The guest agent's own figures, from PodSandboxStatus's verbose info.
async fn agent_figures(c: &mut Client, pod: &str) -> anyhow::Result<Value> {
    let a = verbose_info(c, pod, "agent").await?;
    if a.get("error").is_some() {
        bail!("the agent's figures: {a}");
    }
    Ok(json!({
        "rss_kib": a["rss_bytes"].as_u64().unwrap_or(0) / 1024,
        "fds": a["fds"], "threads": a["threads"],
        "processes": a["processes"], "connections": a["connections"],
    }))
}

/// `calls` ExecSync of `true` on one atoll-cri pod, as a liveness probe makes them,
/// with the agent's and the server's figures every tenth of the way.
async fn probe(atoll: &mut Client, calls: u32) -> anyhow::Result<Value> {
    let s = start_pod(atoll, "atoll-probe").await?;
    let ctr = first_container(atoll, &s.pod).await?;
    let server = pid_of("atoll-cri")?;
    // Where the pod's VMM answers its control API, as atoll-cri says.
    let pod_dir = PathBuf::from(
        sandbox_info(atoll, &s.pod).await?["pod_dir"]
            .as_str()
            .context("no pod_dir in the sandbox info")?,
    );
    let every = (calls / 10).max(1);
    let mut samples = Vec::new();
    let mut lat = Vec::with_capacity(calls as usize);
    let t0 = Instant::now();
    let mut failed = Value::Null;
    for i in 0..=calls {
        if i % every == 0 || i == calls || !failed.is_null() {
            // A sample that cannot reach the agent ends the run like a failed
            // call, and says so.
            let agent = match agent_figures(atoll, &s.pod).await {
                Ok(a) => a,
                Err(e) => {
                    if failed.is_null() {
                        failed = json!({"call": i, "error": format!("sampling: {e:#}")});
                    }
                    json!({"error": format!("{e:#}")})
                }
            };
            samples.push(json!({
                "calls": i,
                "elapsed_s": r1(t0.elapsed().as_secs_f64()),
                "agent": agent,
                "server": process_figures(server),
                "vmm_vsock": vmm_vsock_figures(&pod_dir),
            }));
        }
        if i == calls || !failed.is_null() {
            break;
        }
        let t = Instant::now();
        let e = atoll
            .runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: ctr.clone(),
                cmd: vec!["true".into()],
                timeout: 30,
            })
            .await;
        match e.map(|r| r.into_inner()) {
            Ok(e) if e.exit_code == 0 => lat.push(ms(t)),
            // A failed call ends the run; what was sampled until then is kept.
            Ok(e) => failed = json!({"call": i, "error": format!("true exited {}", e.exit_code)}),
            Err(s) => failed = json!({"call": i, "error": s.message()}),
        }
    }
    if !failed.is_null() {
        // What atoll-cri knows of the end: a VM that went away says why here.
        if let Ok(st) = atoll
            .runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: ctr.clone(),
                verbose: false,
            })
            .await
        {
            if let Some(st) = st.into_inner().status {
                failed["container"] = json!({
                    "state": st.state, "reason": st.reason, "message": st.message,
                });
            }
        }
        // The end of the VM's console, when its VM went away (a guest panic).
        if let Ok(info) = sandbox_info(atoll, &s.pod).await {
            if let Some(path) = info["console"].as_str() {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(60)..].join("\n");
                eprintln!("atoll-bench: the end of the pod VM's console ({path}):\n{tail}");
                failed["console_tail"] = json!(tail);
            }
        }
        eprintln!("atoll-bench: the probe stopped: {failed}");
    }
    remove_pod(atoll, &s.pod).await?;
    let tenth = (lat.len() / 10).max(1);
    let med = |v: &[f64]| summarize(v).map(|s| r1(s.median));
    let all = summarize(&lat).context("no calls")?;
    let (first, last) = (
        &samples[1.min(samples.len() - 1)],
        &samples[samples.len() - 1],
    );
    let diff = |who: &str, key: &str| -> i64 {
        let v = |s: &Value| s[who][key].as_i64().unwrap_or(0);
        v(last) - v(first)
    };
    Ok(json!({
        "calls": calls,
        "failed": failed,
        "samples": samples,
        "growth_after_warm_up": {
            "from_calls": first["calls"],
            "agent_rss_kib": diff("agent", "rss_kib"),
            "agent_fds": diff("agent", "fds"),
            "agent_threads": diff("agent", "threads"),
            "agent_processes": diff("agent", "processes"),
            "server_rss_kib": diff("server", "rss_kib"),
            "server_fds": diff("server", "fds"),
        },
        "latency_ms": {
            "median": r1(all.median), "min": r1(all.min), "max": r1(all.max),
            "first_tenth_median": med(&lat[..tenth]),
            "last_tenth_median": med(&lat[lat.len() - tenth..]),
        },
    }))
}

/// Exec latency and throughput on one running pod of each runtime, alternating.
async fn exec_bench(
    atoll: &mut Client,
    containerd: &mut Client,
    runs: u32,
) -> anyhow::Result<Value> {
    let mut pods = Vec::new();
    for (r, c) in [(Rt::Atoll, &mut *atoll), (Rt::Containerd, &mut *containerd)] {
        let s = start_pod(c, &format!("{}-exec", r.name())).await?;
        let ctr = first_container(c, &s.pod).await?;
        pods.push((s.pod, ctr));
    }
    // [runtime][sync, spdy, websocket, throughput MB/s]
    let mut v: [[Vec<f64>; 4]; 2] = Default::default();
    for round in 0..=runs {
        let order = if round % 2 == 0 {
            [Rt::Atoll, Rt::Containerd]
        } else {
            [Rt::Containerd, Rt::Atoll]
        };
        for r in order {
            let i = r as usize;
            let c = match r {
                Rt::Atoll => &mut *atoll,
                Rt::Containerd => &mut *containerd,
            };
            let ctr = pods[i].1.clone();
            let t = Instant::now();
            let e = c
                .runtime
                .exec_sync(cri::ExecSyncRequest {
                    container_id: ctr.clone(),
                    cmd: vec!["true".into()],
                    timeout: 30,
                })
                .await
                .with_context(|| format!("{} ExecSync", r.name()))?
                .into_inner();
            let sync_ms = ms(t);
            if e.exit_code != 0 {
                bail!("{}: ExecSync true exited {}", r.name(), e.exit_code);
            }
            let mut stream_ms = [0.0; 2];
            for (k, tr) in [streaming::Transport::Spdy, streaming::Transport::Websocket]
                .into_iter()
                .enumerate()
            {
                let t = Instant::now();
                let (o, _) = exec_stream(c, &ctr, &["true"], tr)
                    .await
                    .with_context(|| format!("{} Exec over {tr:?}", r.name()))?;
                stream_ms[k] = ms(t);
                if o != Outcome::Success {
                    bail!("{}: Exec true over {tr:?} ended {o:?}", r.name());
                }
            }
            let n = EXEC_BYTES.to_string();
            let t = Instant::now();
            let (o, bytes) = exec_stream(
                c,
                &ctr,
                &["/bin/busybox", "head", "-c", &n, "/dev/zero"],
                streaming::Transport::Spdy,
            )
            .await?;
            let secs = t.elapsed().as_secs_f64();
            if o != Outcome::Success || bytes != EXEC_BYTES {
                bail!(
                    "{}: the 8 MiB exec ended {o:?} with {bytes} bytes",
                    r.name()
                );
            }
            if round == 0 {
                continue;
            }
            v[i][0].push(sync_ms);
            v[i][1].push(stream_ms[0]);
            v[i][2].push(stream_ms[1]);
            v[i][3].push(EXEC_BYTES as f64 / secs / 1e6);
        }
    }
    // The exit code travels on the error channel; both servers must say 3.
    let mut codes = Vec::new();
    for (r, c) in [(Rt::Atoll, &mut *atoll), (Rt::Containerd, &mut *containerd)] {
        let (o, _) = exec_stream(
            c,
            &pods[r as usize].1,
            &["sh", "-c", "exit 3"],
            streaming::Transport::Spdy,
        )
        .await?;
        if o != Outcome::Exited(3) {
            bail!("{}: exit 3 came back as {o:?}", r.name());
        }
        codes.push(3);
        remove_pod(c, &pods[r as usize].0).await?;
    }
    let stat = |x: &[f64]| -> Value {
        match summarize(x) {
            Some(s) => json!({"median": r1(s.median), "min": r1(s.min), "max": r1(s.max),
                              "spread": r1(s.max - s.min)}),
            None => Value::Null,
        }
    };
    let mut out = json!({"runs": runs, "stdout_bytes": EXEC_BYTES, "exit_code_seen": codes});
    for r in [Rt::Atoll, Rt::Containerd] {
        let i = r as usize;
        out[r.name()] = json!({
            "exec_sync_true_ms": stat(&v[i][0]),
            "exec_spdy_true_ms": stat(&v[i][1]),
            "exec_websocket_true_ms": stat(&v[i][2]),
            "stdout_mb_per_s": stat(&v[i][3]),
        });
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rt {
    Atoll,
    Containerd,
}

impl Rt {
    fn name(self) -> &'static str {
        match self {
            Rt::Atoll => "atoll",
            Rt::Containerd => "containerd",
        }
    }
}

fn pod_config(name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_owned(),
            uid: name.to_owned(),
            namespace: "bench".into(),
            attempt: 0,
        }),
        // A pod on the node's network has the node's hostname (kubelet sends none).
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config() -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "main".into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec!["sleep".into(), "3600".into()],
        ..Default::default()
    }
}

/// Step times of one pod start, in ms.
struct Started {
    pod: String,
    run_ms: f64,
    create_ms: f64,
    start_ms: f64,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

async fn start_pod(c: &mut Client, name: &str) -> anyhow::Result<Started> {
    let config = pod_config(name);
    let t = Instant::now();
    let pod = c
        .runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .with_context(|| format!("RunPodSandbox {name}"))?
        .into_inner()
        .pod_sandbox_id;
    let run_ms = ms(t);
    let t = Instant::now();
    let ctr = c
        .runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config()),
            sandbox_config: Some(config),
        })
        .await
        .with_context(|| format!("CreateContainer in {name}"))?
        .into_inner()
        .container_id;
    let create_ms = ms(t);
    let t = Instant::now();
    c.runtime
        .start_container(cri::StartContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .with_context(|| format!("StartContainer in {name}"))?;
    let start_ms = ms(t);
    Ok(Started {
        pod,
        run_ms,
        create_ms,
        start_ms,
    })
}

async fn remove_pod(c: &mut Client, pod: &str) -> anyhow::Result<()> {
    c.runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.to_owned(),
        })
        .await
        .context("StopPodSandbox")?;
    c.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.to_owned(),
        })
        .await
        .context("RemovePodSandbox")?;
    Ok(())
}

async fn pull(c: &mut Client, image: &str) -> anyhow::Result<()> {
    c.images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: None,
        })
        .await
        .with_context(|| format!("PullImage {image}"))?;
    Ok(())
}

/// Starts `n` pods at once; the wall time until all run.
async fn start_many(c: &Client, prefix: &str, n: u32) -> anyhow::Result<(f64, Vec<String>)> {
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut c = c.clone();
        let name = format!("{prefix}-{i}");
        set.spawn(async move { start_pod(&mut c, &name).await.map(|s| s.pod) });
    }
    let mut pods = Vec::new();
    let mut first_err = None;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(p)) => pods.push(p),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(e.into());
            }
        }
    }
    let wall = ms(t);
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok((wall, pods))
}

pub fn inner(a: &InnerArgs) -> anyhow::Result<()> {
    if a.runs == 0 || a.parallel == 0 {
        bail!("--runs and --parallel must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(inner_async(a))
}

async fn inner_async(a: &InnerArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(300);
    let mut atoll = Client::connect(Path::new(ATOLL_SOCK), timeout).await?;
    let mut containerd = Client::connect(Path::new(CONTAINERD_SOCK), timeout).await?;
    let version = containerd
        .runtime
        .version(cri::VersionRequest {
            version: "0.1.0".into(),
        })
        .await
        .context("containerd's CRI Version")?
        .into_inner();
    pull(&mut atoll, IMAGE).await?;
    if a.probe_calls > 0 {
        let out = probe(&mut atoll, a.probe_calls).await?;
        println!("{JSON_PREFIX}{out}");
        return Ok(());
    }
    pull(&mut containerd, IMAGE).await?;
    pull(&mut containerd, PAUSE).await?;
    let mut samples: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut steps: [[Vec<f64>; 3]; 2] = Default::default();
    // Round 0 warms up (atoll builds its pod template, containerd its caches).
    for round in 0..=a.runs {
        let order = if round % 2 == 0 {
            [Rt::Atoll, Rt::Containerd]
        } else {
            [Rt::Containerd, Rt::Atoll]
        };
        for r in order {
            let c = match r {
                Rt::Atoll => &mut atoll,
                Rt::Containerd => &mut containerd,
            };
            let name = format!("{}-{round}", r.name());
            let s = start_pod(c, &name).await?;
            remove_pod(c, &s.pod).await?;
            if round == 0 {
                continue;
            }
            let i = r as usize;
            samples[i].push(s.run_ms + s.create_ms + s.start_ms);
            steps[i][0].push(s.run_ms);
            steps[i][1].push(s.create_ms);
            steps[i][2].push(s.start_ms);
        }
    }
    // What loading containerd's Go helpers costs here (TCG emulates the dynamic
    // loader's page faults; hardware does not pay this): each pod start runs the
    // shim once and runc several times.
    let mut load: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..a.runs {
        for (i, (prog, arg)) in [
            ("/usr/sbin/runc", "--version"),
            ("/usr/bin/containerd-shim-runc-v2", "-v"),
        ]
        .iter()
        .enumerate()
        {
            let t = Instant::now();
            let ok = std::process::Command::new(prog)
                .arg(arg)
                .output()
                .with_context(|| format!("cannot run {prog}"))?
                .status
                .success();
            if !ok {
                bail!("{prog} {arg} failed");
            }
            load[i].push(ms(t));
        }
    }
    let mut wall: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..a.parallel_rounds {
        let order = if round % 2 == 0 {
            [Rt::Atoll, Rt::Containerd]
        } else {
            [Rt::Containerd, Rt::Atoll]
        };
        for r in order {
            let c = match r {
                Rt::Atoll => &mut atoll,
                Rt::Containerd => &mut containerd,
            };
            let (ms, pods) = start_many(c, &format!("{}-par{round}", r.name()), a.parallel).await?;
            wall[r as usize].push(ms);
            for p in pods {
                remove_pod(c, &p).await?;
            }
        }
    }
    let exec = exec_bench(&mut atoll, &mut containerd, a.runs).await?;
    let summary = |v: &[f64]| -> anyhow::Result<Value> {
        let s = summarize(v).context("no samples")?;
        Ok(json!({
            "median_ms": r1(s.median), "min_ms": r1(s.min), "max_ms": r1(s.max),
            "spread_ms": r1(s.max - s.min),
            "samples_ms": v.iter().map(|x| r1(*x)).collect::<Vec<_>>(),
        }))
    };
    let median = |v: &[f64]| summarize(v).map(|s| r1(s.median));
    let mut out = json!({"runs": a.runs});
    for r in [Rt::Atoll, Rt::Containerd] {
        let i = r as usize;
        let mut v = summary(&samples[i])?;
        v["steps_median_ms"] = json!({
            "RunPodSandbox": median(&steps[i][0]),
            "CreateContainer": median(&steps[i][1]),
            "StartContainer": median(&steps[i][2]),
        });
        out[r.name()] = v;
    }
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => json!((a / b * 1000.0).round() / 1000.0),
        _ => Value::Null,
    };
    out["ratio_median"] = ratio(median(&samples[0]), median(&samples[1]));
    out["parallel"] = json!({
        "pods": a.parallel,
        "rounds": a.parallel_rounds,
        "atoll_median_ms": median(&wall[0]),
        "containerd_median_ms": median(&wall[1]),
        "atoll_samples_ms": wall[0].iter().map(|x| r1(*x)).collect::<Vec<_>>(),
        "containerd_samples_ms": wall[1].iter().map(|x| r1(*x)).collect::<Vec<_>>(),
        "ratio_median": ratio(median(&wall[0]), median(&wall[1])),
    });
    out["exec"] = exec;
    out["containerd"]["version"] = json!(version.runtime_version);
    out["containerd"]["load_median_ms"] = json!({
        "runc --version": median(&load[0]),
        "containerd-shim-runc-v2 -v": median(&load[1]),
    });
    out["containerd"]["set_up"] = json!(
        "CRI plugin, runc v2 shim, cgroup v2, native snapshotter, chrooted in a bind mount of the node's initramfs root (so runc can pivot_root), host network"
    );
    println!("{JSON_PREFIX}{out}");
    Ok(())
}
