//! The streaming server's HTTP side: a TCP listener (kubelet connects to it, or
//! proxies its API server's connection to it), one thread per connection, and
//! the one-time URLs Exec, Attach and PortForward hand out.
//!
//! A URL is `http://<address>/<exec|attach|portforward>/<token>`; the token is
//! 128 random bits, good for one connection within [`TOKEN_TTL`] (kubelet's
//! streaming cache keeps them a minute too).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::exec::{self, ExecSpec};
use super::portforward;
use super::session::{self, WS_PROTOCOLS};
use super::ws;
use crate::cri::server::{CriError, CriResult, Server};

/// How long a URL stays good.
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// URLs handed out and not yet used, at most (kubelet's in-flight limit).
const MAX_PENDING: usize = 1000;
/// Streaming connections served at once, at most.
const MAX_ACTIVE: usize = 128;
/// How long a client has to send its request head.
const HEAD_DEADLINE: Duration = Duration::from_secs(10);
/// The largest request head read.
const MAX_HEAD: usize = 16 << 10;

/// The remotecommand subprotocol spoken over SPDY.
const SPDY_REMOTECOMMAND: &str = "v4.channel.k8s.io";
/// The port-forward subprotocol spoken over SPDY.
const SPDY_PORTFORWARD: &str = "portforward.k8s.io";

/// What a URL leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Exec(ExecSpec),
    Attach(super::attach::AttachSpec),
    PortForward(portforward::PortForwardSpec),
}

impl Request {
    fn path(&self) -> &'static str {
        match self {
            Request::Exec(_) => "exec",
            Request::Attach(_) => "attach",
            Request::PortForward(_) => "portforward",
        }
    }
}

pub struct Streaming {
    addr: SocketAddr,
    server: Arc<Server>,
    pending: Mutex<HashMap<String, (Request, Instant)>>,
    active: AtomicUsize,
}

impl std::fmt::Debug for Streaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streaming")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Streaming {
    /// Listens on `address` ("127.0.0.1:0": a port of the kernel's choosing) and
    /// serves in the background.
    pub fn start(address: &str, server: Arc<Server>) -> io::Result<Arc<Self>> {
        let listener = TcpListener::bind(address)?;
        let me = Arc::new(Self {
            addr: listener.local_addr()?,
            server,
            pending: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
        });
        let serving = Arc::clone(&me);
        std::thread::Builder::new()
            .name("streaming".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else {
                        // Out of descriptors, say: do not spin.
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    let me = Arc::clone(&serving);
                    if me.active.fetch_add(1, Ordering::SeqCst) >= MAX_ACTIVE {
                        me.active.fetch_sub(1, Ordering::SeqCst);
                        // No lingering here: the accepting thread does not wait.
                        let _ = write!(
                            &conn,
                            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                        continue;
                    }
                    me.server.metrics.streaming_connections.inc();
                    let spawned = std::thread::Builder::new()
                        .name("stream-conn".into())
                        .spawn(move || {
                            me.connection(conn);
                            me.active.fetch_sub(1, Ordering::SeqCst);
                            me.server.metrics.streaming_connections.dec();
                        });
                    if spawned.is_err() {
                        serving.active.fetch_sub(1, Ordering::SeqCst);
                        serving.server.metrics.streaming_connections.dec();
                    }
                }
            })?;
        Ok(me)
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// A one-time URL for `req`.
    pub fn url(&self, req: Request) -> CriResult<String> {
        let mut token = [0u8; 16];
        crate::pod::getrandom(&mut token)
            .map_err(|e| CriError::Internal(format!("getrandom: {e}")))?;
        let token = hex::encode(token);
        let path = req.path();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|_, (_, at)| at.elapsed() < TOKEN_TTL);
        if pending.len() >= MAX_PENDING {
            return Err(CriError::ResourceExhausted(format!(
                "{MAX_PENDING} streaming URLs are waiting to be used; retry later"
            )));
        }
        pending.insert(token.clone(), (req, Instant::now()));
        self.server
            .metrics
            .streaming_urls
            .set(i64::try_from(pending.len()).unwrap_or(i64::MAX));
        Ok(format!("http://{}/{path}/{token}", self.addr))
    }

    fn take(&self, path: &str, token: &str) -> Option<Request> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let removed = pending.remove(token);
        self.server
            .metrics
            .streaming_urls
            .set(i64::try_from(pending.len()).unwrap_or(i64::MAX));
        let (req, at) = removed?;
        (at.elapsed() < TOKEN_TTL && req.path() == path).then_some(req)
    }

    fn connection(&self, conn: TcpStream) {
        let _ = conn.set_read_timeout(Some(HEAD_DEADLINE));
        let head = match read_head(&conn) {
            Ok(h) => h,
            Err(e) => {
                let _ = respond(&conn, 400, &e);
                return;
            }
        };
        let _ = conn.set_read_timeout(None);
        let mut parts = head.path.trim_start_matches('/').splitn(2, '/');
        let (kind, token) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let token = token.split('?').next().unwrap_or("");
        let Some(req) = self.take(kind, token) else {
            let _ = respond(
                &conn,
                404,
                "this streaming URL is unknown, used or expired; ask the runtime for a new one",
            );
            return;
        };
        let upgrade = head.get("upgrade").unwrap_or("").to_ascii_lowercase();
        if upgrade == "websocket" {
            self.websocket(conn, &head, req);
        } else if upgrade.starts_with("spdy/3") {
            self.spdy(conn, &head, req);
        } else {
            let _ = respond(
                &conn,
                400,
                "the request must upgrade the connection to SPDY/3.1 or to a WebSocket",
            );
        }
    }

    fn spdy(&self, conn: TcpStream, head: &Head, req: Request) {
        let want = match req {
            Request::PortForward(_) => SPDY_PORTFORWARD,
            _ => SPDY_REMOTECOMMAND,
        };
        let offered = head.list("x-stream-protocol-version");
        if !offered.iter().any(|p| p == want) {
            let _ = respond(
                &conn,
                403,
                &format!(
                    "unable to upgrade: none of the offered protocols {offered:?} is served (need {want})"
                ),
            );
            return;
        }
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {want}\r\n\r\n"
        );
        if (&conn).write_all(ok.as_bytes()).is_err() {
            return;
        }
        match req {
            Request::Exec(spec) => match session::spdy(conn, &spec.channels()) {
                Ok(s) => exec::serve(&self.server, &spec, s),
                Err(e) => tracing::info!("exec: {e}"),
            },
            Request::Attach(spec) => match session::spdy(conn, &spec.channels()) {
                Ok(s) => super::attach::serve(&self.server, &spec, s),
                Err(e) => tracing::info!("attach: {e}"),
            },
            Request::PortForward(spec) => portforward::serve_spdy(&self.server, &spec, conn),
        }
    }

    fn websocket(&self, conn: TcpStream, head: &Head, req: Request) {
        let Some(key) = head.get("sec-websocket-key") else {
            let _ = respond(&conn, 400, "a WebSocket upgrade without Sec-WebSocket-Key");
            return;
        };
        let offered = head.list("sec-websocket-protocol");
        let served: &[&str] = match req {
            Request::PortForward(_) => portforward::WS_PROTOCOLS,
            _ => WS_PROTOCOLS,
        };
        let Some(protocol) = served.iter().find(|p| offered.iter().any(|o| o == *p)) else {
            let _ = respond(
                &conn,
                403,
                &format!(
                    "unable to upgrade: none of the offered WebSocket protocols {offered:?} is served ({served:?})"
                ),
            );
            return;
        };
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n",
            ws::accept_key(key)
        );
        if (&conn).write_all(ok.as_bytes()).is_err() {
            return;
        }
        match req {
            Request::Exec(spec) => match session::websocket(conn, protocol) {
                Ok(s) => exec::serve(&self.server, &spec, s),
                Err(e) => tracing::info!("exec: {e}"),
            },
            Request::Attach(spec) => match session::websocket(conn, protocol) {
                Ok(s) => super::attach::serve(&self.server, &spec, s),
                Err(e) => tracing::info!("attach: {e}"),
            },
            Request::PortForward(spec) => {
                portforward::serve_websocket(&self.server, &spec, conn, &head.path)
            }
        }
    }
}

/// A request head: its path (with the query) and headers (lower-case names).
#[derive(Debug)]
pub struct Head {
    pub path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header that may repeat or hold a comma-separated list.
    pub fn list(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// Reads a request head byte by byte to its blank line (nothing of what follows
/// is consumed: the client sends nothing more before the 101 anyway).
pub fn read_head(mut conn: &TcpStream) -> Result<Head, String> {
    let mut buf = Vec::with_capacity(1024);
    let mut byte = [0u8; 1];
    let deadline = Instant::now() + HEAD_DEADLINE;
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() >= MAX_HEAD {
            return Err(format!("the request head is larger than {MAX_HEAD} bytes"));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the request head took more than {} s",
                HEAD_DEADLINE.as_secs()
            ));
        }
        match conn.read(&mut byte) {
            Ok(0) => return Err("the connection closed inside the request head".into()),
            Ok(_) => buf.push(byte[0]),
            Err(e) => return Err(format!("reading the request: {e}")),
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("a cut request head".into()),
        Err(e) => return Err(format!("a malformed request head: {e}")),
    }
    Ok(Head {
        path: req.path.unwrap_or("/").to_owned(),
        headers: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
    })
}

/// A plain HTTP answer with a one-line text body, then the end of the connection.
fn respond(mut conn: &TcpStream, code: u16, message: &str) -> io::Result<()> {
    let reason = match code {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let body = format!("{message}\n");
    write!(
        conn,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()?;
    // A lingering close: what the client still sends is read and dropped for a
    // moment, so that closing does not reset the connection before it has read
    // the answer.
    conn.shutdown(std::net::Shutdown::Write)?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    let mut sink = [0u8; 4096];
    let mut left = 1usize << 20;
    while let Ok(n @ 1..) = conn.read(&mut sink) {
        left = left.saturating_sub(n);
        if left == 0 {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    //! The streaming server end to end in one process: a real listener, real
    //! SPDY and WebSocket clients, a fake guest agent behind the pod's socket.

    use std::io::Cursor;
    use std::os::unix::net::UnixStream;
    use std::sync::Condvar;

    use atoll_agent_proto::v1::{self, response::Result as Reply};
    use atoll_agent_proto::{read_frame, write_frame};

    use super::*;
    use crate::agent::fake;
    use crate::cri::server::tests::{container, sandbox, server};
    use crate::cri::store::{ContainerState, SandboxState};
    use crate::cri::stream::client::{self, Stdio, Transport};
    use crate::cri::stream::Outcome;

    /// A guest whose command answers "got:<its stdin>" on stdout, "warn" on
    /// stderr, and exits 3 once its stdin ended.
    fn fake_guest(pod_dir: &std::path::Path) {
        std::fs::create_dir_all(pod_dir).unwrap();
        let stdout: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let control = {
            let done = Arc::clone(&done);
            fake::agent(move |req| {
                Some(match req.op {
                    Some(v1::request::Op::Wait(_)) => {
                        let (m, cv) = &*done;
                        let mut d = m.lock().unwrap();
                        while !*d {
                            d = cv.wait(d).unwrap();
                        }
                        // The next exec (the other framing) waits for its own.
                        *d = false;
                        v1::Response {
                            result: Some(Reply::Wait(v1::WaitReply {
                                status: 3,
                                ..Default::default()
                            })),
                        }
                    }
                    _ => v1::Response::ok(),
                })
            })
        };
        fake::serve(
            &pod_dir.join("vsock.sock"),
            Box::new(move |port, mut c| {
                if port == atoll_agent_proto::CONTROL_PORT {
                    return control(port, c);
                }
                let a: v1::Attach = read_frame(&mut c).unwrap();
                write_frame(&mut c, &v1::AttachReply { error: None }).unwrap();
                match v1::attach::Stream::try_from(a.stream).unwrap() {
                    v1::attach::Stream::Stdout => *stdout.lock().unwrap() = Some(c),
                    v1::attach::Stream::Stderr => {
                        c.write_all(b"warn\n").unwrap();
                    }
                    v1::attach::Stream::Stdin => {
                        let mut got = Vec::new();
                        c.read_to_end(&mut got).unwrap();
                        // The client attaches its streams in any order: wait
                        // for stdout's connection.
                        let mut out = (0..500)
                            .find_map(|_| {
                                let taken = stdout.lock().unwrap().take();
                                if taken.is_none() {
                                    std::thread::sleep(std::time::Duration::from_millis(10));
                                }
                                taken
                            })
                            .expect("stdout attached within 5 s");
                        out.write_all(b"got:").unwrap();
                        out.write_all(&got).unwrap();
                        drop(out);
                        let (m, cv) = &*done;
                        *m.lock().unwrap() = true;
                        cv.notify_all();
                    }
                    _ => {}
                }
            }),
        );
    }

    pub(crate) fn setup() -> (tempfile::TempDir, Arc<Streaming>) {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(server(dir.path()));
        let mut sb = sandbox("s1", SandboxState::Ready, None);
        sb.pod_dir = dir.path().join("pod");
        fake_guest(&sb.pod_dir);
        s.adopt_for_test(sb, vec![container("c1", "s1", ContainerState::Running)]);
        let streaming = Streaming::start("127.0.0.1:0", s).unwrap();
        (dir, streaming)
    }

    pub(crate) fn exec_spec() -> Request {
        Request::Exec(ExecSpec {
            container_id: "c1".into(),
            cmd: vec!["cat".into()],
            tty: false,
            stdin: true,
            stdout: true,
            stderr: true,
        })
    }

    #[test]
    fn exec_carries_stdin_stdout_stderr_and_the_exit_code_over_both_framings() {
        let (_dir, streaming) = setup();
        for transport in [Transport::Spdy, Transport::Websocket] {
            let url = streaming.url(exec_spec()).unwrap();
            assert!(url.starts_with(&format!("http://{}/exec/", streaming.address())));
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let outcome = client::remote_command(
                &url,
                transport,
                Stdio {
                    stdin: Some(Box::new(Cursor::new(b"hello".to_vec()))),
                    stdout: Some(&mut out),
                    stderr: Some(&mut err),
                    tty: false,
                    size: None,
                },
            )
            .unwrap();
            assert_eq!(outcome, Outcome::Exited(3), "{transport:?}");
            assert_eq!(String::from_utf8_lossy(&out), "got:hello", "{transport:?}");
            assert_eq!(String::from_utf8_lossy(&err), "warn\n", "{transport:?}");
            // A URL is good once.
            match client::remote_command(
                &url,
                transport,
                Stdio {
                    stdin: None,
                    stdout: None,
                    stderr: None,
                    tty: false,
                    size: None,
                },
            ) {
                Err(client::ClientError::Refused(m)) => assert!(m.contains("404"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }

    /// The Go client of `tests/go/spdy-peer` (spdystream, the SPDY library of
    /// kubelet and client-go), built by `make go-peers`.
    pub(crate) fn go_peer() -> std::path::PathBuf {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/go/spdy-peer");
        assert!(
            p.exists(),
            "{} is missing: build it with `make go-peers` (make test does)",
            p.display()
        );
        p
    }

    #[test]
    fn exec_works_with_the_spdy_library_kubelet_uses() {
        let (_dir, streaming) = setup();
        let url = streaming.url(exec_spec()).unwrap();
        let mut child = std::process::Command::new(go_peer())
            .args(["exec", &url])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"from-go").unwrap();
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(3), "{err}");
        assert_eq!(String::from_utf8_lossy(&o.stdout), "got:from-go");
        assert_eq!(err, "warn\n");
    }

    #[test]
    fn bad_requests_get_one_clear_http_answer() {
        let (_dir, streaming) = setup();
        let ask = |req: &str| {
            let mut c = TcpStream::connect(streaming.address()).unwrap();
            c.write_all(req.as_bytes()).unwrap();
            let mut answer = String::new();
            c.read_to_string(&mut answer).unwrap();
            answer
        };
        let a = ask("GET /exec/nothing HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(a.starts_with("HTTP/1.1 404"), "{a}");
        let url = streaming.url(exec_spec()).unwrap();
        let path = url.split_once(&streaming.address().to_string()).unwrap().1;
        let a = ask(&format!("POST {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(
            a.starts_with("HTTP/1.1 400") && a.contains("SPDY/3.1"),
            "{a}"
        );
        let url = streaming.url(exec_spec()).unwrap();
        let path = url.split_once(&streaming.address().to_string()).unwrap().1;
        let a = ask(&format!(
            "POST {path} HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v2.channel.k8s.io\r\n\r\n"
        ));
        assert!(
            a.starts_with("HTTP/1.1 403") && a.contains("v4.channel.k8s.io"),
            "{a}"
        );
        // A URL of one kind does not open another.
        let url = streaming.url(exec_spec()).unwrap();
        let token = url.rsplit('/').next().unwrap();
        let a = ask(&format!("POST /attach/{token} HTTP/1.1\r\n\r\n"));
        assert!(a.starts_with("HTTP/1.1 404"), "{a}");
        // Garbage, and a head that never ends.
        assert!(ask("\x00\x01garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(20_000));
        assert!(ask(&huge).starts_with("HTTP/1.1 400"));
    }

    #[test]
    fn a_client_that_opens_no_streams_is_cut_off_not_waited_for_forever() {
        let (_dir, streaming) = setup();
        let url = streaming.url(exec_spec()).unwrap();
        let (conn, chosen) =
            client::upgrade(&url, Transport::Spdy, "v4.channel.k8s.io", &[]).unwrap();
        assert_eq!(chosen, "v4.channel.k8s.io");
        // Closing the connection without a stream ends the session at once.
        let t0 = Instant::now();
        conn.shutdown(std::net::Shutdown::Both).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(t0.elapsed() < session::STREAM_CREATION);
    }
}
