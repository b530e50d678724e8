//! Shared by the fuzz targets: a small guest memory laid out from the input, and a
//! split queue over it.
//!
//! Layout (guest physical): two adjacent regions 0..32 KiB and 32..64 KiB (buffers
//! may straddle them) and a lone page at 128 KiB (a gap in between). The queue is
//! packed at the start so that short inputs reach its rings: descriptor table at
//! 0, available ring right after it (16 * size), used ring after that (4-aligned);
//! everything, rings included, is filled from the fuzzer's bytes.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const DESC_TABLE: u64 = 0x0;
pub const MEM_BYTES: usize = 0x1_0000;

/// Options taken from the first input byte.
pub struct Setup {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    /// Bits 0-2: log2 of the queue size; the targets use the others as options.
    #[allow(dead_code)]
    pub flags: u8,
}

/// Builds memory and a ready queue from `data`, or None if the input is too short
/// or the queue would not pass the transport's validity check.
pub fn setup(data: &[u8]) -> Option<Setup> {
    let (&flags, rest) = data.split_first()?;
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x8000),
        (GuestAddress(0x8000), 0x8000),
        (GuestAddress(0x2_0000), 0x1000),
    ])
    .ok()?;
    let n = rest.len().min(MEM_BYTES);
    mem.write_slice(&rest[..n], GuestAddress(0)).ok()?;
    if rest.len() > MEM_BYTES {
        let extra = &rest[MEM_BYTES..];
        let m = extra.len().min(0x1000);
        mem.write_slice(&extra[..m], GuestAddress(0x2_0000)).ok()?;
    }
    // Queue sizes 1..=256, powers of two.
    let size = 1u16 << (flags & 0x7).min(8);
    let mut queue = Queue::new(256).ok()?;
    queue.set_size(size);
    let avail = DESC_TABLE + 16 * u64::from(size);
    // flags, idx, ring[size], used_event
    let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_ready(true);
    if !queue.is_valid(&mem) {
        return None;
    }
    Some(Setup { mem, queue, flags })
}
