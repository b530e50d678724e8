//! The vsock device: three queues (rx, tx, event), guest CID in the config space,
//! and a host side made of Unix domain sockets.
//!
//! - Host-initiated: a host program connects to the listening socket `uds` and
//!   writes `CONNECT <port>\n`; the device sends REQUEST to that guest port and, on
//!   RESPONSE, answers `OK <host port>\n` and relays bytes both ways (RST closes the
//!   host socket).
//! - Guest-initiated: a guest connecting to CID 2 port P makes the device connect to
//!   `<uds>_P`; success is answered with RESPONSE, failure with RST.
//!
//! One event-loop thread drives everything: queue notifications, the listener and
//! every host socket (watched edge-triggered through the [`Watcher`], so a host
//! socket the device cannot serve right now — no guest credit, no rx buffer — costs
//! nothing until something changes). Replies that wait for rx buffers are bounded:
//! one of each control packet per connection, and a fixed-size RST queue.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::connection::{pending, ConnKey, Connection, CreditViolation, State};
use super::packet::{
    op, BadPacket, Header, HDR_SIZE, HOST_CID, MAX_PAYLOAD, SHUTDOWN_BOTH, SHUTDOWN_SEND,
    TYPE_STREAM,
};
use crate::devices::virtio::{
    device_type, ActivateContext, ActivateError, DeviceMetrics, Interrupt, VirtioDevice, Watch,
    Watcher,
};

const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// Epoll sources: the three queue notifiers, the listener, then host sockets.
const SOURCE_RX: u32 = RXQ as u32;
const SOURCE_TX: u32 = TXQ as u32;
const SOURCE_EVENT: u32 = EVQ as u32;
const SOURCE_LISTENER: u32 = 3;
const FIRST_TOKEN: u32 = 16;
/// virtio_vsock_event id: the transport was reset.
const VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Most connections at once (each may hold up to `CONN_BUF` of guest data).
pub const MAX_CONNECTIONS: usize = 256;
/// Most host clients that have connected but not yet sent their `CONNECT` line.
pub const MAX_PENDING_CLIENTS: usize = 32;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Most RSTs waiting for rx buffers; beyond that they are dropped (the guest times
/// out instead).
const MAX_QUEUED_RSTS: usize = 256;
/// First port handed to host-initiated connections (as Firecracker does, far above
/// the ports guests listen on).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// What the rx path can put in the buffer at hand.
enum Output {
    /// A packet, its payload (this many bytes) in the device's buffer.
    Packet(Header, usize),
    /// Nothing is waiting.
    Nothing,
    /// Data is waiting, but the buffer has no room beyond the header.
    NeedsPayloadRoom,
}

/// A host client that has connected and not yet said which guest port it wants.
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
    /// The guest port its line asked for, held back while a transport reset is
    /// unacknowledged.
    port: Option<u32>,
}

enum Owner {
    Pending,
    Conn(ConnKey),
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    watcher: Watcher,
    cid: u64,
    uds: PathBuf,
    conns: HashMap<ConnKey, Connection>,
    pending_clients: HashMap<u32, PendingClient>,
    owners: HashMap<u32, Owner>,
    /// Connections with something for the guest, served round-robin.
    ready: VecDeque<ConnKey>,
    /// RSTs for connections that no longer (or never did) exist.
    rsts: VecDeque<ConnKey>,
    next_token: u32,
    next_local_port: u32,
    /// One packet's payload on its way in or out.
    buf: Vec<u8>,
    /// A TRANSPORT_RESET event waits for an event-queue buffer.
    reset_pending: bool,
    /// A TRANSPORT_RESET was sent and the driver has not yet refilled the event
    /// queue (which it does once it has handled it): host connections wait.
    reset_unacked: bool,
}

/// The device.
pub struct Vsock {
    cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    watcher: Option<Watcher>,
    active: Option<Active>,
    metrics: DeviceMetrics,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.cid)
            .field("uds", &self.uds)
            .field("active", &self.active.is_some())
            .finish()
    }
}

/// Connects to a Unix socket without ever blocking (a full backlog fails with
/// `WouldBlock` instead of stalling the event loop).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns; the stream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un and the length is its size.
    let r = unsafe {
        libc::connect(
            fd,
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let port = s.trim_end_matches(['\n', '\r']).strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

/// Binds the host socket `uds` (replacing a stale socket, never another file).
pub fn bind(uds: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(uds) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(uds)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", uds.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(uds)
}

impl Vsock {
    /// A device with guest CID `cid` whose host side listens on `uds` (host-initiated
    /// `CONNECT <port>`) and connects to `<uds>_<port>` (guest-initiated). A stale
    /// socket file at `uds` is removed first; any other file there is an error.
    pub fn new(cid: u64, uds: &Path) -> io::Result<Self> {
        Self::with_listener(cid, uds, bind(uds)?)
    }

    /// A device whose host socket `uds` is `listener`, bound already (by a VMM
    /// before its jail, which leaves it no directory to bind in).
    pub fn with_listener(cid: u64, uds: &Path, listener: UnixListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self {
            cid,
            uds: uds.to_path_buf(),
            listener,
            watcher: None,
            active: None,
            metrics: DeviceMetrics::default(),
        })
    }

    fn accept_clients(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        // Level-triggered: whatever is left is reported again.
        for _ in 0..MAX_PENDING_CLIENTS {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: accept on {}: {e}", a.uds.display());
                    DeviceMetrics::inc(&self.metrics.errors);
                    return;
                }
            };
            if a.pending_clients.len() >= MAX_PENDING_CLIENTS
                || a.pending_clients.len() + a.conns.len() >= MAX_CONNECTIONS
                || stream.set_nonblocking(true).is_err()
            {
                // Closing it tells the client; it may retry.
                DeviceMetrics::inc(&self.metrics.errors);
                continue;
            }
            let Some(token) = a.watch(&stream, &self.metrics) else {
                continue;
            };
            a.owners.insert(token, Owner::Pending);
            a.pending_clients.insert(
                token,
                PendingClient {
                    stream,
                    line: Vec::new(),
                    port: None,
                },
            );
            // Edge-triggered: the line may already be there.
            a.read_connect_line(token, &self.metrics);
        }
    }
}

impl Active {
    fn alloc_token(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS + MAX_PENDING_CLIENTS {
            let t = self.next_token;
            self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_TOKEN);
            if !self.owners.contains_key(&t) {
                return Some(t);
            }
        }
        None
    }

    /// Watches a host socket edge-triggered; returns its token.
    fn watch(&mut self, stream: &UnixStream, metrics: &DeviceMetrics) -> Option<u32> {
        let token = self.alloc_token()?;
        let w = Watch {
            fd: stream.as_raw_fd(),
            source: token,
            events: EventSet::IN
                | EventSet::OUT
                | EventSet::READ_HANG_UP
                | EventSet::EDGE_TRIGGERED,
        };
        match self.watcher.add(w) {
            Ok(()) => Some(token),
            Err(e) => {
                tracing::warn!("vsock: cannot watch a host socket: {e}");
                DeviceMetrics::inc(&metrics.errors);
                None
            }
        }
    }

    fn mark_ready(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.has_output() {
                c.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    fn queue_rst(&mut self, key: ConnKey, metrics: &DeviceMetrics) {
        if self.rsts.len() >= MAX_QUEUED_RSTS {
            DeviceMetrics::inc(&metrics.errors);
            return;
        }
        self.rsts.push_back(key);
    }

    /// Drops a connection (closing its host socket); `rst` tells the guest.
    fn close(&mut self, key: ConnKey, rst: bool, metrics: &DeviceMetrics) {
        if let Some(c) = self.conns.remove(&key) {
            let _ = self.watcher.remove(c.stream.as_raw_fd());
            self.owners.remove(&c.token);
            if rst {
                self.queue_rst(key, metrics);
            }
        }
    }

    fn close_if_done(&mut self, key: ConnKey, metrics: &DeviceMetrics) {
        if self.conns.get(&key).is_some_and(Connection::is_done) {
            self.close(key, true, metrics);
        }
    }

    fn drop_pending_client(&mut self, token: u32) {
        if let Some(p) = self.pending_clients.remove(&token) {
            let _ = self.watcher.remove(p.stream.as_raw_fd());
            self.owners.remove(&token);
        }
    }

    /// Reads a pending client's `CONNECT <port>\n` one byte at a time, so that
    /// nothing after the line is consumed here.
    fn read_connect_line(&mut self, token: u32, metrics: &DeviceMetrics) {
        let Some(p) = self.pending_clients.get_mut(&token) else {
            return;
        };
        if p.port.is_some() {
            return; // waiting for the guest to take the transport reset
        }
        let port = loop {
            let mut b = [0u8; 1];
            match p.stream.read(&mut b) {
                Ok(0) => return self.drop_pending_client(token),
                Ok(_) => {
                    p.line.push(b[0]);
                    if b[0] == b'\n' {
                        break parse_connect_line(&p.line);
                    }
                    if p.line.len() >= MAX_CONNECT_LINE {
                        break None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.drop_pending_client(token),
            }
        };
        let Some(peer_port) = port else {
            DeviceMetrics::inc(&metrics.errors);
            return self.drop_pending_client(token);
        };
        if self.reset_unacked {
            // The guest has not yet reset its connections: a REQUEST now could be
            // accepted and then reset with the old ones.
            if let Some(p) = self.pending_clients.get_mut(&token) {
                p.port = Some(peer_port);
            }
            return;
        }
        self.open_host_connection(token, peer_port, metrics);
    }

    /// Turns a pending client that asked for `peer_port` into a connection and
    /// queues its REQUEST.
    fn open_host_connection(&mut self, token: u32, peer_port: u32, metrics: &DeviceMetrics) {
        let Some(p) = self.pending_clients.remove(&token) else {
            return;
        };
        let Some(local_port) = self.alloc_local_port(peer_port) else {
            let _ = self.watcher.remove(p.stream.as_raw_fd());
            self.owners.remove(&token);
            DeviceMetrics::inc(&metrics.errors);
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let conn = Connection::new(p.stream, token, State::Connecting, pending::REQUEST);
        self.owners.insert(token, Owner::Conn(key));
        self.conns.insert(key, conn);
        self.mark_ready(key);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            let key = ConnKey {
                local_port: p,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(p);
            }
        }
        None
    }

    /// A host socket is ready.
    fn host_event(&mut self, key: ConnKey, events: EventSet, metrics: &DeviceMetrics) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if events
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            c.host_readable = true;
        }
        if c.state == State::Established && c.flush_to_host().is_err() {
            DeviceMetrics::inc(&metrics.errors);
            return self.close(key, true, metrics);
        }
        self.close_if_done(key, metrics);
        self.mark_ready(key);
    }

    /// Handles every packet the guest queued on tx; returns whether any was used.
    fn process_tx(&mut self, metrics: &DeviceMetrics) -> bool {
        let mut used = false;
        let mem = self.mem.clone();
        // Bounded per call; if the guest keeps adding, come back through the loop so
        // other work is not starved.
        for _ in 0..QUEUE_SIZE {
            let Some(chain) = self.queues[TXQ].pop_descriptor_chain(&mem) else {
                return used;
            };
            let head = chain.head_index();
            if let Err(e) = self.tx_packet(chain, &mem, metrics) {
                tracing::debug!("vsock: dropped a guest packet: {e}");
                DeviceMetrics::inc(&metrics.malformed);
            }
            DeviceMetrics::inc(&metrics.requests);
            if self.queues[TXQ].add_used(&self.mem, head, 0).is_err() {
                DeviceMetrics::inc(&metrics.malformed);
            }
            used = true;
        }
        let _ = self.queue_events[TXQ].write(1);
        used
    }

    fn tx_packet(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        metrics: &DeviceMetrics,
    ) -> Result<(), BadPacket> {
        let mut reader = chain.reader(mem).map_err(|_| BadPacket::Chain)?;
        let room = reader.available_bytes();
        if room < HDR_SIZE {
            return Err(BadPacket::Short(room));
        }
        let mut raw = [0u8; HDR_SIZE];
        reader.read_exact(&mut raw).map_err(|_| BadPacket::Chain)?;
        let h = Header::from_bytes(&raw);
        if let Err(e) = h.check_from_guest(self.cid, room - HDR_SIZE) {
            if h.deserves_rst(self.cid) {
                let key = ConnKey {
                    local_port: h.dst_port,
                    peer_port: h.src_port,
                };
                // A broken packet on a live connection ends it.
                if self.conns.contains_key(&key) {
                    self.close(key, true, metrics);
                } else {
                    self.queue_rst(key, metrics);
                }
            }
            return Err(e);
        }
        // len <= MAX_PAYLOAD and <= the readable bytes, checked above.
        let len = h.len as usize;
        if len > 0 {
            reader
                .read_exact(&mut self.buf[..len])
                .map_err(|_| BadPacket::Chain)?;
        }
        self.guest_packet(&h, len, metrics)
    }

    fn guest_packet(
        &mut self,
        h: &Header,
        len: usize,
        metrics: &DeviceMetrics,
    ) -> Result<(), BadPacket> {
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if h.op == op::REQUEST {
            self.guest_connect(key, h, metrics);
            return Ok(());
        }
        let Some(c) = self.conns.get_mut(&key) else {
            // A packet for no connection (also a late one after a close): RST, as
            // §5.10.6.4 asks, unless it is itself an RST.
            if h.op != op::RST {
                self.queue_rst(key, metrics);
            }
            return Ok(());
        };
        c.update_peer_credit(h);
        match (c.state, h.op) {
            (_, op::RST) => self.close(key, false, metrics),
            (State::Connecting, op::RESPONSE) => {
                c.state = State::Established;
                c.push_preamble(format!("OK {}\n", key.local_port).as_bytes());
                if c.flush_to_host().is_err() {
                    DeviceMetrics::inc(&metrics.errors);
                    self.close(key, true, metrics);
                }
            }
            (State::Established, op::RW) => {
                let data = &self.buf[..len];
                if c.peer_shutdown & SHUTDOWN_SEND != 0 {
                    self.close(key, true, metrics);
                    return Err(BadPacket::Op(op::RW));
                }
                if c.push_from_guest(data) == Err(CreditViolation) {
                    tracing::debug!("vsock: guest port {} sent beyond its credit", key.peer_port);
                    DeviceMetrics::inc(&metrics.malformed);
                    self.close(key, true, metrics);
                    return Ok(());
                }
                DeviceMetrics::add(&metrics.bytes, len as u64);
                if c.flush_to_host().is_err() {
                    DeviceMetrics::inc(&metrics.errors);
                    self.close(key, true, metrics);
                    return Ok(());
                }
            }
            (State::Established, op::CREDIT_UPDATE) => {}
            (State::Established, op::CREDIT_REQUEST) => c.pending |= pending::CREDIT_UPDATE,
            (State::Established, op::SHUTDOWN) => {
                c.peer_shutdown |= h.flags & SHUTDOWN_BOTH;
                if c.flush_to_host().is_err() {
                    DeviceMetrics::inc(&metrics.errors);
                    self.close(key, true, metrics);
                    return Ok(());
                }
            }
            (_, other) => {
                // RESPONSE when established, data before the handshake...: the
                // connection's state is no longer shared, end it.
                self.close(key, true, metrics);
                return Err(BadPacket::Op(other));
            }
        }
        self.close_if_done(key, metrics);
        self.mark_ready(key);
        Ok(())
    }

    /// The guest connects to host port `key.local_port`: connect to `<uds>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, h: &Header, metrics: &DeviceMetrics) {
        if self.conns.contains_key(&key) {
            // A second REQUEST on a live connection: the two sides disagree.
            DeviceMetrics::inc(&metrics.malformed);
            return self.close(key, true, metrics);
        }
        if self.conns.len() + self.pending_clients.len() >= MAX_CONNECTIONS {
            DeviceMetrics::inc(&metrics.errors);
            return self.queue_rst(key, metrics);
        }
        let mut path = self.uds.clone().into_os_string();
        path.push(format!("_{}", key.local_port));
        // Jailed, the socket's directory has another name (or is out of reach).
        let Some(path) = crate::jail::inside(Path::new(&path)) else {
            return self.queue_rst(key, metrics);
        };
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("vsock: guest connect to host port {}: {e}", key.local_port);
                return self.queue_rst(key, metrics);
            }
        };
        let Some(token) = self.watch(&stream, metrics) else {
            return self.queue_rst(key, metrics);
        };
        let mut conn = Connection::new(stream, token, State::Established, pending::RESPONSE);
        conn.update_peer_credit(h);
        self.owners.insert(token, Owner::Conn(key));
        self.conns.insert(key, conn);
        self.mark_ready(key);
    }

    /// Fills rx buffers with RSTs, control packets and host data, round-robin over
    /// the connections; returns whether any buffer was used.
    fn process_rx(&mut self, metrics: &DeviceMetrics) -> bool {
        let mut used = false;
        // Every iteration either uses a buffer or drops a ready entry, and there are
        // at most QUEUE_SIZE buffers and MAX_CONNECTIONS entries (+ re-queues, which
        // need a used buffer).
        let bound = usize::from(QUEUE_SIZE) * 2 + MAX_CONNECTIONS + MAX_QUEUED_RSTS;
        let mem = self.mem.clone();
        for _ in 0..bound {
            if self.rsts.is_empty() && self.ready.is_empty() {
                break;
            }
            let Some(chain) = self.queues[RXQ].pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let Ok(mut writer) = chain.writer(&mem) else {
                DeviceMetrics::inc(&metrics.malformed);
                used |= self.queues[RXQ].add_used(&self.mem, head, 0).is_ok();
                continue;
            };
            let room = writer.available_bytes();
            if room < HDR_SIZE {
                DeviceMetrics::inc(&metrics.malformed);
                used |= self.queues[RXQ].add_used(&self.mem, head, 0).is_ok();
                continue;
            }
            let packet = if let Some(key) = self.rsts.pop_front() {
                Output::Packet(self.rst_header(key), 0)
            } else {
                self.next_output(room - HDR_SIZE, metrics)
            };
            let (h, n) = match packet {
                Output::Packet(h, n) => (h, n),
                Output::Nothing => {
                    self.queues[RXQ].go_to_previous_position();
                    continue;
                }
                // Data is waiting but this buffer holds a header only: hand it back
                // empty (the driver drops used buffers shorter than a header) rather
                // than read 0 bytes from the host socket, which looks like EOF.
                Output::NeedsPayloadRoom => {
                    DeviceMetrics::inc(&metrics.malformed);
                    used |= self.queues[RXQ].add_used(&self.mem, head, 0).is_ok();
                    continue;
                }
            };
            let ok =
                writer.write_all(&h.to_bytes()).is_ok() && writer.write_all(&self.buf[..n]).is_ok();
            if !ok {
                DeviceMetrics::inc(&metrics.malformed);
            }
            DeviceMetrics::add(&metrics.bytes, n as u64);
            let written = if ok { (HDR_SIZE + n) as u32 } else { 0 };
            used |= self.queues[RXQ].add_used(&self.mem, head, written).is_ok();
        }
        used
    }

    /// Tells the driver, through the event queue, that every connection is gone
    /// (after a restore: the host sockets behind them do not exist here). Listening
    /// sockets in the guest survive it; the driver also re-reads the guest CID.
    fn send_transport_reset(&mut self, metrics: &DeviceMetrics) {
        if !self.reset_pending {
            return;
        }
        let mem = self.mem.clone();
        let Some(chain) = self.queues[EVQ].pop_descriptor_chain(&mem) else {
            return; // sent when the driver offers an event buffer
        };
        let head = chain.head_index();
        let ok = chain.writer(&mem).is_ok_and(|mut w| {
            w.write_all(&VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes())
                .is_ok()
        });
        if !ok {
            DeviceMetrics::inc(&metrics.malformed);
        }
        let len = if ok { 4 } else { 0 };
        if self.queues[EVQ].add_used(&mem, head, len).is_ok() {
            self.reset_pending = !ok;
            self.reset_unacked = ok;
            self.signal(EVQ, metrics);
        }
    }

    /// The driver refilled the event queue after a transport reset: open the host
    /// connections that waited for it.
    fn reset_acknowledged(&mut self, metrics: &DeviceMetrics) {
        if !self.reset_unacked {
            return;
        }
        self.reset_unacked = false;
        let waiting: Vec<(u32, u32)> = self
            .pending_clients
            .iter()
            .filter_map(|(t, p)| p.port.map(|port| (*t, port)))
            .collect();
        for (token, port) in waiting {
            self.open_host_connection(token, port, metrics);
        }
    }

    fn rst_header(&self, key: ConnKey) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        }
    }

    /// The next packet of the next ready connection, its payload (if any) in `buf`;
    /// `room` is the payload room of the rx buffer at hand.
    fn next_output(&mut self, room: usize, metrics: &DeviceMetrics) -> Output {
        while let Some(key) = self.ready.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            let cid = self.cid;
            let packet = if c.pending & pending::REQUEST != 0 {
                c.pending &= !pending::REQUEST;
                Some((c.header(key, cid, op::REQUEST, 0), 0))
            } else if c.pending & pending::RESPONSE != 0 {
                c.pending &= !pending::RESPONSE;
                Some((c.header(key, cid, op::RESPONSE, 0), 0))
            } else {
                None
            };
            let mut needs_room = false;
            let packet = match packet {
                Some(p) => Some(p),
                None if c.wants_host_read() && room == 0 => {
                    needs_room = true;
                    None
                }
                None if c.wants_host_read() => {
                    let max = room.min(MAX_PAYLOAD as usize).min(c.peer_credit() as usize);
                    match c.stream.read(&mut self.buf[..max]) {
                        Ok(0) => {
                            c.host_eof = true;
                            c.pending |= pending::SHUTDOWN;
                            None
                        }
                        Ok(n) => {
                            // n <= MAX_PAYLOAD.
                            c.sent_to_guest(n as u32);
                            Some((c.header(key, cid, op::RW, n as u32), n))
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            c.host_readable = false;
                            None
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
                        Err(_) => {
                            DeviceMetrics::inc(&metrics.errors);
                            self.close(key, true, metrics);
                            continue;
                        }
                    }
                }
                None => None,
            };
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            let packet = match packet {
                Some(p) => Some(p),
                None if c.pending & pending::SHUTDOWN != 0 => {
                    c.pending &= !pending::SHUTDOWN;
                    Some((c.header(key, cid, op::SHUTDOWN, 0), 0))
                }
                None if c.pending & pending::CREDIT_UPDATE != 0 => {
                    Some((c.header(key, cid, op::CREDIT_UPDATE, 0), 0))
                }
                None => None,
            };
            if packet.is_none() && needs_room {
                // Keep its turn for the next buffer.
                if let Some(c) = self.conns.get_mut(&key) {
                    c.queued = true;
                    self.ready.push_front(key);
                }
                return Output::NeedsPayloadRoom;
            }
            self.close_if_done(key, metrics);
            self.mark_ready(key);
            if let Some((h, n)) = packet {
                return Output::Packet(h, n);
            }
        }
        Output::Nothing
    }

    fn signal(&mut self, q: usize, metrics: &DeviceMetrics) {
        if self.queues[q].needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used_queue();
            DeviceMetrics::inc(&metrics.interrupts);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn kind(&self) -> &'static str {
        "vsock"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // guest_cid (le64) is the whole configuration space; le32 accesses to either
        // half are what Linux does.
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| cfg.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn set_watcher(&mut self, watcher: Watcher) {
        self.watcher = Some(watcher);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<Vec<Watch>, ActivateError> {
        if ctx.queues.len() != 3 || ctx.queue_events.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                given: ctx.queues.len(),
            });
        }
        let watcher = self.watcher.clone().ok_or_else(|| {
            ActivateError::Backend(io::Error::other(
                "virtio-vsock needs the event loop's watcher for its host sockets",
            ))
        })?;
        let mut watches: Vec<Watch> = ctx
            .queue_events
            .iter()
            .enumerate()
            .map(|(i, e)| Watch {
                fd: e.as_raw_fd(),
                source: i as u32,
                events: EventSet::IN,
            })
            .collect();
        watches.push(Watch {
            fd: self.listener.as_raw_fd(),
            source: SOURCE_LISTENER,
            events: EventSet::IN,
        });
        self.active = Some(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            queue_events: ctx.queue_events,
            interrupt: ctx.interrupt,
            watcher,
            cid: self.cid,
            uds: self.uds.clone(),
            conns: HashMap::new(),
            pending_clients: HashMap::new(),
            owners: HashMap::new(),
            ready: VecDeque::new(),
            rsts: VecDeque::new(),
            next_token: FIRST_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            buf: vec![0u8; MAX_PAYLOAD as usize],
            reset_pending: false,
            reset_unacked: false,
        });
        Ok(watches)
    }

    fn process_event(&mut self, source: u32, events: EventSet) {
        if self.active.is_none() {
            return;
        }
        if source == SOURCE_LISTENER {
            self.accept_clients();
        }
        let metrics = &self.metrics;
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut tx_used = false;
        match source {
            SOURCE_TX => {
                // Drain the counter before looking at the ring (no lost wake-ups).
                let _ = a.queue_events[TXQ].read();
                tx_used = a.process_tx(metrics);
            }
            // Fresh rx buffers: served below.
            SOURCE_RX => {
                let _ = a.queue_events[RXQ].read();
            }
            // The driver adds event buffers: after a restore, the sign that it has
            // handled the transport reset.
            SOURCE_EVENT => {
                let _ = a.queue_events[EVQ].read();
                a.reset_acknowledged(metrics);
                a.send_transport_reset(metrics);
            }
            SOURCE_LISTENER => {}
            token => match a.owners.get(&token) {
                Some(Owner::Pending) => a.read_connect_line(token, metrics),
                Some(Owner::Conn(key)) => {
                    let key = *key;
                    a.host_event(key, events, metrics);
                }
                // A stale event for a socket closed earlier in this batch.
                None => {}
            },
        }
        if tx_used {
            a.signal(TXQ, metrics);
        }
        if a.process_rx(metrics) {
            a.signal(RXQ, metrics);
        }
        let open = a.conns.len() + a.pending_clients.len();
        metrics
            .open
            .store(u64::try_from(open).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn reset(&mut self) {
        let Some(a) = self.active.take() else {
            return;
        };
        self.metrics.open.store(0, Ordering::Relaxed);
        // Host sockets are unwatched here and closed when `a` drops; the transport
        // has unwatched the queue notifiers and the listener (which stays open: host
        // clients queue in its backlog until the driver comes back).
        for c in a.conns.values() {
            let _ = a.watcher.remove(c.stream.as_raw_fd());
        }
        for p in a.pending_clients.values() {
            let _ = a.watcher.remove(p.stream.as_raw_fd());
        }
    }

    fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
            .unwrap_or_default()
    }

    fn restored(&mut self) {
        let metrics = &self.metrics;
        if let Some(a) = self.active.as_mut() {
            a.reset_pending = true;
            a.send_transport_reset(metrics);
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::connection::CONN_BUF;
    use std::io::{Read, Write};
    use std::time::Duration;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::epoll::{Epoll, EpollEvent};

    const GUEST_CID: u64 = 3;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const Q: u16 = 256;
    const RX_BUF: u64 = 0x10_0000;
    const RX_STRIDE: u64 = 0x2000;
    const RX_LEN: u32 = 4096 + HDR_SIZE as u32;
    const TX_BUF: u64 = 0x80_0000;
    const TX_STRIDE: u64 = 0x2_0000;
    const USED_OFFSET: u64 = 0x2000;

    /// (idx, ring) of a queue's used ring.
    fn used_idx(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
        mem.read_obj(GuestAddress(q.start().0 + USED_OFFSET + 2))
            .unwrap()
    }

    /// (id, len) of used element `i`.
    fn used_elem(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, i: u16) -> (u32, u32) {
        let at = q.start().0 + USED_OFFSET + 4 + u64::from(i % Q) * 8;
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    /// A private directory for the test's sockets, removed afterwards.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("atoll-vsock-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fake driver: the guest half of the queues, in its own memory.
    struct Guest {
        mem: &'static GuestMemoryMmap,
        rx: MockSplitQueue<'static, GuestMemoryMmap>,
        tx: MockSplitQueue<'static, GuestMemoryMmap>,
        ev: MockSplitQueue<'static, GuestMemoryMmap>,
        ev_given: u16,
        rx_given: u16,
        rx_seen: u16,
        tx_sent: u16,
        epoll: Arc<Epoll>,
        dev: Vsock,
        irq: EventFd,
        _dir: TempDir,
        uds: PathBuf,
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn publish(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, head: u16) {
        let idx_addr = GuestAddress(q.avail_addr().0 + 2);
        let idx: u16 = mem.read_obj(idx_addr).unwrap();
        let slot = GuestAddress(q.avail_addr().0 + 4 + u64::from(idx % Q) * 2);
        mem.write_obj(head, slot).unwrap();
        mem.write_obj(idx.wrapping_add(1), idx_addr).unwrap();
    }

    impl Guest {
        fn new() -> Self {
            let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap(),
            ));
            let rx = MockSplitQueue::create(mem, GuestAddress(0), Q);
            let tx = MockSplitQueue::create(mem, GuestAddress(0x1_0000), Q);
            let ev = MockSplitQueue::create(mem, GuestAddress(0x2_0000), Q);
            let dir = TempDir::new();
            let uds = dir.path().join("v.sock");
            let mut dev = Vsock::new(GUEST_CID, &uds).unwrap();
            let epoll = Arc::new(Epoll::new().unwrap());
            let watcher = Watcher::new(epoll.clone(), 0);
            dev.set_watcher(watcher.clone());
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            // MockSplitQueue places the used ring inside a 256-entry avail ring;
            // give each queue its own used ring at base + USED_OFFSET.
            let queue = |m: &MockSplitQueue<GuestMemoryMmap>| {
                let mut q = m.create_queue::<Queue>().unwrap();
                let used = m.start().0 + USED_OFFSET;
                q.set_used_ring_address(Some(used as u32), Some(0));
                q
            };
            let ctx = ActivateContext {
                mem: mem.clone(),
                queues: vec![queue(&rx), queue(&tx), queue(&ev)],
                queue_events: (0..3)
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                    .collect(),
                interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
                acked_features: 0,
            };
            for w in dev.activate(ctx).unwrap() {
                watcher.add(w).unwrap();
            }
            Guest {
                mem,
                rx,
                tx,
                ev,
                ev_given: 0,
                rx_given: 0,
                rx_seen: 0,
                tx_sent: 0,
                epoll,
                dev,
                irq,
                _dir: dir,
                uds,
            }
        }

        /// Offers `n` rx buffers and notifies.
        fn give_rx(&mut self, n: u16) {
            for _ in 0..n {
                let i = self.rx_given % Q;
                self.rx
                    .desc_table()
                    .store(
                        i,
                        desc(RX_BUF + u64::from(i) * RX_STRIDE, RX_LEN, F_WRITE, 0),
                    )
                    .unwrap();
                publish(self.mem, &self.rx, i);
                self.rx_given = self.rx_given.wrapping_add(1);
            }
            self.dev.process_event(SOURCE_RX, EventSet::IN);
        }

        /// Offers one 8-byte event buffer and notifies the event queue.
        fn give_ev(&mut self) {
            let i = self.ev_given % Q;
            self.ev
                .desc_table()
                .store(i, desc(0x1_8000 + u64::from(i) * 8, 8, F_WRITE, 0))
                .unwrap();
            publish(self.mem, &self.ev, i);
            self.ev_given = self.ev_given.wrapping_add(1);
            self.dev.process_event(SOURCE_EVENT, EventSet::IN);
        }

        /// Offers one rx buffer of `len` bytes and notifies.
        fn give_rx_len(&mut self, len: u32) {
            let i = self.rx_given % Q;
            self.rx
                .desc_table()
                .store(i, desc(RX_BUF + u64::from(i) * RX_STRIDE, len, F_WRITE, 0))
                .unwrap();
            publish(self.mem, &self.rx, i);
            self.rx_given = self.rx_given.wrapping_add(1);
            self.dev.process_event(SOURCE_RX, EventSet::IN);
        }

        /// Puts one packet on tx (header and payload in two descriptors), notifies.
        fn send_raw(&mut self, hdr: &[u8], payload: &[u8]) {
            let slot = self.tx_sent % (Q / 2);
            let (i, j) = (slot * 2, slot * 2 + 1);
            let base = TX_BUF + u64::from(slot) * TX_STRIDE;
            self.mem.write_slice(hdr, GuestAddress(base)).unwrap();
            self.mem
                .write_slice(payload, GuestAddress(base + 0x100))
                .unwrap();
            self.tx
                .desc_table()
                .store(i, desc(base, hdr.len() as u32, F_NEXT, j))
                .unwrap();
            self.tx
                .desc_table()
                .store(j, desc(base + 0x100, payload.len() as u32, 0, 0))
                .unwrap();
            publish(self.mem, &self.tx, i);
            self.tx_sent = self.tx_sent.wrapping_add(1);
            self.dev.process_event(SOURCE_TX, EventSet::IN);
        }

        fn send(&mut self, h: Header, payload: &[u8]) {
            self.send_raw(&h.to_bytes(), payload);
        }

        /// Packets the device put in rx buffers since the last call.
        fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
            let mut out = Vec::new();
            let used_idx = used_idx(self.mem, &self.rx);
            while self.rx_seen != used_idx {
                let (id, len) = used_elem(self.mem, &self.rx, self.rx_seen);
                assert!(id < u32::from(Q), "used id {id}");
                let addr = RX_BUF + u64::from(id) * RX_STRIDE;
                let mut raw = [0u8; HDR_SIZE];
                self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
                let h = Header::from_bytes(&raw);
                assert_eq!(
                    len,
                    HDR_SIZE as u32 + h.len,
                    "used length = header + payload"
                );
                let mut data = vec![0u8; h.len as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(addr + HDR_SIZE as u64))
                    .unwrap();
                out.push((h, data));
                self.rx_seen = self.rx_seen.wrapping_add(1);
            }
            out
        }

        /// Runs the event loop until it is idle; returns how many events it handled.
        fn run(&mut self) -> usize {
            let mut handled = 0;
            let mut events = [EpollEvent::default(); 16];
            for _ in 0..1000 {
                let n = self.epoll.wait(20, &mut events).unwrap();
                if n == 0 {
                    return handled;
                }
                for ev in &events[..n] {
                    self.dev.process_event(ev.data() as u32, ev.event_set());
                }
                handled += n;
            }
            panic!("the device never went idle");
        }

        fn header(&self, op: u16, guest_port: u32, host_port: u32) -> Header {
            Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port: guest_port,
                dst_port: host_port,
                len: 0,
                type_: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: 256 * 1024,
                fwd_cnt: 0,
            }
        }

        fn malformed(&self) -> u64 {
            self.dev.metrics().snapshot("vsock").malformed
        }

        /// A host client that asked for guest port `port`, the REQUEST the guest saw
        /// answered with RESPONSE: (client, host port).
        fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
            let mut client = UnixStream::connect(&self.uds).unwrap();
            client
                .write_all(format!("CONNECT {port}\n").as_bytes())
                .unwrap();
            self.run();
            let pkts = self.recv();
            assert_eq!(pkts.len(), 1, "{pkts:?}");
            let req = pkts[0].0;
            assert_eq!(req.op, op::REQUEST);
            assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
            assert_eq!(req.dst_port, port);
            self.send(self.header(op::RESPONSE, port, req.src_port), &[]);
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let ok = format!("OK {}\n", req.src_port);
            let mut line = vec![0u8; ok.len()];
            client.read_exact(&mut line).unwrap();
            assert_eq!(line, ok.as_bytes());
            (client, req.src_port)
        }
    }

    #[test]
    fn vsock_config_space_is_the_guest_cid_little_endian() {
        let dir = TempDir::new();
        let dev = Vsock::new(0x1_0000_0005, &dir.path().join("s")).unwrap();
        let mut lo = [0u8; 4];
        let mut hi = [0u8; 4];
        dev.read_config(0, &mut lo);
        dev.read_config(4, &mut hi);
        assert_eq!(u32::from_le_bytes(lo), 5);
        assert_eq!(u32::from_le_bytes(hi), 1);
        let mut past = [0xffu8; 4];
        dev.read_config(u64::MAX - 1, &mut past);
        assert_eq!(past, [0; 4]);
        assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    }

    #[test]
    fn vsock_new_replaces_a_stale_socket_but_not_a_file() {
        let dir = TempDir::new();
        let path = dir.path().join("s");
        drop(UnixListener::bind(&path).unwrap());
        assert!(Vsock::new(3, &path).is_ok(), "stale socket removed");
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(Vsock::new(3, &file).is_err());
        assert!(file.exists());
    }

    #[test]
    fn vsock_host_initiated_handshake_then_relays_both_ways() {
        let mut g = Guest::new();
        g.give_rx(8);
        let (mut client, host_port) = g.host_connect(5000);
        assert_eq!(host_port, FIRST_LOCAL_PORT);
        // guest -> host
        let mut rw = g.header(op::RW, 5000, host_port);
        rw.len = 5;
        g.send(rw, b"hello");
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        // host -> guest
        client.write_all(b"world").unwrap();
        g.run();
        let pkts = g.recv();
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].0.op, op::RW);
        assert_eq!(pkts[0].1, b"world");
        assert_eq!(pkts[0].0.buf_alloc, 256 * 1024, "our buffer is advertised");
        assert_eq!(g.dev.metrics().snapshot("vsock").open, 1);
        // RST from the guest closes the host socket.
        g.send(g.header(op::RST, 5000, host_port), &[]);
        assert_eq!(client.read(&mut buf).unwrap(), 0, "EOF after RST");
        assert_eq!(g.malformed(), 0);
        assert_eq!(
            g.dev.metrics().snapshot("vsock").open,
            0,
            "the gauge follows"
        );
    }

    #[test]
    fn vsock_header_only_rx_buffer_is_returned_empty_not_taken_as_eof() {
        let mut g = Guest::new();
        g.give_rx(1);
        let (mut client, host_port) = g.host_connect(5001);
        client.write_all(b"data").unwrap();
        // Room for a header and not one byte more: nothing can be read into it.
        g.give_rx_len(HDR_SIZE as u32);
        g.run();
        assert_eq!(g.malformed(), 1, "the header-only buffer is counted");
        let used = used_idx(g.mem, &g.rx);
        assert_eq!(used_elem(g.mem, &g.rx, used.wrapping_sub(1)).1, 0);
        g.rx_seen = used;
        // The next real buffer carries the data; the stream was not shut down.
        g.give_rx(1);
        g.run();
        let pkts = g.recv();
        assert_eq!(pkts.len(), 1, "{pkts:?}");
        assert_eq!((pkts[0].0.op, pkts[0].0.src_port), (op::RW, host_port));
        assert_eq!(pkts[0].1, b"data");
        let mut rw = g.header(op::RW, 5001, host_port);
        rw.len = 2;
        g.send(rw, b"ok");
        let mut buf = [0u8; 2];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ok", "both directions still open");
    }

    #[test]
    fn vsock_restore_sends_transport_reset_and_holds_host_connects_until_the_driver_took_it() {
        let mut g = Guest::new();
        g.give_rx(4);
        g.give_ev(); // the driver's event buffer, there before the snapshot
        g.dev.restored();
        let used = used_idx(g.mem, &g.ev);
        assert_eq!(used, 1, "the reset event was delivered");
        let id: u32 = g.mem.read_obj(GuestAddress(0x1_8000)).unwrap();
        assert_eq!(id, VSOCK_EVENT_TRANSPORT_RESET);
        assert!(g.irq.read().is_ok(), "and signalled");
        let mut client = UnixStream::connect(&g.uds).unwrap();
        client.write_all(b"CONNECT 5000\n").unwrap();
        g.run();
        assert!(
            g.recv().is_empty(),
            "no REQUEST before the driver handled the reset"
        );
        // Handling it, the driver refills the event queue and kicks it.
        g.give_ev();
        let pkts = g.recv();
        assert_eq!(pkts.len(), 1, "{pkts:?}");
        assert_eq!((pkts[0].0.op, pkts[0].0.dst_port), (op::REQUEST, 5000));
    }

    #[test]
    fn vsock_host_connect_refused_by_guest_closes_the_client() {
        let mut g = Guest::new();
        g.give_rx(4);
        let mut client = UnixStream::connect(&g.uds).unwrap();
        client.write_all(b"CONNECT 7\n").unwrap();
        g.run();
        let req = g.recv()[0].0;
        g.send(g.header(op::RST, 7, req.src_port), &[]);
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(client.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn vsock_bad_connect_line_is_closed() {
        let mut g = Guest::new();
        g.give_rx(4);
        let mut client = UnixStream::connect(&g.uds).unwrap();
        client.write_all(b"HELLO there\n").unwrap();
        g.run();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(client.read(&mut buf).unwrap(), 0);
        assert!(g.recv().is_empty(), "nothing reached the guest");
    }

    #[test]
    fn vsock_guest_connect_reaches_the_host_listener_or_gets_rst() {
        let mut g = Guest::new();
        g.give_rx(8);
        let mut listener_path = g.uds.clone().into_os_string();
        listener_path.push("_52");
        let listener = UnixListener::bind(&listener_path).unwrap();
        g.send(g.header(op::REQUEST, 1234, 52), &[]);
        g.send(g.header(op::REQUEST, 1235, 53), &[]);
        let pkts = g.recv();
        assert_eq!(pkts.len(), 2);
        let (ok, refused) = (pkts[0].0, pkts[1].0);
        assert_eq!((ok.op, ok.src_port, ok.dst_port), (op::RESPONSE, 52, 1234));
        assert_eq!(
            (refused.op, refused.src_port, refused.dst_port),
            (op::RST, 53, 1235)
        );
        let (mut server, _) = listener.accept().unwrap();
        let mut rw = g.header(op::RW, 1234, 52);
        rw.len = 3;
        g.send(rw, b"abc");
        let mut buf = [0u8; 3];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"abc");
    }

    #[test]
    fn vsock_malformed_packets_are_counted_and_answered_as_the_spec_says() {
        let mut g = Guest::new();
        g.give_rx(16);
        // Spoofed source CID: dropped silently.
        let mut h = g.header(op::REQUEST, 1, 52);
        h.src_cid = 9;
        g.send(h, &[]);
        // Not for the host: dropped silently.
        let mut h = g.header(op::REQUEST, 1, 52);
        h.dst_cid = 7;
        g.send(h, &[]);
        assert_eq!(g.malformed(), 2);
        assert!(g.recv().is_empty());
        // Bad type, unknown op, len beyond the descriptor: RST back.
        let mut h = g.header(op::REQUEST, 2, 52);
        h.type_ = 2;
        g.send(h, &[]);
        g.send(g.header(42, 3, 52), &[]);
        let mut h = g.header(op::RW, 4, 52);
        h.len = 100;
        g.send(h, b"short");
        // A header cut short.
        g.send_raw(&[0u8; 20], &[]);
        assert_eq!(g.malformed(), 6);
        let pkts = g.recv();
        assert_eq!(pkts.len(), 3);
        assert!(pkts.iter().all(|(h, _)| h.op == op::RST));
        assert_eq!(
            pkts.iter().map(|(h, _)| h.dst_port).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        // Data for a connection that does not exist: RST, not malformed.
        let mut h = g.header(op::RW, 5, 52);
        h.len = 1;
        g.send(h, b"x");
        assert_eq!(g.recv()[0].0.op, op::RST);
        // An RST for nothing gets no answer.
        g.send(g.header(op::RST, 6, 52), &[]);
        assert!(g.recv().is_empty());
        assert_eq!(
            g.dev.metrics().snapshot("vsock").requests,
            8,
            "every tx chain returned"
        );
        assert_eq!(used_idx(g.mem, &g.tx), 8);
    }

    #[test]
    fn vsock_tx_descriptor_outside_memory_is_malformed_and_returned() {
        let mut g = Guest::new();
        let i = 0;
        g.tx.desc_table()
            .store(i, desc(0xffff_ffff_0000, 4096, 0, 0))
            .unwrap();
        publish(g.mem, &g.tx, i);
        g.dev.process_event(SOURCE_TX, EventSet::IN);
        assert_eq!(g.malformed(), 1);
        assert_eq!(used_idx(g.mem, &g.tx), 1);
    }

    #[test]
    fn vsock_never_sends_more_than_the_guest_credit() {
        let mut g = Guest::new();
        g.give_rx(64);
        let (mut client, hp) = g.host_connect(80);
        // The guest shrinks its buffer to 4 KiB (every packet carries credit).
        let mut cu = g.header(op::CREDIT_UPDATE, 80, hp);
        cu.buf_alloc = 4096;
        g.send(cu, &[]);
        client.write_all(&[9u8; 10_000]).unwrap();
        g.run();
        let got: usize = g
            .recv()
            .iter()
            .map(|(h, d)| {
                assert_eq!(h.op, op::RW);
                d.len()
            })
            .sum();
        assert_eq!(got, 4096, "exactly buf_alloc, no more");
        // The guest reads 4096 bytes and says so: 4096 more may come.
        cu.fwd_cnt = 4096;
        g.send(cu, &[]);
        g.run();
        let got: usize = g.recv().iter().map(|(_, d)| d.len()).sum();
        assert_eq!(got, 4096);
        cu.fwd_cnt = 8192;
        g.send(cu, &[]);
        g.run();
        let got: usize = g.recv().iter().map(|(_, d)| d.len()).sum();
        assert_eq!(got, 10_000 - 8192);
    }

    #[test]
    fn vsock_guest_that_stops_reading_is_neither_buffered_nor_spun_for() {
        let mut g = Guest::new();
        g.give_rx(200);
        let (client, hp) = g.host_connect(81);
        client.set_nonblocking(true).unwrap();
        let mut cu = g.header(op::CREDIT_UPDATE, 81, hp);
        cu.buf_alloc = 64 * 1024;
        g.send(cu, &[]);
        // The host writes until its socket is full.
        let chunk = vec![1u8; 64 * 1024];
        let mut written = 0usize;
        for _ in 0..1000 {
            g.run();
            match (&client).write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        g.run();
        let got: usize = g.recv().iter().map(|(_, d)| d.len()).sum();
        assert_eq!(got, 64 * 1024, "only the guest's credit went in");
        assert!(
            written > got,
            "the host was stopped by its own socket buffer"
        );
        // Nothing is pending: the loop is idle, not spinning on a readable socket.
        assert_eq!(g.run(), 0);
        assert!(g.recv().is_empty());
        // The device holds no host data of its own: rx buffers stay free.
        assert_eq!(used_idx(g.mem, &g.rx), g.rx_seen);
    }

    #[test]
    fn vsock_host_that_stops_reading_stops_the_guest_by_credit() {
        let mut g = Guest::new();
        g.give_rx(32);
        let (client, hp) = g.host_connect(82);
        let payload = vec![5u8; 64 * 1024];
        let mut rw = g.header(op::RW, 82, hp);
        rw.len = payload.len() as u32;
        for _ in 0..4 {
            g.send(rw, &payload);
        }
        assert_eq!(g.malformed(), 0, "256 KiB is within the advertised credit");
        let held = g
            .dev
            .active
            .as_ref()
            .unwrap()
            .conns
            .values()
            .next()
            .unwrap()
            .to_host_len();
        assert!(held > 0 && held <= CONN_BUF as usize, "held {held}");
        // Reading all of it on the host frees the credit and the guest hears so.
        client.set_nonblocking(true).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        let mut total = 0;
        for _ in 0..1000 {
            match (&client).read(&mut sink) {
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if total == 4 * payload.len() {
                        break;
                    }
                    g.run();
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(total, 4 * payload.len());
        g.run();
        let pkts = g.recv();
        let last = pkts.last().expect("a credit update");
        assert_eq!(last.0.op, op::CREDIT_UPDATE);
        let guest_view_free = CONN_BUF - (4 * 64 * 1024 - last.0.fwd_cnt);
        assert!(guest_view_free >= 64 * 1024, "{guest_view_free}");
    }

    #[test]
    fn vsock_guest_sending_beyond_credit_is_reset() {
        let mut g = Guest::new();
        g.give_rx(32);
        let (_client, hp) = g.host_connect(83);
        // Nobody reads the host socket; fill it past CONN_BUF + the socket buffer.
        let payload = vec![5u8; 64 * 1024];
        let mut rw = g.header(op::RW, 83, hp);
        rw.len = payload.len() as u32;
        let mut sent = 0;
        while g.malformed() == 0 && sent < 64 {
            g.send(rw, &payload);
            sent += 1;
        }
        assert_eq!(g.malformed(), 1);
        let pkts = g.recv();
        assert_eq!(pkts.last().unwrap().0.op, op::RST);
        assert!(g.dev.active.as_ref().unwrap().conns.is_empty());
    }

    #[test]
    fn vsock_guest_shutdown_both_flushes_then_resets_and_closes() {
        let mut g = Guest::new();
        g.give_rx(8);
        let (mut client, hp) = g.host_connect(84);
        let mut rw = g.header(op::RW, 84, hp);
        rw.len = 3;
        g.send(rw, b"bye");
        let mut sd = g.header(op::SHUTDOWN, 84, hp);
        sd.flags = SHUTDOWN_BOTH;
        g.send(sd, &[]);
        let pkts = g.recv();
        assert_eq!(pkts.last().unwrap().0.op, op::RST);
        let mut out = Vec::new();
        client.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"bye");
    }

    #[test]
    fn vsock_host_eof_is_shutdown_send_and_guest_close_finishes_it() {
        let mut g = Guest::new();
        g.give_rx(8);
        let (client, hp) = g.host_connect(85);
        (&client).write_all(b"last").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        g.run();
        let pkts = g.recv();
        assert_eq!(pkts[0].1, b"last");
        let sd = pkts.last().unwrap().0;
        assert_eq!((sd.op, sd.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
        // The guest can still send; then closes.
        let mut rw = g.header(op::RW, 85, hp);
        rw.len = 2;
        g.send(rw, b"ok");
        let mut sd = g.header(op::SHUTDOWN, 85, hp);
        sd.flags = SHUTDOWN_BOTH;
        g.send(sd, &[]);
        assert_eq!(g.recv().last().unwrap().0.op, op::RST);
        let mut out = Vec::new();
        (&client).read_to_end(&mut out).unwrap();
        assert_eq!(out, b"ok");
    }

    #[test]
    fn vsock_packets_out_of_state_reset_the_connection() {
        let mut g = Guest::new();
        g.give_rx(8);
        let (mut client, hp) = g.host_connect(86);
        // RESPONSE on an established connection.
        g.send(g.header(op::RESPONSE, 86, hp), &[]);
        assert_eq!(g.malformed(), 1);
        assert_eq!(g.recv().last().unwrap().0.op, op::RST);
        let mut b = [0u8; 1];
        assert_eq!(client.read(&mut b).unwrap(), 0);
    }

    #[test]
    fn vsock_connection_count_is_bounded() {
        let mut g = Guest::new();
        let mut listener_path = g.uds.clone().into_os_string();
        listener_path.push("_60");
        let _listener = UnixListener::bind(&listener_path).unwrap();
        let mut pkts = Vec::new();
        for p in 0..(MAX_CONNECTIONS as u32 + 5) {
            g.give_rx(1);
            g.send(g.header(op::REQUEST, 10_000 + p, 60), &[]);
            pkts.extend(g.recv());
        }
        let responses = pkts.iter().filter(|(h, _)| h.op == op::RESPONSE).count();
        let rsts = pkts.iter().filter(|(h, _)| h.op == op::RST).count();
        assert_eq!(responses, MAX_CONNECTIONS);
        assert_eq!(rsts, 5);
    }

    #[test]
    fn vsock_rx_without_buffers_waits_then_delivers() {
        let mut g = Guest::new();
        let mut listener_path = g.uds.clone().into_os_string();
        listener_path.push("_61");
        let _listener = UnixListener::bind(&listener_path).unwrap();
        g.send(g.header(op::REQUEST, 1, 61), &[]);
        assert!(g.recv().is_empty());
        g.give_rx(1);
        assert_eq!(g.recv()[0].0.op, op::RESPONSE);
        assert!(g.irq.read().is_ok(), "the guest was interrupted");
    }

    #[test]
    fn vsock_reset_drops_every_connection() {
        let mut g = Guest::new();
        g.give_rx(8);
        let (mut client, _) = g.host_connect(87);
        g.dev.reset();
        let mut b = [0u8; 1];
        assert_eq!(client.read(&mut b).unwrap(), 0);
        g.dev.process_event(SOURCE_TX, EventSet::IN);
        g.dev.reset();
        assert_eq!(g.run(), 0, "no host socket is watched any more");
    }
}
