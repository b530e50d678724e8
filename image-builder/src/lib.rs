//! `atoll_image`: builds what an Atoll pod VM boots.
//!
//! - [`kernel`]: the guest kernel from Debian's `linux-source-6.12`, configured by the
//!   project fragment `kernel/atoll-guest.config`, cached by config hash.
//! - [`initramfs`]: the guest initramfs (atoll-init as `/init`, base directories,
//!   `/dev/console`, extra files), written with our own [`cpio`] newc writer.
//! - [`host`]: host packages the builds need, installed with apt-get when missing.

pub mod cpio;
pub mod host;
pub mod initramfs;
pub mod kernel;
pub mod oci;
