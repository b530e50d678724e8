//! The calls into youki's `libcontainer`: create (init process stopped before exec),
//! start, exec (tenant), kill and delete, plus the terminal plumbing (a console
//! socket that receives the pty master by `SCM_RIGHTS`).
//!
//! Process ownership (checked in libcontainer 0.7's source, `process/fork.rs` and
//! `container_intermediate_process.rs`): the intermediate process is a plain child of
//! the caller and is reaped by libcontainer itself (`waitpid(intermediate)`); the
//! container's init (and every exec'd process) is cloned by the intermediate with
//! `CLONE_PARENT`, so it is a child of the caller — the agent — and inherits the
//! intermediate's exit signal (`SIGCHLD`). The pid libcontainer returns comes from
//! that `clone` in the intermediate, whose own PID namespace is still the agent's, so
//! it is the pid the agent must wait for.
//!
//! Create and exec run libcontainer in a forked, single-threaded child of the agent
//! (`super::forked`), whose orphans the agent (a child subreaper) then adopts: the
//! container's processes end up the agent's children all the same.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ::libcontainer::container::builder::ContainerBuilder;
use ::libcontainer::container::{Container, ContainerStatus};
use ::libcontainer::error::LibcontainerError;
use ::libcontainer::syscall::syscall::SyscallType;
use ::libcontainer::workload::default::DefaultExecutor;
use ::libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::{LinuxSeccomp, Spec};

use super::{forked, RuntimeError, Spawned, Stdio};

/// `message: cause: cause...`, because libcontainer's top-level messages alone
/// ("failed to create container") do not say what went wrong.
pub fn chain(message: &str, err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("{message}: {err}");
    let mut source = err.source();
    let mut depth = 0;
    while let Some(s) = source {
        if depth > 8 {
            break;
        }
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
        depth += 1;
    }
    out
}

fn internal(message: &str, err: &(dyn std::error::Error + 'static)) -> RuntimeError {
    RuntimeError::Internal(chain(message, err))
}

fn status_error(id: &str, what: &str, err: LibcontainerError) -> RuntimeError {
    match err {
        LibcontainerError::IncorrectStatus(status) => RuntimeError::FailedPrecondition(format!(
            "cannot {what} container {id:?}: it is {status}"
        )),
        LibcontainerError::Exist => {
            RuntimeError::AlreadyExists(format!("container {id:?} already exists"))
        }
        LibcontainerError::NoDirectory => RuntimeError::NotFound(format!("no container {id:?}")),
        other => internal(&format!("cannot {what} container {id:?}"), &other),
    }
}

/// Runs the workload like [`DefaultExecutor`], first loading `seccomp` when set: an
/// exec'd (tenant) process does not get the container's `linux.seccomp` from
/// libcontainer 0.7 (it rebuilds `linux` with only namespaces and cgroup), so the
/// runtime applies it here, in the new process, right before `execve`.
#[derive(Clone)]
pub struct AtollExecutor {
    /// The profile an exec'd process must run under.
    pub seccomp: Option<LinuxSeccomp>,
}

impl Executor for AtollExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(profile) = &self.seccomp {
            load_seccomp(profile)?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

fn load_seccomp(profile: &LinuxSeccomp) -> Result<(), ExecutorError> {
    if ::libcontainer::seccomp::initialize_seccomp(profile).is_ok() {
        return Ok(());
    }
    // Without CAP_SYS_ADMIN (capabilities are already dropped here), the kernel only
    // takes a filter from a no_new_privs process: confinement wins over setuid.
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(ExecutorError::Other(format!(
            "cannot set no_new_privs for seccomp: {}",
            io::Error::last_os_error()
        )));
    }
    ::libcontainer::seccomp::initialize_seccomp(profile)
        .map(|_| ())
        .map_err(|e| ExecutorError::Other(chain("cannot load the seccomp profile", &e)))
}

fn dev_null() -> Result<OwnedFd, RuntimeError> {
    std::fs::File::open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| internal("cannot open /dev/null", &e))
}

/// A listening console socket; libcontainer connects to it during create and sends
/// the pty master.
struct ConsoleSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    fn bind(path: PathBuf) -> Result<Self, RuntimeError> {
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| internal(&format!("cannot listen on {}", path.display()), &e))?;
        Ok(Self { path, listener })
    }

    /// Takes the master libcontainer sent and sets its window size.
    fn receive(self, rows: u16, cols: u16) -> Result<OwnedFd, RuntimeError> {
        self.listener
            .set_nonblocking(true)
            .map_err(|e| internal("console socket", &e))?;
        let (stream, _) = self
            .listener
            .accept()
            .map_err(|e| internal("libcontainer did not connect to the console socket", &e))?;
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(10))))
            .map_err(|e| internal("console socket", &e))?;
        let master = recv_fd(stream.as_raw_fd())?;
        set_winsize(&master, rows, cols)
            .map_err(|e| internal("cannot set the terminal size", &e))?;
        Ok(master)
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn recv_fd(socket: i32) -> Result<OwnedFd, RuntimeError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let mut buf = [0u8; 256];
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let msg = recvmsg::<UnixAddr>(
        socket,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| internal("cannot receive the terminal from libcontainer", &e))?;
    let mut received: Vec<OwnedFd> = Vec::new();
    for cmsg in msg
        .cmsgs()
        .map_err(|e| internal("cannot receive the terminal from libcontainer", &e))?
    {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed this fd for us; nothing else owns it.
                received.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    // Extra fds (none expected) are closed when `received` drops.
    if received.is_empty() {
        return Err(RuntimeError::Internal(
            "libcontainer sent no terminal on the console socket".into(),
        ));
    }
    Ok(received.swap_remove(0))
}

/// Sets a terminal's window size (`TIOCSWINSZ`).
pub fn set_winsize(fd: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is valid.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TIOCSWINSZ,
            &size as *const libc::winsize,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where libcontainer keeps its state, and where console sockets are made.
#[derive(Debug, Clone)]
pub struct Engine {
    /// libcontainer's root (`<root>/state`).
    pub state: PathBuf,
    /// Directory of the short-lived console sockets.
    pub sockets: PathBuf,
}

enum Prepared {
    Pipes,
    Terminal {
        socket: ConsoleSocket,
        rows: u16,
        cols: u16,
    },
}

impl Engine {
    fn builder(
        &self,
        id: &str,
        stdio: Stdio,
        tty_name: &str,
        seccomp: Option<LinuxSeccomp>,
    ) -> Result<(ContainerBuilder, Prepared), RuntimeError> {
        std::fs::create_dir_all(&self.state)
            .map_err(|e| internal(&format!("cannot create {}", self.state.display()), &e))?;
        let mut builder = ContainerBuilder::new(id.to_owned(), SyscallType::default())
            .with_root_path(&self.state)
            .map_err(|e| internal("libcontainer state", &e))?
            .with_executor(AtollExecutor { seccomp });
        let prepared = match stdio {
            Stdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                let stdin = match stdin {
                    Some(fd) => fd,
                    None => dev_null()?,
                };
                builder = builder
                    .with_stdin(stdin)
                    .with_stdout(stdout)
                    .with_stderr(stderr);
                Prepared::Pipes
            }
            Stdio::Terminal { rows, cols } => {
                std::fs::create_dir_all(&self.sockets).map_err(|e| {
                    internal(&format!("cannot create {}", self.sockets.display()), &e)
                })?;
                let socket = ConsoleSocket::bind(self.sockets.join(tty_name))?;
                builder = builder.with_console_socket(Some(&socket.path));
                Prepared::Terminal { socket, rows, cols }
            }
        };
        Ok((builder, prepared))
    }

    /// Creates container `id` from `bundle`: returns its init process, stopped until
    /// [`Engine::start`].
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        stdio: Stdio,
        tty_name: &str,
    ) -> Result<Spawned, RuntimeError> {
        let (builder, prepared) = self.builder(id, stdio, tty_name, None)?;
        let pid = forked::call(&format!("create {id:?}"), forked::DEADLINE, || {
            let container = builder
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| status_error(id, "create", e))?;
            Ok(container
                .pid()
                .ok_or_else(|| RuntimeError::Internal(format!("container {id:?} has no init pid")))?
                .as_raw())
        })?;
        let pty_master = match prepared {
            Prepared::Pipes => None,
            Prepared::Terminal { socket, rows, cols } => Some(socket.receive(rows, cols)?),
        };
        Ok(Spawned {
            pid,
            pty_master,
            kill_on_exit: None,
        })
    }

    fn load(&self, id: &str) -> Result<Container, RuntimeError> {
        let dir = self.state.join(id);
        if !dir.is_dir() {
            return Err(RuntimeError::NotFound(format!("no container {id:?}")));
        }
        Container::load(dir).map_err(|e| status_error(id, "load", e))
    }

    /// Lets the created container's init process exec its command.
    pub fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.load(id)?
            .start()
            .map_err(|e| status_error(id, "start", e))
    }

    /// Runs the process described by `process_json` in the running container `id`,
    /// confined by `seccomp`. Returns once the process has exec'd.
    pub fn exec(
        &self,
        id: &str,
        process_json: &Path,
        seccomp: Option<LinuxSeccomp>,
        stdio: Stdio,
        tty_name: &str,
    ) -> Result<Spawned, RuntimeError> {
        let (builder, prepared) = self.builder(id, stdio, tty_name, seccomp)?;
        let pid = forked::call(&format!("exec in {id:?}"), forked::DEADLINE, || {
            Ok(builder
                .as_tenant()
                .with_process(Some(process_json))
                .with_detach(true)
                .build()
                .map_err(|e| status_error(id, "exec in", e))?
                .as_raw())
        })?;
        let pty_master = match prepared {
            Prepared::Pipes => None,
            Prepared::Terminal { socket, rows, cols } => Some(socket.receive(rows, cols)?),
        };
        Ok(Spawned {
            pid,
            pty_master,
            kill_on_exit: None,
        })
    }

    /// Sends `signal` to the init process, or to every process of the container.
    pub fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        let signal = ::libcontainer::signal::Signal::try_from(signal)
            .map_err(|_| RuntimeError::InvalidArgument(format!("{signal} is not a signal")))?;
        self.load(id)?
            .kill(signal, all)
            .map_err(|e| status_error(id, "signal", e))
    }

    /// Kills everything (SIGKILL), waits up to `wait` for the init process to be gone
    /// (exited, or a zombie the agent has yet to reap), then deletes the container's
    /// state and cgroup. Nothing to do when libcontainer has no such container.
    pub fn destroy(&self, id: &str, wait: Duration) -> Result<(), RuntimeError> {
        let mut container = match self.load(id) {
            Ok(c) => c,
            Err(RuntimeError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let _ = container.kill(nix::sys::signal::Signal::SIGKILL, true);
        let deadline = std::time::Instant::now() + wait;
        loop {
            if container.refresh_status().is_err() || container.status() == ContainerStatus::Stopped
            {
                break;
            }
            if std::time::Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        container
            .delete(true)
            .map_err(|e| status_error(id, "delete", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] io::Error);

    #[test]
    fn chain_lists_every_cause() {
        let err = Outer(io::Error::other("inner"));
        assert_eq!(chain("cannot x", &err), "cannot x: outer: inner");
    }

    #[test]
    fn status_error_maps_libcontainer_states() {
        let e = status_error(
            "c",
            "start",
            LibcontainerError::IncorrectStatus(ContainerStatus::Running),
        );
        assert!(matches!(e, RuntimeError::FailedPrecondition(_)));
        assert!(
            e.to_string().contains("cannot start container \"c\""),
            "{e}"
        );
        assert!(matches!(
            status_error("c", "x", LibcontainerError::Exist),
            RuntimeError::AlreadyExists(_)
        ));
        assert!(matches!(
            status_error("c", "x", LibcontainerError::NoDirectory),
            RuntimeError::NotFound(_)
        ));
    }

    #[test]
    fn engine_load_missing_container_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine {
            state: dir.path().join("state"),
            sockets: dir.path().join("tty"),
        };
        assert!(matches!(
            engine.start("nope"),
            Err(RuntimeError::NotFound(_))
        ));
        assert!(matches!(
            engine.kill("nope", 15, false),
            Err(RuntimeError::NotFound(_))
        ));
        assert!(engine.destroy("nope", Duration::ZERO).is_ok());
    }

    #[test]
    fn engine_kill_bad_signal_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine {
            state: dir.path().into(),
            sockets: dir.path().into(),
        };
        assert!(matches!(
            engine.kill("c", 999, false),
            Err(RuntimeError::InvalidArgument(_))
        ));
    }

    #[test]
    fn console_socket_receives_fd_and_sets_size() {
        let dir = tempfile::tempdir().unwrap();
        let socket = ConsoleSocket::bind(dir.path().join("t.sock")).unwrap();
        // Play libcontainer: connect, send a pty master with SCM_RIGHTS, before accept.
        let pty = nix::pty::openpty(None, None).unwrap();
        let client = std::os::unix::net::UnixStream::connect(&socket.path).unwrap();
        let fds = [pty.master.as_raw_fd()];
        let iov = [io::IoSlice::new(b"/dev/ptmx")];
        nix::sys::socket::sendmsg::<nix::sys::socket::UnixAddr>(
            client.as_raw_fd(),
            &iov,
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .unwrap();
        let path = socket.path.clone();
        let master = socket.receive(33, 120).unwrap();
        let mut ws: libc::winsize = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize into a valid pointer.
        let rc = unsafe {
            libc::ioctl(
                master.as_raw_fd(),
                libc::TIOCGWINSZ,
                &mut ws as *mut libc::winsize,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (33, 120));
        assert!(!path.exists(), "the socket file is removed");
    }

    #[test]
    fn console_socket_without_connection_fails_instead_of_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let socket = ConsoleSocket::bind(dir.path().join("t.sock")).unwrap();
        let err = socket.receive(24, 80).unwrap_err();
        assert!(err.to_string().contains("did not connect"), "{err}");
    }
}
