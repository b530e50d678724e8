//! virtio-block: a disk backed by a host file (raw), read-only or read-write.
//!
//! Placeholder until the device lands: construction fails with a clear error.

use std::io;
use std::os::unix::io::RawFd;

use vmm_sys_util::epoll::EventSet;

use crate::devices::virtio::{ActivateContext, ActivateError, DeviceMetrics, VirtioDevice, Watch};

/// The device.
#[derive(Debug, Default)]
pub struct Block {
    metrics: DeviceMetrics,
}

impl Block {
    /// Opens `path` (read-only when `read_only`); `id` is what VIRTIO_BLK_T_GET_ID returns.
    pub fn new(_path: &std::path::Path, _read_only: bool, _id: Option<String>) -> io::Result<Self> {
        Err(io::Error::other("virtio-block is not implemented yet"))
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        crate::devices::virtio::device_type::BLOCK
    }
    fn kind(&self) -> &'static str {
        "block"
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
