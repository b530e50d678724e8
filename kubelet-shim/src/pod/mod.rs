//! A pod is one microVM: `atoll-vmm` booting the guest kernel and initramfs, whose
//! PID 1 supervises the agent, with the pod's image and volume disks attached.
//!
//! [`Pod::start`] makes the state directory `<run dir>/pods/<id>/`, spawns the VMM
//! (guest console and VMM messages go to `console.log` there) and connects to the
//! agent. The [`Pod`] value owns the VMM process and the directory: dropping it,
//! whatever happened before, kills a VMM that is still running, keeps the container
//! log under `<run dir>/logs/<id>.log` and removes the directory with its sockets and
//! disks. The VMM runs in its own process group (a terminal's Ctrl-C reaches only
//! `atoll`, which stops the pod in order) and dies with the thread that spawned it
//! (`PR_SET_PDEATHSIG`), so even a killed `atoll` leaves no VM behind.

pub mod confine;
pub mod image;
pub mod liveness;
pub mod net;
pub mod netns;
pub mod pool;
pub mod state;
pub mod template;
pub mod volume;

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_agent_proto::{v1, validate_id, FrameError, IdError};
use serde::Serialize;

use crate::agent::{self, AgentClient, AgentError, AttachError, ConnectError};
use state::{PodState, PodStatus};

/// The guest kernel command line the host and the guest agree on.
pub const GUEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";
/// Guest CID of every pod (each VM has its own vsock device).
pub const GUEST_CID: u32 = 3;
/// atoll-vmm's control socket in the pod directory, when [`PodConfig::api`].
pub const API_SOCK: &str = "api.sock";
/// How long the guest may take to boot and start its agent (TCG-backed nested KVM
/// is slow).
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the VMM may take to power off after Shutdown before it is killed.
pub const VMM_EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Logs of ended pods kept in `<run dir>/logs` (the oldest go first).
pub const KEPT_LOGS: usize = 100;
/// The most bytes those logs (container logs and consoles) may take together:
/// `<run dir>` is usually tmpfs, host RAM, and each log may hold up to
/// `CONTAINER_LOG_MAX`. The oldest go first; the newest is always kept.
pub const KEPT_LOGS_BYTES: u64 = 256 << 20;
/// Lines of `console.log` quoted when the VMM ends early.
const CONSOLE_TAIL_LINES: usize = 12;
/// Lines of `console.log` quoted when the guest crashed (an oops is longer).
const CRASH_TAIL_LINES: usize = 60;
/// Most bytes of guest console (and VMM messages) kept in `console.log`. The guest
/// is hostile: it may print forever, and the pod directory usually lives in /run
/// (host RAM). Beyond this the output is still drained, so the VMM never blocks on
/// it, but dropped.
pub const CONSOLE_LOG_MAX: u64 = 8 << 20;

/// One `--disk` of the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    /// The virtio-blk serial the guest finds it by (at most 20 bytes).
    pub serial: String,
    pub read_only: bool,
}

/// A `--net tap=NAME[,mac=MAC]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tap {
    pub name: String,
    pub mac: Option<String>,
}

/// A pod network made outside the pod library (atoll-cri's CNI, [`netns`]): the
/// namespace the VMM starts in, the tap it opens there, and what the guest's
/// `eth0` gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub tap: String,
    /// The MAC the guest's `eth0` takes (its namespace's interface's).
    pub mac: String,
    /// CIDR addresses, "10.88.0.7/16".
    pub addresses: Vec<String>,
    /// (destination CIDR, gateway or "").
    pub routes: Vec<(String, String)>,
    pub mtu: u32,
    pub dns_servers: Vec<String>,
    pub dns_search: Vec<String>,
    /// resolv.conf `options` ("ndots:5").
    pub dns_options: Vec<String>,
}

/// How to boot a pod.
#[derive(Debug, Clone)]
pub struct PodConfig {
    /// `[A-Za-z0-9_.-]`, 1 to 64 characters; the directory name.
    pub id: String,
    /// A human name (`atoll run --name`); defaults to the id.
    pub name: String,
    /// The main image, for `atoll ps`.
    pub image: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vmm: PathBuf,
    pub disks: Vec<Disk>,
    pub tap: Option<Tap>,
    /// Make a tap for the pod (`atl<id>`, [`net::HostTap`]) and configure the guest's
    /// `eth0` on it (`atoll run --net`).
    pub net: bool,
    /// The pod's hostname; set (with the network) before any container is created.
    pub hostname: Option<String>,
    /// The pod's sysctls (name, value), written in the guest with the network.
    pub sysctls: Vec<(String, String)>,
    /// The image's layers, written to `<pod dir>/layers.img` and attached read-only
    /// as [`image::LAYERS_SERIAL`] (`atoll run --unpack-in-guest`).
    pub layers_disk: Option<image::LayersDisk>,
    /// `<run dir>`; the pod directory is `<run_dir>/pods/<id>`.
    pub run_dir: PathBuf,
    pub agent_timeout: Duration,
    /// Time zero of the timings (when the user's command started).
    pub t0: Instant,
    /// Set to a nonzero signal number to abandon the boot ([`PodError::Cancelled`]).
    pub cancel: Option<Arc<AtomicI32>>,
    /// Boot the kernel, or restore a clone of a pod template.
    pub boot: Boot,
    /// Serve atoll-vmm's control API at `<pod dir>/api.sock` (template builds, and
    /// CRI sandboxes, whose images reach the running VM through it).
    pub api: bool,
    /// Start the VMM in a session of its own that outlives this process (atoll-cri:
    /// pods outlive the server). Without it, the VMM dies with the thread that
    /// spawned it. Hand a detached pod over with [`Pod::detach`].
    pub detached: bool,
    /// Where the pod's cgroup leaf goes ([`confine`]); `None`: no cgroup.
    pub cgroup_root: Option<PathBuf>,
    /// The pod's CPU limit (`cpu.max` of its cgroup).
    pub cpu_limit: Option<confine::CpuLimit>,
    /// A network namespace (and tap) made for the pod elsewhere; `tap` then names
    /// its tap and the VMM starts inside the namespace.
    pub network: Option<PodNetwork>,
    /// Pre-started VMMs: a template boot takes one when one waits, and loads the
    /// snapshot into it instead of spawning a VMM ([`pool`]).
    pub pool: Option<Arc<pool::Pool>>,
}

/// The pod's sysctls as the agent takes them.
fn sysctls(cfg: &PodConfig) -> Vec<v1::Sysctl> {
    cfg.sysctls
        .iter()
        .map(|(name, value)| v1::Sysctl {
            name: name.clone(),
            value: value.clone(),
        })
        .collect()
}

/// How a pod's VM comes up.
#[derive(Debug, Clone, Default)]
pub enum Boot {
    /// Boot the kernel and initramfs.
    #[default]
    Cold,
    /// Restore a clone of this template (its spare disk slots take the pod's disks).
    Template(template::Template),
}

impl PodConfig {
    /// A config with the usual defaults (1 vCPU, 256 MiB, no disks).
    pub fn new(id: &str, kernel: PathBuf, initramfs: PathBuf, vmm: PathBuf) -> Self {
        Self {
            id: id.to_owned(),
            name: id.to_owned(),
            image: String::new(),
            vcpus: 1,
            mem_mib: 256,
            kernel,
            initramfs,
            vmm,
            disks: Vec::new(),
            tap: None,
            net: false,
            hostname: None,
            sysctls: Vec::new(),
            layers_disk: None,
            run_dir: state::run_dir(),
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
            t0: Instant::now(),
            cancel: None,
            boot: Boot::Cold,
            api: false,
            detached: false,
            cgroup_root: confine::default_cgroup_root(),
            cpu_limit: None,
            network: None,
            pool: None,
        }
    }

    /// The VMM's arguments (without the program); `uid` is the pod's own uid for
    /// the jail ([`confine`]).
    pub fn vmm_args(&self, dir: &Path, uid: Option<u32>) -> Vec<String> {
        let jail = uid.map(|u| vec!["--jail-uid".to_string(), u.to_string()]);
        if let Boot::Template(t) = &self.boot {
            let mut a =
                t.restore_args(dir, &self.disks, self.tap.as_ref().map(|t| t.name.as_str()));
            if self.api {
                a.push("--api-sock".into());
                a.push(dir.join(API_SOCK).display().to_string());
            }
            a.extend(jail.into_iter().flatten());
            return a;
        }
        let mut a: Vec<String> = vec![
            "--kernel".into(),
            self.kernel.display().to_string(),
            "--initrd".into(),
            self.initramfs.display().to_string(),
            "--mem".into(),
            self.mem_mib.to_string(),
            "--vcpus".into(),
            self.vcpus.to_string(),
            "--cmdline".into(),
            GUEST_CMDLINE.into(),
            "--vsock".into(),
            format!("cid={GUEST_CID},uds={}", dir.join("vsock.sock").display()),
            "--metrics".into(),
            dir.join("vmm-metrics.json").display().to_string(),
        ];
        for d in &self.disks {
            let mut s = d.path.display().to_string();
            if d.read_only {
                s.push_str(",ro");
            }
            s.push_str(",id=");
            s.push_str(&d.serial);
            a.push("--disk".into());
            a.push(s);
        }
        if let Some(t) = &self.tap {
            let mut s = format!("tap={}", t.name);
            if let Some(m) = &t.mac {
                s.push_str(",mac=");
                s.push_str(m);
            }
            a.push("--net".into());
            a.push(s);
        }
        if self.api {
            a.push("--api-sock".into());
            a.push(dir.join(API_SOCK).display().to_string());
        }
        a.extend(jail.into_iter().flatten());
        a.extend(["--".into(), "/init".into(), "agent".into()]);
        a
    }
}

/// Phase times of one `atoll run`, in milliseconds since its start (guest-side
/// durations in microseconds as the agent reports them).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub image_prepared_ms: Option<f64>,
    pub image_converted: Option<bool>,
    /// Writing the layers disk, when the guest unpacks the layers.
    pub layers_disk_ms: Option<f64>,
    /// "cold" (kernel boot) or "template" (a restored clone).
    pub boot: Option<&'static str>,
    pub vmm_spawned_ms: Option<f64>,
    pub agent_connected_ms: Option<f64>,
    /// A clone took its identity (Restored answered).
    pub restored_ms: Option<f64>,
    /// Guest CLOCK_BOOTTIME when the agent listened.
    pub guest_agent_ready_us: Option<u64>,
    pub created_ms: Option<f64>,
    pub guest_rootfs_us: Option<u64>,
    pub guest_create_us: Option<u64>,
    pub started_ms: Option<f64>,
    pub guest_start_us: Option<u64>,
    /// From atoll-vmm's metrics, converted to milliseconds since the start of the
    /// run: vCPUs running (the VMM's own set-up done), then the guest's boot stages:
    /// PID 1 entered, PID 1 ready (mounts done), agent spawned.
    pub vmm_vcpus_started_ms: Option<f64>,
    pub guest_init_entered_ms: Option<f64>,
    pub guest_init_ready_ms: Option<f64>,
    pub guest_agent_spawned_ms: Option<f64>,
    /// Every set-up phase atoll-vmm records (`kvm_open`, `vm_created`,
    /// `kernel_loaded`, ...), in milliseconds since the start of the run.
    pub vmm_phases_ms: std::collections::BTreeMap<String, f64>,
    /// VM exits to userspace over the pod's life.
    pub vm_exits: Option<u64>,
    pub first_output_ms: Option<f64>,
    pub exited_ms: Option<f64>,
    pub vm_stopped_ms: Option<f64>,
}

/// Copies `from` into `to` until EOF, keeping at most `max` bytes; the rest is read
/// and dropped, with one note in the file saying so.
fn copy_bounded(mut from: impl std::io::Read, mut to: impl std::io::Write, max: u64) {
    let mut kept = 0u64;
    let mut dropped = false;
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let room = usize::try_from(max.saturating_sub(kept)).unwrap_or(usize::MAX);
        let take = n.min(room);
        if take > 0 && to.write_all(&buf[..take]).is_err() {
            // The log is gone (disk full, pod removed): keep draining.
            dropped = true;
        }
        kept += take as u64;
        if take < n && !dropped {
            dropped = true;
            let _ = writeln!(to, "\n[atoll: console output beyond {max} bytes dropped]");
        }
    }
}

/// Fills `buf` from the kernel's CSPRNG.
pub fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Milliseconds from `t0` to now.
pub fn ms_since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1000.0
}

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("pod id {id:?}")]
    InvalidId {
        id: String,
        #[source]
        source: IdError,
    },
    #[error("pod {0} already exists (its directory is there); pick another id or remove it")]
    AlreadyExists(PathBuf),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The pod's own uid or cgroup could not be set up.
    #[error(transparent)]
    Confine(#[from] confine::ConfineError),
    #[error("cannot run the VMM {vmm}; build it with `make artifacts` or pass --vmm")]
    Spawn {
        vmm: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The VMM said why it could not start (e.g. a KVM that cannot run the guest).
    #[error("{0}")]
    VmmFailed(String),
    #[error(
        "atoll-vmm exited ({status}) before the guest agent answered; the end of {log}:\n{tail}"
    )]
    VmmExited {
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("the guest agent did not answer within {waited:?} (atoll-vmm threads: {threads}); the end of {log}:\n{tail}")]
    AgentTimeout {
        waited: Duration,
        /// Each VMM thread's name, state and CPU time: a guest spinning, halted or
        /// a VMM stuck look different here.
        threads: String,
        log: PathBuf,
        tail: String,
    },
    /// The boot was abandoned (the user sent signal N).
    #[error("the pod's start was interrupted by signal {0}")]
    Cancelled(i32),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Tap(#[from] net::TapError),
    #[error(transparent)]
    LayersDisk(#[from] image::LayersDiskError),
    #[error("configuring the pod's network in the guest")]
    Network(#[source] AgentError),
    #[error("giving the restored pod its identity (entropy, clock, network, disks)")]
    Restored(#[source] AgentError),
    #[error(transparent)]
    Template(#[from] template::TemplateError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PodError + '_ {
    move |source| PodError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The last `lines` lines of a file (reading at most its last 16 KiB).
pub fn file_tail(path: &Path, lines: usize) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 << 10)));
        let _ = f.take(16 << 10).read_to_end(&mut buf);
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The VMM's own error line (`atoll-vmm: error: ...`) in its log, if any.
pub fn vmm_error_line(log: &Path) -> Option<String> {
    file_tail(log, 200)
        .lines()
        .rev()
        .find(|l| l.starts_with("atoll-vmm: error:"))
        .map(str::to_owned)
}

/// `name state cpu-ms` for each thread of process `pid`, from /proc (e.g.
/// `vcpu0 R 5120ms, devices S 12ms`).
pub fn thread_report(pid: u32) -> String {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return "gone".into();
    };
    // SAFETY: sysconf(3) reads a constant.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    let mut out: Vec<String> = rd
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|stat| {
            // pid (comm) state ... utime(14) stime(15): comm may hold spaces.
            let open = stat.find('(')?;
            let close = stat.rfind(')')?;
            let comm = &stat[open + 1..close];
            let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            let cpu = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
            Some(format!("{comm} {} {}ms", rest.first()?, cpu * 1000 / ticks))
        })
        .collect();
    out.sort();
    if out.is_empty() {
        "gone".into()
    } else {
        out.join(", ")
    }
}

/// Asks the kernel to SIGKILL this process when the thread that forked it ends.
fn set_pdeathsig() -> io::Result<()> {
    let sig = libc::c_ulong::try_from(libc::SIGKILL).unwrap_or(9);
    // SAFETY: prctl(PR_SET_PDEATHSIG) reads only its integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn new_session() -> io::Result<()> {
    // SAFETY: setsid(2) takes no arguments.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The pod's directory; removed (after saving the container log) when dropped,
/// unless the pod was detached.
#[derive(Debug)]
struct PodDir {
    path: PathBuf,
    run_dir: PathBuf,
    id: String,
    keep: bool,
}

impl Drop for PodDir {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let logs = state::logs_dir(&self.run_dir);
        let log = self.path.join("container.log");
        if log.is_file() && fs::create_dir_all(&logs).is_ok() {
            let _ = fs::rename(&log, logs.join(format!("{}.log", self.id)));
            // The guest's console (kernel and agent messages, bounded), for post-mortems.
            let _ = fs::rename(
                self.path.join("console.log"),
                logs.join(format!("{}.console", self.id)),
            );
            if let Ok(mut s) = PodState::read(&self.path.join("state.json")) {
                s.status = PodStatus::Exited;
                let _ = s.write(&logs.join(format!("{}.json", self.id)));
            }
            prune_logs(&logs, KEPT_LOGS, KEPT_LOGS_BYTES);
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Removes all but the newest `keep` logs (and their state files) of `logs`.
pub fn prune_logs(logs: &Path, keep: usize, keep_bytes: u64) {
    let Ok(rd) = fs::read_dir(logs) else { return };
    let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut found: Vec<(std::time::SystemTime, PathBuf, u64)> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .map(|p| {
            let t = fs::metadata(&p)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            let bytes =
                size(&p) + size(&p.with_extension("console")) + size(&p.with_extension("json"));
            (t, p, bytes)
        })
        .collect();
    // Newest first: keep while both bounds allow (the newest always).
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    let mut total = 0u64;
    for (i, (_, p, bytes)) in found.into_iter().enumerate() {
        total = total.saturating_add(bytes);
        if i == 0 || (i < keep && total <= keep_bytes) {
            continue;
        }
        let _ = fs::remove_file(p.with_extension("json"));
        let _ = fs::remove_file(p.with_extension("console"));
        let _ = fs::remove_file(p);
    }
}

/// What other threads need to talk to a running pod (a signal handler stopping a
/// container while the main thread waits on it).
#[derive(Debug, Clone)]
pub struct PodHandle {
    vsock: PathBuf,
}

impl PodHandle {
    /// The handle of the pod whose directory is `dir` (its `vsock.sock`).
    pub fn for_dir(dir: &Path) -> Self {
        Self {
            vsock: dir.join("vsock.sock"),
        }
    }

    /// The pod's vsock socket.
    pub fn vsock_path(&self) -> &Path {
        &self.vsock
    }

    /// A new control connection (the guest is up: a short deadline).
    pub fn client(&self) -> Result<AgentClient, AgentError> {
        self.client_within(Duration::from_secs(10))
    }

    /// A new control connection, connecting for at most `timeout`.
    pub fn client_within(&self, timeout: Duration) -> Result<AgentClient, AgentError> {
        AgentClient::connect(&self.vsock, timeout)
    }

    pub fn attach(
        &self,
        container: &str,
        exec_id: &str,
        stream: v1::attach::Stream,
    ) -> Result<UnixStream, AttachError> {
        agent::attach(&self.vsock, container, exec_id, stream)
    }

    /// SIGTERM to the container's init; after `grace`, SIGKILL to all its processes.
    /// Returns the exit if it came within the grace period.
    pub fn stop_container(
        &self,
        id: &str,
        grace: Duration,
    ) -> Result<Option<v1::WaitReply>, AgentError> {
        let mut c = self.client()?;
        let _ = c.set_timeout(Some(Duration::from_secs(30)));
        match c.signal(id, "", libc::SIGTERM, false) {
            Ok(()) => {}
            // Already gone: nothing to stop.
            Err(e) if e.code() == Some(v1::error::Code::NotFound) => return Ok(None),
            Err(e) if e.code() == Some(v1::error::Code::FailedPrecondition) => {}
            Err(e) => return Err(e),
        }
        let mut w = self.client()?;
        let _ = w.set_timeout(Some(grace.max(Duration::from_millis(1))));
        match w.wait(id, "") {
            Ok(r) => return Ok(Some(r)),
            Err(AgentError::Frame {
                source: FrameError::Io(e),
                ..
            }) if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
            Err(e) => return Err(e),
        }
        match c.signal(id, "", libc::SIGKILL, true) {
            Ok(()) => Ok(None),
            Err(e) if e.code().is_some() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A running pod VM. Dropping it tears everything down.
#[derive(Debug)]
pub struct Pod {
    id: String,
    vmm: Option<Child>,
    control: Option<AgentClient>,
    handle: PodHandle,
    state: PodState,
    timings: Timings,
    t0: Instant,
    // Dropped after the VMM is gone (which holds the tap open): deletes the tap.
    tap: Option<net::HostTap>,
    /// Copies the VMM's output into `console.log` (bounded); ends with the VMM.
    console: Option<std::thread::JoinHandle<()>>,
    // Dropped after the VMM is gone: the cgroup leaf and the uid are freed.
    cgroup: Option<confine::Cgroup>,
    uid: Option<confine::UidClaim>,
    // Last: dropped after the VMM is gone.
    dir: PodDir,
}

impl Pod {
    /// Boots the pod and connects to its agent.
    ///
    /// Call it from a thread that lives as long as the pod: the VMM is killed when
    /// the thread that spawned it ends (`PR_SET_PDEATHSIG`).
    pub fn start(mut cfg: PodConfig) -> Result<Pod, PodError> {
        let mut standby = match (&cfg.boot, &cfg.pool) {
            (Boot::Template(t), Some(pool)) => {
                pool.expect(t);
                let taken = pool.take();
                match &taken {
                    Some(s) => tracing::info!("pod {}: standby VMM {:?} takes it", cfg.id, s.pid()),
                    None => tracing::info!("pod {}: no standby VMM waits; spawning one", cfg.id),
                }
                taken
            }
            _ => None,
        };
        let dir = match &standby {
            Some(s) => Self::adopt_dir(&cfg, s)?,
            None => Self::make_dir(&cfg)?,
        };
        let log_path = dir.path.join("console.log");
        let vsock = dir.path.join("vsock.sock");
        let mut pod = Pod {
            id: cfg.id.clone(),
            vmm: None,
            control: None,
            handle: PodHandle {
                vsock: vsock.clone(),
            },
            state: PodState {
                id: cfg.id.clone(),
                name: if cfg.name.is_empty() {
                    cfg.id.clone()
                } else {
                    cfg.name.clone()
                },
                image: cfg.image.clone(),
                status: PodStatus::Starting,
                owner_pid: std::process::id(),
                vmm_pid: None,
                created: state::now_secs(),
                exit_status: None,
                address: None,
            },
            timings: Timings::default(),
            t0: cfg.t0,
            tap: None,
            console: None,
            cgroup: None,
            uid: None,
            dir,
        };
        if let Some(s) = standby.as_mut() {
            // The directory is the pod's now: so is the VMM waiting in it.
            pod.vmm = s.child.take();
            pod.console = s.console.take();
            pod.state.vmm_pid = pod.vmm.as_ref().map(Child::id);
            if let Some(pid) = pod.state.vmm_pid {
                pool::normal_priority(pid);
            }
        }
        pod.write_state();
        let uid = match standby.as_mut().and_then(|s| s.uid.take()) {
            Some(mut claim) => {
                claim.transfer(&cfg.run_dir, &cfg.id)?;
                claim
            }
            None => confine::claim_uid(&cfg.run_dir, &cfg.id)?,
        };
        if let Some(root) = &cfg.cgroup_root {
            let cg = confine::Cgroup::create(root, &cfg.id, cfg.mem_mib, cfg.vcpus, cfg.cpu_limit)?;
            let named = pod.dir.path.join(confine::CGROUP_FILE);
            fs::write(&named, cg.path.as_os_str().as_encoded_bytes()).map_err(io_err(&named))?;
            if let Some(pid) = pod.state.vmm_pid {
                // Before the load: guest memory is charged to the pod's leaf.
                cg.adopt(pid)?;
            }
            pod.cgroup = Some(cg);
        }
        let uid_value = uid.uid;
        pod.uid = Some(uid);
        if let Some(layers) = &cfg.layers_disk {
            let t = Instant::now();
            let path = pod.dir.path.join("layers.img");
            layers.write(&path)?;
            cfg.disks.push(Disk {
                path,
                serial: image::LAYERS_SERIAL.to_owned(),
                read_only: true,
            });
            pod.timings.layers_disk_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
        }
        if cfg.net {
            let tap = net::HostTap::create(&cfg.id)?;
            cfg.tap = Some(Tap {
                name: tap.name().to_owned(),
                mac: Some(tap.mac().to_owned()),
            });
            pod.state.address = Some(tap.subnet().guest().to_string());
            pod.tap = Some(tap);
        }
        match (standby, &cfg.boot) {
            (Some(s), Boot::Template(t)) => {
                // The waiting VMM's own cgroup leaf and directory name go with it.
                drop(s);
                pod.load_snapshot(&cfg, t)?;
            }
            _ => pod.spawn_vmm(&cfg, uid_value, &log_path)?,
        }
        pod.timings.vmm_spawned_ms = Some(ms_since(pod.t0));
        pod.write_state();
        tracing::debug!("pod {}: VMM running at {:.1} ms", cfg.id, ms_since(pod.t0));

        let control = pod.connect_agent(&log_path, cfg.agent_timeout, cfg.cancel.as_deref())?;
        pod.timings.agent_connected_ms = Some(ms_since(pod.t0));
        pod.timings.guest_agent_ready_us = Some(control.hello().agent_ready_us);
        pod.control = Some(control);
        match &cfg.boot {
            Boot::Cold => {
                pod.timings.boot = Some("cold");
                pod.configure_network(&cfg)?;
            }
            Boot::Template(_) => {
                pod.timings.boot = Some("template");
                pod.send_restored(&cfg)?;
                pod.timings.restored_ms = Some(ms_since(pod.t0));
            }
        }
        tracing::debug!(
            "pod {}: agent at {:.1} ms, ready at {:.1} ms",
            cfg.id,
            pod.timings.agent_connected_ms.unwrap_or_default(),
            ms_since(pod.t0)
        );
        Ok(pod)
    }

    /// Spawns the pod's VMM (a boot, or a restore by its command line), its output
    /// copied into `log_path`.
    fn spawn_vmm(&mut self, cfg: &PodConfig, uid: u32, log_path: &Path) -> Result<(), PodError> {
        let log = File::create(log_path).map_err(io_err(log_path))?;
        let (reader, writer) = std::io::pipe().map_err(io_err(log_path))?;
        let writer2 = writer.try_clone().map_err(io_err(log_path))?;
        let mut cmd = Command::new(&cfg.vmm);
        cmd.args(cfg.vmm_args(&self.dir.path, Some(uid)))
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(writer2);
        if cfg.detached {
            // SAFETY: the closure runs in the child between fork and exec and only
            // calls setsid(2), which is async-signal-safe and touches no memory of
            // the parent.
            unsafe {
                cmd.pre_exec(new_session);
            }
        } else {
            cmd.process_group(0);
            // SAFETY: the closure runs in the child between fork and exec and only
            // calls `set_pdeathsig`, which makes one async-signal-safe prctl(2) call
            // and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(set_pdeathsig);
            }
        }
        let netns = match &cfg.network {
            Some(n) => Some(File::open(&n.netns).map_err(io_err(&n.netns))?),
            None => None,
        };
        if let Some(ns) = &netns {
            let fd = ns.as_raw_fd();
            // SAFETY: the closure runs in the child between fork and exec and makes
            // one setns(2) call on a descriptor opened before the fork.
            unsafe {
                cmd.pre_exec(move || netns::enter_fd(fd));
            }
        }
        if let Some(cg) = &self.cgroup {
            let cg = cg.for_child();
            // SAFETY: the closure runs in the child between fork and exec and only
            // makes open(2), write(2) and close(2) calls on data prepared before the
            // fork (`Cgroup::join_self`).
            unsafe {
                cmd.pre_exec(move || cg.join_self());
            }
        }
        let child = cmd.spawn().map_err(|source| PodError::Spawn {
            vmm: cfg.vmm.clone(),
            source,
        })?;
        // Our copies of the write end go with `cmd`: the pipe ends when the VMM does.
        drop(cmd);
        self.console = Some(std::thread::spawn(move || {
            copy_bounded(reader, log, CONSOLE_LOG_MAX)
        }));
        self.state.vmm_pid = Some(child.id());
        self.vmm = Some(child);
        Ok(())
    }

    /// Sends template `t`'s snapshot to the pre-started VMM the pod took: the
    /// pod's disks in its slots, its tap (opened in the pod's network namespace:
    /// the jailed VMM has left the host's), running at once.
    fn load_snapshot(&mut self, cfg: &PodConfig, t: &template::Template) -> Result<(), PodError> {
        let tap = cfg.tap.as_ref().map(|t| t.name.as_str());
        let body = t.load_body(&cfg.disks, tap, true);
        let sock = self.dir.path.join(API_SOCK);
        let load = || template::api_call(&sock, "PUT", "/snapshot/load", &body);
        let answer = match &cfg.network {
            Some(n) => netns::NetNs::at(&n.netns)
                .run_in(load)
                .map_err(|e| PodError::VmmFailed(e.to_string()))?,
            None => load(),
        };
        if let Ok(body) = &answer {
            tracing::debug!("pod {}: snapshot loaded: {body}", cfg.id);
        }
        answer.map(drop).map_err(|e| {
            // Kept whole: a snapshot error in it makes the caller rebuild the
            // template (template::is_snapshot_error).
            PodError::VmmFailed(e.to_string())
        })
    }

    /// Gives a restored clone its own identity: fresh entropy, the clock, its
    /// network (by interface name: every clone has the template's MAC), and the
    /// disks its slots now hold.
    fn send_restored(&mut self, cfg: &PodConfig) -> Result<(), PodError> {
        let mut entropy = vec![0u8; 64];
        getrandom(&mut entropy).map_err(io_err(Path::new("getrandom")))?;
        let realtime_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let req = v1::Restored {
            entropy,
            realtime_ns,
            network: self.network_request(cfg, false),
            disks: cfg.disks.iter().map(|d| d.serial.clone()).collect(),
        };
        self.control()
            .and_then(|c| c.restored(req))
            .map_err(PodError::Restored)
    }

    /// Records that the pod's main container runs (`atoll ps` shows `running`, and
    /// `atoll kill` accepts the pod only from then on).
    pub fn mark_running(&mut self) {
        self.state.status = PodStatus::Running;
        self.write_state();
    }

    /// The pod's network when it has a tap or a hostname: the guest's `eth0`
    /// (matched by MAC when `by_mac`), default route and DNS servers (the host's,
    /// loopback ones left out).
    fn network_request(&self, cfg: &PodConfig, by_mac: bool) -> Option<v1::ConfigureNetwork> {
        let hostname = cfg.hostname.clone().unwrap_or_default();
        if let Some(n) = &cfg.network {
            return Some(v1::ConfigureNetwork {
                interfaces: vec![v1::Interface {
                    name: net::GUEST_IFACE.into(),
                    mac: String::new(),
                    addresses: n.addresses.clone(),
                    mtu: n.mtu,
                    set_mac: n.mac.clone(),
                }],
                routes: n
                    .routes
                    .iter()
                    .map(|(dst, gw)| v1::Route {
                        destination: dst.clone(),
                        gateway: gw.clone(),
                        device: net::GUEST_IFACE.into(),
                    })
                    .collect(),
                dns_servers: n.dns_servers.clone(),
                dns_search: n.dns_search.clone(),
                hostname,
                dns_options: n.dns_options.clone(),
                sysctls: sysctls(cfg),
            });
        }
        if self.tap.is_none() && hostname.is_empty() && cfg.sysctls.is_empty() {
            return None;
        }
        let dns = std::fs::read_to_string(net::HOST_RESOLV_CONF)
            .map(|t| net::nameservers(&t))
            .unwrap_or_default();
        let link = self.tap.as_ref().map(|t| {
            let mac = if by_mac {
                t.mac().to_owned()
            } else {
                String::new()
            };
            (t.subnet(), mac)
        });
        let mut req = net::configure_request(
            link.as_ref().map(|(s, m)| (*s, m.as_str())),
            &dns,
            &hostname,
        );
        req.sysctls = sysctls(cfg);
        Some(req)
    }

    /// Sends ConfigureNetwork (cold boots) when there is a network to configure.
    fn configure_network(&mut self, cfg: &PodConfig) -> Result<(), PodError> {
        let Some(req) = self.network_request(cfg, true) else {
            return Ok(());
        };
        self.control()
            .and_then(|c| c.configure_network(req))
            .map_err(PodError::Network)
    }

    /// Makes a pre-started VMM's directory the pod's, by a rename that never
    /// replaces anything.
    fn adopt_dir(cfg: &PodConfig, standby: &pool::Standby) -> Result<PodDir, PodError> {
        validate_id(&cfg.id).map_err(|source| PodError::InvalidId {
            id: cfg.id.clone(),
            source,
        })?;
        let path = state::pods_dir(&cfg.run_dir).join(&cfg.id);
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &standby.dir,
            rustix::fs::CWD,
            &path,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => return Err(PodError::AlreadyExists(path)),
            Err(e) => return Err(io_err(&path)(e.into())),
        }
        let _ = fs::remove_file(path.join(pool::PID_FILE));
        Ok(PodDir {
            path,
            run_dir: cfg.run_dir.clone(),
            id: cfg.id.clone(),
            keep: false,
        })
    }

    fn make_dir(cfg: &PodConfig) -> Result<PodDir, PodError> {
        validate_id(&cfg.id).map_err(|source| PodError::InvalidId {
            id: cfg.id.clone(),
            source,
        })?;
        let pods = state::pods_dir(&cfg.run_dir);
        fs::create_dir_all(&pods).map_err(io_err(&pods))?;
        let path = pods.join(&cfg.id);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(PodError::AlreadyExists(path))
            }
            Err(e) => return Err(io_err(&path)(e)),
        }
        Ok(PodDir {
            path,
            run_dir: cfg.run_dir.clone(),
            id: cfg.id.clone(),
            keep: false,
        })
    }

    /// Connects in short attempts, watching the VMM between them so that a VMM that
    /// ends early is reported at once, with its reason.
    fn connect_agent(
        &mut self,
        log: &Path,
        timeout: Duration,
        cancel: Option<&AtomicI32>,
    ) -> Result<AgentClient, PodError> {
        let start = Instant::now();
        loop {
            if let Some(sig) = cancel.map(|c| c.load(Ordering::SeqCst)).filter(|&s| s != 0) {
                return Err(PodError::Cancelled(sig));
            }
            if let Some(status) = self.vmm.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.vmm = None;
                // Everything the VMM printed is in the log once the pipe has drained.
                if let Some(t) = self.console.take() {
                    let _ = t.join();
                }
                if let Some(line) = vmm_error_line(log) {
                    // A guest that crashed explains itself on its console: quote it.
                    if line.contains("console output") {
                        let tail = file_tail(log, CRASH_TAIL_LINES);
                        return Err(PodError::VmmFailed(format!(
                            "{line}; the end of {}:\n{tail}",
                            log.display()
                        )));
                    }
                    return Err(PodError::VmmFailed(line));
                }
                return Err(PodError::VmmExited {
                    status,
                    log: log.to_owned(),
                    tail: file_tail(log, CONSOLE_TAIL_LINES),
                });
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                let threads = self
                    .vmm
                    .as_ref()
                    .map_or_else(|| "gone".to_owned(), |c| thread_report(c.id()));
                return Err(PodError::AgentTimeout {
                    waited: start.elapsed(),
                    threads,
                    log: log.to_owned(),
                    tail: file_tail(log, CONSOLE_TAIL_LINES),
                });
            }
            match AgentClient::connect(&self.handle.vsock, left.min(Duration::from_millis(500))) {
                Ok(c) => return Ok(c),
                Err(AgentError::Connect(ConnectError::Timeout { .. })) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn write_state(&self) {
        if let Err(e) = self.state.write(&self.dir.path.join("state.json")) {
            tracing::warn!("{e}");
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// `<run dir>/pods/<id>`.
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    /// Where the container output is teed (kept as `<run dir>/logs/<id>.log`).
    pub fn container_log(&self) -> PathBuf {
        self.dir.path.join("container.log")
    }

    /// Why the VMM ended, once it has (waiting up to `grace` for it to be reaped,
    /// since an agent connection breaks the moment the VMM dies): its error line (a
    /// guest crash, a seccomp violation), else its exit status. `None` while it runs.
    pub fn vmm_end_reason(&mut self, grace: Duration) -> Option<String> {
        let child = self.vmm.as_mut()?;
        let deadline = Instant::now() + grace;
        let status = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break st;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.vmm = None;
        if let Some(t) = self.console.take() {
            let _ = t.join();
        }
        let log = self.console_log();
        Some(vmm_error_line(&log).unwrap_or_else(|| format!("atoll-vmm exited ({status})")))
    }

    pub fn console_log(&self) -> PathBuf {
        self.dir.path.join("console.log")
    }

    /// A pidfd of the VMM while it is this process's unreaped child (so the pid
    /// cannot have been reused): lets another thread signal it safely.
    pub fn vmm_pidfd(&self) -> Option<std::os::fd::OwnedFd> {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.vmm.as_ref()?.id()).ok()?)?;
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
    }

    pub fn handle(&self) -> PodHandle {
        self.handle.clone()
    }

    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    pub fn timings_mut(&mut self) -> &mut Timings {
        &mut self.timings
    }

    pub fn state(&self) -> &PodState {
        &self.state
    }

    fn control(&mut self) -> Result<&mut AgentClient, AgentError> {
        match self.control {
            Some(ref mut c) => Ok(c),
            None => {
                let c = self.handle.client()?;
                Ok(self.control.insert(c))
            }
        }
    }

    /// Creates a container; records the guest's rootfs and create times.
    pub fn create_container(
        &mut self,
        req: v1::CreateContainer,
    ) -> Result<v1::CreateReply, AgentError> {
        let r = self.control()?.create(req)?;
        self.timings.created_ms.get_or_insert(ms_since(self.t0));
        self.timings.guest_rootfs_us.get_or_insert(r.rootfs_us);
        self.timings.guest_create_us.get_or_insert(r.create_us);
        Ok(r)
    }

    pub fn start_container(&mut self, id: &str) -> Result<v1::StartReply, AgentError> {
        let r = self.control()?.start(id)?;
        self.timings.started_ms.get_or_insert(ms_since(self.t0));
        self.timings.guest_start_us.get_or_insert(r.start_us);
        Ok(r)
    }

    pub fn attach(
        &self,
        container: &str,
        exec_id: &str,
        stream: v1::attach::Stream,
    ) -> Result<UnixStream, AttachError> {
        self.handle.attach(container, exec_id, stream)
    }

    /// Blocks until the container's init ends.
    pub fn wait(&mut self, id: &str) -> Result<v1::WaitReply, AgentError> {
        let r = self.control()?.wait(id, "")?;
        self.timings.exited_ms.get_or_insert(ms_since(self.t0));
        self.state.exit_status = Some(r.status);
        self.write_state();
        Ok(r)
    }

    pub fn signal(&mut self, id: &str, signal: i32) -> Result<(), AgentError> {
        self.control()?.signal(id, "", signal, false)
    }

    /// Stops a container: SIGTERM, after `grace` SIGKILL.
    pub fn stop_container(
        &mut self,
        id: &str,
        grace: Duration,
    ) -> Result<Option<v1::WaitReply>, AgentError> {
        self.handle.stop_container(id, grace)
    }

    /// Stops the container `id` (if any), shuts the VM down and waits for the VMM.
    pub fn stop(
        &mut self,
        id: Option<&str>,
        grace: Duration,
    ) -> Result<Option<ExitStatus>, PodError> {
        self.state.status = PodStatus::Stopping;
        self.write_state();
        if let Some(id) = id {
            self.stop_container(id, grace)?;
        }
        self.shutdown()
    }

    /// Asks the agent to power the VM off and waits for the VMM (killing it after
    /// [`VMM_EXIT_TIMEOUT`]). Returns the VMM's exit status.
    pub fn shutdown(&mut self) -> Result<Option<ExitStatus>, PodError> {
        let sent = match self.control() {
            Ok(c) => {
                let _ = c.set_timeout(Some(VMM_EXIT_TIMEOUT));
                c.shutdown(0)
            }
            Err(e) => Err(e),
        };
        self.control = None;
        let status = self.reap(VMM_EXIT_TIMEOUT);
        self.timings.vm_stopped_ms = Some(ms_since(self.t0));
        self.read_vmm_metrics();
        self.state.status = PodStatus::Exited;
        self.write_state();
        sent?;
        Ok(status)
    }

    /// Adds the VMM's own timings (written when it exits) to [`Timings`].
    fn read_vmm_metrics(&mut self) {
        let path = self.dir.path.join("vmm-metrics.json");
        let Some(m) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        else {
            return;
        };
        let Some(spawned) = self.timings.vmm_spawned_ms else {
            return;
        };
        let at = |us: Option<u64>| us.map(|us| spawned + us as f64 / 1000.0);
        let stage = |name: &str| m["stages_us"][name].as_u64();
        self.timings.guest_init_entered_ms = at(stage("init"));
        self.timings.guest_init_ready_ms = at(stage("ready"));
        self.timings.guest_agent_spawned_ms = at(stage("command"));
        for p in m["vmm_phases_us"].as_array().into_iter().flatten() {
            if let (Some(name), Some(ms)) = (p[0].as_str(), at(p[1].as_u64())) {
                self.timings.vmm_phases_ms.insert(name.to_owned(), ms);
            }
        }
        self.timings.vmm_vcpus_started_ms =
            self.timings.vmm_phases_ms.get("vcpus_started").copied();
        self.timings.vm_exits = m["exits_total"].as_u64();
    }

    /// Waits up to `timeout` for the VMM, then kills it.
    fn reap(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.vmm.take()?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break,
            }
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

/// A pod handed over by [`Pod::detach`]: its VMM runs in its own session and its
/// directory stays; the new owner stops both.
#[derive(Debug)]
pub struct Detached {
    /// The VMM, still our child: wait for it (or it lingers as a zombie).
    pub vmm: Child,
    /// `<run dir>/pods/<id>`.
    pub dir: PathBuf,
    /// Copies the VMM's output into `console.log` until the VMM ends (or this
    /// process does: the VMM then writes into a closed pipe, which it ignores).
    pub console: Option<std::thread::JoinHandle<()>>,
}

impl Pod {
    /// Gives up ownership of a pod started with [`PodConfig::detached`]: nothing is
    /// killed or removed when the returned value (or this pod) goes. `None` (and the
    /// pod torn down) for a pod with a tap of its own, or whose VMM has ended.
    pub fn detach(mut self) -> Option<Detached> {
        if self.tap.is_some() {
            return None;
        }
        let vmm = self.vmm.take()?;
        self.control = None;
        self.dir.keep = true;
        // The new owner removes the cgroup leaf with the directory
        // (confine::remove_cgroup_of); the uid claim goes stale with it.
        if let Some(cg) = &mut self.cgroup {
            cg.keep = true;
        }
        if let Some(u) = &mut self.uid {
            u.keep = true;
        }
        Some(Detached {
            vmm,
            dir: self.dir.path.clone(),
            console: self.console.take(),
        })
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.control = None;
        if let Some(mut c) = self.vmm.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // `dir` is dropped after this: the log is kept and the directory removed.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_report_names_each_thread_with_state_and_cpu() {
        let me = std::process::id();
        let t = std::thread::Builder::new()
            .name("report-probe".into())
            .spawn(|| std::thread::sleep(Duration::from_millis(500)))
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let r = thread_report(me);
        t.join().unwrap();
        let probe = r
            .split(", ")
            .find(|e| e.starts_with("report-probe "))
            .unwrap_or_else(|| panic!("{r}"));
        let fields: Vec<&str> = probe.split(' ').collect();
        assert_eq!(fields.len(), 3, "{probe}");
        assert_eq!(fields[1], "S", "a sleeping thread: {probe}");
        assert!(fields[2].ends_with("ms"), "{probe}");
        assert_eq!(thread_report(u32::MAX), "gone");
    }

    #[test]
    fn console_copy_keeps_at_most_max_bytes_and_drains_the_rest() {
        let input = vec![b'x'; 100_000];
        let mut out = Vec::new();
        copy_bounded(input.as_slice(), &mut out, 1000);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(&"x".repeat(1000)), "{}", text.len());
        assert!(text.ends_with("[atoll: console output beyond 1000 bytes dropped]\n"));
        assert_eq!(text.matches("dropped").count(), 1);
        let mut out = Vec::new();
        copy_bounded(&b"short\n"[..], &mut out, 1000);
        assert_eq!(out, b"short\n");
    }
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn cfg(tmp: &Path, vmm: PathBuf) -> PodConfig {
        let mut c = PodConfig::new("p1", "/k".into(), "/i".into(), vmm);
        c.run_dir = tmp.join("run");
        c.agent_timeout = Duration::from_secs(10);
        // The host's cgroups are not these tests' to change (the node's end-to-end
        // tests run pods in real leaves).
        c.cgroup_root = None;
        c
    }

    #[test]
    fn vmm_args_follow_the_boot_contract() {
        let mut c = PodConfig::new("p", "/b/vmlinux".into(), "/b/i.cpio".into(), "v".into());
        c.disks.push(Disk {
            path: "/s/rootfs.erofs".into(),
            serial: "img0".into(),
            read_only: true,
        });
        c.mem_mib = 512;
        let a = c
            .vmm_args(Path::new("/run/atoll/pods/p"), Some(2_000_000_007))
            .join(" ");
        assert!(
            a.contains("--vsock cid=3,uds=/run/atoll/pods/p/vsock.sock"),
            "{a}"
        );
        assert!(a.contains("--disk /s/rootfs.erofs,ro,id=img0"), "{a}");
        assert!(a.contains("--mem 512 --vcpus 1"), "{a}");
        assert!(a.ends_with("--jail-uid 2000000007 -- /init agent"), "{a}");
    }

    #[test]
    fn start_vmm_exiting_early_quotes_console_and_removes_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let vmm = script(
            tmp.path(),
            "vmm",
            "echo 'Linux booting'\necho 'kernel panic: oops'\nexit 1",
        );
        let c = cfg(tmp.path(), vmm);
        let err = Pod::start(c).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PodError::VmmExited { .. }), "{err:?}");
        assert!(msg.contains("kernel panic: oops"), "{msg}");
        let left: Vec<_> = fs::read_dir(tmp.path().join("run/pods")).unwrap().collect();
        assert!(left.is_empty(), "pod dir left behind: {left:?}");
    }

    #[test]
    fn start_on_pvm_surfaces_the_vmm_line() {
        let tmp = tempfile::tempdir().unwrap();
        let vmm = script(
            tmp.path(),
            "vmm",
            "echo 'atoll-vmm: error: /dev/kvm is KVM-PVM (module kvm_pvm): ...' >&2\nexit 1",
        );
        let err = Pod::start(cfg(tmp.path(), vmm)).unwrap_err();
        assert!(matches!(err, PodError::VmmFailed(_)), "{err:?}");
        assert!(err
            .to_string()
            .starts_with("atoll-vmm: error: /dev/kvm is KVM-PVM"));
        assert!(!tmp.path().join("run/pods/p1").exists());
    }

    #[test]
    fn start_missing_vmm_is_a_spawn_error_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Pod::start(cfg(tmp.path(), tmp.path().join("no-such-vmm"))).unwrap_err();
        assert!(matches!(err, PodError::Spawn { .. }), "{err:?}");
        assert!(err.to_string().contains("make artifacts"));
        assert!(!tmp.path().join("run/pods/p1").exists());
    }

    #[test]
    fn start_silent_vmm_times_out_and_is_killed() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("pid");
        let vmm = script(
            tmp.path(),
            "vmm",
            &format!("echo $$ > {}\nexec sleep 30", pidfile.display()),
        );
        let mut c = cfg(tmp.path(), vmm);
        c.agent_timeout = Duration::from_millis(600);
        let err = Pod::start(c).unwrap_err();
        assert!(matches!(err, PodError::AgentTimeout { .. }), "{err:?}");
        let pid: u32 = fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Killed and reaped by the teardown: the pid is gone.
        assert!(!state::pid_alive(pid), "VMM {pid} still running");
        assert!(!tmp.path().join("run/pods/p1").exists());
    }

    #[test]
    fn start_with_layers_attaches_the_written_disk_and_teardown_removes_it() {
        let tmp = tempfile::tempdir().unwrap();
        let blob_path = tmp.path().join("blob");
        fs::write(&blob_path, b"layer-bytes").unwrap();
        let blob = image::LayerBlob {
            file: Arc::new(File::open(&blob_path).unwrap()),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 11,
            compression: atoll_image::oci::unpack::Compression::Gzip,
        };
        // The fake VMM records its arguments and the disk it was given, then fails.
        let record = tmp.path().join("record");
        let vmm = script(
            tmp.path(),
            "vmm",
            &format!(
                "echo \"$*\" > {r}\nhead -c 11 \"$(dirname \"$0\")/run/pods/p1/layers.img\" >> {r}\nexit 1",
                r = record.display()
            ),
        );
        let mut c = cfg(tmp.path(), vmm);
        c.layers_disk = Some(image::LayersDisk::plan(vec![blob]));
        assert!(matches!(Pod::start(c), Err(PodError::VmmExited { .. })));
        let rec = fs::read_to_string(&record).unwrap();
        let disk = tmp.path().join("run/pods/p1/layers.img");
        assert!(
            rec.contains(&format!("--disk {},ro,id=layers0", disk.display())),
            "{rec}"
        );
        assert!(
            rec.ends_with("layer-bytes"),
            "the disk held the blob: {rec}"
        );
        assert!(!disk.exists(), "removed with the pod directory");
    }

    #[test]
    fn start_twice_with_one_id_is_refused_without_touching_the_first() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path(), tmp.path().join("x"));
        let existing = state::pods_dir(&c.run_dir).join("p1");
        fs::create_dir_all(&existing).unwrap();
        let err = Pod::start(c).unwrap_err();
        assert!(matches!(err, PodError::AlreadyExists(_)), "{err:?}");
        assert!(existing.is_dir());
    }

    #[test]
    fn start_bad_id_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg(tmp.path(), tmp.path().join("x"));
        c.id = "../evil".into();
        assert!(matches!(Pod::start(c), Err(PodError::InvalidId { .. })));
        assert!(!tmp.path().join("evil").exists());
    }

    /// A fake VMM: a script that waits while the test serves a fake agent on the
    /// pod's vsock socket.
    #[test]
    fn pod_lifecycle_against_fake_agent_keeps_log_and_removes_dir() {
        use crate::agent::fake;
        let tmp = tempfile::tempdir().unwrap();
        let vmm = script(tmp.path(), "vmm", "exec sleep 30");
        let c = cfg(tmp.path(), vmm);
        let sock = state::pods_dir(&c.run_dir).join("p1/vsock.sock");
        let s2 = sock.clone();
        // The socket appears once the pod directory exists (as the VMM would make it).
        std::thread::spawn(move || {
            for _ in 0..500 {
                if s2.parent().is_some_and(Path::is_dir) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            fake::serve(
                &s2,
                fake::agent(|req| {
                    let result = match req.op? {
                        v1::request::Op::Create(_) => {
                            v1::response::Result::Create(v1::CreateReply {
                                pid: 1,
                                rootfs_us: 11,
                                create_us: 22,
                            })
                        }
                        v1::request::Op::Start(_) => {
                            v1::response::Result::Start(v1::StartReply { start_us: 33 })
                        }
                        v1::request::Op::Wait(_) => v1::response::Result::Wait(v1::WaitReply {
                            status: 3,
                            ..Default::default()
                        }),
                        v1::request::Op::Shutdown(_) => return None,
                        _ => v1::response::Result::Ok(v1::Empty {}),
                    };
                    Some(v1::Response {
                        result: Some(result),
                    })
                }),
            );
        });
        let mut pod = Pod::start(c).unwrap();
        let dir = pod.dir().to_owned();
        assert!(dir.join("state.json").is_file());
        let status = || {
            state::PodState::read(&dir.join("state.json"))
                .unwrap()
                .status
        };
        assert_eq!(status(), PodStatus::Starting);
        pod.mark_running();
        assert_eq!(status(), PodStatus::Running);
        pod.create_container(v1::CreateContainer {
            id: "main".into(),
            ..Default::default()
        })
        .unwrap();
        pod.start_container("main").unwrap();
        assert_eq!(pod.wait("main").unwrap().status, 3);
        fs::write(pod.container_log(), b"hello\n").unwrap();
        let t = pod.timings().clone();
        assert_eq!(
            (t.guest_rootfs_us, t.guest_create_us, t.guest_start_us),
            (Some(11), Some(22), Some(33))
        );
        assert_eq!(t.guest_agent_ready_us, Some(1234));
        // The fake VMM ignores Shutdown: it is killed after the timeout... which
        // would take 5 s; dropping the pod kills it at once.
        drop(pod);
        assert!(!dir.exists());
        let kept = tmp.path().join("run/logs/p1.log");
        assert_eq!(fs::read_to_string(kept).unwrap(), "hello\n");
    }

    #[test]
    fn start_cancelled_by_signal_kills_vmm_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let vmm = script(tmp.path(), "vmm", "exec sleep 30");
        let mut c = cfg(tmp.path(), vmm);
        let cancel = Arc::new(AtomicI32::new(0));
        c.cancel = Some(Arc::clone(&cancel));
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            cancel.store(15, Ordering::SeqCst);
        });
        let t0 = Instant::now();
        let err = Pod::start(c).unwrap_err();
        t.join().unwrap();
        assert!(matches!(err, PodError::Cancelled(15)), "{err:?}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(!tmp.path().join("run/pods/p1").exists());
    }

    #[test]
    fn prune_logs_keeps_the_newest() {
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..5u64 {
            let p = tmp.path().join(format!("p{i}.log"));
            fs::write(&p, "x").unwrap();
            fs::write(p.with_extension("json"), "{}").unwrap();
            let t = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000 + i);
            fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        prune_logs(tmp.path(), 2, u64::MAX);
        let left = || {
            let mut left: Vec<_> = fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            left.sort();
            left
        };
        assert_eq!(left(), ["p3.json", "p3.log", "p4.json", "p4.log"]);
        // By bytes: 3 bytes a pod here (log and record), 5 allowed: only the newest.
        prune_logs(tmp.path(), 100, 5);
        assert_eq!(left(), ["p4.json", "p4.log"]);
        // The newest stays even when it alone is over the bound.
        prune_logs(tmp.path(), 100, 0);
        assert_eq!(left(), ["p4.json", "p4.log"]);
    }

    #[test]
    fn file_tail_returns_last_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        fs::write(&p, text).unwrap();
        assert_eq!(file_tail(&p, 2), "line 98\nline 99");
        assert_eq!(file_tail(&tmp.path().join("none"), 2), "");
    }
}
