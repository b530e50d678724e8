//! Booting the nested KVM node (L1 under QEMU TCG with emulated AMD SVM), running one
//! command in it and collecting the result.
//!
//! One boot: QEMU starts with the console on its stdout and the data port (ttyS1) in a
//! file (see [`crate::protocol`]). A reader thread forwards console lines; the calling
//! thread polls the data file, the console, the timeout and QEMU's exit. QEMU is killed
//! when the run ends in any way ([`Qemu`] kills on drop, and QEMU gets `SIGKILL` if
//! the thread that started it dies).
//!
//! A node that exits without the end marker (and without a `fail` mark from `/init`),
//! or whose heartbeat stops, is an infrastructure fault: it is booted again once with
//! a fresh nonce (said on stderr, past the test harness's capture, so every retry is
//! in the CI log), and a second fault fails the run with the tail of its console.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::protocol::{new_nonce, ConsoleMark, DataStream};

/// Console lines kept for error reports.
const TAIL_LINES: usize = 40;
/// How long QEMU may take to power off after the end marker.
const POWEROFF_GRACE: Duration = Duration::from_secs(15);
/// Poll interval of the data file.
const POLL: Duration = Duration::from_millis(10);
/// Period of `/init`'s heartbeat mark on the console.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A node whose heartbeat has been silent this long has hung: it is killed and
/// booted again. (Seen under multi-threaded TCG: one L1 vCPU spinning, the other
/// idle, nothing on the console for minutes.)
pub const HUNG_AFTER: Duration = Duration::from_secs(120);

/// What one line streamed to the caller came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The command's stdout/stderr.
    Output,
    /// L1's serial console (kernel, BIOS, `/init` marks).
    Console,
    /// The runner itself (phases, missing helpers).
    Runner,
    /// A retry of the node. Also written straight to stderr, so callers that print
    /// their lines to stderr need not print these.
    Retry,
}

/// Receives lines live while a command runs.
pub type LineSink<'a> = dyn FnMut(Source, &str) + 'a;

/// How to boot the node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// L1's kernel.
    pub kernel: PathBuf,
    /// L1's initramfs.
    pub initramfs: PathBuf,
    /// L1 memory in MiB.
    pub memory_mib: u32,
    /// L1 vCPUs.
    pub cpus: u32,
    /// Whole-run limit per attempt; QEMU is killed when it passes.
    pub timeout: Duration,
    /// Extra kernel command-line words.
    pub extra_append: String,
    /// Directory for the per-boot data file.
    pub work_dir: PathBuf,
}

/// Timings of a successful boot, in ms since QEMU was started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BootTimings {
    /// `/init` started (host clock).
    pub init_ms: Option<u64>,
    /// `/dev/kvm` is ready (host clock).
    pub kvm_ready_ms: Option<u64>,
    /// Time spent loading the modules, from L1's own uptime.
    pub modules_ms: Option<u64>,
    /// The begin marker arrived: the command started.
    pub command_start_ms: Option<u64>,
    /// The end marker arrived: the command finished.
    pub command_end_ms: Option<u64>,
    /// QEMU exited.
    pub exit_ms: u64,
}

/// The result of a command in the node.
#[derive(Debug, Clone)]
pub struct NodeRun {
    /// stdout+stderr of the command.
    pub output: Vec<u8>,
    /// Its exit status.
    pub status: i32,
    /// Timings of the successful attempt.
    pub timings: BootTimings,
    /// Attempts made (1, or 2 after an infrastructure fault).
    pub attempts: u32,
}

/// Running a command in the node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// QEMU could not be started.
    #[error("could not start {qemu}")]
    Spawn {
        /// QEMU binary.
        qemu: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file of the run could not be created or read.
    #[error("{action} {path} failed")]
    Io {
        /// What was done.
        action: &'static str,
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The run took longer than allowed; QEMU was killed.
    #[error(
        "the nested node did not finish within {secs} s (killed; {phase}); console tail:\n{tail}"
    )]
    Timeout {
        /// The limit.
        secs: u64,
        /// How far it got.
        phase: &'static str,
        /// Last console lines.
        tail: String,
    },
    /// `/init` reported that the node could not be set up.
    #[error("the nested node could not set up KVM: {reason}; console tail:\n{tail}")]
    Setup {
        /// What `/init` said.
        reason: String,
        /// Last console lines.
        tail: String,
    },
    /// The node went away without its end marker, on every attempt.
    #[error("the nested node vanished without its final marker ({attempts} attempts, last: QEMU {exit}, {phase}); infrastructure fault; console tail:\n{tail}")]
    Vanished {
        /// Attempts made.
        attempts: u32,
        /// QEMU's exit status.
        exit: String,
        /// How far the last attempt got.
        phase: &'static str,
        /// Last console lines and QEMU's stderr.
        tail: String,
    },
}

/// A QEMU child that is killed and reaped when dropped.
pub struct Qemu {
    child: Child,
}

impl Qemu {
    /// Starts QEMU with its stdout piped and stdin closed. QEMU gets `SIGKILL` if the
    /// thread that spawned it exits (`PR_SET_PDEATHSIG`), so a killed test leaves no VM.
    pub fn spawn(cmd: &mut Command) -> io::Result<Qemu> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let parent = i32::try_from(std::process::id()).unwrap_or(0);
        // SAFETY: the hook runs in the forked child before exec; it only makes
        // async-signal-safe syscalls and touches no Rust state (see die_with_parent).
        unsafe {
            cmd.pre_exec(move || die_with_parent(parent));
        }
        Ok(Qemu {
            child: cmd.spawn()?,
        })
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Asks the kernel to `SIGKILL` this (child) process when its parent thread dies.
fn die_with_parent(parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getppid(2) cannot fail and touches no memory.
    if unsafe { libc::getppid() } != parent {
        // The parent died between fork and prctl: do not start an orphan VM.
        return Err(io::Error::from(io::ErrorKind::BrokenPipe));
    }
    Ok(())
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The QEMU command line of one boot.
pub fn qemu_command(cfg: &NodeConfig, data_file: &Path, nonce: &str) -> Command {
    let mut c = Command::new(&cfg.qemu);
    // kvm_amd.vgif=0: L1's KVM does not hand its guests a virtual GIF. With it, L1
    // died every few minutes of heavy vsock traffic with a page fault on a per-CPU
    // (%gs) access in interrupt context, as if an interrupt came in between a
    // #VMEXIT and the host state's reload; without it, none in 50 runs of 10 MiB
    // (two node deaths within the first 25 with it).
    let mut append = format!("console=ttyS0 quiet panic=-1 kvm_amd.vgif=0 atoll.nonce={nonce}");
    // ATOLL_NODE_APPEND: extra words for experiments (e.g. `kvm_amd.npt=0`).
    let env_append = std::env::var("ATOLL_NODE_APPEND").unwrap_or_default();
    for extra in [cfg.extra_append.trim(), env_append.trim()] {
        if !extra.is_empty() {
            append.push(' ');
            append.push_str(extra);
        }
    }
    let cpu = std::env::var("ATOLL_NODE_CPU").unwrap_or_else(|_| "max".into());
    c.args(["-accel", "tcg,thread=multi", "-cpu", &cpu])
        .args(["-m", &cfg.memory_mib.to_string()])
        .args(["-smp", &cfg.cpus.to_string()])
        .args(["-nographic", "-nodefaults", "-no-reboot"])
        .args(["-serial", "stdio"])
        .arg("-serial")
        .arg(format!("file:{}", data_file.display()))
        .arg("-kernel")
        .arg(&cfg.kernel)
        .arg("-initrd")
        .arg(&cfg.initramfs)
        .args(["-append", &append]);
    c
}

/// How one attempt ended when it did not succeed.
enum Failure {
    Fatal(NodeError),
    Vanished {
        exit: String,
        phase: &'static str,
        tail: String,
    },
}

/// Last console lines, for error messages.
#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
}

impl Tail {
    fn push(&mut self, line: &str) {
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line.to_owned());
    }

    fn render(&self, stderr: &str) -> String {
        let mut s: Vec<String> = self.lines.iter().map(|l| format!("  | {l}")).collect();
        for l in stderr.lines().filter(|l| !l.trim().is_empty()) {
            s.push(format!("  qemu: {l}"));
        }
        if s.is_empty() {
            "  (nothing)".into()
        } else {
            s.join("\n")
        }
    }
}

/// Most boots of the node for one run. A node that vanishes or hangs is an
/// infrastructure fault, not a test result: L1's own kernel has been seen to die
/// under TCG (an `int3` oops in `__schedule` while the kernel patches its text, which
/// multi-threaded TCG occasionally executes half-patched). One retry absorbs that; a
/// second fault in one run fails it, so a crash that Atoll causes in L1 cannot hide
/// behind retries.
pub const MAX_ATTEMPTS: u32 = 2;

/// Boots the node and runs the command baked into the initramfs, booting it again (up
/// to [`MAX_ATTEMPTS`] in all) if the node vanishes or hangs.
pub fn run(cfg: &NodeConfig, sink: &mut LineSink<'_>) -> Result<NodeRun, NodeError> {
    retrying(|sink| boot_once(cfg, sink), sink, &mut |note: &str| {
        // Straight to fd 2: the test harness captures `eprintln!`, and a retry must
        // show in the log of a test that passed too.
        use std::io::Write;
        let _ = writeln!(io::stderr().lock(), "atoll-node: {note}");
    })
}

type Attempt = Result<(Vec<u8>, i32, BootTimings), Failure>;

/// The retry policy of [`run`], apart from QEMU: `announce` gets every retry's note.
fn retrying(
    mut boot: impl FnMut(&mut LineSink<'_>) -> Attempt,
    sink: &mut LineSink<'_>,
    announce: &mut dyn FnMut(&str),
) -> Result<NodeRun, NodeError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match boot(sink) {
            Ok((output, status, timings)) => {
                return Ok(NodeRun {
                    output,
                    status,
                    timings,
                    attempts,
                })
            }
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Vanished { exit, phase, tail }) if attempts >= MAX_ATTEMPTS => {
                return Err(NodeError::Vanished {
                    attempts,
                    exit,
                    phase,
                    tail,
                })
            }
            Err(Failure::Vanished { exit, phase, .. }) => {
                let note = format!(
                    "node vanished without its final marker (QEMU {exit}, {phase}); \
                     booting it again ({attempts} of {MAX_ATTEMPTS} attempts used)"
                );
                announce(&note);
                sink(Source::Retry, &note);
            }
        }
    }
}

fn ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn boot_once(
    cfg: &NodeConfig,
    sink: &mut LineSink<'_>,
) -> Result<(Vec<u8>, i32, BootTimings), Failure> {
    let fatal = Failure::Fatal;
    let nonce = new_nonce().map_err(|source| {
        fatal(NodeError::Io {
            action: "reading",
            path: "/dev/urandom".into(),
            source,
        })
    })?;
    let data_path = cfg.work_dir.join(format!("data-{}.out", &nonce[..8]));
    let mut data = File::create(&data_path)
        .and_then(|_| File::open(&data_path))
        .map_err(|source| {
            fatal(NodeError::Io {
                action: "creating",
                path: data_path.clone(),
                source,
            })
        })?;

    let start = Instant::now();
    let mut qemu = Qemu::spawn(&mut qemu_command(cfg, &data_path, &nonce)).map_err(|source| {
        fatal(NodeError::Spawn {
            qemu: cfg.qemu.clone(),
            source,
        })
    })?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    if let Some(out) = qemu.child.stdout.take() {
        thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']).to_owned();
                        if tx.send((Instant::now(), line)).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    let stderr_thread = qemu.child.stderr.take().map(|mut err| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        })
    });

    let mut stream = DataStream::new(&nonce);
    let mut timings = BootTimings::default();
    let mut tail = Tail::default();
    let mut uptime_init: Option<f64> = None;
    let mut fail_reason: Option<String> = None;
    let mut chunk = vec![0u8; 1 << 16];
    let mut end_seen_at: Option<Instant> = None;
    // The heartbeat starts once KVM is ready; until then the timeout alone applies.
    let mut last_beat: Option<Instant> = None;
    let phase = |t: &BootTimings| -> &'static str {
        if t.command_end_ms.is_some() {
            "after the command finished"
        } else if t.command_start_ms.is_some() {
            "while the command ran"
        } else if t.kvm_ready_ms.is_some() {
            "after KVM was ready, before the command started"
        } else if t.init_ms.is_some() {
            "while loading the KVM modules"
        } else {
            "before /init started"
        }
    };

    let exit = loop {
        // Console lines.
        while let Ok((at, line)) = rx.try_recv() {
            match ConsoleMark::parse(&line, &nonce) {
                Some(ConsoleMark::Beat(_)) => {
                    // Noise for the tail and the caller: only its timing counts.
                    last_beat = Some(at);
                    continue;
                }
                Some(ConsoleMark::Init(up)) => {
                    timings.init_ms = Some(ms_between(start, at));
                    uptime_init = Some(up);
                }
                Some(ConsoleMark::KvmReady(up)) => {
                    timings.kvm_ready_ms = Some(ms_between(start, at));
                    last_beat = Some(at);
                    if let Some(u0) = uptime_init {
                        timings.modules_ms = Some(((up - u0).max(0.0) * 1000.0).round() as u64);
                    }
                }
                Some(ConsoleMark::Fail(reason)) => fail_reason = Some(reason),
                Some(ConsoleMark::Done(_)) | None => {}
            }
            tail.push(&line);
            sink(Source::Console, &line);
        }
        // Data port.
        loop {
            match data.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    let began = stream.began();
                    stream.feed(&chunk[..n], &mut |l| sink(Source::Output, l));
                    if !began && stream.began() {
                        timings.command_start_ms = Some(ms(start));
                    }
                    if stream.status().is_some() && end_seen_at.is_none() {
                        timings.command_end_ms = Some(ms(start));
                        end_seen_at = Some(Instant::now());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(fatal(NodeError::Io {
                        action: "reading",
                        path: data_path.clone(),
                        source,
                    }))
                }
            }
        }
        match qemu.try_wait() {
            Ok(Some(status)) => break status.to_string(),
            Ok(None) => {}
            Err(_) => break "(unknown status)".into(),
        }
        if let Some(at) = end_seen_at {
            if at.elapsed() > POWEROFF_GRACE {
                // The result is complete; L1 just failed to power off in time.
                qemu.kill();
                break "killed after the command finished".into();
            }
        }
        if fail_reason.is_some() {
            // Give /init a moment to power off by itself, then stop it.
            thread::sleep(Duration::from_millis(200));
            qemu.kill();
            break "killed after a setup failure".into();
        }
        if end_seen_at.is_none() && last_beat.is_some_and(|b| hung(b, Instant::now())) {
            qemu.kill();
            break format!(
                "killed: no heartbeat for {} s, L1 hung",
                HUNG_AFTER.as_secs()
            );
        }
        if start.elapsed() > cfg.timeout {
            qemu.kill();
            let stderr = stderr_thread
                .and_then(|h| h.join().ok())
                .unwrap_or_default();
            return Err(fatal(NodeError::Timeout {
                secs: cfg.timeout.as_secs(),
                phase: phase(&timings),
                tail: tail.render(&stderr),
            }));
        }
        thread::sleep(POLL);
    };
    timings.exit_ms = ms(start);

    // Drain what arrived between the last poll and QEMU's exit.
    let mut rest = Vec::new();
    let _ = data.read_to_end(&mut rest);
    if !rest.is_empty() {
        stream.feed(&rest, &mut |l| sink(Source::Output, l));
        if timings.command_start_ms.is_none() && stream.began() {
            timings.command_start_ms = Some(timings.exit_ms);
        }
        if timings.command_end_ms.is_none() && stream.status().is_some() {
            timings.command_end_ms = Some(timings.exit_ms);
        }
    }
    while let Ok((_, line)) = rx.recv_timeout(Duration::from_millis(200)) {
        if let Some(ConsoleMark::Fail(reason)) = ConsoleMark::parse(&line, &nonce) {
            fail_reason = Some(reason);
        }
        tail.push(&line);
        sink(Source::Console, &line);
    }
    let stderr = stderr_thread
        .and_then(|h| h.join().ok())
        .unwrap_or_default();
    let _ = std::fs::remove_file(&data_path);

    let result = stream.finish();
    match (result.status, fail_reason) {
        (Some(status), _) => Ok((result.output, status, timings)),
        (None, Some(reason)) => Err(fatal(NodeError::Setup {
            reason,
            tail: tail.render(&stderr),
        })),
        (None, None) => Err(Failure::Vanished {
            exit,
            phase: phase(&timings),
            tail: tail.render(&stderr),
        }),
    }
}

/// Whether a node whose last heartbeat came at `last` has hung by `now`.
fn hung(last: Instant, now: Instant) -> bool {
    now.saturating_duration_since(last) > HUNG_AFTER
}

fn ms_between(start: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(start).as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NodeConfig {
        NodeConfig {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            kernel: "/k/vmlinuz".into(),
            initramfs: "/k/initrd".into(),
            memory_mib: 2048,
            cpus: 2,
            timeout: Duration::from_secs(600),
            extra_append: " loglevel=3 ".into(),
            work_dir: "/tmp".into(),
        }
    }

    #[test]
    fn qemu_command_has_tcg_svm_and_two_serial_ports() {
        let c = qemu_command(&cfg(), Path::new("/tmp/d.out"), "abc");
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.starts_with("-accel tcg,thread=multi -cpu max -m 2048 -smp 2"));
        assert!(joined.contains("-serial stdio -serial file:/tmp/d.out"));
        assert_eq!(
            args.last().map(String::as_str),
            Some("console=ttyS0 quiet panic=-1 kvm_amd.vgif=0 atoll.nonce=abc loglevel=3")
        );
    }

    fn vanished() -> Attempt {
        Err(Failure::Vanished {
            exit: "killed: no heartbeat".into(),
            phase: "while the command ran",
            tail: "  | last line".into(),
        })
    }

    #[test]
    fn one_fault_is_retried_and_announced() {
        let mut n = 0;
        let mut notes = Vec::new();
        let r = retrying(
            |_| {
                n += 1;
                if n == 1 {
                    vanished()
                } else {
                    Ok((b"out".to_vec(), 0, BootTimings::default()))
                }
            },
            &mut |_, _| {},
            &mut |note| notes.push(note.to_owned()),
        )
        .unwrap();
        assert_eq!((r.attempts, r.output.as_slice()), (2, &b"out"[..]));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("booting it again (1 of 2 attempts used)"));
        assert!(notes[0].contains("no heartbeat"), "{notes:?}");
    }

    #[test]
    fn a_second_fault_fails_the_run() {
        let mut n = 0;
        let mut notes = 0;
        let err = retrying(
            |_| {
                n += 1;
                vanished()
            },
            &mut |_, _| {},
            &mut |_| notes += 1,
        )
        .unwrap_err();
        assert_eq!((n, notes), (2, 1));
        let msg = err.to_string();
        assert!(
            msg.contains("(2 attempts, last: QEMU killed: no heartbeat"),
            "{msg}"
        );
        assert!(msg.contains("  | last line"), "{msg}");
    }

    #[test]
    fn a_silent_heartbeat_means_hung() {
        let t = Instant::now();
        assert!(!hung(t, t + HEARTBEAT * 3));
        assert!(!hung(t, t + HUNG_AFTER));
        assert!(hung(t, t + HUNG_AFTER + Duration::from_secs(1)));
        assert!(HUNG_AFTER >= HEARTBEAT * 6, "room for a busy L1");
    }

    #[test]
    fn qemu_is_killed_on_drop() {
        let mut cmd = Command::new("sleep");
        cmd.arg("100");
        let q = Qemu::spawn(&mut cmd).unwrap();
        let pid = q.child.id();
        drop(q);
        // The process is reaped: its /proc entry is gone.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn tail_keeps_the_last_lines_and_qemu_stderr() {
        let mut t = Tail::default();
        for i in 0..100 {
            t.push(&format!("line {i}"));
        }
        let r = t.render("qemu-system-x86_64: warning: x\n");
        assert!(!r.contains("line 59\n"));
        assert!(r.contains("line 60"));
        assert!(r.ends_with("  qemu: qemu-system-x86_64: warning: x"));
    }
}
