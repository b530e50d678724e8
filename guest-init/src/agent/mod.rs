//! The guest agent: the server side of the host–guest protocol
//! (`agent-proto/proto/agent.proto`).
//!
//! It runs as `/init agent`, a child of PID 1 (which supervises it as its command and
//! powers the VM off with its exit status). Start-up ([`setup`]) gives it a root that
//! containers can `pivot_root` from, cgroups and loopback; then it listens on vsock
//! [`CONTROL_PORT`] ([`conn`]) and [`STREAM_PORT`] ([`stream`]), one thread per
//! connection ([`server`]). Containers are made by [`crate::container::Runtime`],
//! behind a mutex; the agent owns processes, their stdio and their reaping
//! ([`process`]); a watch thread ends containers stuck at their memory limit
//! ([`stall`]). docs/guest-contract.md, section "Agent", is the summary.

pub mod conn;
pub mod net;
pub mod process;
pub mod restore;
pub mod server;
pub mod setup;
pub mod stall;
pub mod stream;

use std::io;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use atoll_agent_proto::{v1, CONTROL_PORT, STREAM_PORT};

use crate::container::{self, CreateTimings, RuntimeError, Spawned, Stdio};
use crate::status::INIT_FAILURE;
use crate::syscall::LinuxSyscall;

/// What the agent needs of a container runtime. [`container::Runtime`] is the real
/// one; tests use a fake whose "containers" are host processes.
pub trait ContainerRuntime: Send + 'static {
    /// See [`container::Runtime::create`].
    fn create(
        &mut self,
        req: &v1::CreateContainer,
        stdio: Stdio,
    ) -> Result<(Spawned, CreateTimings), RuntimeError>;
    /// See [`container::Runtime::start`].
    fn start(&mut self, id: &str) -> Result<(), RuntimeError>;
    /// See [`container::Runtime::exec`].
    fn exec(
        &mut self,
        container_id: &str,
        process: &v1::Process,
        stdio: Stdio,
    ) -> Result<Spawned, RuntimeError>;
    /// See [`container::Runtime::signal`].
    fn signal(&mut self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError>;
    /// See [`container::Runtime::stats`].
    fn stats(&self, id: &str) -> Result<v1::StatsReply, RuntimeError>;
    /// See [`container::Runtime::update`].
    fn update(&self, id: &str, r: &v1::Resources) -> Result<(), RuntimeError>;
    /// See [`container::Runtime::oom_kills`].
    fn oom_kills(&self, id: &str) -> Result<u64, RuntimeError>;
    /// See [`container::Runtime::remove`].
    fn remove(&mut self, id: &str) -> Result<(), RuntimeError>;
    /// See [`container::Runtime::ids`].
    fn ids(&self) -> Vec<String>;
    /// See [`container::Runtime::copies_dir`].
    fn copies_dir(&mut self) -> Result<std::path::PathBuf, RuntimeError>;
}

impl ContainerRuntime for container::Runtime {
    fn create(
        &mut self,
        req: &v1::CreateContainer,
        stdio: Stdio,
    ) -> Result<(Spawned, CreateTimings), RuntimeError> {
        container::Runtime::create(self, req, stdio)
    }
    fn start(&mut self, id: &str) -> Result<(), RuntimeError> {
        container::Runtime::start(self, id)
    }
    fn exec(
        &mut self,
        container_id: &str,
        process: &v1::Process,
        stdio: Stdio,
    ) -> Result<Spawned, RuntimeError> {
        container::Runtime::exec(self, container_id, process, stdio)
    }
    fn signal(&mut self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        container::Runtime::signal(self, id, signal, all)
    }
    fn stats(&self, id: &str) -> Result<v1::StatsReply, RuntimeError> {
        container::Runtime::stats(self, id)
    }
    fn update(&self, id: &str, r: &v1::Resources) -> Result<(), RuntimeError> {
        container::Runtime::update(self, id, r)
    }
    fn oom_kills(&self, id: &str) -> Result<u64, RuntimeError> {
        container::Runtime::oom_kills(self, id)
    }
    fn remove(&mut self, id: &str) -> Result<(), RuntimeError> {
        container::Runtime::remove(self, id)
    }
    fn ids(&self) -> Vec<String> {
        container::Runtime::ids(self)
    }
    fn copies_dir(&mut self) -> Result<std::path::PathBuf, RuntimeError> {
        container::Runtime::copies_dir(self)
    }
}

/// The agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Start-up failed.
    #[error(transparent)]
    Setup(#[from] setup::SetupError),
    /// A vsock port could not be listened on.
    #[error("cannot listen on vsock port {port}: {cause} (does the VM have a vsock device, and the kernel CONFIG_VIRTIO_VSOCKETS?)")]
    Listen {
        /// The port.
        port: u32,
        /// What the kernel said.
        cause: io::Error,
    },
    /// A thread or the reaper's pipe could not be made.
    #[error("cannot start the agent: {0}")]
    Start(io::Error),
}

/// Runs the agent until Shutdown; returns the status to exit with. Start-up failures
/// are printed and end the agent with status 125.
pub fn run() -> u8 {
    match serve() {
        Ok(status) => status,
        Err(err) => {
            eprintln!("atoll-init agent: {err}");
            INIT_FAILURE
        }
    }
}

fn serve() -> Result<u8, AgentError> {
    // Before any thread exists: unshare(CLONE_NEWNS) needs a single-threaded process.
    setup::prepare(&mut LinuxSyscall::new())?;

    let processes = Arc::new(process::ProcessTable::new().map_err(AgentError::Start)?);
    processes.spawn_reaper().map_err(AgentError::Start)?;

    let control = listen(CONTROL_PORT)?;
    let streams = listen(STREAM_PORT)?;
    let ready_us = boottime_us();

    let (exit_tx, exit_rx) = mpsc::channel();
    let agent = Arc::new(conn::Agent::new(
        container::Runtime::new(PathBuf::from(setup::STATE_ROOT)),
        processes,
        Box::new(LinuxSyscall::new()),
        PathBuf::from(setup::POD_DIR),
        ready_us,
        exit_tx,
    ));
    stall::spawn(
        PathBuf::from(setup::CGROUP_ROOT).join("atoll"),
        stall::StallPolicy::default(),
        Arc::clone(&agent.stall_kills),
    )
    .map_err(AgentError::Start)?;
    let limit = Arc::clone(&agent.connections);
    {
        let agent = Arc::clone(&agent);
        server::spawn_acceptor(control, Arc::clone(&limit), move |mut conn| {
            conn::serve_control(&*agent, &mut conn);
        })
        .map_err(AgentError::Start)?;
    }
    {
        let agent = Arc::clone(&agent);
        server::spawn_acceptor(streams, limit, move |conn| {
            stream::serve_stream(&*agent, conn);
        })
        .map_err(AgentError::Start)?;
    }
    eprintln!(
        "atoll-init agent: listening on vsock ports {CONTROL_PORT} and {STREAM_PORT} ({} µs after boot)",
        ready_us
    );
    // Every sender lives in `agent`, which outlives this wait.
    let status = exit_rx.recv().unwrap_or(INIT_FAILURE);
    // Let the Shutdown reply leave the guest before the VM powers off.
    std::thread::sleep(conn::SHUTDOWN_GRACE);
    eprintln!("atoll-init agent: shutdown, status {status}");
    Ok(status)
}

fn listen(port: u32) -> Result<server::VsockListener, AgentError> {
    server::VsockListener::bind(port).map_err(|cause| AgentError::Listen { port, cause })
}

/// `CLOCK_BOOTTIME` in microseconds (0 if it cannot be read).
fn boottime_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } == -1 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    let since_boot = Duration::from_secs(secs) + Duration::from_nanos(nanos);
    u64::try_from(since_boot.as_micros()).unwrap_or(u64::MAX)
}
