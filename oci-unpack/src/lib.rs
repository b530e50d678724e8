//! `atoll_oci_unpack`: OCI image layers applied to a directory, exactly (whiteouts,
//! opaque directories, ownership, modes, xattrs) and confined to it (hostile paths,
//! links and sizes refused).
//!
//! Shared by `atoll-image` (which converts images to VM disks on the host) and
//! `atoll-init` (whose agent unpacks layers inside the guest), so it stays small: no
//! registry, TLS or progress-bar dependencies, only tar, gzip, zstd and sha256.
//!
//! - [`digest`]: `sha256:` content digests, hashing readers and writers.
//! - [`unpack`]: the layer applier and the decompression it needs.

pub mod digest;
pub mod unpack;
