//! The KVM VM: guest memory slots, the in-kernel irqchip (PIC + IOAPIC + LAPICs)
//! and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::{self, KVM_TSS_ADDR};

/// Why the VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateVmError {
    /// KVM_CREATE_VM.
    #[error("KVM refused to create a VM")]
    Create(#[source] kvm_ioctls::Error),
    /// Allocating guest memory.
    #[error("cannot allocate {mib} MiB of guest memory")]
    Memory {
        /// Size asked for.
        mib: u64,
        /// The error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
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

/// A VM with its memory.
#[derive(Debug)]
pub struct Vm {
    /// The VM fd.
    pub fd: VmFd,
    /// Guest memory.
    pub memory: GuestMemoryMmap,
}

impl Vm {
    /// Creates a VM with `mem_size` bytes of RAM, the irqchip and the PIT.
    pub fn new(kvm: &Kvm, mem_size: u64) -> Result<Self, CreateVmError> {
        let fd = kvm.create_vm().map_err(CreateVmError::Create)?;
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_size)
            .into_iter()
            .map(|(start, len)| (GuestAddress(start), len as usize))
            .collect();
        let memory =
            GuestMemoryMmap::from_ranges(&ranges).map_err(|source| CreateVmError::Memory {
                mib: mem_size >> 20,
                source,
            })?;
        for (slot, region) in memory.iter().enumerate() {
            let slot = slot as u32;
            let host = memory.get_host_address(region.start_addr()).map_err(|_| {
                CreateVmError::MemorySlot {
                    slot,
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                }
            })?;
            // Back guest RAM with transparent huge pages where the host allows:
            // one 2 MiB fault instead of 512 small ones, and 2 MiB stage-2
            // mappings (TLB reach), as other VMMs do. Advice only: failure is fine.
            // SAFETY: `host..host+len` is exactly the mapping `memory` owns;
            // MADV_HUGEPAGE changes no contents and no validity.
            let _ = unsafe {
                libc::madvise(
                    host.cast::<libc::c_void>(),
                    region.len() as usize,
                    libc::MADV_HUGEPAGE,
                )
            };
            let desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which the `Vm`
            // keeps for as long as the VM fd (and so the slot) exists; slots do not
            // overlap because `ram_ranges` returns disjoint ranges.
            unsafe { fd.set_user_memory_region(desc) }
                .map_err(|source| CreateVmError::MemorySlot { slot, source })?;
        }
        fd.set_tss_address(KVM_TSS_ADDR)
            .map_err(|source| CreateVmError::Setup {
                what: "the TSS",
                source,
            })?;
        fd.create_irq_chip()
            .map_err(|source| CreateVmError::Setup {
                what: "the in-kernel irqchip",
                source,
            })?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(|source| CreateVmError::Setup {
            what: "the PIT",
            source,
        })?;
        Ok(Self { fd, memory })
    }
}
