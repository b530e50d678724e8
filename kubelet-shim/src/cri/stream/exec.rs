//! Exec over a session: a new process in a running container, its stdio joined
//! to the session's channels, its terminal resized by the client, its exit status
//! on the error channel. The client going away kills it.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use atoll_agent_proto::v1;

use super::session::{Event, Output, Session};
use super::{Channel, Outcome};
use crate::cri::server::{self, clean_message, CriError, Server};
use crate::pod::PodHandle;

/// How long the rest of the output may take once the process has ended
/// (something it left in the background may hold the pipes).
const DRAIN: Duration = Duration::from_secs(2);
/// How long the process has to end once killed.
const KILLED: Duration = Duration::from_secs(10);
/// A process that reads none of its stdin for this long loses it.
const STDIN_STALL: Duration = Duration::from_secs(60);

/// What Exec asked for, kept behind the one-time URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    pub container_id: String,
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl ExecSpec {
    /// Checks what the CRI requires of an ExecRequest.
    pub fn validate(&self) -> Result<(), CriError> {
        if self.cmd.is_empty() {
            return Err(CriError::InvalidArgument("cmd is empty".into()));
        }
        if !(self.stdin || self.stdout || self.stderr) {
            return Err(CriError::InvalidArgument(
                "one of stdin, stdout and stderr must be set".into(),
            ));
        }
        if self.tty && self.stderr {
            return Err(CriError::InvalidArgument(
                "tty and stderr cannot both be set: a terminal has one output".into(),
            ));
        }
        Ok(())
    }

    /// The streams a client opens for it (remotecommand v4).
    pub fn channels(&self) -> Vec<Channel> {
        channels(self.stdin, self.stdout, self.stderr, self.tty)
    }
}

/// The streams of a remotecommand session with these options.
pub fn channels(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Vec<Channel> {
    let mut c = vec![Channel::Error];
    if stdin {
        c.push(Channel::Stdin);
    }
    if stdout {
        c.push(Channel::Stdout);
    }
    if stderr && !tty {
        c.push(Channel::Stderr);
    }
    if tty {
        c.push(Channel::Resize);
    }
    c
}

/// Where a process stream goes: a channel of a session.
pub type Sink = (Arc<dyn Output>, Channel);

/// Copies a process stream to a channel (or nowhere) until its end.
pub fn pump(from: UnixStream, to: Option<Sink>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut from = from;
        let mut buf = vec![0u8; 32 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if let Some((out, ch)) = &to {
                // A client that stopped reading does not stop the process: its
                // output is drained and dropped.
                let _ = out.write(*ch, &buf[..n]);
            }
        }
    })
}

/// Waits up to `limit` for the pumps, then cuts their sockets and joins them.
pub fn drain(pumps: Vec<JoinHandle<()>>, sockets: &[UnixStream], limit: Duration) {
    let deadline = Instant::now() + limit;
    while pumps.iter().any(|p| !p.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    for s in sockets {
        let _ = s.shutdown(Shutdown::Both);
    }
    for p in pumps {
        let _ = p.join();
    }
}

/// Runs `spec` for `session` to its end, then closes the session with the
/// outcome on the error channel.
pub fn serve(server: &Server, spec: &ExecSpec, session: Session) {
    let out = Arc::clone(&session.output);
    let outcome = match run(server, spec, session) {
        Ok(o) => o,
        Err(e) => Outcome::Failed(clean_message(&e.to_string())),
    };
    tracing::info!(container = %spec.container_id, ?outcome, "exec ended");
    out.end(Channel::Stdout);
    out.end(Channel::Stderr);
    let _ = out.write(Channel::Error, &outcome.status_json());
    out.end(Channel::Error);
    out.close();
}

fn run(server: &Server, spec: &ExecSpec, session: Session) -> Result<Outcome, CriError> {
    let (c, sandbox) = server.exec_target(&spec.container_id)?;
    let id = spec.container_id.as_str();
    let exec_id = format!("exec-{}", &server::new_id()[..16]);
    let mut control = server::agent(&sandbox)?;
    control
        .exec(v1::ExecProcess {
            container_id: id.to_owned(),
            exec_id: exec_id.clone(),
            process: Some(v1::Process {
                args: spec.cmd.clone(),
                env: c.env.clone(),
                cwd: c.cwd.clone(),
                user: c.user.clone(),
                terminal: spec.tty,
                stdin: spec.stdin,
                rows: if spec.tty { 24 } else { 0 },
                cols: if spec.tty { 80 } else { 0 },
                ..Default::default()
            }),
        })
        .map_err(|e| server::agent_error("starting the command", &e))?;
    let handle = PodHandle::for_dir(&sandbox.pod_dir);
    let out = &session.output;
    // Every output stream is attached, wanted or not: one left alone would fill
    // its pipe and stop the process.
    let wanted = |want: bool, ch: Channel| want.then(|| (Arc::clone(out), ch));
    let plan: Vec<(v1::attach::Stream, Option<Sink>)> = if spec.tty {
        vec![(
            v1::attach::Stream::Tty,
            wanted(spec.stdout, Channel::Stdout),
        )]
    } else {
        vec![
            (
                v1::attach::Stream::Stdout,
                wanted(spec.stdout, Channel::Stdout),
            ),
            (
                v1::attach::Stream::Stderr,
                wanted(spec.stderr, Channel::Stderr),
            ),
        ]
    };
    let mut sockets = Vec::new();
    let mut pumps = Vec::new();
    let mut stdin: Option<UnixStream> = None;
    let kill = |control: &mut crate::agent::AgentClient| {
        let _ = control.signal(id, &exec_id, libc::SIGKILL, false);
    };
    let attached = (|| -> Result<(), String> {
        for (stream, to) in plan {
            let s = handle
                .attach(id, &exec_id, stream)
                .map_err(|e| e.to_string())?;
            sockets.push(s.try_clone().map_err(|e| e.to_string())?);
            if stream == v1::attach::Stream::Tty && spec.stdin {
                stdin = Some(s.try_clone().map_err(|e| e.to_string())?);
            }
            pumps.push(pump(s, to));
        }
        if spec.stdin && !spec.tty {
            let s = handle
                .attach(id, &exec_id, v1::attach::Stream::Stdin)
                .map_err(|e| e.to_string())?;
            sockets.push(s.try_clone().map_err(|e| e.to_string())?);
            stdin = Some(s);
        }
        Ok(())
    })();
    if let Err(e) = attached {
        kill(&mut control);
        // Reaped and waited for, the agent forgets it (its table is bounded).
        if let Ok(mut w) = server::agent(&sandbox) {
            let _ = w.set_timeout(Some(Duration::from_secs(5)));
            let _ = w.wait(id, &exec_id);
        }
        drain(pumps, &sockets, Duration::ZERO);
        return Err(CriError::Unavailable(clean_message(&format!(
            "attaching to the command: {e}"
        ))));
    }
    if let Some(s) = &stdin {
        let _ = s.set_write_timeout(Some(STDIN_STALL));
    }
    {
        let post = session.post.clone();
        let sandbox = sandbox.clone();
        let (id, exec_id) = (id.to_owned(), exec_id.clone());
        std::thread::spawn(move || {
            // No deadline on purpose: an interactive exec may run for hours. What
            // bounds it is the client: gone, the command is killed (below).
            let waited = server::agent(&sandbox).and_then(|mut a| {
                let _ = a.set_timeout(None);
                a.wait(&id, &exec_id)
                    .map_err(|e| server::agent_error("waiting for the command", &e))
            });
            let _ = post.send(Event::Done(match waited {
                Ok(w) if w.signal > 0 => Outcome::Exited(128 + w.signal),
                Ok(w) if w.status != 0 => Outcome::Exited(w.status),
                Ok(_) => Outcome::Success,
                Err(e) => Outcome::Failed(e.to_string()),
            }));
        });
    }
    let mut killed: Option<Instant> = None;
    let outcome = loop {
        let event = match killed {
            None => session.events.recv().ok(),
            Some(at) => session
                .events
                .recv_timeout(KILLED.saturating_sub(at.elapsed()))
                .ok(),
        };
        match event {
            Some(Event::Stdin(data)) => {
                if let Some(s) = stdin.as_mut() {
                    if let Err(e) = s.write_all(&data) {
                        tracing::info!(container = id, "exec: stdin dropped: {e}");
                        let _ = s.shutdown(Shutdown::Write);
                        stdin = None;
                    }
                }
            }
            Some(Event::StdinEnd) => {
                // A terminal has no half-close: its input just stops.
                if let Some(s) = stdin.take() {
                    if !spec.tty {
                        let _ = s.shutdown(Shutdown::Write);
                    }
                }
            }
            Some(Event::Resize(size)) => {
                if spec.tty {
                    let _ =
                        control.resize(id, &exec_id, u32::from(size.height), u32::from(size.width));
                }
            }
            Some(Event::Gone) => {
                if killed.is_none() {
                    tracing::info!(
                        container = id,
                        "exec: the client went away; killing the command"
                    );
                    kill(&mut control);
                    killed = Some(Instant::now());
                }
            }
            Some(Event::Done(outcome)) => break outcome,
            None => break Outcome::Failed("the command did not end after SIGKILL".into()),
        }
    };
    drain(pumps, &sockets, DRAIN);
    Ok(outcome)
}
