//! virtio devices over the virtio-mmio transport (virtio 1.x, modern layout).
//!
//! [`mmio::MmioTransport`] is the only piece that knows the register layout; every
//! device implements [`VirtioDevice`] and never sees the transport. After the driver
//! sets DRIVER_OK the transport hands the device its queues, the guest memory and an
//! [`Interrupt`]; from then on the device is driven by [`event_loop::EventLoop`]
//! through the file descriptors it asked to be watched (queue notification eventfds
//! that KVM signals on guest writes, and backend fds).
//!
//! Everything the guest writes is hostile: descriptor chains are walked with
//! virtio-queue (bounded), lengths are checked, malformed requests are counted in
//! the device's metrics and answered with an error, never a panic.

pub mod block;
pub mod event_loop;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod rng;
pub mod vsock;

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// virtio device IDs.
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// Feature bit every modern device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// The driver may use descriptors pointing at indirect tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Used/available event index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the status register the driver reads and acks, and
/// the irqfd that raises the GSI.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Tells the driver that used buffers are ready.
    pub fn signal_used_queue(&self) {
        self.signal(INT_VRING);
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config_change(&self) {
        self.signal(INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        // A full eventfd counter means an interrupt is pending anyway.
        let _ = self.irqfd.write(1);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets status bits from a snapshot, re-raising the line if any is set (the
    /// irqchip's state says whether the guest already saw it).
    pub fn restore(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, configured and ready, in index order.
    pub queues: Vec<Queue>,
    /// One notification eventfd per queue (KVM signals it on a QueueNotify write).
    pub queue_events: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// Wrong number of queues.
    #[error("the device needs {expected} queues, the driver set up {given}")]
    QueueCount {
        /// Needed.
        expected: usize,
        /// Given.
        given: usize,
    },
    /// A backend resource failed.
    #[error("the device backend failed: {0}")]
    Backend(#[source] std::io::Error),
}

/// A file descriptor a device wants watched, and the source id it will be told.
#[derive(Debug, Clone, Copy)]
pub struct Watch {
    /// The fd (owned by the device, which keeps it open while active).
    pub fd: RawFd,
    /// The id passed back to [`VirtioDevice::process_event`].
    pub source: u32,
    /// Readiness of interest.
    pub events: EventSet,
}

/// A device's handle on the event loop, for fds it opens while running (a vsock
/// device's host connections): the same epoll and device index the transport uses
/// for the watches [`VirtioDevice::activate`] returns.
#[derive(Clone)]
pub struct Watcher {
    epoll: Arc<Epoll>,
    index: u32,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("index", &self.index)
            .finish()
    }
}

impl Watcher {
    /// Watches on `epoll` for the device the event loop knows as `index`.
    pub fn new(epoll: Arc<Epoll>, index: u32) -> Self {
        Self { epoll, index }
    }

    /// Starts watching `w.fd`; the device will be called with `w.source`.
    pub fn add(&self, w: Watch) -> std::io::Result<()> {
        let data = (u64::from(self.index) << 32) | u64::from(w.source);
        self.epoll
            .ctl(ControlOperation::Add, w.fd, EpollEvent::new(w.events, data))
    }

    /// Stops watching `fd` (call before closing it).
    pub fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// The one queue of a single-queue device (block, rng) and what serving it needs.
#[derive(Debug)]
pub struct SingleQueue {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queue.
    pub queue: Queue,
    /// Its notification eventfd.
    pub queue_event: EventFd,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
}

impl SingleQueue {
    /// Takes the only queue out of `ctx` (event-index suppression on if the driver
    /// accepted it) and the watch `activate` returns for it.
    pub fn from_context(mut ctx: ActivateContext) -> Result<(Self, Watch), ActivateError> {
        if ctx.queues.len() != 1 || ctx.queue_events.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                given: ctx.queues.len(),
            });
        }
        let mut queue = ctx.queues.remove(0);
        queue.set_event_idx(ctx.acked_features & VIRTIO_RING_F_EVENT_IDX != 0);
        let queue_event = ctx.queue_events.remove(0);
        let watch = Watch {
            fd: queue_event.as_raw_fd(),
            source: 0,
            events: EventSet::IN,
        };
        let single = Self {
            mem: ctx.mem,
            queue,
            queue_event,
            interrupt: ctx.interrupt,
        };
        Ok((single, watch))
    }

    /// The queue's state.
    pub fn queue_states(&self) -> Vec<QueueState> {
        vec![self.queue.state()]
    }

    /// Drains the notification counter. Call it before looking at the ring, so a
    /// notification that arrives meanwhile is not lost.
    pub fn ack_notification(&self) {
        let _ = self.queue_event.read();
    }
}

/// Counters every device keeps. Guest misbehaviour shows up in `malformed`.
#[derive(Debug, Default)]
pub struct DeviceMetrics {
    /// Requests (descriptor chains) completed.
    pub requests: AtomicU64,
    /// Bytes moved to or from the guest.
    pub bytes: AtomicU64,
    /// Requests that failed on the host side.
    pub errors: AtomicU64,
    /// Descriptor chains or requests that violated the spec.
    pub malformed: AtomicU64,
    /// Interrupts raised.
    pub interrupts: AtomicU64,
    /// A gauge: connections open now (vsock: guest connections and host clients
    /// still sending their `CONNECT` line; 0 for other devices).
    pub open: AtomicU64,
}

/// A copy of [`DeviceMetrics`] for JSON.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceMetricsSnapshot {
    /// Device kind.
    pub kind: &'static str,
    /// Requests completed.
    pub requests: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Host-side failures.
    pub errors: u64,
    /// Spec violations by the guest.
    pub malformed: u64,
    /// Interrupts raised.
    pub interrupts: u64,
    /// Connections open now (vsock).
    pub open: u64,
}

impl DeviceMetrics {
    /// Copies the counters.
    pub fn snapshot(&self, kind: &'static str) -> DeviceMetricsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DeviceMetricsSnapshot {
            kind,
            requests: l(&self.requests),
            bytes: l(&self.bytes),
            errors: l(&self.errors),
            malformed: l(&self.malformed),
            interrupts: l(&self.interrupts),
            open: l(&self.open),
        }
    }

    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A virtio device, whatever its transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID ([`device_type`]).
    fn device_type(&self) -> u32;
    /// A short name for logs and metrics ("block", "rng", ...).
    fn kind(&self) -> &'static str;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered ([`VIRTIO_F_VERSION_1`] is added by the transport).
    fn device_features(&self) -> u64;
    /// Reads the device configuration space at `offset`. Out-of-range bytes read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Called once by the transport with the device's [`Watcher`], for devices that
    /// watch fds they open after activation. Most devices ignore it.
    fn set_watcher(&mut self, _watcher: Watcher) {}
    /// Starts serving: the device keeps `ctx` and returns the fds to watch.
    fn activate(&mut self, ctx: ActivateContext) -> Result<Vec<Watch>, ActivateError>;
    /// One watched fd is ready.
    fn process_event(&mut self, source: u32, events: EventSet);
    /// The driver reset the device: drop the queues and stop serving. The transport
    /// has already unwatched every fd that `activate` returned; fds the device
    /// watched itself (through its [`Watcher`]) it unwatches before closing them.
    fn reset(&mut self);
    /// Counters.
    fn metrics(&self) -> &DeviceMetrics;
    /// The queues as the device has advanced them (empty while not activated): the
    /// device, not the transport, owns them once the driver is running.
    fn queue_states(&self) -> Vec<QueueState>;
    /// Called once after the device was activated from a snapshot, before the guest
    /// runs again (a vsock device tells the guest its connections are gone).
    fn restored(&mut self) {}
    /// Serve another backing file from now on, with another id (block devices; the
    /// others refuse); returns its size in bytes. The driver learns of it through a
    /// configuration change.
    fn swap_backing(&mut self, _file: std::fs::File, _id: Option<&str>) -> std::io::Result<u64> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("a {} device has no backing file", self.kind()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_sets_status_bits_and_ack_clears_them() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Interrupt::new(evt.try_clone().unwrap());
        irq.signal_used_queue();
        irq.signal_config_change();
        assert_eq!(irq.status(), INT_VRING | INT_CONFIG);
        assert_eq!(evt.read().unwrap(), 2, "each signal pulses the irqfd");
        irq.ack(INT_VRING);
        assert_eq!(irq.status(), INT_CONFIG);
    }
}
