//! virtio-vsock: host<->guest sockets, backed by Unix domain sockets on the host.

pub mod device;

pub use device::Vsock;
