//! Snapshot state of a virtio device: the transport's registers and every queue's
//! position, kept in one place, plus the device's configuration (what it was built
//! from). The devices themselves keep no guest-visible state beyond their queues and
//! configuration: block and rng requests complete synchronously, net drops a frame
//! in flight (as a lossy link may), and vsock connections are host resources that a
//! restore cannot bring back, so the guest is told to reset them.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

use crate::builder::DeviceConfig;

/// One virtqueue as the driver configured it and as far as the device got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver marked it ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available entry the device will take.
    pub next_avail: u16,
    /// Next used entry the device will fill.
    pub next_used: u16,
    /// Event-index notification suppression is on.
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
        }
    }
}

/// The virtio-mmio register file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// Device status.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Every queue, in index order.
    pub queues: Vec<QueueSnapshot>,
}

/// A virtio device in a snapshot: what to build, and where its driver was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// The device's configuration (a net device's MAC filled in).
    pub config: DeviceConfig,
    /// Its transport.
    pub transport: TransportState,
}
