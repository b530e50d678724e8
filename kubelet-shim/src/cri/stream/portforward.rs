//! Port-forward: TCP connections from the client to ports of the sandbox, each
//! carried by the guest agent to the port on the guest's loopback (the pod's
//! network namespace: every container of the pod shares it).
//!
//! Over SPDY (`portforward.k8s.io`) the client opens two streams per connection,
//! `data` and `error`, with the same `requestID` and the `port`; the server
//! connects when it has both and reports a failure as text on `error`. Over
//! WebSocket (`v4.channel.k8s.io`) the ports are the URL's `port` parameters and
//! port *i* has channels 2*i* (data) and 2*i*+1 (error), each opened by the
//! server with the port number (two bytes, little-endian).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::spdy::{self, Frame, FrameReader, FrameWriter};
use super::ws::{Message, WsReader, WsWriter};
use crate::cri::server::{clean_message, CriError, Server};

/// The WebSocket subprotocols of port-forward served.
pub const WS_PROTOCOLS: &[&str] = &["v4.channel.k8s.io"];
/// Connections carried at once by one streaming connection, at most.
const MAX_CONNECTIONS: usize = 64;
/// How long the agent may take to connect to the port.
const CONNECT: Duration = Duration::from_secs(10);
/// A guest side that reads nothing for this long loses the connection.
const WRITE_STALL: Duration = Duration::from_secs(60);

/// What PortForward asked for, kept behind the one-time URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForwardSpec {
    pub sandbox_id: String,
    /// The ports the request named; empty: any.
    pub ports: Vec<u16>,
}

impl PortForwardSpec {
    fn allows(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&port)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens a connection to `port` in the sandbox through its agent.
fn dial(server: &Server, spec: &PortForwardSpec, port: u16) -> Result<UnixStream, String> {
    if !spec.allows(port) {
        return Err(format!(
            "port {port} was not among the ports of the PortForward request {:?}",
            spec.ports
        ));
    }
    let sandbox = server
        .ready_sandbox(&spec.sandbox_id)
        .map_err(|e: CriError| e.to_string())?;
    let s = crate::agent::forward(&sandbox.pod_dir.join("vsock.sock"), port, CONNECT)
        .map_err(|e| clean_message(&e.to_string()))?;
    let _ = s.set_write_timeout(Some(WRITE_STALL));
    Ok(s)
}

// ---- SPDY ----

#[derive(Default)]
struct Pair {
    port: u16,
    data: Option<u32>,
    error: Option<u32>,
    conn: Option<UnixStream>,
    /// Copies the guest's side to the data stream; its end is the pair's.
    pump: Option<JoinHandle<()>>,
}

/// Serves a SPDY port-forward connection (the 101 already sent) until the client
/// closes it.
pub fn serve_spdy(server: &Server, spec: &PortForwardSpec, conn: TcpStream) {
    let _ = conn.set_write_timeout(Some(super::session::WRITE_STALL));
    let (Ok(read_half), Ok(write_half)) = (conn.try_clone(), conn.try_clone()) else {
        return;
    };
    let writer = Arc::new(Mutex::new(FrameWriter::new(write_half)));
    let mut frames = FrameReader::new(read_half);
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut by_stream: HashMap<u32, String> = HashMap::new();
    while let Ok(Some(frame)) = frames.read() {
        // Connections whose guest side ended are over.
        pairs.retain(|_, p| !p.pump.as_ref().is_some_and(JoinHandle::is_finished));
        by_stream.retain(|_, r| pairs.contains_key(r));
        match frame {
            Frame::SynStream {
                stream, headers, ..
            } => {
                let kind = spdy::header(&headers, "streamtype").unwrap_or("");
                let port = spdy::header(&headers, "port").and_then(|p| p.parse::<u16>().ok());
                let request = spdy::header(&headers, "requestid")
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("stream-{stream}"));
                let refuse = |why: &str| {
                    tracing::info!("port-forward: {why}");
                    let _ = lock(&writer).rst_stream(stream, spdy::RST_REFUSED_STREAM);
                };
                let (Some(port), "data" | "error") = (port, kind) else {
                    refuse("a stream without a port or of an unknown type");
                    continue;
                };
                if !pairs.contains_key(&request) && pairs.len() >= MAX_CONNECTIONS {
                    refuse("too many connections at once");
                    continue;
                }
                if lock(&writer).syn_reply(stream, &vec![], false).is_err() {
                    break;
                }
                by_stream.insert(stream, request.clone());
                let pair = pairs.entry(request.clone()).or_default();
                pair.port = port;
                if kind == "data" {
                    pair.data = Some(stream);
                } else {
                    pair.error = Some(stream);
                }
                if let (Some(data), Some(error), None) = (pair.data, pair.error, &pair.conn) {
                    match dial(server, spec, pair.port) {
                        Ok(c) => {
                            let Ok(from_guest) = c.try_clone() else {
                                continue;
                            };
                            pair.conn = Some(c);
                            let writer = Arc::clone(&writer);
                            pair.pump = Some(std::thread::spawn(move || {
                                guest_to_spdy(from_guest, data, error, &writer)
                            }));
                        }
                        Err(e) => {
                            let mut w = lock(&writer);
                            let _ = w.data(error, e.as_bytes(), true);
                            let _ = w.data(data, &[], true);
                            drop(w);
                            pairs.remove(&request);
                        }
                    }
                }
            }
            Frame::Data { stream, fin, data } => {
                let Some(request) = by_stream.get(&stream) else {
                    continue;
                };
                let Some(pair) = pairs.get_mut(request) else {
                    continue;
                };
                if pair.data != Some(stream) {
                    continue;
                }
                if let Some(c) = pair.conn.as_mut() {
                    if (!data.is_empty() && c.write_all(&data).is_err()) || fin {
                        let _ = c.shutdown(Shutdown::Write);
                    }
                }
            }
            Frame::RstStream { stream, .. } => {
                if let Some(request) = by_stream.remove(&stream) {
                    if let Some(pair) = pairs.remove(&request) {
                        if let Some(c) = pair.conn {
                            let _ = c.shutdown(Shutdown::Both);
                        }
                        if let Some(p) = pair.pump {
                            let _ = p.join();
                        }
                    }
                }
            }
            Frame::Ping(id) => {
                let _ = lock(&writer).ping(id);
            }
            Frame::GoAway { .. } => break,
            _ => {}
        }
    }
    for pair in pairs.into_values() {
        if let Some(c) = pair.conn {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(p) = pair.pump {
            let _ = p.join();
        }
    }
    let _ = lock(&writer).goaway(0);
    let _ = conn.shutdown(Shutdown::Both);
}

fn guest_to_spdy(
    mut from: UnixStream,
    data: u32,
    error: u32,
    writer: &Mutex<FrameWriter<TcpStream>>,
) {
    let mut buf = vec![0u8; spdy::MAX_DATA];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if lock(writer).data(data, &buf[..n], false).is_err() {
                    break;
                }
            }
        }
    }
    let mut w = lock(writer);
    let _ = w.data(data, &[], true);
    let _ = w.data(error, &[], true);
}

// ---- WebSocket ----

/// The `port` parameters of a URL's query.
fn query_ports(path: &str) -> Result<Vec<u16>, String> {
    let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
    let ports: Vec<u16> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "port")
        .map(|(_, v)| v.parse::<u16>().ok().filter(|&p| p != 0))
        .collect::<Option<_>>()
        .ok_or_else(|| "a port parameter is not a port number".to_owned())?;
    if ports.is_empty() {
        return Err("the URL names no port (?port=N)".into());
    }
    if ports.len() > MAX_CONNECTIONS {
        return Err(format!("more than {MAX_CONNECTIONS} ports"));
    }
    Ok(ports)
}

/// Serves a WebSocket port-forward connection (the 101 already sent).
pub fn serve_websocket(server: &Server, spec: &PortForwardSpec, conn: TcpStream, path: &str) {
    let _ = conn.set_write_timeout(Some(super::session::WRITE_STALL));
    let (Ok(read_half), Ok(write_half)) = (conn.try_clone(), conn.try_clone()) else {
        return;
    };
    let writer = Arc::new(Mutex::new(WsWriter::new(write_half, false)));
    let ports = match query_ports(path) {
        Ok(p) => p,
        Err(e) => {
            let _ = lock(&writer).close(&e);
            return;
        }
    };
    let mut conns: Vec<Option<UnixStream>> = Vec::new();
    let mut pumps = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        let (data, error) = (2 * i as u8, 2 * i as u8 + 1);
        {
            let mut w = lock(&writer);
            let _ = w.binary(&[data], &port.to_le_bytes());
            let _ = w.binary(&[error], &port.to_le_bytes());
        }
        match dial(server, spec, port) {
            Ok(c) => {
                if let Ok(from_guest) = c.try_clone() {
                    let writer = Arc::clone(&writer);
                    pumps.push(std::thread::spawn(move || {
                        let mut from_guest = from_guest;
                        let mut buf = vec![0u8; 32 << 10];
                        while let Ok(n @ 1..) = from_guest.read(&mut buf) {
                            if lock(&writer).binary(&[data], &buf[..n]).is_err() {
                                break;
                            }
                        }
                    }));
                }
                conns.push(Some(c));
            }
            Err(e) => {
                let _ = lock(&writer).binary(&[error], e.as_bytes());
                conns.push(None);
            }
        }
    }
    let mut messages = WsReader::new(read_half, true);
    loop {
        match messages.read() {
            Ok(Some(Message::Binary(m))) => {
                let Some((&ch, rest)) = m.split_first() else {
                    continue;
                };
                let i = usize::from(ch / 2);
                if ch % 2 != 0 || i >= conns.len() {
                    continue;
                }
                if let Some(c) = conns[i].as_mut() {
                    if !rest.is_empty() && c.write_all(rest).is_err() {
                        let _ = c.shutdown(Shutdown::Write);
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
    for c in conns.into_iter().flatten() {
        let _ = c.shutdown(Shutdown::Both);
    }
    for p in pumps {
        let _ = p.join();
    }
    let _ = lock(&writer).close("");
    let _ = conn.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_the_query() {
        assert_eq!(
            query_ports("/portforward/t?port=80&port=8080"),
            Ok(vec![80, 8080])
        );
        assert!(query_ports("/portforward/t").is_err());
        assert!(query_ports("/portforward/t?port=0").is_err());
        assert!(query_ports("/portforward/t?port=99999").is_err());
        assert!(query_ports("/portforward/t?port=x").is_err());
    }

    #[test]
    fn a_request_allows_only_its_ports() {
        let spec = PortForwardSpec {
            sandbox_id: "s".into(),
            ports: vec![80],
        };
        assert!(spec.allows(80));
        assert!(!spec.allows(81));
        let any = PortForwardSpec {
            sandbox_id: "s".into(),
            ports: vec![],
        };
        assert!(any.allows(81));
    }
}
