//! virtio-net: a network card backed by a host tap device.
//!
//! Placeholder until the device lands: construction fails with a clear error.

use std::io;
use std::os::unix::io::RawFd;

use vmm_sys_util::epoll::EventSet;

use crate::devices::virtio::{ActivateContext, ActivateError, DeviceMetrics, VirtioDevice, Watch};

/// The device.
#[derive(Debug, Default)]
pub struct Net {
    metrics: DeviceMetrics,
}

impl Net {
    /// Opens tap device `tap` (created if missing); `mac` is the guest MAC (random when `None`).
    pub fn new(_tap: &str, _mac: Option<[u8; 6]>) -> io::Result<Self> {
        Err(io::Error::other("virtio-net is not implemented yet"))
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        crate::devices::virtio::device_type::NET
    }
    fn kind(&self) -> &'static str {
        "net"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[]
    }
    fn device_features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, _ctx: ActivateContext) -> Result<Vec<Watch>, ActivateError> {
        Err(ActivateError::QueueCount {
            expected: 0,
            given: 0,
        })
    }
    fn process_event(&mut self, _source: u32, _events: EventSet) {}
    fn reset(&mut self) -> Vec<RawFd> {
        Vec::new()
    }
    fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }
}
