//! What atoll-cri does, without gRPC: every CRI operation as a blocking method of
//! [`Server`] ([`super::runtime`] and [`super::images`] run them on tokio's blocking
//! pool and map their errors to gRPC statuses).
//!
//! A sandbox is one pod VM, a clone of the warm pool's template for its size,
//! started detached (its own session: it outlives the server) with its control API
//! on. The template's spare disk slots receive the pod's images while it runs
//! (`PATCH /drives/{id}`), one slot per image however many containers use it; a
//! container is a few agent calls. Records are persisted at every change
//! ([`super::store`]); the in-memory maps are a cache of them.
//!
//! Locks: `state` is held only to read or change records, never across a call to
//! the guest or the VMM. Operations on one sandbox's slots are serialised by that
//! sandbox's own lock.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use atoll_agent_proto::v1;
use atoll_image::oci::store::Store as ImageStore;

use super::cni;
use super::config::Config;
use super::logs::{self, LogFile, SharedLog};
use super::store::{
    self, ContainerRecord, ContainerState, HostMount, Meta, NetworkRecord, SandboxRecord,
    SandboxState, Slot, Store,
};
use super::stream::attach::{Hub, Tee};
use crate::agent::{AgentClient, AgentError};
use crate::pod::image::{self, ImageRootfs, RootfsFrom};
use crate::pod::liveness::{Liveness, LivenessConfig};
use crate::pod::netns::NetNs;
use crate::pod::template::{self, TemplateSpec, SLOTS};
use crate::pod::volume;
use crate::pod::{PodConfig, PodHandle, PodNetwork, API_SOCK};
use sha2::{Digest as _, Sha256};

/// How long one agent request may take (create mounts an image; the guest is slow
/// under emulation).
const AGENT_CALL: Duration = Duration::from_secs(30);
/// How long a connection to a running pod's agent may take.
const AGENT_CONNECT: Duration = Duration::from_secs(10);
/// How long the VM gets to power off before it is killed.
const VM_STOP: Duration = Duration::from_secs(5);
/// How long stopping waits for the container's exit to be recorded.
const EXIT_RECORDED: Duration = Duration::from_secs(10);
/// ExecSync output kept per stream (the rest is read and dropped), as the CRI asks.
pub const MAX_EXEC_OUTPUT: usize = 16 << 20;
/// How long ExecSync waits, once the command has ended, for the rest of its output.
const EXEC_DRAIN: Duration = Duration::from_secs(2);
/// How often the VM watcher looks at every ready sandbox's VMM.
const WATCH_EVERY: Duration = Duration::from_millis(200);
/// How often the copies of running containers' host paths are brought up to date
/// (kubelet itself refreshes ConfigMap and Secret volumes about once a minute).
pub const VOLUME_SYNC_EVERY: Duration = Duration::from_secs(5);

/// What was last sent of one host path into one sandbox (see `pod::volume`).
#[derive(Debug, Clone)]
struct CopyState {
    fingerprint: [u8; 32],
    digest: [u8; 32],
    is_file: bool,
    /// The last sync's failure, logged once.
    failed: Option<String>,
}
/// Why a container stopped when its VM went away.
const VM_ENDED: &str = "its pod's VM ended (killed, or the guest crashed)";
/// The empty file a released slot goes back to.
const EMPTY_DISK: &str = "empty.img";

/// A running container's output copiers, its log and its attach hub.
type CopiedStdio = (Vec<JoinHandle<()>>, Option<SharedLog>, Arc<Hub>);

/// An operation's failure, as gRPC will report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CriError {
    InvalidArgument(String),
    NotFound(String),
    AlreadyExists(String),
    FailedPrecondition(String),
    ResourceExhausted(String),
    DeadlineExceeded(String),
    Unavailable(String),
    Internal(String),
}

impl std::fmt::Display for CriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = match self {
            CriError::InvalidArgument(m)
            | CriError::NotFound(m)
            | CriError::AlreadyExists(m)
            | CriError::FailedPrecondition(m)
            | CriError::ResourceExhausted(m)
            | CriError::DeadlineExceeded(m)
            | CriError::Unavailable(m)
            | CriError::Internal(m) => m,
        };
        f.write_str(m)
    }
}

pub type CriResult<T> = Result<T, CriError>;

/// An agent message, cut and freed of control characters before it reaches a
/// gRPC status (the guest is hostile; a client may print it on a terminal).
pub fn clean_message(s: &str) -> String {
    const MAX: usize = 1024;
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .take(MAX)
        .collect();
    if s.chars().count() > MAX {
        out.push_str("...");
    }
    out
}

pub(crate) fn agent_error(what: &str, e: &AgentError) -> CriError {
    let m = clean_message(&format!("{what}: {e}"));
    match e.code() {
        Some(v1::error::Code::InvalidArgument) => CriError::InvalidArgument(m),
        Some(v1::error::Code::NotFound) => CriError::NotFound(m),
        Some(v1::error::Code::AlreadyExists) => CriError::AlreadyExists(m),
        Some(v1::error::Code::FailedPrecondition) => CriError::FailedPrecondition(m),
        Some(v1::error::Code::ResourceExhausted) => CriError::ResourceExhausted(m),
        Some(_) => CriError::Internal(m),
        None => CriError::Unavailable(m),
    }
}

/// A pod VM that did not start: the whole chain of causes (the agent's own words
/// last); what the guest refused of the request (a sysctl its kernel lacks) is the
/// caller's to fix, anything else is the runtime's.
fn pod_start_error(e: &crate::pod::PodError) -> CriError {
    let mut m = format!("starting the pod VM: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        // Some errors already quote their source.
        if !m.contains(&text) {
            m.push_str(": ");
            m.push_str(&text);
        }
        source = s.source();
    }
    let m = clean_message(&m);
    match e {
        crate::pod::PodError::Restored(a) | crate::pod::PodError::Network(a)
            if a.code() == Some(v1::error::Code::InvalidArgument) =>
        {
            CriError::InvalidArgument(m)
        }
        _ => CriError::Internal(m),
    }
}

/// Nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A new id: 64 hex digits, as containerd's.
pub fn new_id() -> String {
    let mut b = [0u8; 32];
    crate::pod::getrandom(&mut b).expect("getrandom");
    hex::encode(b)
}

/// The guest kernel, initramfs and VMM sandboxes boot.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vmm: PathBuf,
}

/// What is known in memory besides the records.
#[derive(Default)]
struct State {
    sandboxes: HashMap<String, SandboxRecord>,
    containers: HashMap<String, ContainerRecord>,
    /// Log files of running containers (ReopenContainerLog).
    logs: HashMap<String, SharedLog>,
    /// The stdio of running containers, for Attach.
    hubs: HashMap<String, Arc<Hub>>,
    /// One lock per sandbox for its slots and its start/stop.
    locks: HashMap<String, Arc<Mutex<()>>>,
}

/// The server.
pub struct Server {
    pub cfg: Config,
    pub artifacts: Artifacts,
    pub image_store: PathBuf,
    store: Store,
    state: Mutex<State>,
    /// Prometheus metrics.
    pub metrics: Arc<super::metrics::Metrics>,
    /// Container events (GetContainerEvents).
    pub events: super::events::EventBus,
    /// VMMs started ahead of sandboxes (`[sandbox] standby_vmms`).
    pub pool: Arc<crate::pod::pool::Pool>,
    /// Copies of host paths in sandboxes, by (sandbox id, host path): what was
    /// last sent of each.
    copies: Mutex<HashMap<(String, String), CopyState>>,
    /// Per sandbox: held while one of its copies is packed and sent.
    copy_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Per sandbox whose guest its liveness watch declared dead: the verdict,
    /// recorded before the VMM is killed, so that the container's exit watch and
    /// the VMM watcher, whichever sees the end first, both say why.
    verdicts: Arc<Mutex<HashMap<String, String>>>,
    /// Held for the server's life: one server per state directory.
    _lock: std::fs::File,
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another atoll-cri uses the state directory {0}; stop it first")]
    Locked(PathBuf),
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("state_dir", &self.cfg.state_dir)
            .finish_non_exhaustive()
    }
}

/// What a container runs, merged from its image and the CRI config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: String,
}

/// Merges the image's config with the container config as the CRI says: `command`
/// replaces the image's entrypoint (and its cmd), `args` replace its cmd; envs
/// override by name; the working dir and user replace the image's.
pub fn merge_process(
    img: &atoll_image::oci::convert::GuestConfig,
    command: &[String],
    args: &[String],
    envs: &[(String, String)],
    working_dir: &str,
    user: Option<String>,
) -> CriResult<Process> {
    let argv: Vec<String> = if !command.is_empty() {
        command.iter().chain(args).cloned().collect()
    } else {
        let cmd = if args.is_empty() { &img.cmd } else { args };
        img.entrypoint.iter().chain(cmd).cloned().collect()
    };
    if argv.is_empty() {
        return Err(CriError::InvalidArgument(
            "the container has no command: its image sets no entrypoint or cmd, and the config no command or args".into(),
        ));
    }
    let mut env = img.env.clone();
    for (k, v) in envs {
        if k.is_empty() || k.contains('=') {
            return Err(CriError::InvalidArgument(format!(
                "envs: {k:?} is not a variable name"
            )));
        }
        env.retain(|e| e.split_once('=').map(|(n, _)| n) != Some(k.as_str()));
        env.push(format!("{k}={v}"));
    }
    let cwd = if working_dir.is_empty() {
        img.working_dir.clone()
    } else {
        working_dir.to_owned()
    };
    Ok(Process {
        args: argv,
        env,
        cwd: if cwd.is_empty() { "/".into() } else { cwd },
        user: user.unwrap_or_else(|| img.user.clone()),
    })
}

/// How a sandbox asks to be made.
#[derive(Debug, Clone, Default)]
pub struct SandboxRequest {
    pub meta: Meta,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub hostname: String,
    pub log_directory: String,
    pub runtime_handler: String,
    pub memory_bytes: i64,
    pub cpu_quota: i64,
    pub cpu_period: i64,
    /// The pod uses the node's network (no CNI network of its own).
    pub host_network: bool,
    pub port_mappings: Vec<super::cni::PortMapping>,
    pub dns_servers: Vec<String>,
    pub dns_search: Vec<String>,
    pub dns_options: Vec<String>,
    /// The pod's sysctls, by name (applied in the guest, which is the pod's own).
    pub sysctls: BTreeMap<String, String>,
}

/// A pod's DNS config (the CRI's DNSConfig).
#[derive(Debug, Clone, Default)]
pub struct Dns {
    pub servers: Vec<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

/// What PodSandboxStats reports.
#[derive(Debug)]
pub struct SandboxStats {
    pub sandbox: SandboxRecord,
    /// The VMM's cgroup leaf (none without cgroups).
    pub usage: Option<crate::pod::confine::CgroupUsage>,
    /// The pod's `eth0` in its network namespace (none without a CNI network).
    pub network: Option<crate::pod::netns::IfaceCounters>,
    pub containers: Vec<(ContainerRecord, Option<v1::StatsReply>)>,
}

/// How a container asks to be made.
#[derive(Debug, Clone, Default)]
pub struct ContainerRequest {
    pub sandbox_id: String,
    pub meta: Meta,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
    pub working_dir: String,
    pub user: Option<String>,
    /// Groups beyond the user's own (the CRI's supplemental_groups: the pod's
    /// supplementalGroups and fsGroup).
    pub supplemental_groups: Vec<u32>,
    pub log_path: String,
    pub tty: bool,
    pub stdin: bool,
    pub stdin_once: bool,
    pub readonly_rootfs: bool,
    pub resources: v1::Resources,
    pub security: v1::Security,
    /// Host mounts, checked by the caller (kubelet's own files left out).
    pub mounts: Vec<HostMount>,
}

impl Server {
    /// A server over the records in `cfg.state_dir`; call [`Server::recover`] next.
    pub fn new(
        cfg: Config,
        artifacts: Artifacts,
        image_store: PathBuf,
    ) -> Result<Self, StartError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StartError::Io { path, source }
        };
        let store = Store::open(&cfg.state_dir).map_err(io(&cfg.state_dir))?;
        std::fs::create_dir_all(&cfg.run_dir).map_err(io(&cfg.run_dir))?;
        let lock_path = cfg.state_dir.join("lock");
        let lock = std::fs::File::create(&lock_path).map_err(io(&lock_path))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(StartError::Locked(cfg.state_dir.clone()))
            }
            Err(e) => return Err(io(&lock_path)(e.into())),
        }
        let pool = crate::pod::pool::Pool::new(
            cfg.sandbox.standby_vmms,
            cfg.run_dir.clone(),
            artifacts.vmm.clone(),
            crate::pod::confine::default_cgroup_root(),
        );
        Ok(Self {
            pool,
            cfg,
            artifacts,
            image_store,
            store,
            state: Mutex::new(State::default()),
            metrics: Arc::default(),
            events: super::events::EventBus::default(),
            copies: Mutex::new(HashMap::new()),
            copy_locks: Mutex::new(HashMap::new()),
            verdicts: Arc::new(Mutex::new(HashMap::new())),
            _lock: lock,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state of every sandbox and container (metrics).
    pub fn counts_by_state(&self) -> (Vec<SandboxState>, Vec<ContainerState>) {
        let st = self.state();
        (
            st.sandboxes.values().map(|s| s.state).collect(),
            st.containers.values().map(|c| c.state).collect(),
        )
    }

    fn sandbox_lock(&self, id: &str) -> Arc<Mutex<()>> {
        self.state().locks.entry(id.to_owned()).or_default().clone()
    }

    fn save_sandbox(&self, r: &SandboxRecord) {
        if let Err(e) = self.store.put_sandbox(r) {
            tracing::error!("{e}");
        }
    }

    fn save_container(&self, r: &ContainerRecord) {
        if let Err(e) = self.store.put_container(r) {
            tracing::error!("{e}");
        }
        self.events.record(r, now_ns());
    }

    /// Removes a container's record, and says so to event subscribers.
    fn forget_container(&self, id: &str, sandbox_id: &str) {
        self.store.delete_container(id);
        self.events.deleted(id, sandbox_id, now_ns());
    }

    /// Takes over what an earlier server left: half-made sandboxes are removed,
    /// running VMs adopted (their containers watched again), dead ones marked.
    pub fn recover(self: &Arc<Self>) {
        let swept = crate::pod::pool::sweep(&self.cfg.run_dir);
        if swept > 0 {
            tracing::info!("removed {swept} standby VMM(s) a previous server left");
        }
        let (sandboxes, containers) = self.store.load();
        let mut adopted = Vec::new();
        for mut s in sandboxes {
            match s.state {
                SandboxState::Creating => {
                    tracing::info!("removing sandbox {} left half-made", s.id);
                    kill_vmm(&s);
                    kill_unrecorded_vmm(&s.pod_dir);
                    remove_pod_dir(&s.pod_dir);
                    self.detach_network(&mut s);
                    self.store.delete_sandbox(&s.id);
                    for c in containers.iter().filter(|c| c.sandbox_id == s.id) {
                        self.store.delete_container(&c.id);
                    }
                    continue;
                }
                SandboxState::Ready if !store::vmm_alive(&s) => {
                    s.state = SandboxState::NotReady;
                    s.message = "its VM ended while atoll-cri was not running".into();
                    self.store
                        .keep_console(&s.id, &s.pod_dir.join("console.log"), &s.message);
                    remove_pod_dir(&s.pod_dir);
                    self.save_sandbox(&s);
                }
                SandboxState::Ready => adopted.push(s.id.clone()),
                SandboxState::NotReady => {}
            }
            self.state().sandboxes.insert(s.id.clone(), s);
        }
        for mut c in containers {
            let ready = self
                .state()
                .sandboxes
                .get(&c.sandbox_id)
                .map(|s| s.state == SandboxState::Ready);
            match ready {
                None => {
                    self.store.delete_container(&c.id);
                    continue;
                }
                Some(false)
                    if matches!(c.state, ContainerState::Running | ContainerState::Created) =>
                {
                    mark_lost(&mut c, VM_ENDED);
                    self.save_container(&c);
                }
                _ => {}
            }
            let running = ready == Some(true) && c.state == ContainerState::Running;
            let id = c.id.clone();
            self.state().containers.insert(id.clone(), c);
            if running {
                // The guest kept what the server that is gone did not take: take
                // its output over, then watch the exit again.
                let me = Arc::clone(self);
                std::thread::spawn(move || me.readopt_container(&id));
            }
        }
        if !adopted.is_empty() {
            tracing::info!("adopted {} running sandbox(es)", adopted.len());
        }
        // The template of a sandbox of the default size on a pod network, if one
        // is built already: the pool's VMMs preload it, so that the first
        // sandboxes after a (re)start find it prepared, not only those after the
        // first sandbox has told the pool which template to expect.
        let (vcpus, mem_mib) = self.cfg.sandbox_size(0, 0, 0);
        let spec = TemplateSpec {
            kernel: self.artifacts.kernel.clone(),
            initramfs: self.artifacts.initramfs.clone(),
            vmm: self.artifacts.vmm.clone(),
            vcpus,
            mem_mib,
            net: true,
        };
        if let Some(t) = template::find(&spec) {
            tracing::info!("standby VMMs preload template {}", t.dir.display());
            self.pool.expect(&t);
        }
        self.pool.fill();
    }

    /// Watches every ready sandbox's VMM; one that is gone turns its sandbox
    /// NotReady and its containers Exited within [`WATCH_EVERY`]. A guest that
    /// wedges keeps its VMM alive: each ready sandbox also has a liveness watch
    /// (`[sandbox] guest_timeout_secs`), which kills the VMM of a guest that stopped
    /// answering, and its verdict becomes the sandbox's message.
    pub fn spawn_watcher(self: &Arc<Self>) {
        let me = Arc::clone(self);
        let silence = Duration::from_secs(self.cfg.sandbox.guest_timeout_secs);
        std::thread::spawn(move || {
            let mut watches: HashMap<String, Liveness> = HashMap::new();
            loop {
                std::thread::sleep(WATCH_EVERY);
                let ready: Vec<SandboxRecord> = me
                    .state()
                    .sandboxes
                    .values()
                    .filter(|s| s.state == SandboxState::Ready)
                    .cloned()
                    .collect();
                watches.retain(|id, _| ready.iter().any(|s| &s.id == id));
                for s in ready {
                    if !store::vmm_alive(&s) {
                        watches.remove(&s.id);
                        me.vm_ended(&s.id);
                    } else if !silence.is_zero() && !watches.contains_key(&s.id) {
                        let verdicts = Arc::clone(&me.verdicts);
                        let id = s.id.clone();
                        let watch = Liveness::watch_pod(
                            PodHandle::for_dir(&s.pod_dir),
                            LIVENESS_PROBE_ID.to_owned(),
                            vmm_pidfd(&s),
                            LivenessConfig::within(silence),
                            move |v| {
                                if let Ok(mut m) = verdicts.lock() {
                                    m.insert(id, v.to_owned());
                                }
                            },
                        );
                        watches.insert(s.id.clone(), watch);
                    }
                }
            }
        });
    }

    /// Why the liveness watch of sandbox `id` killed its VM, if it did.
    fn verdict(&self, id: &str) -> Option<String> {
        self.verdicts.lock().ok()?.get(id).cloned()
    }

    /// What a container lost with its pod's VM says: the liveness verdict when
    /// there is one.
    fn lost_message(&self, sandbox_id: &str) -> String {
        match self.verdict(sandbox_id) {
            Some(v) => format!("its pod's VM ended: {v}"),
            None => VM_ENDED.to_owned(),
        }
    }

    /// The VM of a ready sandbox is gone without being stopped.
    fn vm_ended(&self, id: &str) {
        let pod_dir = self.state().sandboxes.get(id).map(|s| s.pod_dir.clone());
        // Kept (not taken) until the sandbox is removed: the container's exit
        // watch may read it after this.
        let why = self
            .verdict(id)
            .or_else(|| pod_dir.as_deref().and_then(vm_end_reason));
        let (sandbox, lost) = {
            let mut st = self.state();
            let Some(s) = st.sandboxes.get_mut(id) else {
                return;
            };
            if s.state != SandboxState::Ready {
                return;
            }
            s.state = SandboxState::NotReady;
            s.message = match &why {
                Some(line) => format!("its VM ended without being stopped: {line}"),
                None => "its VM ended without being stopped (killed, or the guest crashed)".into(),
            };
            let s = s.clone();
            let lost_message = match &why {
                Some(line) => format!("its pod's VM ended: {line}"),
                None => VM_ENDED.to_owned(),
            };
            let mut lost = Vec::new();
            for c in st.containers.values_mut().filter(|c| c.sandbox_id == id) {
                if matches!(c.state, ContainerState::Running | ContainerState::Created) {
                    mark_lost(c, &lost_message);
                    lost.push(c.clone());
                }
            }
            (s, lost)
        };
        match self
            .store
            .keep_console(id, &sandbox.pod_dir.join("console.log"), &sandbox.message)
        {
            Some(kept) => tracing::warn!(
                "sandbox {id}: {}; the end of its console is kept in {}",
                sandbox.message,
                kept.display()
            ),
            None => tracing::warn!("sandbox {id}: {}", sandbox.message),
        }
        self.save_sandbox(&sandbox);
        for c in &lost {
            self.save_container(c);
        }
        remove_pod_dir(&sandbox.pod_dir);
    }

    // ---- sandboxes ----

    /// RunPodSandbox.
    pub fn run_sandbox(self: &Arc<Self>, req: SandboxRequest) -> CriResult<String> {
        let m = &req.meta;
        if m.name.is_empty() || m.namespace.is_empty() || m.uid.is_empty() {
            return Err(CriError::InvalidArgument(
                "config.metadata needs a name, a namespace and a uid".into(),
            ));
        }
        if !self.cfg.serves_handler(&req.runtime_handler) {
            return Err(CriError::InvalidArgument(format!(
                "runtime handler {:?} is not served by atoll-cri (it serves {:?}); check the RuntimeClass's handler and runtime_handlers in the atoll-cri config",
                req.runtime_handler, self.cfg.runtime_handlers
            )));
        }
        let hostname = if req.hostname.is_empty() {
            m.name.clone()
        } else {
            req.hostname.clone()
        };
        let (vcpus, mem_mib) =
            self.cfg
                .sandbox_size(req.memory_bytes, req.cpu_quota, req.cpu_period);
        let id = new_id();
        let pod_dir = crate::pod::state::pods_dir(&self.cfg.run_dir).join(&id);
        let mut rec = SandboxRecord {
            id: id.clone(),
            meta: req.meta.clone(),
            labels: req.labels,
            annotations: req.annotations,
            runtime_handler: req.runtime_handler,
            log_directory: req.log_directory,
            hostname: hostname.clone(),
            created_ns: now_ns(),
            state: SandboxState::Creating,
            vcpus,
            mem_mib,
            pod_dir: pod_dir.clone(),
            vmm_pid: None,
            vmm_start: None,
            slots: (0..SLOTS)
                .map(|n| Slot {
                    drive_id: format!("slot{n}"),
                    image: None,
                })
                .collect(),
            message: String::new(),
            ips: Vec::new(),
            network: None,
        };
        {
            // The name is taken under the lock, before the slow part: concurrent
            // identical requests make one sandbox.
            let mut st = self.state();
            if let Some(other) = st.sandboxes.values().find(|s| s.meta == req.meta) {
                return Err(CriError::AlreadyExists(format!(
                    "a sandbox named {}/{} (uid {}, attempt {}) exists: {}",
                    m.namespace, m.name, m.uid, m.attempt, other.id
                )));
            }
            st.sandboxes.insert(id.clone(), rec.clone());
        }
        self.save_sandbox(&rec);
        let network = if req.host_network {
            Ok(None)
        } else {
            let dns = Dns {
                servers: req.dns_servers.clone(),
                search: req.dns_search.clone(),
                options: req.dns_options.clone(),
            };
            self.attach_network(&mut rec, &req.port_mappings, dns)
                .map(Some)
        };
        // The VMM's cgroup gets the pod's CPU limit (and its own share on top).
        let cpu = (req.cpu_quota > 0 && req.cpu_period > 0).then(|| {
            crate::pod::confine::CpuLimit::for_cpus(req.cpu_quota as f64 / req.cpu_period as f64)
        });
        let started = network.and_then(|n| self.start_vm(&rec, n, cpu, &req.sysctls));
        // The pool fills up again behind the sandbox, not during its start.
        self.pool.fill();
        let (pid, start) = match started {
            Ok(v) => v,
            Err(e) => {
                self.detach_network(&mut rec);
                self.state().sandboxes.remove(&id);
                self.store.delete_sandbox(&id);
                remove_pod_dir(&pod_dir);
                return Err(e);
            }
        };
        rec.vmm_pid = Some(pid);
        rec.vmm_start = start;
        rec.state = SandboxState::Ready;
        let kept = {
            let mut st = self.state();
            match st.sandboxes.get_mut(&id) {
                Some(r) => {
                    *r = rec.clone();
                    true
                }
                None => false,
            }
        };
        if !kept {
            // Removed while it started (RemovePodSandbox on an id it could not
            // know yet cannot happen; a shutdown can): stop what was started.
            kill_vmm(&rec);
            self.detach_network(&mut rec);
            remove_pod_dir(&pod_dir);
            return Err(CriError::Unavailable("atoll-cri is shutting down".into()));
        }
        self.save_sandbox(&rec);
        tracing::info!(
            "sandbox {id} ({}/{}) ready: {vcpus} vCPU, {mem_mib} MiB",
            m.namespace,
            m.name
        );
        Ok(id)
    }

    /// Gives the sandbox a network namespace attached through CNI, with the VM's
    /// tap joined to its interface; what the guest's `eth0` gets. The attachment
    /// is recorded before the plugins run, so that a crash part-way is undone by
    /// the next start ([`Self::recover`]).
    fn attach_network(
        &self,
        rec: &mut SandboxRecord,
        port_mappings: &[cni::PortMapping],
        dns: Dns,
    ) -> CriResult<PodNetwork> {
        let list = cni::NetworkList::load(&self.cfg.cni.conf_dir).map_err(|e| {
            CriError::FailedPrecondition(format!(
                "the pod network is not ready: {e}; install a CNI network list there (or set [cni] conf_dir in the atoll-cri config)"
            ))
        })?;
        let netns = self.cfg.run_dir.join("netns").join(&rec.id);
        rec.network = Some(NetworkRecord {
            netns: netns.clone(),
            result: None,
            port_mappings: port_mappings.to_vec(),
        });
        self.save_sandbox(rec);
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            CriError::Internal(clean_message(&format!("{what}: {e}")))
        };
        let ns = NetNs::create(&netns).map_err(|e| fail("the pod network", &e))?;
        let att = self.attachment(rec);
        let result = cni::add(&self.cfg.cni.bin_dirs, &list, &att)
            .map_err(|e| fail("the pod network", &e))?;
        if let Some(n) = rec.network.as_mut() {
            n.result = Some(result.clone());
        }
        let addresses = cni::addresses(&result);
        rec.ips = addresses.iter().map(|(a, _)| a.clone()).collect();
        self.save_sandbox(rec);
        if addresses.is_empty() {
            return Err(CriError::Internal(format!(
                "the CNI network {} gave the pod no address",
                list.name
            )));
        }
        ns.join_tap(cni::IFNAME)
            .map_err(|e| fail("the pod network", &e))?;
        let (mtu, mac) = ns
            .run_in(|| {
                (
                    crate::pod::net::link_mtu(cni::IFNAME),
                    crate::pod::net::link_mac(cni::IFNAME),
                )
            })
            .map_err(|e| fail("the pod network", &e))?;
        let mtu = mtu.unwrap_or(1500);
        let mac = mac.map_err(|e| fail("the pod network", &e))?;
        let mut routes = cni::routes(&result);
        // A route without a gateway goes through the address's own gateway.
        let gateway = addresses
            .iter()
            .find_map(|(_, g)| g.clone())
            .unwrap_or_default();
        for r in &mut routes {
            if r.1.is_empty() && !r.0.contains(':') {
                r.1 = gateway.clone();
            }
        }
        Ok(PodNetwork {
            netns,
            tap: crate::pod::netns::POD_TAP.into(),
            mac,
            addresses: rec.ips.clone(),
            routes,
            mtu,
            dns_servers: dns.servers,
            dns_search: dns.search,
            dns_options: dns.options,
        })
    }

    /// What the CNI plugins are told about the sandbox.
    fn attachment(&self, rec: &SandboxRecord) -> cni::Attachment {
        let n = rec.network.as_ref();
        cni::Attachment {
            container_id: rec.id.clone(),
            netns: n.map(|n| n.netns.clone()).unwrap_or_default(),
            args: vec![
                ("K8S_POD_NAMESPACE".into(), rec.meta.namespace.clone()),
                ("K8S_POD_NAME".into(), rec.meta.name.clone()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), rec.id.clone()),
                ("K8S_POD_UID".into(), rec.meta.uid.clone()),
            ],
            port_mappings: n.map(|n| n.port_mappings.clone()).unwrap_or_default(),
        }
    }

    /// Detaches the sandbox from its network (CNI DEL, given the ADD result) and
    /// removes its namespace; idempotent, and a failing plugin is logged, not
    /// fatal (kubelet retries StopPodSandbox only while it errs).
    fn detach_network(&self, rec: &mut SandboxRecord) {
        let Some(n) = rec.network.clone() else {
            return;
        };
        match cni::NetworkList::load(&self.cfg.cni.conf_dir) {
            Ok(list) => {
                let att = self.attachment(rec);
                if let Err(e) = cni::del(&self.cfg.cni.bin_dirs, &list, &att, n.result.as_ref()) {
                    tracing::warn!("sandbox {}: detaching its network: {e}", rec.id);
                }
            }
            Err(e) => tracing::warn!(
                "sandbox {}: cannot detach its network through CNI: {e}",
                rec.id
            ),
        }
        NetNs::remove(&n.netns);
        rec.network = None;
        if self.state().sandboxes.contains_key(&rec.id) {
            self.save_sandbox(rec);
        }
    }

    /// Starts the sandbox's VM (a template clone) on `network`; its VMM's pid and
    /// start time.
    fn start_vm(
        &self,
        rec: &SandboxRecord,
        network: Option<PodNetwork>,
        cpu: Option<crate::pod::confine::CpuLimit>,
        sysctls: &BTreeMap<String, String>,
    ) -> CriResult<(u32, Option<u64>)> {
        let a = &self.artifacts;
        let mut cfg = PodConfig::new(
            &rec.id,
            a.kernel.clone(),
            a.initramfs.clone(),
            a.vmm.clone(),
        );
        cfg.name = rec.meta.name.clone();
        cfg.vcpus = rec.vcpus;
        cfg.mem_mib = rec.mem_mib;
        cfg.run_dir = self.cfg.run_dir.clone();
        cfg.api = true;
        cfg.detached = true;
        cfg.cpu_limit = cpu;
        cfg.pool = Some(Arc::clone(&self.pool));
        cfg.agent_timeout = Duration::from_secs(self.cfg.agent_timeout_secs);
        cfg.hostname = crate::pod::net::valid_hostname(&rec.hostname).then(|| rec.hostname.clone());
        cfg.sysctls = sysctls
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(n) = network {
            cfg.tap = Some(crate::pod::Tap {
                name: n.tap.clone(),
                mac: None,
            });
            cfg.network = Some(n);
        }
        let spec = TemplateSpec::for_pod(&cfg);
        let pod = template::start_pod(cfg, &spec).map_err(|e| pod_start_error(&e))?;
        let dir = pod.dir().to_owned();
        let Some(detached) = pod.detach() else {
            return Err(CriError::Internal("the pod VM ended as it started".into()));
        };
        let mut detached = detached;
        if let Err(e) = std::fs::File::create(dir.join(EMPTY_DISK)) {
            let _ = detached.vmm.kill();
            let _ = detached.vmm.wait();
            return Err(CriError::Internal(format!("{}: {e}", dir.display())));
        }
        let pid = detached.vmm.id();
        let start = store::process_start(pid);
        let mut child = detached.vmm;
        // Reaps the VMM when it ends (the watcher notices that it is gone).
        std::thread::spawn(move || {
            let _ = child.wait();
            if let Some(t) = detached.console {
                let _ = t.join();
            }
        });
        Ok((pid, start))
    }

    /// StopPodSandbox: idempotent; the network goes too (also of a sandbox whose
    /// VM died).
    pub fn stop_sandbox(&self, id: &str) -> CriResult<()> {
        let lock = self.sandbox_lock(id);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (mut rec, stopped) = {
            let mut st = self.state();
            let Some(s) = st.sandboxes.get_mut(id) else {
                return Ok(());
            };
            if s.state != SandboxState::Ready {
                let mut rec = s.clone();
                drop(st);
                self.detach_network(&mut rec);
                if let Some(s) = self.state().sandboxes.get_mut(id) {
                    s.network = None;
                }
                return Ok(());
            }
            s.state = SandboxState::NotReady;
            for slot in &mut s.slots {
                slot.image = None;
            }
            let rec = s.clone();
            let mut stopped = Vec::new();
            for c in st.containers.values_mut().filter(|c| c.sandbox_id == id) {
                match c.state {
                    ContainerState::Running => {
                        c.state = ContainerState::Exited;
                        c.finished_ns = now_ns();
                        c.exit_code = 137;
                        c.reason = "Error".into();
                        c.message = "killed when its pod stopped".into();
                        stopped.push(c.clone());
                    }
                    ContainerState::Created => {
                        c.state = ContainerState::Exited;
                        c.finished_ns = now_ns();
                        c.exit_code = 0;
                        c.reason = "Error".into();
                        c.message = "never started: its pod stopped".into();
                        stopped.push(c.clone());
                    }
                    _ => {}
                }
            }
            (rec, stopped)
        };
        self.save_sandbox(&rec);
        for c in &stopped {
            self.save_container(c);
        }
        shutdown_vm(&rec);
        remove_pod_dir(&rec.pod_dir);
        self.detach_network(&mut rec);
        if let Some(s) = self.state().sandboxes.get_mut(id) {
            s.network = None;
        }
        tracing::info!("sandbox {id} stopped");
        Ok(())
    }

    /// RemovePodSandbox: stops it first if it runs; idempotent.
    pub fn remove_sandbox(&self, id: &str) -> CriResult<()> {
        self.stop_sandbox(id)?;
        let containers: Vec<String> = {
            let mut st = self.state();
            if st.sandboxes.remove(id).is_none() {
                return Ok(());
            }
            st.locks.remove(id);
            let ids: Vec<String> = st
                .containers
                .values()
                .filter(|c| c.sandbox_id == id)
                .map(|c| c.id.clone())
                .collect();
            for c in &ids {
                st.containers.remove(c);
                st.logs.remove(c);
            }
            ids
        };
        for c in &containers {
            self.forget_container(c, id);
        }
        if let Ok(mut v) = self.verdicts.lock() {
            v.remove(id);
        }
        self.store.delete_sandbox(id);
        Ok(())
    }

    /// The kept console of sandbox `id` whose VM ended unasked, if any.
    pub fn kept_console(&self, id: &str) -> Option<PathBuf> {
        Some(self.store.console_path(id)).filter(|p| p.is_file())
    }

    /// One sandbox.
    pub fn sandbox(&self, id: &str) -> CriResult<SandboxRecord> {
        self.state()
            .sandboxes
            .get(id)
            .filter(|s| s.state != SandboxState::Creating)
            .cloned()
            .ok_or_else(|| CriError::NotFound(format!("no sandbox {id:?}")))
    }

    /// Every sandbox (not those still being made).
    pub fn sandboxes(&self) -> Vec<SandboxRecord> {
        let mut v: Vec<SandboxRecord> = self
            .state()
            .sandboxes
            .values()
            .filter(|s| s.state != SandboxState::Creating)
            .cloned()
            .collect();
        v.sort_by_key(|s| s.created_ns);
        v
    }

    // ---- containers ----

    /// CreateContainer.
    pub fn create_container(self: &Arc<Self>, req: ContainerRequest) -> CriResult<String> {
        if req.meta.name.is_empty() {
            return Err(CriError::InvalidArgument(
                "config.metadata.name is required".into(),
            ));
        }
        if req.image.is_empty() {
            return Err(CriError::InvalidArgument(
                "config.image.image is required".into(),
            ));
        }
        // One create at a time per sandbox, from the name check on: a retried
        // request (kubelet's own timeout) finds the first one's container.
        let lock = self.sandbox_lock(&req.sandbox_id);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        let sandbox = self.sandbox(&req.sandbox_id)?;
        if sandbox.state != SandboxState::Ready {
            return Err(CriError::FailedPrecondition(format!(
                "sandbox {} is not ready",
                req.sandbox_id
            )));
        }
        {
            let st = self.state();
            if let Some(c) = st.containers.values().find(|c| {
                c.sandbox_id == req.sandbox_id
                    && c.meta.name == req.meta.name
                    && c.meta.attempt == req.meta.attempt
            }) {
                return Err(CriError::AlreadyExists(format!(
                    "container {:?} (attempt {}) exists in sandbox {}: {}",
                    req.meta.name, req.meta.attempt, req.sandbox_id, c.id
                )));
            }
        }
        // The image, converted once (cached in the store).
        let store = ImageStore::open(&self.image_store)
            .map_err(|e| CriError::Internal(format!("the image store: {e}")))?;
        let (name, digest) = store.resolve(&req.image).map_err(|_| {
            CriError::NotFound(format!(
                "image {:?} is not on this node: pull it first",
                req.image
            ))
        })?;
        let prepared = image::prepare(&self.image_store, &name, RootfsFrom::Auto)
            .map_err(|e| CriError::Internal(clean_message(&format!("image {name}: {e}"))))?;
        let process = merge_process(
            &prepared.config,
            &req.command,
            &req.args,
            &req.envs,
            &req.working_dir,
            req.user.clone(),
        )?;
        let image_id = format!("sha256:{}", digest.hex());
        let image_ref = repo_digest(&name, &digest.to_string());
        let id = new_id();
        let log_path = if req.log_path.is_empty() || sandbox.log_directory.is_empty() {
            String::new()
        } else {
            Path::new(&sandbox.log_directory)
                .join(&req.log_path)
                .display()
                .to_string()
        };

        // Image volumes on slots of the VM first, then the host mounts' copies, then
        // the root's image: whatever fails gives back the slots taken for it.
        let mut volume_serials = BTreeMap::new();
        let mut attached = Vec::new();
        let release = |attached: &[usize]| {
            for &n in attached {
                self.release_slot(&req.sandbox_id, n);
            }
        };
        for m in req.mounts.iter().filter(|m| !m.image.is_empty()) {
            if volume_serials.contains_key(&m.image) {
                continue;
            }
            match self.attach_volume_image(&req.sandbox_id, &m.image) {
                Ok((slot, now, serial)) => {
                    if now {
                        attached.push(slot);
                    }
                    volume_serials.insert(m.image.clone(), serial);
                }
                Err(e) => {
                    release(&attached);
                    return Err(e);
                }
            }
        }
        let mounts = match self.guest_mounts(&sandbox, &req.mounts, &volume_serials) {
            Ok(m) => m,
            Err(e) => {
                release(&attached);
                return Err(e);
            }
        };
        let sandbox = self.sandbox(&req.sandbox_id)?;
        let (slot, attached_now) = match self.attach_image(&sandbox, &image_id, &prepared.rootfs) {
            Ok(v) => v,
            Err(e) => {
                release(&attached);
                return Err(e);
            }
        };
        if attached_now {
            attached.push(slot);
        }
        let serial = self.sandbox(&req.sandbox_id)?.slots[slot].drive_id.clone();
        let rootfs_source = match &prepared.rootfs {
            ImageRootfs::Erofs(_) => v1::rootfs::Source::Block(v1::BlockImage {
                serial: serial.clone(),
                fs_type: "erofs".into(),
            }),
            ImageRootfs::Layers(disk) => {
                let mut r = disk.request();
                r.serial = serial.clone();
                v1::rootfs::Source::Layers(r)
            }
        };
        let create = v1::CreateContainer {
            id: id.clone(),
            rootfs: Some(v1::Rootfs {
                source: Some(rootfs_source),
                readonly: req.readonly_rootfs,
            }),
            process: Some(v1::Process {
                args: process.args.clone(),
                env: process.env.clone(),
                cwd: process.cwd.clone(),
                user: process.user.clone(),
                terminal: req.tty,
                stdin: req.stdin,
                rows: if req.tty { 24 } else { 0 },
                cols: if req.tty { 80 } else { 0 },
                rlimits: Vec::new(),
                additional_gids: req.supplemental_groups.clone(),
            }),
            hostname: sandbox.hostname.clone(),
            mounts,
            resources: Some(req.resources),
            security: Some(req.security.clone()),
        };
        let created = agent(&sandbox).and_then(|mut c| {
            c.create(create)
                .map_err(|e| agent_error("creating the container in the guest", &e))
        });
        if let Err(e) = created {
            release(&attached);
            return Err(e);
        }
        let rec = ContainerRecord {
            id: id.clone(),
            sandbox_id: req.sandbox_id.clone(),
            meta: req.meta,
            labels: req.labels,
            annotations: req.annotations,
            image: req.image,
            image_id,
            image_ref,
            serial,
            log_path,
            tty: req.tty,
            stdin: req.stdin,
            stdin_once: req.stdin_once,
            env: process.env,
            cwd: process.cwd,
            user: process.user,
            created_ns: now_ns(),
            started_ns: 0,
            finished_ns: 0,
            exit_code: 0,
            state: ContainerState::Created,
            reason: String::new(),
            message: String::new(),
            mounts: req.mounts,
            volume_serials: volume_serials.into_values().collect(),
        };
        self.state().containers.insert(id.clone(), rec.clone());
        self.save_container(&rec);
        Ok(id)
    }

    /// The guest's mounts for a container's host mounts: an emptyDir becomes a pod
    /// tmpfs volume (one per host directory, shared by the pod's containers as on
    /// the node, though the node does not see its files); anything else (read-only,
    /// checked by the caller) is copied into the guest (`pod::volume`) and bound
    /// read-only. A copy reflects the host path when the container is created.
    fn guest_mounts(
        &self,
        sandbox: &SandboxRecord,
        mounts: &[HostMount],
        image_serials: &BTreeMap<String, String>,
    ) -> CriResult<Vec<v1::Mount>> {
        let mut out = Vec::with_capacity(mounts.len());
        for m in mounts {
            if !m.image.is_empty() {
                let serial = image_serials.get(&m.image).ok_or_else(|| {
                    CriError::Internal(format!("image volume {} has no disk", m.image))
                })?;
                out.push(v1::Mount {
                    destination: m.container_path.clone(),
                    r#type: "bind".into(),
                    source: format!("disk:{serial}"),
                    options: vec!["ro".to_owned()],
                });
                continue;
            }
            let ro = if m.readonly {
                vec!["ro".to_owned()]
            } else {
                Vec::new()
            };
            if m.is_empty_dir() {
                let digest = Sha256::digest(m.host_path.as_bytes());
                out.push(v1::Mount {
                    destination: m.container_path.clone(),
                    r#type: "tmpfs".into(),
                    source: format!("e-{}", hex::encode(&digest[..16])),
                    options: ro,
                });
                continue;
            }
            let (name, is_file) = self.sync_copy(sandbox, &m.host_path).map_err(|e| match e {
                CriError::InvalidArgument(why) => {
                    CriError::InvalidArgument(format!("mounts: {}: {why}", m.container_path))
                }
                other => other,
            })?;
            out.push(v1::Mount {
                destination: m.container_path.clone(),
                r#type: "bind".into(),
                source: volume::mount_source(&name, is_file),
                options: ro,
            });
        }
        Ok(out)
    }

    /// Brings the sandbox's copy of `host_path` up to date: nothing when its
    /// fingerprint is what was sent last, else packed and, if its content differs,
    /// sent (the guest updates the copy in place). Returns the copy's name and
    /// whether it is a file.
    fn sync_copy(&self, sandbox: &SandboxRecord, host_path: &str) -> CriResult<(String, bool)> {
        let path = Path::new(host_path);
        let name = volume::copy_name(path);
        // One sync at a time per sandbox (the pack and the send take a while);
        // other sandboxes' syncs and the map itself are not held up by it.
        let lock = self.copy_lock(&sandbox.id);
        let _syncing = lock.lock().unwrap_or_else(|p| p.into_inner());
        let key = (sandbox.id.clone(), host_path.to_owned());
        let print =
            volume::fingerprint(path).map_err(|e| CriError::InvalidArgument(e.to_string()))?;
        let known = self
            .copies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .map(|c| (c.fingerprint, c.digest, c.is_file));
        if let Some((_, _, is_file)) = known.filter(|(f, _, _)| *f == print) {
            return Ok((name, is_file));
        }
        let mut tar = tempfile::tempfile_in(&self.cfg.run_dir)
            .map_err(|e| CriError::Internal(format!("a temporary file: {e}")))?;
        let packed =
            volume::pack(path, &mut tar).map_err(|e| CriError::InvalidArgument(e.to_string()))?;
        let unchanged = known.is_some_and(|(_, digest, _)| digest == packed.digest);
        if !unchanged {
            volume::send(
                &sandbox.pod_dir.join("vsock.sock"),
                &name,
                &packed,
                &mut tar,
            )
            .map_err(|e| {
                CriError::Unavailable(clean_message(&format!(
                    "copying {host_path} into sandbox {}: {e}",
                    sandbox.id
                )))
            })?;
        }
        self.copies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                key,
                CopyState {
                    fingerprint: print,
                    digest: packed.digest,
                    is_file: packed.is_file,
                    failed: None,
                },
            );
        Ok((name, packed.is_file))
    }

    /// The lock that keeps a sandbox's copies to one sync at a time.
    fn copy_lock(&self, sandbox_id: &str) -> Arc<Mutex<()>> {
        let mut locks = self.copy_locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(sandbox_id.to_owned()).or_default())
    }

    /// Keeps the copies of host directories that running containers mount up to
    /// date with the node, every [`VOLUME_SYNC_EVERY`] (what kubelet's ConfigMap,
    /// Secret and projected-token updates need). A copied file is not updated: a
    /// bind mount of a file holds its inode, as a subPath mount does on a node.
    pub fn spawn_volume_sync(self: &Arc<Self>) {
        let me = Arc::clone(self);
        std::thread::spawn(move || loop {
            std::thread::sleep(VOLUME_SYNC_EVERY);
            me.sync_copies();
        });
    }

    fn sync_copies(&self) {
        let work: std::collections::BTreeSet<(String, String)> = {
            let st = self.state();
            st.containers
                .values()
                .filter(|c| matches!(c.state, ContainerState::Created | ContainerState::Running))
                .filter(|c| {
                    st.sandboxes
                        .get(&c.sandbox_id)
                        .is_some_and(|s| s.state == SandboxState::Ready)
                })
                .flat_map(|c| {
                    c.mounts
                        .iter()
                        .filter(|m| !m.is_empty_dir())
                        .map(|m| (c.sandbox_id.clone(), m.host_path.clone()))
                })
                .collect()
        };
        for (sandbox_id, host_path) in &work {
            let Ok(sandbox) = self.sandbox(sandbox_id) else {
                continue;
            };
            if !Path::new(host_path).is_dir() {
                continue;
            }
            if let Err(e) = self.sync_copy(&sandbox, host_path) {
                let why = e.to_string();
                let mut copies = self.copies.lock().unwrap_or_else(|p| p.into_inner());
                let known = copies.get_mut(&(sandbox_id.clone(), host_path.clone()));
                if known
                    .as_ref()
                    .is_none_or(|c| c.failed.as_deref() != Some(why.as_str()))
                {
                    tracing::warn!(
                        "sandbox {sandbox_id}: cannot update the copy of {host_path}: {why}"
                    );
                }
                if let Some(c) = known {
                    c.failed = Some(why);
                }
            }
        }
        // Forget what no running container mounts any more, and the locks of
        // sandboxes that are gone.
        self.copies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| work.contains(k));
        let live: std::collections::HashSet<String> =
            self.state().sandboxes.keys().cloned().collect();
        self.copy_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| live.contains(id));
    }

    /// The slot holding image `image_id` in the sandbox, attaching it to a free
    /// slot first if none does. Called with the sandbox's lock held.
    fn attach_image(
        &self,
        sandbox: &SandboxRecord,
        image_id: &str,
        rootfs: &ImageRootfs,
    ) -> CriResult<(usize, bool)> {
        if let Some(n) = sandbox
            .slots
            .iter()
            .position(|s| s.image.as_deref() == Some(image_id))
        {
            return Ok((n, false));
        }
        let Some(n) = sandbox.slots.iter().position(|s| s.image.is_none()) else {
            return Err(CriError::ResourceExhausted(format!(
                "the pod's VM has {SLOTS} image slots and all hold other images: remove containers of another image first"
            )));
        };
        let hex = image_id.trim_start_matches("sha256:");
        // A new id each time: the guest must never take it for a disk it has seen.
        let serial = format!("i{}-{}", &hex[..hex.len().min(8)], &new_id()[..8]);
        let path = match rootfs {
            ImageRootfs::Erofs(p) => p.clone(),
            ImageRootfs::Layers(disk) => {
                let p = sandbox.pod_dir.join(format!("{serial}.layers"));
                disk.write(&p)
                    .map_err(|e| CriError::Internal(format!("writing the layers disk: {e}")))?;
                p
            }
        };
        let body = serde_json::json!({"path_on_host": path, "id": serial}).to_string();
        template::api_call(
            &sandbox.pod_dir.join(API_SOCK),
            "PATCH",
            &format!("/drives/{}", sandbox.slots[n].drive_id),
            &body,
        )
        .map_err(|e| {
            CriError::Unavailable(clean_message(&format!(
                "attaching the image to the pod's VM: {e}"
            )))
        })?;
        let rec = {
            let mut st = self.state();
            let s = st
                .sandboxes
                .get_mut(&sandbox.id)
                .ok_or_else(|| CriError::NotFound(format!("no sandbox {:?}", sandbox.id)))?;
            s.slots[n] = Slot {
                drive_id: serial,
                image: Some(image_id.to_owned()),
            };
            s.clone()
        };
        self.save_sandbox(&rec);
        Ok((n, true))
    }

    /// An image volume's image on a slot of the sandbox's VM (the slot its
    /// containers' roots use, if it has one): the slot, whether it was attached
    /// now, and the disk's serial.
    fn attach_volume_image(
        &self,
        sandbox_id: &str,
        image: &str,
    ) -> CriResult<(usize, bool, String)> {
        let store = ImageStore::open(&self.image_store)
            .map_err(|e| CriError::Internal(format!("the image store: {e}")))?;
        let (name, digest) = store.resolve(image).map_err(|_| {
            CriError::NotFound(format!(
                "image volume {image:?}: the image is not on this node: pull it first"
            ))
        })?;
        let prepared = image::prepare(&self.image_store, &name, RootfsFrom::Auto)
            .map_err(|e| CriError::Internal(clean_message(&format!("image {name}: {e}"))))?;
        if !matches!(prepared.rootfs, ImageRootfs::Erofs(_)) {
            return Err(CriError::FailedPrecondition(format!(
                "image volume {image:?}: mounting an image needs it as an erofs disk; install erofs-utils (mkfs.erofs) on the node"
            )));
        }
        let sandbox = self.sandbox(sandbox_id)?;
        let image_id = format!("sha256:{}", digest.hex());
        let (slot, now) = self.attach_image(&sandbox, &image_id, &prepared.rootfs)?;
        let serial = self.sandbox(sandbox_id)?.slots[slot].drive_id.clone();
        Ok((slot, now, serial))
    }

    /// Gives slot `n` its empty disk back once no container of the sandbox uses
    /// its image (the guest has unmounted it with the last one).
    fn release_slot(&self, sandbox_id: &str, n: usize) {
        let (sandbox, drive_id) = {
            let st = self.state();
            let Some(s) = st.sandboxes.get(sandbox_id) else {
                return;
            };
            let Some(slot) = s.slots.get(n) else { return };
            let in_use = st.containers.values().any(|c| {
                c.sandbox_id == sandbox_id
                    && (c.serial == slot.drive_id || c.volume_serials.contains(&slot.drive_id))
            });
            if in_use || slot.image.is_none() || s.state != SandboxState::Ready {
                return;
            }
            (s.clone(), slot.drive_id.clone())
        };
        let empty = sandbox.pod_dir.join(EMPTY_DISK);
        let body = serde_json::json!({"path_on_host": empty, "id": format!("slot{n}")}).to_string();
        match template::api_call(
            &sandbox.pod_dir.join(API_SOCK),
            "PATCH",
            &format!("/drives/{drive_id}"),
            &body,
        ) {
            Ok(_) => {
                let _ = std::fs::remove_file(sandbox.pod_dir.join(format!("{drive_id}.layers")));
                let rec = {
                    let mut st = self.state();
                    let Some(s) = st.sandboxes.get_mut(sandbox_id) else {
                        return;
                    };
                    s.slots[n] = Slot {
                        drive_id: format!("slot{n}"),
                        image: None,
                    };
                    s.clone()
                };
                self.save_sandbox(&rec);
            }
            Err(e) => tracing::warn!("sandbox {sandbox_id}: cannot release slot {n}: {e}"),
        }
    }

    /// One container.
    pub fn container(&self, id: &str) -> CriResult<ContainerRecord> {
        self.state()
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| CriError::NotFound(format!("no container {id:?}")))
    }

    /// Every container.
    pub fn containers(&self) -> Vec<ContainerRecord> {
        let mut v: Vec<ContainerRecord> = self.state().containers.values().cloned().collect();
        v.sort_by_key(|c| c.created_ns);
        v
    }

    fn update_container(
        &self,
        id: &str,
        f: impl FnOnce(&mut ContainerRecord),
    ) -> Option<ContainerRecord> {
        let rec = {
            let mut st = self.state();
            let c = st.containers.get_mut(id)?;
            f(c);
            c.clone()
        };
        self.save_container(&rec);
        Some(rec)
    }

    /// StartContainer: its output goes to its log; its exit is watched.
    pub fn start_container(self: &Arc<Self>, id: &str) -> CriResult<()> {
        let c = self.container(id)?;
        if c.state != ContainerState::Created {
            return Err(CriError::FailedPrecondition(format!(
                "container {id} is {:?}, not created",
                c.state
            )));
        }
        let sandbox = self.sandbox(&c.sandbox_id)?;
        if sandbox.state != SandboxState::Ready {
            return Err(CriError::FailedPrecondition(format!(
                "sandbox {} is not ready",
                c.sandbox_id
            )));
        }
        let (pumps, log, hub) = self.copy_stdio(&c, &sandbox, false)?;
        let started = agent(&sandbox).and_then(|mut a| {
            a.start(id)
                .map_err(|e| agent_error("starting the container in the guest", &e))
        });
        if let Err(e) = started {
            self.update_container(id, |c| {
                c.state = ContainerState::Exited;
                c.started_ns = now_ns();
                c.finished_ns = now_ns();
                c.exit_code = 128;
                c.reason = "StartError".into();
                c.message = e.to_string();
            });
            return Err(e);
        }
        self.update_container(id, |c| {
            c.state = ContainerState::Running;
            c.started_ns = now_ns();
        });
        if let Some(l) = log {
            self.state().logs.insert(id.to_owned(), l);
        }
        self.state().hubs.insert(id.to_owned(), Arc::clone(&hub));
        let me = Arc::clone(self);
        let cid = id.to_owned();
        std::thread::spawn(move || me.wait_exit(&cid, pumps));
        Ok(())
    }

    /// Attaches the container's output (and holds its stdin) and copies the
    /// output to its CRI log and its attach hub. `again`: a restarted server
    /// taking over from the one that attached at start (the guest kept the output
    /// it could not deliver; the stdin went with that server).
    fn copy_stdio(
        &self,
        c: &ContainerRecord,
        sandbox: &SandboxRecord,
        again: bool,
    ) -> CriResult<CopiedStdio> {
        let id = c.id.as_str();
        let log = if c.log_path.is_empty() {
            None
        } else {
            let f = LogFile::open(Path::new(&c.log_path))
                .map_err(|e| CriError::Internal(format!("opening the container log: {e}")))?;
            Some(Arc::new(Mutex::new(f)))
        };
        let handle = PodHandle::for_dir(&sandbox.pod_dir);
        let streams: Vec<(v1::attach::Stream, logs::Stream)> = if c.tty {
            vec![(v1::attach::Stream::Tty, logs::Stream::Stdout)]
        } else {
            vec![
                (v1::attach::Stream::Stdout, logs::Stream::Stdout),
                (v1::attach::Stream::Stderr, logs::Stream::Stderr),
            ]
        };
        let attach_err = |e: crate::agent::AttachError| {
            CriError::Unavailable(clean_message(&format!(
                "attaching to the container's stdio: {e}"
            )))
        };
        let mut outputs = Vec::new();
        for (s, out) in streams {
            // How much of the stream the log holds: from 0 for a new container; for
            // one taken over, what the previous server recorded, so the guest sends
            // again what that server read but did not log.
            let offset_path = logs::Offset::path(&sandbox.pod_dir, id, out);
            let (offset, resume_from) = match (&log, again) {
                (None, _) => (None, None),
                (Some(_), false) => (logs::Offset::create(&offset_path).ok(), None),
                (Some(_), true) => match logs::Offset::resume(&offset_path) {
                    Ok((o, n)) => (Some(o), Some(n)),
                    Err(_) => (logs::Offset::create(&offset_path).ok(), None),
                },
            };
            let attached =
                crate::agent::attach_kept(handle.vsock_path(), id, s, again, resume_from);
            outputs.push((attached.map_err(attach_err)?, out, offset));
        }
        // Its stdin is held from the start: attach sessions come and go.
        let stdin =
            match (c.stdin, c.tty) {
                (false, _) => None,
                (true, true) => Some(outputs[0].0.try_clone().map_err(|e| {
                    CriError::Internal(format!("cloning the terminal's socket: {e}"))
                })?),
                // A stdin pipe closed with the server that held it.
                (true, false) if again => None,
                (true, false) => Some(
                    handle
                        .attach(id, "", v1::attach::Stream::Stdin)
                        .map_err(attach_err)?,
                ),
            };
        let hub = Arc::new(Hub::new(stdin, c.stdin_once, c.tty));
        let mut pumps = Vec::new();
        for (stream, out, offset) in outputs {
            let log = log.clone();
            let mut tee = Tee {
                inner: stream,
                hub: Arc::clone(&hub),
                stream: out,
            };
            pumps.push(std::thread::spawn(move || match log {
                Some(l) => logs::copy(tee, out, &l, |n| {
                    if let Some(o) = &offset {
                        o.store(n);
                    }
                }),
                None => {
                    let _ = std::io::copy(&mut tee, &mut std::io::sink());
                }
            }));
        }
        Ok((pumps, log, hub))
    }

    /// A running container of an adopted sandbox: its output taken over (a
    /// container whose output cannot be is still watched for its exit).
    fn readopt_container(&self, id: &str) {
        let pumps = match self.container(id).and_then(|c| {
            let sandbox = self.sandbox(&c.sandbox_id)?;
            self.copy_stdio(&c, &sandbox, true)
        }) {
            Ok((pumps, log, hub)) => {
                let mut st = self.state();
                if let Some(l) = log {
                    st.logs.insert(id.to_owned(), l);
                }
                st.hubs.insert(id.to_owned(), hub);
                pumps
            }
            Err(e) => {
                tracing::warn!(container = id, "its output is lost after the restart: {e}");
                Vec::new()
            }
        };
        self.wait_exit(id, pumps);
    }

    /// Waits for the container's init to end, then for its output to be in the
    /// log, and records the exit.
    fn wait_exit(&self, id: &str, pumps: Vec<JoinHandle<()>>) {
        let Ok(c) = self.container(id) else { return };
        let Ok(sandbox) = self.sandbox(&c.sandbox_id) else {
            return;
        };
        // A connection that breaks while the VM runs (a slow or restarting agent) is
        // retried: the container is not reported exited on a guess.
        let waited = loop {
            let r = AgentClient::connect(&sandbox.pod_dir.join("vsock.sock"), AGENT_CONNECT)
                .and_then(|mut a| a.wait(id, ""));
            let retry = matches!(&r, Err(e) if e.code().is_none())
                && store::vmm_alive(&sandbox)
                && self
                    .container(id)
                    .is_ok_and(|c| c.state == ContainerState::Running);
            if !retry {
                break r;
            }
            std::thread::sleep(Duration::from_secs(1));
        };
        // The streams end with the process; a stuck one is not waited for long.
        let deadline = Instant::now() + Duration::from_secs(2);
        for p in pumps {
            while !p.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if p.is_finished() {
                let _ = p.join();
            }
        }
        self.state().logs.remove(id);
        if let Some(hub) = self.state().hubs.remove(id) {
            hub.end();
        }
        // The agent's connection failing usually means the VM is gone: say that.
        let vm_gone = waited.is_err() && {
            let deadline = Instant::now() + Duration::from_millis(500);
            loop {
                if !store::vmm_alive(&sandbox) {
                    break true;
                }
                if Instant::now() >= deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let lost = self.lost_message(&sandbox.id);
        self.update_container(id, |c| {
            if c.state != ContainerState::Running {
                return;
            }
            c.finished_ns = now_ns();
            c.state = ContainerState::Exited;
            match &waited {
                Ok(w) => {
                    c.exit_code = if w.signal > 0 {
                        128 + w.signal
                    } else {
                        w.status
                    };
                    c.reason = if w.oom_killed {
                        "OOMKilled"
                    } else if c.exit_code == 0 {
                        "Completed"
                    } else {
                        "Error"
                    }
                    .into();
                }
                Err(_) if vm_gone => mark_lost(c, &lost),
                Err(e) => {
                    c.exit_code = 255;
                    c.reason = "Error".into();
                    c.message = clean_message(&format!("lost the guest agent: {e}"));
                }
            }
        });
    }

    /// StopContainer: SIGTERM, SIGKILL after `timeout` seconds (0: at once);
    /// idempotent.
    /// UpdateContainerResources: new limits for a created or running container,
    /// written into its cgroup in the guest.
    pub fn update_resources(&self, id: &str, resources: v1::Resources) -> CriResult<()> {
        let c = self.container(id)?;
        if !matches!(c.state, ContainerState::Created | ContainerState::Running) {
            return Err(CriError::FailedPrecondition(format!(
                "container {id} has exited: its resources cannot change"
            )));
        }
        let sandbox = self.sandbox(&c.sandbox_id)?;
        agent(&sandbox)?
            .update_resources(id, resources)
            .map_err(|e| agent_error("updating the container's resources", &e))
    }

    pub fn stop_container(&self, id: &str, timeout: i64) -> CriResult<()> {
        let Ok(c) = self.container(id) else {
            return Ok(());
        };
        if c.state != ContainerState::Running {
            return Ok(());
        }
        let sandbox = self.sandbox(&c.sandbox_id)?;
        let handle = PodHandle::for_dir(&sandbox.pod_dir);
        let grace = Duration::from_secs(u64::try_from(timeout).unwrap_or(0));
        let stopped = if grace.is_zero() {
            agent(&sandbox).and_then(|mut a| match a.signal(id, "", libc::SIGKILL, true) {
                Ok(()) => Ok(()),
                Err(e) if e.code().is_some() => Ok(()),
                Err(e) => Err(agent_error("killing the container", &e)),
            })
        } else {
            handle
                .stop_container(id, grace)
                .map(|_| ())
                .map_err(|e| agent_error("stopping the container", &e))
        };
        stopped?;
        self.wait_recorded(id);
        Ok(())
    }

    /// Waits until the container's exit is recorded; records it if the guest
    /// never says.
    fn wait_recorded(&self, id: &str) {
        let deadline = Instant::now() + EXIT_RECORDED;
        while Instant::now() < deadline {
            match self.container(id) {
                Ok(c) if c.state == ContainerState::Running => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return,
            }
        }
        self.update_container(id, |c| {
            if c.state == ContainerState::Running {
                mark_lost(c, "its exit was not reported after it was killed");
            }
        });
    }

    /// RemoveContainer: kills it if it runs; idempotent.
    pub fn remove_container(&self, id: &str) -> CriResult<()> {
        let Ok(c) = self.container(id) else {
            return Ok(());
        };
        if c.state == ContainerState::Running {
            self.stop_container(id, 0)?;
        }
        if let Ok(sandbox) = self.sandbox(&c.sandbox_id) {
            if sandbox.state == SandboxState::Ready {
                let lock = self.sandbox_lock(&c.sandbox_id);
                let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
                match agent(&sandbox).and_then(|mut a| {
                    a.remove(id)
                        .map_err(|e| agent_error("removing the container in the guest", &e))
                }) {
                    Ok(()) | Err(CriError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
                {
                    let mut st = self.state();
                    st.containers.remove(id);
                    st.logs.remove(id);
                }
                for serial in std::iter::once(&c.serial).chain(&c.volume_serials) {
                    if let Some(n) = sandbox.slots.iter().position(|s| &s.drive_id == serial) {
                        self.release_slot(&c.sandbox_id, n);
                    }
                }
                self.forget_container(id, &c.sandbox_id);
                return Ok(());
            }
        }
        {
            let mut st = self.state();
            st.containers.remove(id);
            st.logs.remove(id);
        }
        self.forget_container(id, &c.sandbox_id);
        Ok(())
    }

    /// ReopenContainerLog.
    pub fn reopen_log(&self, id: &str) -> CriResult<()> {
        let c = self.container(id)?;
        if c.state != ContainerState::Running {
            return Err(CriError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let log = self.state().logs.get(id).cloned();
        match log {
            Some(l) => l
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .reopen()
                .map_err(|e| CriError::Internal(format!("reopening the log: {e}"))),
            None => Err(CriError::FailedPrecondition(format!(
                "container {id} has no log file"
            ))),
        }
    }

    /// A running container and its sandbox, for a new process in it.
    pub fn exec_target(&self, id: &str) -> CriResult<(ContainerRecord, SandboxRecord)> {
        let c = self.container(id)?;
        if c.state != ContainerState::Running {
            return Err(CriError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let sandbox = self.sandbox(&c.sandbox_id)?;
        Ok((c, sandbox))
    }

    /// A ready sandbox (port-forward).
    pub fn ready_sandbox(&self, id: &str) -> CriResult<SandboxRecord> {
        let s = self.sandbox(id)?;
        if s.state != SandboxState::Ready {
            return Err(CriError::FailedPrecondition(format!(
                "sandbox {id} is not ready"
            )));
        }
        Ok(s)
    }

    /// A running container's stdio, for Attach.
    pub fn attach_hub(&self, id: &str) -> CriResult<Arc<Hub>> {
        self.container(id)?;
        self.state()
            .hubs
            .get(id)
            .cloned()
            .ok_or_else(|| CriError::FailedPrecondition(format!("container {id} is not running")))
    }

    /// ExecSync: runs `cmd` in the container, returns its output and exit code;
    /// `timeout` seconds (0: none) after which it is killed and the call fails.
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: i64,
    ) -> CriResult<(Vec<u8>, Vec<u8>, i32)> {
        if cmd.is_empty() {
            return Err(CriError::InvalidArgument("cmd is empty".into()));
        }
        let c = self.container(id)?;
        if c.state != ContainerState::Running {
            return Err(CriError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let sandbox = self.sandbox(&c.sandbox_id)?;
        let handle = PodHandle::for_dir(&sandbox.pod_dir);
        let exec_id = format!("exec-{}", &new_id()[..16]);
        let mut control = agent(&sandbox)?;
        control
            .exec(v1::ExecProcess {
                container_id: id.to_owned(),
                exec_id: exec_id.clone(),
                process: Some(v1::Process {
                    args: cmd,
                    env: c.env.clone(),
                    cwd: c.cwd.clone(),
                    user: c.user.clone(),
                    ..Default::default()
                }),
            })
            .map_err(|e| agent_error("starting the command", &e))?;
        // From here on, whatever fails, the command is killed and reaped (the
        // agent then forgets it) and its output readers are cut loose.
        let give_up = |control: &mut AgentClient, streams: &[UnixStream]| {
            let _ = control.signal(id, &exec_id, libc::SIGKILL, false);
            if let Ok(mut w) = agent(&sandbox) {
                let _ = w.set_timeout(Some(Duration::from_secs(5)));
                let _ = w.wait(id, &exec_id);
            }
            for s in streams {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        };
        let mut streams = Vec::new();
        let mut readers = Vec::new();
        for s in [v1::attach::Stream::Stdout, v1::attach::Stream::Stderr] {
            match handle.attach(id, &exec_id, s) {
                Ok(stream) => {
                    let Ok(ours) = stream.try_clone() else {
                        give_up(&mut control, &streams);
                        return Err(CriError::Internal("cannot clone a socket".into()));
                    };
                    streams.push(ours);
                    readers.push(std::thread::spawn(move || {
                        read_bounded(stream, MAX_EXEC_OUTPUT)
                    }));
                }
                Err(e) => {
                    give_up(&mut control, &streams);
                    return Err(CriError::Unavailable(clean_message(&format!(
                        "attaching to the command: {e}"
                    ))));
                }
            }
        }
        let limit = u64::try_from(timeout)
            .ok()
            .filter(|&t| t > 0)
            .map(Duration::from_secs);
        let waited = agent(&sandbox).and_then(|mut w| {
            let _ = w.set_timeout(limit);
            w.wait(id, &exec_id).map_err(|e| match limit {
                Some(_) if is_timeout(&e) => CriError::DeadlineExceeded(format!(
                    "command timed out after {timeout} s and was killed"
                )),
                _ => agent_error("waiting for the command", &e),
            })
        });
        let status = match waited {
            Ok(w) if w.signal > 0 => 128 + w.signal,
            Ok(w) => w.status,
            Err(e) => {
                give_up(&mut control, &streams);
                return Err(e);
            }
        };
        // The streams end with the command, unless something it started in the
        // background still holds them: that output is not waited for.
        let deadline = Instant::now() + EXEC_DRAIN;
        while readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for s in &streams {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let mut out = readers.into_iter().map(|r| r.join().unwrap_or_default());
        let stdout = out.next().unwrap_or_default();
        let stderr = out.next().unwrap_or_default();
        Ok((stdout, stderr, status))
    }

    /// The guest's counters for a running container.
    pub fn stats(&self, id: &str) -> CriResult<(ContainerRecord, Option<v1::StatsReply>)> {
        let c = self.container(id)?;
        if c.state != ContainerState::Running {
            return Ok((c, None));
        }
        let sandbox = self.sandbox(&c.sandbox_id)?;
        let s = agent(&sandbox)?
            .stats(id)
            .map_err(|e| agent_error("reading the container's counters", &e))?;
        Ok((c, Some(s)))
    }

    /// The guest agent's own figures (memory, descriptors, threads, processes,
    /// connections) of a ready sandbox, for PodSandboxStatus's verbose info.
    pub fn agent_stats(&self, id: &str) -> CriResult<v1::StatsReply> {
        let sandbox = self.sandbox(id)?;
        if sandbox.state != SandboxState::Ready {
            return Err(CriError::FailedPrecondition(format!(
                "sandbox {id} is not ready"
            )));
        }
        agent(&sandbox)?
            .stats("")
            .map_err(|e| agent_error("reading the agent's own counters", &e))
    }

    /// A ready sandbox's usage: its VMM's cgroup leaf (the pod's cost on the node:
    /// guest memory and CPU included), its network interface's counters, and its
    /// running containers' own counters from the guest.
    pub fn sandbox_stats(&self, id: &str) -> CriResult<SandboxStats> {
        let sandbox = self.sandbox(id)?;
        if sandbox.state != SandboxState::Ready {
            return Err(CriError::NotFound(format!(
                "sandbox {id} is not ready: it has no stats"
            )));
        }
        let usage = crate::pod::confine::cgroup_of(&sandbox.pod_dir)
            .and_then(|cg| crate::pod::confine::usage(&cg).ok());
        let network = sandbox.network.as_ref().and_then(|n| {
            NetNs {
                path: n.netns.clone(),
            }
            .counters(cni::IFNAME)
            .ok()
            .flatten()
        });
        let ids: Vec<String> = self
            .containers()
            .into_iter()
            .filter(|c| c.sandbox_id == id && c.state == ContainerState::Running)
            .map(|c| c.id)
            .collect();
        let containers = ids.iter().filter_map(|c| self.stats(c).ok()).collect();
        Ok(SandboxStats {
            sandbox,
            usage,
            network,
            containers,
        })
    }

    /// Whether the VMM and guest artefacts are there.
    pub fn runtime_ready(&self) -> Result<(), String> {
        for (what, p) in [
            ("guest kernel", &self.artifacts.kernel),
            ("guest initramfs", &self.artifacts.initramfs),
            ("VMM", &self.artifacts.vmm),
        ] {
            if !p.is_file() {
                return Err(format!("the {what} {} is missing", p.display()));
            }
        }
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| format!("/dev/kvm: {e}"))?;
        Ok(())
    }
}

fn is_timeout(e: &AgentError) -> bool {
    matches!(
        e,
        AgentError::Frame {
            source: atoll_agent_proto::FrameError::Io(io),
            ..
        } if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
    )
}

/// A control connection to the sandbox's agent, with a deadline per call.
pub(crate) fn agent(sandbox: &SandboxRecord) -> CriResult<AgentClient> {
    let c =
        AgentClient::connect(&sandbox.pod_dir.join("vsock.sock"), AGENT_CONNECT).map_err(|e| {
            CriError::Unavailable(clean_message(&format!(
                "the guest agent of sandbox {} does not answer: {e}",
                sandbox.id
            )))
        })?;
    let _ = c.set_timeout(Some(AGENT_CALL));
    Ok(c)
}

/// Reads all of `r`, keeping at most `max` bytes.
fn read_bounded(mut r: impl std::io::Read, max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => {
                let room = max.saturating_sub(out.len());
                out.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// `name@digest` without the tag: `docker.io/library/busybox@sha256:...`.
pub fn repo_digest(name: &str, digest: &str) -> String {
    let repo = match name.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => r,
        _ => name,
    };
    let repo = repo.split('@').next().unwrap_or(repo);
    format!("{repo}@{digest}")
}

fn mark_lost(c: &mut ContainerRecord, why: &str) {
    c.state = ContainerState::Exited;
    if c.finished_ns == 0 {
        c.finished_ns = now_ns();
    }
    c.exit_code = 255;
    c.reason = "Error".into();
    c.message = why.into();
}

fn nix_kill(pid: u32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: kill(2) takes plain integers.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// SIGKILL to the sandbox's VMM if it is still the process we started.
fn kill_vmm(s: &SandboxRecord) {
    if store::vmm_alive(s) {
        if let Some(pid) = s.vmm_pid {
            let _ = nix_kill(pid);
        }
    }
}

/// A sandbox record written before its VMM was known (the server died while it
/// started): the pod library's `state.json` in the pod directory names the VMM's
/// pid; it is killed if that process is still an atoll-vmm of this directory.
fn kill_unrecorded_vmm(pod_dir: &Path) {
    let Ok(st) = crate::pod::state::PodState::read(&pod_dir.join("state.json")) else {
        return;
    };
    let Some(pid) = st.vmm_pid else { return };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let dir = pod_dir.as_os_str().as_encoded_bytes();
    if !dir.is_empty() && cmdline.windows(dir.len()).any(|w| w == dir) {
        let _ = nix_kill(pid);
    }
}

/// Asks the guest to power off, then kills the VMM if it is still there after
/// [`VM_STOP`].
fn shutdown_vm(s: &SandboxRecord) {
    if !store::vmm_alive(s) {
        return;
    }
    if let Ok(mut a) = AgentClient::connect(&s.pod_dir.join("vsock.sock"), Duration::from_secs(2)) {
        let _ = a.set_timeout(Some(VM_STOP));
        let _ = a.shutdown(0);
    }
    let deadline = Instant::now() + VM_STOP;
    while store::vmm_alive(s) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    kill_vmm(s);
    let deadline = Instant::now() + Duration::from_secs(2);
    while store::vmm_alive(s) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What the VMM of the pod in `pod_dir` said as it ended (e.g. the thread and
/// system call that broke its seccomp filter), from its console log, cleaned for a
/// CRI status. The console copy may lag the VMM's exit by a moment.
fn vm_end_reason(pod_dir: &Path) -> Option<String> {
    let log = pod_dir.join("console.log");
    for _ in 0..5 {
        if let Some(line) = crate::pod::vmm_error_line(&log) {
            return Some(clean_message(&line));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The container the liveness checks ask about: none has this id, and the agent's
/// NotFound is an answer as good as any.
const LIVENESS_PROBE_ID: &str = "atoll-liveness-check";

/// A pidfd of a sandbox's VMM, opened only while the record still names that very
/// process (its start time matches after the open): so a kill through it cannot
/// reach a process that reused the pid.
fn vmm_pidfd(s: &SandboxRecord) -> Option<std::os::fd::OwnedFd> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(s.vmm_pid?).ok()?)?;
    let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()?;
    store::vmm_alive(s).then_some(fd)
}

fn remove_pod_dir(dir: &Path) {
    crate::pod::confine::remove_cgroup_of(dir);
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
    }
}

#[cfg(test)]
impl Server {
    /// Puts records in place as if they had been made (streaming tests).
    pub(crate) fn adopt_for_test(&self, s: SandboxRecord, cs: Vec<ContainerRecord>) {
        let mut st = self.state();
        st.sandboxes.insert(s.id.clone(), s);
        for c in cs {
            st.containers.insert(c.id.clone(), c);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use atoll_image::oci::convert::GuestConfig;

    fn image() -> GuestConfig {
        GuestConfig {
            entrypoint: vec!["/ep".into()],
            cmd: vec!["a".into(), "b".into()],
            env: vec!["PATH=/bin".into(), "X=1".into()],
            working_dir: "/w".into(),
            user: "nobody".into(),
            ..Default::default()
        }
    }

    #[test]
    fn command_replaces_entrypoint_and_cmd_args_replace_cmd() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let p = merge_process(&image(), &[], &[], &[], "", None).unwrap();
        assert_eq!(p.args, s(&["/ep", "a", "b"]));
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/w", "nobody"));
        let p = merge_process(&image(), &[], &s(&["c"]), &[], "", None).unwrap();
        assert_eq!(p.args, s(&["/ep", "c"]));
        let p = merge_process(
            &image(),
            &s(&["/bin/sh", "-c"]),
            &s(&["top"]),
            &[],
            "/",
            Some("0".into()),
        )
        .unwrap();
        assert_eq!(p.args, s(&["/bin/sh", "-c", "top"]));
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/", "0"));
        let p = merge_process(
            &image(),
            &[],
            &[],
            &[("X".into(), "2".into()), ("Y".into(), "3".into())],
            "",
            None,
        )
        .unwrap();
        assert_eq!(p.env, s(&["PATH=/bin", "X=2", "Y=3"]));
        let empty = GuestConfig::default();
        assert!(matches!(
            merge_process(&empty, &[], &[], &[], "", None),
            Err(CriError::InvalidArgument(_))
        ));
        assert!(matches!(
            merge_process(&image(), &[], &[], &[("A=B".into(), "1".into())], "", None),
            Err(CriError::InvalidArgument(_))
        ));
    }

    pub(crate) fn server(dir: &Path) -> Server {
        let cfg = Config {
            state_dir: dir.join("state"),
            run_dir: dir.join("run"),
            sandbox: crate::cri::config::SandboxConfig {
                standby_vmms: 0,
                ..Default::default()
            },
            ..Config::default()
        };
        let a = Artifacts {
            kernel: dir.join("k"),
            initramfs: dir.join("i"),
            vmm: dir.join("v"),
        };
        Server::new(cfg, a, dir.join("images")).unwrap()
    }

    pub(crate) fn sandbox(id: &str, state: SandboxState, pid: Option<u32>) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            meta: Meta {
                name: id.into(),
                uid: id.into(),
                namespace: "ns".into(),
                attempt: 0,
            },
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            runtime_handler: String::new(),
            log_directory: String::new(),
            hostname: String::new(),
            created_ns: 1,
            state,
            vcpus: 1,
            mem_mib: 256,
            pod_dir: std::env::temp_dir()
                .join(format!("atoll-cri-test-{id}-{}", std::process::id())),
            vmm_pid: pid,
            vmm_start: pid.and_then(store::process_start),
            slots: Vec::new(),
            message: String::new(),
            ips: Vec::new(),
            network: None,
        }
    }

    pub(crate) fn container(id: &str, sandbox: &str, state: ContainerState) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            sandbox_id: sandbox.into(),
            meta: Meta::default(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            image: String::new(),
            image_id: String::new(),
            image_ref: String::new(),
            serial: String::new(),
            log_path: String::new(),
            tty: false,
            stdin: false,
            stdin_once: false,
            env: Vec::new(),
            cwd: "/".into(),
            user: String::new(),
            created_ns: 1,
            started_ns: 0,
            finished_ns: 0,
            exit_code: 0,
            state,
            reason: String::new(),
            message: String::new(),
            mounts: Vec::new(),
            volume_serials: Vec::new(),
        }
    }

    #[test]
    fn a_restarted_server_drops_half_made_sandboxes_and_marks_dead_vms() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(&dir.path().join("state")).unwrap();
            // "alive" is this test process: a VMM that still runs.
            store
                .put_sandbox(&sandbox(
                    "alive",
                    SandboxState::Ready,
                    Some(std::process::id()),
                ))
                .unwrap();
            store
                .put_sandbox(&sandbox("dead", SandboxState::Ready, Some(u32::MAX - 1)))
                .unwrap();
            store
                .put_sandbox(&sandbox("half", SandboxState::Creating, None))
                .unwrap();
            store
                .put_container(&container("c-dead", "dead", ContainerState::Created))
                .unwrap();
            store
                .put_container(&container("c-half", "half", ContainerState::Created))
                .unwrap();
            store
                .put_container(&container("c-orphan", "gone", ContainerState::Exited))
                .unwrap();
        }
        let s = Arc::new(server(dir.path()));
        s.recover();
        let ids: Vec<String> = s.sandboxes().into_iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert_eq!(s.sandbox("alive").unwrap().state, SandboxState::Ready);
        let dead = s.sandbox("dead").unwrap();
        assert_eq!(dead.state, SandboxState::NotReady);
        assert!(dead
            .message
            .contains("ended while atoll-cri was not running"));
        assert!(matches!(s.sandbox("half"), Err(CriError::NotFound(_))));
        let c = s.container("c-dead").unwrap();
        assert_eq!((c.state, c.exit_code), (ContainerState::Exited, 255));
        assert!(s.container("c-half").is_err() && s.container("c-orphan").is_err());
        // What recovery decided is on disk for the next restart too.
        let (sb, cs) = Store::open(&dir.path().join("state")).unwrap().load();
        assert_eq!(sb.len(), 2);
        assert_eq!(cs.len(), 1);
        // A second server on the same state is refused.
        let cfg = Config {
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            ..Config::default()
        };
        let a = s.artifacts.clone();
        let e = Server::new(cfg, a, dir.path().join("images")).unwrap_err();
        assert!(matches!(e, StartError::Locked(_)), "{e}");
    }

    #[test]
    fn a_pod_that_did_not_start_says_why_to_the_end_and_whose_fault() {
        let refused = crate::pod::PodError::Restored(crate::agent::AgentError::Refused {
            op: "Restored",
            code: v1::error::Code::InvalidArgument,
            message: "cannot set sysctl net.ipv4.nope to \"1\": No such file or directory".into(),
        });
        let e = pod_start_error(&refused);
        assert!(matches!(e, CriError::InvalidArgument(_)), "{e}");
        assert!(
            e.to_string().contains(
                "giving the restored pod its identity (entropy, clock, network, disks): the guest agent refused Restored: INVALID_ARGUMENT (cannot set sysctl net.ipv4.nope"
            ),
            "{e}"
        );
        let failed = crate::pod::PodError::VmmFailed("killed".into());
        assert!(matches!(pod_start_error(&failed), CriError::Internal(_)));
    }

    #[test]
    fn stop_and_remove_of_unknown_ids_succeed_and_status_says_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(server(dir.path()));
        assert_eq!(s.stop_sandbox("nope"), Ok(()));
        assert_eq!(s.remove_sandbox("nope"), Ok(()));
        assert_eq!(s.stop_container("nope", 0), Ok(()));
        assert_eq!(s.remove_container("nope"), Ok(()));
        assert!(matches!(s.sandbox("nope"), Err(CriError::NotFound(_))));
        assert!(matches!(s.container("nope"), Err(CriError::NotFound(_))));
        assert!(matches!(
            s.exec_sync("nope", vec!["true".into()], 0),
            Err(CriError::NotFound(_))
        ));
        assert!(matches!(s.reopen_log("nope"), Err(CriError::NotFound(_))));
        let unknown = SandboxRequest {
            meta: Meta {
                name: "a".into(),
                uid: "u".into(),
                namespace: "n".into(),
                attempt: 0,
            },
            runtime_handler: "runc".into(),
            ..Default::default()
        };
        assert!(
            matches!(s.run_sandbox(unknown), Err(CriError::InvalidArgument(m)) if m.contains("\"runc\" is not served"))
        );
        let nameless = SandboxRequest::default();
        assert!(matches!(
            s.run_sandbox(nameless),
            Err(CriError::InvalidArgument(_))
        ));
    }

    #[test]
    fn repo_digests_drop_the_tag() {
        assert_eq!(
            repo_digest("docker.io/library/busybox:latest", "sha256:ab"),
            "docker.io/library/busybox@sha256:ab"
        );
        assert_eq!(
            repo_digest("127.0.0.1:5000/a/b:v1", "sha256:ab"),
            "127.0.0.1:5000/a/b@sha256:ab"
        );
        assert_eq!(
            repo_digest("127.0.0.1:5000/a/b", "sha256:ab"),
            "127.0.0.1:5000/a/b@sha256:ab"
        );
    }

    #[test]
    fn guest_messages_are_cut_and_lose_control_characters() {
        let m = clean_message("bad\x1b[31m\x07thing\nnext");
        assert_eq!(m, "bad?[31m?thing\nnext");
        let long = "x".repeat(5000);
        assert_eq!(clean_message(&long).len(), 1027);
    }

    #[test]
    fn exec_output_is_bounded() {
        let data = vec![7u8; 100_000];
        assert_eq!(read_bounded(&data[..], 1000).len(), 1000);
        assert_eq!(read_bounded(&data[..10], 1000).len(), 10);
    }

    #[test]
    fn a_vm_that_ended_with_a_vmm_error_gives_that_line_as_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(vm_end_reason(dir.path()), None, "no console log");
        std::fs::write(
            dir.path().join("console.log"),
            "ATOLL-READY 1\nsome guest line\natoll-vmm: error: the devices thread made system call 110 (arguments 0, 0, 0), which its seccomp filter does not allow\n",
        )
        .unwrap();
        let why = vm_end_reason(dir.path()).unwrap();
        assert!(
            why.starts_with("atoll-vmm: error: the devices thread made system call 110"),
            "{why}"
        );
    }
}
