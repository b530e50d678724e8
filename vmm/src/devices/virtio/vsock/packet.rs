//! The virtio-vsock packet header (virtio 1.2 §5.10.6) and the checks every header
//! the guest writes must pass before the device acts on it.

/// Bytes in a header: le64 src_cid, le64 dst_cid, le32 src_port, le32 dst_port,
/// le32 len, le16 type, le16 op, le32 flags, le32 buf_alloc, le32 fwd_cnt.
pub const HDR_SIZE: usize = 44;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// The only socket type served.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload accepted from or sent to the guest in one packet (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// Operations.
pub mod op {
    /// Connect.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection refused or torn down.
    pub const RST: u16 = 3;
    /// The sender stops receiving and/or sending (`flags`).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's buffer space changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks for a CREDIT_UPDATE.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// A decoded header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload bytes that follow the header.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation ([`op`]).
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from this connection so far (wrapping).
    pub fwd_cnt: u32,
}

fn u16_at(b: &[u8; HDR_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; HDR_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HDR_SIZE], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl Header {
    /// Decodes the wire layout (any bytes decode; [`Header::check_from_guest`] judges).
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        Self {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Encodes the wire layout.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks a header the guest put on the tx queue, followed by `payload_room`
    /// readable bytes. `Ok` means the addresses, type, op, flags and length are
    /// acceptable; whether the op suits the connection's state is the device's call.
    pub fn check_from_guest(&self, guest_cid: u64, payload_room: usize) -> Result<(), BadPacket> {
        if self.src_cid != guest_cid {
            return Err(BadPacket::SourceCid(self.src_cid));
        }
        if self.dst_cid != HOST_CID {
            return Err(BadPacket::DestinationCid(self.dst_cid));
        }
        if self.type_ != TYPE_STREAM {
            return Err(BadPacket::Type(self.type_));
        }
        if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&self.op) {
            return Err(BadPacket::Op(self.op));
        }
        if self.len > MAX_PAYLOAD {
            return Err(BadPacket::TooLong(self.len));
        }
        if usize::try_from(self.len).map_or(true, |l| l > payload_room) {
            return Err(BadPacket::Truncated {
                len: self.len,
                room: payload_room,
            });
        }
        if self.op != op::RW && self.len != 0 {
            return Err(BadPacket::PayloadOnControl {
                op: self.op,
                len: self.len,
            });
        }
        if self.op == op::SHUTDOWN && (self.flags & !SHUTDOWN_BOTH != 0 || self.flags == 0) {
            return Err(BadPacket::ShutdownFlags(self.flags));
        }
        Ok(())
    }

    /// Whether a bad packet still names the guest and the host, so that an RST can be
    /// addressed back to the sender (never for an RST: that would ping-pong).
    pub fn deserves_rst(&self, guest_cid: u64) -> bool {
        self.src_cid == guest_cid && self.dst_cid == HOST_CID && self.op != op::RST
    }
}

/// Why a packet from the guest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadPacket {
    /// The descriptor chain cannot be read (outside guest memory, too long).
    #[error("the descriptor chain cannot be read")]
    Chain,
    /// Fewer readable bytes than a header.
    #[error("{0} readable bytes, a header needs {HDR_SIZE}")]
    Short(usize),
    /// The guest claimed another CID.
    #[error("source CID {0} is not the guest's")]
    SourceCid(u64),
    /// Not addressed to the host.
    #[error("destination CID {0} is not the host's (2)")]
    DestinationCid(u64),
    /// Not a stream socket.
    #[error("socket type {0} is not STREAM (1)")]
    Type(u16),
    /// No such operation.
    #[error("operation {0} does not exist")]
    Op(u16),
    /// `len` above [`MAX_PAYLOAD`].
    #[error("payload length {0} exceeds {MAX_PAYLOAD}")]
    TooLong(u32),
    /// `len` beyond the bytes the chain holds.
    #[error("payload length {len}, but the chain holds {room} bytes after the header")]
    Truncated {
        /// Claimed.
        len: u32,
        /// Present.
        room: usize,
    },
    /// Payload on an operation that carries none.
    #[error("operation {op} carries {len} payload bytes")]
    PayloadOnControl {
        /// The operation.
        op: u16,
        /// Its length.
        len: u32,
    },
    /// SHUTDOWN without flags or with unknown ones.
    #[error("SHUTDOWN flags {0:#x} are invalid")]
    ShutdownFlags(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn good() -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len: 10,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_through_the_wire_layout() {
        let h = good();
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[24..28], &10u32.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn header_valid_rw_passes() {
        assert_eq!(good().check_from_guest(GUEST, 10), Ok(()));
    }

    #[test]
    fn header_spoofed_source_cid_is_refused() {
        let h = Header {
            src_cid: 4,
            ..good()
        };
        assert_eq!(h.check_from_guest(GUEST, 10), Err(BadPacket::SourceCid(4)));
        assert!(!h.deserves_rst(GUEST));
    }

    #[test]
    fn header_not_for_the_host_is_refused() {
        let h = Header {
            dst_cid: 5,
            ..good()
        };
        assert_eq!(
            h.check_from_guest(GUEST, 10),
            Err(BadPacket::DestinationCid(5))
        );
    }

    #[test]
    fn header_bad_type_and_op_are_refused_with_rst() {
        let h = Header { type_: 2, ..good() };
        assert_eq!(h.check_from_guest(GUEST, 10), Err(BadPacket::Type(2)));
        assert!(h.deserves_rst(GUEST));
        for bad_op in [0, 8, u16::MAX] {
            let h = Header {
                op: bad_op,
                ..good()
            };
            assert_eq!(h.check_from_guest(GUEST, 10), Err(BadPacket::Op(bad_op)));
        }
    }

    #[test]
    fn header_len_beyond_chain_or_maximum_is_refused() {
        assert_eq!(
            good().check_from_guest(GUEST, 9),
            Err(BadPacket::Truncated { len: 10, room: 9 })
        );
        let h = Header {
            len: u32::MAX,
            ..good()
        };
        assert_eq!(
            h.check_from_guest(GUEST, usize::MAX),
            Err(BadPacket::TooLong(u32::MAX))
        );
    }

    #[test]
    fn header_control_op_with_payload_is_refused() {
        let h = Header {
            op: op::REQUEST,
            ..good()
        };
        assert_eq!(
            h.check_from_guest(GUEST, 10),
            Err(BadPacket::PayloadOnControl {
                op: op::REQUEST,
                len: 10
            })
        );
    }

    #[test]
    fn header_shutdown_needs_known_nonzero_flags() {
        let sd = |flags| Header {
            op: op::SHUTDOWN,
            len: 0,
            flags,
            ..good()
        };
        assert_eq!(
            sd(0).check_from_guest(GUEST, 0),
            Err(BadPacket::ShutdownFlags(0))
        );
        assert_eq!(
            sd(4).check_from_guest(GUEST, 0),
            Err(BadPacket::ShutdownFlags(4))
        );
        assert_eq!(sd(SHUTDOWN_BOTH).check_from_guest(GUEST, 0), Ok(()));
    }

    #[test]
    fn header_rst_never_deserves_an_rst() {
        let h = Header {
            op: op::RST,
            type_: 9,
            ..good()
        };
        assert!(!h.deserves_rst(GUEST));
    }
}
