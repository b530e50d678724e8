//! `atoll run`: one pod VM, one main container (plus `--sidecar`s), its output on
//! this process's stdout and stderr, its exit status as ours.
//!
//! Order matters for not losing output: the container is created, every stream it
//! has is attached, and only then is it started. SIGTERM/SIGINT stop the container
//! (SIGTERM, SIGKILL after the grace period); the main thread, blocked in Wait,
//! then shuts the VM down, and dropping the [`Pod`] removes everything.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use atoll_agent_proto::v1;
use signal_hook::consts::{SIGINT, SIGTERM, SIGWINCH};

use super::artifacts;
use super::RunArgs;
use crate::agent::AgentError;
use crate::pod::image::{self, ProcessOverrides};
use crate::pod::liveness::{Liveness, LivenessConfig};
use crate::pod::template::{self, Template, TemplateSpec};
use crate::pod::{self, state, Disk, Pod, PodConfig, PodHandle};

/// Exit status when the pod could not be run at all (as `docker run`).
pub const EXIT_RUN_FAILED: u8 = 125;
/// Grace period between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// The main container's id in the pod.
pub const MAIN: &str = "main";
/// How long the output streams may take to drain after the process ended.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// A seccomp profile larger than this is refused.
const MAX_SECCOMP_JSON: u64 = 1 << 20;
const CPU_PERIOD_US: u64 = 100_000;

/// Where a stream's bytes go on this side.
#[derive(Clone, Copy)]
pub(super) enum Sink {
    Stdout,
    Stderr,
    /// Only the pod's container log (sidecars).
    LogOnly,
}

pub(super) type SharedLog = Arc<Mutex<Option<File>>>;

/// Most bytes of container output kept in the pod's `container.log` (and so for
/// `atoll logs`).
pub const CONTAINER_LOG_MAX: u64 = 64 << 20;

/// The terminal's settings, restored on drop.
pub(super) struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    pub(super) fn enter() -> Option<Self> {
        let stdin = io::stdin();
        let saved = rustix::termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Now, &raw)
            .ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            io::stdin().as_fd(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

pub(super) fn window_size() -> Option<(u32, u32)> {
    let ws = rustix::termios::tcgetwinsize(io::stdout().as_fd()).ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((u32::from(ws.ws_row), u32::from(ws.ws_col)))
}

pub(super) fn new_pod_id() -> String {
    let mut b = [0u8; 6];
    let ok = File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if !ok {
        let t = state::now_secs() ^ u64::from(std::process::id()) << 20;
        b.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn seccomp(opt: Option<&str>) -> anyhow::Result<v1::Security> {
    use v1::security::Seccomp;
    let mut s = v1::Security::default();
    match opt {
        None => s.seccomp = Seccomp::RuntimeDefault as i32,
        Some("unconfined") => s.seccomp = Seccomp::Unconfined as i32,
        Some(path) => {
            let mut json = String::new();
            File::open(path)
                .and_then(|f| f.take(MAX_SECCOMP_JSON + 1).read_to_string(&mut json))
                .with_context(|| format!("--seccomp {path}: cannot read the profile"))?;
            if json.len() as u64 > MAX_SECCOMP_JSON {
                anyhow::bail!("--seccomp {path}: larger than {MAX_SECCOMP_JSON} bytes");
            }
            serde_json::from_str::<serde_json::Value>(&json)
                .with_context(|| format!("--seccomp {path}: not JSON"))?;
            s.seccomp = Seccomp::Custom as i32;
            s.seccomp_json = json;
        }
    }
    Ok(s)
}

/// The resources of `--memory-limit` and `--cpus`.
pub fn resources(memory_limit: Option<u64>, cpus: Option<f64>) -> v1::Resources {
    let quota = cpus
        .map(|c| (c * CPU_PERIOD_US as f64).round())
        .filter(|q| q.is_finite() && *q >= 1.0)
        // At most 1024 CPUs (checked when parsing): fits u64.
        .map(|q| q as u64)
        .unwrap_or(0);
    v1::Resources {
        memory_limit_bytes: memory_limit.unwrap_or(0),
        cpu_quota_us: quota,
        cpu_period_us: if quota > 0 { CPU_PERIOD_US } else { 0 },
        pids_limit: 0,
    }
}

/// Copies one output stream until the agent closes it.
pub(super) fn pump_out(
    mut src: UnixStream,
    sink: Sink,
    log: SharedLog,
    first: Arc<OnceLock<f64>>,
    t0: Instant,
    done: mpsc::Sender<()>,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut host_ok = true;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let chunk = buf.get(..n).unwrap_or_default();
        if !matches!(sink, Sink::LogOnly) {
            first.get_or_init(|| pod::ms_since(t0));
        }
        // A closed stdout (`atoll run ... | head`) must not stop the draining.
        if host_ok {
            host_ok = match sink {
                Sink::Stdout => {
                    let mut o = io::stdout().lock();
                    o.write_all(chunk).and_then(|()| o.flush()).is_ok()
                }
                Sink::Stderr => {
                    let mut o = io::stderr().lock();
                    o.write_all(chunk).and_then(|()| o.flush()).is_ok()
                }
                Sink::LogOnly => true,
            };
        }
        if let Ok(mut l) = log.lock() {
            if let Some(f) = l.as_mut() {
                // The log lives in /run (host RAM) and the container is untrusted:
                // past CONTAINER_LOG_MAX it stops, with a note; the live stream does not.
                let len = f.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
                if len.saturating_add(chunk.len() as u64) > CONTAINER_LOG_MAX {
                    let _ = writeln!(
                        f,
                        "\n[atoll: log full at {CONTAINER_LOG_MAX} bytes; the rest was not kept]"
                    );
                    *l = None;
                } else if f.write_all(chunk).is_err() {
                    *l = None;
                }
            }
        }
    }
    let _ = done.send(());
}

/// Forwards our stdin to the container; EOF half-closes the stream.
pub(super) fn pump_in(mut dst: UnixStream) {
    let mut buf = vec![0u8; 64 << 10];
    let mut stdin = io::stdin().lock();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if dst.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = dst.shutdown(Shutdown::Write);
}

/// Handles SIGTERM/SIGINT (stop the main container) and SIGWINCH (resize).
struct SignalWatch {
    /// The first stop signal received, 0 if none.
    stop: Arc<AtomicI32>,
    pod: Arc<Mutex<Option<PodHandle>>>,
}

impl SignalWatch {
    fn install(tty: bool) -> anyhow::Result<Self> {
        let mut sigs = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGWINCH])
            .context("cannot install signal handlers")?;
        let stop = Arc::new(AtomicI32::new(0));
        let pod: Arc<Mutex<Option<PodHandle>>> = Arc::new(Mutex::new(None));
        let (stop2, pod2) = (Arc::clone(&stop), Arc::clone(&pod));
        thread::spawn(move || {
            for sig in sigs.forever() {
                let handle = pod2.lock().ok().and_then(|h| h.clone());
                if sig == SIGWINCH {
                    if let (true, Some(h), Some((rows, cols))) = (tty, handle, window_size()) {
                        if let Ok(mut c) = h.client() {
                            let _ = c.resize(MAIN, "", rows, cols);
                        }
                    }
                    continue;
                }
                if stop2
                    .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
                {
                    continue;
                }
                if let Some(h) = handle {
                    // The main thread's Wait returns once the container is gone.
                    thread::spawn(move || {
                        if let Err(e) = h.stop_container(MAIN, STOP_GRACE) {
                            tracing::warn!("stopping the container: {e}");
                        }
                    });
                }
            }
        });
        Ok(Self { stop, pod })
    }

    fn stopped(&self) -> Option<i32> {
        match self.stop.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    fn set_pod(&self, h: PodHandle) {
        if let Ok(mut p) = self.pod.lock() {
            *p = Some(h);
        }
    }
}

/// Runs `atoll run`; returns the exit status.
pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    let t0 = Instant::now();
    let signals = SignalWatch::install(args.tty)?;
    let kernel = artifacts::find_here(artifacts::KERNEL, args.kernel.as_deref())?;
    let initramfs = artifacts::find_here(artifacts::INITRAMFS, args.initramfs.as_deref())?;
    let vmm = artifacts::find_here(artifacts::VMM, args.vmm.as_deref())?;
    let run_dir = state::run_dir();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create the run directory {}", run_dir.display()))?;
    if let Some(name) = &args.name {
        if let Some((_, s)) = state::find(&run_dir, name) {
            if s.name == *name && state::pid_alive(s.owner_pid) {
                anyhow::bail!(
                    "a pod named {name:?} is running ({}); pick another --name",
                    s.id
                );
            }
        }
    }
    let mut security = seccomp(args.seccomp.as_deref())?;
    security.add_capabilities = args.cap_add.clone();
    security.drop_capabilities = args.cap_drop.clone();
    security.privileged = args.privileged;
    security.no_new_privileges = args.no_new_privileges;

    let from = if args.unpack_in_guest {
        image::RootfsFrom::Layers
    } else {
        image::RootfsFrom::Auto
    };
    let prepared = image::prepare(&image::store_root(), &args.image, from)?;
    if prepared.fell_back {
        eprintln!(
            "atoll: mkfs.erofs is not installed: the guest unpacks the image's layers \
             (as --unpack-in-guest; install erofs-utils for cached erofs images)"
        );
    }
    let image_prepared_ms = pod::ms_since(t0);
    let overrides = ProcessOverrides {
        cmd: args.cmd.clone(),
        entrypoint: args.entrypoint.clone(),
        env: args.env.clone(),
        workdir: args.workdir.clone(),
        user: args.user.clone(),
    };
    let proc_cfg = image::merge(&prepared.name, &prepared.config, &overrides)?;

    let id = new_pod_id();
    let mut cfg = PodConfig::new(&id, kernel, initramfs, vmm);
    cfg.name = args.name.clone().unwrap_or_else(|| id.clone());
    cfg.image = prepared.name.clone();
    cfg.vcpus = args.vcpus.max(1);
    cfg.mem_mib = args.mem;
    cfg.cpu_limit = args.cpus.map(crate::pod::confine::CpuLimit::for_cpus);
    cfg.run_dir = run_dir.clone();
    cfg.agent_timeout = Duration::from_secs(args.boot_timeout.max(1));
    cfg.t0 = t0;
    let rootfs_source = match &prepared.rootfs {
        image::ImageRootfs::Erofs(path) => {
            cfg.disks.push(Disk {
                path: path.clone(),
                serial: "img0".into(),
                read_only: true,
            });
            v1::rootfs::Source::Block(v1::BlockImage {
                serial: "img0".into(),
                fs_type: "erofs".into(),
            })
        }
        // Written into the pod directory by `Pod::start` (removed with it).
        image::ImageRootfs::Layers(disk) => {
            cfg.layers_disk = Some(disk.clone());
            v1::rootfs::Source::Layers(disk.request())
        }
    };
    // Volume snapshots live until this function returns (after the VM is gone).
    let volumes_dir = tempfile::Builder::new()
        .prefix(&format!("volumes-{id}-"))
        .tempdir_in(&run_dir)
        .with_context(|| format!("cannot create a volume directory in {}", run_dir.display()))?;
    let mut mounts = Vec::new();
    for (n, v) in args.volumes.iter().enumerate() {
        let serial = format!("vol{n}");
        // An erofs image file is attached as it is; a directory is snapshotted.
        let path = if v.host.is_file() {
            v.host.clone()
        } else {
            let out = volumes_dir.path().join(format!("{serial}.erofs"));
            image::make_volume(v, &out)?;
            out
        };
        cfg.disks.push(Disk {
            path,
            serial: serial.clone(),
            read_only: true,
        });
        mounts.push(v1::Mount {
            destination: v.guest.clone(),
            r#type: "bind".into(),
            source: format!("disk:{serial}"),
            options: vec!["ro".into()],
        });
    }

    // emptyDir-style volumes: one pod tmpfs per --tmpfs, named by its position, and
    // mounted at the same place in every container of the pod.
    for (n, dest) in args.tmpfs.iter().enumerate() {
        mounts.push(v1::Mount {
            destination: dest.clone(),
            r#type: "tmpfs".into(),
            source: format!("tmpfs{n}"),
            options: Vec::new(),
        });
    }

    cfg.net = args.net;
    // The pod's hostname: --hostname, else with --net the pod's name (or id).
    cfg.hostname = args.hostname.clone().or_else(|| {
        args.net.then(|| {
            Some(cfg.name.clone())
                .filter(|n| pod::net::valid_hostname(n))
                .unwrap_or_else(|| id.clone())
        })
    });
    cfg.cancel = Some(Arc::clone(&signals.stop));
    let started = if !args.cold && Template::fits_pod(&cfg) {
        let spec = TemplateSpec::for_pod(&cfg);
        template::start_pod(cfg, &spec)
    } else {
        Pod::start(cfg)
    };
    let mut pod = match started {
        Ok(p) => p,
        Err(pod::PodError::Cancelled(sig)) => return Ok(128 + sig),
        Err(e) => return Err(e.into()),
    };
    pod.timings_mut().image_prepared_ms = Some(image_prepared_ms);
    pod.timings_mut().image_converted = Some(prepared.converted);
    // The signal watcher gets the pod only once the main container has started: a
    // signal sent to a created container would leave it unstartable. Until then the
    // stop flag is checked at each step.
    if let Some(sig) = signals.stopped() {
        let _ = pod.shutdown();
        return Ok(128 + sig);
    }

    let rootfs = v1::Rootfs {
        source: Some(rootfs_source),
        readonly: args.read_only,
    };
    let (rows, cols) = if args.tty {
        window_size().unwrap_or((24, 80))
    } else {
        (0, 0)
    };
    let mut resources = resources(args.memory_limit, args.cpus);
    resources.pids_limit = args.pids_limit.unwrap_or(0);
    let process = v1::Process {
        args: proc_cfg.args.clone(),
        env: proc_cfg.env.clone(),
        cwd: proc_cfg.cwd.clone(),
        user: proc_cfg.user.clone(),
        terminal: args.tty,
        stdin: args.interactive,
        rows,
        cols,
        rlimits: args.ulimits.clone(),
        additional_gids: Vec::new(),
    };
    // What `atoll exec` starts from.
    let defaults = state::ExecDefaults {
        env: proc_cfg.env.clone(),
        cwd: proc_cfg.cwd.clone(),
        user: proc_cfg.user.clone(),
    };
    if let Err(e) = defaults.write(pod.dir()) {
        tracing::warn!("atoll exec will not see the container's environment: {e}");
    }
    let created = pod.create_container(v1::CreateContainer {
        id: MAIN.into(),
        rootfs: Some(rootfs.clone()),
        process: Some(process),
        hostname: String::new(),
        mounts: mounts.clone(),
        resources: Some(resources),
        security: Some(security.clone()),
    });
    if let Err(e) = created {
        return fail_main(&mut pod, e);
    }

    let log: SharedLog = Arc::new(Mutex::new(
        File::create(pod.container_log())
            .map_err(|e| tracing::warn!("container log: {e}"))
            .ok(),
    ));
    let first = Arc::new(OnceLock::new());
    let (done_tx, done_rx) = mpsc::channel();
    let mut pumps = 0usize;
    let mut spawn_out = |s: UnixStream, sink: Sink| {
        let (log, first, done) = (Arc::clone(&log), Arc::clone(&first), done_tx.clone());
        thread::spawn(move || pump_out(s, sink, log, first, t0, done));
        pumps += 1;
    };

    // Sidecars first, so they are up when the main container starts.
    for (n, cmd) in args.sidecar.iter().enumerate() {
        let sid = format!("sidecar-{}", n + 1);
        pod.create_container(v1::CreateContainer {
            id: sid.clone(),
            rootfs: Some(rootfs.clone()),
            process: Some(v1::Process {
                args: vec!["/bin/sh".into(), "-c".into(), cmd.clone()],
                env: proc_cfg.env.clone(),
                cwd: proc_cfg.cwd.clone(),
                user: proc_cfg.user.clone(),
                ..Default::default()
            }),
            hostname: String::new(),
            mounts: mounts.clone(),
            resources: None,
            security: Some(security.clone()),
        })
        .with_context(|| format!("creating sidecar {sid}"))?;
        for st in [v1::attach::Stream::Stdout, v1::attach::Stream::Stderr] {
            spawn_out(pod.attach(&sid, "", st)?, Sink::LogOnly);
        }
        pod.start_container(&sid)
            .with_context(|| format!("starting sidecar {sid}"))?;
    }

    let mut _raw = None;
    if args.tty {
        let tty = pod.attach(MAIN, "", v1::attach::Stream::Tty)?;
        if args.interactive {
            let input = tty.try_clone().context("cloning the tty stream")?;
            thread::spawn(move || pump_in(input));
            _raw = RawMode::enter();
        }
        spawn_out(tty, Sink::Stdout);
    } else {
        spawn_out(
            pod.attach(MAIN, "", v1::attach::Stream::Stdout)?,
            Sink::Stdout,
        );
        spawn_out(
            pod.attach(MAIN, "", v1::attach::Stream::Stderr)?,
            Sink::Stderr,
        );
        if args.interactive {
            let input = pod.attach(MAIN, "", v1::attach::Stream::Stdin)?;
            thread::spawn(move || pump_in(input));
        }
    }
    drop(done_tx);

    if let Some(sig) = signals.stopped() {
        let _ = pod.shutdown();
        return Ok(128 + sig);
    }
    if let Err(e) = pod.start_container(MAIN) {
        return fail_main(&mut pod, e);
    }
    pod.mark_running();
    signals.set_pod(pod.handle());
    // A stop signal that came before the container existed found nothing to stop:
    // stop it now. (One that comes after this check finds it started.)
    if signals.stopped().is_some() {
        let h = pod.handle();
        thread::spawn(move || h.stop_container(MAIN, STOP_GRACE));
    }
    // A guest that wedges would hold the Wait below forever: watch that it answers.
    let liveness = (args.guest_timeout > 0).then(|| {
        Liveness::watch_pod(
            pod.handle(),
            MAIN.to_owned(),
            pod.vmm_pidfd(),
            LivenessConfig::within(Duration::from_secs(args.guest_timeout)),
            |_| {},
        )
    });
    let waited = pod.wait(MAIN);
    let declared_dead = liveness.and_then(Liveness::stop);
    // An agent connection that broke because the VM ended: say why it ended (the
    // liveness verdict first: it killed the VM).
    let vmm_ended = match &waited {
        Err(AgentError::Refused { .. }) | Ok(_) => None,
        Err(_) => {
            let why = pod.vmm_end_reason(Duration::from_secs(1));
            // What a silent guest last printed is all there is to tell why.
            declared_dead
                .map(|v| {
                    let tail = pod::file_tail(&pod.console_log(), 20);
                    format!("{v}; the end of its console:\n{tail}")
                })
                .or(why)
        }
    };
    // Output written just before the end is still in flight: drain it.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    for _ in 0..pumps {
        let left = deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    drop(_raw);
    if let Some(ms) = first.get() {
        pod.timings_mut().first_output_ms = Some(*ms);
    }
    let shut = pod.shutdown();
    let timings = pod.timings().clone();
    drop(pod);
    drop(volumes_dir);
    if let Some(path) = &args.timings {
        write_timings(path, &timings)?;
    }
    if let Some(sig) = signals.stopped() {
        return Ok(128 + sig);
    }
    let w = match (waited, vmm_ended) {
        (Err(_), Some(why)) => anyhow::bail!("the pod's VM ended: {why}"),
        (w, _) => w?,
    };
    if let Err(e) = shut {
        tracing::warn!("shutting the pod down: {e}");
    }
    if w.oom_killed {
        eprintln!("atoll: container was OOM-killed");
    }
    Ok(w.status)
}

/// `docker run`'s statuses for a command that cannot run: 127 when it does not
/// exist, 126 when it cannot be executed.
pub fn exec_failure_status(e: &AgentError) -> Option<i32> {
    let AgentError::Refused { code, message, .. } = e else {
        return None;
    };
    if *code == v1::error::Code::NotFound {
        // No such container: not about the command.
        return None;
    }
    let m = message.to_ascii_lowercase();
    if m.contains("no such file") || m.contains("not found") {
        Some(127)
    } else if m.contains("permission denied") || m.contains("not executable") {
        Some(126)
    } else {
        None
    }
}

/// The main container could not be created or started: say why, end the VM, and
/// exit 127/126 when the command cannot run (as `docker run`), else fail.
fn fail_main(pod: &mut Pod, e: AgentError) -> anyhow::Result<i32> {
    // The agent answered a refusal: the VM is up. Anything else may be its end.
    if !matches!(e, AgentError::Refused { .. }) {
        if let Some(why) = pod.vmm_end_reason(Duration::from_secs(1)) {
            let _ = pod.shutdown();
            anyhow::bail!("the pod's VM ended: {why}");
        }
    }
    let _ = pod.shutdown();
    match exec_failure_status(&e) {
        Some(status) => {
            eprintln!("atoll: {e}");
            Ok(status)
        }
        None => Err(e.into()),
    }
}

fn write_timings(path: &Path, t: &pod::Timings) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(t)?;
    std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_from_cpus_and_memory() {
        let r = resources(Some(64 << 20), Some(0.5));
        assert_eq!(r.memory_limit_bytes, 64 << 20);
        assert_eq!((r.cpu_quota_us, r.cpu_period_us), (50_000, 100_000));
        let r = resources(None, None);
        assert_eq!(
            (r.memory_limit_bytes, r.cpu_quota_us, r.cpu_period_us),
            (0, 0, 0)
        );
    }

    #[test]
    fn seccomp_option_maps_to_profile() {
        use v1::security::Seccomp;
        assert_eq!(
            seccomp(None).unwrap().seccomp,
            Seccomp::RuntimeDefault as i32
        );
        assert_eq!(
            seccomp(Some("unconfined")).unwrap().seccomp,
            Seccomp::Unconfined as i32
        );
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("prof.json");
        std::fs::write(&p, r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#).unwrap();
        let s = seccomp(Some(p.to_str().unwrap())).unwrap();
        assert_eq!(s.seccomp, Seccomp::Custom as i32);
        assert!(s.seccomp_json.contains("SCMP_ACT_ALLOW"));
        std::fs::write(&p, "not json").unwrap();
        assert!(seccomp(Some(p.to_str().unwrap())).is_err());
        assert!(seccomp(Some("/no/such/profile")).is_err());
    }

    #[test]
    fn exec_failures_map_to_126_and_127() {
        let refused = |code, message: &str| AgentError::Refused {
            op: "StartContainer",
            code,
            message: message.into(),
        };
        let internal = v1::error::Code::Internal;
        assert_eq!(
            exec_failure_status(&refused(
                internal,
                "exec /no/such: No such file or directory"
            )),
            Some(127)
        );
        assert_eq!(
            exec_failure_status(&refused(internal, "exec /etc/passwd: Permission denied")),
            Some(126)
        );
        assert_eq!(
            exec_failure_status(&refused(internal, "cgroup write failed")),
            None
        );
        assert_eq!(
            exec_failure_status(&refused(v1::error::Code::NotFound, "container not found")),
            None
        );
    }

    #[test]
    fn pod_ids_are_valid_and_differ() {
        let a = new_pod_id();
        let b = new_pod_id();
        assert_eq!(a.len(), 12);
        assert!(atoll_agent_proto::validate_id(&a).is_ok());
        assert_ne!(a, b);
    }
}
