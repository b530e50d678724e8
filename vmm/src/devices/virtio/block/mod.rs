//! virtio-block: a disk backed by a host file (raw), read-only or read-write.
//!
//! [`request`] turns a descriptor chain into a checked [`request::Request`] (the
//! guest is hostile: every length, direction and sector is validated there);
//! [`device`] runs requests against the file with `pread`/`pwrite` straight into
//! and out of guest memory, and implements [`super::VirtioDevice`].

pub mod device;
pub mod request;

pub use device::{open_disk, Block};
