//! virtio-vsock: host<->guest sockets, backed by Unix domain sockets on the host.
//!
//! Placeholder until the device lands: construction fails with a clear error.

use std::io;
use std::os::unix::io::RawFd;

use vmm_sys_util::epoll::EventSet;

use crate::devices::virtio::{ActivateContext, ActivateError, DeviceMetrics, VirtioDevice, Watch};

/// The device.
#[derive(Debug, Default)]
pub struct Vsock {
    metrics: DeviceMetrics,
}

impl Vsock {
    /// A device with guest CID `cid` whose host side listens on `uds` (host-initiated `CONNECT <port>`) and connects to `<uds>_<port>` (guest-initiated).
    pub fn new(_cid: u64, _uds: &std::path::Path) -> io::Result<Self> {
        Err(io::Error::other("virtio-vsock is not implemented yet"))
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        crate::devices::virtio::device_type::VSOCK
    }
    fn kind(&self) -> &'static str {
        "vsock"
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
