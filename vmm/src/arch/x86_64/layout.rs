//! The guest physical address map of an Atoll x86_64 VM.
//!
//! ```text
//! 0x0000_0500  boot GDT (PVH and 64-bit entry), 0x0520 IDT
//! 0x0000_6000  PVH hvm_start_info, module list, memory map
//! 0x0000_7000  Linux zero page (boot_params) for bzImage boot
//! 0x0000_8ff0  initial stack (bzImage)
//! 0x0000_9000  identity page tables (PML4, PDPT, PD) for 64-bit entry
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: the MP table
//! 0x000e_0000  ACPI tables (RSDP first, inside the BIOS scan area)
//! 0x000f_f000  the VM generation ID (16 bytes, reserved)
//! 0x0010_0000  high memory: the kernel, later the initrd at the top of low RAM
//! 0xc000_0000  start of the 32-bit MMIO gap (devices, IOAPIC, LAPIC) up to 4 GiB
//! 0x1_0000_0000 RAM above the gap, when the guest has more than 3 GiB
//! ```

/// Boot GDT.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Boot IDT (empty: interrupts stay off until the kernel sets its own).
pub const BOOT_IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
/// Room for PVH memory map entries before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_ADDR - PVH_MEMMAP_ADDR) / 24) as usize;
/// Linux boot protocol zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4 for the 64-bit entry.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory (512 x 2 MiB = the first GiB, identity mapped).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted (Linux x86 takes 2048 by default; the boot header
/// may say more, the PVH path reads to the NUL).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Extended BIOS data area, where the kernel looks for the MP floating pointer.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory.
pub const EBDA_END: u64 = 0xa0000;
/// ACPI tables; the RSDP sits in the 0xe0000..0x100000 area the kernel scans.
pub const ACPI_START: u64 = 0xe0000;
/// End of the BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// The VM generation ID: 16 bytes in the last page of the (reserved) BIOS area; the
/// ACPI tables end before it.
pub const VMGENID_ADDR: u64 = 0xf_f000;
/// The GSI of the ACPI generic event device that tells the guest the generation ID
/// changed (ISA range, edge-triggered, unused by anything else).
pub const GED_GSI: u32 = 3;
/// Start of high memory, where kernels load.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// IOAPIC MMIO base (in-kernel irqchip).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC MMIO base (in-kernel irqchip).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM's three-page TSS area (needed on Intel, harmless elsewhere).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// Number of IOAPIC pins (GSIs) of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u8 = 24;

/// First virtio-mmio register window; device n sits at `+ n * 4 KiB`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// GSIs for virtio devices: the ISA range above the UART's (edge-triggered by
/// default in both the MP table and ACPI, which suits irqfd pulses).
pub const VIRTIO_GSIS: std::ops::RangeInclusive<u32> = 5..=15;

/// The legacy IRQ of the first serial port.
pub const SERIAL_IRQ: u32 = 4;
/// The first serial port.
pub const SERIAL_PORT: u16 = 0x3f8;

// The fixed boot regions must not overlap; checked when compiling.
const _: () = {
    assert!(BOOT_IDT_ADDR + 8 <= PVH_INFO_ADDR);
    assert!(PVH_MODLIST_ADDR + 32 <= PVH_MEMMAP_ADDR);
    assert!(PVH_MEMMAP_MAX_ENTRIES >= 8);
    assert!(ZERO_PAGE_ADDR + 4096 <= BOOT_STACK_POINTER + 16);
    assert!(PD_ADDR + 4096 <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(ACPI_START < VMGENID_ADDR && VMGENID_ADDR + 16 <= BIOS_END);
};

/// One entry of the E820 map given to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved.
pub const E820_RESERVED: u32 = 2;

/// The guest RAM ranges for `mem_size` bytes: everything below the MMIO gap, the rest
/// above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// The E820 map the guest sees: conventional memory, the EBDA and BIOS area reserved,
/// high memory, and RAM above 4 GiB when there is any.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: EBDA_END - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: ACPI_START,
            size: BIOS_END - ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

/// The end of usable RAM below the MMIO gap.
pub fn low_mem_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_guest_has_low_and_high_ram_and_reserved_bios() {
        let map = e820_map(128 << 20);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 0xe0000,
                size: 0x20000,
                kind: E820_RESERVED
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: 0x100000,
                size: (128 << 20) - 0x100000,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn e820_large_guest_splits_around_mmio_gap() {
        let mem = 4u64 << 30;
        let map = e820_map(mem);
        let last = map.last().copied().unwrap();
        assert_eq!(last.addr, MMIO_GAP_END);
        assert_eq!(last.size, mem - MMIO_GAP_START);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // All RAM but the legacy hole between the EBDA and 1 MiB is usable.
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
        assert_eq!(
            ram_ranges(mem),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem - MMIO_GAP_START)]
        );
    }
}
