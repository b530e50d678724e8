//! virtio-vsock: host<->guest stream sockets, the host side made of Unix domain
//! sockets in the VMM's userspace (no vhost-vsock needed on the host).

pub mod connection;
pub mod device;
pub mod packet;

pub use device::Vsock;
