//! The agent's processes: container init processes and exec processes, their stdio
//! ends, and their exit status once reaped.
//!
//! Reaping rule: libcontainer `waitpid`s its own intermediate children during create
//! and exec, so the agent never calls `waitpid(-1)`; it reaps only the pids registered
//! here, with `waitpid(pid, WNOHANG | __WALL)`. `__WALL` matters: libcontainer clones
//! the container's init (and exec) process with `CLONE_PARENT` and *no* exit signal,
//! and a plain `waitpid` does not see such "clone" children. For the same reason
//! SIGCHLD never arrives for them, so the reaper does not wait for signals: it polls a
//! pidfd per process (readable once the process has ended) and a wake pipe (a new
//! registration), and re-checks every pid every [`RECHECK`] in any case (a kernel
//! without `pidfd_open`). A process that ends before it is registered stays a zombie
//! (nobody else reaps it: PID 1 reaps only orphans) and is reaped on the next pass.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use atoll_agent_proto::v1::attach::Stream;

/// Most processes (live or ended, not yet removed) the table holds.
pub const MAX_PROCESSES: usize = 1024;
/// How often every registered pid is re-checked even without a wake-up.
pub const RECHECK: Duration = Duration::from_millis(200);

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It called exit with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl Exit {
    /// Decodes a raw `waitpid` status.
    pub fn from_wait_status(raw: libc::c_int) -> Self {
        if libc::WIFSIGNALED(raw) {
            Self::Signal(libc::WTERMSIG(raw))
        } else {
            Self::Code(libc::WEXITSTATUS(raw))
        }
    }

    /// The status as a shell reports it: the code, or 128 + the signal.
    pub fn status(self) -> i32 {
        match self {
            Self::Code(code) => code,
            Self::Signal(signal) => 128 + signal,
        }
    }

    /// The killing signal, 0 for an exit.
    pub fn signal(self) -> i32 {
        match self {
            Self::Code(_) => 0,
            Self::Signal(signal) => signal,
        }
    }
}

/// The agent's ends of a process's stdio; each is handed out to one stream once.
#[derive(Debug, Default)]
pub struct StdioEnds {
    /// Write end of the process's stdin pipe.
    pub stdin: Option<File>,
    /// Read end of its stdout pipe.
    pub stdout: Option<File>,
    /// Read end of its stderr pipe.
    pub stderr: Option<File>,
    /// The pseudo-terminal master (both directions).
    pub tty: Option<File>,
}

/// Why a stream could not be attached.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttachError {
    /// The stream kind is not one of STDIN, STDOUT, STDERR, TTY.
    #[error("unknown stream {0}: expected STDIN, STDOUT, STDERR or TTY")]
    UnknownStream(i32),
    /// The process was not created with that stream.
    #[error("process {what} has no {stream} stream (it has {available})")]
    NoSuchStream {
        /// `container/exec`.
        what: String,
        /// The stream asked for.
        stream: &'static str,
        /// The streams it was created with.
        available: &'static str,
    },
    /// Someone attached it already.
    #[error("the {stream} stream of process {what} is already attached")]
    AlreadyAttached {
        /// `container/exec`.
        what: String,
        /// The stream asked for.
        stream: &'static str,
    },
}

/// Where the pump of a container init's output stream writes: the host
/// connection attached now. A host that goes away (a restarting atoll-cri) leaves
/// the pump holding its chunk and waiting: the process blocks once its pipe is
/// full, and a host that attaches again with `take_over` gets the rest. The last
/// [`REPLAY_BYTES`] written are kept with their offset in the stream, so a host
/// that says how far it got (`resume_from`) also gets what the old host was sent
/// but never stored.
#[derive(Debug, Default)]
pub struct OutputSink {
    state: Mutex<SinkState>,
    changed: Condvar,
    /// Held while a chunk is written and while a new host is given the replay, so
    /// no chunk lands between the replay and the switch.
    writing: Mutex<()>,
}

/// Bytes of an output stream kept for a host that resumes.
pub const REPLAY_BYTES: usize = 1 << 20;

/// How long a resuming host may take to read its replay.
const REPLAY_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct SinkState {
    /// Bytes of the stream written to a host so far.
    written: u64,
    /// The last of them (at most [`REPLAY_BYTES`]), ending at `written`.
    replay: std::collections::VecDeque<u8>,
    conn: Option<UnixStream>,
    /// Bumped at every take-over, so that a failed write only drops the
    /// connection it was made on.
    generation: u64,
    /// The process was removed: nobody will attach again.
    closed: bool,
    /// The output ended: a host attaching now gets its end at once.
    finished: bool,
    /// A pump writes through this sink (the stream was attached with `keep`).
    kept: bool,
}

impl OutputSink {
    fn state(&self) -> MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a pump writes through this sink.
    pub fn is_kept(&self) -> bool {
        self.state().kept
    }

    /// Makes `conn` the host connection, closing the one it replaces (or `conn`
    /// itself when the output has ended already). With `resume_from`, the bytes
    /// from that offset of the stream on that are still kept go to `conn` first;
    /// returns how many before them are no longer kept (lost to this host).
    pub fn attach(&self, mut conn: UnixStream, resume_from: Option<u64>) -> u64 {
        // Held to the switch: no chunk is written (nor `written` moved) meanwhile.
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let mut lost = 0;
        if let Some(from) = resume_from {
            // The tail is copied under the state lock and written without it, so
            // a slow host delays only this stream's pump, not `finish`/`close`.
            let tail: Vec<u8> = {
                let st = self.state();
                let kept_from = st.written - st.replay.len() as u64;
                let from = from.min(st.written);
                lost = kept_from.saturating_sub(from);
                let skip = usize::try_from(from.max(kept_from) - kept_from).unwrap_or(usize::MAX);
                let (a, b) = st.replay.as_slices();
                a.iter().chain(b).skip(skip).copied().collect()
            };
            let written = conn
                .set_write_timeout(Some(REPLAY_DEADLINE))
                .and_then(|()| conn.write_all(&tail))
                .and_then(|()| conn.set_write_timeout(None));
            if written.is_err() {
                let _ = conn.shutdown(Shutdown::Both);
                return lost;
            }
        }
        let old = {
            let mut st = self.state();
            st.generation += 1;
            st.kept = true;
            if st.finished || st.closed {
                Some(conn)
            } else {
                st.conn.replace(conn)
            }
        };
        if let Some(old) = old {
            let _ = old.shutdown(Shutdown::Both);
        }
        self.changed.notify_all();
        lost
    }

    /// Writes `data` to the host, waiting for one while none is attached;
    /// `false` once the sink is closed.
    pub fn deliver(&self, data: &[u8]) -> bool {
        loop {
            let (conn, generation) = {
                let mut st = self.state();
                loop {
                    if st.closed {
                        return false;
                    }
                    if let Some(c) = st.conn.as_ref().and_then(|c| c.try_clone().ok()) {
                        break (c, st.generation);
                    }
                    st = self
                        .changed
                        .wait(st)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            };
            let writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
            if self.state().generation != generation {
                // A new host took over while we waited to write: write to it.
                continue;
            }
            // A host that went away has closed its side; writing would still
            // succeed once (the bytes would sit in the dead connection), so look
            // first.
            if !peer_closed(&conn) && (&conn).write_all(data).is_ok() {
                let mut st = self.state();
                st.written += data.len() as u64;
                st.replay.extend(data.iter().copied());
                let over = st.replay.len().saturating_sub(REPLAY_BYTES);
                st.replay.drain(..over);
                return true;
            }
            drop(writing);
            let mut st = self.state();
            if st.generation == generation {
                if let Some(c) = st.conn.take() {
                    let _ = c.shutdown(Shutdown::Both);
                }
            }
        }
    }

    /// The output ended: the host sees EOF.
    pub fn finish(&self) {
        let mut st = self.state();
        st.finished = true;
        if let Some(c) = st.conn.take() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Nobody will attach again (the process is forgotten): a waiting pump ends.
    pub fn close(&self) {
        let mut st = self.state();
        st.closed = true;
        if let Some(c) = st.conn.take() {
            let _ = c.shutdown(Shutdown::Both);
        }
        drop(st);
        self.changed.notify_all();
    }
}

/// Whether the peer of `conn` closed its side: a non-blocking peek reads end of
/// file. Data waiting (a terminal's input) or nothing yet means it is there.
fn peer_closed(conn: &UnixStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv writes at most 1 byte into `byte`, which outlives the call; the
    // fd is open for the duration (borrowed from `conn`).
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            std::ptr::addr_of_mut!(byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

/// One registered process.
#[derive(Debug)]
pub struct Process {
    /// The container it belongs to.
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    /// Its pid in the agent's PID namespace.
    pub pid: libc::pid_t,
    /// Whether it was created with a terminal, and with stdin.
    terminal: bool,
    has_stdin: bool,
    /// A duplicate of the pty master, kept for TIOCSWINSZ.
    pty: Option<File>,
    state: Mutex<State>,
    ended: Condvar,
    /// The output sinks of STDOUT, STDERR and TTY (used for a container's init).
    sinks: [OutputSink; 3],
    /// A cgroup whose processes are killed once this one has ended
    /// ([`crate::container::Spawned::kill_on_exit`]).
    pub kill_on_exit: Option<std::path::PathBuf>,
}

#[derive(Debug)]
struct State {
    exit: Option<Exit>,
    ends: StdioEnds,
    attached: [bool; 4],
}

impl Process {
    /// A process with its stdio ends; `pty` is a duplicate of the terminal master.
    pub fn new(
        container_id: &str,
        exec_id: &str,
        pid: libc::pid_t,
        ends: StdioEnds,
        pty: Option<File>,
    ) -> Self {
        Self {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            pid,
            terminal: ends.tty.is_some(),
            has_stdin: ends.stdin.is_some(),
            pty,
            state: Mutex::new(State {
                exit: None,
                ends,
                attached: [false; 4],
            }),
            ended: Condvar::new(),
            sinks: Default::default(),
            kill_on_exit: None,
        }
    }

    /// The output sink of `stream` (STDOUT, STDERR or TTY).
    pub fn sink(&self, stream: Stream) -> Option<&OutputSink> {
        match stream {
            Stream::Stdout => self.sinks.first(),
            Stream::Stderr => self.sinks.get(1),
            Stream::Tty => self.sinks.get(2),
            _ => None,
        }
    }

    /// Whether `stream` was attached once already.
    pub fn was_attached(&self, stream: Stream) -> bool {
        let slot = match stream {
            Stream::Stdin => 0,
            Stream::Stdout => 1,
            Stream::Stderr => 2,
            Stream::Tty => 3,
            _ => return false,
        };
        self.state().attached.get(slot).copied().unwrap_or(false)
    }

    /// Closes every output sink (the process is forgotten).
    pub fn close_sinks(&self) {
        for s in &self.sinks {
            s.close();
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `container` or `container/exec`, for messages.
    pub fn name(&self) -> String {
        if self.exec_id.is_empty() {
            self.container_id.clone()
        } else {
            format!("{}/{}", self.container_id, self.exec_id)
        }
    }

    /// Blocks until the process has been reaped.
    pub fn wait(&self) -> Exit {
        let mut state = self.state();
        loop {
            if let Some(exit) = state.exit {
                return exit;
            }
            state = self
                .ended
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The exit, if reaped already.
    pub fn exit(&self) -> Option<Exit> {
        self.state().exit
    }

    /// The pty master for resizing, if the process has a terminal.
    pub fn pty(&self) -> Option<&File> {
        self.pty.as_ref()
    }

    /// Sends `signal` unless the process was reaped (its pid may name another process
    /// by now); returns whether it was sent. The state lock is held across `kill`, and
    /// reaping takes the same lock, so the pid cannot be reused in between.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<bool> {
        let state = self.state();
        if state.exit.is_some() {
            return Ok(false);
        }
        // SAFETY: kill has no memory arguments; the pid is our unreaped child.
        if unsafe { libc::kill(self.pid, signal) } == -1 {
            return Err(io::Error::last_os_error());
        }
        drop(state);
        Ok(true)
    }

    /// Runs `f` unless the process was reaped, holding the state lock so that it
    /// cannot be reaped (and its pid reused) meanwhile; `None` if it had ended.
    pub fn while_running<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let state = self.state();
        if state.exit.is_some() {
            return None;
        }
        let result = f();
        drop(state);
        Some(result)
    }

    /// Hands out one stdio end; each stream can be taken once.
    pub fn take_stream(&self, stream: Stream) -> Result<File, AttachError> {
        let (slot, label) = match stream {
            Stream::Stdin => (0, "STDIN"),
            Stream::Stdout => (1, "STDOUT"),
            Stream::Stderr => (2, "STDERR"),
            Stream::Tty => (3, "TTY"),
            Stream::Unspecified | Stream::Tcp | Stream::Volume => {
                return Err(AttachError::UnknownStream(stream as i32))
            }
        };
        let mut state = self.state();
        let state = &mut *state;
        let end = match stream {
            Stream::Stdin => &mut state.ends.stdin,
            Stream::Stdout => &mut state.ends.stdout,
            Stream::Stderr => &mut state.ends.stderr,
            _ => &mut state.ends.tty,
        };
        if let Some(file) = end.take() {
            if let Some(flag) = state.attached.get_mut(slot) {
                *flag = true;
            }
            return Ok(file);
        }
        if state.attached.get(slot).copied().unwrap_or(false) {
            return Err(AttachError::AlreadyAttached {
                what: self.name(),
                stream: label,
            });
        }
        Err(AttachError::NoSuchStream {
            what: self.name(),
            stream: label,
            available: match (self.terminal, self.has_stdin) {
                (true, _) => "TTY",
                (false, true) => "STDIN, STDOUT, STDERR",
                (false, false) => "STDOUT, STDERR",
            },
        })
    }

    /// Asks `wait_pid` about this process once and records its exit; `true` when it
    /// has been reaped (now or before).
    fn try_reap(&self, wait_pid: &mut impl FnMut(libc::pid_t) -> WaitOutcome) -> bool {
        let mut state = self.state();
        if state.exit.is_some() {
            return true;
        }
        let exit = match wait_pid(self.pid) {
            WaitOutcome::Running => return false,
            WaitOutcome::Exited(raw) => Exit::from_wait_status(raw),
            WaitOutcome::Lost => {
                eprintln!(
                    "atoll-init agent: process {} (pid {}) is not our child any more; reporting status 255",
                    self.name(),
                    self.pid
                );
                Exit::Code(255)
            }
        };
        state.exit = Some(exit);
        drop(state);
        if let Some(cgroup) = &self.kill_on_exit {
            if let Err(e) = crate::container::pidns::kill_cgroup(cgroup) {
                eprintln!(
                    "atoll-init agent: cannot kill what is left of {} ({}): {e}",
                    self.name(),
                    cgroup.display()
                );
            }
        }
        self.ended.notify_all();
        true
    }
}

/// What a non-blocking wait for one pid found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Still running.
    Running,
    /// Ended with this raw wait status.
    Exited(libc::c_int),
    /// Not a child of ours (ECHILD): it can never be reaped here.
    Lost,
}

/// `waitpid(pid, WNOHANG | __WALL)`.
pub fn wait_pid_nohang(pid: libc::pid_t) -> WaitOutcome {
    let mut raw: libc::c_int = 0;
    loop {
        // SAFETY: `raw` is a valid, writable int for the duration of the call.
        let rc = unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG | libc::__WALL) };
        if rc == pid {
            return WaitOutcome::Exited(raw);
        }
        if rc == 0 {
            return WaitOutcome::Running;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            _ => return WaitOutcome::Lost,
        }
    }
}

/// The state letter and parent pid from `/proc/<pid>/stat` (`pid (comm) S ppid ...`;
/// `comm` may itself hold spaces and parentheses, so parse after the last `)`).
pub fn parse_stat(stat: &str) -> Option<(char, libc::pid_t)> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Why a process could not be registered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    /// The table is full.
    #[error("too many processes ({MAX_PROCESSES}); remove containers that have ended")]
    Full,
    /// That container/exec id pair is taken.
    #[error("process {0} already exists")]
    Exists(String),
}

/// Every registered process, by `(container_id, exec_id)`.
#[derive(Debug)]
pub struct ProcessTable {
    inner: Mutex<Table>,
    /// Written on registration so the reaper re-reads its poll set.
    wake_write: OwnedFd,
    wake_read: OwnedFd,
}

#[derive(Debug, Default)]
struct Table {
    by_id: HashMap<(String, String), Arc<Process>>,
    /// Not reaped yet (also after removal from `by_id`: a zombie must still be
    /// reaped), with a pidfd when the kernel has `pidfd_open`.
    unreaped: Vec<(Arc<Process>, Option<Arc<OwnedFd>>)>,
}

impl ProcessTable {
    /// An empty table.
    pub fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so the fd is open and owned by nobody else.
        let wake_read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: as above, the write end.
        let wake_write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        Ok(Self {
            inner: Mutex::new(Table::default()),
            wake_write,
            wake_read,
        })
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fails when `(container_id, exec_id)` is taken or the table is full.
    pub fn check_free(&self, container_id: &str, exec_id: &str) -> Result<(), RegisterError> {
        let table = self.table();
        let key = (container_id.to_owned(), exec_id.to_owned());
        if table.by_id.contains_key(&key) {
            return Err(RegisterError::Exists(format!("{container_id}/{exec_id}")));
        }
        if table.by_id.len() >= MAX_PROCESSES {
            return Err(RegisterError::Full);
        }
        Ok(())
    }

    /// Adds a process and wakes the reaper. An entry of the same id is replaced (a
    /// stale one: the runtime accepted the id, so the old container is gone).
    pub fn register(&self, process: Process) -> Arc<Process> {
        let process = Arc::new(process);
        let pidfd = pidfd_open(process.pid).ok().map(Arc::new);
        {
            let mut table = self.table();
            table.by_id.insert(
                (process.container_id.clone(), process.exec_id.clone()),
                Arc::clone(&process),
            );
            table.unreaped.push((Arc::clone(&process), pidfd));
        }
        self.wake();
        process
    }

    /// The process `exec_id` (empty: init) of `container_id`.
    pub fn get(&self, container_id: &str, exec_id: &str) -> Option<Arc<Process>> {
        self.table()
            .by_id
            .get(&(container_id.to_owned(), exec_id.to_owned()))
            .cloned()
    }

    /// Forgets the exec process `process` once its exit went to a waiter: a probe
    /// running ExecSync forever must not fill the table. (Init processes stay until
    /// their container is removed.)
    pub fn forget_exec(&self, process: &Arc<Process>) {
        if process.exec_id.is_empty() {
            return;
        }
        let mut table = self.table();
        let key = (process.container_id.clone(), process.exec_id.clone());
        if table
            .by_id
            .get(&key)
            .is_some_and(|p| Arc::ptr_eq(p, process))
        {
            table.by_id.remove(&key);
        }
    }

    /// Forgets every process of a container. Waiters keep their `Arc` and still get
    /// the status; unreaped ones stay with the reaper.
    pub fn remove_container(&self, container_id: &str) {
        self.table().by_id.retain(|(container, _), p| {
            let keep = container != container_id;
            if !keep {
                p.close_sinks();
            }
            keep
        });
    }

    /// Number of processes known by id.
    pub fn len(&self) -> usize {
        self.table().by_id.len()
    }

    /// Whether no process is known by id.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reaps zombie children of the agent that no one registered: what a failed
    /// create or exec leaves behind (libcontainer's process died before `execve`,
    /// after libcontainer stopped watching it). Such a zombie would keep the
    /// container's cgroup populated and its PID namespace alive, so stopping the
    /// container would hang. Call it only while the runtime lock is held and after
    /// every successful spawn was registered: then no zombie child is libcontainer's
    /// to wait for, nor a registered process's (those are skipped anyway).
    pub fn reap_strays(&self) -> usize {
        self.reap_strays_where(|_| true)
    }

    /// [`Self::reap_strays`] among the pids `consider` accepts (tests share one
    /// process, so each looks only at its own children).
    fn reap_strays_where(&self, consider: impl Fn(libc::pid_t) -> bool) -> usize {
        let me = std::process::id();
        let registered: Vec<libc::pid_t> = self
            .table()
            .unreaped
            .iter()
            .map(|(process, _)| process.pid)
            .collect();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return 0;
        };
        let mut reaped = 0;
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            if !consider(pid) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            match parse_stat(&stat) {
                Some((state, ppid))
                    if state == 'Z'
                        && u32::try_from(ppid).is_ok_and(|p| p == me)
                        && !registered.contains(&pid) =>
                {
                    if matches!(wait_pid_nohang(pid), WaitOutcome::Exited(_)) {
                        reaped += 1;
                    }
                }
                _ => {}
            }
        }
        reaped
    }

    fn wake(&self) {
        let byte = 1u8;
        // SAFETY: writes one byte from a valid buffer to our own pipe; a full pipe
        // (EAGAIN) already means a wake-up is pending.
        let _ = unsafe { libc::write(self.wake_write.as_raw_fd(), (&byte as *const u8).cast(), 1) };
    }

    /// One reaping pass over every unreaped process.
    pub fn reap_pass(&self, mut wait_pid: impl FnMut(libc::pid_t) -> WaitOutcome) {
        let pending: Vec<Arc<Process>> = self
            .table()
            .unreaped
            .iter()
            .map(|(process, _)| Arc::clone(process))
            .collect();
        let mut reaped = Vec::new();
        for process in pending {
            if process.try_reap(&mut wait_pid) {
                reaped.push(process);
            }
        }
        if !reaped.is_empty() {
            self.table()
                .unreaped
                .retain(|(p, _)| !reaped.iter().any(|r| Arc::ptr_eq(p, r)));
        }
    }

    /// Blocks until a registered process may have ended, a registration happened, or
    /// [`RECHECK`] passed.
    fn wait_for_change(&self) {
        let pidfds: Vec<Arc<OwnedFd>> = self
            .table()
            .unreaped
            .iter()
            .filter_map(|(_, fd)| fd.clone())
            .collect();
        let mut polls: Vec<libc::pollfd> = std::iter::once(self.wake_read.as_fd())
            .chain(pidfds.iter().map(|fd| fd.as_fd()))
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let timeout = libc::c_int::try_from(RECHECK.as_millis()).unwrap_or(200);
        let count = libc::nfds_t::try_from(polls.len()).unwrap_or(0);
        // SAFETY: `polls` is a valid array of `count` pollfds; the fds stay open while
        // `pidfds` and `self` hold them.
        let _ = unsafe { libc::poll(polls.as_mut_ptr(), count, timeout) };
        let mut buf = [0u8; 64];
        // SAFETY: reads into a valid buffer from our non-blocking wake pipe.
        while unsafe {
            libc::read(
                self.wake_read.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        } > 0
        {}
    }

    /// Starts the reaper thread (it runs for the life of the agent).
    pub fn spawn_reaper(self: &Arc<Self>) -> io::Result<thread::JoinHandle<()>> {
        let table = Arc::clone(self);
        thread::Builder::new()
            .name("reaper".into())
            .spawn(move || loop {
                table.reap_pass(wait_pid_nohang);
                table.wait_for_change();
            })
    }
}

/// `pidfd_open(pid, 0)`: an fd that polls readable once the process has ended.
fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, no memory.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(rc).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Which attach stream a protocol value names.
pub fn stream_of(value: i32) -> Result<Stream, AttachError> {
    Stream::try_from(value).map_err(|_| AttachError::UnknownStream(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Instant;

    fn pipe_ends() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: valid array for pipe2.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: just created and owned here.
        let read = unsafe { File::from_raw_fd(fds[0]) };
        // SAFETY: as above.
        let write = unsafe { File::from_raw_fd(fds[1]) };
        (read, write)
    }

    #[test]
    fn exit_status_is_code_or_128_plus_signal() {
        assert_eq!(Exit::from_wait_status(3 << 8), Exit::Code(3));
        assert_eq!(Exit::from_wait_status(libc::SIGKILL), Exit::Signal(9));
        assert_eq!(Exit::Code(3).status(), 3);
        assert_eq!(Exit::Signal(9).status(), 137);
        assert_eq!(Exit::Signal(15).signal(), 15);
        assert_eq!(Exit::Code(0).signal(), 0);
    }

    #[test]
    fn wait_returns_after_status_arrives_from_reap_pass() {
        let table = Arc::new(ProcessTable::new().unwrap());
        let process = table.register(Process::new("c", "", 4242, StdioEnds::default(), None));
        let waiter = {
            let process = Arc::clone(&process);
            thread::spawn(move || process.wait())
        };
        thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished());
        table.reap_pass(|pid| {
            assert_eq!(pid, 4242);
            WaitOutcome::Running
        });
        assert_eq!(process.exit(), None);
        table.reap_pass(|_| WaitOutcome::Exited(7 << 8));
        assert_eq!(waiter.join().unwrap(), Exit::Code(7));
        // Reaped once: later passes do not ask about the pid again.
        table.reap_pass(|pid| panic!("pid {pid} asked again"));
    }

    #[test]
    fn stat_lines_give_state_and_parent() {
        assert_eq!(parse_stat("42 (sh) Z 7 42 42 0"), Some(('Z', 7)));
        assert_eq!(parse_stat("42 (a b) c) d) S 9 1"), Some(('S', 9)));
        assert_eq!(parse_stat("42 (sh)"), None);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) R notanumber"), None);
    }

    #[test]
    #[allow(clippy::zombie_processes)] // The table reaps them, not `Child`.
    fn strays_are_reaped_but_registered_children_are_left_to_the_reaper() {
        let table = ProcessTable::new().unwrap();
        let stray = Command::new("/bin/true").spawn().unwrap();
        let kept = Command::new("/bin/true").spawn().unwrap();
        let kept_pid = kept.id() as libc::pid_t;
        table.register(Process::new("c", "", kept_pid, StdioEnds::default(), None));
        let zombie = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parse_stat(&s))
                .is_some_and(|(state, _)| state == 'Z')
        };
        for _ in 0..500 {
            if zombie(stray.id()) && zombie(kept.id()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let stray_pid = stray.id() as libc::pid_t;
        let ours = |pid| pid == stray_pid || pid == kept_pid;
        assert_eq!(table.reap_strays_where(ours), 1);
        assert!(!zombie(stray.id()), "the stray was reaped");
        assert!(
            zombie(kept.id()),
            "the registered one is left to the reaper"
        );
        assert!(matches!(wait_pid_nohang(kept_pid), WaitOutcome::Exited(_)));
    }

    #[test]
    #[allow(clippy::zombie_processes)] // The table reaps it, not `Child`.
    fn reaper_reaps_a_real_child_that_ended_before_registration() {
        let child = Command::new("/bin/sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // Let it end: it stays a zombie because nobody waits for it.
        thread::sleep(Duration::from_millis(100));
        let table = Arc::new(ProcessTable::new().unwrap());
        table.spawn_reaper().unwrap();
        let process = table.register(Process::new("c", "e", pid, StdioEnds::default(), None));
        let started = Instant::now();
        assert_eq!(process.wait(), Exit::Code(3));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    #[allow(clippy::zombie_processes)] // The table reaps it, not `Child`.
    fn reaper_sees_a_signal_death_promptly() {
        let child = Command::new("/bin/sleep").arg("30").spawn().unwrap();
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        let table = Arc::new(ProcessTable::new().unwrap());
        table.spawn_reaper().unwrap();
        let process = table.register(Process::new("c", "", pid, StdioEnds::default(), None));
        assert!(process.signal(libc::SIGTERM).unwrap());
        let exit = process.wait();
        assert_eq!(exit, Exit::Signal(libc::SIGTERM));
        assert_eq!(exit.status(), 143);
        // Reaped: a later signal is not sent to a pid that may be reused.
        assert!(!process.signal(libc::SIGKILL).unwrap());
    }

    #[test]
    fn not_our_child_is_reported_lost_not_waited_forever() {
        assert_eq!(wait_pid_nohang(1), WaitOutcome::Lost);
    }

    #[test]
    fn streams_are_handed_out_once() {
        let (_r, w) = pipe_ends();
        let (r2, _w2) = pipe_ends();
        let process = Process::new(
            "c",
            "",
            1,
            StdioEnds {
                stdin: Some(w),
                stdout: Some(r2),
                ..StdioEnds::default()
            },
            None,
        );
        assert!(process.take_stream(Stream::Stdout).is_ok());
        assert_eq!(
            process.take_stream(Stream::Stdout).unwrap_err(),
            AttachError::AlreadyAttached {
                what: "c".into(),
                stream: "STDOUT"
            }
        );
        let err = process.take_stream(Stream::Tty).unwrap_err();
        assert!(matches!(
            err,
            AttachError::NoSuchStream { stream: "TTY", .. }
        ));
        assert_eq!(
            err.to_string(),
            "process c has no TTY stream (it has STDIN, STDOUT, STDERR)"
        );
        assert!(process.take_stream(Stream::Stdin).is_ok());
        assert!(matches!(
            process.take_stream(Stream::Unspecified),
            Err(AttachError::UnknownStream(0))
        ));
    }

    #[test]
    fn table_refuses_taken_ids_and_forgets_removed_containers() {
        let table = ProcessTable::new().unwrap();
        table.register(Process::new("c", "", 1, StdioEnds::default(), None));
        table.register(Process::new("c", "e1", 2, StdioEnds::default(), None));
        table.register(Process::new("d", "", 3, StdioEnds::default(), None));
        assert_eq!(
            table.check_free("c", "e1"),
            Err(RegisterError::Exists("c/e1".into()))
        );
        assert_eq!(table.check_free("c", "e2"), Ok(()));
        table.remove_container("c");
        assert!(table.get("c", "").is_none());
        assert!(table.get("c", "e1").is_none());
        assert_eq!(table.get("d", "").map(|p| p.pid), Some(3));
        assert_eq!(table.len(), 1);
    }
}
