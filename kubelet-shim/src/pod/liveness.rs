//! The guest's liveness, watched from the host.
//!
//! A guest that dies takes its VMM with it, and every agent connection breaks: the
//! host learns at once. A guest that wedges (a vCPU stuck, a kernel that stopped
//! scheduling the agent) keeps the VMM and its sockets alive, and a Wait on its
//! container would block forever. So, as Kata's shim pings its agent, the owner of a
//! running pod asks the agent something cheap every [`LivenessConfig::interval`],
//! each time with a deadline; after [`LivenessConfig::misses`] checks in a row
//! without an answer, the guest is declared dead: the verdict says for how long it
//! was silent and why, and the VMM is killed, which ends the blocked Wait.
//!
//! Any answer counts, a refusal too (the container may be gone): the question is
//! whether the guest answers, not what it says.

use std::os::fd::OwnedFd;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::agent::{AgentClient, AgentError};

use super::PodHandle;

/// How often, how patiently and how many times the guest is asked.
#[derive(Debug, Clone, Copy)]
pub struct LivenessConfig {
    /// Time between the end of one check and the start of the next.
    pub interval: Duration,
    /// How long one check may take (connecting included).
    pub deadline: Duration,
    /// Checks in a row without an answer that declare the guest dead.
    pub misses: u32,
}

impl LivenessConfig {
    /// Checks that declare a guest dead after about `silence` without an answer:
    /// three misses in a row, each a pause of 1/15 and a deadline of 4/15 of it.
    pub fn within(silence: Duration) -> Self {
        Self {
            interval: silence / 15,
            deadline: silence * 4 / 15,
            misses: 3,
        }
    }
}

impl Default for LivenessConfig {
    /// Every 5 s, 20 s each, 3 in a row: about 75 s of silence. The slowest agent
    /// answer seen in the nested node's emulation (10,000 ExecSync calls) took
    /// 0.4 s, so this never fires on a guest that is merely slow.
    fn default() -> Self {
        Self::within(Duration::from_secs(75))
    }
}

/// A running watch. [`Liveness::stop`] ends it and waits for a check under way;
/// dropping it ends it without waiting (the thread goes after its current check).
#[derive(Debug)]
pub struct Liveness {
    stop: Option<mpsc::Sender<()>>,
    verdict: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Liveness {
    /// Watches the pod behind `handle` through its agent (GetStats of `container`);
    /// when the guest is declared dead, calls `before_kill` with the verdict (so
    /// that whoever notices the VM's end can say why), then kills the VMM behind
    /// `vmm` (a pidfd).
    pub fn watch_pod(
        handle: PodHandle,
        container: String,
        vmm: Option<OwnedFd>,
        cfg: LivenessConfig,
        before_kill: impl FnOnce(&str) + Send + 'static,
    ) -> Self {
        let mut client: Option<AgentClient> = None;
        let probe = move |deadline: Duration| -> Result<(), String> {
            let c = match client.as_mut() {
                Some(c) => c,
                None => client.insert(handle.client_within(deadline).map_err(|e| e.to_string())?),
            };
            let _ = c.set_timeout(Some(deadline));
            match c.stats(&container) {
                Ok(_) | Err(AgentError::Refused { .. }) => Ok(()),
                Err(e) => {
                    // A connection that failed mid-call is not used again.
                    client = None;
                    Err(e.to_string())
                }
            }
        };
        let on_dead = move |verdict: &str| {
            before_kill(verdict);
            if let Some(fd) = vmm {
                let _ = rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::KILL);
            }
        };
        Self::start(probe, on_dead, cfg)
    }

    /// Runs `probe` (given the deadline of one check) every `cfg.interval`; after
    /// `cfg.misses` failures in a row, records the verdict and calls `on_dead` with
    /// it, once, and ends.
    pub fn start(
        mut probe: impl FnMut(Duration) -> Result<(), String> + Send + 'static,
        on_dead: impl FnOnce(&str) + Send + 'static,
        cfg: LivenessConfig,
    ) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let verdict = Arc::new(Mutex::new(None));
        let out = Arc::clone(&verdict);
        let thread = thread::Builder::new()
            .name("liveness".into())
            .spawn(move || {
                let mut last_answer = Instant::now();
                let mut misses = 0;
                loop {
                    match stopped.recv_timeout(cfg.interval) {
                        Err(RecvTimeoutError::Timeout) => {}
                        // Stopped, or the owner is gone.
                        _ => return,
                    }
                    match probe(cfg.deadline) {
                        Ok(()) => {
                            misses = 0;
                            last_answer = Instant::now();
                        }
                        Err(why) => {
                            misses += 1;
                            tracing::warn!(
                                "liveness check {misses} of {} without an answer: {why}",
                                cfg.misses
                            );
                            if misses >= cfg.misses {
                                // The owner may have stopped the watch meanwhile.
                                if !matches!(stopped.try_recv(), Err(mpsc::TryRecvError::Empty)) {
                                    return;
                                }
                                let v = format!(
                                    "the guest stopped answering: its agent answered none of {misses} \
                                     liveness checks in a row ({:.0} s of silence; the last: {why}); \
                                     the VM was killed",
                                    last_answer.elapsed().as_secs_f64()
                                );
                                tracing::error!("{v}");
                                if let Ok(mut slot) = out.lock() {
                                    *slot = Some(v.clone());
                                }
                                on_dead(&v);
                                return;
                            }
                        }
                    }
                }
            })
            .map_err(|e| tracing::warn!("no liveness checks for this pod: cannot start their thread: {e}"))
            .ok();
        Self {
            stop: Some(stop),
            verdict,
            thread,
        }
    }

    /// Why the guest was declared dead, if it was.
    pub fn verdict(&self) -> Option<String> {
        self.verdict.lock().ok().and_then(|v| v.clone())
    }

    /// Ends the watch (waiting for a check under way, at most one deadline) and
    /// returns its verdict.
    pub fn stop(mut self) -> Option<String> {
        self.end();
        self.verdict()
    }

    fn end(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        drop(self.stop.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn fast(misses: u32) -> LivenessConfig {
        LivenessConfig {
            interval: Duration::from_millis(5),
            deadline: Duration::from_millis(50),
            misses,
        }
    }

    fn until(mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if f() {
                return true;
            }
            thread::sleep(Duration::from_millis(2));
        }
        false
    }

    #[test]
    fn a_guest_that_never_answers_is_declared_dead_once_after_the_misses() {
        let calls = Arc::new(AtomicU32::new(0));
        let deaths = Arc::new(AtomicU32::new(0));
        let (c, d) = (Arc::clone(&calls), Arc::clone(&deaths));
        let w = Liveness::start(
            move |_| {
                c.fetch_add(1, Ordering::SeqCst);
                Err("timed out".into())
            },
            move |_| {
                d.fetch_add(1, Ordering::SeqCst);
            },
            fast(3),
        );
        assert!(until(|| deaths.load(Ordering::SeqCst) == 1));
        let v = w.stop().expect("a verdict");
        assert!(v.contains("none of 3 liveness checks"), "{v}");
        assert!(v.contains("timed out"), "{v}");
        // It ended at the verdict: exactly the misses, and one death.
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(deaths.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_answer_resets_the_count() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = Arc::clone(&calls);
        // Two failures, one answer, again and again: never three in a row.
        let w = Liveness::start(
            move |_| {
                let n = c.fetch_add(1, Ordering::SeqCst);
                if n % 3 == 2 {
                    Ok(())
                } else {
                    Err("slow".into())
                }
            },
            |_| panic!("declared dead"),
            fast(3),
        );
        assert!(until(|| calls.load(Ordering::SeqCst) >= 30));
        assert_eq!(w.stop(), None);
    }

    #[test]
    fn within_splits_the_silence_into_three_checks() {
        let c = LivenessConfig::within(Duration::from_secs(75));
        assert_eq!(c.interval, Duration::from_secs(5));
        assert_eq!(c.deadline, Duration::from_secs(20));
        assert_eq!(c.misses, 3);
        assert_eq!(
            (c.interval + c.deadline) * c.misses,
            Duration::from_secs(75)
        );
    }

    #[test]
    fn stopping_ends_the_watch_without_a_verdict() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = Arc::clone(&calls);
        let w = Liveness::start(
            move |_| {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
            |_| panic!("declared dead"),
            LivenessConfig {
                interval: Duration::from_secs(3600),
                ..fast(1)
            },
        );
        let t = Instant::now();
        assert_eq!(w.stop(), None);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "stop waited the interval"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_silent_agent_socket_is_declared_dead_and_the_vmm_killed() {
        // A "VMM" (sleep) and a vsock socket that accepts and never answers.
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&uds).unwrap();
        let held = thread::spawn(move || {
            let mut conns = Vec::new();
            while let Ok((s, _)) = listener.accept() {
                conns.push(s);
                if conns.len() >= 3 {
                    break;
                }
            }
            thread::sleep(Duration::from_millis(500));
        });
        let mut vmm = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let pid = rustix::process::Pid::from_raw(vmm.id() as i32).unwrap();
        let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap();
        let told = Arc::new(Mutex::new(None::<String>));
        let t = Arc::clone(&told);
        let w = Liveness::watch_pod(
            PodHandle::for_dir(dir.path()),
            "main".into(),
            Some(fd),
            fast(3),
            move |v| *t.lock().unwrap() = Some(v.to_owned()),
        );
        let status = vmm.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Told before the kill, so anyone who sees the VMM gone can say why.
        let before = told.lock().unwrap().clone().expect("told before the kill");
        let v = w.stop().expect("a verdict");
        assert!(v.contains("the guest stopped answering"), "{v}");
        assert_eq!(before, v);
        held.join().unwrap();
    }
}
