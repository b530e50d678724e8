//! Devices a guest talks to through port I/O and MMIO exits, placed on a [`bus::Bus`].
//! Every device implements [`bus::BusDevice`], so a test drives it by calling `read`
//! and `write` directly, without KVM.

pub mod bus;
pub mod legacy;
pub mod virtio;
