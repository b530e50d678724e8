//! The API tests and benchmarks use: run one shell command where a real KVM is, with
//! the given host files, and get its output and exit status.
//!
//! ```no_run
//! use atoll_node::Runner;
//! let out = Runner::detect()
//!     .file("/path/to/vmlinux", "vmlinux")?
//!     .file("target/release/atoll-vmm", "atoll-vmm")?
//!     .run("./atoll-vmm --kernel \"$ATOLL_ARTIFACTS/vmlinux\"")?;
//! assert_eq!(out.status, 0, "{}", out.output);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! **Addressing files the same way in both places.** Each file is given a relative
//! name. The command runs with `$ATOLL_ARTIFACTS` pointing at a directory holding the
//! files under those names, and with that directory as its working directory:
//! - on [`Where::HostKvm`], a fresh temporary directory of symlinks to the host files;
//! - in the nested node, `/node/artifacts` (copies carried in L1's initramfs).
//!
//! `$ATOLL_WHERE` is `host` or `node`. The command runs under `sh` with stderr merged
//! into stdout and stdin from `/dev/null`; its output is returned as one string.
//! In the node, `/dev/kvm` is the emulated-SVM KVM, `PATH` is busybox (plus
//! `qemu-system-x86_64` with [`Runner::with_qemu`]), and files should be static
//! binaries.

use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::initramfs::{self, Artifact, InitramfsError, InitramfsSpec};
use crate::kernel::{self, PrepareError, Refresh};
use crate::node::{self, LineSink, NodeConfig, NodeError, Source};
use crate::place::Where;

/// Default limit for one run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Timings and sizes of a run in the nested node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeTimings {
    /// Preparing the kernel (cache lookup or download) and writing the initramfs.
    pub prepare_ms: u64,
    /// Size of L1's initramfs.
    pub initramfs_bytes: u64,
    /// QEMU start to `/init` (host clock).
    pub boot_to_init_ms: Option<u64>,
    /// Module load time inside L1 (L1's clock).
    pub modules_ms: Option<u64>,
    /// QEMU start to the command starting.
    pub boot_to_command_ms: Option<u64>,
    /// The command itself.
    pub command_ms: Option<u64>,
    /// QEMU start to QEMU exit (successful attempt).
    pub node_ms: u64,
    /// Boots needed (more than 1 after infrastructure faults; see `node::MAX_ATTEMPTS`).
    pub attempts: u32,
}

/// The result of [`Runner::run`].
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// stdout and stderr of the command, interleaved as written (lossy UTF-8).
    pub output: String,
    /// Its exit status (`128 + N` if killed by signal N).
    pub status: i32,
    /// Where it ran.
    pub place: Where,
    /// Wall time of the whole run.
    pub total_ms: u64,
    /// Nested-node details, when it ran there.
    pub node: Option<NodeTimings>,
}

/// Running a command failed (the command's own failure is a status, not an error).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// An artifact is not usable.
    #[error("bad artifact")]
    Artifact(#[source] InitramfsError),
    /// Fetching the node kernel or host packages failed.
    #[error("preparing the nested node failed")]
    Prepare(#[from] PrepareError),
    /// Writing L1's initramfs failed.
    #[error("building the nested node's initramfs failed")]
    Initramfs(#[from] InitramfsError),
    /// Booting or running the node failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// A work directory could not be made.
    #[error("creating a work directory failed")]
    WorkDir(#[source] io::Error),
    /// Running the command on the host failed.
    #[error("running `sh` on the host failed")]
    Host(#[source] io::Error),
    /// The command on the host outlived the timeout and was killed.
    #[error("the command did not finish within {0} s on the host (killed)")]
    HostTimeout(u64),
}

/// Builds and runs one command; see the module docs.
pub struct Runner<'a> {
    place: Where,
    artifacts: Vec<Artifact>,
    with_qemu: bool,
    host_programs: Vec<PathBuf>,
    extra_modules: Vec<String>,
    timeout: Duration,
    memory_mib: u32,
    cpus: u32,
    extra_append: String,
    sink: Option<Box<LineSink<'a>>>,
}

impl std::fmt::Debug for Runner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("place", &self.place)
            .field("artifacts", &self.artifacts)
            .field("with_qemu", &self.with_qemu)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<'a> Runner<'a> {
    /// A runner for this machine ([`Where::detect`]).
    pub fn detect() -> Self {
        Self::new(Where::detect())
    }

    /// A runner for a given place.
    pub fn new(place: Where) -> Self {
        Self {
            place,
            artifacts: Vec::new(),
            with_qemu: false,
            host_programs: Vec::new(),
            extra_modules: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            memory_mib: 2048,
            cpus: 2,
            extra_append: String::new(),
            sink: None,
        }
    }

    /// Where commands will run.
    pub fn place(&self) -> &Where {
        &self.place
    }

    /// Makes host file or directory `host` available as `$ATOLL_ARTIFACTS/<name>`.
    pub fn file(
        mut self,
        host: impl Into<PathBuf>,
        name: impl Into<PathBuf>,
    ) -> Result<Self, RunError> {
        let a = Artifact::new(host, name).map_err(RunError::Artifact)?;
        self.artifacts.push(a);
        Ok(self)
    }

    /// Also carries QEMU (binary, libraries, firmware) into the node, so
    /// `qemu-system-x86_64 -accel kvm` works there. No effect on the host.
    pub fn with_qemu(mut self, yes: bool) -> Self {
        self.with_qemu = yes;
        self
    }

    /// Also carries the host program at absolute path `program` (say `/usr/sbin/runc`)
    /// into the node at the same path, with its libraries. On the host it is simply
    /// there already.
    pub fn host_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.host_programs.push(program.into());
        self
    }

    /// Also loads these [`kernel::EXTRA_MODULES`] in L1, in the order given, after
    /// the usual ones (e.g. [`kernel::VHOST_VSOCK`]). No effect on the host.
    pub fn extra_modules(mut self, names: &[&str]) -> Self {
        self.extra_modules = names.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    /// Limit for the whole run (per node attempt); default 600 s.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// L1's memory (default 2048 MiB) and vCPUs (default 2).
    pub fn node_size(mut self, memory_mib: u32, cpus: u32) -> Self {
        self.memory_mib = memory_mib;
        self.cpus = cpus;
        self
    }

    /// Extra words for L1's kernel command line.
    pub fn node_append(mut self, extra: impl Into<String>) -> Self {
        self.extra_append = extra.into();
        self
    }

    /// Calls `f` with every line as it arrives (output, console, runner notes).
    pub fn on_line(mut self, f: impl FnMut(Source, &str) + 'a) -> Self {
        self.sink = Some(Box::new(f));
        self
    }

    /// Streams the command's output (and runner notes) to stderr, `[node] `-prefixed;
    /// with `console`, L1's console too. Handy for long tests.
    pub fn stream_to_stderr(self, console: bool) -> Self {
        self.on_line(move |src, line| match src {
            Source::Output => eprintln!("[node] {line}"),
            Source::Runner => eprintln!("[node:runner] {line}"),
            Source::Console if console => eprintln!("[node:console] {line}"),
            // Retries are on stderr already.
            Source::Console | Source::Retry => {}
        })
    }

    /// Runs `command` (a `sh` script) where KVM is usable.
    pub fn run(mut self, command: &str) -> Result<RunOutput, RunError> {
        let start = Instant::now();
        let mut sink = self.sink.take();
        let mut noop = |_: Source, _: &str| {};
        let sink: &mut LineSink<'_> = match sink.as_deref_mut() {
            Some(s) => s,
            None => &mut noop,
        };
        let (output, status, node) = match &self.place {
            Where::HostKvm => {
                let (o, s) = run_on_host(command, &self.artifacts, self.timeout, sink)?;
                (o, s, None)
            }
            Where::NestedNode(_) => {
                let (o, s, t) = self.run_in_node(command, start, sink)?;
                (o, s, Some(t))
            }
        };
        Ok(RunOutput {
            output: String::from_utf8_lossy(&output).into_owned(),
            status,
            place: self.place,
            total_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
            node,
        })
    }

    fn run_in_node(
        &self,
        command: &str,
        start: Instant,
        sink: &mut LineSink<'_>,
    ) -> Result<(Vec<u8>, i32, NodeTimings), RunError> {
        let kernel = kernel::prepare(Refresh::IfMissing)?;
        let work = tempfile::Builder::new()
            .prefix("atoll-node-")
            .tempdir()
            .map_err(RunError::WorkDir)?;
        let initrd = work.path().join("l1-initramfs.cpio");
        let mut modules = kernel.modules.clone();
        for name in &self.extra_modules {
            modules.push(kernel.extra_module(name)?);
        }
        let kvm_hold = initramfs::kvm_hold_binary();
        if kvm_hold.is_none() {
            sink(
                Source::Runner,
                "atoll-kvm-hold not found (build it with `make static`): L1 patches its \
                 text as VMs come and go, which multi-threaded TCG sometimes crashes on",
            );
        }
        let spec = InitramfsSpec {
            modules: &modules,
            artifacts: &self.artifacts,
            command,
            with_qemu: self.with_qemu,
            host_programs: &self.host_programs,
            kvm_hold: kvm_hold.as_deref(),
        };
        let initramfs_bytes = initramfs::build(&spec, &initrd)?;
        let prepare_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let cfg = NodeConfig {
            qemu: PathBuf::from(initramfs::QEMU),
            kernel: kernel.boot_image.clone(),
            initramfs: initrd,
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            timeout: self.timeout,
            extra_append: self.extra_append.clone(),
            work_dir: work.path().to_owned(),
        };
        let r = node::run(&cfg, sink)?;
        let t = &r.timings;
        let timings = NodeTimings {
            prepare_ms,
            initramfs_bytes,
            boot_to_init_ms: t.init_ms,
            modules_ms: t.modules_ms,
            boot_to_command_ms: t.command_start_ms,
            command_ms: match (t.command_start_ms, t.command_end_ms) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            },
            node_ms: t.exit_ms,
            attempts: r.attempts,
        };
        Ok((r.output, r.status, timings))
    }
}

/// Kills a process group when dropped (the host command and anything it started).
struct Group(Option<std::process::Child>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) with a negative pid signals the process group we
                // created for the child (process_group(0)); no memory is involved.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
            let _ = child.wait();
        }
    }
}

/// Runs the command locally, artifacts as symlinks in a temporary directory.
fn run_on_host(
    command: &str,
    artifacts: &[Artifact],
    timeout: Duration,
    sink: &mut LineSink<'_>,
) -> Result<(Vec<u8>, i32), RunError> {
    let dir = tempfile::Builder::new()
        .prefix("atoll-artifacts-")
        .tempdir()
        .map_err(RunError::WorkDir)?;
    for a in artifacts {
        let link = dir.path().join(&a.name);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(RunError::WorkDir)?;
        }
        let target = std::path::absolute(&a.host).map_err(RunError::WorkDir)?;
        std::os::unix::fs::symlink(&target, &link).map_err(RunError::WorkDir)?;
    }
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 2>&1\n{command}"))
        .current_dir(dir.path())
        .env("ATOLL_ARTIFACTS", dir.path())
        .env("ATOLL_WHERE", "host")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(RunError::Host)?;
    let mut group = Group(Some(child));
    let Some(child) = group.0.as_mut() else {
        return Err(RunError::Host(io::Error::other("child vanished")));
    };
    let stdout = child.stdout.take();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    if let Some(mut out) = stdout {
        thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    let start = Instant::now();
    let mut output = Vec::new();
    let mut emitted = 0usize;
    let mut emit = |output: &Vec<u8>, emitted: &mut usize, all: bool| {
        let end = if all {
            output.len()
        } else {
            match output[*emitted..].iter().rposition(|&b| b == b'\n') {
                Some(i) => *emitted + i + 1,
                None => *emitted,
            }
        };
        for line in output[*emitted..end].split_inclusive(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            sink(Source::Output, &String::from_utf8_lossy(line));
        }
        *emitted = end;
    };
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(bytes) => {
                output.extend_from_slice(&bytes);
                emit(&output, &mut emitted, false);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break child.wait().map_err(RunError::Host)?;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if start.elapsed() > timeout {
            return Err(RunError::HostTimeout(timeout.as_secs()));
        }
        if let Some(status) = child.try_wait().map_err(RunError::Host)? {
            // Collect what is still in the pipe; a background process that keeps it
            // open is cut off after a short grace.
            let grace = Instant::now();
            while let Ok(bytes) = rx.recv_timeout(Duration::from_millis(100)) {
                output.extend_from_slice(&bytes);
                if grace.elapsed() > Duration::from_secs(2) {
                    break;
                }
            }
            break status;
        }
    };
    emit(&output, &mut emitted, true);
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1);
    Ok((output, code))
}

/// Makes an artifact list from `HOST:NAME` pairs (the CLI's `--file`).
pub fn parse_file_arg(s: &str) -> Result<(PathBuf, PathBuf), String> {
    let (host, name) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected HOST:NAME"))?;
    if host.is_empty() || name.is_empty() {
        return Err(format!("{s:?}: expected HOST:NAME"));
    }
    Ok((PathBuf::from(host), PathBuf::from(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_run_merges_stderr_and_returns_status() {
        let out = Runner::new(Where::HostKvm)
            .run("echo out; echo err >&2; exit 7")
            .unwrap();
        assert_eq!(out.status, 7);
        assert_eq!(out.output, "out\nerr\n");
        assert!(out.node.is_none());
    }

    #[test]
    fn host_run_sees_artifacts_through_env_dir() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("payload.txt");
        std::fs::write(&f, "hello").unwrap();
        let out = Runner::new(Where::HostKvm)
            .file(&f, "sub/p.txt")
            .unwrap()
            .run("cat \"$ATOLL_ARTIFACTS/sub/p.txt\"; cat sub/p.txt; echo \" $ATOLL_WHERE\"")
            .unwrap();
        assert_eq!(out.status, 0, "{}", out.output);
        assert_eq!(out.output, "hellohello host\n");
    }

    #[test]
    fn host_run_streams_lines_live() {
        let mut lines = Vec::new();
        let out = Runner::new(Where::HostKvm)
            .on_line(|src, l| lines.push((src, l.to_owned())))
            .run("echo a; printf b")
            .unwrap();
        assert_eq!(out.output, "a\nb");
        assert_eq!(
            lines,
            [(Source::Output, "a".into()), (Source::Output, "b".into())]
        );
    }

    #[test]
    fn host_run_signal_gives_128_plus_n() {
        let out = Runner::new(Where::HostKvm).run("kill -9 $$").unwrap();
        assert_eq!(out.status, 137);
    }

    #[test]
    fn host_run_timeout_kills_the_command() {
        let r = Runner::new(Where::HostKvm)
            .timeout(Duration::from_millis(300))
            .run("sleep 30");
        assert!(matches!(r, Err(RunError::HostTimeout(_))));
    }

    #[test]
    fn file_arg_splits_at_last_colon() {
        assert_eq!(
            parse_file_arg("/a:b/c:vmlinux").unwrap(),
            (PathBuf::from("/a:b/c"), PathBuf::from("vmlinux"))
        );
        assert!(parse_file_arg("nocolon").is_err());
        assert!(parse_file_arg(":x").is_err());
    }
}
