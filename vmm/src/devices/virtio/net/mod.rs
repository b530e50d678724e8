//! virtio-net: a network card backed by a host tap device.

pub mod device;

pub use device::Net;
