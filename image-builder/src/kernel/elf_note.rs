//! Finds the PVH entry point in a `vmlinux`: the ELF note named `Xen` of type
//! `XEN_ELFNOTE_PHYS32_ENTRY` (0x12) that `CONFIG_PVH` emits. A VMM loads such a kernel
//! directly (no bzImage decompressor) and jumps to that 32-bit physical address.
//!
//! Only ELF64 little-endian files are accepted; the parser walks `PT_NOTE` program
//! headers (what loaders use, and what survives `strip`) with bounds-checked reads.

/// `XEN_ELFNOTE_PHYS32_ENTRY` from `include/xen/interface/elfnote.h`.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 0x12;
const PT_NOTE: u32 = 4;
/// Bounds the walk over a hostile or corrupt header table.
const MAX_PROGRAM_HEADERS: usize = 4096;

/// Why a file could not be read as an ELF64 little-endian image.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum ElfNoteError {
    #[error("not an ELF64 little-endian file")]
    NotElf64,
    #[error("truncated or inconsistent ELF headers at offset {offset:#x}")]
    Truncated { offset: u64 },
}

/// Returns the PVH 32-bit entry address if the image has the note, `None` if it is a
/// valid ELF64 file without it.
pub fn pvh_entry(image: &[u8]) -> Result<Option<u64>, ElfNoteError> {
    if image.len() < 64 || &image[..4] != b"\x7fELF" || image[4] != 2 || image[5] != 1 {
        return Err(ElfNoteError::NotElf64);
    }
    let phoff = read_u64(image, 0x20)?;
    let phentsize = u64::from(read_u16(image, 0x36)?);
    let phnum = usize::from(read_u16(image, 0x38)?);
    if phentsize < 56 || phnum > MAX_PROGRAM_HEADERS {
        return Err(ElfNoteError::Truncated { offset: 0x36 });
    }
    for i in 0..phnum as u64 {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or(ElfNoteError::Truncated { offset: phoff })?;
        if read_u32(image, ph)? != PT_NOTE {
            continue;
        }
        let offset = read_u64(image, ph + 8)?;
        let size = read_u64(image, ph + 0x20)?;
        let notes = slice(image, offset, size)?;
        if let Some(entry) = find_phys32_entry(notes, offset)? {
            return Ok(Some(entry));
        }
    }
    Ok(None)
}

/// Walks one note segment: (namesz, descsz, type, name padded to 4, desc padded to 4)*.
fn find_phys32_entry(notes: &[u8], base: u64) -> Result<Option<u64>, ElfNoteError> {
    let mut pos: u64 = 0;
    let len = notes.len() as u64;
    while pos + 12 <= len {
        let namesz = u64::from(read_u32(notes, pos)?);
        let descsz = u64::from(read_u32(notes, pos + 4)?);
        let kind = read_u32(notes, pos + 8)?;
        let name_at = pos + 12;
        let desc_at = name_at + namesz.next_multiple_of(4);
        let next = desc_at + descsz.next_multiple_of(4);
        let err = ElfNoteError::Truncated { offset: base + pos };
        let name = slice(notes, name_at, namesz).map_err(|_| err)?;
        let desc = slice(notes, desc_at, descsz).map_err(|_| err)?;
        if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
            return match desc.len() {
                4 => Ok(Some(u64::from(read_u32(desc, 0)?))),
                8 => Ok(Some(read_u64(desc, 0)?)),
                _ => Err(err),
            };
        }
        pos = next;
    }
    Ok(None)
}

fn slice(data: &[u8], offset: u64, len: u64) -> Result<&[u8], ElfNoteError> {
    let err = ElfNoteError::Truncated { offset };
    let start = usize::try_from(offset).map_err(|_| err)?;
    let len = usize::try_from(len).map_err(|_| err)?;
    let end = start.checked_add(len).ok_or(err)?;
    data.get(start..end).ok_or(err)
}

fn read_u16(data: &[u8], at: u64) -> Result<u16, ElfNoteError> {
    let b = slice(data, at, 2)?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn read_u32(data: &[u8], at: u64) -> Result<u32, ElfNoteError> {
    let b = slice(data, at, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn read_u64(data: &[u8], at: u64) -> Result<u64, ElfNoteError> {
    let b = slice(data, at, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_le_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 file: header, one PT_NOTE program header, then `notes`.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&PT_NOTE.to_le_bytes());
        f[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
        f[ph + 0x20..ph + 0x28].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        f.extend_from_slice(notes);
        f
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    #[test]
    fn pvh_entry_found_after_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        notes.extend(note(b"Xen\0", 6, b"xen-3.0\0"));
        notes.extend(note(b"Xen\0", 0x12, &0x0100_0f80u32.to_le_bytes()));
        assert_eq!(pvh_entry(&elf_with_notes(&notes)), Ok(Some(0x0100_0f80)));
    }

    #[test]
    fn pvh_entry_absent_is_none() {
        let notes = note(b"GNU\0", 3, &[0; 20]);
        assert_eq!(pvh_entry(&elf_with_notes(&notes)), Ok(None));
    }

    #[test]
    fn pvh_entry_not_elf_rejected() {
        assert_eq!(pvh_entry(b"MZ not an elf"), Err(ElfNoteError::NotElf64));
        assert_eq!(pvh_entry(&[0x7f; 100]), Err(ElfNoteError::NotElf64));
    }

    #[test]
    fn pvh_entry_note_size_past_end_is_truncated_not_panic() {
        let mut notes = note(b"Xen\0", 0x12, &[0; 4]);
        notes[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            pvh_entry(&elf_with_notes(&notes)),
            Err(ElfNoteError::Truncated { .. })
        ));
    }

    #[test]
    fn pvh_entry_program_headers_past_end_is_truncated() {
        let mut f = elf_with_notes(&[]);
        f[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(pvh_entry(&f), Err(ElfNoteError::Truncated { .. })));
    }
}
