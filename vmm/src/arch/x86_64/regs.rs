//! Boot-time vCPU register state for the two entry protocols we support:
//! - **PVH** (ELF `vmlinux` with a PVH note): 32-bit protected mode, paging off,
//!   flat segments, `%ebx` = address of `hvm_start_info`.
//! - **Linux 64-bit boot protocol** (bzImage): long mode on identity-mapped page
//!   tables covering the first GiB, `%rsi` = address of the zero page.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_GDT_ADDR, BOOT_IDT_ADDR, BOOT_STACK_POINTER, PDPT_ADDR, PD_ADDR, PML4_ADDR, PVH_INFO_ADDR,
    ZERO_PAGE_ADDR,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH 32-bit entry at this address.
    Pvh(u64),
    /// 64-bit Linux boot protocol entry at this address.
    Linux64(u64),
}

/// Why a register image could not be written to guest memory.
#[derive(Debug, thiserror::Error)]
pub enum BootStateError {
    /// Writing the GDT, IDT or page tables to guest memory failed.
    #[error("cannot write {what} to guest memory")]
    WriteTable {
        /// Which table.
        what: &'static str,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// A GDT descriptor from its flags (access byte and granularity nibble as one
/// 16-bit value, in the `0xG0AA` form), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The `kvm_segment` KVM wants for GDT entry `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        // A page-granular limit counts 4 KiB pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// The boot GDT: null, code, data, TSS. The code segment is 64-bit for the Linux
/// entry and 32-bit for PVH.
pub fn boot_gdt(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Pvh(_) => gdt_entry(0xc09b, 0, 0xfffff),
        EntryMode::Linux64(_) => gdt_entry(0xa09b, 0, 0xfffff),
    };
    [
        gdt_entry(0, 0, 0),
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

fn write_tables(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<[u64; 4], BootStateError> {
    let gdt = boot_gdt(mode);
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_ADDR + i as u64 * 8))
            .map_err(|source| BootStateError::WriteTable {
                what: "the GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_ADDR))
        .map_err(|source| BootStateError::WriteTable {
            what: "the IDT",
            source,
        })?;
    Ok(gdt)
}

/// Identity-maps the first GiB with 2 MiB pages for the 64-bit entry.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootStateError> {
    let err = |source| BootStateError::WriteTable {
        what: "the boot page tables",
        source,
    };
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))
        .map_err(err)?;
    mem.write_obj(PD_ADDR | 0x3, GuestAddress(PDPT_ADDR))
        .map_err(err)?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8))
            .map_err(err)?;
    }
    Ok(())
}

/// Special registers for `mode`, starting from the vCPU's current ones. Writes the
/// GDT, IDT (and page tables for 64-bit) into guest memory.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, BootStateError> {
    let gdt = write_tables(mem, mode)?;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);

    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match mode {
        EntryMode::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64(_) => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    Ok(sregs)
}

/// General registers at the entry point.
pub fn boot_regs(mode: EntryMode) -> kvm_regs {
    match mode {
        EntryMode::Pvh(entry) => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: PVH_INFO_ADDR,
            ..Default::default()
        },
        EntryMode::Linux64(entry) => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_ADDR,
            ..Default::default()
        },
    }
}

/// The x87/SSE state after `FNINIT` with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *byte as std::os::raw::c_char;
    }
}

/// Local APIC: LINT0 delivers ExtINT (the PIC), LINT1 delivers NMI, as firmware
/// leaves them.
pub fn configure_lapic(state: &mut kvm_lapic_state) {
    let set_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, set_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, set_mode(lvt1, APIC_MODE_NMI));
}

/// The TSS types of a 64-bit TSS descriptor.
const TSS_AVAILABLE: u8 = 9;
const TSS_BUSY: u8 = 11;

/// True when the CPUID leaf 0 vendor of `cpuid` is AMD ("AuthenticAMD").
pub fn is_amd(cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> bool {
    cpuid.iter().any(|e| {
        e.function == 0
            && e.index == 0
            && e.ebx == 0x6874_7541
            && e.edx == 0x6974_6e65
            && e.ecx == 0x444d_4163
    })
}

/// Prepares saved segment state for KVM_SET_SREGS on AMD SVM. KVM reports TR as busy
/// whatever the VMCB holds (svm_get_segment sets the busy bit), so a restore writes
/// a busy TSS into the VMCB. AMD hardware ignores the TR type once loaded, but an
/// emulated SVM (QEMU, our nested node) checks the I/O permission bitmap only
/// against an available TSS and raises #GP, so after a restore every `out` from
/// user space (PID 1's exit port, with ioperm) faults. An available type is what
/// the CPU itself caches after LTR; Intel VMX, which requires busy, never comes here.
pub fn svm_restorable_tr(sregs: &mut kvm_sregs) {
    if sregs.tr.type_ == TSS_BUSY {
        sregs.tr.type_ = TSS_AVAILABLE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn gdt_entry_roundtrips_through_segment() {
        let code64 = gdt_entry(0xa09b, 0, 0xfffff);
        let s = segment_from_gdt(code64, 1);
        assert_eq!(
            (s.selector, s.l, s.db, s.g, s.present, s.s),
            (8, 1, 0, 1, 1, 1)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.type_, 0xb);
        let code32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn pvh_sregs_are_protected_mode_without_paging() {
        let m = mem();
        let s = boot_sregs(&m, EntryMode::Pvh(0x1000000), kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_eq!(s.efer, 0);
        assert_eq!(s.cs.db, 1);
        let gdt1: u64 = m.read_obj(GuestAddress(BOOT_GDT_ADDR + 8)).unwrap();
        assert_eq!(gdt1, gdt_entry(0xc09b, 0, 0xfffff));
        let r = boot_regs(EntryMode::Pvh(0x1000000));
        assert_eq!((r.rip, r.rbx), (0x1000000, PVH_INFO_ADDR));
    }

    #[test]
    fn long_mode_sregs_identity_map_first_gib() {
        let m = mem();
        let s = boot_sregs(&m, EntryMode::Linux64(0x100200), kvm_sregs::default()).unwrap();
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!(s.cs.l, 1);
        let pde: u64 = m.read_obj(GuestAddress(PD_ADDR + 511 * 8)).unwrap();
        assert_eq!(pde, (511 << 21) | 0x83);
        assert_eq!(boot_regs(EntryMode::Linux64(0x100200)).rsi, ZERO_PAGE_ADDR);
    }

    #[test]
    fn lapic_lint0_extint_lint1_nmi() {
        let mut st = kvm_lapic_state::default();
        set_lapic_reg(&mut st, APIC_LVT0, 0x10000 | 0x700);
        configure_lapic(&mut st);
        assert_eq!(lapic_reg(&st, APIC_LVT0), 0x10000 | (APIC_MODE_EXTINT << 8));
        assert_eq!(lapic_reg(&st, APIC_LVT1), APIC_MODE_NMI << 8);
    }

    #[test]
    fn svm_restore_marks_a_busy_tss_available_and_amd_is_told_by_vendor() {
        let mut s = kvm_sregs::default();
        s.tr.type_ = 11;
        svm_restorable_tr(&mut s);
        assert_eq!(s.tr.type_, 9);
        s.tr.type_ = 3;
        svm_restorable_tr(&mut s);
        assert_eq!(s.tr.type_, 3, "only a busy 64-bit TSS changes");
        let amd = kvm_bindings::kvm_cpuid_entry2 {
            function: 0,
            ebx: u32::from_le_bytes(*b"Auth"),
            edx: u32::from_le_bytes(*b"enti"),
            ecx: u32::from_le_bytes(*b"cAMD"),
            ..Default::default()
        };
        let intel = kvm_bindings::kvm_cpuid_entry2 {
            function: 0,
            ebx: u32::from_le_bytes(*b"Genu"),
            edx: u32::from_le_bytes(*b"ineI"),
            ecx: u32::from_le_bytes(*b"ntel"),
            ..Default::default()
        };
        assert!(is_amd(&[amd]));
        assert!(!is_amd(&[intel]));
    }
}
