//! Loads a kernel (ELF `vmlinux` or bzImage), the initrd and the command line into
//! guest memory, writes the boot information the entry protocol wants (PVH
//! `hvm_start_info` or the Linux zero page) and the firmware tables (MP, ACPI).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::acpi::{self, AcpiError};
use super::layout::{
    self, ACPI_START, CMDLINE_ADDR, CMDLINE_MAX_SIZE, EBDA_START, HIMEM_START, PVH_INFO_ADDR,
    PVH_MEMMAP_ADDR, PVH_MEMMAP_MAX_ENTRIES, PVH_MODLIST_ADDR, ZERO_PAGE_ADDR,
};
use super::mptable::{self, MpTableError};
use super::regs::EntryMode;

const PVH_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XLF_KERNEL_64: u16 = 1;
const PAGE_SIZE: u64 = 4096;

/// The kernel image formats we boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux`.
    Elf,
    /// A bzImage (compressed, with a setup header).
    BzImage,
}

/// What was loaded, and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// The image format.
    pub format: KernelFormat,
    /// Entry protocol and address.
    pub entry: EntryMode,
    /// First byte after the kernel.
    pub kernel_end: u64,
    /// Initrd location and size.
    pub initrd: Option<(u64, u64)>,
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct BootSpec {
    /// Kernel image path.
    pub kernel: PathBuf,
    /// Initrd path.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPU count.
    pub num_cpus: u8,
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Devices the DSDT announces (legacy devices and virtio-mmio windows).
    pub dsdt_devices: Vec<acpi::DsdtDevice>,
}

/// Why the guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadKernelError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}")]
    ReadKernel {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither ELF nor bzImage.
    #[error(
        "kernel {path} is neither an ELF vmlinux nor a bzImage: give the vmlinux or \
         arch/x86/boot/bzImage that `atoll-image kernel` builds"
    )]
    UnknownFormat {
        /// The path.
        path: PathBuf,
    },
    /// linux-loader rejected the image. Its message already carries its own causes,
    /// so it is shown, not chained.
    #[error("kernel {path} is corrupt ({cause})")]
    Load {
        /// The path.
        path: PathBuf,
        /// The loader's error.
        cause: linux_loader::loader::Error,
    },
    /// A bzImage without the 64-bit entry point.
    #[error("bzImage {path} has no 64-bit entry point (boot protocol {version:#x}); build a 64-bit kernel")]
    No64BitEntry {
        /// The path.
        path: PathBuf,
        /// The protocol version.
        version: u16,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit above the kernel.
    #[error(
        "guest memory of {mem_mib} MiB is too small for the kernel ({kernel_mib} MiB) and the \
         initrd ({initrd_mib} MiB): give --mem {suggest_mib} or more"
    )]
    TooLittleMemory {
        /// Guest memory.
        mem_mib: u64,
        /// Kernel end.
        kernel_mib: u64,
        /// Initrd size.
        initrd_mib: u64,
        /// A size that fits.
        suggest_mib: u64,
    },
    /// The command line is invalid or too long.
    #[error("kernel command line rejected ({len} bytes, at most {max}, printable ASCII only)")]
    Cmdline {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Writing boot data to guest memory failed.
    #[error("cannot write {what} into guest memory")]
    WriteMemory {
        /// What.
        what: &'static str,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// MP table.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// More memory map entries than fit.
    #[error("the memory map has {0} entries, more than the boot protocol takes")]
    MemoryMapTooLarge(usize),
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Tells the image format from the first bytes of the file.
pub fn detect_format<R: Read + Seek>(image: &mut R) -> std::io::Result<Option<KernelFormat>> {
    let mut magic = [0u8; 4];
    image.seek(SeekFrom::Start(0))?;
    if image.read_exact(&mut magic).is_err() {
        return Ok(None);
    }
    if magic == *b"\x7fELF" {
        return Ok(Some(KernelFormat::Elf));
    }
    let mut hdrs = [0u8; 4];
    if image.seek(SeekFrom::Start(0x202)).is_ok()
        && image.read_exact(&mut hdrs).is_ok()
        && hdrs == *b"HdrS"
    {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

/// Loads everything `spec` names into `mem` and writes the boot information.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<BootInfo, LoadKernelError> {
    let read_kernel = |source| LoadKernelError::ReadKernel {
        path: spec.kernel.clone(),
        source,
    };
    let mut kernel = File::open(&spec.kernel).map_err(read_kernel)?;
    let format = detect_format(&mut kernel)
        .map_err(read_kernel)?
        .ok_or_else(|| LoadKernelError::UnknownFormat {
            path: spec.kernel.clone(),
        })?;
    let load_err = |cause| LoadKernelError::Load {
        path: spec.kernel.clone(),
        cause,
    };
    let initrd_size = match &spec.initrd {
        Some(p) => std::fs::metadata(p)
            .map_err(|source| LoadKernelError::ReadInitrd {
                path: p.clone(),
                source,
            })?
            .len(),
        None => 0,
    };
    let (entry, kernel_end, header) = match format {
        KernelFormat::Elf => {
            // Judge the size before loading, so a small guest gets "too little
            // memory" rather than a loader error.
            if let Some(end) = elf_load_end(&mut kernel).map_err(read_kernel)? {
                if end > layout::low_mem_end(spec.mem_size) {
                    return Err(too_little_memory(spec.mem_size, end, initrd_size));
                }
            }
            let r = Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryMode::Pvh(addr.0),
                // A vmlinux without the PVH note still has its 64-bit entry.
                _ => EntryMode::Linux64(r.kernel_load.0),
            };
            (entry, r.kernel_end, None)
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let hdr = r.setup_header.unwrap_or_default();
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(LoadKernelError::No64BitEntry {
                    path: spec.kernel.clone(),
                    version: hdr.version,
                });
            }
            (
                EntryMode::Linux64(r.kernel_load.0 + 0x200),
                r.kernel_end,
                Some(hdr),
            )
        }
    };

    let initrd = match &spec.initrd {
        Some(path) => Some(load_initrd(mem, spec, path, kernel_end, header.as_ref())?),
        None => None,
    };

    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|_| LoadKernelError::Cmdline {
        len: spec.cmdline.len(),
        max: CMDLINE_MAX_SIZE - 1,
    })?;
    cmdline
        .insert_str(&spec.cmdline)
        .map_err(|_| LoadKernelError::Cmdline {
            len: spec.cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        })?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline).map_err(|_| {
        LoadKernelError::Cmdline {
            len: spec.cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        }
    })?;

    let mp = mptable::build(EBDA_START, spec.num_cpus)?;
    write(mem, &mp, EBDA_START, "the MP table")?;
    let tables = acpi::build(
        ACPI_START,
        (layout::VMGENID_ADDR - ACPI_START) as usize,
        spec.num_cpus,
        &spec.dsdt_devices,
    )?;
    write(mem, &tables.bytes, tables.rsdp_addr, "the ACPI tables")?;

    match entry {
        EntryMode::Pvh(_) => write_pvh_info(mem, spec, initrd, tables.rsdp_addr)?,
        EntryMode::Linux64(_) => write_zero_page(mem, spec, header, initrd, tables.rsdp_addr)?,
    }
    Ok(BootInfo {
        format,
        entry,
        kernel_end,
        initrd,
    })
}

fn too_little_memory(mem_size: u64, kernel_end: u64, initrd_size: u64) -> LoadKernelError {
    LoadKernelError::TooLittleMemory {
        mem_mib: mib(mem_size),
        kernel_mib: mib(kernel_end),
        initrd_mib: mib(initrd_size),
        // Room for kernel, initrd and the kernel's own early allocations.
        suggest_mib: (mib(kernel_end) + mib(initrd_size) * 2 + 32).next_power_of_two(),
    }
}

/// Most program headers we look at; a vmlinux has about five.
const MAX_PHDRS: u16 = 64;

/// The end of the highest `PT_LOAD` segment (physical address + memory size) of a
/// 64-bit little-endian ELF, or `None` when the headers cannot be read that way
/// (the loader then gives the precise error). Bounded and overflow-checked: the
/// file is untrusted.
pub fn elf_load_end<R: Read + Seek>(image: &mut R) -> std::io::Result<Option<u64>> {
    let mut ehdr = [0u8; 64];
    image.seek(SeekFrom::Start(0))?;
    if image.read_exact(&mut ehdr).is_err() || ehdr[4] != 2 || ehdr[5] != 1 {
        return Ok(None);
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let phoff = u64_at(&ehdr, 32);
    let phentsize = u16_at(&ehdr, 54);
    let phnum = u16_at(&ehdr, 56);
    if phentsize != 56 || phnum == 0 || phnum > MAX_PHDRS {
        return Ok(None);
    }
    let mut end: u64 = 0;
    let mut ph = [0u8; 56];
    for i in 0..u64::from(phnum) {
        let Some(off) = phoff.checked_add(i * 56) else {
            return Ok(None);
        };
        image.seek(SeekFrom::Start(off))?;
        if image.read_exact(&mut ph).is_err() {
            return Ok(None);
        }
        let p_type = u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]);
        if p_type != 1 {
            continue;
        }
        match u64_at(&ph, 24).checked_add(u64_at(&ph, 40)) {
            Some(e) => end = end.max(e),
            None => return Ok(None),
        }
    }
    Ok(Some(end))
}

fn write(
    mem: &GuestMemoryMmap,
    bytes: &[u8],
    addr: u64,
    what: &'static str,
) -> Result<(), LoadKernelError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| LoadKernelError::WriteMemory { what, source })
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    path: &Path,
    kernel_end: u64,
    header: Option<&setup_header>,
) -> Result<(u64, u64), LoadKernelError> {
    let read_err = |source| LoadKernelError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let mut top = layout::low_mem_end(spec.mem_size);
    if let Some(hdr) = header {
        top = top.min(u64::from(hdr.initrd_addr_max) + 1);
    }
    let kernel_top = kernel_end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let too_small = || too_little_memory(spec.mem_size, kernel_end, size);
    let start = top
        .checked_sub(size)
        .map(|s| s & !(PAGE_SIZE - 1))
        .filter(|s| *s >= kernel_top)
        .ok_or_else(too_small)?;
    let len = usize::try_from(size).map_err(|_| too_small())?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, len)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(io) => read_err(io),
            other => LoadKernelError::WriteMemory {
                what: "the initrd",
                source: other,
            },
        })?;
    Ok((start, size))
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), LoadKernelError> {
    let map = layout::e820_map(spec.mem_size);
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(LoadKernelError::MemoryMapTooLarge(map.len()));
    }
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let addr = PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(addr)).map_err(|source| {
            LoadKernelError::WriteMemory {
                what: "the PVH memory map",
                source,
            }
        })?;
    }
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(|source| LoadKernelError::WriteMemory {
                what: "the PVH module list",
                source,
            })?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
        .map_err(|source| LoadKernelError::WriteMemory {
            what: "the PVH start info",
            source,
        })
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    header: Option<setup_header>,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), LoadKernelError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = u32::try_from(spec.cmdline.len()).unwrap_or(u32::MAX);
    if let Some((addr, size)) = initrd {
        // Both below 4 GiB by construction (low memory).
        params.hdr.ramdisk_image = u32::try_from(addr).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(size).unwrap_or(0);
    }
    params.acpi_rsdp_addr = rsdp;
    let map = layout::e820_map(spec.mem_size);
    if map.len() > params.e820_table.len() {
        return Err(LoadKernelError::MemoryMapTooLarge(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| LoadKernelError::WriteMemory {
            what: "the zero page",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    const MEM: u64 = 64 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    /// A minimal ELF64 executable with one PT_LOAD segment at 16 MiB and, when
    /// `pvh` is set, a PT_NOTE carrying the Xen PVH entry note.
    pub(crate) fn tiny_elf(pvh: bool) -> Vec<u8> {
        let load_addr: u64 = 0x100_0000;
        let code = [0xf4u8; 16]; // hlt
        let phnum: u16 = if pvh { 2 } else { 1 };
        let phoff = 64u64;
        let data_off = phoff + 56 * u64::from(phnum);
        // The note: namesz=4 "Xen\0", descsz=4, type 18 (XEN_ELFNOTE_PHYS32_ENTRY).
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&18u32.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&(load_addr as u32).to_le_bytes());
        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF");
        f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, LE, version 1
        f.extend_from_slice(&[0u8; 8]);
        f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f.extend_from_slice(&62u16.to_le_bytes()); // x86_64
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&load_addr.to_le_bytes()); // e_entry
        f.extend_from_slice(&phoff.to_le_bytes());
        f.extend_from_slice(&0u64.to_le_bytes()); // shoff
        f.extend_from_slice(&0u32.to_le_bytes()); // flags
        f.extend_from_slice(&64u16.to_le_bytes()); // ehsize
        f.extend_from_slice(&56u16.to_le_bytes()); // phentsize
        f.extend_from_slice(&phnum.to_le_bytes());
        f.extend_from_slice(&64u16.to_le_bytes()); // shentsize
        f.extend_from_slice(&0u16.to_le_bytes()); // shnum
        f.extend_from_slice(&0u16.to_le_bytes()); // shstrndx
        let phdr = |f: &mut Vec<u8>, kind: u32, off: u64, addr: u64, size: u64| {
            f.extend_from_slice(&kind.to_le_bytes());
            f.extend_from_slice(&5u32.to_le_bytes()); // R+X
            f.extend_from_slice(&off.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&4u64.to_le_bytes());
        };
        phdr(&mut f, 1, data_off, load_addr, code.len() as u64);
        if pvh {
            phdr(
                &mut f,
                4,
                data_off + code.len() as u64,
                0,
                note.len() as u64,
            );
        }
        f.extend_from_slice(&code);
        if pvh {
            f.extend_from_slice(&note);
        }
        f
    }

    fn spec(kernel: &Path, initrd: Option<&Path>) -> BootSpec {
        BootSpec {
            kernel: kernel.to_path_buf(),
            initrd: initrd.map(Path::to_path_buf),
            cmdline: "console=ttyS0 -- /bin/true".into(),
            num_cpus: 2,
            mem_size: MEM,
            dsdt_devices: acpi::legacy_devices(),
        }
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("atoll-vmm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn detect_format_tells_elf_bzimage_and_garbage() {
        assert_eq!(
            detect_format(&mut Cursor::new(tiny_elf(true))).unwrap(),
            Some(KernelFormat::Elf)
        );
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(
            detect_format(&mut Cursor::new(bz)).unwrap(),
            Some(KernelFormat::BzImage)
        );
        assert_eq!(
            detect_format(&mut Cursor::new(vec![0x42u8; 1000])).unwrap(),
            None
        );
        assert_eq!(detect_format(&mut Cursor::new(vec![1u8, 2])).unwrap(), None);
    }

    #[test]
    fn elf_with_pvh_note_boots_through_pvh_with_start_info() {
        let k = temp_file("pvh.elf", &tiny_elf(true));
        let i = temp_file("initrd-a", &[7u8; 5000]);
        let m = mem();
        let info = load(&m, &spec(&k, Some(&i))).unwrap();
        assert_eq!(info.entry, EntryMode::Pvh(0x100_0000));
        let start: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(start.magic, PVH_MAGIC);
        assert_eq!(start.nr_modules, 1);
        assert_eq!(start.cmdline_paddr, CMDLINE_ADDR);
        assert_eq!(start.rsdp_paddr, ACPI_START);
        assert_eq!(start.memmap_entries as usize, layout::e820_map(MEM).len());
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        let (addr, size) = info.initrd.unwrap();
        assert_eq!((module.paddr, module.size), (addr, 5000));
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + size <= MEM);
        let mut first = [0u8; 4];
        m.read_slice(&mut first, GuestAddress(addr)).unwrap();
        assert_eq!(first, [7; 4]);
        let mut cmd = [0u8; 13];
        m.read_slice(&mut cmd, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cmd, b"console=ttyS0");
    }

    #[test]
    fn elf_without_pvh_note_uses_64bit_entry_and_zero_page() {
        let k = temp_file("nopvh.elf", &tiny_elf(false));
        let m = mem();
        let info = load(&m, &spec(&k, None)).unwrap();
        assert_eq!(info.entry, EntryMode::Linux64(0x100_0000));
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!(p.e820_entries as usize, layout::e820_map(MEM).len());
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
    }

    /// A bzImage-shaped file: one setup sector, the "HdrS" header, protocol 2.15,
    /// loaded high, with `xloadflags` as given, then a payload.
    fn tiny_bzimage(xloadflags: u16) -> Vec<u8> {
        let mut f = vec![0u8; 2 * 512 + 4096];
        f[0x1f1] = 1; // setup_sects
        f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        f[0x211] = 1; // LOADED_HIGH
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        f[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        f[1024..1028].copy_from_slice(b"KERN");
        f
    }

    #[test]
    fn bzimage_boots_through_64bit_entry_with_its_setup_header() {
        let k = temp_file("bz", &tiny_bzimage(XLF_KERNEL_64));
        let i = temp_file("initrd-bz", &[3u8; 100]);
        let m = mem();
        let info = load(&m, &spec(&k, Some(&i))).unwrap();
        assert_eq!(info.format, KernelFormat::BzImage);
        assert_eq!(info.entry, EntryMode::Linux64(0x10_0000 + 0x200));
        let mut payload = [0u8; 4];
        m.read_slice(&mut payload, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(
            &payload, b"KERN",
            "the protected-mode part loads at code32_start"
        );
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        let (addr, size) = info.initrd.unwrap();
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (addr as u32, size as u32)
        );
        assert_eq!(p.e820_entries as usize, layout::e820_map(MEM).len());
    }

    #[test]
    fn bzimage_without_64bit_entry_is_refused() {
        let k = temp_file("bz32", &tiny_bzimage(0));
        let err = load(&mem(), &spec(&k, None)).unwrap_err();
        assert!(
            matches!(
                err,
                LoadKernelError::No64BitEntry {
                    version: 0x020f,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn garbage_kernel_is_unknown_format() {
        let k = temp_file("garbage", &[0x5au8; 4096]);
        let err = load(&mem(), &spec(&k, None)).unwrap_err();
        assert!(
            matches!(err, LoadKernelError::UnknownFormat { .. }),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains("neither an ELF vmlinux nor a bzImage"));
    }

    #[test]
    fn truncated_elf_is_a_load_error() {
        let mut elf = tiny_elf(true);
        elf.truncate(100);
        let k = temp_file("truncated.elf", &elf);
        let err = load(&mem(), &spec(&k, None)).unwrap_err();
        assert!(matches!(err, LoadKernelError::Load { .. }), "{err}");
    }

    #[test]
    fn initrd_larger_than_memory_asks_for_more_memory() {
        let k = temp_file("pvh2.elf", &tiny_elf(true));
        let i = temp_file("initrd-big", &vec![0u8; 60 << 20]);
        let err = load(&mem(), &spec(&k, Some(&i))).unwrap_err();
        match err {
            LoadKernelError::TooLittleMemory {
                mem_mib,
                suggest_mib,
                ..
            } => {
                assert_eq!(mem_mib, 64);
                assert!(suggest_mib >= 128);
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn elf_larger_than_memory_asks_for_more_memory() {
        let k = temp_file("pvh4.elf", &tiny_elf(true));
        let mut s = spec(&k, None);
        // The segment sits at 16 MiB: a 16 MiB guest cannot hold it.
        s.mem_size = 16 << 20;
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let err = load(&m, &s).unwrap_err();
        assert!(
            matches!(err, LoadKernelError::TooLittleMemory { mem_mib: 16, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("give --mem"));
    }

    #[test]
    fn elf_load_end_is_bounded_on_hostile_headers() {
        assert_eq!(
            elf_load_end(&mut Cursor::new(tiny_elf(true))).unwrap(),
            Some(0x100_0010)
        );
        let mut e = tiny_elf(true);
        e[56] = 0xff; // phnum = 0xff02: more than we look at
        e[57] = 0xff;
        assert_eq!(elf_load_end(&mut Cursor::new(e)).unwrap(), None);
        let mut e = tiny_elf(true);
        e[32..40].copy_from_slice(&u64::MAX.to_le_bytes()); // phoff overflows
        assert_eq!(elf_load_end(&mut Cursor::new(e)).unwrap(), None);
        assert_eq!(elf_load_end(&mut Cursor::new(vec![0u8; 10])).unwrap(), None);
    }

    #[test]
    fn missing_kernel_is_a_read_error() {
        let err = load(&mem(), &spec(Path::new("/nonexistent/vmlinux"), None)).unwrap_err();
        assert!(matches!(err, LoadKernelError::ReadKernel { .. }));
    }

    #[test]
    fn cmdline_with_nul_is_rejected() {
        let k = temp_file("pvh3.elf", &tiny_elf(true));
        let mut s = spec(&k, None);
        s.cmdline = "a\0b".into();
        assert!(matches!(
            load(&mem(), &s).unwrap_err(),
            LoadKernelError::Cmdline { .. }
        ));
        s.cmdline = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(
            load(&mem(), &s).unwrap_err(),
            LoadKernelError::Cmdline { .. }
        ));
    }
}
