//! Attach: a session joined to a running container's own stdio.
//!
//! The container's output already flows to its CRI log (one agent stream each,
//! taken at start); a [`Hub`] beside that copy hands every chunk to the attached
//! sessions too. A session that does not keep up loses chunks, never the log. The
//! container's stdin (when it was created with one) is held by the hub from the
//! start, so that sessions come and go; with `stdin_once`, the first session
//! that had stdin closes it as it leaves.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::session::{Event, Session};
use super::{Channel, Outcome};
use crate::cri::logs;
use crate::cri::server::{self, clean_message, CriError, Server};

/// Output chunks queued per session before it starts losing them.
const SESSION_QUEUE: usize = 256;
/// A container that reads none of its stdin for this long loses the session's.
const STDIN_STALL: Duration = Duration::from_secs(60);

/// What Attach asked for, kept behind the one-time URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSpec {
    pub container_id: String,
    pub stdin: bool,
    pub tty: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl AttachSpec {
    pub fn validate(&self) -> Result<(), CriError> {
        if !(self.stdin || self.stdout || self.stderr) {
            return Err(CriError::InvalidArgument(
                "one of stdin, stdout and stderr must be set".into(),
            ));
        }
        Ok(())
    }

    pub fn channels(&self) -> Vec<Channel> {
        super::exec::channels(self.stdin, self.stdout, self.stderr, self.tty)
    }
}

type Chunk = (logs::Stream, Vec<u8>);

/// A running container's stdio, shared by its attached sessions.
#[derive(Default)]
pub struct Hub {
    subscribers: Mutex<Vec<(u64, SyncSender<Chunk>)>>,
    next: Mutex<u64>,
    stdin: Mutex<Option<UnixStream>>,
    pub stdin_once: bool,
    /// The container's stdin is a terminal (no half-close).
    pub tty: bool,
    ended: Mutex<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    pub fn new(stdin: Option<UnixStream>, stdin_once: bool, tty: bool) -> Self {
        if let Some(s) = &stdin {
            let _ = s.set_write_timeout(Some(STDIN_STALL));
        }
        Self {
            stdin: Mutex::new(stdin),
            stdin_once,
            tty,
            ..Default::default()
        }
    }

    /// Hands a chunk of output to every session, without waiting for any.
    pub fn publish(&self, stream: logs::Stream, data: &[u8]) {
        let mut subs = lock(&self.subscribers);
        if subs.is_empty() {
            return;
        }
        subs.retain(|(_, tx)| match tx.try_send((stream, data.to_vec())) {
            Ok(()) | Err(TrySendError::Full(_)) => true,
            Err(TrySendError::Disconnected(_)) => false,
        });
    }

    fn subscribe(&self) -> Option<(u64, Receiver<Chunk>)> {
        if *lock(&self.ended) {
            return None;
        }
        let (tx, rx) = sync_channel(SESSION_QUEUE);
        let mut next = lock(&self.next);
        *next += 1;
        lock(&self.subscribers).push((*next, tx));
        Some((*next, rx))
    }

    fn unsubscribe(&self, id: u64) {
        lock(&self.subscribers).retain(|(i, _)| *i != id);
    }

    /// The container's output ended: every session's output ends.
    pub fn end(&self) {
        *lock(&self.ended) = true;
        lock(&self.subscribers).clear();
        self.close_stdin();
    }

    pub fn has_stdin(&self) -> bool {
        lock(&self.stdin).is_some()
    }

    fn write_stdin(&self, data: &[u8]) -> io::Result<()> {
        let mut stdin = lock(&self.stdin);
        let Some(s) = stdin.as_mut() else {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stdin is closed"));
        };
        let r = s.write_all(data);
        if r.is_err() {
            *stdin = None;
        }
        r
    }

    /// Closes the container's stdin (it reads EOF).
    pub fn close_stdin(&self) {
        if let Some(s) = lock(&self.stdin).take() {
            if !self.tty {
                let _ = s.shutdown(Shutdown::Write);
            }
        }
    }
}

/// A reader of a container's output that shows every chunk to the hub as well.
pub struct Tee<R> {
    pub inner: R,
    pub hub: Arc<Hub>,
    pub stream: logs::Stream,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.hub.publish(self.stream, &buf[..n]);
        }
        Ok(n)
    }
}

/// Serves `session` until the container's output ends or the client goes.
pub fn serve(server: &Server, spec: &AttachSpec, session: Session) {
    let out = Arc::clone(&session.output);
    let outcome = match run(server, spec, session) {
        Ok(o) => o,
        Err(e) => Outcome::Failed(clean_message(&e.to_string())),
    };
    out.end(Channel::Stdout);
    out.end(Channel::Stderr);
    let _ = out.write(Channel::Error, &outcome.status_json());
    out.end(Channel::Error);
    out.close();
}

fn run(server: &Server, spec: &AttachSpec, session: Session) -> Result<Outcome, CriError> {
    let id = spec.container_id.as_str();
    let hub = server.attach_hub(id)?;
    let (sub, rx) = hub
        .subscribe()
        .ok_or_else(|| CriError::FailedPrecondition(format!("container {id} is not running")))?;
    let forward = {
        let out = Arc::clone(&session.output);
        let post = session.post.clone();
        let (stdout, stderr, tty) = (spec.stdout, spec.stderr, spec.tty);
        std::thread::spawn(move || {
            for (stream, data) in rx {
                let ch = match stream {
                    logs::Stream::Stdout if stdout => Channel::Stdout,
                    logs::Stream::Stderr if stderr && !tty => Channel::Stderr,
                    // A terminal's one output goes to stdout.
                    logs::Stream::Stderr if tty && stdout => Channel::Stdout,
                    _ => continue,
                };
                let _ = out.write(ch, &data);
            }
            let _ = post.send(Event::Done(Outcome::Success));
        })
    };
    let outcome = loop {
        match session.events.recv() {
            Ok(Event::Stdin(data)) if spec.stdin => {
                if let Err(e) = hub.write_stdin(&data) {
                    tracing::info!(container = id, "attach: stdin dropped: {e}");
                }
            }
            Ok(Event::StdinEnd) if spec.stdin => {
                if hub.stdin_once {
                    hub.close_stdin();
                }
            }
            Ok(Event::Resize(size)) if spec.tty => {
                if let Ok((_, sandbox)) = server.exec_target(id) {
                    if let Ok(mut a) = server::agent(&sandbox) {
                        let _ = a.resize(id, "", u32::from(size.height), u32::from(size.width));
                    }
                }
            }
            Ok(Event::Done(o)) => break o,
            Ok(Event::Gone) | Err(_) => break Outcome::Success,
            Ok(_) => {}
        }
    };
    hub.unsubscribe(sub);
    let _ = forward.join();
    if spec.stdin && hub.stdin_once {
        hub.close_stdin();
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_session_loses_chunks_not_the_log() {
        let hub = Hub::new(None, false, false);
        let (_, rx) = hub.subscribe().unwrap();
        for i in 0..SESSION_QUEUE + 50 {
            hub.publish(logs::Stream::Stdout, format!("{i}").as_bytes());
        }
        let got: Vec<Chunk> = rx.try_iter().collect();
        assert_eq!(got.len(), SESSION_QUEUE);
        assert_eq!(got[0].1, b"0");
    }

    #[test]
    fn the_end_reaches_every_session_and_no_new_one_joins() {
        let hub = Hub::new(None, false, false);
        let (_, a) = hub.subscribe().unwrap();
        let (id, b) = hub.subscribe().unwrap();
        hub.unsubscribe(id);
        hub.publish(logs::Stream::Stderr, b"x");
        assert_eq!(a.try_recv().unwrap(), (logs::Stream::Stderr, b"x".to_vec()));
        assert!(b.try_recv().is_err());
        hub.end();
        assert!(matches!(a.recv(), Err(std::sync::mpsc::RecvError)));
        assert!(hub.subscribe().is_none());
    }

    #[test]
    fn stdin_reaches_the_container_and_closes_once() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let hub = Hub::new(Some(ours), true, false);
        hub.write_stdin(b"hi\n").unwrap();
        hub.close_stdin();
        let mut got = String::new();
        theirs.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hi\n");
        assert!(!hub.has_stdin());
        assert!(hub.write_stdin(b"more").is_err());
    }

    #[test]
    fn the_tee_shows_what_it_reads() {
        let hub = Arc::new(Hub::new(None, false, false));
        let (_, rx) = hub.subscribe().unwrap();
        let mut tee = Tee {
            inner: &b"hello"[..],
            hub: Arc::clone(&hub),
            stream: logs::Stream::Stdout,
        };
        let mut s = String::new();
        tee.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        assert_eq!(rx.try_recv().unwrap().1, b"hello");
    }
}
