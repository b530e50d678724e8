//! OCI images: a content-addressed store, import from OCI layouts and `docker save`
//! archives, pull from registries, exact and confined unpacking, conversion to VM
//! root filesystem images.

pub mod bench;
pub mod builtin;
pub mod convert;
pub mod import;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod store;

// The layer applier and digests live in `atoll-oci-unpack` (shared with the guest
// agent); re-exported here so `atoll_image::oci::{digest, unpack}` keep working.
pub use atoll_oci_unpack::{digest, unpack};
