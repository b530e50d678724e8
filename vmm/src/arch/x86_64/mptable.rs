//! The Intel MultiProcessor Specification 1.4 table: how a guest booted without ACPI
//! (`acpi=off`) finds its CPUs, the IOAPIC and the ISA interrupt routing.
//!
//! Written byte by byte (little endian) rather than through packed structs: no unsafe,
//! and the tests read the same offsets back.

use super::layout::{IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR};

/// Most vCPUs an MP table (8-bit APIC ids, one id kept for the IOAPIC) can describe.
pub const MAX_CPUS: u8 = 254;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

/// Why an MP table could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    /// The vCPU count is outside 1..=254.
    #[error("an MP table describes 1 to {MAX_CPUS} vCPUs, not {0}")]
    TooManyCpus(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// Builds the MP floating pointer followed by the configuration table, to be written
/// at guest physical address `base` (the EBDA).
pub fn build(base: u64, num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus; // APIC ids 0..num_cpus belong to the vCPUs.
    let table_addr = base + FLOATING_LEN as u64;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.push(0u8); // processor entry
        entries.push(cpu); // local APIC id
        entries.push(APIC_VERSION);
        entries.push(if cpu == 0 { 0b11 } else { 0b01 }); // enabled, BSP
        entries.extend_from_slice(&0x0000_0600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x0000_0201u32.to_le_bytes()); // FPU + APIC
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The IOAPIC.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ n -> IOAPIC pin n, as KVM's default GSI routing has it.
    for irq in 0..IOAPIC_PINS.min(16) {
        entries.extend_from_slice(&[3, 0 /* INT */]);
        entries.extend_from_slice(&0u16.to_le_bytes()); // conforms to the bus
        entries.extend_from_slice(&[0 /* bus */, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 is ExtINT (the PIC), LINT1 is NMI, on every local APIC.
    for (kind, lint) in [(3u8 /* ExtINT */, 0u8), (1 /* NMI */, 1)] {
        entries.extend_from_slice(&[4, kind]);
        entries.extend_from_slice(&0u16.to_le_bytes());
        entries.extend_from_slice(&[0, 0, 0xff, lint]);
        count += 1;
    }

    let table_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&u16::try_from(table_len).unwrap_or(u16::MAX).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"ATOLL   ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    // The table lives below 1 MiB, so its address fits in 32 bits.
    out.extend_from_slice(&u32::try_from(table_addr).unwrap_or(0).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(4); // spec revision
    out.push(0); // checksum, below
    out.extend_from_slice(&[0u8; 5]); // feature bytes: a configuration table is present
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn mptable_checksums_are_zero() {
        let t = build(0x9fc00, 4).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let len = u16::from_le_bytes([t[16 + 4], t[16 + 5]]) as usize;
        assert_eq!(len, t.len() - 16);
        assert_eq!(&t[16..20], b"PCMP");
        assert_eq!(sum(&t[16..]), 0);
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0x9fc10);
    }

    #[test]
    fn mptable_has_one_processor_entry_per_vcpu_and_bsp_first() {
        let t = build(0x9fc00, 3).unwrap();
        let entries = &t[16 + HEADER_LEN..];
        let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
        // 3 CPUs + bus + IOAPIC + 16 IRQs + 2 local interrupts.
        assert_eq!(count, 3 + 1 + 1 + 16 + 2);
        for cpu in 0..3u8 {
            let e = &entries[cpu as usize * 20..][..20];
            assert_eq!(e[0], 0);
            assert_eq!(e[1], cpu);
            assert_eq!(e[3] & 1, 1, "enabled");
            assert_eq!(e[3] & 2 != 0, cpu == 0, "only cpu 0 is the BSP");
        }
        let ioapic = &entries[3 * 20 + 8..][..8];
        assert_eq!(ioapic[0], 2);
        assert_eq!(ioapic[1], 3, "IOAPIC id follows the vCPU ids");
        assert_eq!(
            u32::from_le_bytes(ioapic[4..8].try_into().unwrap()),
            IOAPIC_ADDR
        );
    }

    #[test]
    fn mptable_rejects_zero_or_too_many_cpus() {
        assert_eq!(build(0, 0), Err(MpTableError::TooManyCpus(0)));
        assert_eq!(build(0, 255), Err(MpTableError::TooManyCpus(255)));
        assert!(build(0, 254).is_ok());
    }
}
