//! The virtio-net device: queue 0 receives (host → guest), queue 1 transmits
//! (guest → host), frames go through a backend fd that keeps frame boundaries (a tap,
//! or a `SOCK_SEQPACKET` socket in tests), each frame preceded by a 12-byte
//! `virtio_net_hdr_v1`.
//!
//! Offered: `VIRTIO_NET_F_MAC`, `VIRTIO_NET_F_STATUS` (link always up), indirect
//! descriptors. No checksum or segmentation offloads and no mergeable receive
//! buffers: every frame fits one Ethernet MTU-sized chain, and the headers we
//! exchange are all zero (`num_buffers` = 1 on receive). The guest's transmit header
//! is never passed to the host kernel; ours is.
//!
//! Flow control, with the backend watched edge-triggered for IN and OUT:
//! - TX: when the backend answers `EAGAIN`, the chain is put back on the available
//!   ring (the queue's next index goes back by one) and transmission stops until
//!   the backend reports OUT.
//! - RX: a frame is read from the backend only into a host buffer that is then
//!   copied into one available chain. With no chain available the frame stays
//!   pending (nothing else is read, the rest stays queued in the tap) until the
//!   guest posts buffers and notifies the receive queue.
//! - Each event handles at most [`EVENT_BUDGET`] chains or frames, then notifies
//!   itself through the queue's eventfd, so neither side can starve the other or
//!   the other devices of the event loop.
//!
//! Anything wrong in a chain the guest wrote is counted in `malformed` and the chain
//! is completed (used length 0); frames that cannot be delivered are counted in
//! [`NetMetrics`].

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::tap;
use crate::devices::virtio::{
    device_type, ActivateContext, ActivateError, DeviceMetrics, Interrupt, VirtioDevice, Watch,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// Size of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// Largest Ethernet frame moved either way: 64 KiB of payload plus an Ethernet
/// header and a VLAN tag.
pub const MAX_FRAME_LEN: usize = 65550;
/// Largest transmit chain accepted (header + frame).
pub const MAX_CHAIN_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Shortest frame: an Ethernet header.
const MIN_FRAME_LEN: usize = 14;
/// Most guest memory segments one frame may be spread over.
const MAX_SEGMENTS: usize = 256;
/// Chains or frames handled per event before yielding to the event loop.
pub const EVENT_BUDGET: usize = 2 * QUEUE_SIZE as usize;

/// The device has a MAC address in its configuration space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The configuration space has a link status.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_S_LINK_UP: u16 = 1;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// Bytes of configuration space: mac (6), status (2).
const CONFIG_LEN: usize = 8;

/// Event source: the receive queue's notification.
pub const SOURCE_RX_QUEUE: u32 = 0;
/// Event source: the transmit queue's notification.
pub const SOURCE_TX_QUEUE: u32 = 1;
/// Event source: the backend (tap) fd.
pub const SOURCE_BACKEND: u32 = 2;

/// Counters beyond [`DeviceMetrics`]: where frames went.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Their bytes (without the virtio header).
    pub rx_bytes: AtomicU64,
    /// Frames from the backend not delivered: larger than the guest's buffer,
    /// runts, or carrying offloads that were not negotiated.
    pub rx_dropped: AtomicU64,
    /// Times reception stopped because the guest had posted no buffer.
    pub rx_no_buffer: AtomicU64,
    /// Frames written to the backend.
    pub tx_frames: AtomicU64,
    /// Their bytes (without the virtio header).
    pub tx_bytes: AtomicU64,
    /// Transmit chains dropped: malformed, or refused by the backend.
    pub tx_dropped: AtomicU64,
    /// Times the backend was full and transmission waited for it.
    pub tx_would_block: AtomicU64,
}

struct Active {
    mem: GuestMemoryMmap,
    rx_queue: Queue,
    tx_queue: Queue,
    rx_event: EventFd,
    tx_event: EventFd,
    interrupt: Arc<Interrupt>,
}

/// Receive-side state that lives across events.
struct RxState {
    /// Header + frame as read from the backend; one spare byte detects truncation.
    buf: Vec<u8>,
    /// Length of a frame in `buf` that still waits for a guest buffer.
    pending: Option<usize>,
    /// The backend may have frames: not yet read until `EAGAIN` since its last IN.
    readable: bool,
}

/// The device.
pub struct Net {
    backend: OwnedFd,
    name: String,
    mac: [u8; 6],
    active: Option<Active>,
    rx: RxState,
    /// The backend refused a frame with `EAGAIN`; wait for OUT.
    tx_blocked: bool,
    metrics: DeviceMetrics,
    net_metrics: NetMetrics,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("backend", &self.name)
            .field("mac", &format_mac(&self.mac))
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A random locally administered unicast MAC.
fn random_mac() -> io::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    // SAFETY: `mac` is a valid writable buffer of 6 bytes.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != 6 {
        return Err(io::Error::last_os_error());
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    Ok(mac)
}

/// What became of one transmit chain.
enum TxOutcome {
    /// Written; this many frame bytes.
    Sent(usize),
    /// The guest broke the rules: why.
    Malformed(&'static str),
    /// The backend failed.
    Failed(io::Error),
}

/// What became of one receive chain.
enum RxOutcome {
    /// The frame is in the chain; used length.
    Delivered(u32),
    /// The chain is valid but smaller than header + frame.
    TooSmall,
    /// The guest broke the rules: why.
    Malformed(&'static str),
}

impl Net {
    /// Opens tap device `tap` (created if missing); `mac` is the guest MAC (random
    /// when `None`).
    pub fn new(tap: &str, mac: Option<[u8; 6]>) -> io::Result<Self> {
        let tap = tap::open(tap)?;
        let mac = match mac {
            Some(m) => m,
            None => random_mac()?,
        };
        Ok(Self::with_backend(tap.file.into(), tap.name, mac))
    }

    /// A device over tap `name` opened elsewhere and handed over (`file`, attached
    /// with `TUNSETIFF`): how a jailed VMM, in a network namespace of its own,
    /// gets the pod's tap.
    pub fn over_tap(file: std::fs::File, name: &str, mac: Option<[u8; 6]>) -> io::Result<Self> {
        tap::configure(&file, name)?;
        let mac = match mac {
            Some(m) => m,
            None => random_mac()?,
        };
        Ok(Self::with_backend(file.into(), name.to_owned(), mac))
    }

    /// A device over `backend`, any fd that keeps frame boundaries and carries the
    /// 12-byte virtio header: a tap, or a `SOCK_SEQPACKET` socket. It must be
    /// non-blocking.
    pub fn with_backend(backend: OwnedFd, name: String, mac: [u8; 6]) -> Self {
        Self {
            backend,
            name,
            mac,
            active: None,
            rx: RxState {
                buf: vec![0; MAX_CHAIN_LEN + 1],
                pending: None,
                readable: false,
            },
            tx_blocked: false,
            metrics: DeviceMetrics::default(),
            net_metrics: NetMetrics::default(),
        }
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Frame counters.
    pub fn net_metrics(&self) -> &NetMetrics {
        &self.net_metrics
    }

    fn signal(interrupt: &Interrupt, queue: &mut Queue, mem: &GuestMemoryMmap, m: &DeviceMetrics) {
        if queue.needs_notification(mem).unwrap_or(true) {
            interrupt.signal_used_queue();
            DeviceMetrics::inc(&m.interrupts);
        }
    }

    /// Sends every available transmit chain until the ring is empty, the backend
    /// is full or the budget is spent.
    fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if self.tx_blocked {
            return;
        }
        let fd = self.backend.as_raw_fd();
        let (m, nm) = (&self.metrics, &self.net_metrics);
        let mut used_any = false;
        let mut handled = 0;
        loop {
            if handled == EVENT_BUDGET {
                // Come back after the other event sources had their turn.
                let _ = a.tx_event.write(1);
                break;
            }
            let Some(chain) = a.tx_queue.pop_descriptor_chain(&a.mem) else {
                break;
            };
            handled += 1;
            let head = chain.head_index();
            match transmit(fd, &a.mem, chain) {
                TxOutcome::Sent(n) => {
                    DeviceMetrics::inc(&nm.tx_frames);
                    DeviceMetrics::add(&nm.tx_bytes, n as u64);
                    DeviceMetrics::add(&m.bytes, n as u64);
                }
                TxOutcome::Failed(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Keep the frame: the chain is offered again once the backend
                    // has room (edge-triggered OUT).
                    rewind(&mut a.tx_queue);
                    self.tx_blocked = true;
                    DeviceMetrics::inc(&nm.tx_would_block);
                    break;
                }
                TxOutcome::Failed(e) if e.kind() == io::ErrorKind::Interrupted => {
                    rewind(&mut a.tx_queue);
                    continue;
                }
                TxOutcome::Failed(e) => {
                    tracing::debug!("net {}: frame dropped by the backend: {e}", self.name);
                    DeviceMetrics::inc(&m.errors);
                    DeviceMetrics::inc(&nm.tx_dropped);
                }
                TxOutcome::Malformed(why) => {
                    tracing::debug!("net {}: malformed transmit chain: {why}", self.name);
                    DeviceMetrics::inc(&m.malformed);
                    DeviceMetrics::inc(&nm.tx_dropped);
                }
            }
            // Transmit buffers are only read: the used length is 0.
            if a.tx_queue.add_used(&a.mem, head, 0).is_err() {
                DeviceMetrics::inc(&m.malformed);
                continue;
            }
            DeviceMetrics::inc(&m.requests);
            used_any = true;
        }
        if used_any {
            Self::signal(&a.interrupt, &mut a.tx_queue, &a.mem, m);
        }
    }

    /// Moves frames from the backend into receive chains until the backend is
    /// empty, the guest has no buffer left or the budget is spent.
    fn process_rx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let fd = self.backend.as_raw_fd();
        let (m, nm, rx) = (&self.metrics, &self.net_metrics, &mut self.rx);
        let mut used_any = false;
        let mut handled = 0;
        loop {
            if handled == EVENT_BUDGET {
                let _ = a.rx_event.write(1);
                break;
            }
            handled += 1;
            let len = match rx.pending {
                Some(len) => len,
                None if !rx.readable => break,
                None => match read_frame(fd, &mut rx.buf) {
                    Ok(0) => {
                        // A closed peer (socket backends); a tap never reads 0.
                        rx.readable = false;
                        DeviceMetrics::inc(&m.errors);
                        break;
                    }
                    Ok(n) => match check_rx_frame(&rx.buf[..n]) {
                        Ok(()) => {
                            rx.pending = Some(n);
                            n
                        }
                        Err(why) => {
                            tracing::debug!("net {}: backend frame dropped: {why}", self.name);
                            DeviceMetrics::inc(&nm.rx_dropped);
                            continue;
                        }
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        rx.readable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Edge-triggered: the next IN (or a guest notification)
                        // tries again; no busy loop on a broken backend.
                        tracing::warn!("net {}: reading the backend failed: {e}", self.name);
                        rx.readable = false;
                        DeviceMetrics::inc(&m.errors);
                        break;
                    }
                },
            };
            let Some(chain) = a.rx_queue.pop_descriptor_chain(&a.mem) else {
                // The frame waits; the guest's next receive notification resumes.
                DeviceMetrics::inc(&nm.rx_no_buffer);
                break;
            };
            let head = chain.head_index();
            let frame = &rx.buf[VNET_HDR_LEN..len];
            let used_len = match deliver(&a.mem, chain, frame) {
                RxOutcome::Delivered(used) => {
                    rx.pending = None;
                    DeviceMetrics::inc(&nm.rx_frames);
                    DeviceMetrics::add(&nm.rx_bytes, frame.len() as u64);
                    DeviceMetrics::add(&m.bytes, frame.len() as u64);
                    used
                }
                RxOutcome::TooSmall => {
                    // Drop the frame, keep the buffer for the next one.
                    rx.pending = None;
                    rewind(&mut a.rx_queue);
                    DeviceMetrics::inc(&nm.rx_dropped);
                    continue;
                }
                RxOutcome::Malformed(why) => {
                    // The chain is returned empty; the frame tries the next one.
                    tracing::debug!("net {}: malformed receive chain: {why}", self.name);
                    DeviceMetrics::inc(&m.malformed);
                    0
                }
            };
            if a.rx_queue.add_used(&a.mem, head, used_len).is_err() {
                DeviceMetrics::inc(&m.malformed);
                continue;
            }
            DeviceMetrics::inc(&m.requests);
            used_any = true;
        }
        if used_any {
            Self::signal(&a.interrupt, &mut a.rx_queue, &a.mem, m);
        }
    }
}

/// Puts the chain just popped back on the available ring.
fn rewind(queue: &mut Queue) {
    let next = queue.next_avail();
    queue.set_next_avail(next.wrapping_sub(1));
}

/// Reads one frame (header included) from the non-blocking `fd`.
fn read_frame(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Judges a frame (with its header) read from the backend.
fn check_rx_frame(frame: &[u8]) -> Result<(), &'static str> {
    if frame.len() < VNET_HDR_LEN + MIN_FRAME_LEN {
        return Err("shorter than a header and an Ethernet header");
    }
    if frame.len() > MAX_CHAIN_LEN {
        return Err("longer than the largest frame");
    }
    // Offloads are off on the tap; a frame needing them cannot be handed to a guest
    // that did not negotiate them.
    if frame[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 || frame[1] != VIRTIO_NET_HDR_GSO_NONE {
        return Err("the backend used an offload that was not negotiated");
    }
    Ok(())
}

/// Gathers a transmit chain (header + frame) and writes the frame, behind a clean
/// header of ours, to the backend with one `writev` straight from guest memory.
fn transmit(
    fd: RawFd,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> TxOutcome {
    static CLEAN_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];
    let mut slices = Vec::new();
    let mut total: usize = 0;
    let mut skip = VNET_HDR_LEN;
    for desc in chain {
        if desc.is_write_only() {
            return TxOutcome::Malformed("write-only descriptor in a transmit chain");
        }
        let len = desc.len() as usize;
        total = match total.checked_add(len) {
            Some(t) if t <= MAX_CHAIN_LEN => t,
            _ => return TxOutcome::Malformed("frame larger than the maximum"),
        };
        for slice in mem.get_slices(desc.addr(), len) {
            let Ok(slice) = slice else {
                return TxOutcome::Malformed("buffer outside guest memory");
            };
            // The guest's header bytes are checked to be in memory but not sent.
            let drop = skip.min(slice.len());
            skip -= drop;
            let Ok(rest) = slice.offset(drop) else {
                return TxOutcome::Malformed("buffer outside guest memory");
            };
            if rest.is_empty() {
                continue;
            }
            if slices.len() == MAX_SEGMENTS {
                return TxOutcome::Malformed("frame in too many pieces");
            }
            slices.push(rest);
        }
    }
    if total < VNET_HDR_LEN {
        return TxOutcome::Malformed("no virtio header");
    }
    let frame_len = total - VNET_HDR_LEN;
    if frame_len < MIN_FRAME_LEN {
        return TxOutcome::Malformed("no Ethernet frame after the header");
    }
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard()).collect();
    let mut iov = Vec::with_capacity(guards.len() + 1);
    iov.push(libc::iovec {
        iov_base: CLEAN_HDR.as_ptr() as *mut libc::c_void,
        iov_len: VNET_HDR_LEN,
    });
    iov.extend(guards.iter().map(|g| libc::iovec {
        iov_base: g.as_ptr() as *mut libc::c_void,
        iov_len: g.len(),
    }));
    // At most MAX_SEGMENTS + 1 entries.
    let count = iov.len() as libc::c_int;
    // SAFETY: every iovec points at memory valid for reads of its length for the
    // whole call: a static, or guest memory kept mapped by `mem` (borrowed here)
    // through the guards. writev only reads; the guest may change the bytes
    // meanwhile, which changes the frame, not our memory safety.
    let n = unsafe { libc::writev(fd, iov.as_ptr(), count) };
    match usize::try_from(n) {
        Ok(_) => TxOutcome::Sent(frame_len),
        Err(_) => TxOutcome::Failed(io::Error::last_os_error()),
    }
}

/// Copies our header and `frame` into a receive chain.
fn deliver(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &[u8],
) -> RxOutcome {
    let needed = VNET_HDR_LEN + frame.len();
    let mut segments: Vec<(GuestAddress, usize)> = Vec::new();
    let mut capacity: usize = 0;
    for desc in chain {
        if !desc.is_write_only() {
            return RxOutcome::Malformed("read-only descriptor in a receive chain");
        }
        if segments.len() == MAX_SEGMENTS {
            return RxOutcome::Malformed("receive chain in too many pieces");
        }
        let len = desc.len() as usize;
        segments.push((desc.addr(), len));
        capacity = capacity.saturating_add(len);
        if capacity >= needed {
            break;
        }
    }
    if capacity < needed {
        return RxOutcome::TooSmall;
    }
    // No offloads: flags, gso_type and checksum fields are 0; one buffer.
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
    let mut parts = [&hdr[..], frame].into_iter();
    let mut part: &[u8] = &[];
    for (addr, len) in segments {
        let mut addr = addr;
        let mut room = len;
        while room > 0 {
            if part.is_empty() {
                match parts.next() {
                    Some(p) => {
                        part = p;
                        continue;
                    }
                    None => break,
                }
            }
            let n = room.min(part.len());
            if mem.write_slice(&part[..n], addr).is_err() {
                return RxOutcome::Malformed("buffer outside guest memory");
            }
            part = &part[n..];
            room -= n;
            let Some(next) = addr.checked_add(n as u64) else {
                return RxOutcome::Malformed("buffer wraps the address space");
            };
            addr = next;
        }
    }
    // needed <= VNET_HDR_LEN + MAX_FRAME_LEN, far below u32::MAX.
    RxOutcome::Delivered(needed as u32)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn kind(&self) -> &'static str {
        "net"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<Vec<Watch>, ActivateError> {
        if ctx.queues.len() != 2 || ctx.queue_events.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                given: ctx.queues.len(),
            });
        }
        let tx_queue = ctx.queues.remove(1);
        let rx_queue = ctx.queues.remove(0);
        let tx_event = ctx.queue_events.remove(1);
        let rx_event = ctx.queue_events.remove(0);
        let watches = vec![
            Watch {
                fd: rx_event.as_raw_fd(),
                source: SOURCE_RX_QUEUE,
                events: EventSet::IN,
            },
            Watch {
                fd: tx_event.as_raw_fd(),
                source: SOURCE_TX_QUEUE,
                events: EventSet::IN,
            },
            // Edge-triggered: a tap is nearly always writable and may stay readable
            // while the guest has no buffer; level-triggered would spin.
            Watch {
                fd: self.backend.as_raw_fd(),
                source: SOURCE_BACKEND,
                events: EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
            },
        ];
        self.active = Some(Active {
            mem: ctx.mem,
            rx_queue,
            tx_queue,
            rx_event,
            tx_event,
            interrupt: ctx.interrupt,
        });
        // Frames may have queued in the tap before the driver was ready.
        self.rx.readable = true;
        self.rx.pending = None;
        self.tx_blocked = false;
        Ok(watches)
    }

    fn process_event(&mut self, source: u32, events: EventSet) {
        let Some(a) = &self.active else {
            return;
        };
        match source {
            SOURCE_RX_QUEUE => {
                // Drain the counter before looking at the ring so that a
                // notification arriving meanwhile is not lost.
                let _ = a.rx_event.read();
                self.process_rx();
            }
            SOURCE_TX_QUEUE => {
                let _ = a.tx_event.read();
                self.process_tx();
            }
            SOURCE_BACKEND => {
                if events.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
                    self.rx.readable = true;
                    self.process_rx();
                }
                if events.contains(EventSet::OUT) && self.tx_blocked {
                    self.tx_blocked = false;
                    self.process_tx();
                }
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.rx.pending = None;
        self.rx.readable = false;
        self.tx_blocked = false;
        self.active = None;
    }

    fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.rx_queue.state(), a.tx_queue.state()])
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::sync::atomic::Ordering;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// A device over one end of a non-blocking SOCK_SEQPACKET pair; returns the
    /// device and the peer end (the "host network").
    fn net_with_peer() -> (Net, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        // SAFETY: socketpair succeeded; fds[0] is new and owned by nobody else.
        let dev = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: as above, for fds[1].
        let peer = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        (Net::with_backend(dev, "test".into(), MAC), peer)
    }

    struct Rings<'a> {
        rx: MockSplitQueue<'a, GuestMemoryMmap>,
        tx: MockSplitQueue<'a, GuestMemoryMmap>,
        irq: EventFd,
    }

    fn activate<'a>(net: &mut Net, m: &'a GuestMemoryMmap) -> Rings<'a> {
        let rx = MockSplitQueue::create(m, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(m, GuestAddress(0x1000), 16);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ctx = ActivateContext {
            mem: m.clone(),
            queues: vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()],
            queue_events: vec![
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ],
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            acked_features: VIRTIO_NET_F_MAC,
        };
        let watches = net.activate(ctx).unwrap();
        assert_eq!(watches.len(), 3);
        assert!(watches[2].events.contains(EventSet::EDGE_TRIGGERED));
        Rings { rx, tx, irq }
    }

    fn send(fd: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: `bytes` is valid for reads of its length.
        let n = unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        usize::try_from(n)
            .map(|_| ())
            .map_err(|_| io::Error::last_os_error())
    }

    fn recv(fd: &OwnedFd) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_CHAIN_LEN + 16];
        read_frame(fd.as_raw_fd(), &mut buf).ok().map(|n| {
            buf.truncate(n);
            buf
        })
    }

    /// A header (flags/gso as given) followed by `len` frame bytes i, i+1, ...
    fn host_frame(len: usize, flags: u8, gso: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f[0] = flags;
        f[1] = gso;
        f.extend((0..len).map(|i| i as u8));
        f
    }

    fn counter(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn used(q: &MockSplitQueue<GuestMemoryMmap>, i: usize) -> (u32, u32) {
        let e = q.used().ring().ref_at(i).unwrap().load();
        (e.id(), e.len())
    }

    #[test]
    fn net_tx_frame_goes_to_backend_behind_a_clean_header() {
        let m = mem();
        let (mut net, peer) = net_with_peer();
        let r = activate(&mut net, &m);
        // The guest's header has garbage in it; the frame is split over two buffers.
        m.write_slice(&[0xff; VNET_HDR_LEN], GuestAddress(0x8000))
            .unwrap();
        m.write_slice(&[0xaa; 20], GuestAddress(0x8000 + VNET_HDR_LEN as u64))
            .unwrap();
        m.write_slice(&[0xbb; 40], GuestAddress(0x9000)).unwrap();
        r.tx.add_desc_chains(
            &[
                desc(0x8000, VNET_HDR_LEN as u32 + 20, F_NEXT, 1),
                desc(0x9000, 40, 0, 0),
            ],
            0,
        )
        .unwrap();
        net.process_event(SOURCE_TX_QUEUE, EventSet::IN);

        let got = recv(&peer).expect("one frame on the backend");
        assert_eq!(got.len(), VNET_HDR_LEN + 60);
        assert_eq!(
            got[..VNET_HDR_LEN],
            [0; VNET_HDR_LEN],
            "our header, not the guest's"
        );
        assert_eq!(got[VNET_HDR_LEN..VNET_HDR_LEN + 20], [0xaa; 20]);
        assert_eq!(got[VNET_HDR_LEN + 20..], [0xbb; 40]);
        assert_eq!(r.tx.used().idx().load(), 1);
        assert_eq!(used(&r.tx, 0), (0, 0));
        assert_eq!(r.irq.read().unwrap(), 1);
        assert_eq!(counter(&net.net_metrics().tx_frames), 1);
        assert_eq!(counter(&net.net_metrics().tx_bytes), 60);
    }

    #[test]
    fn net_tx_malformed_chains_are_dropped_counted_and_completed() {
        let m = mem();
        let (mut net, peer) = net_with_peer();
        let r = activate(&mut net, &m);
        r.tx.add_desc_chains(
            &[
                // Shorter than the header.
                desc(0x8000, 8, 0, 0),
                // A header and no frame.
                desc(0x8000, VNET_HDR_LEN as u32, 0, 0),
                // A device-writable buffer in a transmit chain.
                desc(0x8000, 100, F_WRITE, 0),
                // Outside guest memory.
                desc(0xffff_ffff_0000, 100, 0, 0),
                // Larger than the biggest frame, in two pieces.
                desc(0x10000, 40000, F_NEXT, 5),
                desc(0x30000, 40000, 0, 0),
            ],
            0,
        )
        .unwrap();
        net.process_event(SOURCE_TX_QUEUE, EventSet::IN);
        assert_eq!(
            r.tx.used().idx().load(),
            5,
            "every chain goes back to the guest"
        );
        assert_eq!(net.metrics().snapshot("net").malformed, 5);
        assert_eq!(counter(&net.net_metrics().tx_dropped), 5);
        assert_eq!(recv(&peer), None, "nothing reached the backend");
    }

    #[test]
    fn net_tx_full_backend_keeps_frame_until_out_event() {
        let m = mem();
        let (mut net, peer) = net_with_peer();
        let r = activate(&mut net, &m);
        // Fill the device's end until the socket refuses more.
        let filler = net.backend.try_clone().unwrap();
        let mut queued = 0;
        while send(&filler, &host_frame(1000, 0, 0)).is_ok() {
            queued += 1;
            assert!(queued < 100_000, "the socket never filled up");
        }
        m.write_slice(&[0xcc; 64], GuestAddress(0x8000 + VNET_HDR_LEN as u64))
            .unwrap();
        r.tx.add_desc_chains(&[desc(0x8000, VNET_HDR_LEN as u32 + 64, 0, 0)], 0)
            .unwrap();
        net.process_event(SOURCE_TX_QUEUE, EventSet::IN);
        assert_eq!(
            r.tx.used().idx().load(),
            0,
            "the chain is kept, not completed"
        );
        assert_eq!(counter(&net.net_metrics().tx_would_block), 1);

        // Another notification while blocked does not retry.
        net.process_event(SOURCE_TX_QUEUE, EventSet::IN);
        assert_eq!(counter(&net.net_metrics().tx_would_block), 1);

        for _ in 0..queued {
            assert_eq!(recv(&peer).unwrap().len(), VNET_HDR_LEN + 1000);
        }
        net.process_event(SOURCE_BACKEND, EventSet::OUT);
        let got = recv(&peer).expect("the kept frame is sent on OUT");
        assert_eq!(got[VNET_HDR_LEN..], [0xcc; 64]);
        assert_eq!(r.tx.used().idx().load(), 1);
        assert_eq!(counter(&net.net_metrics().tx_dropped), 0);
    }

    #[test]
    fn net_rx_frame_is_delivered_with_header_and_interrupt() {
        let m = mem();
        let (mut net, peer) = net_with_peer();
        let r = activate(&mut net, &m);
        r.rx.add_desc_chains(
            &[
                desc(0x8000, 10, F_WRITE | F_NEXT, 1),
                desc(0x9000, 2048, F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        // DATA_VALID (2) from the host is not passed on: GUEST_CSUM was not offered.
        send(&peer, &host_frame(100, 2, 0)).unwrap();
        net.process_event(SOURCE_BACKEND, EventSet::IN);

        assert_eq!(r.rx.used().idx().load(), 1);
        assert_eq!(used(&r.rx, 0), (0, VNET_HDR_LEN as u32 + 100));
        let mut hdr = [0u8; VNET_HDR_LEN];
        m.read_slice(&mut hdr[..10], GuestAddress(0x8000)).unwrap();
        m.read_slice(&mut hdr[10..], GuestAddress(0x9000)).unwrap();
        assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "num_buffers = 1");
        let mut frame = [0u8; 100];
        m.read_slice(&mut frame, GuestAddress(0x9002)).unwrap();
        assert!(frame.iter().enumerate().all(|(i, &b)| b == i as u8));
        assert_eq!(r.irq.read().unwrap(), 1);
        assert_eq!(counter(&net.net_metrics().rx_frames), 1);
    }

    #[test]
    fn net_rx_without_buffers_keeps_frames_until_guest_posts() {
        let m = mem();
        let (mut net, peer) = net_with_peer();
        let r = activate(&mut net, &m);
        send(&peer, &host_frame(50, 0, 0)).unwrap();
        send(&peer, &host_frame(60, 0, 0)).unwrap();
        net.process_event(SOURCE_BACKEND, EventSet::IN);
        assert_eq!(r.rx.used().idx().load(), 0);
        assert_eq!(counter(&net.net_metrics().rx_no_buffer), 1);
        // Another IN while stalled reads nothing more.
        net.process_event(SOURCE_BACKEND, EventSet::IN);

        r.rx.add_desc_chains(
            &[
                desc(0x8000, 2048, F_WRITE, 0),
                desc(0x9000, 2048, F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        net.process_event(SOURCE_RX_QUEUE, EventSet::IN);
        assert_eq!(r.rx.used().idx().load(), 2);
        assert_eq!(used(&r.rx, 0), (0, VNET_HDR_LEN as u32 + 50), "in order");
        assert_eq!(used(&r.rx, 1), (1, VNET_HDR_LEN as u32 + 60));
        assert_eq!(
            counter(&net.net_metrics().rx_dropped),
            0,
            "nothing was lost"
        );
    }

    #[test]
    fn net_rx_frame_larger_than_buffer_is_dropped_and_buffer_reused() {
        let m = mem();
        let (mut net, peer) = net_with_peer();
        let r = activate(&mut net, &m);
        r.rx.add_desc_chains(&[desc(0x8000, 128, F_WRITE, 0)], 0)
            .unwrap();
        send(&peer, &host_frame(1000, 0, 0)).unwrap();
        send(&peer, &host_frame(40, 0, 0)).unwrap();
        net.process_event(SOURCE_BACKEND, EventSet::IN);
        assert_eq!(counter(&net.net_metrics().rx_dropped), 1);
        assert_eq!(r.rx.used().idx().load(), 1);
        assert_eq!(used(&r.rx, 0), (0, VNET_HDR_LEN as u32 + 40));
    }

    #[test]
    fn net_rx_read_only_buffer_is_malformed_and_frame_kept() {
        let m = mem();
        let (mut net, peer) = net_with_peer();
        let r = activate(&mut net, &m);
        r.rx.add_desc_chains(
            &[desc(0x8000, 2048, 0, 0), desc(0x9000, 2048, F_WRITE, 0)],
            0,
        )
        .unwrap();
        send(&peer, &host_frame(70, 0, 0)).unwrap();
        net.process_event(SOURCE_BACKEND, EventSet::IN);
        assert_eq!(r.rx.used().idx().load(), 2);
        assert_eq!(used(&r.rx, 0), (0, 0), "the bad chain comes back empty");
        assert_eq!(
            used(&r.rx, 1),
            (1, VNET_HDR_LEN as u32 + 70),
            "the frame took the next"
        );
        assert_eq!(net.metrics().snapshot("net").malformed, 1);
    }

    #[test]
    fn net_rx_runts_and_offloaded_frames_are_dropped_and_counted() {
        let m = mem();
        let (mut net, peer) = net_with_peer();
        let r = activate(&mut net, &m);
        r.rx.add_desc_chains(&[desc(0x8000, 2048, F_WRITE, 0)], 0)
            .unwrap();
        send(&peer, &host_frame(5, 0, 0)).unwrap();
        send(&peer, &host_frame(100, VIRTIO_NET_HDR_F_NEEDS_CSUM, 0)).unwrap();
        send(&peer, &host_frame(100, 0, 1)).unwrap(); // GSO TCPv4
        send(&peer, &host_frame(30, 0, 0)).unwrap();
        net.process_event(SOURCE_BACKEND, EventSet::IN);
        assert_eq!(counter(&net.net_metrics().rx_dropped), 3);
        assert_eq!(used(&r.rx, 0), (0, VNET_HDR_LEN as u32 + 30));
    }

    #[test]
    fn net_config_space_has_mac_and_link_up() {
        let (net, _peer) = net_with_peer();
        let mut cfg = [0xffu8; 10];
        net.read_config(0, &mut cfg);
        assert_eq!(cfg, [0x02, 0, 0, 0, 0, 0x42, 1, 0, 0, 0]);
        let mut status = [0u8; 2];
        net.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP);
        let mut far = [0xffu8; 4];
        net.read_config(u64::MAX - 1, &mut far);
        assert_eq!(far, [0; 4]);
        assert_eq!(
            net.device_features() & (VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS),
            VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
        );
        assert_eq!(net.queue_max_sizes(), [QUEUE_SIZE, QUEUE_SIZE]);
    }

    #[test]
    fn net_activate_with_one_queue_fails() {
        let m = mem();
        let (mut net, _peer) = net_with_peer();
        let q = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let ctx = ActivateContext {
            mem: m.clone(),
            queues: vec![q.create_queue().unwrap()],
            queue_events: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            acked_features: 0,
        };
        assert!(matches!(
            net.activate(ctx),
            Err(ActivateError::QueueCount {
                expected: 2,
                given: 1
            })
        ));
    }

    #[test]
    fn net_events_before_activation_or_after_reset_do_nothing() {
        let m = mem();
        let (mut net, peer) = net_with_peer();
        send(&peer, &host_frame(40, 0, 0)).unwrap();
        net.process_event(SOURCE_BACKEND, EventSet::IN);
        net.reset();
        let _r = activate(&mut net, &m);
        net.reset();
        net.process_event(SOURCE_BACKEND, EventSet::IN);
        net.process_event(SOURCE_TX_QUEUE, EventSet::IN);
        assert_eq!(net.metrics().snapshot("net").requests, 0);
        assert!(recv(&peer).is_none());
        assert_eq!(
            recv_device_side(&net).map(|f| f.len()),
            Some(VNET_HDR_LEN + 40)
        );
    }

    /// The frame the test wrote is still unread on the device's end.
    fn recv_device_side(net: &Net) -> Option<Vec<u8>> {
        recv(&net.backend)
    }
}
