//! The virtio-vsock tx path: arbitrary bytes through the packet header parser and
//! its validator, then arbitrary guest memory, descriptor table and available ring
//! (the layout of `common.rs`) pushed through the vsock device's tx queue. Must
//! never panic or hang; every used-ring element must stay within its chain.
//!
//! Input: byte 0 = flags (bits 0-2 log2 of the tx queue size, bit 3 offer rx
//! buffers), then guest memory from address 0 (`common::setup`). Bytes 1..45 are
//! also decoded as a header on their own.
//!
//! The host side: the device listens on a socket under a private directory in
//! /tmp, and host listeners wait on guest ports 0 and 1 (`<uds>_0`, `<uds>_1`:
//! values a fuzzer finds without a comparison to learn from), so that guest
//! REQUESTs open real connections and later RW / SHUTDOWN / CREDIT packets reach a
//! live connection. The host end of every connection is accepted, sent a few
//! bytes (so that the rx path has data to deliver) and closed at the end of the
//! run. The rx queue is the harness's, not the fuzzer's: eight buffers of known
//! sizes in the page at 128 KiB, so a used length can be checked exactly.

#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use atoll_vmm::devices::virtio::vsock::packet::{
    op, Header, HDR_SIZE, HOST_CID, MAX_PAYLOAD, SHUTDOWN_BOTH, TYPE_STREAM,
};
use atoll_vmm::devices::virtio::vsock::Vsock;
use atoll_vmm::devices::virtio::{ActivateContext, Interrupt, VirtioDevice, Watcher};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

#[path = "common.rs"]
mod common;

const GUEST_CID: u64 = 3;
/// Event sources of the device (see `device.rs`): queue notifiers are 0..3.
const SOURCE_RX: u32 = 0;
const SOURCE_TX: u32 = 1;

/// The harness's rx queue, in the lone page at 128 KiB (never written by
/// `common::setup` for inputs below 64 KiB, and rewritten here anyway).
const RX_PAGE: u64 = 0x2_0000;
const RX_SIZE: u16 = 8;
const RX_DESC: u64 = RX_PAGE;
const RX_AVAIL: u64 = RX_DESC + 16 * RX_SIZE as u64;
const RX_USED: u64 = (RX_AVAIL + 6 + 2 * RX_SIZE as u64 + 3) & !3;
const RX_BUFS: u64 = RX_PAGE + 0x100;
/// Buffer sizes: empty, shorter than a header, exactly a header, a header and a
/// little, up to a bigger one.
const RX_LENS: [u32; RX_SIZE as usize] = [0, 16, 44, 45, 60, 100, 344, 1024];
/// Bytes each accepted host connection sends towards the guest.
const HOST_BYTES: &[u8] = &[0x5a; 300];

struct Host {
    dir: PathBuf,
    uds: PathBuf,
    listeners: Vec<UnixListener>,
}

static HOST: OnceLock<Host> = OnceLock::new();

/// A private directory under /tmp with the guest-port listeners; the device socket
/// itself is (re)bound by each run's `Vsock::new`.
fn host() -> &'static Host {
    HOST.get_or_init(|| {
        let dir = PathBuf::from(format!("/tmp/atoll-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the socket directory");
        let uds = dir.join("v.sock");
        // SAFETY: registers a plain extern "C" function with no arguments.
        unsafe { libc::atexit(remove_dir) };
        let listeners = [0u32, 1]
            .iter()
            .map(|p| {
                let l = UnixListener::bind(format!("{}_{p}", uds.display())).expect("bind");
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        Host {
            dir,
            uds,
            listeners,
        }
    })
}

/// (a) The header decoder and validator on their own.
fn check_header(data: &[u8]) {
    let Some(raw) = data.get(1..1 + HDR_SIZE) else {
        return;
    };
    let raw: &[u8; HDR_SIZE] = raw.try_into().unwrap();
    let h = Header::from_bytes(raw);
    assert_eq!(&h.to_bytes(), raw, "the wire layout round-trips");
    let room = data.len() - 1 - HDR_SIZE;
    for room in [0, room, usize::MAX] {
        let ok = h.check_from_guest(GUEST_CID, room).is_ok();
        if ok {
            assert_eq!(h.src_cid, GUEST_CID);
            assert_eq!(h.dst_cid, HOST_CID);
            assert_eq!(h.type_, TYPE_STREAM);
            assert!((op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op));
            assert!(h.len <= MAX_PAYLOAD && h.len as usize <= room);
            assert!(h.op == op::RW || h.len == 0);
            if h.op == op::SHUTDOWN {
                assert!(h.flags != 0 && h.flags & !SHUTDOWN_BOTH == 0);
            }
        }
        if h.deserves_rst(GUEST_CID) {
            assert_ne!(h.op, op::RST, "an RST is never answered with an RST");
        }
    }
}

fn rx_queue(mem: &GuestMemoryMmap, offer: bool) -> Queue {
    let zero = [0u8; 0x1000];
    mem.write_slice(&zero, GuestAddress(RX_PAGE)).unwrap();
    let mut at = RX_BUFS;
    for (i, &len) in RX_LENS.iter().enumerate() {
        let d = RX_DESC + 16 * i as u64;
        mem.write_obj(at, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(2u16, GuestAddress(d + 12)).unwrap(); // VIRTQ_DESC_F_WRITE
        mem.write_obj(i as u16, GuestAddress(RX_AVAIL + 4 + 2 * i as u64))
            .unwrap();
        at += u64::from(len);
    }
    if offer {
        mem.write_obj(RX_SIZE, GuestAddress(RX_AVAIL + 2)).unwrap();
    }
    let mut q = Queue::new(256).unwrap();
    q.set_size(RX_SIZE);
    q.set_desc_table_address(Some(RX_DESC as u32), Some(0));
    q.set_avail_ring_address(Some(RX_AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(RX_USED as u32), Some(0));
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}

/// The used ring's index and its last `min(idx, size)` elements `(id, len)`, oldest
/// first (the only ones that can still be told apart).
fn used(mem: &GuestMemoryMmap, ring: u64, size: u16) -> (u16, Vec<(u32, u32)>) {
    let idx: u16 = mem.read_obj(GuestAddress(ring + 2)).unwrap();
    let elems = (idx - idx.min(size)..idx)
        .map(|i| {
            let at = ring + 4 + 8 * u64::from(i % size);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            (id, len)
        })
        .collect();
    (idx, elems)
}

fuzz_target!(|data: &[u8]| {
    check_header(data);

    // (b) The device.
    let Some(s) = common::setup(data) else {
        return;
    };
    let host = host();
    let tx_size = 1u16 << (s.flags & 0x7).min(8);
    let tx_avail = common::DESC_TABLE + 16 * u64::from(tx_size);
    let tx_used = (tx_avail + 6 + 2 * u64::from(tx_size) + 3) & !3;
    let tx_idx_before: u16 = s.mem.read_obj(GuestAddress(tx_used + 2)).unwrap();
    let rx = rx_queue(&s.mem, s.flags & 0x8 != 0);

    let mut dev = Vsock::new(GUEST_CID, &host.uds).expect("bind the device socket");
    let epoll = Arc::new(Epoll::new().unwrap());
    let watcher = Watcher::new(epoll.clone(), 0);
    dev.set_watcher(watcher.clone());
    let ctx = ActivateContext {
        mem: s.mem.clone(),
        queues: vec![rx, s.queue, Queue::new(256).unwrap()],
        queue_events: (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect(),
        interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
        acked_features: 0,
    };
    for w in dev.activate(ctx).expect("activate") {
        watcher.add(w).unwrap();
    }

    // The guest's notification; twice, as block_request does: the second pass
    // sees the used ring the first one wrote.
    dev.process_event(SOURCE_TX, EventSet::IN);
    dev.process_event(SOURCE_TX, EventSet::IN);

    // The host accepts whatever the guest opened and answers with some bytes.
    let mut accepted: Vec<UnixStream> = Vec::new();
    for l in &host.listeners {
        while let Ok((mut c, _)) = l.accept() {
            let _ = c.set_nonblocking(true);
            let _ = c.write(HOST_BYTES);
            accepted.push(c);
        }
    }
    // A few rounds of the event loop (host sockets, re-notified tx, rx), bounded.
    let mut events = [EpollEvent::default(); 32];
    for _ in 0..8 {
        let n = epoll.wait(0, &mut events).unwrap_or(0);
        if n == 0 {
            break;
        }
        for ev in &events[..n] {
            dev.process_event(ev.data() as u32, ev.event_set());
        }
    }
    dev.process_event(SOURCE_RX, EventSet::IN);

    // tx: the device only reads tx buffers, so every used length is 0 (within any
    // chain), and the work per notification is bounded. Each chain it popped goes
    // back on the used ring in order, except heads beyond the queue (which
    // virtio-queue hands out and `add_used` refuses: counted as malformed). The
    // rings are packed (`common.rs`) and the device writes nowhere else in that
    // area, so the available ring still holds what it popped and the last
    // `min(idx, size)` used elements are the device's own.
    let m = dev.metrics().snapshot("vsock");
    assert!(m.requests <= 8 * 2 * 256, "bounded work per notification");
    let heads: Vec<u16> = (0..m.requests)
        .map(|i| {
            let slot = tx_avail + 4 + 2 * (i % u64::from(tx_size));
            s.mem.read_obj::<u16>(GuestAddress(slot)).unwrap()
        })
        .filter(|&h| h < tx_size)
        .collect();
    let (idx, elems) = used(&s.mem, tx_used, tx_size);
    let fresh = if heads.is_empty() {
        assert_eq!(idx, tx_idx_before, "nothing returned, nothing published");
        0
    } else {
        assert_eq!(
            usize::from(idx),
            heads.len() % 65536,
            "one used element per chain"
        );
        usize::from(idx.min(tx_size))
    };
    let expected = heads.iter().rev().take(fresh);
    for (i, (&(id, len), &head)) in elems.iter().rev().take(fresh).zip(expected).enumerate() {
        assert_eq!(id, u32::from(head), "tx used id (element {i} from the end)");
        assert_eq!(len, 0, "tx used length: the device never writes tx buffers");
    }

    // rx: header + payload, never more than the buffer holds.
    let (_, elems) = used(&s.mem, RX_USED, RX_SIZE);
    for (id, len) in elems {
        assert!(id < u32::from(RX_SIZE), "rx used id {id}");
        let room = RX_LENS[id as usize];
        assert!(
            len <= room,
            "rx used length {len} beyond the buffer's {room}"
        );
        if len > 0 {
            assert!(len as usize >= HDR_SIZE, "a partial header was published");
            let mut raw = [0u8; HDR_SIZE];
            let addr = RX_BUFS
                + RX_LENS[..id as usize]
                    .iter()
                    .map(|&l| u64::from(l))
                    .sum::<u64>();
            s.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let h = Header::from_bytes(&raw);
            assert_eq!(
                len as usize,
                HDR_SIZE + h.len as usize,
                "used length = header + payload"
            );
            assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));
        }
    }

    dev.reset();
    drop(dev);
    drop(accepted);
});

/// Removes the socket directory when the fuzzer exits normally.
extern "C" fn remove_dir() {
    if let Some(h) = HOST.get() {
        let _ = std::fs::remove_dir_all(&h.dir);
    }
}
