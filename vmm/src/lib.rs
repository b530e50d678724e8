//! atoll-vmm: a purpose-built KVM virtual machine monitor for Atoll pod microVMs.
//!
//! One process runs one VM. [`builder`] assembles it, booted fresh or restored
//! from a snapshot: KVM ([`vstate`]), guest memory, the legacy devices on a port bus
//! and the virtio devices on the MMIO bus ([`devices`]), the kernel and firmware
//! tables ([`arch`]), one thread per vCPU. The result is a [`vmm::Vmm`], which runs
//! until the guest reports its exit status (docs/guest-contract.md) and in the
//! meantime serves the control API ([`api`]): pause, resume, snapshot ([`persist`]),
//! stop, metrics.

#![warn(missing_docs)]

pub mod api;
pub mod arch;
pub mod builder;
pub mod devices;
pub mod jail;
pub mod metrics;
pub mod persist;
pub mod seccomp;
pub mod vmm;
pub mod vstate;
