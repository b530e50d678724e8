//! The block device: configuration space, feature bits, the request queue, and
//! I/O straight between the backing file and guest memory (`pread`/`pwrite` on
//! the guest's own pages, no bounce buffer).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use virtio_queue::QueueT;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::request::{
    self, status, DiscardSegment, Request, RequestKind, Segment, ID_BYTES, MAX_DISCARD_SECTORS,
    SECTOR_SIZE, SEG_MAX, SIZE_MAX,
};
use crate::devices::virtio::{
    device_type, ActivateContext, ActivateError, DeviceMetrics, VirtioDevice, Watch,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// Feature bits (virtio 1.x §5.2.3).
pub mod features {
    /// `size_max` is valid.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The disk is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// FLUSH requests are supported.
    pub const FLUSH: u64 = 1 << 9;
    /// DISCARD requests are supported.
    pub const DISCARD: u64 = 1 << 13;
    /// WRITE_ZEROES requests are supported.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Bytes of the configuration space we fill (`struct virtio_blk_config` up to
/// `write_zeroes_may_unmap` and its padding).
const CONFIG_BYTES: usize = 60;
/// Chains served per wake-up before yielding to other devices on the event
/// thread: a guest that keeps refilling its ring cannot monopolise it.
const MAX_CHAINS_PER_EVENT: usize = 2 * QUEUE_SIZE as usize;

use crate::devices::virtio::SingleQueue as Active;

/// The device.
pub struct Block {
    disk: File,
    read_only: bool,
    /// Disk size in 512-byte sectors.
    capacity: u64,
    id: [u8; ID_BYTES],
    config: [u8; CONFIG_BYTES],
    active: Option<Active>,
    metrics: DeviceMetrics,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("read_only", &self.read_only)
            .field("capacity", &self.capacity)
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

fn put(config: &mut [u8], offset: usize, bytes: &[u8]) {
    config[offset..offset + bytes.len()].copy_from_slice(bytes);
}

fn build_config(capacity: u64, read_only: bool) -> [u8; CONFIG_BYTES] {
    let mut c = [0u8; CONFIG_BYTES];
    put(&mut c, 0, &capacity.to_le_bytes());
    put(&mut c, 8, &SIZE_MAX.to_le_bytes());
    put(&mut c, 12, &SEG_MAX.to_le_bytes());
    // 16..20 geometry: not offered.
    put(&mut c, 20, &(SECTOR_SIZE as u32).to_le_bytes());
    // 24..32 topology, 32 writeback, 34 num_queues: not offered.
    if !read_only {
        // A discard granularity of 4 KiB, the host filesystems' block size.
        put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(&mut c, 40, &1u32.to_le_bytes());
        put(&mut c, 44, &8u32.to_le_bytes());
        put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(&mut c, 52, &1u32.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
    }
    c
}

/// Reads exactly `slice.len()` bytes of `file` at `offset` into guest memory.
fn pread_exact<B: BitmapSlice>(
    file: &File,
    slice: &vm_memory::VolatileSlice<'_, B>,
    mut offset: u64,
) -> io::Result<()> {
    let guard = slice.ptr_guard_mut();
    let base = guard.as_ptr();
    let mut done = 0usize;
    while done < slice.len() {
        let off = libc::off64_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // `done < slice.len()`: the pointer stays inside the slice.
        let dst = base.wrapping_add(done);
        // SAFETY: `dst` points at `slice.len() - done` bytes of guest memory that
        // `guard` keeps mapped; the kernel writes at most that many.
        let n = unsafe { libc::pread64(file.as_raw_fd(), dst.cast(), slice.len() - done, off) };
        match n {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            // The file shrank under us.
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => {
                done += n as usize;
                offset += n as u64;
            }
        }
    }
    slice.bitmap().mark_dirty(0, slice.len());
    Ok(())
}

/// Writes all of `slice` (guest memory) to `file` at `offset`.
fn pwrite_all<B: BitmapSlice>(
    file: &File,
    slice: &vm_memory::VolatileSlice<'_, B>,
    mut offset: u64,
) -> io::Result<()> {
    let guard = slice.ptr_guard();
    let base = guard.as_ptr();
    let mut done = 0usize;
    while done < slice.len() {
        let off = libc::off64_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let src = base.wrapping_add(done);
        // SAFETY: `src` points at `slice.len() - done` bytes of guest memory that
        // `guard` keeps mapped; the kernel only reads them.
        let n = unsafe { libc::pwrite64(file.as_raw_fd(), src.cast(), slice.len() - done, off) };
        match n {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => {
                done += n as usize;
                offset += n as u64;
            }
        }
    }
    Ok(())
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off64_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let len = libc::off64_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    loop {
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let r = unsafe { libc::fallocate64(file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// Zeroes `len` bytes at `offset` by writing, for filesystems without ZERO_RANGE.
fn write_zeroes_slowly(file: &File, mut offset: u64, mut len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeroes = vec![0u8; 64 * 1024];
    while len > 0 {
        let n = len.min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// Opens the disk file at `path` (for writing too unless `read_only`).
pub fn open_disk(path: &Path, read_only: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))
}

impl Block {
    /// Opens `path` (read-only when `read_only`); `id` is what VIRTIO_BLK_T_GET_ID
    /// returns (at most 20 bytes are used).
    pub fn new(path: &Path, read_only: bool, id: Option<String>) -> io::Result<Self> {
        Self::with_file(open_disk(path, read_only)?, read_only, id)
    }

    /// A disk backed by the open `disk`.
    pub fn with_file(mut disk: File, read_only: bool, id: Option<String>) -> io::Result<Self> {
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size = disk.seek(SeekFrom::End(0))?;
        let capacity = size / SECTOR_SIZE;
        let mut id_bytes = [0u8; ID_BYTES];
        if let Some(id) = id {
            let n = id.len().min(ID_BYTES);
            id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        }
        Ok(Self {
            disk,
            read_only,
            capacity,
            id: id_bytes,
            config: build_config(capacity, read_only),
            active: None,
            metrics: DeviceMetrics::default(),
        })
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Runs one parsed request; returns the status and the bytes written into the
    /// guest's buffers (not counting the status byte).
    fn execute(&self, mem: &GuestMemoryMmap, req: &Request) -> (u8, u32) {
        let result = match &req.kind {
            RequestKind::In { sector, data } => self.read_to_guest(mem, *sector, data),
            RequestKind::Out { .. } | RequestKind::Discard(_) | RequestKind::WriteZeroes(_)
                if self.read_only =>
            {
                // Nothing reaches the file: it is not even open for writing.
                return (status::IOERR, 0);
            }
            RequestKind::Out { sector, data } => self.write_from_guest(mem, *sector, data),
            RequestKind::Flush => self.disk.sync_data(),
            RequestKind::GetId { data } => return self.get_id(mem, data),
            RequestKind::Discard(seg) => self.discard(seg),
            RequestKind::WriteZeroes(seg) => self.write_zeroes(seg),
            RequestKind::Unsupported(_) => return (status::UNSUPP, 0),
        };
        match result {
            Ok(()) => {
                let written = match &req.kind {
                    // Bounded by MAX_DATA_BYTES when parsed.
                    RequestKind::In { .. } => u32::try_from(req.data_len()).unwrap_or(0),
                    _ => 0,
                };
                (status::OK, written)
            }
            Err(e) => {
                tracing::warn!("virtio-blk: request failed on the host: {e}");
                DeviceMetrics::inc(&self.metrics.errors);
                (status::IOERR, 0)
            }
        }
    }

    fn read_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        sector: u64,
        data: &[Segment],
    ) -> io::Result<()> {
        let mut offset = sector * SECTOR_SIZE;
        for seg in data {
            for slice in mem.get_slices(seg.addr, seg.len as usize) {
                let slice = slice.map_err(io::Error::other)?;
                pread_exact(&self.disk, &slice, offset)?;
                offset += slice.len() as u64;
            }
        }
        Ok(())
    }

    fn write_from_guest(
        &self,
        mem: &GuestMemoryMmap,
        sector: u64,
        data: &[Segment],
    ) -> io::Result<()> {
        let mut offset = sector * SECTOR_SIZE;
        for seg in data {
            for slice in mem.get_slices(seg.addr, seg.len as usize) {
                let slice = slice.map_err(io::Error::other)?;
                pwrite_all(&self.disk, &slice, offset)?;
                offset += slice.len() as u64;
            }
        }
        Ok(())
    }

    fn get_id(&self, mem: &GuestMemoryMmap, data: &[Segment]) -> (u8, u32) {
        let mut written = 0usize;
        for seg in data {
            if written == ID_BYTES {
                break;
            }
            let n = (seg.len as usize).min(ID_BYTES - written);
            if mem
                .write_slice(&self.id[written..written + n], seg.addr)
                .is_err()
            {
                return (status::IOERR, written as u32);
            }
            written += n;
        }
        (status::OK, written as u32)
    }

    fn discard(&self, seg: &DiscardSegment) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let (off, len) = range_bytes(seg);
        match fallocate(&self.disk, mode, off, len) {
            // Discard is a hint: a filesystem that cannot punch holes keeps the data.
            Err(e) if is_unsupported(&e) => Ok(()),
            r => r,
        }
    }

    fn write_zeroes(&self, seg: &DiscardSegment) -> io::Result<()> {
        let unmap = seg.flags & 1 != 0;
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        let (off, len) = range_bytes(seg);
        match fallocate(&self.disk, mode, off, len) {
            Err(e) if is_unsupported(&e) => write_zeroes_slowly(&self.disk, off, len),
            r => r,
        }
    }

    /// Serves available requests; returns whether any was completed.
    fn process_queue(&mut self) -> bool {
        // Taken out while serving so requests can borrow the rest of `self`.
        let Some(mut a) = self.active.take() else {
            return false;
        };
        let used_any = self.serve(&mut a);
        self.active = Some(a);
        used_any
    }

    fn serve(&self, a: &mut Active) -> bool {
        let mut used_any = false;
        let mut served = 0usize;
        loop {
            // With EVENT_IDX this tells the driver not to notify while we drain the
            // ring; re-enabled below, then the ring is checked once more.
            if a.queue.disable_notification(&a.mem).is_err() {
                DeviceMetrics::inc(&self.metrics.malformed);
                break;
            }
            let mut popped = 0usize;
            while let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) {
                popped += 1;
                let head = chain.head_index();
                let descriptors = chain.map(|d| (d.addr(), d.len(), d.is_write_only()));
                let (status_byte, written, status_addr) =
                    match request::parse(&a.mem, descriptors, self.capacity) {
                        Ok(req) => {
                            let (s, w) = self.execute(&a.mem, &req);
                            if s == status::OK {
                                DeviceMetrics::add(&self.metrics.bytes, req.data_len());
                            }
                            (s, w, Some(req.status))
                        }
                        Err((e, status_addr)) => {
                            tracing::debug!("virtio-blk: malformed request: {e}");
                            DeviceMetrics::inc(&self.metrics.malformed);
                            (status::IOERR, 0, status_addr)
                        }
                    };
                let len = match status_addr {
                    Some(addr) if a.mem.write_obj(status_byte, addr).is_ok() => written + 1,
                    _ => 0,
                };
                if a.queue.add_used(&a.mem, head, len).is_err() {
                    DeviceMetrics::inc(&self.metrics.malformed);
                    continue;
                }
                DeviceMetrics::inc(&self.metrics.requests);
                used_any = true;
                served += 1;
                if served >= MAX_CHAINS_PER_EVENT {
                    break;
                }
            }
            if served >= MAX_CHAINS_PER_EVENT {
                // Come back through the event loop, after the other devices.
                let _ = a.queue_event.write(1);
                break;
            }
            match a.queue.enable_notification(&a.mem) {
                // More work, and this pass made progress: go again.
                Ok(true) if popped > 0 => continue,
                // The ring claims work yet yields no chain (an available index
                // more than a queue ahead): looping would never end.
                Ok(true) => {
                    DeviceMetrics::inc(&self.metrics.malformed);
                    break;
                }
                Ok(false) => break,
                Err(_) => {
                    DeviceMetrics::inc(&self.metrics.malformed);
                    break;
                }
            }
        }
        if used_any && a.queue.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
            DeviceMetrics::inc(&self.metrics.interrupts);
        }
        used_any
    }
}

fn range_bytes(seg: &DiscardSegment) -> (u64, u64) {
    // Parsing checked sector + num_sectors <= capacity, so neither overflows.
    (
        seg.sector * SECTOR_SIZE,
        u64::from(seg.num_sectors) * SECTOR_SIZE,
    )
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn kind(&self) -> &'static str {
        "block"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let mut f = features::SIZE_MAX
            | features::SEG_MAX
            | features::BLK_SIZE
            | features::FLUSH
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX;
        if self.read_only {
            f |= features::RO;
        } else {
            f |= features::DISCARD | features::WRITE_ZEROES;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= CONFIG_BYTES {
            return;
        }
        let n = data.len().min(CONFIG_BYTES - start);
        data[..n].copy_from_slice(&self.config[start..start + n]);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<Vec<Watch>, ActivateError> {
        let (active, watch) = Active::from_context(ctx)?;
        self.active = Some(active);
        Ok(vec![watch])
    }

    fn process_event(&mut self, _source: u32, _events: EventSet) {
        if let Some(a) = &self.active {
            a.ack_notification();
        }
        self.process_queue();
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(Active::queue_states)
            .unwrap_or_default()
    }

    /// Opens `path` as `new` did and serves it from the next request on (the device
    /// lock orders it after every request already taken); a live driver is told
    /// through a configuration change, and re-reads the capacity. What the guest has
    /// mounted from the old file is the caller's business: pods swap only slots they
    /// have not attached or have released.
    fn swap_backing(&mut self, file: File, id: Option<&str>) -> io::Result<u64> {
        let next = Self::with_file(file, self.read_only, None)?;
        self.disk = next.disk;
        self.capacity = next.capacity;
        self.config = next.config;
        if let Some(id) = id {
            let mut bytes = [0u8; ID_BYTES];
            let n = id.len().min(ID_BYTES);
            bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
            self.id = bytes;
        }
        if let Some(a) = &self.active {
            a.interrupt.signal_config_change();
            DeviceMetrics::inc(&self.metrics.interrupts);
        }
        Ok(self.capacity * SECTOR_SIZE)
    }

    /// The backing file may have been swapped at the restore (a pod template's
    /// spare slot): have the driver re-read the capacity.
    fn restored(&mut self) {
        if let Some(a) = &self.active {
            a.interrupt.signal_config_change();
            DeviceMetrics::inc(&self.metrics.interrupts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::request::{request_type, MAX_DATA_BYTES, MAX_DESCRIPTORS};
    use crate::devices::virtio::Interrupt;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;
    use vm_memory::GuestMemoryMmap;
    use vmm_sys_util::eventfd::EventFd;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const MEM_SIZE: usize = 0x100_0000;

    /// A file in the temp dir, removed on drop.
    struct TempDisk(PathBuf);

    impl TempDisk {
        fn new(contents: &[u8]) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "atoll-blk-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }
        fn read(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }

    impl Drop for TempDisk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// 8 sectors; sector n is filled with byte n + 1.
    fn pattern() -> Vec<u8> {
        (0..8u8)
            .flat_map(|n| std::iter::repeat_n(n + 1, 512))
            .collect()
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn header(m: &GuestMemoryMmap, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(HDR)).unwrap();
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// header, then `data` (len, flags), then the status byte: one chain.
    fn chain(data: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
        let mut v = vec![desc(HDR, 16, F_NEXT, 1)];
        for (i, &(addr, len, flags)) in data.iter().enumerate() {
            v.push(desc(addr, len, flags | F_NEXT, i as u16 + 2));
        }
        v.push(desc(STATUS, 1, F_WRITE, 0));
        v
    }

    fn activate_with(
        blk: &mut Block,
        m: &GuestMemoryMmap,
        q: &MockSplitQueue<GuestMemoryMmap>,
        acked_features: u64,
    ) -> EventFd {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ctx = ActivateContext {
            mem: m.clone(),
            queues: vec![q.create_queue::<Queue>().unwrap()],
            queue_events: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            acked_features,
        };
        assert_eq!(blk.activate(ctx).unwrap().len(), 1);
        irq
    }

    /// Runs `descs` through a fresh device on `disk`; returns (status byte, used len, device).
    fn run(
        disk: &TempDisk,
        read_only: bool,
        m: &GuestMemoryMmap,
        descs: &[RawDescriptor],
    ) -> (u8, u32, Block) {
        let q = MockSplitQueue::new(m, 256);
        q.add_desc_chains(descs, 0).unwrap();
        let mut blk = Block::new(&disk.0, read_only, Some("atoll-disk-0".into())).unwrap();
        activate_with(&mut blk, m, &q, 0);
        blk.process_event(0, EventSet::IN);
        assert_eq!(q.used().idx().load(), 1, "the chain must be returned");
        let len = q.used().ring().ref_at(0).unwrap().load().len();
        let st: u8 = m.read_obj(GuestAddress(STATUS)).unwrap();
        (st, len, blk)
    }

    fn malformed(blk: &Block) -> u64 {
        blk.metrics().snapshot("block").malformed
    }

    #[test]
    fn block_read_fills_guest_buffers_from_the_file() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, request_type::IN, 2);
        let (st, len, blk) = run(
            &disk,
            false,
            &m,
            &chain(&[(DATA, 512, F_WRITE), (DATA + 0x1000, 1024, F_WRITE)]),
        );
        assert_eq!(st, status::OK);
        assert_eq!(len, 1536 + 1);
        let mut a = [0u8; 512];
        m.read_slice(&mut a, GuestAddress(DATA)).unwrap();
        assert_eq!(a, [3u8; 512]);
        let mut b = [0u8; 1024];
        m.read_slice(&mut b, GuestAddress(DATA + 0x1000)).unwrap();
        assert_eq!(&b[..512], &[4u8; 512]);
        assert_eq!(&b[512..], &[5u8; 512]);
        let snap = blk.metrics().snapshot("block");
        assert_eq!((snap.requests, snap.bytes, snap.malformed), (1, 1536, 0));
    }

    #[test]
    fn block_write_reaches_the_file() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, request_type::OUT, 7);
        m.write_slice(&[0xabu8; 512], GuestAddress(DATA)).unwrap();
        let (st, len, _) = run(&disk, false, &m, &chain(&[(DATA, 512, 0)]));
        assert_eq!((st, len), (status::OK, 1));
        let f = disk.read();
        assert_eq!(&f[7 * 512..], &[0xabu8; 512]);
        assert_eq!(&f[..7 * 512], &pattern()[..7 * 512], "nothing else changed");
    }

    #[test]
    fn block_flush_succeeds() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, request_type::FLUSH, 0);
        let (st, len, _) = run(&disk, false, &m, &chain(&[]));
        assert_eq!((st, len), (status::OK, 1));
    }

    #[test]
    fn block_get_id_writes_the_serial_nul_padded() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, request_type::GET_ID, 0);
        m.write_slice(&[0x55u8; 20], GuestAddress(DATA)).unwrap();
        let (st, len, _) = run(&disk, false, &m, &chain(&[(DATA, 20, F_WRITE)]));
        assert_eq!((st, len), (status::OK, 21));
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..12], b"atoll-disk-0");
        assert_eq!(&id[12..], &[0u8; 8]);
    }

    #[test]
    fn block_read_only_disk_refuses_writes_and_keeps_the_file() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, request_type::OUT, 0);
        m.write_slice(&[0xabu8; 512], GuestAddress(DATA)).unwrap();
        let (st, len, blk) = run(&disk, true, &m, &chain(&[(DATA, 512, 0)]));
        assert_eq!((st, len), (status::IOERR, 1));
        assert_eq!(disk.read(), pattern());
        assert_ne!(blk.device_features() & features::RO, 0);
        assert_eq!(blk.device_features() & features::DISCARD, 0);
    }

    #[test]
    fn block_read_only_disk_refuses_write_zeroes() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, request_type::WRITE_ZEROES, 0);
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&4u32.to_le_bytes());
        m.write_slice(&seg, GuestAddress(DATA)).unwrap();
        let (st, _, _) = run(&disk, true, &m, &chain(&[(DATA, 16, 0)]));
        assert_eq!(st, status::IOERR);
        assert_eq!(disk.read(), pattern());
    }

    #[test]
    fn block_write_zeroes_and_discard_zero_the_range() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&1u64.to_le_bytes());
        seg[8..12].copy_from_slice(&2u32.to_le_bytes());
        m.write_slice(&seg, GuestAddress(DATA)).unwrap();
        header(&m, request_type::WRITE_ZEROES, 0);
        let (st, _, _) = run(&disk, false, &m, &chain(&[(DATA, 16, 0)]));
        assert_eq!(st, status::OK);
        let f = disk.read();
        assert_eq!(&f[512..1536], &[0u8; 1024][..]);
        assert_eq!(&f[..512], &[1u8; 512][..]);
        assert_eq!(&f[1536..2048], &[4u8; 512][..]);
        assert_eq!(f.len(), 4096, "the size is kept");

        // Discard of whole 4 KiB blocks reads back as zeroes on tmpfs/ext4/xfs.
        seg[..8].copy_from_slice(&0u64.to_le_bytes());
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        m.write_slice(&seg, GuestAddress(DATA)).unwrap();
        header(&m, request_type::DISCARD, 0);
        let (st, _, _) = run(&disk, false, &m, &chain(&[(DATA, 16, 0)]));
        assert_eq!(st, status::OK);
        assert_eq!(disk.read().len(), 4096);
    }

    #[test]
    fn block_discard_with_unknown_flags_or_two_segments_is_ioerr() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&1u32.to_le_bytes());
        seg[12..].copy_from_slice(&1u32.to_le_bytes()); // unmap is not a discard flag
        m.write_slice(&seg, GuestAddress(DATA)).unwrap();
        header(&m, request_type::DISCARD, 0);
        let (st, _, blk) = run(&disk, false, &m, &chain(&[(DATA, 16, 0)]));
        assert_eq!((st, malformed(&blk)), (status::IOERR, 1));
        header(&m, request_type::DISCARD, 0);
        let (st, _, blk) = run(&disk, false, &m, &chain(&[(DATA, 32, 0)]));
        assert_eq!((st, malformed(&blk)), (status::IOERR, 1));
        assert_eq!(disk.read(), pattern());
    }

    #[test]
    fn block_unknown_request_type_is_unsupported() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, 0x7777, 0);
        let (st, len, blk) = run(&disk, false, &m, &chain(&[]));
        assert_eq!((st, len), (status::UNSUPP, 1));
        assert_eq!(
            malformed(&blk),
            0,
            "an unknown type is legal, just unsupported"
        );
    }

    #[test]
    fn block_short_header_is_ioerr_and_malformed() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, request_type::IN, 0);
        let descs = [desc(HDR, 8, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)];
        let (st, len, blk) = run(&disk, false, &m, &descs);
        assert_eq!((st, len, malformed(&blk)), (status::IOERR, 1, 1));
    }

    #[test]
    fn block_header_split_across_descriptors_is_accepted() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, request_type::IN, 1);
        let descs = [
            desc(HDR, 4, F_NEXT, 1),
            desc(HDR + 4, 12, F_NEXT, 2),
            // Data and status in one buffer: the status is its last byte.
            desc(DATA, 513, F_WRITE, 0),
        ];
        let (_, len, blk) = run(&disk, false, &m, &descs);
        assert_eq!(len, 513);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(),
            status::OK
        );
        assert_eq!(m.read_obj::<u8>(GuestAddress(DATA + 511)).unwrap(), 2);
        assert_eq!(malformed(&blk), 0);
    }

    #[test]
    fn block_chain_without_a_writable_byte_is_returned_with_len_zero() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, request_type::OUT, 0);
        let descs = [desc(HDR, 16, F_NEXT, 1), desc(DATA, 512, 0, 0)];
        let (st, len, blk) = run(&disk, false, &m, &descs);
        assert_eq!((st, len, malformed(&blk)), (0xff, 0, 1), "status untouched");
        assert_eq!(disk.read(), pattern(), "nothing written");
    }

    #[test]
    fn block_status_outside_memory_is_returned_with_len_zero() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, request_type::FLUSH, 0);
        let descs = [
            desc(HDR, 16, F_NEXT, 1),
            desc(MEM_SIZE as u64 + 0x1000, 1, F_WRITE, 0),
        ];
        let (_, len, blk) = run(&disk, false, &m, &descs);
        assert_eq!((len, malformed(&blk)), (0, 1));
    }

    #[test]
    fn block_data_outside_memory_is_ioerr() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, request_type::IN, 0);
        let (st, len, blk) = run(
            &disk,
            false,
            &m,
            &chain(&[(MEM_SIZE as u64 - 256, 512, F_WRITE)]),
        );
        assert_eq!((st, len, malformed(&blk)), (status::IOERR, 1, 1));
    }

    #[test]
    fn block_reads_beyond_capacity_or_overflowing_are_ioerr() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        for sector in [7, 8, u64::MAX, u64::MAX / 512] {
            header(&m, request_type::IN, sector);
            let (st, _, blk) = run(&disk, false, &m, &chain(&[(DATA, 1024, F_WRITE)]));
            assert_eq!((st, malformed(&blk)), (status::IOERR, 1), "sector {sector}");
        }
        // The last sector itself is readable.
        header(&m, request_type::IN, 7);
        let (st, _, _) = run(&disk, false, &m, &chain(&[(DATA, 512, F_WRITE)]));
        assert_eq!(st, status::OK);
    }

    #[test]
    fn block_partial_sector_is_ioerr() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, request_type::OUT, 0);
        let (st, _, blk) = run(&disk, false, &m, &chain(&[(DATA, 100, 0)]));
        assert_eq!((st, malformed(&blk)), (status::IOERR, 1));
        assert_eq!(disk.read(), pattern());
    }

    #[test]
    fn block_data_in_the_wrong_direction_is_ioerr() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        // A read whose data buffer the device may not write.
        header(&m, request_type::IN, 0);
        let (st, _, blk) = run(&disk, false, &m, &chain(&[(DATA, 512, 0)]));
        assert_eq!((st, malformed(&blk)), (status::IOERR, 1));
        // A write whose data the device would have to write.
        header(&m, request_type::OUT, 0);
        let (st, _, blk) = run(&disk, false, &m, &chain(&[(DATA, 512, F_WRITE)]));
        assert_eq!((st, malformed(&blk)), (status::IOERR, 1));
        assert_eq!(disk.read(), pattern());
    }

    #[test]
    fn block_readable_after_writable_is_ioerr() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, request_type::OUT, 0);
        let descs = [
            desc(HDR, 16, F_NEXT, 1),
            desc(DATA + 0x1000, 4, F_WRITE | F_NEXT, 2),
            desc(DATA, 512, F_NEXT, 3),
            desc(STATUS, 1, F_WRITE, 0),
        ];
        let (st, _, blk) = run(&disk, false, &m, &descs);
        assert_eq!((st, malformed(&blk)), (status::IOERR, 1));
        assert_eq!(disk.read(), pattern());
    }

    #[test]
    fn block_request_larger_than_the_limit_is_ioerr() {
        let disk = TempDisk::new(&vec![0u8; 2 * MAX_DATA_BYTES as usize]);
        let m = mem();
        header(&m, request_type::IN, 0);
        let (st, _, blk) = run(
            &disk,
            false,
            &m,
            &chain(&[(0x10_0000, MAX_DATA_BYTES + 512, F_WRITE)]),
        );
        assert_eq!((st, malformed(&blk)), (status::IOERR, 1));
    }

    #[test]
    fn block_too_many_descriptors_is_ioerr_with_status() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, request_type::IN, 0);
        let data: Vec<_> = (0..MAX_DESCRIPTORS as u64)
            .map(|i| (DATA + i * 512, 0x200, F_WRITE))
            .collect();
        let (st, len, blk) = run(&disk, false, &m, &chain(&data));
        assert_eq!((st, len, malformed(&blk)), (status::IOERR, 1, 1));
    }

    #[test]
    fn block_config_space_reports_capacity_and_limits() {
        let disk = TempDisk::new(&[0u8; 4096 + 100]);
        let blk = Block::new(&disk.0, false, None).unwrap();
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(
            u64::from_le_bytes(cap),
            8,
            "a partial last sector is not exposed"
        );
        let mut seg_max = [0u8; 4];
        blk.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
        let mut beyond = [0xffu8; 4];
        blk.read_config(CONFIG_BYTES as u64 - 2, &mut beyond);
        assert_eq!(beyond, [0; 4]);
        blk.read_config(u64::MAX, &mut beyond);
        assert_eq!(beyond, [0; 4]);
    }

    #[test]
    fn block_missing_file_is_an_error_naming_the_path() {
        let err = Block::new(Path::new("/nonexistent/disk.img"), true, None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
    }

    #[test]
    fn block_with_event_idx_completes_and_interrupts() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        header(&m, request_type::IN, 0);
        let q = MockSplitQueue::new(&m, 256);
        q.add_desc_chains(&chain(&[(DATA, 512, F_WRITE)]), 0)
            .unwrap();
        let mut blk = Block::new(&disk.0, false, None).unwrap();
        let irq = activate_with(&mut blk, &m, &q, VIRTIO_RING_F_EVENT_IDX);
        blk.process_event(0, EventSet::IN);
        assert_eq!(q.used().idx().load(), 1);
        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn block_available_index_beyond_the_queue_does_not_loop_forever() {
        let disk = TempDisk::new(&pattern());
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        // avail.idx 1000 with next_avail 0: more than a queue's worth "available".
        q.avail().idx().store(1000);
        let mut blk = Block::new(&disk.0, false, None).unwrap();
        activate_with(&mut blk, &m, &q, VIRTIO_RING_F_EVENT_IDX);
        blk.process_event(0, EventSet::IN);
        assert_eq!(q.used().idx().load(), 0);
        assert_eq!(malformed(&blk), 1);
    }

    #[test]
    fn block_events_before_activation_or_after_reset_do_nothing() {
        let disk = TempDisk::new(&pattern());
        let mut blk = Block::new(&disk.0, false, None).unwrap();
        blk.process_event(0, EventSet::IN);
        blk.reset();
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        activate_with(&mut blk, &m, &q, 0);
        blk.reset();
        blk.process_event(0, EventSet::IN);
        assert_eq!(blk.metrics().snapshot("block").requests, 0);
    }

    #[test]
    fn block_swap_serves_the_new_file_its_size_and_id_and_tells_the_driver() {
        let empty = TempDisk::new(&[]);
        let image = TempDisk::new(&pattern());
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let mut blk = Block::new(&empty.0, true, Some("slot0".into())).unwrap();
        let irq = activate_with(&mut blk, &m, &q, 0);
        assert_eq!(blk.capacity(), 0);
        let bytes = blk
            .swap_backing(open_disk(&image.0, true).unwrap(), Some("img-1"))
            .unwrap();
        assert_eq!(bytes, 8 * 512);
        assert_eq!(irq.read().unwrap(), 1, "a config change reaches the driver");
        assert_eq!(blk.capacity(), 8);
        let mut cfg = [0u8; 8];
        blk.read_config(0, &mut cfg);
        assert_eq!(
            u64::from_le_bytes(cfg),
            8,
            "the config space has the new size"
        );
        assert_eq!(&blk.id[..6], b"img-1\0");
        // A read now comes from the new file, and writes stay refused.
        header(&m, request_type::IN, 5);
        q.add_desc_chains(&chain(&[(DATA, 512, F_WRITE)]), 0)
            .unwrap();
        blk.process_event(0, EventSet::IN);
        let mut a = [0u8; 512];
        m.read_slice(&mut a, GuestAddress(DATA)).unwrap();
        assert_eq!(a, [6u8; 512]);
        // A file that cannot be sized (a pipe) leaves the device as it was.
        let (pipe, _w) = std::io::pipe().unwrap();
        let pipe = File::from(std::os::fd::OwnedFd::from(pipe));
        assert!(blk.swap_backing(pipe, Some("img-2")).is_err());
        assert_eq!((blk.capacity(), &blk.id[..6]), (8, &b"img-1\0"[..]));
    }
}
