//! Arbitrary descriptor tables (direct and indirect, loops, wild addresses and
//! lengths) walked through virtio-queue against a small guest memory, each chain
//! also run through the virtio-blk request parser and returned on the used ring.

#![no_main]

use atoll_vmm::devices::virtio::block::request;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some(mut s) = common::setup(data) else {
        return;
    };
    let mut chains = 0u32;
    while let Some(chain) = s.queue.pop_descriptor_chain(&s.mem) {
        chains += 1;
        assert!(
            chains <= 256,
            "the available ring yields at most its size per pass"
        );
        let head = chain.head_index();
        let mut walked = 0usize;
        let mut bytes = 0u64;
        for d in chain.clone() {
            walked += 1;
            bytes += u64::from(d.len());
            // virtio-queue bounds a walk by the table size (indirect: <= 65535/16... entries).
            assert!(walked <= 65536, "a chain walk must be bounded");
        }
        assert!(bytes <= u64::from(u32::MAX), "chains are at most 4 GiB");
        let descriptors = chain.map(|d| (d.addr(), d.len(), d.is_write_only()));
        if let Ok(req) = request::parse(&s.mem, descriptors, 128) {
            assert!(req.data_len() <= u64::from(request::MAX_DATA_BYTES));
        }
        let _ = s.queue.add_used(&s.mem, head, 1);
    }
    let _ = s.queue.needs_notification(&s.mem);
});
