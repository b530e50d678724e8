//! Per-thread seccomp filters: each thread of the VMM, once set up, may make only
//! the system calls its job needs (an allow-list per thread kind, with `ioctl`
//! restricted to the request numbers that thread issues and no executable memory).
//!
//! Filters are installed by each thread on itself (no `TSYNC`): vCPU threads and the
//! device thread when their loops start, the API thread before it accepts, and the
//! main thread once every other thread exists (threads started later would inherit
//! the main thread's filter on top of their own). A call outside the filter raises
//! `SIGSYS`; the handler writes one line naming the thread and the call, and the
//! process exits with [`EXIT_SECCOMP`]. `atoll-vmm --no-seccomp` turns the filters off,
//! for debugging only (logged as a warning).
//!
//! The lists were taken from `strace -f` of every path the tests drive (boot and
//! restore, every device, the whole API, containers through the agent), then
//! checked by running the whole end-to-end suite under the filters.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit status of a VMM that made a system call outside its thread's filter
/// (128 + SIGSYS, as a shell reports a death by that signal).
pub const EXIT_SECCOMP: i32 = 159;

/// The kinds of VMM threads, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Thread {
    /// The main thread: runs the VM's control loop (API requests, snapshots, the
    /// guest's exit) after building it.
    Main,
    /// The API socket's thread: accepts, parses, forwards to the main thread.
    Api,
    /// A vCPU thread: `KVM_RUN` and the port and MMIO devices it calls into.
    Vcpu,
    /// The virtio device thread: epoll, queues, disk files, tap, vsock sockets.
    Devices,
    /// Copies the VMM's stdin into the serial console.
    ConsoleIn,
    /// Answers guest page faults from the memory file (`--mem-backend uffd`).
    Pages,
}

impl Thread {
    /// Every kind.
    pub const ALL: [Thread; 6] = [
        Thread::Main,
        Thread::Api,
        Thread::Vcpu,
        Thread::Devices,
        Thread::ConsoleIn,
        Thread::Pages,
    ];

    /// The name used in messages (NUL-free, static: the SIGSYS handler reads it).
    pub fn name(self) -> &'static str {
        match self {
            Thread::Main => "main",
            Thread::Api => "api",
            Thread::Vcpu => "vcpu",
            Thread::Devices => "devices",
            Thread::ConsoleIn => "console-in",
            Thread::Pages => "pages",
        }
    }
}

/// Why filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A filter did not compile (a bug in the lists below).
    #[error("the seccomp filter of the {thread} thread does not compile: {source}")]
    Build {
        /// Which thread kind.
        thread: &'static str,
        /// The compiler's complaint.
        #[source]
        source: seccompiler::BackendError,
    },
    /// A rule is malformed (a bug in the lists below).
    #[error("a seccomp rule of the {thread} thread is malformed: {source}")]
    Rule {
        /// Which thread kind.
        thread: &'static str,
        /// The complaint.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter (no seccomp, or not allowed here).
    #[error("the kernel refused the seccomp filter of the {thread} thread (run with --no-seccomp to debug without filters)")]
    Install {
        /// Which thread kind.
        thread: &'static str,
        /// The kernel's error.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

/// The compiled filters, or `None` when filtering is off.
static FILTERS: OnceLock<Option<BTreeMap<Thread, BpfProgram>>> = OnceLock::new();

/// Compiles every thread's filter and installs the SIGSYS handler (`enforce`), or
/// records that filters are off. Call once, before any VMM thread starts; later
/// calls keep the first decision.
pub fn init(enforce: bool) -> Result<(), SeccompError> {
    if !enforce {
        let _ = FILTERS.set(None);
        return Ok(());
    }
    quiet_allocator();
    let mut programs = BTreeMap::new();
    for t in Thread::ALL {
        programs.insert(t, compile(t)?);
    }
    install_sigsys_handler()?;
    let _ = FILTERS.set(Some(programs));
    Ok(())
}

/// Keeps glibc's malloc from opening files once the filters are on.
///
/// The first time malloc gives a thread arena's memory back to the kernel
/// (`shrink_heap`, when a large buffer at the top of the arena is freed), glibc
/// reads `/proc/sys/vm/overcommit_memory`: an `openat` no filter allows, in
/// whichever thread frees first. The devices thread did, after buffering a burst
/// of guest output for a slow host socket, and the VMM died by SIGSYS in the
/// middle of a stream (a "10 MiB stdout" run cut short). Trimming is switched off
/// (what a VMM allocates is bounded; it stays with the process until it ends), and
/// the arena count is fixed so that making an arena never asks the kernel for the
/// CPU count either.
pub fn quiet_allocator() {
    // SAFETY: mallopt only sets an allocator parameter; the value is in range.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) };
    // SAFETY: as above.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 8) };
}

/// Makes the calling thread allocate and free enough to make glibc trim its arena
/// (`--test-malloc-trim`): under the devices filter, this is what killed the VMM
/// before [`quiet_allocator`].
pub fn exercise_allocator() -> usize {
    let blocks: Vec<Vec<u8>> = (0..400).map(|i| vec![i as u8; 100 << 10]).collect();
    let total = blocks.iter().map(Vec::len).sum();
    for b in blocks.into_iter().rev() {
        drop(std::hint::black_box(b));
    }
    total
}

/// Installs the filter of `thread` on the calling thread (nothing when filters are
/// off or [`init`] was never called, as in unit tests).
pub fn apply(thread: Thread) -> Result<(), SeccompError> {
    let Some(Some(programs)) = FILTERS.get() else {
        return Ok(());
    };
    let Some(program) = programs.get(&thread) else {
        return Ok(());
    };
    THREAD.with(|t| t.set(thread.name()));
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
        thread: thread.name(),
        source,
    })
}

/// [`apply`], logging a failure instead of returning it (for threads whose loop has
/// nowhere to report to); a thread that cannot be filtered ends the process, since
/// running unfiltered was not asked for.
pub fn apply_or_exit(thread: Thread) {
    if let Err(e) = apply(thread) {
        eprintln!("atoll-vmm: error: {e}");
        std::process::exit(1);
    }
}

/// Armed by `atoll-vmm --test-seccomp-trip`: the vCPU thread makes a call outside
/// its filter when the guest reports that its command started (boot stage 3).
static TRIP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Arms [`trip`] (tests only).
pub fn arm_trip() {
    TRIP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// When armed, makes `getppid`, which no VMM thread's filter allows: the test of
/// the filters end to end.
pub fn trip() {
    if TRIP.load(std::sync::atomic::Ordering::SeqCst) {
        trip_now();
    }
}

/// Makes `getppid`, which no VMM thread's filter allows (tests only).
pub fn trip_now() {
    // SAFETY: getppid(2) takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_getppid) };
}

thread_local! {
    /// This thread's kind, for the SIGSYS handler.
    static THREAD: std::cell::Cell<&'static str> = const { std::cell::Cell::new("unfiltered") };
}

fn compile(thread: Thread) -> Result<BpfProgram, SeccompError> {
    let rules = rules(thread).map_err(|source| SeccompError::Rule {
        thread: thread.name(),
        source,
    })?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| SeccompError::Build {
        thread: thread.name(),
        source,
    })?;
    filter.try_into().map_err(|source| SeccompError::Build {
        thread: thread.name(),
        source,
    })
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Allows `nr` whatever its arguments.
fn allow(r: &mut Rules, nr: i64) {
    r.insert(nr, Vec::new());
}

/// Allows `ioctl` with one of `requests` as its request number.
fn allow_ioctls(r: &mut Rules, requests: &[u64]) -> Result<(), seccompiler::BackendError> {
    let mut rules = Vec::with_capacity(requests.len());
    for &req in requests {
        rules.push(SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            req,
        )?])?);
    }
    r.entry(libc::SYS_ioctl).or_default().extend(rules);
    Ok(())
}

/// Allows `nr` only when argument `arg` has none of the bits of `mask`.
fn allow_without_bits(
    r: &mut Rules,
    nr: i64,
    arg: u8,
    mask: u64,
) -> Result<(), seccompiler::BackendError> {
    r.insert(
        nr,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(mask),
            0,
        )?])?],
    );
    Ok(())
}

// KVM ioctl request numbers (linux/kvm.h, x86_64).
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_GET_SREGS: u64 = 0x8138_ae83;
const KVM_GET_MSRS: u64 = 0xc008_ae88;
const KVM_GET_FPU: u64 = 0x81a0_ae8c;
const KVM_GET_LAPIC: u64 = 0x8400_ae8e;
const KVM_GET_CPUID2: u64 = 0xc008_ae91;
const KVM_GET_MP_STATE: u64 = 0x8004_ae98;
const KVM_GET_VCPU_EVENTS: u64 = 0x8040_ae9f;
const KVM_GET_DEBUGREGS: u64 = 0x8080_aea1;
const KVM_GET_XSAVE: u64 = 0x9000_aea4;
const KVM_GET_XCRS: u64 = 0x8188_aea6;
const KVM_KVMCLOCK_CTRL: u64 = 0xaead;
const KVM_GET_TSC_KHZ: u64 = 0xaea3;
const KVM_GET_IRQCHIP: u64 = 0xc208_ae62;
const KVM_GET_PIT2: u64 = 0x8070_ae9f;
const KVM_GET_CLOCK: u64 = 0x8030_ae7c;
/// Socket ioctl: non-blocking mode.
const FIONBIO: u64 = libc::FIONBIO;

/// What every thread needs: memory (never executable), locks, time, signals for
/// its own exit, logging to stderr, and ending.
fn base(r: &mut Rules) -> Result<(), seccompiler::BackendError> {
    for nr in [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_futex,
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rseq,
        libc::SYS_statx,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_getrandom,
    ] {
        allow(r, nr);
    }
    allow_without_bits(r, libc::SYS_mmap, 2, libc::PROT_EXEC as u64)?;
    allow_without_bits(r, libc::SYS_mprotect, 2, libc::PROT_EXEC as u64)?;
    Ok(())
}

/// The allow-list of `thread`.
fn rules(thread: Thread) -> Result<Rules, seccompiler::BackendError> {
    let mut r = Rules::new();
    base(&mut r)?;
    match thread {
        Thread::Vcpu => {
            // The port and MMIO devices it runs: serial output, exit and stage
            // ports, virtio-mmio registers (which kick the device thread through
            // eventfds and take locks), the i8042 reset.
            // A guest's virtio-mmio writes activate and reset devices: queue
            // eventfds are duplicated and added to or removed from the device
            // thread's epoll.
            for nr in [libc::SYS_epoll_ctl, libc::SYS_fcntl] {
                allow(&mut r, nr);
            }
            allow_ioctls(
                &mut r,
                &[
                    KVM_RUN,
                    KVM_KVMCLOCK_CTRL,
                    // Saving the vCPU for a snapshot happens on its own thread.
                    KVM_GET_REGS,
                    KVM_GET_SREGS,
                    KVM_GET_MSRS,
                    KVM_GET_FPU,
                    KVM_GET_LAPIC,
                    KVM_GET_CPUID2,
                    KVM_GET_MP_STATE,
                    KVM_GET_VCPU_EVENTS,
                    KVM_GET_DEBUGREGS,
                    KVM_GET_XSAVE,
                    KVM_GET_XCRS,
                    KVM_GET_TSC_KHZ,
                ],
            )?;
        }
        Thread::Devices => {
            for nr in [
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                // Disk files: requests, flush, discard and write-zeroes.
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                libc::SYS_preadv,
                libc::SYS_pwritev,
                libc::SYS_readv,
                libc::SYS_fsync,
                libc::SYS_fdatasync,
                libc::SYS_fallocate,
                // vsock: host connections accepted, guest connections made to the
                // host's PATH_<port> listeners.
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_accept4,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_shutdown,
                libc::SYS_getsockopt,
                libc::SYS_fcntl,
            ] {
                allow(&mut r, nr);
            }
            allow_ioctls(&mut r, &[FIONBIO])?;
        }
        Thread::Api => {
            for nr in [
                libc::SYS_accept4,
                // Requests, with the files they carry (SCM_RIGHTS).
                libc::SYS_recvmsg,
                libc::SYS_sendto,
                // Per-connection read and write deadlines.
                libc::SYS_setsockopt,
                libc::SYS_shutdown,
            ] {
                allow(&mut r, nr);
            }
        }
        Thread::Main => {
            for nr in [
                // Kicking vCPU threads out of KVM_RUN.
                libc::SYS_tgkill,
                // Snapshots and working sets (into files handed over; unjailed,
                // also written beside a path and renamed into place; sparse: holes
                // are skipped), disk swaps, the metrics file.
                libc::SYS_openat,
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                libc::SYS_lseek,
                libc::SYS_fsync,
                libc::SYS_fdatasync,
                libc::SYS_ftruncate,
                libc::SYS_fallocate,
                libc::SYS_rename,
                libc::SYS_renameat,
                libc::SYS_renameat2,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                libc::SYS_fcntl,
                libc::SYS_poll,
                libc::SYS_epoll_ctl,
                // The peak resident set for the metrics.
                libc::SYS_getrusage,
            ] {
                allow(&mut r, nr);
            }
            allow_ioctls(&mut r, &[KVM_GET_IRQCHIP, KVM_GET_PIT2, KVM_GET_CLOCK])?;
        }
        Thread::ConsoleIn => {}
        Thread::Pages => {
            // Waits on the userfaultfd and its stop eventfd, reads fault messages
            // (base's read), a page of the memory file, and fills it in.
            for nr in [libc::SYS_poll, libc::SYS_ppoll, libc::SYS_pread64] {
                allow(&mut r, nr);
            }
            allow_ioctls(
                &mut r,
                &[
                    u64::from(linux_raw_sys::ioctl::UFFDIO_COPY),
                    u64::from(linux_raw_sys::ioctl::UFFDIO_ZEROPAGE),
                ],
            )?;
        }
    }
    Ok(r)
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: an all-zero sigaction is valid: no flags, an empty mask.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: the handler is an `extern "C"` function with the SA_SIGINFO signature
    // that only makes async-signal-safe calls; `sa` is initialised.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Formats `n` in decimal into `buf`; returns the digits.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Formats `n` as `0x` and lowercase hex into `buf`; returns the text.
fn hex(n: u64, buf: &mut [u8; 18]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len();
    let mut v = n;
    loop {
        i -= 1;
        buf[i] = DIGITS[(v & 0xf) as usize];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    i -= 1;
    buf[i] = b'x';
    i -= 1;
    buf[i] = b'0';
    &buf[i..]
}

/// The message of a violation, built without allocating (it runs in a signal
/// handler): `atoll-vmm: error: the <thread> thread made system call <nr>
/// (arguments <a0>, <a1>, <a2>) ...`.
/// The most bytes of a path shown in a violation message.
const MAX_SHOWN_PATH: usize = 96;

fn violation_message(
    thread: &str,
    nr: u64,
    args: [u64; 3],
    path: &[u8],
    out: &mut [u8; 448],
) -> usize {
    let mut digits = [0u8; 20];
    let (mut h0, mut h1, mut h2) = ([0u8; 18], [0u8; 18], [0u8; 18]);
    let (on, quote): (&[u8], &[u8]) = if path.is_empty() {
        (b"", b"")
    } else {
        (b" on \"", b"\"")
    };
    let parts: [&[u8]; 14] = [
        b"atoll-vmm: error: the ",
        thread.as_bytes(),
        b" thread made system call ",
        decimal(nr, &mut digits),
        b" (arguments ",
        hex(args[0], &mut h0),
        b", ",
        hex(args[1], &mut h1),
        b", ",
        hex(args[2], &mut h2),
        b")",
        on,
        path,
        quote,
    ];
    let tail: &[u8] = b", which its seccomp filter does not allow; the VMM stops (a bug in atoll-vmm, or an attack from the guest: please report it)\n";
    let mut n = 0;
    for p in parts.iter().copied().chain([tail]) {
        let take = p.len().min(out.len() - n);
        out[n..n + take].copy_from_slice(&p[..take]);
        n += take;
    }
    n
}

/// The path an open or openat names, printable bytes only, at most
/// [`MAX_SHOWN_PATH`] of them.
///
/// # Safety
/// `ptr` must be the path argument the process itself passed to the call (the
/// kernel was about to read it): a readable NUL-terminated string.
unsafe fn shown_path(ptr: u64, out: &mut [u8; MAX_SHOWN_PATH]) -> usize {
    let p = ptr as *const u8;
    if p.is_null() {
        return 0;
    }
    let mut n = 0;
    while n < out.len() {
        // SAFETY: per the caller, every byte up to the NUL is readable: `n` stays
        // within the string, so the offset pointer is in bounds and readable.
        let at = unsafe { p.add(n) };
        // SAFETY: as above.
        let b = unsafe { at.read() };
        if b == 0 {
            break;
        }
        out[n] = if b.is_ascii_graphic() || b == b' ' {
            b
        } else {
            b'?'
        };
        n += 1;
    }
    n
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // The SIGSYS part of siginfo: si_call_addr (8 bytes at 16), si_syscall (int at
    // 24), si_arch (at 28). The libc crate does not name the field.
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers, 128 bytes
    // long; offset 24 is within it.
    let at = unsafe { (info as *const u8).add(24) };
    // SAFETY: `at` points into that siginfo_t, suitably aligned for an i32.
    let nr = unsafe { at.cast::<i32>().read() };
    // The call's first arguments, from the registers at the trap (rdi, rsi, rdx):
    // for an ioctl the request number, for mmap the protection.
    // SAFETY: for SA_SIGINFO handlers the third argument is the interrupted
    // context, a valid ucontext_t.
    let g = unsafe { &(*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    let args = [
        g[libc::REG_RDI as usize] as u64,
        g[libc::REG_RSI as usize] as u64,
        g[libc::REG_RDX as usize] as u64,
    ];
    let thread = THREAD.with(|t| t.get());
    // A file opened where none should be: name it, it says what went wrong.
    let mut path = [0u8; MAX_SHOWN_PATH];
    let path_len = match i64::from(nr) {
        libc::SYS_open => {
            // SAFETY: rdi of open(2) is the path the process passed.
            unsafe { shown_path(args[0], &mut path) }
        }
        libc::SYS_openat => {
            // SAFETY: rsi of openat(2) is the path the process passed.
            unsafe { shown_path(args[1], &mut path) }
        }
        _ => 0,
    };
    let mut msg = [0u8; 448];
    let n = violation_message(
        thread,
        u64::try_from(nr).unwrap_or(u64::MAX),
        args,
        &path[..path_len],
        &mut msg,
    );
    // SAFETY: write(2) is async-signal-safe and allowed by every filter; `msg[..n]`
    // is initialised. Its result does not matter: the process ends either way.
    unsafe { libc::write(2, msg.as_ptr().cast(), n) };
    // SAFETY: _exit(2) is async-signal-safe and allowed by every filter.
    unsafe { libc::_exit(EXIT_SECCOMP) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for t in Thread::ALL {
            let p = compile(t).unwrap_or_else(|e| panic!("{e}"));
            assert!(!p.is_empty(), "{t:?}");
        }
    }

    #[test]
    fn violation_message_names_thread_and_call() {
        let mut out = [0u8; 448];
        let n = violation_message("vcpu", 133, [0, 0xae80, u64::MAX], &[], &mut out);
        let s = std::str::from_utf8(&out[..n]).unwrap();
        assert!(
            s.starts_with("atoll-vmm: error: the vcpu thread made system call 133 (arguments 0x0, 0xae80, 0xffffffffffffffff), which its seccomp filter does not allow"),
            "{s}"
        );
        let path = c"/etc/local\x01time";
        let mut shown = [0u8; MAX_SHOWN_PATH];
        // SAFETY: a NUL-terminated string that outlives the call.
        let k = unsafe { shown_path(path.as_ptr() as u64, &mut shown) };
        let n = violation_message("devices", 257, [0, 1, 2], &shown[..k], &mut out);
        let s = std::str::from_utf8(&out[..n]).unwrap();
        assert!(
            s.contains("call 257 (arguments 0x0, 0x1, 0x2) on \"/etc/local?time\", which"),
            "{s}"
        );
        assert!(s.ends_with('\n'));
        let mut d = [0u8; 20];
        assert_eq!(decimal(0, &mut d), b"0");
        assert_eq!(decimal(u64::MAX, &mut d), b"18446744073709551615");
    }

    /// Runs `body` in a forked child with `thread`'s filter applied; returns the
    /// child's exit status and what it wrote to its stderr.
    fn in_filtered_child(thread: Thread, body: fn()) -> (i32, String) {
        let program = compile(thread).unwrap();
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills two fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only makes async-signal-safe calls (dup2, prctl and
        // seccomp inside apply_filter, the body's raw syscalls, _exit) before it
        // ends; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: plain fd set-up in the child.
            if unsafe { libc::dup2(fds[1], 2) } < 0 {
                // SAFETY: _exit is always safe.
                unsafe { libc::_exit(89) };
            }
            // SAFETY: closing the child's copy of the read end.
            unsafe { libc::close(fds[0]) };
            if install_sigsys_handler().is_err() {
                // SAFETY: _exit is always safe.
                unsafe { libc::_exit(90) };
            }
            THREAD.with(|t| t.set(thread.name()));
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: as above.
                unsafe { libc::_exit(91) };
            }
            body();
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: closing our copy of the write end.
        unsafe { libc::close(fds[1]) };
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let mut err = Vec::new();
        // SAFETY: the read end is ours; File takes it over and closes it.
        let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
        std::io::Read::read_to_end(&mut f, &mut err).unwrap();
        assert!(libc::WIFEXITED(status), "child died: {status:#x}");
        (
            libc::WEXITSTATUS(status),
            String::from_utf8_lossy(&err).into_owned(),
        )
    }

    #[test]
    fn a_call_outside_the_filter_ends_the_process_with_one_line() {
        let (code, err) = in_filtered_child(Thread::Vcpu, || {
            // Allowed: a write to stderr.
            // SAFETY: writes a static buffer.
            unsafe { libc::write(2, b"before\n".as_ptr().cast(), 7) };
            // Not allowed on a vCPU thread: opening a file.
            // SAFETY: a raw openat on a literal path; the filter stops it.
            unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/passwd".as_ptr(), 0) };
        });
        assert_eq!(code, EXIT_SECCOMP, "{err}");
        assert!(err.starts_with("before\n"), "{err}");
        assert!(
            err.contains(&format!(
                "the vcpu thread made system call {}",
                libc::SYS_openat
            )),
            "{err}"
        );
    }

    #[test]
    fn ioctls_are_limited_to_the_threads_requests_and_exec_memory_is_refused() {
        // An ioctl the devices thread never makes (a terminal query).
        let (code, err) = in_filtered_child(Thread::Devices, || {
            let mut ws = [0u16; 4];
            // SAFETY: TIOCGWINSZ on fd 0 into a local buffer; the filter stops it.
            unsafe { libc::ioctl(0, libc::TIOCGWINSZ, ws.as_mut_ptr()) };
        });
        assert_eq!(code, EXIT_SECCOMP, "{err}");
        assert!(
            err.contains(&format!("system call {}", libc::SYS_ioctl)),
            "{err}"
        );
        // Writable memory is fine, executable memory is not.
        let (code, err) = in_filtered_child(Thread::Api, || {
            // SAFETY: an anonymous mapping, never used.
            let rw = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if rw == libc::MAP_FAILED {
                // SAFETY: _exit is always safe.
                unsafe { libc::_exit(92) };
            }
            // SAFETY: an anonymous mapping, never used; the filter stops it.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
            }
        });
        assert_eq!(code, EXIT_SECCOMP, "{err}");
        assert!(
            err.contains(&format!("system call {}", libc::SYS_mmap)),
            "{err}"
        );
    }
}
