//! Runs a VMM process and times launch -> a marker on its stdout, then collects its
//! exit status and peak RSS (from `wait4`'s rusage, the same way for every VMM).

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// One timed run.
#[derive(Debug, Clone)]
pub struct Timed {
    /// Launch -> marker, if the marker appeared.
    pub marker_ms: Option<f64>,
    /// Launch -> process exit.
    pub total_ms: f64,
    /// Exit code (or 128 + signal).
    pub status: i32,
    /// Peak RSS of the process in KiB.
    pub maxrss_kib: u64,
    /// Everything it printed (stdout then stderr).
    pub output: String,
}

/// Spawns `cmd`, times the first occurrence of `marker` in its stdout, waits for it
/// (killing it after `timeout`).
pub fn run_timed(cmd: &mut Command, marker: &[u8], timeout: Duration) -> anyhow::Result<Timed> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            while start.elapsed() < timeout {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !done.load(Ordering::Relaxed) {
                // SAFETY: kill(2) on the pid of our own child, which has not been
                // reaped yet (we reap only after `done` is set).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        })
    };
    let mut stderr = child.stderr.take().context("no stderr pipe")?;
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let mut stdout = child.stdout.take().context("no stdout pipe")?;
    let mut out = Vec::new();
    let mut marker_ms = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the VMM's stdout"),
        };
        let from = out.len().saturating_sub(marker.len());
        out.extend_from_slice(&buf[..n]);
        if marker_ms.is_none() && out[from..].windows(marker.len()).any(|w| w == marker) {
            marker_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value for the kernel to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own unreaped child with valid out-pointers.
    let rc = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
    done.store(true, Ordering::Relaxed);
    let total_ms = start.elapsed().as_secs_f64() * 1000.0;
    let _ = watchdog.join();
    if rc < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    // The child is reaped; don't let `Child` try again.
    std::mem::forget(child);
    let es = std::process::ExitStatus::from_raw(status);
    let status = es.code().unwrap_or_else(|| 128 + es.signal().unwrap_or(0));
    out.extend_from_slice(&err_thread.join().unwrap_or_default());
    Ok(Timed {
        marker_ms,
        total_ms,
        status,
        maxrss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
        output: String::from_utf8_lossy(&out).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_timed_finds_marker_and_status() {
        let t = run_timed(
            Command::new("sh").args(["-c", "echo a; sleep 0.05; echo MARK x; exit 3"]),
            b"MARK",
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(t.status, 3);
        let m = t.marker_ms.unwrap();
        assert!(m >= 40.0 && m <= t.total_ms, "{m} {}", t.total_ms);
        assert!(t.maxrss_kib > 0);
    }

    #[test]
    fn run_timed_kills_after_timeout() {
        let t = run_timed(
            Command::new("sleep").arg("10"),
            b"never",
            Duration::from_millis(100),
        )
        .unwrap();
        assert_eq!(t.status, 128 + libc::SIGKILL);
        assert!(t.marker_ms.is_none());
    }
}
