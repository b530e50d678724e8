//! Guest RAM: a memfd for a fresh VM (shmem, so it can be written out page by page
//! and, where the host allows shmem THP, backed by huge pages), or a snapshot's
//! memory file mapped copy-on-write for a restored one (lazy: a page is read from
//! the page cache, shared by every clone of that snapshot, when the guest first
//! touches it).
//!
//! The memory file is the guest's RAM regions back to back, sparse where the guest
//! never wrote, followed by one page of trailer that names the snapshot it belongs
//! to, so a state file cannot be paired with another snapshot's memory.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::Arc;

use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use crate::arch::x86_64::layout;

/// Size of the trailer page after the RAM in a memory file.
pub const TRAILER_SIZE: u64 = 4096;
const TRAILER_MAGIC: &[u8; 8] = b"ATOLLMEM";
const TRAILER_VERSION: u32 = 1;
const PAGE: usize = 4096;

/// Why guest memory could not be set up or saved.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate.
    #[error("cannot create {mib} MiB of guest memory")]
    Create {
        /// Size asked for.
        mib: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// mmap.
    #[error("cannot map guest memory: {0:?}")]
    Map(MmapRegionError),
    /// Opening the snapshot memory file.
    #[error("cannot open the snapshot memory file {path}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The memory file does not belong with the state file.
    #[error(
        "the memory file {path} does not belong to this snapshot ({why}); give the memory \
         file written together with the state file, or take a new snapshot"
    )]
    Mismatch {
        /// The file.
        path: String,
        /// What differs.
        why: String,
    },
    /// Writing the memory file.
    #[error("cannot write the snapshot memory file")]
    Write(#[source] io::Error),
}

/// Where guest RAM lives.
#[derive(Debug)]
pub enum Backing {
    /// A memfd owned by this VM (fresh boot).
    Memfd(Arc<File>),
    /// A snapshot memory file mapped privately (restore).
    Snapshot(Arc<File>),
}

/// Guest memory with what backs it.
#[derive(Debug)]
pub struct GuestRam {
    /// The mapping the VM and the devices use.
    pub memory: GuestMemoryMmap,
    /// What backs it.
    pub backing: Backing,
    /// RAM size in bytes.
    pub size: u64,
}

/// (guest address, offset in the memory file, length) of each RAM region.
fn layout_of(mem_size: u64) -> Vec<(GuestAddress, u64, usize)> {
    let mut offset = 0;
    layout::ram_ranges(mem_size)
        .into_iter()
        .map(|(start, len)| {
            let r = (GuestAddress(start), offset, len as usize);
            offset += len;
            r
        })
        .collect()
}

fn map(file: &Arc<File>, mem_size: u64, flags: i32) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = layout_of(mem_size)
        .into_iter()
        .map(|(addr, offset, len)| {
            let region: MmapRegion = MmapRegionBuilder::new(len)
                .with_file_offset(FileOffset::from_arc(file.clone(), offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .build()
                .map_err(MemoryError::Map)?;
            GuestRegionMmap::new(region, addr)
                .ok_or(MemoryError::Map(MmapRegionError::InvalidPointer))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions)
        .map_err(|_| MemoryError::Map(MmapRegionError::InvalidPointer))
}

/// Fresh guest RAM of `mem_size` bytes in a memfd, advised to use huge pages.
pub fn create(mem_size: u64) -> Result<GuestRam, MemoryError> {
    let create_err = |source| MemoryError::Create {
        mib: mem_size >> 20,
        source,
    };
    // SAFETY: the name is a NUL-terminated literal; the flags are valid.
    let fd = unsafe { libc::memfd_create(c"atoll-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(create_err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = Arc::new(unsafe { File::from_raw_fd(fd) });
    file.set_len(mem_size).map_err(create_err)?;
    let memory = map(&file, mem_size, libc::MAP_SHARED | libc::MAP_NORESERVE)?;
    for region in memory.iter() {
        let host = region.as_ptr();
        // Huge pages where the host's shmem THP setting allows (`advise` or
        // `always` in /sys/kernel/mm/transparent_hugepage/shmem_enabled): one 2 MiB
        // fault instead of 512, and 2 MiB stage-2 mappings. Advice only.
        // SAFETY: `host..host+len` is exactly a mapping `memory` owns; MADV_HUGEPAGE
        // changes neither contents nor validity.
        let _ = unsafe {
            libc::madvise(
                host.cast::<libc::c_void>(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
    }
    Ok(GuestRam {
        memory,
        backing: Backing::Memfd(file),
        size: mem_size,
    })
}

/// The trailer that ends a memory file written for snapshot `id`.
fn trailer(mem_size: u64, id: &[u8; 16]) -> Vec<u8> {
    let mut t = vec![0u8; TRAILER_SIZE as usize];
    t[..8].copy_from_slice(TRAILER_MAGIC);
    t[8..12].copy_from_slice(&TRAILER_VERSION.to_le_bytes());
    t[16..24].copy_from_slice(&mem_size.to_le_bytes());
    t[24..40].copy_from_slice(id);
    t
}

/// Maps the memory file at `path` copy-on-write as guest RAM of `mem_size` bytes,
/// after checking that it was written for snapshot `id` with that size.
pub fn restore(path: &Path, mem_size: u64, id: &[u8; 16]) -> Result<GuestRam, MemoryError> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|source| MemoryError::Open {
        path: shown.clone(),
        source,
    })?;
    let mismatch = |why: String| MemoryError::Mismatch {
        path: shown.clone(),
        why,
    };
    let len = file
        .metadata()
        .map_err(|source| MemoryError::Open {
            path: shown.clone(),
            source,
        })?
        .len();
    if len != mem_size + TRAILER_SIZE {
        return Err(mismatch(format!(
            "it holds {len} bytes, the snapshot's {} MiB of RAM need {}",
            mem_size >> 20,
            mem_size + TRAILER_SIZE
        )));
    }
    let mut found = vec![0u8; TRAILER_SIZE as usize];
    file.read_exact_at(&mut found, mem_size)
        .map_err(|source| MemoryError::Open {
            path: shown.clone(),
            source,
        })?;
    if found[..8] != TRAILER_MAGIC[..] {
        return Err(mismatch("it has no Atoll memory trailer".into()));
    }
    if found != trailer(mem_size, id) {
        return Err(mismatch("it was written for another snapshot".into()));
    }
    let file = Arc::new(file);
    let memory = map(&file, mem_size, libc::MAP_PRIVATE | libc::MAP_NORESERVE)?;
    Ok(GuestRam {
        memory,
        backing: Backing::Snapshot(file),
        size: mem_size,
    })
}

/// What writing a memory file did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DumpStats {
    /// Bytes of RAM scanned.
    pub scanned: u64,
    /// Bytes written (non-zero pages).
    pub written: u64,
}

/// The data ranges (file offset, length) of a memfd: the parts the guest ever
/// touched. Holes read as zeros and need not be looked at.
fn data_ranges(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let end = i64::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    while pos < end {
        // SAFETY: lseek on an fd we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let hole = hole.min(end);
        if hole > data {
            out.push((data as u64, (hole - data) as u64));
        }
        pos = hole;
    }
    Ok(out)
}

impl GuestRam {
    /// Writes RAM to `out` (which must be empty) as a sparse memory file for
    /// snapshot `id`: non-zero pages at their offsets, then the trailer. The vCPUs
    /// and devices must be paused.
    pub fn dump(&self, out: &File, id: &[u8; 16]) -> Result<DumpStats, MemoryError> {
        let mut stats = DumpStats::default();
        let regions = layout_of(self.size);
        // A memfd tells which parts were ever written; a private mapping of a
        // snapshot does not (its copied pages are anonymous), so scan it all.
        let ranges = match &self.backing {
            Backing::Memfd(f) => data_ranges(f, self.size).map_err(MemoryError::Write)?,
            Backing::Snapshot(_) => vec![(0, self.size)],
        };
        for (start, len) in ranges {
            for &(addr, offset, rlen) in &regions {
                // The part of [start, start+len) inside this region.
                let lo = start.max(offset);
                let hi = (start + len).min(offset + rlen as u64);
                if lo >= hi {
                    continue;
                }
                let ptr = self
                    .memory
                    .get_host_address(GuestAddress(addr.0 + (lo - offset)))
                    .map_err(|e| MemoryError::Write(io::Error::other(e.to_string())))?;
                // SAFETY: `ptr..ptr + (hi - lo)` lies inside one region's live mapping
                // (clipped to the region above), which `self.memory` keeps mapped; the
                // vCPUs and devices are paused, so nothing writes it while we read.
                let bytes = unsafe { std::slice::from_raw_parts(ptr, (hi - lo) as usize) };
                stats.scanned += hi - lo;
                stats.written += write_nonzero(out, bytes, lo).map_err(MemoryError::Write)?;
            }
        }
        out.write_all_at(&trailer(self.size, id), self.size)
            .map_err(MemoryError::Write)?;
        out.set_len(self.size + TRAILER_SIZE)
            .map_err(MemoryError::Write)?;
        Ok(stats)
    }
}

/// Writes the non-zero pages of `bytes` to `out` at `offset + their position`,
/// contiguous runs in one call; returns the bytes written.
fn write_nonzero(out: &File, bytes: &[u8], offset: u64) -> io::Result<u64> {
    let mut written = 0u64;
    let mut run: Option<usize> = None;
    let pages = bytes.len().div_ceil(PAGE);
    for i in 0..=pages {
        let page = (i < pages).then(|| &bytes[i * PAGE..((i + 1) * PAGE).min(bytes.len())]);
        let nonzero = page.is_some_and(|p| p.iter().any(|&b| b != 0));
        match (run, nonzero) {
            (None, true) => run = Some(i),
            (Some(s), false) => {
                let end = (i * PAGE).min(bytes.len());
                out.write_all_at(&bytes[s * PAGE..end], offset + (s * PAGE) as u64)?;
                written += (end - s * PAGE) as u64;
                run = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_dump_then_restore_round_trips_and_stays_sparse() {
        let ram = create(64 << 20).unwrap();
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        ram.memory
            .write_obj(0x1234_u16, GuestAddress(0x3ff_fffe))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let out = File::create(&path).unwrap();
        let id = [7u8; 16];
        let stats = ram.dump(&out, &id).unwrap();
        assert_eq!(stats.written, 2 * 4096, "two touched pages written");
        assert!(stats.scanned < 64 << 20, "holes are skipped: {stats:?}");
        drop(out);
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), (64 << 20) + TRAILER_SIZE);
        assert!(meta.blocks() * 512 < 1 << 20, "the file is sparse");

        let back = restore(&path, 64 << 20, &id).unwrap();
        assert_eq!(
            back.memory.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            back.memory
                .read_obj::<u16>(GuestAddress(0x3ff_fffe))
                .unwrap(),
            0x1234
        );
        // Copy-on-write: the clone's writes never reach the file.
        back.memory.write_obj(1u32, GuestAddress(0x1000)).unwrap();
        let again = restore(&path, 64 << 20, &id).unwrap();
        assert_eq!(
            again.memory.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn memory_restore_refuses_other_snapshots_and_wrong_sizes() {
        let ram = create(32 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        ram.dump(&File::create(&path).unwrap(), &[1; 16]).unwrap();
        let err = restore(&path, 32 << 20, &[2; 16]).unwrap_err().to_string();
        assert!(err.contains("another snapshot"), "{err}");
        let err = restore(&path, 64 << 20, &[1; 16]).unwrap_err().to_string();
        assert!(err.contains("need"), "{err}");
        std::fs::write(&path, vec![0u8; (32 << 20) + 4096]).unwrap();
        let err = restore(&path, 32 << 20, &[1; 16]).unwrap_err().to_string();
        assert!(err.contains("no Atoll memory trailer"), "{err}");
        let err = restore(&dir.path().join("none"), 32 << 20, &[1; 16]).unwrap_err();
        assert!(matches!(err, MemoryError::Open { .. }));
    }
}
