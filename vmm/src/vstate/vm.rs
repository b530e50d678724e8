//! The KVM VM: guest memory slots, the in-kernel irqchip (PIC + IOAPIC + LAPICs)
//! and PIT, and their snapshot state.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestRam;
use crate::arch::x86_64::layout::KVM_TSS_ADDR;

/// Why the VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateVmError {
    /// KVM_CREATE_VM.
    #[error("KVM refused to create a VM")]
    Create(#[source] kvm_ioctls::Error),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] super::memory::MemoryError),
    /// KVM_SET_USER_MEMORY_REGION.
    #[error("KVM refused guest memory slot {slot}")]
    MemorySlot {
        /// The slot.
        slot: u32,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// TSS, irqchip or PIT set-up.
    #[error("KVM refused to set up {what}")]
    Setup {
        /// What.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Why VM-wide state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
#[error("KVM refused {what}")]
pub struct VmStateError {
    /// Which ioctl.
    pub what: &'static str,
    /// The error.
    #[source]
    pub source: kvm_ioctls::Error,
}

/// VM-wide KVM state: the two PICs, the IOAPIC, the PIT and the kvmclock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: [kvm_irqchip; 3],
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// A VM with its memory.
#[derive(Debug)]
pub struct Vm {
    /// The VM fd.
    pub fd: VmFd,
    /// Guest memory.
    pub ram: GuestRam,
}

impl Vm {
    /// Creates a VM over `ram`, with the irqchip and the PIT.
    pub fn new(kvm: &Kvm, ram: GuestRam) -> Result<Self, CreateVmError> {
        let fd = kvm.create_vm().map_err(CreateVmError::Create)?;
        for (slot, region) in ram.memory.iter().enumerate() {
            let slot = slot as u32;
            let host = ram
                .memory
                .get_host_address(region.start_addr())
                .map_err(|_| CreateVmError::MemorySlot {
                    slot,
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `ram`, which the `Vm`
            // keeps for as long as the VM fd (and so the slot) exists; slots do not
            // overlap because the RAM layout's ranges are disjoint.
            unsafe { fd.set_user_memory_region(desc) }
                .map_err(|source| CreateVmError::MemorySlot { slot, source })?;
        }
        let setup = |what| move |source| CreateVmError::Setup { what, source };
        fd.set_tss_address(KVM_TSS_ADDR).map_err(setup("the TSS"))?;
        fd.create_irq_chip()
            .map_err(setup("the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(setup("the PIT"))?;
        Ok(Self { fd, ram })
    }

    /// Reads the irqchip, PIT and clock state (vCPUs paused).
    pub fn save_state(&self) -> Result<VmState, VmStateError> {
        let err = |what| move |source| VmStateError { what, source };
        let mut irqchips = [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ]
        .map(|chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        });
        for chip in &mut irqchips {
            self.fd.get_irqchip(chip).map_err(err("KVM_GET_IRQCHIP"))?;
        }
        let pit = self.fd.get_pit2().map_err(err("KVM_GET_PIT2"))?;
        let mut clock = self.fd.get_clock().map_err(err("KVM_GET_CLOCK"))?;
        // Only the value travels: flags describe this host's TSC and are refused
        // by KVM_SET_CLOCK.
        clock.flags = 0;
        Ok(VmState {
            irqchips,
            pit,
            clock,
        })
    }

    /// Restores state saved by [`Vm::save_state`] (before any vCPU runs).
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmStateError> {
        let err = |what| move |source| VmStateError { what, source };
        self.fd.set_pit2(&state.pit).map_err(err("KVM_SET_PIT2"))?;
        self.fd
            .set_clock(&state.clock)
            .map_err(err("KVM_SET_CLOCK"))?;
        for chip in &state.irqchips {
            self.fd.set_irqchip(chip).map_err(err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}
