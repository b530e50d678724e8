//! OCI images: a content-addressed store, import from OCI layouts and `docker save`
//! archives, pull from registries, exact and confined unpacking, conversion to VM
//! root filesystem images.

pub mod bench;
pub mod builtin;
pub mod convert;
pub mod digest;
pub mod import;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod store;
pub mod unpack;
