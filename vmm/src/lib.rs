//! atoll-vmm: a purpose-built KVM virtual machine monitor for Atoll pod microVMs.
//!
//! One process runs one VM. [`builder::run`] assembles it: KVM ([`vstate`]), guest
//! memory, the legacy devices on a port bus ([`devices`]), the kernel and firmware
//! tables ([`arch`]), one thread per vCPU; then waits for the guest to report its exit
//! status through the exit port (docs/guest-contract.md).

#![warn(missing_docs)]

pub mod arch;
pub mod builder;
pub mod devices;
pub mod metrics;
pub mod vstate;
