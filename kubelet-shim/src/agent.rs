//! The host's client of the guest agent (`agent-proto/proto/agent.proto`).
//!
//! The host reaches a guest vsock port through the VMM's Unix socket: connect, write
//! `CONNECT <port>\n`, read `OK <n>\n`, and the socket is then the byte stream. A
//! control connection ([`AgentClient`]) starts with Hello and then carries one
//! request and one response at a time; a stream connection ([`attach`]) carries one
//! framed Attach, one framed AttachReply and then raw bytes.
//!
//! Everything the guest sends is hostile: frames are bounded by the framing layer
//! (`MAX_FRAME`), the handshake line by [`MAX_HANDSHAKE_LINE`], and a reply of the
//! wrong kind is an error, never a panic.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use atoll_agent_proto::v1::{self, request::Op, response::Result as Reply};
use atoll_agent_proto::{
    read_frame, write_frame, FrameError, CONTROL_PORT, PROTOCOL_VERSION, STREAM_PORT,
};

/// Longest `OK <n>\n` line accepted from the VMM.
pub const MAX_HANDSHAKE_LINE: usize = 32;
/// How long [`attach`] keeps trying to reach the stream port.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection attempt may wait for the VMM's `OK` line. A guest that
/// is not listening yet is answered with a reset (EOF) well within this.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of a Quiesce (sync and drop caches in the guest).
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of a Restored (the agent waits up to 5 s for the clone's disks).
pub const RESTORED_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the agent may take to answer Hello on a fresh connection.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// Pauses between attempts: short, because a restored clone's socket appears some
/// tens of ms after its VMM starts and every ms of a late retry is the pod's wait
/// (up to 200 ms, they added 10 to 40 ms to a restore). An attempt is cheap: a
/// connect(2) while the socket is missing; once it is there, one request to the
/// guest, which waits in the VMM until the guest can answer it.
const FIRST_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_millis(10);

/// Reaching a guest vsock port through the VMM's Unix socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing answered before the deadline.
    #[error(
        "guest vsock port {port} is not reachable through {uds} after {waited:.1?} \
         (last attempt: {last}); is the VM running and its agent listening? \
         (see the pod's console.log)"
    )]
    Timeout {
        uds: PathBuf,
        port: u32,
        waited: Duration,
        last: String,
    },
    /// The VMM answered something other than `OK <n>`.
    #[error("{uds}: the VMM answered {line:?} to `CONNECT {port}`, expected `OK <port>`")]
    BadHandshake {
        uds: PathBuf,
        port: u32,
        line: String,
    },
}

/// A request to the guest agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The connection broke or the agent sent something that is not a frame.
    #[error("{op} over {uds}: the guest agent connection failed: {source}")]
    Frame {
        op: &'static str,
        uds: PathBuf,
        #[source]
        source: FrameError,
    },
    /// The agent answered with an Error.
    #[error("the guest agent refused {op}: {} ({message})", code.as_str_name())]
    Refused {
        op: &'static str,
        code: v1::error::Code,
        message: String,
    },
    /// The agent answered with a reply of another request.
    #[error("the guest agent answered {op} with {got}, which is not its reply (agent bug or version mismatch)")]
    UnexpectedReply { op: &'static str, got: &'static str },
    /// Hello found a different protocol version.
    #[error(
        "the guest agent speaks protocol version {agent}, this host speaks {host}: \
         rebuild the initramfs and `atoll` from the same checkout (`make artifacts`)"
    )]
    Version { agent: u32, host: u32 },
}

impl AgentError {
    /// The agent's error code, when the agent refused the request.
    pub fn code(&self) -> Option<v1::error::Code> {
        match self {
            AgentError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Opening a stream connection failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("attaching {stream} of {container}: the guest agent connection failed: {source}")]
    Frame {
        stream: &'static str,
        container: String,
        #[source]
        source: FrameError,
    },
    #[error("the guest agent refused to attach {stream} of {container}: {} ({message})", code.as_str_name())]
    Refused {
        stream: &'static str,
        container: String,
        code: v1::error::Code,
        message: String,
    },
}

fn reply_name(r: &Reply) -> &'static str {
    match r {
        Reply::Error(_) => "Error",
        Reply::Hello(_) => "HelloReply",
        Reply::Create(_) => "CreateReply",
        Reply::Start(_) => "StartReply",
        Reply::Ok(_) => "Ok",
        Reply::Wait(_) => "WaitReply",
        Reply::Stats(_) => "StatsReply",
    }
}

fn stream_name(s: v1::attach::Stream) -> &'static str {
    match s {
        v1::attach::Stream::Unspecified => "an unspecified stream",
        v1::attach::Stream::Stdin => "stdin",
        v1::attach::Stream::Stdout => "stdout",
        v1::attach::Stream::Stderr => "stderr",
        v1::attach::Stream::Tty => "the tty",
        v1::attach::Stream::Tcp => "a TCP connection",
        v1::attach::Stream::Volume => "a copied volume",
    }
}

fn code_of(e: &v1::Error) -> v1::error::Code {
    v1::error::Code::try_from(e.code).unwrap_or(v1::error::Code::Unspecified)
}

/// Reads the VMM's `OK <n>\n` one byte at a time, so no byte of the guest's stream
/// is consumed. `None`: the VMM closed the socket (the guest port is not listening).
fn read_handshake(s: &mut UnixStream) -> io::Result<Option<String>> {
    let mut line = Vec::with_capacity(MAX_HANDSHAKE_LINE);
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the VMM closed the socket in the middle of its answer",
                ))
            }
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => {
                if line.len() >= MAX_HANDSHAKE_LINE {
                    return Ok(Some(String::from_utf8_lossy(&line).into_owned() + "..."));
                }
                line.push(b[0]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

fn handshake_ok(line: &str) -> bool {
    line.strip_prefix("OK ")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Connects to guest vsock `port` through the VMM socket `uds`, retrying with
/// backoff until the guest listens or `timeout` passes.
pub fn connect_port(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, ConnectError> {
    let start = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let remaining = timeout.saturating_sub(start.elapsed());
        match try_connect(
            uds,
            port,
            remaining.clamp(Duration::from_millis(1), ATTEMPT_TIMEOUT),
        ) {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(line)) => {
                return Err(ConnectError::BadHandshake {
                    uds: uds.to_owned(),
                    port,
                    line,
                })
            }
            Err(last) if start.elapsed() + backoff > timeout => {
                return Err(ConnectError::Timeout {
                    uds: uds.to_owned(),
                    port,
                    waited: start.elapsed(),
                    last,
                });
            }
            Err(_) => {}
        }
        thread::sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One attempt: `Err(why)` is worth retrying, `Ok(Err(line))` is a VMM that answers
/// nonsense (not worth retrying).
fn try_connect(
    uds: &Path,
    port: u32,
    attempt_timeout: Duration,
) -> Result<Result<UnixStream, String>, String> {
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(attempt_timeout))
        .and_then(|()| s.set_write_timeout(Some(attempt_timeout)))
        .map_err(|e| format!("socket options: {e}"))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("write CONNECT: {e}"))?;
    match read_handshake(&mut s) {
        Ok(None) => Err("the guest reset the connection (port not listening yet)".into()),
        Ok(Some(line)) if handshake_ok(&line) => {
            s.set_read_timeout(None)
                .and_then(|()| s.set_write_timeout(None))
                .map_err(|e| format!("socket options: {e}"))?;
            Ok(Ok(s))
        }
        Ok(Some(line)) => Ok(Err(line)),
        Err(e) => Err(format!("reading the VMM's answer: {e}")),
    }
}

/// A control connection to the guest agent (port [`CONTROL_PORT`]). One request at a
/// time; open another client for a concurrent request (a Signal while a Wait blocks).
#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    uds: PathBuf,
    hello: v1::HelloReply,
}

impl AgentClient {
    /// Connects (retrying until `timeout`), sends Hello and checks the version.
    pub fn connect(vsock_uds: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let stream = connect_port(vsock_uds, CONTROL_PORT, timeout)?;
        Self::over(stream, vsock_uds)
    }

    /// Says Hello over an already connected control stream.
    pub fn over(stream: UnixStream, vsock_uds: &Path) -> Result<Self, AgentError> {
        let mut c = Self {
            stream,
            uds: vsock_uds.to_owned(),
            hello: v1::HelloReply::default(),
        };
        // A guest that accepts and then stays silent must not hold the caller.
        let sockopt = |source: io::Error| AgentError::Frame {
            op: "Hello",
            uds: vsock_uds.to_owned(),
            source: FrameError::Io(source),
        };
        c.set_timeout(Some(HELLO_TIMEOUT)).map_err(sockopt)?;
        let reply = c.call(
            "Hello",
            Op::Hello(v1::Hello {
                version: PROTOCOL_VERSION,
            }),
        )?;
        c.set_timeout(None).map_err(sockopt)?;
        let Reply::Hello(h) = reply else {
            return Err(AgentError::UnexpectedReply {
                op: "Hello",
                got: reply_name(&reply),
            });
        };
        if h.version != PROTOCOL_VERSION {
            return Err(AgentError::Version {
                agent: h.version,
                host: PROTOCOL_VERSION,
            });
        }
        c.hello = h;
        Ok(c)
    }

    /// The agent's Hello reply (its build and `agent_ready_us`).
    pub fn hello(&self) -> &v1::HelloReply {
        &self.hello
    }

    /// Bounds how long one request may wait for its reply (`None`: forever, the
    /// default; Wait needs that).
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(t)?;
        self.stream.set_write_timeout(t)
    }

    /// Sends one request and reads one response; an Error response becomes
    /// [`AgentError::Refused`].
    fn call(&mut self, op: &'static str, req: Op) -> Result<Reply, AgentError> {
        let frame_err = |uds: &Path| {
            let uds = uds.to_owned();
            move |source| AgentError::Frame { op, uds, source }
        };
        write_frame(&mut self.stream, &v1::Request { op: Some(req) })
            .map_err(frame_err(&self.uds))?;
        let resp: v1::Response = read_frame(&mut self.stream).map_err(frame_err(&self.uds))?;
        match resp.result {
            None => Err(AgentError::UnexpectedReply {
                op,
                got: "an empty Response",
            }),
            Some(Reply::Error(e)) => Err(AgentError::Refused {
                op,
                code: code_of(&e),
                message: e.message,
            }),
            Some(r) => Ok(r),
        }
    }

    /// Sends `req` and takes the reply `pick` accepts (it hands any other back).
    fn call_for<T>(
        &mut self,
        op: &'static str,
        req: Op,
        pick: impl FnOnce(Reply) -> Result<T, Reply>,
    ) -> Result<T, AgentError> {
        pick(self.call(op, req)?).map_err(|r| AgentError::UnexpectedReply {
            op,
            got: reply_name(&r),
        })
    }

    fn call_ok(&mut self, op: &'static str, req: Op) -> Result<(), AgentError> {
        self.call_for(op, req, |r| match r {
            Reply::Ok(_) => Ok(()),
            r => Err(r),
        })
    }

    pub fn create(&mut self, req: v1::CreateContainer) -> Result<v1::CreateReply, AgentError> {
        self.call_for("CreateContainer", Op::Create(req), |r| match r {
            Reply::Create(r) => Ok(r),
            r => Err(r),
        })
    }

    pub fn start(&mut self, id: &str) -> Result<v1::StartReply, AgentError> {
        let req = Op::Start(v1::StartContainer { id: id.to_owned() });
        self.call_for("StartContainer", req, |r| match r {
            Reply::Start(r) => Ok(r),
            r => Err(r),
        })
    }

    pub fn exec(&mut self, req: v1::ExecProcess) -> Result<(), AgentError> {
        self.call_ok("ExecProcess", Op::Exec(req))
    }

    /// Blocks until the process ends (`exec_id` empty: the container's init).
    pub fn wait(&mut self, container_id: &str, exec_id: &str) -> Result<v1::WaitReply, AgentError> {
        let req = Op::Wait(v1::WaitProcess {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
        });
        self.call_for("WaitProcess", req, |r| match r {
            Reply::Wait(r) => Ok(r),
            r => Err(r),
        })
    }

    pub fn signal(
        &mut self,
        container_id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), AgentError> {
        self.call_ok(
            "SignalProcess",
            Op::Signal(v1::SignalProcess {
                container_id: container_id.to_owned(),
                exec_id: exec_id.to_owned(),
                signal,
                all,
            }),
        )
    }

    pub fn resize(
        &mut self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        self.call_ok(
            "ResizeTty",
            Op::Resize(v1::ResizeTty {
                container_id: container_id.to_owned(),
                exec_id: exec_id.to_owned(),
                rows,
                cols,
            }),
        )
    }

    pub fn stats(&mut self, container_id: &str) -> Result<v1::StatsReply, AgentError> {
        let req = Op::Stats(v1::GetStats {
            container_id: container_id.to_owned(),
        });
        self.call_for("GetStats", req, |r| match r {
            Reply::Stats(r) => Ok(r),
            r => Err(r),
        })
    }

    /// New limits for a container (0 lifts one).
    pub fn update_resources(
        &mut self,
        container_id: &str,
        resources: v1::Resources,
    ) -> Result<(), AgentError> {
        let req = Op::Update(v1::UpdateResources {
            container_id: container_id.to_owned(),
            resources: Some(resources),
        });
        self.call_ok("UpdateResources", req)
    }

    pub fn configure_network(&mut self, req: v1::ConfigureNetwork) -> Result<(), AgentError> {
        self.call_ok("ConfigureNetwork", Op::Network(req))
    }

    /// Before a snapshot of the VM: the agent syncs and drops clean caches. Answered
    /// within [`QUIESCE_TIMEOUT`] or failed.
    pub fn quiesce(&mut self) -> Result<(), AgentError> {
        self.call_ok_within("Quiesce", Op::Quiesce(v1::Quiesce {}), QUIESCE_TIMEOUT)
    }

    /// First request to a restored clone: its entropy, clock, network and disks.
    /// Answered within [`RESTORED_TIMEOUT`] (the agent waits up to 5 s for disks) or
    /// failed.
    pub fn restored(&mut self, req: v1::Restored) -> Result<(), AgentError> {
        self.call_ok_within("Restored", Op::Restored(req), RESTORED_TIMEOUT)
    }

    /// [`Self::call_ok`] with a deadline for the reply; the client's own timeout
    /// (none by default) applies again afterwards.
    fn call_ok_within(
        &mut self,
        op: &'static str,
        req: Op,
        deadline: Duration,
    ) -> Result<(), AgentError> {
        let set = |c: &Self, t| {
            c.set_timeout(t).map_err(|source| AgentError::Frame {
                op,
                uds: c.uds.clone(),
                source: FrameError::Io(source),
            })
        };
        set(self, Some(deadline))?;
        let r = self.call_ok(op, req);
        set(self, None)?;
        r
    }

    pub fn remove(&mut self, id: &str) -> Result<(), AgentError> {
        self.call_ok(
            "RemoveContainer",
            Op::Remove(v1::RemoveContainer { id: id.to_owned() }),
        )
    }

    /// Asks the agent to kill everything and power the VM off with `status`. The
    /// agent may close the connection instead of answering (it is going away): that
    /// counts as done.
    pub fn shutdown(&mut self, status: u32) -> Result<(), AgentError> {
        match self.call_ok("Shutdown", Op::Shutdown(v1::Shutdown { status })) {
            Err(AgentError::Frame {
                source: FrameError::Closed,
                ..
            }) => Ok(()),
            r => r,
        }
    }
}

/// Opens a stream connection (port [`STREAM_PORT`]) for one stdio stream of a
/// process (`exec_id` empty: the container's init) and checks the AttachReply. The
/// returned socket carries the raw bytes.
pub fn attach(
    vsock_uds: &Path,
    container_id: &str,
    exec_id: &str,
    stream: v1::attach::Stream,
) -> Result<UnixStream, AttachError> {
    attach_with_timeout(vsock_uds, container_id, exec_id, stream, ATTACH_TIMEOUT)
}

/// [`attach`] with its own connection deadline.
pub fn attach_with_timeout(
    vsock_uds: &Path,
    container_id: &str,
    exec_id: &str,
    stream: v1::attach::Stream,
    timeout: Duration,
) -> Result<UnixStream, AttachError> {
    let req = v1::Attach {
        container_id: container_id.to_owned(),
        exec_id: exec_id.to_owned(),
        stream: stream as i32,
        ..Default::default()
    };
    stream_connection(vsock_uds, req, timeout)
}

/// Attaches the output `stream` (STDOUT, STDERR or TTY) of a container's init so
/// that it waits for a host when this connection goes away. `take_over`: from a
/// host that attached it before (a restarted atoll-cri); the guest kept what that
/// host did not take.
pub fn attach_kept(
    vsock_uds: &Path,
    container_id: &str,
    stream: v1::attach::Stream,
    take_over: bool,
    resume_from: Option<u64>,
) -> Result<UnixStream, AttachError> {
    let req = v1::Attach {
        container_id: container_id.to_owned(),
        stream: stream as i32,
        keep: true,
        take_over,
        resume_from: resume_from.filter(|_| take_over),
        ..Default::default()
    };
    stream_connection(vsock_uds, req, ATTACH_TIMEOUT)
}

/// A TCP connection to `port` on the guest's loopback, made by the agent
/// (port-forward): the returned socket carries both directions.
pub fn forward(vsock_uds: &Path, port: u16, timeout: Duration) -> Result<UnixStream, AttachError> {
    let req = v1::Attach {
        stream: v1::attach::Stream::Tcp as i32,
        port: u32::from(port),
        ..Default::default()
    };
    stream_connection(vsock_uds, req, timeout)
}

fn stream_connection(
    vsock_uds: &Path,
    req: v1::Attach,
    timeout: Duration,
) -> Result<UnixStream, AttachError> {
    let stream = v1::attach::Stream::try_from(req.stream).unwrap_or_default();
    let container_id = req.container_id.as_str();
    let name = stream_name(stream);
    let frame_err = |source| AttachError::Frame {
        stream: name,
        container: container_id.to_owned(),
        source,
    };
    let mut s = connect_port(vsock_uds, STREAM_PORT, timeout)?;
    // The reply must come promptly; the raw stream after it may idle forever.
    let _ = s.set_read_timeout(Some(timeout.max(Duration::from_secs(1))));
    write_frame(&mut s, &req).map_err(frame_err)?;
    let reply: v1::AttachReply = read_frame(&mut s).map_err(frame_err)?;
    if let Some(e) = reply.error {
        return Err(AttachError::Refused {
            stream: name,
            container: container_id.to_owned(),
            code: code_of(&e),
            message: e.message,
        });
    }
    s.set_read_timeout(None).map_err(|e| frame_err(e.into()))?;
    Ok(s)
}

#[cfg(test)]
pub(crate) mod fake {
    //! A fake VMM socket + agent: a thread accepting on a `UnixListener`, answering
    //! the `CONNECT` line and then running a per-connection script.

    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::Arc;

    pub type Script = Box<dyn Fn(u32, UnixStream) + Send + Sync>;

    /// Serves `script(port, stream)` on every connection after answering `OK`.
    pub fn serve(uds: &Path, script: Script) -> thread::JoinHandle<()> {
        serve_with_resets(uds, 0, script)
    }

    /// Like [`serve`], but the first `resets` connections are closed without `OK`,
    /// as the VMM does while the guest port is not listening yet.
    pub fn serve_with_resets(uds: &Path, resets: usize, script: Script) -> thread::JoinHandle<()> {
        let l = UnixListener::bind(uds).expect("bind fake vsock socket");
        let script: Arc<Script> = Arc::new(script);
        thread::spawn(move || {
            for (n, conn) in l.incoming().enumerate() {
                let Ok(mut c) = conn else { return };
                let script = Arc::clone(&script);
                thread::spawn(move || {
                    let mut line = Vec::new();
                    let mut b = [0u8; 1];
                    while c.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                        line.push(b[0]);
                    }
                    let line = String::from_utf8_lossy(&line).into_owned();
                    let Some(port) = line.strip_prefix("CONNECT ").and_then(|p| p.parse().ok())
                    else {
                        return;
                    };
                    if n < resets || c.write_all(b"OK 99\n").is_err() {
                        return;
                    }
                    script(port, c);
                });
            }
        })
    }

    /// Answers Hello with the current version, then each request with `answer`.
    pub fn agent(
        answer: impl Fn(v1::Request) -> Option<v1::Response> + Send + Sync + 'static,
    ) -> Script {
        Box::new(move |_port, mut c| {
            let Ok(_hello) = read_frame::<v1::Request, _>(&mut c) else {
                return;
            };
            let hello = v1::Response {
                result: Some(Reply::Hello(v1::HelloReply {
                    version: PROTOCOL_VERSION,
                    agent: "fake".into(),
                    agent_ready_us: 1234,
                })),
            };
            if write_frame(&mut c, &hello).is_err() {
                return;
            }
            while let Ok(req) = read_frame::<v1::Request, _>(&mut c) {
                match answer(req) {
                    Some(r) => {
                        if write_frame(&mut c, &r).is_err() {
                            return;
                        }
                    }
                    None => return,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{agent, serve};
    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn sock() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vsock.sock");
        (d, p)
    }

    fn raw_script(f: impl Fn(UnixStream) + Send + Sync + 'static) -> fake::Script {
        Box::new(move |_port, c| f(c))
    }

    #[test]
    fn connect_hello_reports_agent_ready_time() {
        let (_d, p) = sock();
        serve(&p, agent(|_| Some(v1::Response::ok())));
        let c = AgentClient::connect(&p, T).unwrap();
        assert_eq!(c.hello().agent_ready_us, 1234);
        assert_eq!(c.hello().agent, "fake");
    }

    #[test]
    fn a_call_with_a_deadline_fails_when_the_agent_hangs_then_the_client_waits_again() {
        let (_d, p) = sock();
        serve(
            &p,
            agent(|_| {
                std::thread::sleep(Duration::from_secs(3));
                Some(v1::Response::ok())
            }),
        );
        let mut c = AgentClient::connect(&p, T).unwrap();
        let t0 = Instant::now();
        let err = c
            .call_ok_within(
                "Quiesce",
                Op::Quiesce(v1::Quiesce {}),
                Duration::from_millis(200),
            )
            .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(err.to_string().contains("Quiesce"), "{err}");
        assert_eq!(
            c.stream.read_timeout().unwrap(),
            None,
            "no deadline left behind"
        );
    }

    #[test]
    fn connect_without_listener_times_out_naming_the_socket() {
        let (_d, p) = sock();
        let t0 = Instant::now();
        let err = AgentClient::connect(&p, Duration::from_millis(300)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(3));
        let msg = err.to_string();
        assert!(msg.contains(&p.display().to_string()), "{msg}");
        assert!(matches!(
            err,
            AgentError::Connect(ConnectError::Timeout { port: 1024, .. })
        ));
    }

    #[test]
    fn connect_retries_until_guest_listens() {
        let (_d, p) = sock();
        fake::serve_with_resets(&p, 3, agent(|_| Some(v1::Response::ok())));
        let mut c = AgentClient::connect(&p, T).unwrap();
        c.remove("c1").unwrap();
    }

    #[test]
    fn connect_socket_appearing_late_succeeds() {
        let (_d, p) = sock();
        let p2 = p.clone();
        let h = thread::spawn(move || {
            thread::sleep(Duration::from_millis(150));
            serve(&p2, agent(|_| Some(v1::Response::ok())));
        });
        let c = AgentClient::connect(&p, T);
        h.join().unwrap();
        assert!(c.is_ok(), "{:?}", c.err());
    }

    #[test]
    fn handshake_garbage_is_bad_handshake() {
        let (_d, p) = sock();
        let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        thread::spawn(move || {
            for c in l.incoming() {
                let mut c = c.unwrap();
                let _ = c.write_all(&[b'X'; 4096]);
            }
        });
        let err = AgentClient::connect(&p, T).unwrap_err();
        assert!(
            matches!(err, AgentError::Connect(ConnectError::BadHandshake { ref line, .. }) if line.len() <= MAX_HANDSHAKE_LINE + 3),
            "{err:?}"
        );
    }

    #[test]
    fn refused_request_maps_code_and_message() {
        let (_d, p) = sock();
        serve(
            &p,
            agent(|_| {
                Some(v1::Response::error(
                    v1::error::Code::NotFound,
                    "no container c9",
                ))
            }),
        );
        let mut c = AgentClient::connect(&p, T).unwrap();
        let err = c.start("c9").unwrap_err();
        assert_eq!(err.code(), Some(v1::error::Code::NotFound));
        assert!(err.to_string().contains("no container c9"), "{err}");
        assert!(err.to_string().contains("NOT_FOUND"), "{err}");
    }

    #[test]
    fn typed_requests_reach_the_agent_and_replies_come_back() {
        let (_d, p) = sock();
        serve(
            &p,
            agent(|req| {
                let result = match req.op? {
                    Op::Create(c) => Reply::Create(v1::CreateReply {
                        pid: c.process?.args.len() as u32,
                        rootfs_us: 5,
                        create_us: 6,
                    }),
                    Op::Start(_) => Reply::Start(v1::StartReply { start_us: 7 }),
                    Op::Wait(w) => Reply::Wait(v1::WaitReply {
                        status: if w.container_id == "c1" { 137 } else { 0 },
                        signal: 9,
                        oom_killed: true,
                    }),
                    Op::Stats(_) => Reply::Stats(v1::StatsReply {
                        memory_current_bytes: 42,
                        ..Default::default()
                    }),
                    _ => Reply::Ok(v1::Empty {}),
                };
                Some(v1::Response {
                    result: Some(result),
                })
            }),
        );
        let mut c = AgentClient::connect(&p, T).unwrap();
        let cr = c
            .create(v1::CreateContainer {
                id: "c1".into(),
                process: Some(v1::Process {
                    args: vec!["a".into(), "b".into(), "c".into()],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .unwrap();
        assert_eq!((cr.pid, cr.rootfs_us, cr.create_us), (3, 5, 6));
        assert_eq!(c.start("c1").unwrap().start_us, 7);
        let w = c.wait("c1", "").unwrap();
        assert_eq!((w.status, w.signal, w.oom_killed), (137, 9, true));
        assert_eq!(c.stats("c1").unwrap().memory_current_bytes, 42);
        c.signal("c1", "", 15, false).unwrap();
        c.resize("c1", "", 24, 80).unwrap();
        c.remove("c1").unwrap();
        c.shutdown(0).unwrap();
    }

    #[test]
    fn wrong_reply_type_is_an_error() {
        let (_d, p) = sock();
        serve(
            &p,
            agent(|_| {
                Some(v1::Response {
                    result: Some(Reply::Stats(v1::StatsReply::default())),
                })
            }),
        );
        let mut c = AgentClient::connect(&p, T).unwrap();
        let err = c.wait("c1", "").unwrap_err();
        assert!(
            matches!(
                err,
                AgentError::UnexpectedReply {
                    op: "WaitProcess",
                    got: "StatsReply"
                }
            ),
            "{err:?}"
        );
        // An empty response is no reply at all.
        let (_d2, p2) = sock();
        serve(&p2, agent(|_| Some(v1::Response::default())));
        let mut c = AgentClient::connect(&p2, T).unwrap();
        assert!(matches!(
            c.remove("x"),
            Err(AgentError::UnexpectedReply { .. })
        ));
    }

    #[test]
    fn oversized_frame_is_an_error_not_an_allocation() {
        let (_d, p) = sock();
        serve(
            &p,
            raw_script(|mut c| {
                let _ = read_frame::<v1::Request, _>(&mut c);
                let _ = c.write_all(&u32::MAX.to_be_bytes());
                thread::sleep(Duration::from_millis(200));
            }),
        );
        let err = AgentClient::connect(&p, T).unwrap_err();
        assert!(
            matches!(
                err,
                AgentError::Frame {
                    source: FrameError::TooLarge(_),
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_frame_is_a_decode_error() {
        let (_d, p) = sock();
        serve(
            &p,
            raw_script(|mut c| {
                let _ = read_frame::<v1::Request, _>(&mut c);
                let _ = c.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]);
                thread::sleep(Duration::from_millis(200));
            }),
        );
        let err = AgentClient::connect(&p, T).unwrap_err();
        assert!(
            matches!(
                err,
                AgentError::Frame {
                    source: FrameError::Decode(_),
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn agent_closing_mid_session_is_an_error() {
        let (_d, p) = sock();
        serve(&p, agent(|_| None));
        let mut c = AgentClient::connect(&p, T).unwrap();
        let err = c.start("c1").unwrap_err();
        assert!(
            matches!(
                err,
                AgentError::Frame {
                    op: "StartContainer",
                    source: FrameError::Closed,
                    ..
                }
            ),
            "{err:?}"
        );
        // Shutdown treats the same close as success: the agent is going away.
        let mut c = AgentClient::connect(&p, T).unwrap();
        c.shutdown(0).unwrap();
    }

    #[test]
    fn other_protocol_version_is_refused() {
        let (_d, p) = sock();
        serve(
            &p,
            raw_script(|mut c| {
                let _ = read_frame::<v1::Request, _>(&mut c);
                let r = v1::Response {
                    result: Some(Reply::Hello(v1::HelloReply {
                        version: PROTOCOL_VERSION + 1,
                        ..Default::default()
                    })),
                };
                let _ = write_frame(&mut c, &r);
            }),
        );
        let err = AgentClient::connect(&p, T).unwrap_err();
        assert!(
            matches!(err, AgentError::Version { agent, host } if agent == PROTOCOL_VERSION + 1 && host == PROTOCOL_VERSION)
        );
    }

    #[test]
    fn attach_ok_then_raw_bytes_flow() {
        let (_d, p) = sock();
        serve(
            &p,
            Box::new(|port, mut c| {
                assert_eq!(port, STREAM_PORT);
                let a: v1::Attach = read_frame(&mut c).unwrap();
                write_frame(&mut c, &v1::AttachReply { error: None }).unwrap();
                let _ = c.write_all(format!("out of {}:{}", a.container_id, a.stream).as_bytes());
            }),
        );
        let mut s = attach(&p, "c1", "", v1::attach::Stream::Stdout).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert_eq!(out, "out of c1:2");
    }

    #[test]
    fn attach_refused_carries_the_agent_message() {
        let (_d, p) = sock();
        serve(
            &p,
            raw_script(|mut c| {
                let _ = read_frame::<v1::Attach, _>(&mut c);
                let e = v1::Error {
                    code: v1::error::Code::FailedPrecondition as i32,
                    message: "no tty".into(),
                };
                let _ = write_frame(&mut c, &v1::AttachReply { error: Some(e) });
            }),
        );
        let err = attach(&p, "c1", "", v1::attach::Stream::Tty).unwrap_err();
        assert!(
            matches!(err, AttachError::Refused { code: v1::error::Code::FailedPrecondition, ref message, .. } if message == "no tty")
        );
        assert!(err.to_string().contains("the tty"), "{err}");
    }

    #[test]
    fn attach_closed_before_reply_is_an_error() {
        let (_d, p) = sock();
        serve(&p, raw_script(drop));
        let err = attach_with_timeout(
            &p,
            "c1",
            "",
            v1::attach::Stream::Stdout,
            Duration::from_secs(2),
        )
        .unwrap_err();
        assert!(matches!(err, AttachError::Frame { .. }), "{err:?}");
    }
}
