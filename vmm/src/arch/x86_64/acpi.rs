//! ACPI tables for the guest, built with `acpi_tables`: RSDP → XSDT → {FADT → DSDT,
//! MADT}. The platform is "hardware reduced" (no PM timer, no SCI, no legacy fixed
//! hardware), like other microVMs; the DSDT describes the legacy devices we do have,
//! and later the virtio-mmio devices.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR, SERIAL_IRQ, SERIAL_PORT};

const OEM_ID: [u8; 6] = *b"ATOLL ";
const OEM_TABLE_ID: [u8; 8] = *b"ATOLLVMM";
const OEM_REVISION: u32 = 1;

/// The tables, laid out for one guest physical base address.
#[derive(Debug)]
pub struct AcpiTables {
    /// Where the RSDP (and the blob) starts.
    pub rsdp_addr: u64,
    /// All tables, back to back, to be written at `rsdp_addr`.
    pub bytes: Vec<u8>,
}

/// Why ACPI tables could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// vCPU count out of range for 8-bit APIC ids.
    #[error("ACPI MADT entries take 1 to 254 vCPUs, not {0}")]
    BadCpuCount(u8),
    /// The tables do not fit in the space the layout gives them.
    #[error("ACPI tables need {needed} bytes but only {room} are reserved")]
    TooLarge {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        room: usize,
    },
}

/// A device that the DSDT announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsdtDevice {
    /// A virtio-mmio register window with its GSI (Linux matches `LNRO0005`).
    VirtioMmio {
        /// MMIO base.
        base: u32,
        /// Window size.
        size: u32,
        /// GSI (edge-triggered, active high: raised through an irqfd).
        irq: u32,
        /// Index, for the device name and `_UID`.
        index: u8,
    },
    /// The VM generation ID (`_HID` VMGENCTR; `ADDR` names the 16 bytes at `addr`)
    /// and the generic event device (ACPI0013) whose interrupt `gsi` makes the guest
    /// re-read it (its `_EVT` notifies the ID device, 0x80).
    VmGenId {
        /// Guest-physical address of the 16-byte ID.
        addr: u64,
        /// The GED's interrupt.
        gsi: u32,
    },
    /// A 16550 UART at an I/O port with an ISA IRQ.
    Serial {
        /// First port.
        port: u16,
        /// ISA IRQ.
        irq: u32,
        /// `_UID`.
        uid: u8,
    },
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// The DSDT: one `Device` per legacy device under `\_SB_`.
pub fn dsdt(devices: &[DsdtDevice]) -> Vec<u8> {
    let mut body = Vec::new();
    for dev in devices {
        match *dev {
            DsdtDevice::Serial { port, irq, uid } => {
                let name = format!("COM{uid}");
                let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
                let uid = aml::Name::new("_UID".into(), &uid);
                let io = aml::IO::new(port, port, 1, 8);
                let int = aml::Interrupt::new(true, true, false, false, irq);
                let crs_tmpl = aml::ResourceTemplate::new(vec![&io, &int]);
                let crs = aml::Name::new("_CRS".into(), &crs_tmpl);
                let device = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]);
                device.to_aml_bytes(&mut body);
            }
            DsdtDevice::VmGenId { addr, gsi } => {
                let hid = aml::Name::new("_HID".into(), &"VMGENCTR");
                let cid = aml::Name::new("_CID".into(), &"VM_Gen_Counter");
                let ddn = aml::Name::new("_DDN".into(), &"VM_Gen_Counter");
                let (lo, hi) = ((addr & 0xffff_ffff) as u32, (addr >> 32) as u32);
                let pkg = aml::Package::new(vec![&lo, &hi]);
                let addr = aml::Name::new("ADDR".into(), &pkg);
                let vgen = aml::Device::new("VGEN".into(), vec![&hid, &cid, &ddn, &addr]);
                vgen.to_aml_bytes(&mut body);
                let hid = aml::Name::new("_HID".into(), &"ACPI0013");
                let uid = aml::Name::new("_UID".into(), &aml::ZERO);
                let int = aml::Interrupt::new(true, true, false, false, gsi);
                let crs_tmpl = aml::ResourceTemplate::new(vec![&int]);
                let crs = aml::Name::new("_CRS".into(), &crs_tmpl);
                let target = aml::Path::new("\\_SB_.VGEN");
                let notify = aml::Notify::new(&target, &0x80u8);
                let is_ours = aml::Equal::new(&aml::Arg(0), &gsi);
                let when = aml::If::new(&is_ours, vec![&notify]);
                let evt = aml::Method::new("_EVT".into(), 1, true, vec![&when]);
                let ged = aml::Device::new("GED0".into(), vec![&hid, &uid, &crs, &evt]);
                ged.to_aml_bytes(&mut body);
            }
            DsdtDevice::VirtioMmio {
                base,
                size,
                irq,
                index,
            } => {
                let name = format!("V{index:03X}");
                let hid = aml::Name::new("_HID".into(), &"LNRO0005");
                let uid = aml::Name::new("_UID".into(), &index);
                let mem = aml::Memory32Fixed::new(true, base, size);
                let int = aml::Interrupt::new(true, true, false, false, irq);
                let crs_tmpl = aml::ResourceTemplate::new(vec![&mem, &int]);
                let crs = aml::Name::new("_CRS".into(), &crs_tmpl);
                let device = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]);
                device.to_aml_bytes(&mut body);
            }
        }
    }
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let raw = RawAml(&body);
    let scope = aml::Scope::new("_SB_".into(), vec![&raw]);
    scope.to_aml_bytes(&mut sdt);
    sdt.write_u32(4, u32::try_from(sdt.len()).unwrap_or(u32::MAX));
    sdt.update_checksum();
    sdt.as_slice().to_vec()
}

/// Already-encoded AML, placed as is inside a scope.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.0);
    }
}

/// The MADT: the local APIC of every vCPU and the IOAPIC.
pub fn madt(num_cpus: u8) -> Result<Vec<u8>, AcpiError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(AcpiError::BadCpuCount(num_cpus));
    }
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for cpu in 0..num_cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(num_cpus, IOAPIC_ADDR, 0));
    Ok(to_bytes(&madt))
}

/// The FADT of a hardware-reduced platform pointing at the DSDT.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    // IA-PC boot architecture flags: no VGA (bit 2), no CMOS RTC (bit 5).
    f.iapc_boot_arch = ((1u16 << 2) | (1 << 5)).into();
    to_bytes(&f.finalize())
}

/// Builds every table for a guest with `num_cpus` vCPUs, laid out from `base`,
/// within `room` bytes.
pub fn build(
    base: u64,
    room: usize,
    num_cpus: u8,
    devices: &[DsdtDevice],
) -> Result<AcpiTables, AcpiError> {
    let rsdp_len = Rsdp::len();
    let dsdt_off = align8(rsdp_len);
    let dsdt = dsdt(devices);
    let fadt_off = align8(dsdt_off + dsdt.len());
    let fadt = fadt(base + dsdt_off as u64);
    let madt_off = align8(fadt_off + fadt.len());
    let madt = madt(num_cpus)?;
    let xsdt_off = align8(madt_off + madt.len());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(base + fadt_off as u64);
    xsdt.add_entry(base + madt_off as u64);
    let xsdt = to_bytes(&xsdt);
    let total = xsdt_off + xsdt.len();
    if total > room {
        return Err(AcpiError::TooLarge {
            needed: total,
            room,
        });
    }
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, base + xsdt_off as u64));

    let mut bytes = vec![0u8; total];
    for (off, table) in [
        (0, &rsdp),
        (dsdt_off, &dsdt),
        (fadt_off, &fadt),
        (madt_off, &madt),
        (xsdt_off, &xsdt),
    ] {
        bytes[off..off + table.len()].copy_from_slice(table);
    }
    Ok(AcpiTables {
        rsdp_addr: base,
        bytes,
    })
}

/// The legacy devices every Atoll VM has.
pub fn legacy_devices() -> Vec<DsdtDevice> {
    vec![DsdtDevice::Serial {
        port: SERIAL_PORT,
        irq: SERIAL_IRQ,
        uid: 1,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table_at(blob: &[u8], off: usize) -> &[u8] {
        let len = u32::from_le_bytes(blob[off + 4..off + 8].try_into().unwrap()) as usize;
        &blob[off..off + len]
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn acpi_tables_chain_from_rsdp_with_valid_checksums() {
        let base = 0xe0000;
        let t = build(base, 0x20000, 2, &legacy_devices()).unwrap();
        let b = &t.bytes;
        assert_eq!(&b[0..8], b"RSD PTR ");
        assert_eq!(sum(&b[0..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&b[0..36]), 0, "RSDP extended checksum");
        let xsdt_off = (u64_at(b, 24) - base) as usize;
        let xsdt = table_at(b, xsdt_off);
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        let mut sigs = Vec::new();
        for i in 0..(xsdt.len() - 36) / 8 {
            let off = (u64_at(xsdt, 36 + i * 8) - base) as usize;
            let table = table_at(b, off);
            assert_eq!(sum(table), 0, "checksum of {:?}", &table[0..4]);
            sigs.push(table[0..4].to_vec());
            if &table[0..4] == b"FACP" {
                // X_DSDT at offset 140.
                let dsdt = table_at(b, (u64_at(table, 140) - base) as usize);
                assert_eq!(&dsdt[0..4], b"DSDT");
                assert_eq!(sum(dsdt), 0);
                let flags = u32::from_le_bytes(table[112..116].try_into().unwrap());
                assert_ne!(flags & (1 << 20), 0, "hardware-reduced ACPI");
            }
        }
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
    }

    #[test]
    fn madt_has_one_local_apic_per_vcpu_and_an_ioapic() {
        let m = madt(3).unwrap();
        assert_eq!(&m[0..4], b"APIC");
        assert_eq!(sum(&m), 0);
        assert_eq!(
            u32::from_le_bytes(m[36..40].try_into().unwrap()),
            LAPIC_ADDR
        );
        let mut off = 44;
        let mut lapic_ids = Vec::new();
        let mut ioapics = 0;
        while off < m.len() {
            let (kind, len) = (m[off], m[off + 1] as usize);
            match kind {
                0 => {
                    lapic_ids.push(m[off + 3]);
                    assert_eq!(m[off + 4] & 1, 1, "enabled");
                }
                1 => {
                    ioapics += 1;
                    assert_eq!(
                        u32::from_le_bytes(m[off + 4..off + 8].try_into().unwrap()),
                        IOAPIC_ADDR
                    );
                }
                other => panic!("unexpected MADT entry {other}"),
            }
            off += len;
        }
        assert_eq!(lapic_ids, vec![0, 1, 2]);
        assert_eq!(ioapics, 1);
    }

    #[test]
    fn dsdt_announces_the_generation_id_and_the_event_device_that_notifies_it() {
        let d = dsdt(&[DsdtDevice::VmGenId {
            addr: 0xf_f000,
            gsi: 3,
        }]);
        let has = |s: &[u8]| d.windows(s.len()).any(|w| w == s);
        assert!(has(b"VGEN") && has(b"VMGENCTR\0") && has(b"VM_Gen_Counter\0"));
        // ADDR = Package(2) { 0xff000, 0 } (DWordConst 0x0c, ZeroOp).
        assert!(has(b"ADDR"));
        assert!(
            has(&[0x0c, 0x00, 0xf0, 0x0f, 0x00]),
            "the low word of the address"
        );
        assert!(has(b"GED0") && has(b"ACPI0013\0") && has(b"_EVT"));
        // Notify (NotifyOp 0x86) of \_SB_.VGEN (root, DualNamePrefix, two segments).
        assert!(has(&[
            0x86, b'\\', 0x2e, b'_', b'S', b'B', b'_', b'V', b'G', b'E', b'N'
        ]));
        let sum = d.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        assert_eq!(sum, 0, "checksum");
    }

    #[test]
    fn dsdt_announces_com1() {
        let d = dsdt(&legacy_devices());
        assert_eq!(&d[0..4], b"DSDT");
        assert_eq!(sum(&d), 0);
        let body = &d[36..];
        assert!(body.windows(4).any(|w| w == b"COM1"));
        assert!(body.windows(4).any(|w| w == b"_CRS"));
    }

    #[test]
    fn dsdt_announces_virtio_mmio_devices() {
        let mut devs = legacy_devices();
        devs.push(DsdtDevice::VirtioMmio {
            base: 0xd000_0000,
            size: 0x1000,
            irq: 5,
            index: 0,
        });
        let d = dsdt(&devs);
        assert_eq!(sum(&d), 0);
        let body = &d[36..];
        assert!(body.windows(4).any(|w| w == b"V000"));
        assert!(body.windows(8).any(|w| w == b"LNRO0005"));
        // Memory32Fixed descriptor (0x86) carrying the base address.
        let base = 0xd000_0000u32.to_le_bytes();
        assert!(body.windows(12).any(|w| w[0] == 0x86 && w[4..8] == base));
    }

    #[test]
    fn acpi_build_fails_when_room_is_short() {
        let err = build(0xe0000, 64, 1, &legacy_devices()).unwrap_err();
        assert!(matches!(err, AcpiError::TooLarge { room: 64, .. }));
        assert_eq!(madt(0).unwrap_err(), AcpiError::BadCpuCount(0));
    }
}
