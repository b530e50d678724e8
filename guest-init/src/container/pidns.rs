//! The pod's shared PID namespace (Kubernetes' `shareProcessNamespace`, the CRI's
//! `NamespaceMode::POD` for `pid`).
//!
//! Each container normally gets a PID namespace of its own. Containers that ask for
//! the pod's instead join one namespace whose PID 1 is a pause process, as the pause
//! container is on a node: `atoll-init pause` unshares a PID namespace and forks its
//! init, which only reaps what is orphaned to it. The agent starts it with the first
//! such container; it lives until the VM ends (its death would kill every process in
//! the namespace, as an init's does).
//!
//! A container in the shared namespace does not take its processes with it when its
//! init exits (a private namespace's init does), so the agent then kills what is left
//! in the container's cgroup (`cgroup.kill`), as containerd does for such containers.

use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The argument that selects the pause mode of the `atoll-init` binary.
pub const PAUSE_ARG: &str = "pause";

/// The holder of the pod's PID namespace.
#[derive(Debug)]
pub struct PodPidNs {
    /// `atoll-init pause`, in the agent's namespace: it waits for the init it forked.
    holder: Child,
    /// That init's pid, as the agent sees it (PID 1 inside).
    init: u32,
}

impl PodPidNs {
    /// Starts `exe pause` and learns its namespace's init.
    pub fn start(exe: &Path) -> io::Result<Self> {
        let mut holder = Command::new(exe)
            .arg(PAUSE_ARG)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let line = holder
            .stdout
            .take()
            .map(|out| {
                let mut line = String::new();
                BufReader::new(out).read_line(&mut line).map(|_| line)
            })
            .unwrap_or_else(|| Ok(String::new()));
        let init = line
            .as_ref()
            .ok()
            .and_then(|l| l.trim().parse::<u32>().ok());
        match init {
            Some(init) if init > 1 => Ok(Self { holder, init }),
            _ => {
                let _ = holder.kill();
                let _ = holder.wait();
                Err(io::Error::other(format!(
                    "the pod's pause process did not report its namespace ({line:?})"
                )))
            }
        }
    }

    /// The namespace, for the spec's `linux.namespaces[].path`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/pid", self.init))
    }

    /// Whether the namespace still has its init.
    pub fn alive(&mut self) -> bool {
        matches!(self.holder.try_wait(), Ok(None)) && self.path().exists()
    }
}

/// `atoll-init pause`: makes a PID namespace, forks its init, prints the init's pid
/// and waits for it. The init reaps whatever is orphaned to it until it is killed.
pub fn pause_main() -> i32 {
    // SAFETY: unshare has no memory arguments; it affects only our future children.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        eprintln!(
            "atoll-init pause: unshare(CLONE_NEWPID): {}",
            io::Error::last_os_error()
        );
        return 1;
    }
    // SAFETY: this process is single-threaded (just exec'd, no thread started), so
    // the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!("atoll-init pause: fork: {}", io::Error::last_os_error());
        return 1;
    }
    if pid == 0 {
        reap_forever();
    }
    println!("{pid}");
    // Nothing else will be written: stdout closes so the agent's read ends (it
    // reads one line, so a failed close only delays nothing).
    // SAFETY: closing our own stdout descriptor.
    let _ = unsafe { libc::close(1) };
    let mut status = 0;
    // SAFETY: `status` is a valid out-parameter; `pid` is our child.
    while unsafe { libc::waitpid(pid, &mut status, 0) } == -1
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
    0
}

/// PID 1 of the pod's namespace: waits for children, forever.
fn reap_forever() -> ! {
    // SAFETY: closing our copy of the pipe to the agent; the parent's copy ends
    // the agent's read either way.
    let _ = unsafe { libc::close(1) };
    // SAFETY: prctl(PR_SET_NAME) reads a NUL-terminated name of at most 16 bytes.
    if unsafe { libc::prctl(libc::PR_SET_NAME, c"pause".as_ptr(), 0, 0, 0) } != 0 {
        eprintln!(
            "atoll-init pause: cannot name the namespace's init: {}",
            io::Error::last_os_error()
        );
    }
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-parameter.
        let rc = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
        if rc == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            // No child now: sleep until a signal (an orphan's arrival is none, so
            // look again after a while).
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

/// Kills every process left in the cgroup `dir` (`cgroup.kill`).
pub fn kill_cgroup(dir: &Path) -> io::Result<()> {
    std::fs::write(dir.join("cgroup.kill"), b"1")
}
