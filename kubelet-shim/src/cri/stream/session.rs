//! One remotecommand session (exec or attach) over either framing: a reader
//! thread turns what the client sends into [`Event`]s, and [`Output`] writes to
//! the client's channels.
//!
//! The event queue is bounded: a client sending stdin faster than the process
//! reads it is held back by TCP, not by the server's memory.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::spdy::{self, Frame, FrameReader, FrameWriter};
use super::ws::{Message, WsReader, WsWriter};
use super::{Channel, ResizeParser, TerminalSize};

/// How long a client has to open its streams after the upgrade (kubelet's
/// stream creation timeout).
pub const STREAM_CREATION: Duration = Duration::from_secs(30);
/// How long, at the end, the client has to close the connection before it is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Events queued before the reader waits (stdin chunks are at most 32 KiB here).
const QUEUE: usize = 64;
/// A client that reads nothing for this long is cut off (a write to it fails, so
/// no thread waits on it forever).
pub const WRITE_STALL: Duration = Duration::from_secs(60);

/// What happens on a session.
#[derive(Debug)]
pub enum Event {
    Stdin(Vec<u8>),
    /// The client closed stdin.
    StdinEnd,
    Resize(TerminalSize),
    /// The client went away (closed, reset, protocol error).
    Gone,
    /// What the session serves is over (an exec's process ended, an attached
    /// container exited); posted by the server's side, not the client's.
    Done(super::Outcome),
}

/// Writes to the client.
pub trait Output: Send + Sync {
    /// Data on a channel; a channel the client did not open is dropped silently.
    fn write(&self, ch: Channel, data: &[u8]) -> io::Result<()>;
    /// Ends the channel (SPDY: its stream's FIN; WebSocket: nothing to say).
    fn end(&self, ch: Channel);
    /// Ends the session: every channel, then the connection, once the client has
    /// closed its side or [`CLOSE_GRACE`] has passed.
    fn close(&self);
}

/// A session: its output and its events.
pub struct Session {
    pub output: Arc<dyn Output>,
    pub events: Receiver<Event>,
    /// For the server's side to post [`Event::Done`].
    pub post: SyncSender<Event>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits up to `limit` for a thread; cuts the connection if it has not ended.
fn finish_reader(conn: &TcpStream, reader: &Mutex<Option<JoinHandle<()>>>, limit: Duration) {
    let _ = conn.shutdown(Shutdown::Write);
    if let Some(t) = lock(reader).take() {
        let deadline = Instant::now() + limit;
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = conn.shutdown(Shutdown::Both);
        let _ = t.join();
    }
}

// ---- SPDY ----

struct SpdyStreams {
    by_channel: HashMap<Channel, u32>,
    /// The reader ended: no more streams will come.
    closed: bool,
}

struct SpdyOutput {
    writer: Mutex<FrameWriter<TcpStream>>,
    streams: Arc<(Mutex<SpdyStreams>, Condvar)>,
    ended: Mutex<HashSet<u32>>,
    conn: TcpStream,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Output for SpdyOutput {
    fn write(&self, ch: Channel, data: &[u8]) -> io::Result<()> {
        let Some(id) = lock(&self.streams.0).by_channel.get(&ch).copied() else {
            return Ok(());
        };
        if lock(&self.ended).contains(&id) {
            return Ok(());
        }
        lock(&self.writer).data(id, data, false)
    }

    fn end(&self, ch: Channel) {
        let Some(id) = lock(&self.streams.0).by_channel.get(&ch).copied() else {
            return;
        };
        if lock(&self.ended).insert(id) {
            let _ = lock(&self.writer).data(id, &[], true);
        }
    }

    fn close(&self) {
        let ids: Vec<u32> = lock(&self.streams.0).by_channel.values().copied().collect();
        {
            let mut w = lock(&self.writer);
            let mut ended = lock(&self.ended);
            for id in ids {
                if ended.insert(id) {
                    let _ = w.data(id, &[], true);
                }
            }
            let _ = w.goaway(0);
            let _ = w.flush();
        }
        finish_reader(&self.conn, &self.reader, CLOSE_GRACE);
    }
}

/// A remotecommand session over SPDY on `conn` (the 101 already sent): waits up
/// to [`STREAM_CREATION`] for the client to open `expected` streams.
pub fn spdy(conn: TcpStream, expected: &[Channel]) -> Result<Session, String> {
    let _ = conn.set_write_timeout(Some(WRITE_STALL));
    let (post, events) = sync_channel(QUEUE);
    let read_half = conn.try_clone().map_err(|e| e.to_string())?;
    let write_half = conn.try_clone().map_err(|e| e.to_string())?;
    let streams = Arc::new((
        Mutex::new(SpdyStreams {
            by_channel: HashMap::new(),
            closed: false,
        }),
        Condvar::new(),
    ));
    let out = Arc::new(SpdyOutput {
        writer: Mutex::new(FrameWriter::new(write_half)),
        streams: Arc::clone(&streams),
        ended: Mutex::new(HashSet::new()),
        conn,
        reader: Mutex::new(None),
    });
    let reader = {
        let out = Arc::clone(&out);
        let post = post.clone();
        std::thread::Builder::new()
            .name("spdy-read".into())
            .spawn(move || spdy_reader(read_half, &out, &post))
            .map_err(|e| e.to_string())?
    };
    *lock(&out.reader) = Some(reader);
    let deadline = Instant::now() + STREAM_CREATION;
    let (m, cv) = &*streams;
    let mut s = lock(m);
    loop {
        if expected.iter().all(|c| s.by_channel.contains_key(c)) {
            break;
        }
        let now = Instant::now();
        if s.closed || now >= deadline {
            let missing: Vec<String> = expected
                .iter()
                .filter(|c| !s.by_channel.contains_key(c))
                .map(|c| format!("{c:?}").to_lowercase())
                .collect();
            drop(s);
            out.close();
            return Err(format!(
                "the client did not open the {} stream(s) in {} s",
                missing.join(", "),
                STREAM_CREATION.as_secs()
            ));
        }
        s = cv
            .wait_timeout(s, deadline - now)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
    drop(s);
    Ok(Session {
        output: out,
        events,
        post,
    })
}

fn spdy_reader(conn: TcpStream, out: &SpdyOutput, post: &SyncSender<Event>) {
    let mut frames = FrameReader::new(conn);
    let mut channels: HashMap<u32, Channel> = HashMap::new();
    let mut resize = ResizeParser::default();
    // Once the session is over nobody receives; keep reading to the client's end.
    let send = |e: Event| {
        let _ = post.send(e);
    };
    while let Ok(Some(frame)) = frames.read() {
        match frame {
            Frame::SynStream {
                stream, headers, ..
            } => {
                let kind = spdy::header(&headers, "streamtype").unwrap_or("");
                // A session has five channels; more streams are refused.
                let Some(ch) = Channel::from_stream_type(kind).filter(|_| channels.len() < 8)
                else {
                    let _ = lock(&out.writer).rst_stream(stream, spdy::RST_REFUSED_STREAM);
                    continue;
                };
                if lock(&out.writer).syn_reply(stream, &vec![], false).is_err() {
                    break;
                }
                channels.insert(stream, ch);
                let (m, cv) = &*out.streams;
                lock(m).by_channel.insert(ch, stream);
                cv.notify_all();
            }
            Frame::Data { stream, fin, data } => match channels.get(&stream) {
                Some(Channel::Stdin) => {
                    if !data.is_empty() {
                        send(Event::Stdin(data));
                    }
                    if fin {
                        send(Event::StdinEnd);
                    }
                }
                Some(Channel::Resize) => {
                    for size in resize.feed(&data) {
                        send(Event::Resize(size));
                    }
                }
                _ => {}
            },
            Frame::RstStream { stream, .. } if channels.get(&stream) == Some(&Channel::Stdin) => {
                send(Event::StdinEnd);
            }
            Frame::Ping(id) => {
                let _ = lock(&out.writer).ping(id);
            }
            Frame::GoAway { .. } => break,
            _ => {}
        }
    }
    let (m, cv) = &*out.streams;
    lock(m).closed = true;
    cv.notify_all();
    send(Event::Gone);
}

// ---- WebSocket ----

struct WsOutput {
    writer: Mutex<WsWriter<TcpStream>>,
    conn: TcpStream,
    reader: Mutex<Option<JoinHandle<()>>>,
    closed: Mutex<bool>,
}

impl Output for WsOutput {
    fn write(&self, ch: Channel, data: &[u8]) -> io::Result<()> {
        if *lock(&self.closed) {
            return Ok(());
        }
        lock(&self.writer).binary(&[ch as u8], data)
    }

    fn end(&self, _: Channel) {}

    fn close(&self) {
        {
            let mut closed = lock(&self.closed);
            if *closed {
                return;
            }
            *closed = true;
            let _ = lock(&self.writer).close("");
        }
        finish_reader(&self.conn, &self.reader, CLOSE_GRACE);
    }
}

/// The WebSocket subprotocols of remotecommand served, best first. v5 adds the
/// client's close signal (`[255, channel]`) for stdin's end.
pub const WS_PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// A remotecommand session over WebSocket on `conn` (the 101 already sent) with
/// subprotocol `protocol`.
pub fn websocket(conn: TcpStream, protocol: &str) -> Result<Session, String> {
    let _ = conn.set_write_timeout(Some(WRITE_STALL));
    let (post, events) = sync_channel(QUEUE);
    let read_half = conn.try_clone().map_err(|e| e.to_string())?;
    let write_half = conn.try_clone().map_err(|e| e.to_string())?;
    let out = Arc::new(WsOutput {
        writer: Mutex::new(WsWriter::new(write_half, false)),
        conn,
        reader: Mutex::new(None),
        closed: Mutex::new(false),
    });
    let v5 = protocol.starts_with("v5.");
    let reader = {
        let out = Arc::clone(&out);
        let post = post.clone();
        std::thread::Builder::new()
            .name("ws-read".into())
            .spawn(move || ws_reader(read_half, &out, &post, v5))
            .map_err(|e| e.to_string())?
    };
    *lock(&out.reader) = Some(reader);
    Ok(Session {
        output: out,
        events,
        post,
    })
}

fn ws_reader(conn: TcpStream, out: &WsOutput, post: &SyncSender<Event>, v5: bool) {
    let mut messages = WsReader::new(conn, true);
    let mut resize = ResizeParser::default();
    let send = |e: Event| {
        let _ = post.send(e);
    };
    while let Ok(Some(m)) = messages.read() {
        match m {
            Message::Binary(data) => match data.split_first() {
                Some((255, rest)) if v5 && rest.first() == Some(&(Channel::Stdin as u8)) => {
                    send(Event::StdinEnd);
                }
                Some((255, _)) if v5 => {}
                Some((&n, rest)) => match Channel::from_number(n) {
                    Some(Channel::Stdin) if !rest.is_empty() => send(Event::Stdin(rest.to_vec())),
                    Some(Channel::Resize) => {
                        for size in resize.feed(rest) {
                            send(Event::Resize(size));
                        }
                    }
                    _ => {}
                },
                None => {}
            },
            Message::Ping(data) => {
                let _ = lock(&out.writer).pong(data);
            }
            Message::Close => break,
            Message::Text(_) | Message::Pong => {}
        }
    }
    send(Event::Gone);
}
