//! The entropy device.

use std::sync::atomic::Ordering;

use virtio_queue::QueueT;
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;

use crate::devices::virtio::{
    device_type, ActivateContext, ActivateError, DeviceMetrics, VirtioDevice, Watch,
    VIRTIO_RING_F_INDIRECT_DESC,
};

const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per request: bounds the work one guest request causes.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;
/// Most bytes handed out per wake-up: the device thread is shared with the other
/// devices, so a guest asking for entropy without pause must not starve them.
pub const MAX_WAKEUP_BYTES: u32 = 256 * 1024;
/// Most requests served per wake-up (zero-length ones cost a little too).
pub const MAX_WAKEUP_REQUESTS: u32 = 64;

use crate::devices::virtio::SingleQueue as Active;

/// The device.
pub struct Rng {
    active: Option<Active>,
    metrics: DeviceMetrics,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl Rng {
    /// An inactive device.
    pub fn new() -> Self {
        Self {
            active: None,
            metrics: DeviceMetrics::default(),
        }
    }

    /// Serves available requests up to the per-wake-up budget; returns whether any
    /// was completed. When the budget runs out with requests left, the queue's
    /// notifier is re-armed so the event loop comes back after the other devices.
    fn process_queue(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let mut used_any = false;
        let mut buf = Vec::new();
        let (mut bytes_left, mut requests_left) = (MAX_WAKEUP_BYTES, MAX_WAKEUP_REQUESTS);
        // pop_descriptor_chain stops at the avail index the guest published; each
        // chain's walk is bounded by the queue size (virtio-queue's ttl).
        loop {
            if bytes_left == 0 || requests_left == 0 {
                let published = a.queue.avail_idx(&a.mem, Ordering::Acquire);
                if published.is_ok_and(|idx| idx.0 != a.queue.next_avail()) {
                    let _ = a.queue_event.write(1);
                }
                break;
            }
            let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) else {
                break;
            };
            requests_left -= 1;
            let head = chain.head_index();
            let mut written: u32 = 0;
            let mut malformed = false;
            for desc in chain {
                if !desc.is_write_only() {
                    malformed = true;
                    break;
                }
                let room = (MAX_REQUEST_BYTES - written).min(bytes_left);
                let len = desc.len().min(room);
                if len == 0 {
                    break;
                }
                buf.resize(len as usize, 0);
                if fill_random(&mut buf).is_err() {
                    DeviceMetrics::inc(&self.metrics.errors);
                    break;
                }
                if a.mem.write_slice(&buf, desc.addr()).is_err() {
                    malformed = true;
                    break;
                }
                written += len;
                bytes_left -= len;
            }
            if malformed {
                DeviceMetrics::inc(&self.metrics.malformed);
            }
            // A malformed chain is still returned, with what was written, so the
            // guest does not wait forever for it.
            if a.queue.add_used(&a.mem, head, written).is_err() {
                DeviceMetrics::inc(&self.metrics.malformed);
                continue;
            }
            DeviceMetrics::inc(&self.metrics.requests);
            DeviceMetrics::add(&self.metrics.bytes, u64::from(written));
            used_any = true;
        }
        if used_any && a.queue.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
            DeviceMetrics::inc(&self.metrics.interrupts);
        }
        used_any
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn kind(&self) -> &'static str {
        "rng"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<Vec<Watch>, ActivateError> {
        let (active, watch) = Active::from_context(ctx)?;
        self.active = Some(active);
        Ok(vec![watch])
    }

    fn process_event(&mut self, _source: u32, _events: EventSet) {
        if let Some(a) = &self.active {
            a.ack_notification();
        }
        self.process_queue();
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(Active::queue_states)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::Interrupt;
    use std::sync::Arc;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;
    use vm_memory::GuestMemoryMmap;
    use vmm_sys_util::eventfd::EventFd;

    const VIRTQ_DESC_F_NEXT: u16 = 1;
    const VIRTQ_DESC_F_WRITE: u16 = 2;

    fn activate(
        rng: &mut Rng,
        mem: &GuestMemoryMmap,
        q: &MockSplitQueue<GuestMemoryMmap>,
    ) -> EventFd {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ctx = ActivateContext {
            mem: mem.clone(),
            queues: vec![q.create_queue::<Queue>().unwrap()],
            queue_events: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            acked_features: 0,
        };
        assert_eq!(rng.activate(ctx).unwrap().len(), 1);
        irq
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    #[test]
    fn rng_fills_writable_buffers_and_interrupts() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        q.add_desc_chains(
            &[
                desc(0x8000, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1),
                desc(0x9000, 48, VIRTQ_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let mut rng = Rng::new();
        let irq = activate(&mut rng, &m, &q);
        rng.process_event(0, EventSet::IN);
        let used = q.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len(), 64);
        assert_eq!(q.used().idx().load(), 1);
        let mut out = [0u8; 48];
        m.read_slice(&mut out, GuestAddress(0x9000)).unwrap();
        assert_ne!(out, [0u8; 48], "random bytes arrived");
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rng.metrics().snapshot("rng").bytes, 64);
    }

    #[test]
    fn rng_read_only_descriptor_is_malformed_but_completed() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        q.add_desc_chains(&[desc(0x8000, 16, 0, 0)], 0).unwrap();
        let mut rng = Rng::new();
        activate(&mut rng, &m, &q);
        rng.process_event(0, EventSet::IN);
        assert_eq!(q.used().idx().load(), 1, "the guest gets its buffer back");
        assert_eq!(q.used().ring().ref_at(0).unwrap().load().len(), 0);
        assert_eq!(rng.metrics().snapshot("rng").malformed, 1);
    }

    #[test]
    fn rng_buffer_outside_memory_and_giant_lengths_are_bounded() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        q.add_desc_chains(
            &[
                desc(0xffff_ffff_0000, 4096, VIRTQ_DESC_F_WRITE, 0),
                desc(0x8000, u32::MAX, VIRTQ_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let mut rng = Rng::new();
        activate(&mut rng, &m, &q);
        rng.process_event(0, EventSet::IN);
        assert_eq!(q.used().idx().load(), 2);
        assert_eq!(q.used().ring().ref_at(0).unwrap().load().len(), 0);
        let second = q.used().ring().ref_at(1).unwrap().load().len();
        assert!(
            second == 0 || second == MAX_REQUEST_BYTES,
            "capped at {MAX_REQUEST_BYTES}, got {second}"
        );
        assert!(rng.metrics().snapshot("rng").malformed >= 1);
    }

    #[test]
    fn rng_flood_is_served_in_budgeted_slices_and_rearms_its_notifier() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap();
        let q = MockSplitQueue::new(&m, 256);
        // 200 requests of 64 KiB: 12.5 MiB asked for in one notification.
        let descs: Vec<_> = (0..200u64)
            .map(|i| {
                desc(
                    0x10_0000 + i * 0x1_0000,
                    MAX_REQUEST_BYTES,
                    VIRTQ_DESC_F_WRITE,
                    0,
                )
            })
            .collect();
        q.add_desc_chains(&descs, 0).unwrap();
        let notifier = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut rng = Rng::new();
        let ctx = ActivateContext {
            mem: m.clone(),
            queues: vec![q.create_queue::<Queue>().unwrap()],
            queue_events: vec![notifier.try_clone().unwrap()],
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            acked_features: 0,
        };
        rng.activate(ctx).unwrap();
        rng.process_event(0, EventSet::IN);
        let served = rng.metrics().snapshot("rng");
        assert_eq!(served.bytes, u64::from(MAX_WAKEUP_BYTES), "one slice only");
        assert_eq!(notifier.read().unwrap(), 1, "re-armed for the rest");
        let mut wakeups = 1;
        while rng.metrics().snapshot("rng").requests < 200 {
            rng.process_event(0, EventSet::IN);
            wakeups += 1;
            assert!(wakeups < 100, "no progress");
        }
        assert_eq!(q.used().idx().load(), 200);
        assert_eq!(rng.metrics().snapshot("rng").bytes, 200 * 64 * 1024);
        assert_eq!(wakeups, 200 * 64 / 256, "every wake-up served a full slice");
        let _ = notifier.read();
        rng.process_event(0, EventSet::IN);
        assert!(
            notifier.read().is_err(),
            "not re-armed once the queue is empty"
        );
    }

    #[test]
    fn rng_events_before_activation_or_after_reset_do_nothing() {
        let mut rng = Rng::new();
        rng.process_event(0, EventSet::IN);
        rng.reset();
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        activate(&mut rng, &m, &q);
        rng.reset();
        rng.process_event(0, EventSet::IN);
        assert_eq!(rng.metrics().snapshot("rng").requests, 0);
    }
}
