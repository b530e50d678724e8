//! virtio-rng: one request queue; every writable buffer the guest posts is filled
//! from the host's `getrandom(2)`.

pub mod device;

pub use device::Rng;
