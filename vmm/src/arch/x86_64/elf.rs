//! Loading an ELF `vmlinux` without copying it.
//!
//! linux-loader copies every `PT_LOAD` segment into guest memory. We map the
//! page-aligned part of each segment from the file instead (`MAP_PRIVATE |
//! MAP_FIXED` over the guest RAM mapping): the guest's kernel text and read-only
//! data are the host's page-cache pages, shared copy-on-write by every VM booted
//! from the same file, and nothing is read or zeroed at VMM start. Segments that
//! are not page-aligned in both the file and guest memory, and the partial page at a
//! segment's end, are copied. The part of a segment past its file size (`.bss`) is
//! left as the fresh, zeroed guest RAM it already is.
//!
//! The file is the operator's, not the guest's, but it is still parsed defensively:
//! every count and offset is bounded and overflow-checked.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::io::AsRawFd;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const PAGE_SIZE: u64 = 4096;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// Most program headers accepted (a vmlinux has about five).
pub const MAX_PHDRS: u16 = 64;
/// Largest note segment read while looking for the PVH entry.
const MAX_NOTE_BYTES: u64 = 64 * 1024;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// What loading placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedElf {
    /// `e_entry`: the 64-bit entry (physical for a vmlinux).
    pub entry: u64,
    /// The PVH entry from the Xen note, when present.
    pub pvh_entry: Option<u64>,
    /// One past the highest byte of any segment in memory.
    pub end: u64,
    /// Bytes mapped from the file rather than copied.
    pub mapped_bytes: u64,
}

/// Why an ELF kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadElfError {
    /// Reading the file failed.
    #[error("cannot read the kernel image")]
    Read(#[source] std::io::Error),
    /// The headers are not those of a 64-bit x86 executable.
    #[error("not a 64-bit little-endian x86_64 ELF executable ({0})")]
    NotX86_64(&'static str),
    /// A header field is out of range.
    #[error("malformed ELF program headers ({0})")]
    Malformed(&'static str),
    /// A segment lies outside guest RAM below the MMIO gap or below 1 MiB.
    #[error("segment at {addr:#x}+{size:#x} lies outside usable guest memory (up to {limit:#x})")]
    SegmentOutside {
        /// Physical address.
        addr: u64,
        /// Memory size.
        size: u64,
        /// End of usable memory.
        limit: u64,
    },
    /// Mapping or copying into guest memory failed.
    #[error("cannot place a segment at {addr:#x} in guest memory")]
    Place {
        /// Physical address.
        addr: u64,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// One program header.
#[derive(Clone, Copy, Debug)]
struct Phdr {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// The executable's entry and program headers, validated for shape.
fn read_headers<R: Read + Seek>(f: &mut R) -> Result<(u64, Vec<Phdr>), LoadElfError> {
    let mut ehdr = [0u8; EHDR_SIZE];
    f.seek(SeekFrom::Start(0)).map_err(LoadElfError::Read)?;
    f.read_exact(&mut ehdr)
        .map_err(|_| LoadElfError::Malformed("file shorter than an ELF header"))?;
    if ehdr[0..4] != *b"\x7fELF" {
        return Err(LoadElfError::NotX86_64("no ELF magic"));
    }
    if ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(LoadElfError::NotX86_64("not 64-bit little-endian"));
    }
    if u16_at(&ehdr, 18) != EM_X86_64 {
        return Err(LoadElfError::NotX86_64("machine is not x86_64"));
    }
    if u16_at(&ehdr, 16) != ET_EXEC {
        return Err(LoadElfError::NotX86_64("not an executable"));
    }
    let entry = u64_at(&ehdr, 24);
    let phoff = u64_at(&ehdr, 32);
    let phentsize = u16_at(&ehdr, 54);
    let phnum = u16_at(&ehdr, 56);
    if usize::from(phentsize) != PHDR_SIZE || phnum == 0 || phnum > MAX_PHDRS {
        return Err(LoadElfError::Malformed("program header size or count"));
    }
    let mut phdrs = Vec::with_capacity(usize::from(phnum));
    let mut ph = [0u8; PHDR_SIZE];
    for i in 0..u64::from(phnum) {
        let off = phoff
            .checked_add(i * PHDR_SIZE as u64)
            .ok_or(LoadElfError::Malformed("program header offset overflows"))?;
        f.seek(SeekFrom::Start(off)).map_err(LoadElfError::Read)?;
        f.read_exact(&mut ph)
            .map_err(|_| LoadElfError::Malformed("program headers past the end of the file"))?;
        phdrs.push(Phdr {
            kind: u32_at(&ph, 0),
            offset: u64_at(&ph, 8),
            paddr: u64_at(&ph, 24),
            filesz: u64_at(&ph, 32),
            memsz: u64_at(&ph, 40),
        });
    }
    Ok((entry, phdrs))
}

/// The end of the highest `PT_LOAD` segment in memory, or `None` when the headers
/// cannot be read (the loader then says precisely what is wrong).
pub fn load_end<R: Read + Seek>(f: &mut R) -> std::io::Result<Option<u64>> {
    let Ok((_, phdrs)) = read_headers(f) else {
        return Ok(None);
    };
    let mut end = 0u64;
    for p in phdrs.iter().filter(|p| p.kind == PT_LOAD) {
        match p.paddr.checked_add(p.memsz) {
            Some(e) => end = end.max(e),
            None => return Ok(None),
        }
    }
    Ok(Some(end))
}

/// Looks for the Xen PVH entry note in a note segment's bytes.
fn pvh_entry_in_notes(notes: &[u8]) -> Option<u64> {
    let align4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    let mut off = 0usize;
    while off.checked_add(12)? <= notes.len() {
        let namesz = u32_at(notes, off) as usize;
        let descsz = u32_at(notes, off + 4) as usize;
        let kind = u32_at(notes, off + 8);
        let name_start = off + 12;
        let desc_start = name_start.checked_add(align4(namesz)?)?;
        let next = desc_start.checked_add(align4(descsz)?)?;
        if next > notes.len() {
            return None;
        }
        let name = &notes[name_start..name_start + namesz];
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" && descsz >= 4 {
            return Some(u64::from(u32_at(notes, desc_start)));
        }
        off = next;
    }
    None
}

/// Maps `len` bytes of `file` at `file_off` over guest memory at `gpa`, or copies
/// them where alignment does not allow a mapping. Returns the bytes mapped.
fn place(
    mem: &GuestMemoryMmap,
    file: &mut File,
    file_off: u64,
    gpa: u64,
    len: u64,
) -> Result<u64, LoadElfError> {
    let err = |source| LoadElfError::Place { addr: gpa, source };
    let ulen = usize::try_from(len).map_err(|_| err(std::io::Error::other("segment too large")))?;
    // The whole destination must be inside one RAM region.
    let slice = mem
        .get_slice(GuestAddress(gpa), ulen)
        .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    let mapped = if file_off.is_multiple_of(PAGE_SIZE) && gpa.is_multiple_of(PAGE_SIZE) {
        len & !(PAGE_SIZE - 1)
    } else {
        0
    };
    if mapped > 0 {
        let host = slice.ptr_guard_mut().as_ptr();
        let off = libc::off_t::try_from(file_off)
            .map_err(|_| err(std::io::Error::other("file offset too large")))?;
        // SAFETY: `host..host + mapped` lies inside the guest RAM mapping that
        // `mem` owns (checked by `get_slice` above, `mapped <= len`), so MAP_FIXED
        // replaces only our own pages; nothing in this process holds references
        // into them (the VM has not run yet). The mapping is private: guest writes
        // never reach the file.
        let r = unsafe {
            libc::mmap(
                host.cast::<libc::c_void>(),
                mapped as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                file.as_raw_fd(),
                off,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(err(std::io::Error::last_os_error()));
        }
    }
    let rest = len - mapped;
    if rest > 0 {
        file.seek(SeekFrom::Start(file_off + mapped))
            .map_err(LoadElfError::Read)?;
        mem.read_exact_volatile_from(GuestAddress(gpa + mapped), file, rest as usize)
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    }
    Ok(mapped)
}

/// Loads the `PT_LOAD` segments of `file` into `mem`, which must hold them between
/// `min_addr` and `limit`, and finds the PVH entry note.
pub fn load(
    mem: &GuestMemoryMmap,
    file: &mut File,
    min_addr: u64,
    limit: u64,
) -> Result<LoadedElf, LoadElfError> {
    let (entry, phdrs) = read_headers(file)?;
    let file_len = file.metadata().map_err(LoadElfError::Read)?.len();
    let mut end = 0u64;
    let mut mapped_bytes = 0u64;
    let mut pvh_entry = None;
    let mut loads = 0;
    for p in &phdrs {
        match p.kind {
            PT_LOAD => {
                let mem_end = p.paddr.checked_add(p.memsz);
                let file_end = p.offset.checked_add(p.filesz);
                if p.filesz > p.memsz || file_end.is_none_or(|e| e > file_len) {
                    return Err(LoadElfError::Malformed("segment file range"));
                }
                match mem_end {
                    Some(e) if p.paddr >= min_addr && e <= limit => end = end.max(e),
                    _ => {
                        return Err(LoadElfError::SegmentOutside {
                            addr: p.paddr,
                            size: p.memsz,
                            limit,
                        })
                    }
                }
                if p.filesz > 0 {
                    mapped_bytes += place(mem, file, p.offset, p.paddr, p.filesz)?;
                }
                loads += 1;
            }
            PT_NOTE if pvh_entry.is_none() => {
                if p.filesz > MAX_NOTE_BYTES
                    || p.offset.checked_add(p.filesz).is_none_or(|e| e > file_len)
                {
                    continue;
                }
                let mut notes = vec![0u8; p.filesz as usize];
                file.seek(SeekFrom::Start(p.offset))
                    .map_err(LoadElfError::Read)?;
                file.read_exact(&mut notes).map_err(LoadElfError::Read)?;
                pvh_entry = pvh_entry_in_notes(&notes);
            }
            _ => {}
        }
    }
    if loads == 0 {
        return Err(LoadElfError::Malformed("no loadable segment"));
    }
    Ok(LoadedElf {
        entry,
        pvh_entry,
        end,
        mapped_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    /// An ELF with one page-aligned PT_LOAD (two pages and a bit, plus bss) and a
    /// PVH note.
    fn aligned_elf() -> Vec<u8> {
        let load_addr = 0x20_0000u64;
        let mut f = vec![0u8; 0x1000];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[24..32].copy_from_slice(&(load_addr + 0x10).to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&2u16.to_le_bytes());
        let mut ph = |i: usize, kind: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
            let b = 64 + i * 56;
            f[b..b + 4].copy_from_slice(&kind.to_le_bytes());
            f[b + 8..b + 16].copy_from_slice(&off.to_le_bytes());
            f[b + 24..b + 32].copy_from_slice(&addr.to_le_bytes());
            f[b + 32..b + 40].copy_from_slice(&filesz.to_le_bytes());
            f[b + 40..b + 48].copy_from_slice(&memsz.to_le_bytes());
        };
        ph(0, PT_LOAD, 0x1000, load_addr, 0x2100, 0x4000);
        ph(1, PT_NOTE, 0x200, 0, 20, 20);
        // The note: "Xen\0", type 18, entry 0x200040.
        let note = [
            &4u32.to_le_bytes()[..],
            &4u32.to_le_bytes(),
            &18u32.to_le_bytes(),
            b"Xen\0",
            &0x20_0040u32.to_le_bytes(),
        ]
        .concat();
        f[0x200..0x200 + note.len()].copy_from_slice(&note);
        // Segment contents: a recognisable pattern per byte.
        f.extend((0..0x2100u32).map(|i| (i % 251) as u8));
        f
    }

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile_in_tmp();
        f.write_all(bytes).unwrap();
        f
    }

    fn tempfile_in_tmp() -> File {
        let dir = std::env::temp_dir().join(format!("atoll-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!(
            "k{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    #[test]
    fn elf_aligned_segment_is_mapped_tail_copied_and_bss_zero() {
        let m = mem();
        let mut f = file_with(&aligned_elf());
        let l = load(&m, &mut f, 0x10_0000, 0x100_0000).unwrap();
        assert_eq!(l.pvh_entry, Some(0x20_0040));
        assert_eq!(l.entry, 0x20_0010);
        assert_eq!(l.end, 0x20_4000);
        assert_eq!(
            l.mapped_bytes, 0x2000,
            "two whole pages mapped, the tail copied"
        );
        let mut got = vec![0u8; 0x2100];
        m.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        let want: Vec<u8> = (0..0x2100u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);
        let mut bss = vec![0xffu8; 0x1f00];
        m.read_slice(&mut bss, GuestAddress(0x20_2100)).unwrap();
        assert!(bss.iter().all(|b| *b == 0), "bss is zero");
        // Guest writes stay private: the file is unchanged.
        m.write_slice(&[0xaa; 16], GuestAddress(0x20_0000)).unwrap();
        let mut again = f.try_clone().unwrap();
        let mut first = [0u8; 16];
        again.seek(SeekFrom::Start(0x1000)).unwrap();
        again.read_exact(&mut first).unwrap();
        assert_eq!(first[0], 0, "file untouched by guest writes");
    }

    #[test]
    fn elf_segment_outside_memory_or_below_min_is_refused() {
        let m = mem();
        let mut f = file_with(&aligned_elf());
        let err = load(&m, &mut f, 0x10_0000, 0x20_3000).unwrap_err();
        assert!(matches!(err, LoadElfError::SegmentOutside { .. }), "{err}");
        let err = load(&m, &mut f, 0x30_0000, 0x100_0000).unwrap_err();
        assert!(matches!(err, LoadElfError::SegmentOutside { .. }), "{err}");
    }

    #[test]
    fn elf_hostile_headers_are_errors_not_panics() {
        let m = mem();
        let base = aligned_elf();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                {
                    let mut e = base.clone();
                    e[18] = 3;
                    e
                },
                "machine",
            ),
            (
                {
                    let mut e = base.clone();
                    e[56] = 0xff;
                    e[57] = 0xff;
                    e
                },
                "phnum",
            ),
            (
                {
                    let mut e = base.clone();
                    e[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
                    e
                },
                "phoff",
            ),
            // filesz beyond the file.
            (
                {
                    let mut e = base.clone();
                    e[64 + 32..64 + 40].copy_from_slice(&u64::MAX.to_le_bytes());
                    e
                },
                "filesz",
            ),
            // paddr + memsz overflows.
            (
                {
                    let mut e = base.clone();
                    e[64 + 24..64 + 32].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
                    e
                },
                "paddr",
            ),
            (base[..100].to_vec(), "truncated"),
        ];
        for (bytes, what) in cases {
            let mut f = file_with(&bytes);
            assert!(load(&m, &mut f, 0x10_0000, 0x100_0000).is_err(), "{what}");
        }
    }

    #[test]
    fn elf_notes_parser_is_bounded() {
        assert_eq!(pvh_entry_in_notes(&[]), None);
        let mut huge = vec![0u8; 16];
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(pvh_entry_in_notes(&huge), None);
        let mut other = [
            &4u32.to_le_bytes()[..],
            &4u32.to_le_bytes(),
            &17u32.to_le_bytes(),
            b"Xen\0",
            &[1, 0, 0, 0],
        ]
        .concat();
        assert_eq!(pvh_entry_in_notes(&other), None, "another Xen note type");
        other[8] = 18;
        assert_eq!(pvh_entry_in_notes(&other), Some(1));
    }

    #[test]
    fn elf_load_end_reads_headers_only() {
        assert_eq!(
            load_end(&mut Cursor::new(aligned_elf())).unwrap(),
            Some(0x20_4000)
        );
        assert_eq!(load_end(&mut Cursor::new(vec![0u8; 10])).unwrap(), None);
    }
}
