//! `atoll-pty`: runs a command on a pseudo-terminal of its own and plays a user at
//! that terminal, for end-to-end tests of `-t` where no terminal exists (the nested
//! node). Everything the command writes to the terminal is copied to stdout; the exit
//! status is the command's (124 when an `--expect` times out).
//!
//! ```text
//! atoll-pty [--rows R] [--cols C] [STEP...] -- CMD [ARG...]
//! steps, in order:  --expect TEXT   wait until the output (after the last match) has TEXT
//!                   --send TEXT     type TEXT (`\r` is Enter, `\x04` Ctrl-D, `\\` a \)
//!                   --resize RxC    change the terminal size (the command gets SIGWINCH)
//!                   --sleep MS
//! ```
//!
//! Static (built with the other static binaries), so it runs inside the node.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const EXPECT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, PartialEq, Eq)]
enum Step {
    Expect(String),
    Send(Vec<u8>),
    Resize(u16, u16),
    Sleep(Duration),
}

#[derive(Debug)]
struct Args {
    rows: u16,
    cols: u16,
    steps: Vec<Step>,
    cmd: Vec<String>,
}

/// `\r`, `\n`, `\t`, `\\` and `\xHH` escapes.
fn unescape(s: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                let hex = std::str::from_utf8(&hex).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).with_context(|| format!("bad \\x in {s:?}"))?);
            }
            _ => bail!("bad escape in {s:?}"),
        }
    }
    Ok(out)
}

fn parse_size(s: &str) -> anyhow::Result<(u16, u16)> {
    let (r, c) = s.split_once('x').context("a size is ROWSxCOLS")?;
    Ok((r.parse()?, c.parse()?))
}

fn parse(argv: &[String]) -> anyhow::Result<Args> {
    let mut a = Args {
        rows: 24,
        cols: 80,
        steps: Vec::new(),
        cmd: Vec::new(),
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        if flag == "--" {
            a.cmd = it.cloned().collect();
            break;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rows" => a.rows = value.parse()?,
            "--cols" => a.cols = value.parse()?,
            "--expect" => a.steps.push(Step::Expect(value.clone())),
            "--send" => a.steps.push(Step::Send(unescape(value)?)),
            "--resize" => {
                let (r, c) = parse_size(value)?;
                a.steps.push(Step::Resize(r, c));
            }
            "--sleep" => a
                .steps
                .push(Step::Sleep(Duration::from_millis(value.parse()?))),
            other => bail!("unknown option {other}"),
        }
    }
    if a.cmd.is_empty() {
        bail!("usage: atoll-pty [--rows R] [--cols C] [STEP...] -- CMD [ARG...]");
    }
    Ok(a)
}

fn winsize(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// What the command has written so far; `done` once the terminal closed.
#[derive(Default)]
struct Output {
    text: Vec<u8>,
    done: bool,
}

/// Runs the command and the steps; the terminal's output goes to `sink`.
/// In the child: a new session whose controlling terminal is fd 0.
fn become_terminal_session() -> std::io::Result<()> {
    // SAFETY: setsid takes no arguments.
    let sid = unsafe { libc::setsid() };
    // SAFETY: TIOCSCTTY takes an integer argument; fd 0 is the terminal.
    if sid < 0 || unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn run(args: Args, mut sink: Box<dyn Write + Send>) -> anyhow::Result<u8> {
    let (mut master, mut slave) = (-1, -1);
    let ws = winsize(args.rows, args.cols);
    // SAFETY: openpty writes two fds through the pointers; the name pointer may be
    // null, and the termios pointer is null (defaults); `ws` outlives the call.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("openpty");
    }
    // SAFETY: openpty returned this new fd; nothing else owns it.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    // SAFETY: as above, the other end.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    let mut cmd = Command::new(&args.cmd[0]);
    cmd.args(&args.cmd[1..])
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave.try_clone()?));
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe
    // calls (setsid, ioctl) on fd 0, which is the terminal.
    unsafe {
        cmd.pre_exec(become_terminal_session);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", args.cmd[0]))?;
    // Only the child holds the terminal now (`cmd` kept copies of it): the master
    // reads EIO once the child and its children are gone.
    drop(cmd);
    drop(slave);

    let out = Arc::new((Mutex::new(Output::default()), Condvar::new()));
    let mut reader = File::from(master.try_clone()?);
    let out2 = Arc::clone(&out);
    let pump = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let chunk = buf.get(..n).unwrap_or_default();
            let _ = sink.write_all(chunk).and_then(|()| sink.flush());
            let (lock, cv) = &*out2;
            let mut o = lock.lock().unwrap_or_else(|e| e.into_inner());
            o.text.extend_from_slice(chunk);
            o.done = n == 0;
            cv.notify_all();
            if n == 0 {
                break;
            }
        }
    });

    let mut writer = File::from(master.try_clone()?);
    let mut seen = 0usize;
    for step in &args.steps {
        match step {
            Step::Expect(text) => {
                let deadline = Instant::now() + EXPECT_TIMEOUT;
                let (lock, cv) = &*out;
                let mut o = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    let tail = o.text.get(seen..).unwrap_or_default();
                    if let Some(at) = tail
                        .windows(text.len().max(1))
                        .position(|w| w == text.as_bytes())
                    {
                        seen += at + text.len();
                        break;
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if o.done || left.is_zero() {
                        drop(o);
                        eprintln!(
                            "\natoll-pty: {} waiting for {text:?}",
                            if left.is_zero() {
                                "timed out"
                            } else {
                                "the terminal closed"
                            }
                        );
                        let _ = child.kill();
                        let _ = child.wait();
                        return Ok(124);
                    }
                    o = cv
                        .wait_timeout(o, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            Step::Send(bytes) => writer.write_all(bytes).context("typing")?,
            Step::Resize(rows, cols) => {
                let ws = winsize(*rows, *cols);
                // SAFETY: TIOCSWINSZ reads one winsize, which lives across the call;
                // the kernel then sends SIGWINCH to the terminal's foreground group.
                if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
                    return Err(std::io::Error::last_os_error()).context("TIOCSWINSZ");
                }
            }
            Step::Sleep(d) => thread::sleep(*d),
        }
    }
    let status = child.wait().context("waiting for the command")?;
    let _ = pump.join();
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(255),
        (None, Some(s)) => u8::try_from(128 + s).unwrap_or(255),
        _ => 255,
    })
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match parse(&argv).and_then(|a| run(a, Box::new(std::io::stdout()))) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("atoll-pty: {e:#}");
            ExitCode::from(125)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn steps_and_command_parse_in_order() {
        let a = parse(&argv(&[
            "--rows", "30", "--cols", "100", "--expect", "$ ", "--send", "hi\\r", "--resize",
            "40x120", "--sleep", "5", "--", "sh", "-c", "x",
        ]))
        .unwrap();
        assert_eq!((a.rows, a.cols), (30, 100));
        assert_eq!(
            a.steps,
            [
                Step::Expect("$ ".into()),
                Step::Send(b"hi\r".to_vec()),
                Step::Resize(40, 120),
                Step::Sleep(Duration::from_millis(5)),
            ]
        );
        assert_eq!(a.cmd, ["sh", "-c", "x"]);
        assert!(parse(&argv(&["--send", "x"])).is_err(), "no command");
        assert!(parse(&argv(&["--resize", "40", "--", "sh"])).is_err());
    }

    #[test]
    fn escapes_become_control_bytes() {
        assert_eq!(unescape("a\\r\\x04\\\\").unwrap(), b"a\r\x04\\");
        assert!(unescape("\\q").is_err());
    }

    #[test]
    fn command_sees_a_terminal_of_the_given_size_and_typed_input() {
        /// A sink the test can read back.
        #[derive(Clone, Default)]
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let args = parse(&argv(&[
            "--rows",
            "33",
            "--cols",
            "101",
            "--expect",
            "ready",
            "--send",
            "typed\\r",
            "--",
            "sh",
            "-c",
            "tty; stty size; echo ready; read x; echo got:$x; exit 5",
        ]))
        .unwrap();
        let sink = Shared::default();
        let status = run(args, Box::new(sink.clone())).unwrap();
        let text = String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned();
        assert!(text.contains("/dev/pts/"), "{text}");
        assert!(text.contains("33 101"), "{text}");
        assert!(text.contains("got:typed"), "{text}");
        assert_eq!(status, 5, "{text}");
    }
}
