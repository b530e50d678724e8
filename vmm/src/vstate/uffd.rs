//! Guest RAM served through userfaultfd (`--mem-backend uffd`): the restore's other
//! way to bring a snapshot's memory in, measured against the default (the memory
//! file mapped copy-on-write, `memory::restore`).
//!
//! RAM is anonymous memory registered with a userfaultfd. The pages of the
//! recorded working set are copied in from the memory file before the guest runs
//! (one `UFFDIO_COPY` per range); any other page the guest, or KVM on its behalf,
//! touches first faults into the userfaultfd, and the page-server thread answers
//! it with that page of the file (`UFFDIO_COPY`, or `UFFDIO_ZEROPAGE` for a page
//! that is all zeros). Faults taken in the kernel (KVM reading guest memory) must
//! reach it too, so the fd is made without `UFFD_USER_MODE_ONLY`, which needs
//! CAP_SYS_PTRACE: a restore that spawns its VMM makes it before the jail.
//!
//! Every page a clone touches becomes its own copy here: no page cache is shared
//! between clones of one snapshot, unlike the default.
//!
//! The server thread must run before the VMM is jailed (building the VM touches
//! guest memory: the generation ID, the vsock event ring), so it goes into the
//! jail differently from the threads started after it: it takes the jail's uid and
//! gid with the rest of the process (glibc applies set*id to every thread), and
//! with them loses its capabilities, but keeps the host's mount and network
//! namespaces, which it has no call to use: once the jail is entered it installs
//! its seccomp filter ([`PageServer::confine`], before any guest code runs), which
//! allows no open, socket or namespace call, only waiting on its two fds, reading
//! the memory file it holds and filling pages in.
//!
//! The guest chooses which pages fault, but only inside its own RAM (the only
//! registered range), each answered once, in O(1): it cannot make the server do
//! more than read its own memory file.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use linux_raw_sys::general::{
    uffdio_api, uffdio_copy, uffdio_range, uffdio_register, uffdio_zeropage,
    UFFDIO_COPY_MODE_DONTWAKE, UFFDIO_REGISTER_MODE_MISSING, UFFD_API, UFFD_EVENT_PAGEFAULT,
};
use linux_raw_sys::ioctl::{UFFDIO_API, UFFDIO_COPY, UFFDIO_REGISTER, UFFDIO_ZEROPAGE};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::legacy::EventSink;
use crate::vstate::VmEvent;

const PAGE: usize = 4096;
/// Size of one `struct uffd_msg`.
const MSG_SIZE: usize = 32;

/// One registered piece of guest RAM: where it is mapped and where its bytes are
/// in the memory file.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    /// Host address of the mapping.
    pub host: u64,
    /// Offset in the memory file.
    pub offset: u64,
    /// Length in bytes (page multiple).
    pub len: u64,
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

fn ioctl<T>(fd: &OwnedFd, request: u32, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is the struct the request reads and writes (each caller pairs
    // them as linux/userfaultfd.h does), valid and exclusively borrowed.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::c_ulong::from(request),
            std::ptr::from_mut(arg),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Uffd {
    /// A non-blocking userfaultfd that also takes faults from kernel mode.
    pub fn new() -> io::Result<Self> {
        // SAFETY: userfaultfd(2) takes flags only and returns a new fd or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = uffdio_api {
            api: u64::from(UFFD_API),
            features: 0,
            ioctls: 0,
        };
        ioctl(&fd, UFFDIO_API, &mut api)?;
        Ok(Self { fd })
    }

    /// Sends missing-page faults in `r` here.
    pub fn register(&self, r: &Region) -> io::Result<()> {
        let mut reg = uffdio_register {
            range: uffdio_range {
                start: r.host,
                len: r.len,
            },
            mode: u64::from(UFFDIO_REGISTER_MODE_MISSING),
            ioctls: 0,
        };
        ioctl(&self.fd, UFFDIO_REGISTER, &mut reg)
    }

    /// Fills the missing pages at `dst` with `src` (page multiples), waking the
    /// threads that wait for them unless `wake` is false. Pages that another copy
    /// filled meanwhile are left as they are.
    fn copy(&self, dst: u64, src: &[u8], wake: bool) -> io::Result<()> {
        let mut done = 0usize;
        while done < src.len() {
            let mut c = uffdio_copy {
                dst: dst + done as u64,
                src: src[done..].as_ptr() as u64,
                len: (src.len() - done) as u64,
                mode: if wake {
                    0
                } else {
                    u64::from(UFFDIO_COPY_MODE_DONTWAKE)
                },
                copy: 0,
            };
            match ioctl(&self.fd, UFFDIO_COPY, &mut c) {
                Ok(()) => done = src.len(),
                Err(e) => match e.raw_os_error() {
                    // Part done: go on after it.
                    Some(libc::EAGAIN) if c.copy > 0 => done += c.copy as usize,
                    Some(libc::EAGAIN) => {}
                    // This page is there already (filled by another fault): skip it.
                    Some(libc::EEXIST) => done += PAGE,
                    _ => return Err(e),
                },
            }
        }
        Ok(())
    }

    /// Maps the zero page at `dst` (one page), waking its waiters.
    fn zeropage(&self, dst: u64) -> io::Result<()> {
        let mut z = uffdio_zeropage {
            range: uffdio_range {
                start: dst,
                len: PAGE as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        match ioctl(&self.fd, UFFDIO_ZEROPAGE, &mut z) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// The next fault's address, `None` when none is waiting.
    fn next_fault(&self) -> io::Result<Option<u64>> {
        loop {
            let mut msg = [0u8; MSG_SIZE];
            // SAFETY: reads at most MSG_SIZE bytes into `msg`, which we own.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), MSG_SIZE) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(None),
                    Some(libc::EINTR) => continue,
                    _ => Err(e),
                };
            }
            if n as usize != MSG_SIZE {
                return Err(io::Error::other(format!(
                    "a userfaultfd message of {n} bytes"
                )));
            }
            // struct uffd_msg: u8 event, 7 reserved bytes, then for a page fault
            // u64 flags and u64 address.
            if u32::from(msg[0]) != UFFD_EVENT_PAGEFAULT {
                continue; // no other event was asked for
            }
            let mut a = [0u8; 8];
            a.copy_from_slice(&msg[16..24]);
            return Ok(Some(u64::from_le_bytes(a)));
        }
    }
}

/// What the page server did.
#[derive(Debug, Default)]
pub struct PageStats {
    /// Pages copied in before the guest ran (the working set).
    pub prefetched: AtomicU64,
    /// Faults answered with a page of the file.
    pub copied: AtomicU64,
    /// Faults answered with the zero page.
    pub zero: AtomicU64,
}

/// [`PageStats`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PageCounts {
    /// Pages copied in before the guest ran.
    pub prefetched: u64,
    /// Faults answered with a page of the file.
    pub copied: u64,
    /// Faults answered with the zero page.
    pub zero: u64,
}

impl PageStats {
    /// The counters now.
    pub fn counts(&self) -> PageCounts {
        PageCounts {
            prefetched: self.prefetched.load(Ordering::Relaxed),
            copied: self.copied.load(Ordering::Relaxed),
            zero: self.zero.load(Ordering::Relaxed),
        }
    }
}

/// The thread that answers the guest's page faults, with its userfaultfd. Dropping
/// it stops and joins the thread.
pub struct PageServer {
    uffd: Arc<Uffd>,
    file: Arc<File>,
    regions: Arc<Vec<Region>>,
    stop: EventFd,
    /// Tells the thread to install its filter; it answers on `confined`.
    confine: EventFd,
    confined: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    thread: Option<JoinHandle<()>>,
    /// Counters.
    pub stats: Arc<PageStats>,
    /// Where a fault that cannot be answered ends the VM (set once it exists).
    pub sink: Arc<OnceLock<Arc<EventSink>>>,
}

impl PageServer {
    /// Registers `regions` with a new userfaultfd and starts answering their faults
    /// from `file`.
    pub fn start(file: Arc<File>, regions: Vec<Region>) -> io::Result<Self> {
        let uffd = Arc::new(Uffd::new()?);
        for r in &regions {
            uffd.register(r)?;
        }
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let confine = EventFd::new(libc::EFD_NONBLOCK)?;
        let (ack, confined) = std::sync::mpsc::channel();
        let mut s = Self {
            uffd,
            file,
            regions: Arc::new(regions),
            stop: stop.try_clone()?,
            confine: confine.try_clone()?,
            confined: std::sync::Mutex::new(confined),
            thread: None,
            stats: Arc::default(),
            sink: Arc::default(),
        };
        let (uffd, file, regions, stats, sink) = (
            s.uffd.clone(),
            s.file.clone(),
            s.regions.clone(),
            s.stats.clone(),
            s.sink.clone(),
        );
        s.thread = Some(
            std::thread::Builder::new()
                .name("pages".into())
                .spawn(move || {
                    let fds = Control { stop, confine, ack };
                    let report = |e: io::Error| {
                        let why = format!(
                            "the page server failed: {e}; the guest cannot get its memory \
                             (check the memory file, or restore with --mem-backend file)"
                        );
                        tracing::error!("{why}");
                        if let Some(sink) = sink.get() {
                            sink.send(VmEvent::VcpuError(why));
                        }
                    };
                    if let Err(e) = serve(&uffd, &file, &regions, &fds, &stats, &report) {
                        report(e);
                    }
                })?,
        );
        Ok(s)
    }

    /// Has the thread install its seccomp filter, and waits until it has: call it
    /// once the process is jailed, before the guest runs.
    pub fn confine(&self) -> io::Result<()> {
        self.confine.write(1)?;
        self.confined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recv_timeout(std::time::Duration::from_secs(5))
            .map_err(|_| io::Error::other("the page server did not confine itself within 5 s"))
    }

    /// Copies the file's bytes of guest-physical `ranges` ((memory-file offset,
    /// length), page multiples) in before the guest runs.
    pub fn prefetch(&self, ranges: &[(u64, u64)]) -> io::Result<()> {
        let mut buf = Vec::new();
        for &(off, len) in ranges {
            for r in self.regions.iter() {
                let lo = off.max(r.offset);
                let hi = (off + len).min(r.offset + r.len);
                if lo >= hi {
                    continue;
                }
                buf.resize((hi - lo) as usize, 0);
                self.file.read_exact_at(&mut buf, lo)?;
                self.uffd.copy(r.host + (lo - r.offset), &buf, false)?;
                self.stats
                    .prefetched
                    .fetch_add((hi - lo) / PAGE as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for PageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageServer")
            .field("regions", &self.regions)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The page server thread's own fds.
struct Control {
    /// Written when the server is dropped.
    stop: EventFd,
    /// Written when the process has entered its jail: install the filter.
    confine: EventFd,
    /// Answered once the filter is on.
    ack: std::sync::mpsc::Sender<()>,
}

/// Answers faults until `stop` is written. A page the file cannot give is
/// reported through `report` (which ends the VM) and answered with zeros.
fn serve(
    uffd: &Uffd,
    file: &File,
    regions: &[Region],
    ctl: &Control,
    stats: &PageStats,
    report: &dyn Fn(io::Error),
) -> io::Result<()> {
    let mut page = vec![0u8; PAGE];
    loop {
        let poll_in = |fd: i32| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [
            poll_in(uffd.fd.as_raw_fd()),
            poll_in(ctl.stop.as_raw_fd()),
            poll_in(ctl.confine.as_raw_fd()),
        ];
        // SAFETY: `fds` is a valid array of three pollfds that poll(2) fills in.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        if fds[2].revents != 0 {
            let _ = ctl.confine.read();
            crate::seccomp::apply_or_exit(crate::seccomp::Thread::Pages);
            let _ = ctl.ack.send(());
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err(io::Error::other("the userfaultfd failed"));
        }
        while let Some(addr) = uffd.next_fault()? {
            let at = addr & !(PAGE as u64 - 1);
            let Some(r) = regions.iter().find(|r| at >= r.host && at < r.host + r.len) else {
                return Err(io::Error::other(format!(
                    "a fault at {at:#x}, outside guest RAM"
                )));
            };
            if let Err(e) = file.read_exact_at(&mut page, r.offset + (at - r.host)) {
                // The VM ends with why; the page is answered with zeros so that
                // the thread waiting for it can be stopped.
                report(io::Error::new(
                    e.kind(),
                    format!(
                        "cannot read the memory file at {:#x}: {e}",
                        r.offset + (at - r.host)
                    ),
                ));
                page.fill(0);
            }
            if page.iter().all(|&b| b == 0) {
                uffd.zeropage(at)?;
                stats.zero.fetch_add(1, Ordering::Relaxed);
            } else {
                uffd.copy(at, &page, true)?;
                stats.copied.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// An anonymous mapping of `len` bytes (unmapped on drop).
    struct Anon(*mut u8, usize);
    impl Anon {
        fn new(len: usize) -> Self {
            // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Self(p.cast(), len)
        }
    }
    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping `new` made.
            unsafe { libc::munmap(self.0.cast(), self.1) };
        }
    }

    #[test]
    fn faults_are_answered_from_the_file_and_the_working_set_comes_first() {
        let pages = 16;
        let mut f = tempfile::tempfile().unwrap();
        let mut data = vec![0u8; pages * PAGE];
        for p in 0..pages {
            // Pages 3 and 9 stay zero (holes in a real memory file).
            if p != 3 && p != 9 {
                data[p * PAGE..(p + 1) * PAGE].fill(p as u8 + 1);
            }
        }
        f.write_all(&data).unwrap();
        let mem = Anon::new(pages * PAGE);
        // Needs CAP_SYS_PTRACE (kernel-mode faults), as the VMM does: tests run as root.
        let server = PageServer::start(
            Arc::new(f),
            vec![Region {
                host: mem.0 as u64,
                offset: 0,
                len: (pages * PAGE) as u64,
            }],
        )
        .expect("a userfaultfd (run the tests as root)");
        server
            .prefetch(&[(2 * PAGE as u64, 2 * PAGE as u64)])
            .unwrap();
        server.confine().unwrap();
        assert_eq!(server.stats.prefetched.load(Ordering::Relaxed), 2);
        // Another thread reads every page: each missing one faults to the server.
        let addr = mem.0 as usize;
        let seen = std::thread::spawn(move || {
            (0..pages)
                // SAFETY: reads inside the live mapping `mem`, which outlives the join.
                .map(|p| unsafe { std::ptr::read_volatile((addr + p * PAGE + 7) as *const u8) })
                .collect::<Vec<u8>>()
        })
        .join()
        .unwrap();
        let want: Vec<u8> = (0..pages).map(|p| data[p * PAGE + 7]).collect();
        assert_eq!(seen, want);
        // Page 3 came with the prefetch; page 9 is the only zero page left.
        assert_eq!(server.stats.zero.load(Ordering::Relaxed), 1, "page 9");
        assert_eq!(
            server.stats.copied.load(Ordering::Relaxed),
            pages as u64 - 2 - 1,
            "all but the prefetched and the zero page"
        );
        drop(server);
    }
}
