//! The client side of the stream protocols, as kubelet's proxy and crictl speak
//! them: for `atoll-crictl exec -i/-t`, `attach` and `port-forward`, and for the
//! tests that drive the streaming server.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::spdy::{Frame, FrameReader, FrameWriter, Headers};
use super::ws::{self, Message, WsReader, WsWriter};
use super::{Channel, Outcome, TerminalSize};

/// Which framing to upgrade to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Spdy,
    Websocket,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0} is not an http:// URL of host:port and a path")]
    Url(String),
    #[error("cannot reach the streaming server: {0}")]
    Connect(#[source] io::Error),
    #[error("the streaming server refused the upgrade: {0}")]
    Refused(String),
    #[error("the stream broke: {0}")]
    Broken(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Connects to `url` and upgrades: SPDY/3.1 offering `spdy_protocol`, or a
/// WebSocket offering `ws_protocols`. Returns the connection and the protocol
/// the server chose.
pub fn upgrade(
    url: &str,
    transport: Transport,
    spdy_protocol: &str,
    ws_protocols: &[&str],
) -> Result<(TcpStream, String), ClientError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::Url(url.into()))?;
    let (host, path) = rest
        .split_once('/')
        .ok_or_else(|| ClientError::Url(url.into()))?;
    let conn = TcpStream::connect(host).map_err(ClientError::Connect)?;
    let key = tungstenite::handshake::client::generate_key();
    let req = match transport {
        Transport::Spdy => format!(
            "POST /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {spdy_protocol}\r\nContent-Length: 0\r\n\r\n"
        ),
        Transport::Websocket => format!(
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
            ws_protocols.join(", ")
        ),
    };
    (&conn)
        .write_all(req.as_bytes())
        .map_err(ClientError::Connect)?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match (&conn).read(&mut byte) {
            Ok(1) if head.len() < 16 << 10 => head.push(byte[0]),
            Ok(_) => return Err(ClientError::Refused("an answer without a head".into())),
            Err(e) => return Err(ClientError::Connect(e)),
        }
    }
    let _ = conn.set_read_timeout(None);
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(&head)
        .map_err(|e| ClientError::Refused(format!("a malformed answer: {e}")))?;
    let get = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
    };
    if resp.code != Some(101) {
        // The body says why; read a little of it.
        let mut body = vec![0u8; 512];
        let n = (&conn).read(&mut body).unwrap_or(0);
        return Err(ClientError::Refused(format!(
            "HTTP {}: {}",
            resp.code.unwrap_or(0),
            String::from_utf8_lossy(&body[..n]).trim()
        )));
    }
    let chosen = match transport {
        Transport::Spdy => get("x-stream-protocol-version").unwrap_or_default(),
        Transport::Websocket => {
            if get("sec-websocket-accept").as_deref() != Some(ws::accept_key(&key).as_str()) {
                return Err(ClientError::Refused("a wrong Sec-WebSocket-Accept".into()));
            }
            get("sec-websocket-protocol").unwrap_or_default()
        }
    };
    Ok((conn, chosen))
}

/// What a remotecommand session (exec, attach) sends and receives.
pub struct Stdio<'a> {
    /// Read to its end and sent as stdin (closing it at EOF), if the command has one.
    pub stdin: Option<Box<dyn Read + Send>>,
    pub stdout: Option<&'a mut (dyn Write + Send)>,
    pub stderr: Option<&'a mut (dyn Write + Send)>,
    pub tty: bool,
    /// The terminal's size, sent once at the start.
    pub size: Option<TerminalSize>,
}

/// Runs a remotecommand session at `url` to its end and returns its outcome.
pub fn remote_command(
    url: &str,
    transport: Transport,
    io: Stdio<'_>,
) -> Result<Outcome, ClientError> {
    let (conn, protocol) = upgrade(
        url,
        transport,
        "v4.channel.k8s.io",
        super::session::WS_PROTOCOLS,
    )?;
    let error = match transport {
        Transport::Spdy => spdy_session(conn, io)?,
        Transport::Websocket => ws_session(conn, &protocol, io)?,
    };
    if error.is_empty() {
        return Ok(Outcome::Success);
    }
    Outcome::from_status_json(&error).map_err(ClientError::Broken)
}

fn size_json(s: TerminalSize) -> Vec<u8> {
    format!("{{\"Width\":{},\"Height\":{}}}\n", s.width, s.height).into_bytes()
}

/// Copies `from` to the session on its own thread; `send(None)` at EOF.
fn pump_stdin(
    mut from: Box<dyn Read + Send>,
    send: impl Fn(Option<&[u8]>) -> io::Result<()> + Send + 'static,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if send(Some(&buf[..n])).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = send(None);
    });
}

fn spdy_session(conn: TcpStream, mut io: Stdio<'_>) -> Result<Vec<u8>, ClientError> {
    let broken = |e: io::Error| ClientError::Broken(e.to_string());
    let writer = Arc::new(Mutex::new(FrameWriter::new(
        conn.try_clone().map_err(broken)?,
    )));
    let mut ids: HashMap<u32, Channel> = HashMap::new();
    let mut wanted = vec![Channel::Error];
    if io.stdin.is_some() {
        wanted.push(Channel::Stdin);
    }
    if io.stdout.is_some() {
        wanted.push(Channel::Stdout);
    }
    if io.stderr.is_some() && !io.tty {
        wanted.push(Channel::Stderr);
    }
    if io.tty {
        wanted.push(Channel::Resize);
    }
    let mut open = 0;
    for (i, ch) in wanted.iter().enumerate() {
        let id = 1 + 2 * i as u32;
        let kind = format!("{ch:?}").to_lowercase();
        let headers: Headers = vec![("streamtype".into(), vec![kind])];
        lock(&writer)
            .syn_stream(id, &headers, false)
            .map_err(broken)?;
        ids.insert(id, *ch);
        if matches!(ch, Channel::Stdout | Channel::Stderr | Channel::Error) {
            open += 1;
        }
    }
    let id_of = |c: Channel| ids.iter().find(|(_, v)| **v == c).map(|(k, _)| *k);
    if let (Some(size), Some(id)) = (io.size, id_of(Channel::Resize)) {
        lock(&writer)
            .data(id, &size_json(size), false)
            .map_err(broken)?;
    }
    if let (Some(stdin), Some(id)) = (io.stdin.take(), id_of(Channel::Stdin)) {
        let writer = Arc::clone(&writer);
        pump_stdin(stdin, move |d| match d {
            Some(d) => lock(&writer).data(id, d, false),
            None => lock(&writer).data(id, &[], true),
        });
    }
    let mut frames = FrameReader::new(conn.try_clone().map_err(broken)?);
    let mut error = Vec::new();
    while open > 0 {
        let frame = match frames.read() {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(ClientError::Broken(e.to_string())),
        };
        match frame {
            Frame::Data { stream, fin, data } => {
                match ids.get(&stream) {
                    Some(Channel::Stdout) => {
                        if let Some(w) = io.stdout.as_mut() {
                            let _ = w.write_all(&data).and_then(|()| w.flush());
                        }
                    }
                    Some(Channel::Stderr) => {
                        if let Some(w) = io.stderr.as_mut() {
                            let _ = w.write_all(&data).and_then(|()| w.flush());
                        }
                    }
                    Some(Channel::Error) => error.extend_from_slice(&data),
                    _ => {}
                }
                if fin
                    && matches!(
                        ids.get(&stream),
                        Some(Channel::Stdout | Channel::Stderr | Channel::Error)
                    )
                {
                    open -= 1;
                }
            }
            Frame::Ping(id) => {
                let _ = lock(&writer).ping(id);
            }
            Frame::GoAway { .. } => break,
            _ => {}
        }
    }
    let _ = lock(&writer).goaway(0);
    let _ = conn.shutdown(Shutdown::Both);
    Ok(error)
}

fn ws_session(conn: TcpStream, protocol: &str, mut io: Stdio<'_>) -> Result<Vec<u8>, ClientError> {
    let broken = |e: io::Error| ClientError::Broken(e.to_string());
    let writer = Arc::new(Mutex::new(WsWriter::new(
        conn.try_clone().map_err(broken)?,
        true,
    )));
    if let Some(size) = io.size.filter(|_| io.tty) {
        lock(&writer)
            .binary(&[Channel::Resize as u8], &size_json(size))
            .map_err(broken)?;
    }
    let v5 = protocol.starts_with("v5.");
    if let Some(stdin) = io.stdin.take() {
        let writer = Arc::clone(&writer);
        pump_stdin(stdin, move |d| match d {
            Some(d) => lock(&writer).binary(&[Channel::Stdin as u8], d),
            // v4 has no way to say it; the command sees EOF when the session ends.
            None if v5 => lock(&writer).binary(&[255, Channel::Stdin as u8], &[]),
            None => Ok(()),
        });
    }
    let mut messages = WsReader::new(conn.try_clone().map_err(broken)?, false);
    let mut error = Vec::new();
    loop {
        match messages.read() {
            Ok(Some(Message::Binary(m))) => match m.split_first() {
                Some((1, d)) => {
                    if let Some(w) = io.stdout.as_mut() {
                        let _ = w.write_all(d).and_then(|()| w.flush());
                    }
                }
                Some((2, d)) => {
                    if let Some(w) = io.stderr.as_mut() {
                        let _ = w.write_all(d).and_then(|()| w.flush());
                    }
                }
                Some((3, d)) => error.extend_from_slice(d),
                _ => {}
            },
            Ok(Some(Message::Ping(d))) => {
                let _ = lock(&writer).pong(d);
            }
            Ok(Some(Message::Close)) | Ok(None) => break,
            Ok(Some(_)) => {}
            Err(e) => return Err(ClientError::Broken(e.to_string())),
        }
    }
    let _ = lock(&writer).close("");
    let _ = conn.shutdown(Shutdown::Both);
    Ok(error)
}

/// A SPDY port-forward connection: each [`SpdyForwarder::forward`] carries one
/// local TCP connection to a port of the sandbox.
pub struct SpdyForwarder {
    writer: Arc<Mutex<FrameWriter<TcpStream>>>,
    /// Data stream → where its data goes; error stream → its port.
    routes: Arc<Mutex<HashMap<u32, Route>>>,
    next: Mutex<u32>,
}

enum Route {
    Data(TcpStream),
    Error(u16),
}

impl SpdyForwarder {
    pub fn connect(url: &str) -> Result<Self, ClientError> {
        let (conn, _) = upgrade(url, Transport::Spdy, "portforward.k8s.io", &[])?;
        let broken = |e: io::Error| ClientError::Broken(e.to_string());
        let writer = Arc::new(Mutex::new(FrameWriter::new(
            conn.try_clone().map_err(broken)?,
        )));
        let routes: Arc<Mutex<HashMap<u32, Route>>> = Arc::default();
        {
            let routes = Arc::clone(&routes);
            let writer = Arc::clone(&writer);
            std::thread::spawn(move || {
                let mut frames = FrameReader::new(conn);
                while let Ok(Some(frame)) = frames.read() {
                    match frame {
                        Frame::Data { stream, fin, data } => match lock(&routes).get_mut(&stream) {
                            Some(Route::Data(local)) => {
                                let _ = local.write_all(&data);
                                if fin {
                                    let _ = local.shutdown(Shutdown::Write);
                                }
                            }
                            Some(Route::Error(port)) if !data.is_empty() => {
                                eprintln!(
                                    "port-forward to {port}: {}",
                                    String::from_utf8_lossy(&data)
                                );
                            }
                            _ => {}
                        },
                        Frame::Ping(id) => {
                            let _ = lock(&writer).ping(id);
                        }
                        Frame::GoAway { .. } => break,
                        _ => {}
                    }
                }
                for (_, r) in lock(&routes).drain() {
                    if let Route::Data(local) = r {
                        let _ = local.shutdown(Shutdown::Both);
                    }
                }
            });
        }
        Ok(Self {
            writer,
            routes,
            next: Mutex::new(0),
        })
    }

    /// Carries `local` to `port` until both directions end.
    pub fn forward(&self, local: TcpStream, port: u16) -> io::Result<()> {
        let request = {
            let mut n = lock(&self.next);
            *n += 1;
            *n
        };
        let (error, data) = (4 * request - 3, 4 * request - 1);
        let headers = |kind: &str| -> Headers {
            vec![
                ("streamtype".into(), vec![kind.into()]),
                ("port".into(), vec![port.to_string()]),
                ("requestid".into(), vec![request.to_string()]),
            ]
        };
        lock(&self.routes).insert(error, Route::Error(port));
        lock(&self.routes).insert(data, Route::Data(local.try_clone()?));
        {
            let mut w = lock(&self.writer);
            w.syn_stream(error, &headers("error"), false)?;
            w.syn_stream(data, &headers("data"), false)?;
        }
        let writer = Arc::clone(&self.writer);
        std::thread::spawn(move || {
            let mut local = local;
            let mut buf = vec![0u8; 32 << 10];
            while let Ok(n @ 1..) = local.read(&mut buf) {
                if lock(&writer).data(data, &buf[..n], false).is_err() {
                    return;
                }
            }
            let _ = lock(&writer).data(data, &[], true);
        });
        Ok(())
    }
}

/// Carries `local` to `port` over its own WebSocket port-forward connection at
/// `url` (which names the port: `?port=N`).
pub fn ws_forward(url: &str, local: TcpStream) -> Result<(), ClientError> {
    let (conn, _) = upgrade(url, Transport::Websocket, "", &["v4.channel.k8s.io"])?;
    let broken = |e: io::Error| ClientError::Broken(e.to_string());
    let writer = Arc::new(Mutex::new(WsWriter::new(
        conn.try_clone().map_err(broken)?,
        true,
    )));
    {
        let writer = Arc::clone(&writer);
        let mut from = local.try_clone().map_err(broken)?;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 << 10];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                if lock(&writer).binary(&[0], &buf[..n]).is_err() {
                    return;
                }
            }
        });
    }
    let mut messages = WsReader::new(conn.try_clone().map_err(broken)?, false);
    let mut local = local;
    // Each channel's first message is the port number.
    let mut seen = [false; 2];
    loop {
        match messages.read() {
            Ok(Some(Message::Binary(m))) => {
                if let Some((&ch @ (0 | 1), d)) = m.split_first() {
                    let i = usize::from(ch);
                    let d = if seen[i] { d } else { &d[d.len().min(2)..] };
                    seen[i] = true;
                    if ch == 0 {
                        if local.write_all(d).is_err() {
                            break;
                        }
                    } else if !d.is_empty() {
                        eprintln!("port-forward: {}", String::from_utf8_lossy(d));
                    }
                }
            }
            Ok(Some(Message::Ping(d))) => {
                let _ = lock(&writer).pong(d);
            }
            Ok(Some(Message::Close)) | Ok(None) | Err(_) => break,
            Ok(Some(_)) => {}
        }
    }
    let _ = local.shutdown(Shutdown::Both);
    let _ = lock(&writer).close("");
    let _ = conn.shutdown(Shutdown::Both);
    Ok(())
}
