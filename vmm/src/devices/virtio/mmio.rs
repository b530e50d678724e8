//! The virtio-mmio transport (virtio 1.x, MMIO version 2): the register file a
//! driver programs, on the MMIO bus, in front of any [`VirtioDevice`].

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};
use vmm_sys_util::eventfd::EventFd;

use super::persist::{QueueSnapshot, TransportState};
use super::{ActivateContext, Interrupt, VirtioDevice, Watcher, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the QueueNotify register (where ioeventfds are registered).
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4c4f_5441; // "ATOL"
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (virtio 1.x §2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is done.
    pub const FEATURES_OK: u32 = 8;
    /// The device needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

/// One virtio device's register file.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    /// Index of the device in the event loop (high 32 bits of epoll data).
    index: u32,
    epoll: Arc<Epoll>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    /// The fds `activate` asked us to watch, unwatched again on reset.
    watched: Vec<RawFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    /// Register accesses that broke the rules (width, alignment, order).
    bad_accesses: Arc<AtomicU64>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("index", &self.index)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Why a transport could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateTransportError {
    /// A queue size is not a power of two in 1..=32768.
    #[error("queue size {0} is invalid")]
    QueueSize(u16),
    /// An eventfd could not be created.
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Why a transport could not take a snapshot's state.
#[derive(Debug, thiserror::Error)]
pub enum RestoreTransportError {
    /// The saved queues do not match the device.
    #[error("the snapshot has {saved} queues for a {kind} device with {expected}")]
    QueueCount {
        /// Device kind.
        kind: &'static str,
        /// In the snapshot.
        saved: usize,
        /// The device's.
        expected: usize,
    },
    /// A saved queue is not valid for this device and memory.
    #[error("queue {index} of the {kind} device in the snapshot is invalid")]
    BadQueue {
        /// Device kind.
        kind: &'static str,
        /// Queue index.
        index: usize,
    },
    /// The device refused to start again.
    #[error("the {0} device could not be activated from the snapshot")]
    Activate(&'static str),
}

impl MmioTransport {
    /// A transport for `device`, which the event loop knows as `index`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        index: u32,
        epoll: Arc<Epoll>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, CreateTransportError> {
        let sizes: Vec<u16> = {
            let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
            dev.set_watcher(Watcher::new(epoll.clone(), index));
            dev.queue_max_sizes().to_vec()
        };
        let queues = sizes
            .iter()
            .map(|&s| Queue::new(s).map_err(|_| CreateTransportError::QueueSize(s)))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_events = sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(CreateTransportError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            index,
            epoll,
            mem,
            interrupt,
            queues,
            queue_events,
            watched: Vec::new(),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            bad_accesses: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The notification eventfds, in queue order, for ioeventfd registration.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// Counter of register accesses that broke the rules.
    pub fn bad_accesses(&self) -> Arc<AtomicU64> {
        self.bad_accesses.clone()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn bad(&self) {
        self.bad_accesses.fetch_add(1, Ordering::Relaxed);
    }

    fn device_features(&self) -> u64 {
        self.device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .device_features()
            | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Applies `f` to the selected queue while the driver may still configure it.
    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        let configurable =
            self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0;
        match (configurable, self.selected_queue()) {
            (true, Some(q)) => f(q),
            _ => self.bad(),
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self
                .device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .device_type(),
            0x00c => VENDOR_ID,
            0x010 => {
                let f = self.device_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => 0, // ConfigGeneration: our config spaces never change under the driver
            _ => {
                self.bad();
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x014 => self.device_features_sel = value,
            0x020 => {
                if self.status & (status::DRIVER | status::FEATURES_OK) != status::DRIVER {
                    self.bad();
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => self.bad(),
                }
            }
            0x024 => self.driver_features_sel = value,
            0x030 => self.queue_sel = value,
            // virtio-queue ignores sizes that are not a power of two or exceed the
            // maximum; the queue is then invalid and activation refuses it. A value
            // wider than 16 bits is refused here rather than truncated into range.
            0x038 => match u16::try_from(value) {
                Ok(size) => self.with_queue(|q| q.set_size(size)),
                Err(_) => self.bad(),
            },
            0x044 => self.with_queue(|q| q.set_ready(value == 1)),
            0x050 => match self.queue_events.get(value as usize) {
                // Normally KVM's ioeventfd catches this write; this is the fallback.
                Some(evt) if self.status & status::DRIVER_OK != 0 => {
                    let _ = evt.write(1);
                }
                _ => self.bad(),
            },
            0x064 => self.interrupt.ack(value),
            0x070 => self.write_status(value),
            0x080 => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            0x084 => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            0x090 => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            0x094 => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            0x0a0 => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            0x0a4 => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => self.bad(),
        }
    }

    fn write_status(&mut self, value: u32) {
        use status::*;
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // The driver only ever adds bits (§3.1.1), one step at a time.
        if value & old != old {
            self.bad();
            return;
        }
        let added = value & !old;
        match added {
            ACKNOWLEDGE if old == 0 => self.status = value,
            DRIVER if old == ACKNOWLEDGE => self.status = value,
            FEATURES_OK if old == ACKNOWLEDGE | DRIVER => {
                let offered = self.device_features();
                if self.driver_features & !offered == 0
                    && self.driver_features & VIRTIO_F_VERSION_1 != 0
                {
                    self.status = value;
                }
                // Otherwise FEATURES_OK stays clear: the driver reads it back and gives up.
            }
            DRIVER_OK if old == ACKNOWLEDGE | DRIVER | FEATURES_OK => self.activate(value),
            FAILED => self.status = value,
            _ => self.bad(),
        }
    }

    fn activate(&mut self, value: u32) {
        let valid = self
            .queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.mem));
        let events: Result<Vec<EventFd>, _> =
            self.queue_events.iter().map(EventFd::try_clone).collect();
        // The device gets its own copies; the transport keeps the register view.
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let (true, Ok(queue_events), Ok(queues)) = (valid, events, queues) else {
            self.needs_reset();
            return;
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        };
        let result = self
            .device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .activate(ctx);
        match result {
            Ok(watches) => {
                for w in watches {
                    let data = (u64::from(self.index) << 32) | u64::from(w.source);
                    if let Err(e) =
                        self.epoll
                            .ctl(ControlOperation::Add, w.fd, EpollEvent::new(w.events, data))
                    {
                        tracing::error!(
                            "virtio device {}: cannot watch fd {}: {e}",
                            self.index,
                            w.fd
                        );
                    } else {
                        self.watched.push(w.fd);
                    }
                }
                self.status = value;
            }
            Err(e) => {
                tracing::warn!("virtio device {}: activation failed: {e}", self.index);
                self.needs_reset();
            }
        }
    }

    /// The registers and queue positions, for a snapshot (device paused). Once the
    /// driver is running the device owns the queues, so their positions come from it.
    pub fn save_state(&self) -> TransportState {
        let dev = self.device.lock().unwrap_or_else(|p| p.into_inner());
        let active = dev.queue_states();
        let queues = if self.status & status::DRIVER_OK != 0 && active.len() == self.queues.len() {
            active
        } else {
            self.queues.iter().map(|q| q.state()).collect()
        };
        TransportState {
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            queues: queues.into_iter().map(QueueSnapshot::from).collect(),
        }
    }

    /// Tells a device restored and running that its VM is about to run again (see
    /// [`VirtioDevice::restored`]). Call it once the vCPUs' state is back: an
    /// interrupt raised before the LAPICs are restored would be lost with them.
    pub fn restored(&self) {
        if self.status & status::DRIVER_OK != 0 {
            self.device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restored();
        }
    }

    /// Takes a snapshot's registers; a device the driver was running is activated
    /// again with the saved queue positions, without the guest doing anything.
    pub fn restore_state(&mut self, s: &TransportState) -> Result<(), RestoreTransportError> {
        let kind = self.device.lock().unwrap_or_else(|p| p.into_inner()).kind();
        if s.queues.len() != self.queues.len() {
            return Err(RestoreTransportError::QueueCount {
                kind,
                saved: s.queues.len(),
                expected: self.queues.len(),
            });
        }
        for (index, (q, saved)) in self.queues.iter_mut().zip(&s.queues).enumerate() {
            let state = virtio_queue::QueueState::from(*saved);
            *q = match Queue::try_from(state) {
                Ok(q) if q.max_size() == saved.max_size => q,
                _ => return Err(RestoreTransportError::BadQueue { kind, index }),
            };
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(RestoreTransportError::BadQueue { kind, index });
            }
        }
        self.driver_features = s.driver_features;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.interrupt.ack(u32::MAX);
        self.interrupt.restore(s.interrupt_status);
        if s.status & status::DRIVER_OK != 0 && s.status & status::DEVICE_NEEDS_RESET == 0 {
            self.activate(s.status);
            if self.status != s.status {
                return Err(RestoreTransportError::Activate(kind));
            }
        } else {
            self.status = s.status;
        }
        Ok(())
    }

    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    fn reset(&mut self) {
        // Unwatch while the device still holds the fds open: an epoll entry belongs
        // to the open file, so deleting by a number the device has already closed
        // fails and leaves the entry behind (our own dup of a queue notifier keeps
        // the file alive, and the guest could then make the loop spin on it).
        for fd in self.watched.drain(..) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            let dev = self.device.lock().unwrap_or_else(|p| p.into_inner());
            dev.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.bad();
            data.fill(0);
            return;
        }
        let v = self.read_register(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            let mut dev = self.device.lock().unwrap_or_else(|p| p.into_inner());
            dev.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad();
            return;
        };
        if !offset.is_multiple_of(4) {
            self.bad();
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, DeviceMetrics, Watch};
    use std::os::unix::io::AsRawFd;
    use vm_memory::GuestAddress;
    use vmm_sys_util::epoll::EventSet;

    /// A device that records what the transport does to it.
    #[derive(Default)]
    struct Probe {
        activated: Option<(usize, u64)>,
        resets: usize,
        metrics: DeviceMetrics,
        fail_activation: bool,
        /// The queue notifiers it was given (and asks to have watched), as the real
        /// devices keep them.
        notifiers: Vec<EventFd>,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            42
        }
        fn kind(&self) -> &'static str {
            "probe"
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn device_features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 0x10);
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<Vec<Watch>, ActivateError> {
            if self.fail_activation {
                return Err(ActivateError::QueueCount {
                    expected: 3,
                    given: 2,
                });
            }
            self.activated = Some((ctx.queues.len(), ctx.acked_features));
            self.notifiers = ctx.queue_events;
            Ok(self
                .notifiers
                .iter()
                .enumerate()
                .map(|(i, e)| Watch {
                    fd: e.as_raw_fd(),
                    source: i as u32,
                    events: EventSet::IN,
                })
                .collect())
        }
        fn process_event(&mut self, _source: u32, _events: EventSet) {}
        fn reset(&mut self) {
            self.resets += 1;
            self.notifiers.clear();
        }
        fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
            Vec::new()
        }
        fn metrics(&self) -> &DeviceMetrics {
            &self.metrics
        }
    }

    fn transport(probe: Arc<Mutex<Probe>>) -> (MmioTransport, EventFd) {
        transport_on(probe, Arc::new(Epoll::new().unwrap()))
    }

    fn transport_on(probe: Arc<Mutex<Probe>>, epoll: Arc<Epoll>) -> (MmioTransport, EventFd) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            probe,
            0,
            epoll,
            mem,
            Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        )
        .unwrap();
        (t, irq)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Configures queue `sel` with rings inside guest memory.
    fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32) {
        let base = 0x1000 * (1 + u64::from(sel) * 4);
        w(t, 0x030, sel);
        w(t, 0x038, size);
        w(t, 0x080, base as u32);
        w(t, 0x090, (base + 0x1000) as u32);
        w(t, 0x0a0, (base + 0x2000) as u32);
        w(t, 0x044, 1);
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, 0x070, status::ACKNOWLEDGE);
        w(t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        w(t, 0x024, 0);
        w(t, 0x020, features as u32);
        w(t, 0x024, 1);
        w(t, 0x020, (features >> 32) as u32);
        w(
            t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    #[test]
    fn mmio_identifies_as_virtio_v2_with_device_id_and_features() {
        let (mut t, _) = transport(Arc::new(Mutex::new(Probe::default())));
        assert_eq!(r(&mut t, 0x000), MAGIC);
        assert_eq!(r(&mut t, 0x004), 2);
        assert_eq!(r(&mut t, 0x008), 42);
        w(&mut t, 0x014, 0);
        assert_eq!(r(&mut t, 0x010), 1 << 3);
        w(&mut t, 0x014, 1);
        assert_eq!(r(&mut t, 0x010), 1, "VERSION_1 in the high word");
        w(&mut t, 0x030, 1);
        assert_eq!(r(&mut t, 0x034), 8);
        w(&mut t, 0x030, 7);
        assert_eq!(r(&mut t, 0x034), 0, "no such queue");
        let mut cfg = [0u8; 2];
        t.read(0x102, &mut cfg);
        assert_eq!(cfg, [0x12, 0x12]);
    }

    #[test]
    fn mmio_full_negotiation_activates_the_device() {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let (mut t, _) = transport(probe.clone());
        negotiate(&mut t, VIRTIO_F_VERSION_1 | (1 << 3));
        assert_ne!(r(&mut t, 0x070) & status::FEATURES_OK, 0);
        setup_queue(&mut t, 0, 16);
        setup_queue(&mut t, 1, 8);
        w(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_ne!(r(&mut t, 0x070) & status::DRIVER_OK, 0);
        assert_eq!(
            probe.lock().unwrap().activated,
            Some((2, VIRTIO_F_VERSION_1 | (1 << 3)))
        );
        // Queue registers are frozen once the driver is running.
        let bad = t.bad_accesses();
        let before = bad.load(Ordering::Relaxed);
        w(&mut t, 0x038, 4);
        assert_eq!(bad.load(Ordering::Relaxed), before + 1);
        // Writing 0 resets.
        w(&mut t, 0x070, 0);
        assert_eq!(r(&mut t, 0x070), 0);
        assert_eq!(probe.lock().unwrap().resets, 1);
        w(&mut t, 0x030, 0);
        assert_eq!(r(&mut t, 0x044), 0, "queues are reset too");
    }

    #[test]
    fn mmio_reset_unwatches_queue_notifiers_so_a_later_notify_wakes_nobody() {
        let epoll = Arc::new(Epoll::new().unwrap());
        let probe = Arc::new(Mutex::new(Probe::default()));
        let (mut t, _) = transport_on(probe.clone(), epoll.clone());
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16);
        setup_queue(&mut t, 1, 8);
        w(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(probe.lock().unwrap().notifiers.len(), 2);
        let mut events = [EpollEvent::default(); 4];
        // Running: KVM's ioeventfd (the transport's notifier) wakes the loop.
        t.queue_events()[0].write(1).unwrap();
        assert_eq!(epoll.wait(0, &mut events).unwrap(), 1);
        let _ = t.queue_events()[0].read();
        // Status 0, then QueueNotify as a hostile guest would: nothing may be
        // watched any more, or the event loop would spin on an fd nobody drains.
        w(&mut t, 0x070, 0);
        assert_eq!(probe.lock().unwrap().resets, 1);
        t.queue_events()[0].write(1).unwrap();
        t.queue_events()[1].write(1).unwrap();
        assert_eq!(epoll.wait(0, &mut events).unwrap(), 0);
    }

    #[test]
    fn mmio_refuses_features_not_offered_or_without_version_1() {
        let (mut t, _) = transport(Arc::new(Mutex::new(Probe::default())));
        negotiate(&mut t, VIRTIO_F_VERSION_1 | (1 << 5));
        assert_eq!(
            r(&mut t, 0x070) & status::FEATURES_OK,
            0,
            "bit 5 was not offered"
        );
        w(&mut t, 0x070, 0);
        negotiate(&mut t, 1 << 3);
        assert_eq!(
            r(&mut t, 0x070) & status::FEATURES_OK,
            0,
            "legacy drivers are refused"
        );
    }

    #[test]
    fn mmio_invalid_queue_sets_needs_reset_instead_of_activating() {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let (mut t, irq) = transport(probe.clone());
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        // Rings far outside guest memory.
        w(&mut t, 0x030, 0);
        w(&mut t, 0x038, 16);
        w(&mut t, 0x080, 0xffff_0000);
        w(&mut t, 0x084, 0xff);
        w(&mut t, 0x044, 1);
        w(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        let s = r(&mut t, 0x070);
        assert_eq!(s & status::DRIVER_OK, 0);
        assert_ne!(s & status::DEVICE_NEEDS_RESET, 0);
        assert!(probe.lock().unwrap().activated.is_none());
        assert_eq!(irq.read().unwrap(), 1, "config-change interrupt raised");
    }

    #[test]
    fn mmio_failed_activation_needs_reset() {
        let probe = Arc::new(Mutex::new(Probe {
            fail_activation: true,
            ..Default::default()
        }));
        let (mut t, _) = transport(probe);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        w(
            &mut t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_ne!(r(&mut t, 0x070) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn mmio_hostile_accesses_are_ignored_and_counted() {
        let (mut t, _) = transport(Arc::new(Mutex::new(Probe::default())));
        let bad = t.bad_accesses();
        let mut b2 = [0xffu8; 2];
        t.read(0x000, &mut b2);
        assert_eq!(b2, [0, 0], "16-bit register reads see nothing");
        t.write(0x070, &[1, 0]);
        t.write(0x071, &[1, 0, 0, 0]);
        w(&mut t, 0x0f0, 1);
        // Skipping straight to DRIVER_OK, and clearing bits, are refused.
        w(&mut t, 0x070, status::DRIVER_OK);
        w(&mut t, 0x070, status::ACKNOWLEDGE);
        w(&mut t, 0x070, status::DRIVER);
        assert_eq!(r(&mut t, 0x070), status::ACKNOWLEDGE);
        // A queue size that only fits after truncation (0x1_0010 -> 16) is refused,
        // while the queue is configurable and 16 itself would be accepted.
        w(&mut t, 0x070, 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        assert_ne!(r(&mut t, 0x070) & status::FEATURES_OK, 0);
        w(&mut t, 0x030, 0);
        let before = bad.load(Ordering::Relaxed);
        w(&mut t, 0x038, 0x1_0010);
        assert_eq!(bad.load(Ordering::Relaxed), before + 1);
        w(&mut t, 0x038, 16);
        assert_eq!(bad.load(Ordering::Relaxed), before + 1);
        w(&mut t, 0x070, 0);
        w(&mut t, 0x070, status::ACKNOWLEDGE);
        // Queue set-up before FEATURES_OK, and notify before DRIVER_OK.
        w(&mut t, 0x038, 8);
        w(&mut t, 0x050, 0);
        w(&mut t, 0x050, 1000);
        assert!(
            bad.load(Ordering::Relaxed) >= 9,
            "{}",
            bad.load(Ordering::Relaxed)
        );
    }
}
