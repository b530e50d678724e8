//! Parsing one virtio-blk request out of a descriptor chain.
//!
//! Everything here comes from the guest and is checked before the device touches
//! the disk: the 16-byte header must be readable, the status byte must be the last
//! writable byte, device-readable buffers must come before device-writable ones,
//! the data must sit in the direction the request type implies, whole sectors,
//! inside the disk, and at most [`MAX_DATA_BYTES`] in [`SEG_MAX`] segments. The
//! layout is otherwise free (virtio 1.x drivers may split or merge buffers as they
//! like), so the chain is read as two byte streams, the readable and the writable.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Bytes in a virtio-blk sector (fixed by the spec, whatever the block size).
pub const SECTOR_SIZE: u64 = 512;
/// Most data segments in one request (config `seg_max`).
pub const SEG_MAX: u32 = 128;
/// Largest data segment (config `size_max`).
pub const SIZE_MAX: u32 = 64 * 1024;
/// Most data bytes one request may move: bounds the work a single guest request
/// causes on the device thread.
pub const MAX_DATA_BYTES: u32 = SEG_MAX * SIZE_MAX;
/// Most descriptors walked per chain: data segments plus header and status, with a
/// little room for drivers that split them.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 4;
/// Largest discard / write-zeroes range, in sectors (1 GiB: large enough for
/// mkfs, small enough to bound one fallocate).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;
/// Bytes of the `GET_ID` answer.
pub const ID_BYTES: usize = 20;
/// Size of one discard / write-zeroes segment.
pub const DISCARD_SEGMENT_BYTES: u32 = 16;

/// Request types (virtio 1.x §5.2.6).
pub mod request_type {
    /// Read from the disk.
    pub const IN: u32 = 0;
    /// Write to the disk.
    pub const OUT: u32 = 1;
    /// Make earlier writes durable.
    pub const FLUSH: u32 = 4;
    /// The device's serial number.
    pub const GET_ID: u32 = 8;
    /// Sectors the driver no longer needs.
    pub const DISCARD: u32 = 11;
    /// Zero a range of sectors.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed.
    pub const IOERR: u8 = 1;
    /// The request type is not supported.
    pub const UNSUPP: u8 = 2;
}

/// Size of the request header (`struct virtio_blk_outhdr`: le32 type, le32
/// reserved, le64 sector).
pub const HEADER_BYTES: u32 = 16;

/// One discard or write-zeroes range (`struct virtio_blk_discard_write_zeroes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscardSegment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Bit 0: unmap (write-zeroes may deallocate).
    pub flags: u32,
}

/// A guest buffer: start and length, checked to lie in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// What the request asks for, with its data buffers.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes from `sector` into `data`.
    In {
        /// First sector.
        sector: u64,
        /// Guest buffers to fill, in order.
        data: Vec<Segment>,
    },
    /// Write `data` to the disk at `sector`.
    Out {
        /// First sector.
        sector: u64,
        /// Guest buffers to write, in order.
        data: Vec<Segment>,
    },
    /// fdatasync.
    Flush,
    /// Write the serial into `data` (up to [`ID_BYTES`]).
    GetId {
        /// Guest buffers to fill.
        data: Vec<Segment>,
    },
    /// Deallocate the range.
    Discard(DiscardSegment),
    /// Zero the range.
    WriteZeroes(DiscardSegment),
    /// A type the device does not implement: answered with UNSUPP.
    Unsupported(u32),
}

/// A request ready to run.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Data bytes the request moves.
    pub fn data_len(&self) -> u64 {
        match &self.kind {
            RequestKind::In { data, .. }
            | RequestKind::Out { data, .. }
            | RequestKind::GetId { data } => data.iter().map(|s| u64::from(s.len)).sum(),
            _ => 0,
        }
    }
}

/// Why a chain is not a valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseRequestError {
    /// No writable byte for the status (or it is outside guest memory): the chain
    /// can only be returned with length 0.
    #[error("the chain has no writable status byte")]
    NoStatus,
    /// More descriptors than [`MAX_DESCRIPTORS`].
    #[error("the chain has too many descriptors")]
    TooManyDescriptors,
    /// A descriptor points outside guest memory.
    #[error("a descriptor points outside guest memory")]
    OutsideMemory,
    /// A readable descriptor follows a writable one.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// Fewer than 16 readable bytes.
    #[error("the request header is missing or short")]
    ShortHeader,
    /// Data in the wrong direction for the request type.
    #[error("a data buffer has the wrong direction for the request type")]
    WrongDirection,
    /// Data not a whole number of sectors.
    #[error("the data length is not a multiple of 512")]
    PartialSector,
    /// More data than [`MAX_DATA_BYTES`] or more segments than [`SEG_MAX`].
    #[error("the request is larger than the device allows")]
    TooLarge,
    /// sector + length beyond the disk (or overflowing).
    #[error("the request reaches beyond the end of the disk")]
    BeyondCapacity,
    /// A discard / write-zeroes payload that is not exactly one segment, or has
    /// unknown flags.
    #[error("the discard or write-zeroes payload is invalid")]
    BadDiscard,
}

/// Stands for a writable buffer outside guest memory: it cannot hold the status.
const UNUSABLE: Segment = Segment {
    addr: GuestAddress(u64::MAX),
    len: 0,
};

/// Splits `segs` into the first `n` bytes and the rest (a buffer may be cut).
fn split_front(segs: &[Segment], n: u32) -> Option<(Vec<Segment>, Vec<Segment>)> {
    let mut front = Vec::new();
    let mut back = Vec::new();
    let mut need = n;
    for s in segs {
        if need == 0 {
            back.push(*s);
        } else if s.len <= need {
            front.push(*s);
            need -= s.len;
        } else {
            front.push(Segment {
                addr: s.addr,
                len: need,
            });
            // Cannot overflow: the whole segment was checked to lie in guest memory.
            back.push(Segment {
                addr: s.addr.unchecked_add(u64::from(need)),
                len: s.len - need,
            });
            need = 0;
        }
    }
    (need == 0).then_some((front, back))
}

fn gather(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), ParseRequestError> {
    let mut off = 0usize;
    for s in segs {
        let end = off + s.len as usize;
        mem.read_slice(&mut buf[off..end], s.addr)
            .map_err(|_| ParseRequestError::OutsideMemory)?;
        off = end;
    }
    Ok(())
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Checks an IN/OUT range against the disk and the device limits.
fn check_rw(sector: u64, data: &[Segment], capacity: u64) -> Result<(), ParseRequestError> {
    let len = total(data);
    if data.len() > SEG_MAX as usize || len > u64::from(MAX_DATA_BYTES) {
        return Err(ParseRequestError::TooLarge);
    }
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(ParseRequestError::PartialSector);
    }
    match sector.checked_add(len / SECTOR_SIZE) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(ParseRequestError::BeyondCapacity),
    }
}

/// The outcome of parsing: a request, or an error and (when one exists) where its
/// status byte goes.
pub type Parsed = Result<Request, (ParseRequestError, Option<GuestAddress>)>;

/// Parses a chain given as `(addr, len, device_writable)` descriptors, in chain
/// order, against a disk of `capacity` sectors.
pub fn parse<I>(mem: &GuestMemoryMmap, descriptors: I, capacity: u64) -> Parsed
where
    I: IntoIterator<Item = (GuestAddress, u32, bool)>,
{
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut order_broken = false;
    let mut outside = false;
    let mut too_many = false;
    // Past MAX_DESCRIPTORS only the last writable buffer is remembered, so even an
    // over-long chain (whose walk virtio-queue bounds) gets its status byte.
    let mut last_writable_beyond: Option<Segment> = None;
    for (i, (addr, len, write)) in descriptors.into_iter().enumerate() {
        if len == 0 {
            continue;
        }
        let inside = mem.check_range(addr, len as usize);
        let seg = Segment { addr, len };
        if i >= MAX_DESCRIPTORS {
            too_many = true;
            if write {
                last_writable_beyond = Some(if inside { seg } else { UNUSABLE });
            }
            continue;
        }
        if !inside {
            outside = true;
            // An unusable last buffer must not be taken for the status byte.
            if write {
                writable.push(UNUSABLE);
            }
            continue;
        }
        if write {
            writable.push(seg);
        } else {
            if !writable.is_empty() {
                order_broken = true;
            }
            readable.push(seg);
        }
    }
    if let Some(seg) = last_writable_beyond {
        writable.push(seg);
    }
    // The status byte is the last writable byte of the chain.
    let status = match writable.pop() {
        Some(last) if last.len > 0 => {
            let status = last.addr.unchecked_add(u64::from(last.len) - 1);
            if last.len > 1 {
                writable.push(Segment {
                    addr: last.addr,
                    len: last.len - 1,
                });
            }
            status
        }
        _ => return Err((ParseRequestError::NoStatus, None)),
    };
    let fail = |e| Err((e, Some(status)));
    if too_many {
        return fail(ParseRequestError::TooManyDescriptors);
    }
    if outside {
        return fail(ParseRequestError::OutsideMemory);
    }
    if order_broken {
        return fail(ParseRequestError::ReadableAfterWritable);
    }
    let Some((header_segs, readable)) = split_front(&readable, HEADER_BYTES) else {
        return fail(ParseRequestError::ShortHeader);
    };
    let mut raw = [0u8; HEADER_BYTES as usize];
    if let Err(e) = gather(mem, &header_segs, &mut raw) {
        return fail(e);
    }
    let request_type = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes([
        raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
    ]);
    let kind = match request_type {
        request_type::IN => {
            if !readable.is_empty() {
                return fail(ParseRequestError::WrongDirection);
            }
            if let Err(e) = check_rw(sector, &writable, capacity) {
                return fail(e);
            }
            RequestKind::In {
                sector,
                data: writable,
            }
        }
        request_type::OUT => {
            if !writable.is_empty() {
                return fail(ParseRequestError::WrongDirection);
            }
            if let Err(e) = check_rw(sector, &readable, capacity) {
                return fail(e);
            }
            RequestKind::Out {
                sector,
                data: readable,
            }
        }
        request_type::FLUSH => {
            if !readable.is_empty() || !writable.is_empty() {
                return fail(ParseRequestError::WrongDirection);
            }
            RequestKind::Flush
        }
        request_type::GET_ID => {
            if !readable.is_empty() {
                return fail(ParseRequestError::WrongDirection);
            }
            if writable.len() > SEG_MAX as usize {
                return fail(ParseRequestError::TooLarge);
            }
            RequestKind::GetId { data: writable }
        }
        t @ (request_type::DISCARD | request_type::WRITE_ZEROES) => {
            if !writable.is_empty() {
                return fail(ParseRequestError::WrongDirection);
            }
            // We announce max_discard_seg = max_write_zeroes_seg = 1.
            if total(&readable) != u64::from(DISCARD_SEGMENT_BYTES) {
                return fail(ParseRequestError::BadDiscard);
            }
            let mut raw = [0u8; DISCARD_SEGMENT_BYTES as usize];
            if let Err(e) = gather(mem, &readable, &mut raw) {
                return fail(e);
            }
            let seg = DiscardSegment {
                sector: u64::from_le_bytes([
                    raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
                ]),
                num_sectors: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
                flags: u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]),
            };
            // Only WRITE_ZEROES knows a flag (unmap); discard has none.
            let known_flags = if t == request_type::WRITE_ZEROES {
                1
            } else {
                0
            };
            if seg.flags & !known_flags != 0 || seg.num_sectors > MAX_DISCARD_SECTORS {
                return fail(ParseRequestError::BadDiscard);
            }
            match seg.sector.checked_add(u64::from(seg.num_sectors)) {
                Some(end) if end <= capacity => {}
                _ => return fail(ParseRequestError::BeyondCapacity),
            }
            if t == request_type::DISCARD {
                RequestKind::Discard(seg)
            } else {
                RequestKind::WriteZeroes(seg)
            }
        }
        other => RequestKind::Unsupported(other),
    };
    Ok(Request { kind, status })
}
