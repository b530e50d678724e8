//! Guest RAM: a memfd for a fresh VM (shmem, so it can be written out page by page
//! and, where the host allows shmem THP, backed by huge pages), or a snapshot's
//! memory file mapped copy-on-write for a restored one (lazy: a page is read from
//! the page cache, shared by every clone of that snapshot, when the guest first
//! touches it), or, asked for, anonymous memory that a userfaultfd page server
//! fills from the memory file ([`super::uffd`]).
//!
//! The memory file is the guest's RAM regions back to back, sparse where the guest
//! never wrote, followed by one page of trailer that names the snapshot it belongs
//! to, so a state file cannot be paired with another snapshot's memory.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
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
    /// Anonymous memory filled from a snapshot's memory file by a page server
    /// (restore with `--mem-backend uffd`).
    Uffd(super::uffd::PageServer),
}

/// How a restore brings the snapshot's memory in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MemBackend {
    /// The memory file mapped copy-on-write: pages come from the page cache, shared
    /// by every clone of the snapshot.
    #[default]
    File,
    /// Anonymous memory; a userfaultfd page server copies each page in from the
    /// memory file on first touch (every clone has its own copies).
    Uffd,
}

/// Guest memory with what backs it.
#[derive(Debug)]
pub struct GuestRam {
    /// What backs it (first: a page server stops before the mapping goes).
    pub backing: Backing,
    /// The mapping the VM and the devices use.
    pub memory: GuestMemoryMmap,
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
pub fn restore(
    input: &crate::persist::Input,
    mem_size: u64,
    id: &[u8; 16],
) -> Result<GuestRam, MemoryError> {
    let file = Arc::new(open_checked(input, mem_size, id)?);
    let memory = map(&file, mem_size, libc::MAP_PRIVATE | libc::MAP_NORESERVE)?;
    Ok(GuestRam {
        memory,
        backing: Backing::Snapshot(file),
        size: mem_size,
    })
}

/// Guest RAM of `mem_size` bytes for snapshot `id` as anonymous memory whose pages
/// a userfaultfd page server copies in from the memory file at `input` as they
/// are first touched ([`super::uffd`]).
pub fn restore_uffd(
    input: &crate::persist::Input,
    mem_size: u64,
    id: &[u8; 16],
) -> Result<GuestRam, MemoryError> {
    let file = Arc::new(open_checked(input, mem_size, id)?);
    let mut regions = Vec::new();
    let mut mapped = Vec::new();
    for (addr, offset, len) in layout_of(mem_size) {
        let region: MmapRegion = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(MemoryError::Map)?;
        let host = region.as_ptr() as u64;
        // Named like a boot's memfd in /proc/PID/smaps (Linux 5.17+; a name only).
        // SAFETY: prctl(PR_SET_VMA_ANON_NAME) on a range we just mapped, with a
        // NUL-terminated literal; it changes no memory.
        let _ = unsafe {
            libc::prctl(
                libc::PR_SET_VMA,
                libc::PR_SET_VMA_ANON_NAME,
                host,
                len,
                c"atoll-guest-ram".as_ptr(),
            )
        };
        regions.push(super::uffd::Region {
            host,
            offset,
            len: len as u64,
        });
        mapped.push(
            GuestRegionMmap::new(region, addr)
                .ok_or(MemoryError::Map(MmapRegionError::InvalidPointer))?,
        );
    }
    let memory = GuestMemoryMmap::from_regions(mapped)
        .map_err(|_| MemoryError::Map(MmapRegionError::InvalidPointer))?;
    let server =
        super::uffd::PageServer::start(file, regions).map_err(|source| MemoryError::Create {
            mib: mem_size >> 20,
            source: io::Error::new(
                source.kind(),
                format!(
                    "userfaultfd: {source} (it needs CAP_SYS_PTRACE; without it, restore \
                     with --mem-backend file)"
                ),
            ),
        })?;
    Ok(GuestRam {
        memory,
        backing: Backing::Uffd(server),
        size: mem_size,
    })
}

/// Opens the memory file `input` after checking that it was written for snapshot
/// `id` with `mem_size` bytes of RAM.
fn open_checked(
    input: &crate::persist::Input,
    mem_size: u64,
    id: &[u8; 16],
) -> Result<File, MemoryError> {
    let shown = input.path.display().to_string();
    let file = input.open().map_err(|source| MemoryError::Open {
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
    Ok(file)
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
            // With a page server, every page not there yet is copied in to be read.
            Backing::Snapshot(_) | Backing::Uffd(_) => vec![(0, self.size)],
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

/// First bytes of a working-set file.
const WS_MAGIC: &[u8; 8] = b"ATOLLWS1";
/// Most ranges a working-set file may hold.
const WS_MAX_RANGES: u64 = 1 << 20;

/// Pages of guest RAM that a restored VM touched: (offset in the memory file,
/// length) ranges, page-aligned, sorted and disjoint. Recorded once from a probe
/// restore (`PUT /snapshot/working-set`) and prefetched by every later restore
/// (`--working-set`), so the guest does not fault them in one by one: the REAP
/// idea, done with MADV_POPULATE_READ and KVM_PRE_FAULT_MEMORY instead of
/// userfaultfd (no fault ever goes through user space).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkingSet {
    /// The ranges.
    pub ranges: Vec<(u64, u64)>,
}

/// Why a working set could not be recorded, read or applied.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// Reading /proc/self/pagemap or the file.
    #[error("cannot {what} the working set {path}")]
    Io {
        /// read or write.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not a working-set file for this RAM.
    #[error("{path} is not a usable working-set file ({why}); record it again")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

impl WorkingSet {
    /// Total bytes.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }

    /// Writes the set to `out`.
    pub fn write(&self, out_file: &crate::persist::Output) -> Result<(), WorkingSetError> {
        let mut out = Vec::with_capacity(16 + self.ranges.len() * 16);
        out.extend_from_slice(WS_MAGIC);
        out.extend_from_slice(&(self.ranges.len() as u64).to_le_bytes());
        for (off, len) in &self.ranges {
            out.extend_from_slice(&off.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        out_file
            .write(|mut f| f.write_all(&out))
            .map_err(|source| WorkingSetError::Io {
                what: "write",
                path: out_file.shown().display().to_string(),
                source,
            })
    }

    /// Reads a set from `path`, checking it against RAM of `mem_size` bytes.
    pub fn read(input: &crate::persist::Input, mem_size: u64) -> Result<Self, WorkingSetError> {
        let shown = input.path.display().to_string();
        let corrupt = |why: String| WorkingSetError::Corrupt {
            path: shown.clone(),
            why,
        };
        let mut bytes = Vec::new();
        input
            .open()
            .and_then(|f| f.take(16 + WS_MAX_RANGES * 16 + 1).read_to_end(&mut bytes))
            .map_err(|source| WorkingSetError::Io {
                what: "read",
                path: shown.clone(),
                source,
            })?;
        if bytes.len() < 16 || &bytes[..8] != WS_MAGIC {
            return Err(corrupt("no ATOLLWS1 header".into()));
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let count = word(8);
        if count > WS_MAX_RANGES || bytes.len() as u64 != 16 + count * 16 {
            return Err(corrupt(format!("{count} ranges in {} bytes", bytes.len())));
        }
        let mut ranges = Vec::with_capacity(count as usize);
        let mut end = 0u64;
        for i in 0..count as usize {
            let (off, len) = (word(16 + i * 16), word(24 + i * 16));
            let fits = off.is_multiple_of(PAGE as u64)
                && len.is_multiple_of(PAGE as u64)
                && len > 0
                && off >= end
                && off.checked_add(len).is_some_and(|e| e <= mem_size);
            if !fits {
                return Err(corrupt(format!(
                    "range {i} ({off:#x}+{len:#x}) is unaligned, overlapping or outside {} MiB",
                    mem_size >> 20
                )));
            }
            end = off + len;
            ranges.push((off, len));
        }
        Ok(Self { ranges })
    }
}

/// This process's `/proc/self/pagemap`, opened once: call it before the jail
/// (crate::jail), which leaves no `/proc` to open. An open pagemap keeps reading the
/// address space it was opened for.
pub fn pagemap() -> io::Result<&'static File> {
    static PAGEMAP: std::sync::OnceLock<File> = std::sync::OnceLock::new();
    if let Some(f) = PAGEMAP.get() {
        return Ok(f);
    }
    let f = File::open("/proc/self/pagemap")?;
    Ok(PAGEMAP.get_or_init(|| f))
}

impl GuestRam {
    /// The pages of guest RAM resident in this process now (from /proc/self/pagemap).
    pub fn resident(&self) -> Result<WorkingSet, WorkingSetError> {
        let io = |source| WorkingSetError::Io {
            what: "read",
            path: "/proc/self/pagemap".into(),
            source,
        };
        let pagemap = pagemap().map_err(io)?;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut entries = vec![0u8; 8 * 512];
        for (addr, offset, len) in layout_of(self.size) {
            let host = self
                .memory
                .get_host_address(addr)
                .map_err(|e| io(io::Error::other(e.to_string())))? as u64;
            let pages = (len / PAGE) as u64;
            let mut page = 0u64;
            while page < pages {
                let n = (pages - page).min(512);
                let buf = &mut entries[..(n * 8) as usize];
                pagemap
                    .read_exact_at(buf, (host / PAGE as u64 + page) * 8)
                    .map_err(io)?;
                for (i, e) in buf.chunks_exact(8).enumerate() {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(e);
                    // Bit 63: present in RAM.
                    if u64::from_le_bytes(w) >> 63 == 1 {
                        let at = offset + (page + i as u64) * PAGE as u64;
                        match ranges.last_mut() {
                            Some(last) if last.0 + last.1 == at => last.1 += PAGE as u64,
                            _ => ranges.push((at, PAGE as u64)),
                        }
                    }
                }
                page += n;
            }
        }
        Ok(WorkingSet { ranges })
    }

    /// Maps the pages of `ws` into this process at once, read-only from the page
    /// cache (a write still copies its page on first touch), instead of one fault per
    /// page once the guest runs. Returns the guest-physical ranges, for KVM's own
    /// prefault of its page tables. (Populating for write, which copies every page up
    /// front, measured 3.7x slower to agent-ready than not prefetching at all in the
    /// nested node; for read it measured 7% faster: docs/vmm-api.md.)
    pub fn populate(&self, ws: &WorkingSet) -> Result<Vec<(u64, u64)>, WorkingSetError> {
        let server = match &self.backing {
            Backing::Uffd(s) => Some(s),
            _ => None,
        };
        if let Some(s) = server {
            // Copied in by the page server, a range at a time.
            s.prefetch(&ws.ranges)
                .map_err(|source| WorkingSetError::Io {
                    what: "prefetch",
                    path: "guest memory".into(),
                    source,
                })?;
        }
        let mut done = Vec::with_capacity(ws.ranges.len());
        for &(off, len) in &ws.ranges {
            for (addr, region_off, rlen) in layout_of(self.size) {
                let lo = off.max(region_off);
                let hi = (off + len).min(region_off + rlen as u64);
                if lo >= hi {
                    continue;
                }
                let gpa = addr.0 + (lo - region_off);
                let host = self
                    .memory
                    .get_host_address(GuestAddress(gpa))
                    .map_err(|e| WorkingSetError::Io {
                        what: "map",
                        path: "guest memory".into(),
                        source: io::Error::other(e.to_string()),
                    })?;
                if server.is_some() {
                    done.push((gpa, hi - lo));
                    continue;
                }
                // SAFETY: `host..host + (hi - lo)` lies inside one region's live
                // mapping (clipped above); MADV_POPULATE_READ only faults pages in,
                // changing no contents.
                let r = unsafe {
                    libc::madvise(
                        host.cast::<libc::c_void>(),
                        (hi - lo) as usize,
                        libc::MADV_POPULATE_READ,
                    )
                };
                if r != 0 {
                    return Err(WorkingSetError::Io {
                        what: "prefetch",
                        path: "guest memory".into(),
                        source: io::Error::last_os_error(),
                    });
                }
                done.push((gpa, hi - lo));
            }
        }
        Ok(done)
    }
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

        let back = restore(&crate::persist::Input::path(&path), 64 << 20, &id).unwrap();
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
        let again = restore(&crate::persist::Input::path(&path), 64 << 20, &id).unwrap();
        assert_eq!(
            again.memory.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn working_set_records_touched_pages_and_round_trips() {
        let ram = create(32 << 20).unwrap();
        ram.memory.write_obj(1u8, GuestAddress(0x5000)).unwrap();
        ram.memory.write_obj(1u8, GuestAddress(0x6000)).unwrap();
        ram.memory.write_obj(1u8, GuestAddress(0x10_0000)).unwrap();
        let ws = ram.resident().unwrap();
        assert_eq!(ws.ranges, vec![(0x5000, 0x2000), (0x10_0000, 0x1000)]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ws");
        ws.write(&crate::persist::Output::Path(path.clone()))
            .unwrap();
        assert_eq!(
            WorkingSet::read(&crate::persist::Input::path(&path), 32 << 20).unwrap(),
            ws
        );
        let err = WorkingSet::read(&crate::persist::Input::path(&path), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside 1 MiB"), "{err}");
        std::fs::write(&path, b"ATOLLWS1\x01\0\0\0\0\0\0\0").unwrap();
        assert!(
            WorkingSet::read(&crate::persist::Input::path(&path), 32 << 20).is_err(),
            "count without ranges"
        );
        // Populating a fresh mapping makes exactly those pages resident.
        let other = create(32 << 20).unwrap();
        assert!(other.resident().unwrap().ranges.is_empty());
        let host = other.populate(&ws).unwrap();
        assert_eq!(host, vec![(0x5000, 0x2000), (0x10_0000, 0x1000)]);
        assert_eq!(other.resident().unwrap(), ws);
    }

    #[test]
    fn memory_restore_refuses_other_snapshots_and_wrong_sizes() {
        let ram = create(32 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        ram.dump(&File::create(&path).unwrap(), &[1; 16]).unwrap();
        let err = restore(&crate::persist::Input::path(&path), 32 << 20, &[2; 16])
            .unwrap_err()
            .to_string();
        assert!(err.contains("another snapshot"), "{err}");
        let err = restore(&crate::persist::Input::path(&path), 64 << 20, &[1; 16])
            .unwrap_err()
            .to_string();
        assert!(err.contains("need"), "{err}");
        std::fs::write(&path, vec![0u8; (32 << 20) + 4096]).unwrap();
        let err = restore(&crate::persist::Input::path(&path), 32 << 20, &[1; 16])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no Atoll memory trailer"), "{err}");
        let err = restore(
            &crate::persist::Input::path(dir.path().join("none")),
            32 << 20,
            &[1; 16],
        )
        .unwrap_err();
        assert!(matches!(err, MemoryError::Open { .. }));
    }
}
