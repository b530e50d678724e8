//! libcontainer's process creation, run in a forked child of the agent.
//!
//! youki's `libcontainer` starts a container's processes with the raw `clone3`
//! system call. Called from the agent, which has a thread per connection, that
//! clone copies one thread of a multi-threaded process without any of the C
//! library's fork preparation: if another thread holds an allocator lock at that
//! instant, the new process inherits the lock held by a thread it does not have,
//! and its first allocation waits forever — and with it the CreateContainer or
//! ExecSync that started it (one ExecSync in 7,389 hung that way).
//!
//! [`call`] therefore runs the creating code in a child made with the C library's
//! `fork`, which takes the allocator's locks before copying and hands the child
//! fresh ones. The child has one thread, so libcontainer's own clones inside it
//! cannot inherit a held lock. The child sends back the pid it made (or the
//! error) over a pipe and exits; the processes it created are then orphans, and
//! the agent, a child subreaper (`PR_SET_CHILD_SUBREAPER`, set at start-up),
//! becomes their parent and reaps them as before.
//!
//! The answer is framed (kind, length, payload) and read to its length, not to
//! end of file: the processes the child created hold a copy of the pipe's write
//! end until they `execve` (a created container's init waits for its start).
//!
//! The child touches nothing shared with the agent's other threads (no agent
//! lock, no standard output), and exits with `_exit`, so no exit handler runs. A
//! child that does not answer within the deadline is killed: the caller gets an
//! error instead of the runtime lock being held forever, and what it had created
//! becomes the agent's child, reaped as a stray.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::RuntimeError;

/// How long libcontainer may take to create a container or a process: well under
/// the host's own deadline for the request, so the host gets this error rather
/// than a timeout.
pub const DEADLINE: Duration = Duration::from_secs(25);

/// The longest error message a child sends back.
const MAX_MESSAGE: usize = 4096;

/// Runs `f` in a forked child and returns the pid it made (see the module
/// comment). `what` names the operation in errors.
pub fn call(
    what: &str,
    deadline: Duration,
    f: impl FnOnce() -> Result<i32, RuntimeError>,
) -> Result<i32, RuntimeError> {
    let (read, write) = pipe().map_err(|e| internal(what, "cannot make a pipe", &e))?;
    // SAFETY: fork duplicates this process with one thread. The child runs only
    // `f` and writes to its pipe before `_exit`; glibc's fork leaves the allocator
    // usable in the child, and nothing the child does takes a lock that another
    // thread of the agent could have held at the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(internal(what, "cannot fork", &io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(read);
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
                Err(RuntimeError::Internal(format!(
                    "{what}: the runtime panicked"
                )))
            });
        let _ = std::io::Write::write_all(&mut std::fs::File::from(write), &encode(&result));
        // SAFETY: ends the child at once, running no exit handler and flushing
        // nothing that the agent's other threads may have left half-done.
        unsafe { libc::_exit(0) }
    }
    drop(write);
    drop(f);
    let answer = read_answer(&read, deadline);
    if answer.is_err() {
        // SAFETY: `pid` is our own child, not yet waited for.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    wait_child(pid);
    match answer {
        Ok(bytes) => decode(&bytes).unwrap_or_else(|| {
            Err(RuntimeError::Internal(format!(
                "{what}: the runtime's child process ended without an answer"
            )))
        }),
        Err(Timeout) => Err(RuntimeError::Internal(format!(
            "{what}: the runtime did not finish within {} s; its process was killed",
            deadline.as_secs()
        ))),
    }
}

fn internal(what: &str, doing: &str, err: &io::Error) -> RuntimeError {
    RuntimeError::Internal(format!("{what}: {doing}: {err}"))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a writable array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just made this fd; nothing else owns it.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above, the other end.
    let write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((read, write))
}

#[derive(Debug)]
struct Timeout;

/// Bytes before an answer's payload: its kind and the payload's length.
const HEADER: usize = 5;

/// The child's answer, read to the length its header gives; what came before the
/// pipe closed if it closed sooner (the decode then fails), or [`Timeout`] at the
/// deadline.
fn read_answer(fd: &OwnedFd, deadline: Duration) -> Result<Vec<u8>, Timeout> {
    let end = Instant::now() + deadline;
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if let Some(len) = framed_len(&out) {
            if out.len() >= len {
                out.truncate(len);
                return Ok(out);
            }
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Timeout);
        }
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut poll, 1, ms) };
        if rc == 0 {
            continue;
        }
        if rc < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Ok(out);
        }
        // SAFETY: reads into a valid buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return Ok(out),
            n if n < 0 => {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Ok(out);
            }
            n => out.extend_from_slice(&buf[..usize::try_from(n).unwrap_or(0)]),
        }
    }
}

/// The whole answer's length once its header is in; `None` before. A header
/// giving more than [`MAX_MESSAGE`] is cut to it (the decode then fails).
fn framed_len(bytes: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(bytes.get(1..HEADER)?.try_into().ok()?);
    Some(HEADER + usize::try_from(len).unwrap_or(MAX_MESSAGE).min(MAX_MESSAGE))
}

/// Waits for the child (it has exited or was killed).
fn wait_child(pid: libc::pid_t) {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; `status` is writable.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if rc >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// The answer on the wire: a kind byte, the payload's length (4 bytes, little
/// endian), then the pid (4 bytes, little endian) or the message.
fn encode(result: &Result<i32, RuntimeError>) -> Vec<u8> {
    let (kind, payload): (u8, &[u8]) = match result {
        Ok(pid) => {
            let mut out = vec![0u8];
            out.extend_from_slice(&4u32.to_le_bytes());
            out.extend_from_slice(&pid.to_le_bytes());
            return out;
        }
        Err(RuntimeError::InvalidArgument(m)) => (1, m.as_bytes()),
        Err(RuntimeError::NotFound(m)) => (2, m.as_bytes()),
        Err(RuntimeError::AlreadyExists(m)) => (3, m.as_bytes()),
        Err(RuntimeError::FailedPrecondition(m)) => (4, m.as_bytes()),
        Err(RuntimeError::Internal(m)) => (5, m.as_bytes()),
    };
    let mut cut = payload.len().min(MAX_MESSAGE);
    // Messages are strings: cut on a character boundary.
    while cut > 0 && cut < payload.len() && (payload[cut] & 0xc0) == 0x80 {
        cut -= 1;
    }
    let mut out = vec![kind];
    out.extend_from_slice(&u32::try_from(cut).unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&payload[..cut]);
    out
}

fn decode(bytes: &[u8]) -> Option<Result<i32, RuntimeError>> {
    let len = framed_len(bytes)?;
    if bytes.len() != len {
        return None;
    }
    let (kind, rest) = (bytes[0], &bytes[HEADER..]);
    if kind == 0 {
        let pid = i32::from_le_bytes(rest.try_into().ok()?);
        return (pid > 0).then_some(Ok(pid));
    }
    let message = String::from_utf8_lossy(rest).into_owned();
    Some(Err(match kind {
        1 => RuntimeError::InvalidArgument(message),
        2 => RuntimeError::NotFound(message),
        3 => RuntimeError::AlreadyExists(message),
        4 => RuntimeError::FailedPrecondition(message),
        5 => RuntimeError::Internal(message),
        _ => return None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    #[test]
    fn answers_round_trip() {
        for result in [
            Ok(42),
            Err(RuntimeError::InvalidArgument("bad".into())),
            Err(RuntimeError::NotFound("gone".into())),
            Err(RuntimeError::AlreadyExists("twice".into())),
            Err(RuntimeError::FailedPrecondition("stopped".into())),
            Err(RuntimeError::Internal("broke".into())),
        ] {
            let back = decode(&encode(&result)).unwrap();
            match (&result, &back) {
                (Ok(a), Ok(b)) => assert_eq!(a, b),
                (Err(a), Err(b)) => {
                    assert_eq!(a.code(), b.code());
                    assert_eq!(a.to_string(), b.to_string());
                }
                _ => panic!("{result:?} came back as {back:?}"),
            }
        }
        assert!(decode(&[]).is_none());
        assert!(decode(&[0, 2, 0, 0, 0, 1, 2]).is_none(), "a short pid");
        assert!(decode(&[0, 4, 0, 0, 0, 0, 0, 0, 0]).is_none(), "pid 0");
        assert!(decode(&[9, 1, 0, 0, 0, b'x']).is_none(), "an unknown kind");
        assert!(
            decode(&[5, 9, 0, 0, 0, b'x']).is_none(),
            "shorter than framed"
        );
    }

    #[test]
    fn a_long_message_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE);
        let bytes = encode(&Err(RuntimeError::Internal(long)));
        assert!(bytes.len() <= MAX_MESSAGE + HEADER);
        let Some(Err(RuntimeError::Internal(m))) = decode(&bytes) else {
            panic!("not an internal error");
        };
        assert!(m.chars().all(|c| c == 'é'), "{m}");
    }

    #[test]
    fn the_child_answers_with_its_result_and_is_reaped() {
        let me = std::process::id();
        let pid = call("test", Duration::from_secs(10), || {
            // The child is another process.
            Ok(i32::try_from(std::process::id()).unwrap())
        })
        .unwrap();
        assert_ne!(u32::try_from(pid).unwrap(), me);
        // Reaped: no such process any more.
        // SAFETY: signal 0 only checks that the pid exists.
        assert_eq!(unsafe { libc::kill(pid, 0) }, -1);

        let err = call("test", Duration::from_secs(10), || {
            Err(RuntimeError::NotFound("no container \"x\"".into()))
        })
        .unwrap_err();
        assert!(matches!(err, RuntimeError::NotFound(ref m) if m == "no container \"x\""));
    }

    #[test]
    fn the_answer_does_not_wait_for_what_the_child_started() {
        // A created container's init holds the pipe until it execs; here a
        // grandchild sleeping with the write end open stands for it.
        let t0 = Instant::now();
        let pid = call("test", Duration::from_secs(10), || {
            // SAFETY: the child process is single-threaded here; the grandchild
            // only sleeps and leaves with `_exit`.
            let sleeper = unsafe { libc::fork() };
            if sleeper == 0 {
                std::thread::sleep(Duration::from_secs(3));
                // SAFETY: ends the grandchild without running exit handlers.
                unsafe { libc::_exit(0) }
            }
            Ok(sleeper)
        })
        .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        // The sleeper (an orphan now) is ended and left to whoever adopted it.
        // SAFETY: signals a process this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }

    #[test]
    fn a_panicking_child_is_an_internal_error() {
        let err = call("create", Duration::from_secs(10), || panic!("boom")).unwrap_err();
        assert!(
            matches!(err, RuntimeError::Internal(ref m) if m.contains("create") && m.contains("panicked")),
            "{err:?}"
        );
    }

    #[test]
    fn a_child_that_hangs_is_killed_at_the_deadline() {
        let t0 = Instant::now();
        let err = call("exec", Duration::from_millis(300), || loop {
            std::thread::sleep(Duration::from_secs(1));
        })
        .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert!(
            matches!(err, RuntimeError::Internal(ref m) if m.contains("did not finish within")),
            "{err:?}"
        );
    }

    /// The hazard this module exists for: other threads allocate all the time and
    /// hold a lock, and every child still allocates freely.
    #[test]
    fn children_allocate_while_other_threads_hold_the_allocator_and_locks() {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let workers: Vec<_> = (0..4)
            .map(|i| {
                let stop = Arc::clone(&stop);
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let v = vec![i as u8; 64 + (n % 4096)];
                        let mut s = shared.lock().unwrap();
                        s.push(v);
                        if s.len() > 256 {
                            s.clear();
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        for round in 0..200 {
            let pid = call("test", Duration::from_secs(20), move || {
                let mut keep = Vec::new();
                for k in 0..1000 {
                    keep.push(vec![0u8; 16 + (k * 7 + round) % 8192]);
                }
                Ok(i32::try_from(keep.len()).unwrap())
            })
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(pid, 1000);
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
    }
}
