//! virtio-block: a disk backed by a host file (raw), read-only or read-write.

pub mod device;

pub use device::Block;
