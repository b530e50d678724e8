//! virtio-net: a network card backed by a host tap device (`--net tap=NAME`).
//!
//! - [`device`]: the device (queues, frame flow, flow control, configuration space);
//! - [`tap`]: opening the tap (`/dev/net/tun`, virtio header, offloads off).

pub mod device;
pub mod tap;

pub use device::{Net, NetMetrics};
