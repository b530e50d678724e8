//! Control connections: Hello first, then one Response per Request, in turn.
//!
//! [`Agent::handle`] turns one request into one response (and, for Shutdown, the
//! status the agent should exit with); [`serve_control`] runs the framing loop over
//! any `Read + Write` stream, so tests drive it over a `UnixStream` pair. Nothing a
//! host sends can panic the agent or stop other connections: a malformed frame, an
//! unknown op or a failure becomes an `Error` response.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use atoll_agent_proto::v1::{self, error::Code, request::Op, response::Result as Reply};
use atoll_agent_proto::{read_frame, validate_id, write_frame, FrameError, PROTOCOL_VERSION};

use super::net;
use super::process::{Process, ProcessTable, RegisterError, StdioEnds};
use super::restore;
use super::server::ConnectionLimit;
use super::ContainerRuntime;
use crate::container::{self, RuntimeError};
use crate::syscall::Syscall;

/// What the agent says it is in HelloReply.
pub const AGENT_NAME: &str = concat!("atoll-init ", env!("CARGO_PKG_VERSION"));

/// A request failed; each variant is a protocol error code.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such container or process.
    #[error("{0}")]
    NotFound(String),
    /// Id taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// Not in this state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Hello with another version.
    #[error("{0}")]
    UnsupportedVersion(String),
    /// Too many of something.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The guest could not do it.
    #[error("{0}")]
    Internal(String),
    /// The container runtime refused or failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

impl RequestError {
    /// The protocol code.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::UnsupportedVersion(_) => Code::UnsupportedVersion,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Internal(_) => Code::Internal,
            Self::Runtime(err) => err.code(),
        }
    }

    /// As a protocol error.
    pub fn to_proto(&self) -> v1::Error {
        v1::Error {
            code: self.code() as i32,
            message: self.to_string(),
        }
    }

    /// As a response.
    pub fn to_response(&self) -> v1::Response {
        v1::Response::error(self.code(), self.to_string())
    }
}

impl From<RegisterError> for RequestError {
    fn from(err: RegisterError) -> Self {
        match err {
            RegisterError::Full => Self::ResourceExhausted(err.to_string()),
            RegisterError::Exists(_) => Self::AlreadyExists(err.to_string()),
        }
    }
}

fn check_id(field: &str, id: &str) -> Result<(), RequestError> {
    validate_id(id).map_err(|e| RequestError::InvalidArgument(format!("{field}: {e}")))
}

/// Empty `exec_id` means the init process; otherwise it must be a valid id.
fn check_exec_id(id: &str) -> Result<(), RequestError> {
    if id.is_empty() {
        Ok(())
    } else {
        check_id("exec_id", id)
    }
}

fn internal(what: &str) -> impl FnOnce(io::Error) -> RequestError + '_ {
    move |err| RequestError::Internal(format!("cannot {what}: {err}"))
}

/// Per-connection state.
#[derive(Debug, Default)]
pub struct Session {
    /// Hello was answered.
    pub greeted: bool,
}

/// Everything a connection handler needs; shared by all connection threads.
pub struct Agent<R: ContainerRuntime> {
    runtime: Mutex<R>,
    /// Processes and their stdio ends (also used by stream connections).
    pub processes: Arc<ProcessTable>,
    /// The pod-wide system calls: network, hostname, a restored clone's renewal.
    sys: Mutex<Box<dyn Syscall>>,
    pod_dir: PathBuf,
    ready_us: u64,
    shutdown: Mutex<mpsc::Sender<u8>>,
    /// The connection places both acceptors share.
    pub connections: Arc<ConnectionLimit>,
    /// Containers the memory-stall watch killed: their Wait reports an OOM kill.
    pub stall_kills: Arc<super::stall::StallKills>,
}

impl<R: ContainerRuntime> std::fmt::Debug for Agent<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("pod_dir", &self.pod_dir)
            .finish_non_exhaustive()
    }
}

impl<R: ContainerRuntime> Agent<R> {
    /// An agent around `runtime`; Shutdown sends its status on `shutdown`.
    pub fn new(
        runtime: R,
        processes: Arc<ProcessTable>,
        sys: Box<dyn Syscall>,
        pod_dir: PathBuf,
        ready_us: u64,
        shutdown: mpsc::Sender<u8>,
    ) -> Self {
        Self {
            runtime: Mutex::new(runtime),
            processes,
            sys: Mutex::new(sys),
            pod_dir,
            ready_us,
            shutdown: Mutex::new(shutdown),
            connections: Arc::new(ConnectionLimit::default()),
            stall_kills: Arc::default(),
        }
    }

    /// The directory copied volumes are unpacked into.
    pub fn copies_dir(&self) -> Result<PathBuf, RequestError> {
        self.runtime().copies_dir().map_err(RequestError::from)
    }

    fn runtime(&self) -> MutexGuard<'_, R> {
        self.runtime.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers one request; `Some(status)` after a successful Shutdown.
    pub fn handle(&self, session: &mut Session, req: v1::Request) -> (v1::Response, Option<u8>) {
        let op = match req.op {
            Some(Op::Hello(hello)) => {
                let reply = self.hello(&hello);
                session.greeted |= reply.is_ok();
                return (into_response(reply), None);
            }
            None => {
                return (
                    RequestError::InvalidArgument(
                        "empty or unknown request: this agent speaks protocol version 1".into(),
                    )
                    .to_response(),
                    None,
                )
            }
            Some(_) if !session.greeted => {
                return (
                    RequestError::FailedPrecondition(
                        "the first request on a control connection must be Hello".into(),
                    )
                    .to_response(),
                    None,
                )
            }
            Some(op) => op,
        };
        let mut shutdown = None;
        let reply = match op {
            Op::Hello(_) => unreachable_hello(),
            Op::Create(req) => self.create(&req),
            Op::Start(req) => self.start(&req),
            Op::Exec(req) => self.exec(&req),
            Op::Wait(req) => self.wait(&req),
            Op::Signal(req) => self.signal(&req),
            Op::Resize(req) => self.resize(&req),
            Op::Stats(req) => self.stats(&req),
            Op::Update(req) => self.update(&req),
            Op::Network(req) => self.network(&req),
            Op::Remove(req) => self.remove(&req),
            Op::Quiesce(_) => self.quiesce(),
            Op::Restored(req) => self.restored(&req),
            Op::Shutdown(req) => self.shutdown(&req).map(|status| {
                shutdown = Some(status);
                Reply::Ok(v1::Empty {})
            }),
        };
        (into_response(reply), shutdown)
    }

    /// Tells the main thread to end the agent with `status`.
    pub fn request_exit(&self, status: u8) {
        let sender = self.shutdown.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = sender.send(status);
    }

    fn hello(&self, hello: &v1::Hello) -> Result<Reply, RequestError> {
        if hello.version != PROTOCOL_VERSION {
            return Err(RequestError::UnsupportedVersion(format!(
                "protocol version {} is not supported: this agent speaks version {PROTOCOL_VERSION}",
                hello.version
            )));
        }
        Ok(Reply::Hello(v1::HelloReply {
            version: PROTOCOL_VERSION,
            agent: AGENT_NAME.into(),
            agent_ready_us: self.ready_us,
        }))
    }

    fn create(&self, req: &v1::CreateContainer) -> Result<Reply, RequestError> {
        check_id("id", &req.id)?;
        let process = req
            .process
            .as_ref()
            .ok_or_else(|| RequestError::InvalidArgument("process: missing".into()))?;
        self.processes.check_free(&req.id, "")?;
        let mut runtime = self.runtime();
        // The pipes are made under the runtime lock, so no other create or exec forks
        // while the process's ends of them are open in the agent.
        let (stdio, ends) = make_stdio(process)?;
        let (spawned, timings) = match runtime.create(req, stdio) {
            Ok(created) => created,
            Err(e) => {
                self.processes.reap_strays();
                return Err(e.into());
            }
        };
        let pid = spawned.pid;
        // A new container of an id the stall watch once killed starts clean.
        self.stall_kills.forget(&req.id);
        // Registered before the runtime lock goes, so `reap_strays` (run under the
        // lock) never takes a process that is about to be registered.
        self.register(&req.id, "", spawned, ends)?;
        drop(runtime);
        Ok(Reply::Create(v1::CreateReply {
            pid: u32::try_from(pid).unwrap_or(0),
            rootfs_us: timings.rootfs_us,
            create_us: timings.create_us,
        }))
    }

    fn register(
        &self,
        container_id: &str,
        exec_id: &str,
        spawned: container::Spawned,
        mut ends: StdioEnds,
    ) -> Result<(), RequestError> {
        let mut pty = None;
        if let Some(master) = spawned.pty_master {
            let master = File::from(master);
            pty = Some(
                master
                    .try_clone()
                    .map_err(internal("duplicate the terminal"))?,
            );
            ends.tty = Some(master);
        }
        let mut process = Process::new(container_id, exec_id, spawned.pid, ends, pty);
        process.kill_on_exit = spawned.kill_on_exit;
        self.processes.register(process);
        Ok(())
    }

    fn start(&self, req: &v1::StartContainer) -> Result<Reply, RequestError> {
        check_id("id", &req.id)?;
        let begun = Instant::now();
        self.runtime().start(&req.id)?;
        Ok(Reply::Start(v1::StartReply {
            start_us: u64::try_from(begun.elapsed().as_micros()).unwrap_or(u64::MAX),
        }))
    }

    fn exec(&self, req: &v1::ExecProcess) -> Result<Reply, RequestError> {
        check_id("container_id", &req.container_id)?;
        check_id("exec_id", &req.exec_id)?;
        let process = req
            .process
            .as_ref()
            .ok_or_else(|| RequestError::InvalidArgument("process: missing".into()))?;
        self.processes.check_free(&req.container_id, &req.exec_id)?;
        let mut runtime = self.runtime();
        let (stdio, ends) = make_stdio(process)?;
        let spawned = match runtime.exec(&req.container_id, process, stdio) {
            Ok(spawned) => spawned,
            Err(e) => {
                // libcontainer's process for a command that cannot run is our child
                // and a zombie now: left alone it would keep the container from
                // ever stopping.
                self.processes.reap_strays();
                return Err(e.into());
            }
        };
        self.register(&req.container_id, &req.exec_id, spawned, ends)?;
        drop(runtime);
        Ok(Reply::Ok(v1::Empty {}))
    }

    fn lookup(&self, container_id: &str, exec_id: &str) -> Result<Arc<Process>, RequestError> {
        check_id("container_id", container_id)?;
        check_exec_id(exec_id)?;
        self.processes.get(container_id, exec_id).ok_or_else(|| {
            RequestError::NotFound(if exec_id.is_empty() {
                format!("no container {container_id:?}")
            } else {
                format!("no process {exec_id:?} in container {container_id:?}")
            })
        })
    }

    fn wait(&self, req: &v1::WaitProcess) -> Result<Reply, RequestError> {
        let process = self.lookup(&req.container_id, &req.exec_id)?;
        let exit = process.wait();
        self.processes.forget_exec(&process);
        // A container removed meanwhile has no cgroup to ask: no OOM known. One the
        // memory-stall watch killed was stuck at its limit: an OOM kill too.
        let oom_killed = self
            .runtime()
            .oom_kills(&req.container_id)
            .is_ok_and(|n| n > 0)
            || self.stall_kills.contains(&req.container_id);
        Ok(Reply::Wait(v1::WaitReply {
            status: exit.status(),
            signal: exit.signal(),
            oom_killed,
        }))
    }

    fn signal(&self, req: &v1::SignalProcess) -> Result<Reply, RequestError> {
        if !(1..=64).contains(&req.signal) {
            return Err(RequestError::InvalidArgument(format!(
                "signal: {} is not a signal number (1 to 64)",
                req.signal
            )));
        }
        if req.exec_id.is_empty() {
            check_id("container_id", &req.container_id)?;
            let send = || {
                self.runtime()
                    .signal(&req.container_id, req.signal, req.all)
            };
            match self.processes.get(&req.container_id, "") {
                // Once the init process is reaped its PID namespace is empty and its
                // pid may be reused: nothing to signal. Holding its state lock keeps
                // the reaper off it while the runtime signals.
                Some(init) => init.while_running(send).transpose()?,
                None => Some(send()?),
            };
        } else {
            let process = self.lookup(&req.container_id, &req.exec_id)?;
            // An exec process that has ended needs no signal: done.
            process
                .signal(req.signal)
                .map_err(internal("send the signal"))?;
        }
        Ok(Reply::Ok(v1::Empty {}))
    }

    fn resize(&self, req: &v1::ResizeTty) -> Result<Reply, RequestError> {
        let process = self.lookup(&req.container_id, &req.exec_id)?;
        let (rows, cols) = tty_size(req.rows, req.cols)?;
        let pty = process.pty().ok_or_else(|| {
            RequestError::FailedPrecondition(format!(
                "process {} has no terminal to resize",
                process.name()
            ))
        })?;
        set_window_size(pty, rows, cols).map_err(internal("resize the terminal"))?;
        Ok(Reply::Ok(v1::Empty {}))
    }

    fn stats(&self, req: &v1::GetStats) -> Result<Reply, RequestError> {
        if req.container_id.is_empty() {
            return Ok(Reply::Stats(self.own_stats()));
        }
        check_id("container_id", &req.container_id)?;
        Ok(Reply::Stats(self.runtime().stats(&req.container_id)?))
    }

    /// The agent's own resident memory, descriptors, threads, processes and
    /// connections (what GetStats with no container answers).
    fn own_stats(&self) -> v1::StatsReply {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        v1::StatsReply {
            agent_rss_bytes: field("VmRSS:") * 1024,
            // The directory listing holds one descriptor of its own.
            agent_fds: fds.saturating_sub(1),
            agent_threads: field("Threads:"),
            agent_processes: self.processes.len() as u64,
            agent_connections: self.connections.live() as u64,
            ..v1::StatsReply::default()
        }
    }

    fn update(&self, req: &v1::UpdateResources) -> Result<Reply, RequestError> {
        check_id("container_id", &req.container_id)?;
        let r = req.resources.unwrap_or_default();
        self.runtime().update(&req.container_id, &r)?;
        Ok(Reply::Ok(v1::Empty {}))
    }

    fn network(&self, req: &v1::ConfigureNetwork) -> Result<Reply, RequestError> {
        let mut ops = self.sys.lock().unwrap_or_else(PoisonError::into_inner);
        net::configure(ops.as_mut(), req, &self.pod_dir).map_err(|err| match err {
            net::ConfigureNetworkError::Plan(plan) => {
                RequestError::InvalidArgument(plan.to_string())
            }
            net::ConfigureNetworkError::Sysctl { .. } => {
                RequestError::InvalidArgument(err.to_string())
            }
            net::ConfigureNetworkError::NoSuchMac(_) => RequestError::NotFound(err.to_string()),
            other => RequestError::Internal(other.to_string()),
        })?;
        Ok(Reply::Ok(v1::Empty {}))
    }

    fn quiesce(&self) -> Result<Reply, RequestError> {
        let mut ops = self.sys.lock().unwrap_or_else(PoisonError::into_inner);
        restore::quiesce(ops.as_mut()).map_err(internal("drop caches"))?;
        Ok(Reply::Ok(v1::Empty {}))
    }

    fn restored(&self, req: &v1::Restored) -> Result<Reply, RequestError> {
        let mut ops = self.sys.lock().unwrap_or_else(PoisonError::into_inner);
        restore::restored(ops.as_mut(), req, &self.pod_dir, restore::DISK_WAIT).map_err(|err| {
            match err {
                restore::RestoreError::Invalid(_)
                | restore::RestoreError::Network(
                    net::ConfigureNetworkError::Plan(_) | net::ConfigureNetworkError::Sysctl { .. },
                ) => RequestError::InvalidArgument(err.to_string()),
                restore::RestoreError::DiskMissing { .. } => {
                    RequestError::NotFound(err.to_string())
                }
                other => RequestError::Internal(other.to_string()),
            }
        })?;
        Ok(Reply::Ok(v1::Empty {}))
    }

    fn remove(&self, req: &v1::RemoveContainer) -> Result<Reply, RequestError> {
        check_id("id", &req.id)?;
        self.runtime().remove(&req.id)?;
        self.processes.remove_container(&req.id);
        Ok(Reply::Ok(v1::Empty {}))
    }

    fn shutdown(&self, req: &v1::Shutdown) -> Result<u8, RequestError> {
        let status = u8::try_from(req.status).map_err(|_| {
            RequestError::InvalidArgument(format!("status: {} is over 255", req.status))
        })?;
        let mut runtime = self.runtime();
        for id in runtime.ids() {
            if let Err(err) = runtime.remove(&id) {
                eprintln!("atoll-init agent: shutdown: cannot remove container {id}: {err}");
            }
            self.processes.remove_container(&id);
        }
        drop(runtime);
        // SAFETY: sync has no arguments and cannot fail.
        unsafe { libc::sync() };
        Ok(status)
    }
}

fn unreachable_hello() -> Result<Reply, RequestError> {
    Err(RequestError::Internal(
        "Hello is answered before dispatch".into(),
    ))
}

fn into_response(reply: Result<Reply, RequestError>) -> v1::Response {
    match reply {
        Ok(result) => v1::Response {
            result: Some(result),
        },
        Err(err) => err.to_response(),
    }
}

fn tty_size(rows: u32, cols: u32) -> Result<(u16, u16), RequestError> {
    let rows = u16::try_from(rows)
        .map_err(|_| RequestError::InvalidArgument(format!("rows: {rows} is over 65535")))?;
    let cols = u16::try_from(cols)
        .map_err(|_| RequestError::InvalidArgument(format!("cols: {cols} is over 65535")))?;
    Ok((rows, cols))
}

/// TIOCSWINSZ on a terminal master.
pub fn set_window_size(pty: &File, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the valid pointer.
    if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &size) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: a new fd that nothing else owns.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above, the other end.
    let write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((read, write))
}

/// The runtime's stdio for a new process and the agent's ends of it.
fn make_stdio(process: &v1::Process) -> Result<(container::Stdio, StdioEnds), RequestError> {
    if process.terminal {
        let (rows, cols) = tty_size(process.rows, process.cols)?;
        let (rows, cols) = (
            if rows == 0 { 24 } else { rows },
            if cols == 0 { 80 } else { cols },
        );
        return Ok((
            container::Stdio::Terminal { rows, cols },
            StdioEnds::default(),
        ));
    }
    let (out_r, out_w) = pipe().map_err(internal("create a pipe"))?;
    let (err_r, err_w) = pipe().map_err(internal("create a pipe"))?;
    let (stdin, stdin_w) = if process.stdin {
        let (r, w) = pipe().map_err(internal("create a pipe"))?;
        (Some(r), Some(File::from(w)))
    } else {
        (None, None)
    };
    Ok((
        container::Stdio::Pipes {
            stdin,
            stdout: out_w,
            stderr: err_w,
        },
        StdioEnds {
            stdin: stdin_w,
            stdout: Some(File::from(out_r)),
            stderr: Some(File::from(err_r)),
            tty: None,
        },
    ))
}

/// Serves one control connection until the peer closes it, a frame cannot be read,
/// or Shutdown succeeded (then the agent is told to exit, after the reply is sent).
pub fn serve_control<R: ContainerRuntime, S: Read + Write>(agent: &Agent<R>, stream: &mut S) {
    let mut session = Session::default();
    loop {
        let (response, exit) = match read_frame::<v1::Request, _>(stream) {
            Ok(req) => agent.handle(&mut session, req),
            Err(FrameError::Decode(err)) => (
                RequestError::InvalidArgument(format!("malformed request: {err}")).to_response(),
                None,
            ),
            Err(err @ FrameError::TooLarge(_)) => {
                // The rest of the frame cannot be skipped safely: say why, then close.
                let _ = write_frame(
                    stream,
                    &RequestError::InvalidArgument(err.to_string()).to_response(),
                );
                return;
            }
            Err(FrameError::Closed | FrameError::Io(_)) => return,
        };
        if write_frame(stream, &response).is_err() {
            return;
        }
        if let Some(status) = exit {
            agent.request_exit(status);
            return;
        }
    }
}

/// How long the main thread lets a Shutdown reply travel before the agent exits.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(100);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::agent::process::Exit;
    use crate::container::{CreateTimings, Spawned, Stdio};
    use crate::syscall::fake::FakeSyscall;
    use atoll_agent_proto::v1::request::Op;
    use std::os::unix::net::UnixStream;
    use std::process::Command;
    use std::thread;

    /// A runtime whose "containers" are host processes: create spawns `/bin/sh -c
    /// args[0]` wired to the given pipes.
    #[derive(Default)]
    pub(crate) struct FakeRuntime {
        pub ids: Vec<String>,
        pub removed: Vec<String>,
        pub signals: Vec<(String, i32, bool)>,
        /// Where copied volumes go (unset: refused).
        pub copies: Option<std::path::PathBuf>,
    }

    impl ContainerRuntime for FakeRuntime {
        fn create(
            &mut self,
            req: &v1::CreateContainer,
            stdio: Stdio,
        ) -> Result<(Spawned, CreateTimings), RuntimeError> {
            if self.ids.contains(&req.id) {
                return Err(RuntimeError::AlreadyExists(format!(
                    "container {:?} exists",
                    req.id
                )));
            }
            let script = req
                .process
                .as_ref()
                .and_then(|p| p.args.first().cloned())
                .unwrap_or_default();
            let spawned = spawn_sh(&script, stdio)?;
            self.ids.push(req.id.clone());
            Ok((
                spawned,
                CreateTimings {
                    rootfs_us: 1,
                    create_us: 2,
                },
            ))
        }
        fn start(&mut self, id: &str) -> Result<(), RuntimeError> {
            if self.ids.iter().any(|i| i == id) {
                Ok(())
            } else {
                Err(RuntimeError::NotFound(format!("no container {id:?}")))
            }
        }
        fn exec(
            &mut self,
            container_id: &str,
            process: &v1::Process,
            stdio: Stdio,
        ) -> Result<Spawned, RuntimeError> {
            self.start(container_id)?;
            spawn_sh(process.args.first().map_or("", String::as_str), stdio)
        }
        fn signal(&mut self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
            self.signals.push((id.into(), signal, all));
            Ok(())
        }
        fn stats(&self, id: &str) -> Result<v1::StatsReply, RuntimeError> {
            self.ids
                .iter()
                .find(|i| *i == id)
                .map(|_| v1::StatsReply {
                    pids_current: 1,
                    ..v1::StatsReply::default()
                })
                .ok_or_else(|| RuntimeError::NotFound(format!("no container {id:?}")))
        }
        fn update(&self, id: &str, r: &v1::Resources) -> Result<(), RuntimeError> {
            if !self.ids.iter().any(|i| i == id) {
                return Err(RuntimeError::NotFound(format!("no container {id:?}")));
            }
            crate::container::spec::cgroup_limits(r)
                .map(|_| ())
                .map_err(|e| RuntimeError::InvalidArgument(e.to_string()))
        }
        fn oom_kills(&self, id: &str) -> Result<u64, RuntimeError> {
            Ok(u64::from(id == "oom"))
        }
        fn remove(&mut self, id: &str) -> Result<(), RuntimeError> {
            self.ids.retain(|i| i != id);
            self.removed.push(id.into());
            Ok(())
        }
        fn ids(&self) -> Vec<String> {
            self.ids.clone()
        }
        fn copies_dir(&mut self) -> Result<std::path::PathBuf, RuntimeError> {
            self.copies
                .clone()
                .ok_or_else(|| RuntimeError::Internal("no copies here".into()))
        }
    }

    fn spawn_sh(script: &str, stdio: Stdio) -> Result<Spawned, RuntimeError> {
        let Stdio::Pipes {
            stdin,
            stdout,
            stderr,
        } = stdio
        else {
            return Err(RuntimeError::Internal("no terminals in the fake".into()));
        };
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script])
            .stdout(stdout)
            .stderr(stderr)
            .stdin(stdin.map_or_else(std::process::Stdio::null, std::process::Stdio::from));
        let child = cmd
            .spawn()
            .map_err(|e| RuntimeError::Internal(e.to_string()))?;
        let pid = i32::try_from(child.id()).unwrap_or(0);
        // The agent reaps it, not `Child`.
        std::mem::forget(child);
        Ok(Spawned {
            pid,
            pty_master: None,
            kill_on_exit: None,
        })
    }

    pub(crate) fn agent_with<R: ContainerRuntime>(
        runtime: R,
    ) -> (Arc<Agent<R>>, mpsc::Receiver<u8>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let table = Arc::new(ProcessTable::new().unwrap());
        table.spawn_reaper().unwrap();
        let (tx, rx) = mpsc::channel();
        let agent = Agent::new(
            runtime,
            table,
            Box::new({
                // Set-up calls succeed and change nothing; only the hostname fails.
                let mut sys = FakeSyscall::default();
                sys.fail("hostname", libc::EPERM);
                sys
            }),
            dir.path().join("pod"),
            42,
            tx,
        );
        (Arc::new(agent), rx, dir)
    }

    pub(crate) fn hello() -> v1::Request {
        v1::Request {
            op: Some(Op::Hello(v1::Hello {
                version: PROTOCOL_VERSION,
            })),
        }
    }

    pub(crate) fn op(op: Op) -> v1::Request {
        v1::Request { op: Some(op) }
    }

    pub(crate) fn error_code(resp: &v1::Response) -> Option<Code> {
        match &resp.result {
            Some(Reply::Error(e)) => Code::try_from(e.code).ok(),
            _ => None,
        }
    }

    pub(crate) fn create_req(id: &str, script: &str, stdin: bool) -> v1::Request {
        op(Op::Create(v1::CreateContainer {
            id: id.into(),
            process: Some(v1::Process {
                args: vec![script.into()],
                stdin,
                ..v1::Process::default()
            }),
            ..v1::CreateContainer::default()
        }))
    }

    fn wait_req(container_id: &str, exec_id: &str) -> v1::Request {
        op(Op::Wait(v1::WaitProcess {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
        }))
    }

    #[test]
    fn hello_must_come_first() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session::default();
        let (resp, _) = agent.handle(&mut session, create_req("c", "true", false));
        assert_eq!(error_code(&resp), Some(Code::FailedPrecondition));
        let (resp, _) = agent.handle(&mut session, hello());
        match resp.result {
            Some(Reply::Hello(h)) => {
                assert_eq!(h.version, 1);
                assert_eq!(h.agent_ready_us, 42);
                assert!(h.agent.starts_with("atoll-init "));
            }
            other => panic!("{other:?}"),
        }
        assert!(session.greeted);
    }

    #[test]
    fn hello_with_other_version_is_unsupported_and_does_not_greet() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session::default();
        let (resp, _) = agent.handle(&mut session, op(Op::Hello(v1::Hello { version: 2 })));
        assert_eq!(error_code(&resp), Some(Code::UnsupportedVersion));
        assert!(!session.greeted);
    }

    #[test]
    fn empty_request_and_bad_ids_are_errors() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        let (resp, _) = agent.handle(&mut session, v1::Request { op: None });
        assert_eq!(error_code(&resp), Some(Code::InvalidArgument));
        let (resp, _) = agent.handle(&mut session, create_req("../x", "true", false));
        assert_eq!(error_code(&resp), Some(Code::InvalidArgument));
        let (resp, _) = agent.handle(&mut session, wait_req("c", "a/b"));
        assert_eq!(error_code(&resp), Some(Code::InvalidArgument));
        let (resp, _) = agent.handle(&mut session, wait_req("nope", ""));
        assert_eq!(error_code(&resp), Some(Code::NotFound));
        let (resp, _) = agent.handle(
            &mut session,
            op(Op::Signal(v1::SignalProcess {
                container_id: "c".into(),
                signal: 0,
                ..v1::SignalProcess::default()
            })),
        );
        assert_eq!(error_code(&resp), Some(Code::InvalidArgument));
    }

    #[test]
    fn real_runtime_failure_becomes_its_error_code() {
        let (agent, _rx, _dir) = agent_with(container::Runtime::new("/nonexistent".into()));
        let mut session = Session { greeted: true };
        let (resp, _) = agent.handle(
            &mut session,
            op(Op::Start(v1::StartContainer { id: "c".into() })),
        );
        assert!(error_code(&resp).is_some(), "{resp:?}");
        let (resp, _) = agent.handle(&mut session, create_req("c", "true", false));
        assert!(error_code(&resp).is_some(), "{resp:?}");
        assert!(agent.processes.is_empty());
    }

    #[test]
    fn create_wait_reports_exit_status_and_oom() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        let (resp, _) = agent.handle(&mut session, create_req("c", "exit 7", false));
        let Some(Reply::Create(created)) = resp.result else {
            panic!("{resp:?}")
        };
        assert!(created.pid > 0);
        assert_eq!((created.rootfs_us, created.create_us), (1, 2));
        let (resp, _) = agent.handle(&mut session, wait_req("c", ""));
        assert_eq!(
            resp.result,
            Some(Reply::Wait(v1::WaitReply {
                status: 7,
                signal: 0,
                oom_killed: false
            }))
        );
        create_ok(&agent, &mut session, "oom", "kill -9 $$");
        assert_eq!(
            wait_reply(&agent, &mut session, "oom"),
            v1::WaitReply {
                status: 137,
                signal: 9,
                oom_killed: true
            }
        );
    }

    /// Creates container `id` running `script`.
    fn create_ok(agent: &Agent<FakeRuntime>, session: &mut Session, id: &str, script: &str) {
        let (resp, _) = agent.handle(session, create_req(id, script, false));
        assert!(error_code(&resp).is_none(), "{resp:?}");
    }

    /// Waits for container `id`.
    fn wait_reply(agent: &Agent<FakeRuntime>, session: &mut Session, id: &str) -> v1::WaitReply {
        let (resp, _) = agent.handle(session, wait_req(id, ""));
        let Some(Reply::Wait(w)) = resp.result else {
            panic!("{resp:?}")
        };
        w
    }

    #[test]
    fn a_container_the_stall_watch_killed_waits_as_oom_killed_until_recreated() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        create_ok(&agent, &mut session, "stuck", "kill -9 $$");
        // What the watch does before it writes cgroup.kill (the fake's "kill -9").
        agent.stall_kills.insert("stuck");
        let w = wait_reply(&agent, &mut session, "stuck");
        assert_eq!((w.status, w.signal, w.oom_killed), (137, 9, true));
        // Another container of the pod is not tainted by it.
        create_ok(&agent, &mut session, "other", "kill -9 $$");
        let w = wait_reply(&agent, &mut session, "other");
        assert_eq!((w.status, w.oom_killed), (137, false));
        // A container created again under the killed one's id starts clean.
        agent.handle(
            &mut session,
            op(Op::Remove(v1::RemoveContainer { id: "stuck".into() })),
        );
        create_ok(&agent, &mut session, "stuck", "kill -9 $$");
        assert!(!agent.stall_kills.contains("stuck"));
    }

    #[test]
    fn exec_ids_are_unique_and_exec_signal_kills_the_process() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        agent.handle(&mut session, create_req("c", "sleep 30", false));
        let exec = |id: &str| {
            op(Op::Exec(v1::ExecProcess {
                container_id: "c".into(),
                exec_id: id.into(),
                process: Some(v1::Process {
                    args: vec!["sleep 30".into()],
                    ..v1::Process::default()
                }),
            }))
        };
        let (resp, _) = agent.handle(&mut session, exec("e1"));
        assert_eq!(resp, v1::Response::ok());
        let (resp, _) = agent.handle(&mut session, exec("e1"));
        assert_eq!(error_code(&resp), Some(Code::AlreadyExists));
        let (resp, _) = agent.handle(
            &mut session,
            op(Op::Signal(v1::SignalProcess {
                container_id: "c".into(),
                exec_id: "e1".into(),
                signal: libc::SIGTERM,
                all: false,
            })),
        );
        assert_eq!(resp, v1::Response::ok());
        let (resp, _) = agent.handle(&mut session, wait_req("c", "e1"));
        assert!(
            matches!(
                resp.result,
                Some(Reply::Wait(v1::WaitReply {
                    status: 143,
                    signal: 15,
                    ..
                }))
            ),
            "{resp:?}"
        );
        // Its exit was delivered: the exec is forgotten, and its id free again.
        let (resp, _) = agent.handle(&mut session, wait_req("c", "e1"));
        assert_eq!(error_code(&resp), Some(Code::NotFound));
        assert_eq!(agent.processes.len(), 1, "only init is left");
        let (resp, _) = agent.handle(&mut session, exec("e1"));
        assert_eq!(resp, v1::Response::ok());
        let again = agent.processes.get("c", "e1").unwrap();
        again.signal(libc::SIGKILL).unwrap();
        assert_eq!(again.wait(), Exit::Signal(9));
        // The init process is signalled through the runtime.
        let (resp, _) = agent.handle(
            &mut session,
            op(Op::Signal(v1::SignalProcess {
                container_id: "c".into(),
                exec_id: String::new(),
                signal: libc::SIGKILL,
                all: true,
            })),
        );
        assert_eq!(resp, v1::Response::ok());
        assert_eq!(
            agent.runtime().signals,
            [("c".to_string(), libc::SIGKILL, true)]
        );
        let init = agent.processes.get("c", "").unwrap();
        init.signal(libc::SIGKILL).unwrap();
        assert_eq!(init.wait(), Exit::Signal(9));
    }

    #[test]
    fn signal_after_init_was_reaped_is_a_no_op() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        agent.handle(&mut session, create_req("c", "exit 0", false));
        agent.processes.get("c", "").unwrap().wait();
        let (resp, _) = agent.handle(
            &mut session,
            op(Op::Signal(v1::SignalProcess {
                container_id: "c".into(),
                exec_id: String::new(),
                signal: libc::SIGTERM,
                all: false,
            })),
        );
        assert_eq!(resp, v1::Response::ok());
        assert!(agent.runtime().signals.is_empty());
    }

    #[test]
    fn resize_without_terminal_is_failed_precondition() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        agent.handle(&mut session, create_req("c", "true", false));
        let (resp, _) = agent.handle(
            &mut session,
            op(Op::Resize(v1::ResizeTty {
                container_id: "c".into(),
                exec_id: String::new(),
                rows: 10,
                cols: 10,
            })),
        );
        assert_eq!(error_code(&resp), Some(Code::FailedPrecondition));
    }

    #[test]
    fn network_errors_map_to_codes() {
        let (agent, _rx, dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        let bad = op(Op::Network(v1::ConfigureNetwork {
            interfaces: vec![v1::Interface {
                name: "eth0".into(),
                addresses: vec!["fd00::1/64".into()],
                ..v1::Interface::default()
            }],
            ..v1::ConfigureNetwork::default()
        }));
        let (resp, _) = agent.handle(&mut session, bad);
        assert_eq!(error_code(&resp), Some(Code::InvalidArgument));
        let failing = op(Op::Network(v1::ConfigureNetwork {
            hostname: "pod".into(),
            ..v1::ConfigureNetwork::default()
        }));
        let (resp, _) = agent.handle(&mut session, failing);
        assert_eq!(error_code(&resp), Some(Code::Internal));
        let ok = op(Op::Network(v1::ConfigureNetwork {
            dns_servers: vec!["1.1.1.1".into()],
            ..v1::ConfigureNetwork::default()
        }));
        let (resp, _) = agent.handle(&mut session, ok);
        assert_eq!(resp, v1::Response::ok());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("pod/resolv.conf")).unwrap(),
            "nameserver 1.1.1.1\n"
        );
    }

    #[test]
    fn remove_forgets_processes_and_shutdown_removes_all_then_exits() {
        let (agent, rx, _dir) = agent_with(FakeRuntime::default());
        let (mut host, mut guest) = UnixStream::pair().unwrap();
        let server = {
            let agent = Arc::clone(&agent);
            thread::spawn(move || serve_control(&*agent, &mut guest))
        };
        let mut call = |req: v1::Request| -> v1::Response {
            write_frame(&mut host, &req).unwrap();
            read_frame(&mut host).unwrap()
        };
        call(hello());
        for id in ["a", "b"] {
            assert!(error_code(&call(create_req(id, "sleep 30", false))).is_none());
        }
        assert_eq!(
            call(op(Op::Remove(v1::RemoveContainer { id: "a".into() }))),
            v1::Response::ok()
        );
        assert!(agent.processes.get("a", "").is_none());
        let resp = call(op(Op::Shutdown(v1::Shutdown { status: 300 })));
        assert_eq!(error_code(&resp), Some(Code::InvalidArgument));
        let resp = call(op(Op::Shutdown(v1::Shutdown { status: 3 })));
        assert_eq!(resp, v1::Response::ok());
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 3);
        server.join().unwrap();
        assert_eq!(agent.runtime().removed, ["a", "b"]);
        assert!(agent.processes.is_empty());
    }

    #[test]
    fn malformed_frame_gets_error_and_connection_continues() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let (mut host, mut guest) = UnixStream::pair().unwrap();
        let server = {
            let agent = Arc::clone(&agent);
            thread::spawn(move || serve_control(&*agent, &mut guest))
        };
        host.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).unwrap();
        let resp: v1::Response = read_frame(&mut host).unwrap();
        assert_eq!(error_code(&resp), Some(Code::InvalidArgument));
        write_frame(&mut host, &hello()).unwrap();
        let resp: v1::Response = read_frame(&mut host).unwrap();
        assert!(matches!(resp.result, Some(Reply::Hello(_))));
        // An oversized frame: an error, then the agent closes the connection.
        host.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let resp: v1::Response = read_frame(&mut host).unwrap();
        assert_eq!(error_code(&resp), Some(Code::InvalidArgument));
        assert!(matches!(
            read_frame::<v1::Response, _>(&mut host),
            Err(FrameError::Closed)
        ));
        server.join().unwrap();
    }

    #[test]
    fn wait_on_one_connection_does_not_block_another() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        agent.handle(&mut session, create_req("c", "sleep 30", false));
        let waiter = {
            let agent = Arc::clone(&agent);
            thread::spawn(move || {
                agent
                    .handle(&mut Session { greeted: true }, wait_req("c", ""))
                    .0
            })
        };
        thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished());
        // Another "connection" still gets answers while Wait blocks.
        let (resp, _) = agent.handle(
            &mut session,
            op(Op::Stats(v1::GetStats {
                container_id: "c".into(),
            })),
        );
        assert!(matches!(resp.result, Some(Reply::Stats(_))), "{resp:?}");
        agent
            .processes
            .get("c", "")
            .unwrap()
            .signal(libc::SIGKILL)
            .unwrap();
        let resp = waiter.join().unwrap();
        assert!(matches!(
            resp.result,
            Some(Reply::Wait(v1::WaitReply { status: 137, .. }))
        ));
    }

    #[test]
    fn stats_without_a_container_are_the_agents_own() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        agent.handle(&mut session, create_req("c", "sleep 30", false));
        let _slot = agent.connections.try_take().unwrap();
        let (resp, _) = agent.handle(
            &mut session,
            op(Op::Stats(v1::GetStats {
                container_id: String::new(),
            })),
        );
        let Some(Reply::Stats(s)) = resp.result else {
            panic!("{resp:?}")
        };
        assert!(
            s.agent_rss_bytes > 0 && s.agent_fds > 2 && s.agent_threads >= 1,
            "{s:?}"
        );
        assert_eq!((s.agent_processes, s.agent_connections), (1, 1), "{s:?}");
        agent
            .processes
            .get("c", "")
            .unwrap()
            .signal(libc::SIGKILL)
            .unwrap();
    }
}
