//! Arbitrary guest memory, descriptor table and available ring, served by the
//! virtio-blk device against a small in-memory disk. Must never panic, hang or
//! touch memory outside the guest's.

#![no_main]

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use atoll_vmm::devices::virtio::block::Block;
use atoll_vmm::devices::virtio::{
    ActivateContext, Interrupt, VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

#[path = "common.rs"]
mod common;

/// A 64 KiB (128-sector) disk in a memfd, shared by every run of the process.
fn disk() -> &'static PathBuf {
    static DISK: OnceLock<(OwnedFd, PathBuf)> = OnceLock::new();
    &DISK
        .get_or_init(|| {
            // SAFETY: the name is a valid C string; the fd is checked below.
            let fd = unsafe { libc::memfd_create(c"atoll-fuzz-disk".as_ptr(), 0) };
            assert!(fd >= 0, "memfd_create failed");
            // SAFETY: `fd` is a fresh fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: plain syscall on our fd.
            assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 64 * 1024) }, 0);
            let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            (fd, path)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let Some(s) = common::setup(data) else {
        return;
    };
    let read_only = s.flags & 0x10 != 0;
    let event_idx = s.flags & 0x20 != 0;
    let mut blk = Block::new(disk(), read_only, Some("fuzz".into())).expect("open the disk");
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let ctx = ActivateContext {
        mem: s.mem.clone(),
        queues: vec![s.queue],
        queue_events: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
        interrupt: Arc::new(Interrupt::new(irq)),
        acked_features: if event_idx {
            VIRTIO_RING_F_EVENT_IDX
        } else {
            0
        },
    };
    blk.activate(ctx).expect("activate");
    // Twice: the second pass sees the used ring the first one wrote.
    blk.process_event(0, EventSet::IN);
    blk.process_event(0, EventSet::IN);
    let m = blk.metrics().snapshot("block");
    assert!(m.requests <= 2 * 2 * 256, "bounded work per notification");
    blk.reset();
});
