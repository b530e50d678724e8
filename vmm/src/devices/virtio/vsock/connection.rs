//! One vsock stream between a guest port and a host Unix socket, with its
//! credit-based flow control (virtio 1.2 §5.10.6.3).
//!
//! Host -> guest: bytes are read from the host socket straight into the guest's rx
//! buffers, never more than the guest's advertised free space
//! (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`), so nothing is buffered on the host.
//! Guest -> host: the device advertises [`CONN_BUF`] and holds at most that many
//! bytes the host socket has not taken yet; `fwd_cnt` only moves when the host
//! socket accepts bytes, so a host that stops reading stops the guest. A guest that
//! sends beyond its credit breaks the protocol and is reset.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;

use super::packet::{op, Header, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Receive buffer advertised to the guest for each connection, and the most guest
/// data held for a host socket that does not read.
pub const CONN_BUF: u32 = 256 * 1024;
/// Once the guest's view of our free space falls below this, tell it about the
/// space we freed (Linux uses the same threshold: one maximum packet).
const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;

/// Addresses of a connection: the host-side port and the guest's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Port on the host (CID 2) side.
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
}

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or queued), waiting for RESPONSE or RST.
    Connecting,
    /// Data flows.
    Established,
}

/// Control packets waiting for an rx buffer (at most one of each per connection, so
/// a guest cannot make them pile up).
pub mod pending {
    /// REQUEST (host-initiated connect).
    pub const REQUEST: u8 = 1;
    /// RESPONSE (guest-initiated connect accepted).
    pub const RESPONSE: u8 = 2;
    /// CREDIT_UPDATE.
    pub const CREDIT_UPDATE: u8 = 4;
    /// SHUTDOWN(SEND): the host socket reached end of file.
    pub const SHUTDOWN: u8 = 8;
}

/// Guest data refused because it exceeds the credit we gave.
#[derive(Debug, PartialEq, Eq)]
pub struct CreditViolation;

/// A connection.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// Its epoll source id.
    pub token: u32,
    /// Life stage.
    pub state: State,
    /// [`pending`] bits.
    pub pending: u8,
    /// In the device's ready list.
    pub queued: bool,
    /// The host socket may have bytes (or EOF) to read.
    pub host_readable: bool,
    /// The host socket reached end of file (SHUTDOWN(SEND) told to the guest).
    pub host_eof: bool,
    /// SHUTDOWN flags the guest sent.
    pub peer_shutdown: u32,
    /// The host socket's write side was shut down after the guest's SHUTDOWN(SEND).
    pub host_write_closed: bool,
    /// Guest's receive buffer size.
    peer_buf_alloc: u32,
    /// Bytes the guest consumed (its counter, wrapping).
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest (wrapping).
    rx_cnt: u32,
    /// Bytes received from the guest (wrapping).
    recv_cnt: u32,
    /// Bytes of guest data delivered to the host socket (wrapping).
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: u32,
    /// Bytes for the host written before any guest data ("OK <port>\n").
    preamble: Vec<u8>,
    /// Guest data the host socket has not taken yet (at most [`CONN_BUF`]).
    to_host: VecDeque<u8>,
}

impl Connection {
    /// A connection over `stream`.
    pub fn new(stream: UnixStream, token: u32, state: State, pending: u8) -> Self {
        Self {
            stream,
            token,
            state,
            pending,
            queued: false,
            host_readable: true,
            host_eof: false,
            peer_shutdown: 0,
            host_write_closed: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            recv_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            preamble: Vec::new(),
            to_host: VecDeque::new(),
        }
    }

    /// Records the credit fields every guest packet carries.
    pub fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    /// Bytes the guest can take now. A guest reporting nonsense (fwd_cnt ahead of
    /// what we sent) only starves itself.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the host socket should be read now to feed the guest.
    pub fn wants_host_read(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Whether this connection has a packet for the guest.
    pub fn has_output(&self) -> bool {
        self.pending != 0 || self.wants_host_read()
    }

    /// A header from us to the guest, carrying our current credit.
    pub fn header(&mut self, key: ConnKey, guest_cid: u64, op: u16, len: u32) -> Header {
        self.fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !pending::CREDIT_UPDATE;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: if op == op::SHUTDOWN { SHUTDOWN_SEND } else { 0 },
            buf_alloc: CONN_BUF,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Counts `n` bytes sent to the guest.
    pub fn sent_to_guest(&mut self, n: u32) {
        self.rx_cnt = self.rx_cnt.wrapping_add(n);
    }

    /// Room for guest data under the credit we advertised.
    pub fn guest_credit_left(&self) -> u32 {
        CONN_BUF.saturating_sub(self.recv_cnt.wrapping_sub(self.fwd_cnt))
    }

    /// Accepts `data` from the guest for the host socket.
    pub fn push_from_guest(&mut self, data: &[u8]) -> Result<(), CreditViolation> {
        let n = u32::try_from(data.len()).map_err(|_| CreditViolation)?;
        if n > self.guest_credit_left() {
            return Err(CreditViolation);
        }
        self.recv_cnt = self.recv_cnt.wrapping_add(n);
        self.to_host.extend(data);
        Ok(())
    }

    /// Bytes waiting for the host socket.
    pub fn to_host_len(&self) -> usize {
        self.preamble.len() + self.to_host.len()
    }

    /// Queues bytes for the host that are not guest data (not counted as credit).
    pub fn push_preamble(&mut self, bytes: &[u8]) {
        self.preamble.extend_from_slice(bytes);
    }

    /// Writes what the host socket takes without blocking. Returns an error when the
    /// host socket is gone. Queues a CREDIT_UPDATE when the guest's view of our
    /// free space has become small and we freed some.
    pub fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.preamble.is_empty() {
            match self.stream.write(&self.preamble) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.preamble.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    // n <= CONN_BUF, so the cast is exact.
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.to_host.is_empty() && self.to_host.capacity() > CREDIT_UPDATE_THRESHOLD as usize {
            // Give back a burst's buffer: idle connections hold no memory.
            self.to_host = VecDeque::new();
        }
        let guest_view_free =
            CONN_BUF.saturating_sub(self.recv_cnt.wrapping_sub(self.fwd_cnt_sent));
        if self.fwd_cnt != self.fwd_cnt_sent && guest_view_free < CREDIT_UPDATE_THRESHOLD {
            self.pending |= pending::CREDIT_UPDATE;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0
            && self.to_host_len() == 0
            && !self.host_write_closed
        {
            self.host_write_closed = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Both directions are finished: the guest sends nothing more and everything it
    /// sent reached the host, and nothing more will go to the guest.
    pub fn is_done(&self) -> bool {
        let guest_done = self.peer_shutdown & SHUTDOWN_SEND != 0 && self.to_host_len() == 0;
        let host_done = self.host_eof || self.peer_shutdown & SHUTDOWN_RCV != 0;
        guest_done && host_done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn conn() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, 16, State::Established, 0), b)
    }

    fn credit(buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        }
    }

    #[test]
    fn credit_is_buf_alloc_minus_bytes_in_flight() {
        let (mut c, _peer) = conn();
        c.update_peer_credit(&credit(1000, 0));
        assert_eq!(c.peer_credit(), 1000);
        c.sent_to_guest(600);
        assert_eq!(c.peer_credit(), 400);
        c.update_peer_credit(&credit(1000, 500));
        assert_eq!(c.peer_credit(), 900);
    }

    #[test]
    fn credit_survives_counter_wrap_and_nonsense() {
        let (mut c, _peer) = conn();
        c.rx_cnt = u32::MAX - 10;
        c.update_peer_credit(&credit(100, u32::MAX - 10));
        c.sent_to_guest(50);
        assert_eq!(c.peer_credit(), 50, "in flight across the wrap is 50");
        // fwd_cnt ahead of what was sent: in flight looks huge, no credit.
        c.update_peer_credit(&credit(100, 1000));
        assert_eq!(c.peer_credit(), 0);
        // A shrinking buffer never underflows.
        c.update_peer_credit(&credit(10, u32::MAX - 10));
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn credit_guest_data_beyond_advertised_buffer_is_refused() {
        let (mut c, _peer) = conn();
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..4 {
            // The host takes nothing (no flush): the buffer fills to CONN_BUF.
            c.push_from_guest(&chunk).unwrap();
        }
        assert_eq!(c.to_host_len(), CONN_BUF as usize);
        assert_eq!(c.push_from_guest(&[1]), Err(CreditViolation));
    }

    #[test]
    fn credit_flush_moves_fwd_cnt_and_asks_for_an_update_when_low() {
        let (mut c, mut peer) = conn();
        let chunk = vec![1u8; 64 * 1024];
        for _ in 0..4 {
            c.push_from_guest(&chunk).unwrap();
        }
        c.flush_to_host().unwrap();
        let moved = c.fwd_cnt;
        assert!(moved > 0, "the socket buffer took some bytes");
        assert_eq!(c.to_host_len() + moved as usize, CONN_BUF as usize);
        assert_ne!(c.pending & pending::CREDIT_UPDATE, 0);
        let mut sink = vec![0u8; CONN_BUF as usize];
        let mut got = 0;
        while got < CONN_BUF as usize {
            got += peer.read(&mut sink).unwrap();
            c.flush_to_host().unwrap();
        }
        assert_eq!(c.fwd_cnt, CONN_BUF);
        let h = c.header(
            ConnKey {
                local_port: 1,
                peer_port: 2,
            },
            3,
            op::CREDIT_UPDATE,
            0,
        );
        assert_eq!(h.fwd_cnt, CONN_BUF);
        assert_eq!(
            c.pending & pending::CREDIT_UPDATE,
            0,
            "sent with the header"
        );
        assert_eq!(c.guest_credit_left(), CONN_BUF);
    }

    #[test]
    fn credit_small_echoes_do_not_trigger_updates() {
        let (mut c, _peer) = conn();
        for _ in 0..100 {
            c.push_from_guest(b"ping").unwrap();
            c.flush_to_host().unwrap();
        }
        assert_eq!(c.pending & pending::CREDIT_UPDATE, 0);
    }

    #[test]
    fn preamble_goes_first_and_is_not_guest_credit() {
        let (mut c, mut peer) = conn();
        c.push_preamble(b"OK 5\n");
        c.push_from_guest(b"data").unwrap();
        c.flush_to_host().unwrap();
        let mut buf = [0u8; 16];
        let n = peer.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"OK 5\ndata");
        assert_eq!(c.fwd_cnt, 4);
    }
}
