//! `atoll_node`: run KVM workloads where a real KVM is, for Atoll's end-to-end tests
//! and benchmarks.
//!
//! On a host whose `/dev/kvm` is hardware KVM, a command simply runs there. On hosts
//! like our CI machines (KVM-PVM, which cannot boot a standard guest kernel; see
//! `shared/notes/platform.md`) it runs inside the **nested node**: an L1 Linux (Debian's
//! cloud kernel) booted under QEMU TCG with an emulated AMD SVM CPU, where `kvm-amd`
//! provides a real hardware-virtualisation `/dev/kvm`.
//!
//! - [`place`]: deciding where ([`Where`]);
//! - [`runner`]: the API for tests ([`Runner`]);
//! - [`kernel`]: fetching and caching the node kernel and its KVM modules;
//! - [`initramfs`]: L1's root filesystem (written with atoll-image's cpio writer);
//! - [`node`]: booting L1 and running one command;
//! - [`protocol`]: separating the command's output from console noise;
//! - [`oci`]: test images in OCI layout, and a docker-registry filled with them.

pub mod initramfs;
pub mod kernel;
pub mod node;
pub mod oci;
pub mod place;
pub mod protocol;
pub mod runner;

pub use node::Source;
pub use place::{host_kvm_usable, Where};
pub use runner::{NodeTimings, RunError, RunOutput, Runner};
