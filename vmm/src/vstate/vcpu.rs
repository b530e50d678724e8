//! vCPUs: boot-time configuration (CPUID, MSRs, registers, FPU, LAPIC), the run
//! loop that serves exits from the port and MMIO buses (one thread per vCPU, driven
//! through a [`VcpuHandle`]: pause, resume, save, exit), and the vCPU's snapshot
//! state.
//!
//! A vCPU inside `KVM_RUN` is kicked out by a signal whose handler sets the
//! `immediate_exit` flag of that vCPU's `kvm_run`; the flag also catches a kick that
//! lands while the thread is in userspace, so no command waits for the next exit.

use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use super::VmEvent;
use crate::arch::x86_64::{cpuid, msr, regs};
use crate::devices::bus::Bus;
use crate::devices::legacy::EventSink;
use crate::metrics::{ExitKind, VmMetrics};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// Why a vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigureVcpuError {
    /// KVM_CREATE_VCPU.
    #[error("KVM refused to create vCPU {id}")]
    Create {
        /// vCPU index.
        id: u8,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A KVM_SET_* or KVM_GET_* call.
    #[error("KVM refused {what} on vCPU {id}")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// Which state.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Not every MSR was accepted.
    #[error("KVM accepted {set} of {wanted} boot MSRs on vCPU {id}")]
    Msrs {
        /// vCPU index.
        id: u8,
        /// Accepted.
        set: usize,
        /// Asked.
        wanted: usize,
    },
    /// Writing boot tables.
    #[error(transparent)]
    BootState(#[from] regs::BootStateError),
    /// A saved state that does not fit this vCPU.
    #[error("the saved state of vCPU {id} is unusable: {why}")]
    BadState {
        /// vCPU index.
        id: u8,
        /// Why.
        why: String,
    },
}

/// Why a running vCPU did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum VcpuCommandError {
    /// The thread is gone (the VM ended).
    #[error("vCPU {0} has stopped")]
    Gone(u8),
    /// No answer in time.
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(u8, Duration),
    /// It answered with an error.
    #[error("vCPU {id}: {why}")]
    Failed {
        /// vCPU index.
        id: u8,
        /// Why.
        why: String,
    },
}

/// Everything KVM knows about one vCPU, as a snapshot keeps it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (APIC id).
    pub id: u8,
    /// The CPUID the guest sees.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every readable MSR of KVM's index list, TSC deadline last.
    pub msrs: Vec<kvm_msr_entry>,
    /// Multiprocessing state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// Guest TSC frequency, when KVM reports one.
    pub tsc_khz: Option<u32>,
}

const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Most MSRs per KVM_GET/SET_MSRS call.
const MSR_CHUNK: usize = 64;
/// How long a command may take to be answered.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// One vCPU with what its run loop needs.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    events: Arc<EventSink>,
    metrics: Arc<VmMetrics>,
    /// The MSRs a snapshot saves (KVM's index list).
    msr_list: Arc<Vec<u32>>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The buses and sinks every vCPU shares.
#[derive(Clone, Debug)]
pub struct VcpuShared {
    /// Port I/O devices.
    pub io_bus: Arc<Bus>,
    /// MMIO devices.
    pub mmio_bus: Arc<Bus>,
    /// Where VM-level events go.
    pub events: Arc<EventSink>,
    /// Counters.
    pub metrics: Arc<VmMetrics>,
    /// The MSRs a snapshot saves.
    pub msr_list: Arc<Vec<u32>>,
}

/// What one `KVM_RUN` led to.
enum Step {
    /// Served an exit; run again.
    Continue,
    /// Kicked out (a command may be waiting).
    Interrupted,
    /// The VM ends with this event.
    Stop(VmEvent),
}

/// What the VMM asks of a vCPU thread.
#[derive(Debug)]
enum Command {
    Pause,
    Resume,
    Save,
    Exit,
}

/// What a vCPU thread answers.
#[derive(Debug)]
enum Reply {
    Done,
    Saved(Box<VcpuState>),
    Failed(String),
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal's handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: a non-null pointer was set by this thread's vCPU loop to the
        // `immediate_exit` byte of its own `kvm_run` mapping, which stays mapped until
        // the loop clears the pointer again; a volatile byte store is signal-safe.
        unsafe { flag.write_volatile(1) };
    }
}

/// Creates the KVM vCPU `id` of `vm`, without any state.
pub fn create_fd(vm: &VmFd, id: u8) -> Result<VcpuFd, ConfigureVcpuError> {
    vm.create_vcpu(u64::from(id))
        .map_err(|source| ConfigureVcpuError::Create { id, source })
}

/// Builds KVM's stage-2 mappings of the guest-physical `ranges` now, through vCPU
/// `id`'s `fd` (any state, or none yet: the mappings are the VM's), so the guest
/// does not take one exit per page on first touch (KVM_PRE_FAULT_MEMORY, Linux
/// 6.10+). Returns false when this KVM cannot (the pages then fault in lazily).
pub fn prefault(fd: &VcpuFd, id: u8, ranges: &[(u64, u64)]) -> Result<bool, ConfigureVcpuError> {
    /// struct kvm_pre_fault_memory.
    #[repr(C)]
    struct PreFault {
        gpa: u64,
        size: u64,
        flags: u64,
        padding: [u64; 5],
    }
    // _IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)
    const KVM_PRE_FAULT_MEMORY: libc::c_ulong = 0xc040_aed5;
    for &(gpa, size) in ranges {
        let mut req = PreFault {
            gpa,
            size,
            flags: 0,
            padding: [0; 5],
        };
        while req.size > 0 {
            // SAFETY: `req` is a valid kvm_pre_fault_memory that KVM reads and
            // updates (gpa and size advance); the fd is this vCPU's.
            let r = unsafe {
                libc::ioctl(
                    std::os::unix::io::AsRawFd::as_raw_fd(fd),
                    KVM_PRE_FAULT_MEMORY,
                    &mut req,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::EAGAIN) => continue,
                    Some(libc::ENOTTY | libc::EINVAL | libc::EOPNOTSUPP) => return Ok(false),
                    _ => {
                        return Err(ConfigureVcpuError::Kvm {
                            id,
                            what: "KVM_PRE_FAULT_MEMORY",
                            source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(0)),
                        })
                    }
                }
            }
        }
    }
    Ok(true)
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            tracing::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

impl Vcpu {
    /// Creates vCPU `id` without any state.
    pub fn create(vm: &VmFd, id: u8, shared: VcpuShared) -> Result<Self, ConfigureVcpuError> {
        Ok(Self::over(create_fd(vm, id)?, id, shared))
    }

    /// vCPU `id` over `fd`, created earlier by [`create_fd`] (a restore prepared
    /// ahead of its devices).
    pub fn over(fd: VcpuFd, id: u8, shared: VcpuShared) -> Self {
        Self {
            id,
            fd,
            io_bus: shared.io_bus,
            mmio_bus: shared.mmio_bus,
            events: shared.events,
            metrics: shared.metrics,
            msr_list: shared.msr_list,
        }
    }

    /// Gives vCPU `id` of `num_cpus` its boot state. Only the boot processor (id 0)
    /// gets entry registers; the others wait for INIT/SIPI.
    pub fn configure_boot(
        &self,
        kvm: &Kvm,
        mem: &GuestMemoryMmap,
        num_cpus: u8,
        entry: regs::EntryMode,
    ) -> Result<(), ConfigureVcpuError> {
        let (id, fd) = (self.id, &self.fd);
        let kvm_err = |what| move |source| ConfigureVcpuError::Kvm { id, what, source };
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        cpuid::normalize(&mut cpuid, id, num_cpus);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;

        let msrs = msr::boot_msrs().map_err(|_| ConfigureVcpuError::Msrs {
            id,
            set: 0,
            wanted: msr::boot_msr_entries().len(),
        })?;
        let set = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if set != msrs.as_slice().len() {
            return Err(ConfigureVcpuError::Msrs {
                id,
                set,
                wanted: msrs.as_slice().len(),
            });
        }
        fd.set_fpu(&regs::boot_fpu())
            .map_err(kvm_err("KVM_SET_FPU"))?;
        let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        regs::configure_lapic(&mut lapic);
        fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;

        if id == 0 {
            let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            let sregs = regs::boot_sregs(mem, entry, sregs)?;
            fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            fd.set_regs(&regs::boot_regs(entry))
                .map_err(kvm_err("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    /// Reads every piece of KVM state of this (paused) vCPU.
    pub fn save_state(&self) -> Result<VcpuState, ConfigureVcpuError> {
        let (id, fd) = (self.id, &self.fd);
        let kvm_err = |what| move |source| ConfigureVcpuError::Kvm { id, what, source };
        let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
        let debug_regs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        let msrs = self.save_msrs()?;
        let vcpu_events = fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let tsc_khz = fd.get_tsc_khz().ok();
        Ok(VcpuState {
            id,
            cpuid,
            msrs,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Reads the MSRs of the index list in chunks; an MSR KVM will not read (it stops
    /// at the first one) is left out.
    fn save_msrs(&self) -> Result<Vec<kvm_msr_entry>, ConfigureVcpuError> {
        let id = self.id;
        let list = &self.msr_list;
        let mut out = Vec::with_capacity(list.len());
        let mut i = 0;
        while i < list.len() {
            let chunk = &list[i..(i + MSR_CHUNK).min(list.len())];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| ConfigureVcpuError::Msrs {
                id,
                set: 0,
                wanted: entries.len(),
            })?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|source| ConfigureVcpuError::Kvm {
                    id,
                    what: "KVM_GET_MSRS",
                    source,
                })?
                .min(chunk.len());
            out.extend_from_slice(&msrs.as_slice()[..n]);
            // KVM stops at the first MSR it cannot read: skip that one.
            i += n + usize::from(n < chunk.len());
        }
        // The TSC deadline is relative to the TSC: restore it after the TSC.
        out.sort_by_key(|m| m.index == MSR_IA32_TSC_DEADLINE);
        Ok(out)
    }

    /// Writes back state saved by [`Vcpu::save_state`], before the vCPU first runs.
    pub fn restore_state(&self, s: &VcpuState) -> Result<(), ConfigureVcpuError> {
        let (id, fd) = (self.id, &self.fd);
        if s.id != id {
            return Err(ConfigureVcpuError::BadState {
                id,
                why: format!("it belongs to vCPU {}", s.id),
            });
        }
        let kvm_err = |what| move |source| ConfigureVcpuError::Kvm { id, what, source };
        let bad = |why: &str| ConfigureVcpuError::BadState {
            id,
            why: why.to_string(),
        };
        if let Some(khz) = s.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                fd.set_tsc_khz(khz).map_err(kvm_err("KVM_SET_TSC_KHZ"))?;
            }
        }
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| bad("too many CPUID entries"))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        fd.set_mp_state(s.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let mut sregs = s.sregs;
        if regs::is_amd(&s.cpuid) {
            regs::svm_restorable_tr(&mut sregs);
        }
        fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        // SAFETY: `kvm_xsave` is the legacy 4 KiB area KVM_GET_XSAVE filled, which is
        // what KVM_SET_XSAVE reads; the VMM never enables XSAVE2-sized features.
        unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&s.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&s.debug_regs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&s.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        for chunk in s.msrs.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| bad("too many MSRs"))?;
            let set = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
            if set != chunk.len() {
                return Err(bad(&format!(
                    "KVM refused MSR {:#x} (this host's KVM differs from the one that took                      the snapshot)",
                    chunk[set].index
                )));
            }
        }
        fd.set_vcpu_events(&s.vcpu_events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// [`prefault`] through this vCPU.
    pub fn prefault(&self, ranges: &[(u64, u64)]) -> Result<bool, ConfigureVcpuError> {
        prefault(&self.fd, self.id, ranges)
    }

    /// Starts the vCPU's thread, paused or running.
    pub fn spawn(self, paused: bool) -> std::io::Result<VcpuHandle> {
        install_kick_handler();
        let id = self.id;
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (reply_tx, reply_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.thread_main(cmd_rx, reply_tx, paused))?;
        Ok(VcpuHandle {
            id,
            thread: Some(thread),
            commands: cmd_tx,
            replies: reply_rx,
        })
    }

    fn thread_main(mut self, commands: Receiver<Command>, replies: Sender<Reply>, paused: bool) {
        let flag: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(flag));
        crate::seccomp::apply_or_exit(crate::seccomp::Thread::Vcpu);
        self.run_loop(&commands, &replies, paused);
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }

    fn run_loop(
        &mut self,
        commands: &Receiver<Command>,
        replies: &Sender<Reply>,
        mut paused: bool,
    ) {
        loop {
            if paused {
                // Parked outside KVM_RUN: only commands move us.
                match commands.recv() {
                    Ok(cmd) => {
                        if !self.serve(cmd, replies, &mut paused) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
                continue;
            }
            match self.run_once() {
                Step::Continue if self.events.stopping() => return,
                Step::Continue => {}
                Step::Stop(ev) => {
                    self.events.send(ev);
                    return;
                }
                Step::Interrupted => {
                    self.fd.set_kvm_immediate_exit(0);
                    while let Ok(cmd) = commands.try_recv() {
                        if !self.serve(cmd, replies, &mut paused) {
                            return;
                        }
                    }
                    if self.events.stopping() {
                        return;
                    }
                }
            }
        }
    }

    /// Serves one command; false when the thread must end.
    fn serve(&mut self, cmd: Command, replies: &Sender<Reply>, paused: &mut bool) -> bool {
        let reply = match cmd {
            Command::Exit => return false,
            Command::Pause => {
                *paused = true;
                // Tell a guest with kvmclock that it was stopped on purpose (no
                // soft-lockup warnings); EINVAL when it uses no kvmclock.
                let _ = self.fd.kvmclock_ctrl();
                Reply::Done
            }
            Command::Resume => {
                *paused = false;
                Reply::Done
            }
            Command::Save if !*paused => Reply::Failed("pause the VM before saving it".into()),
            Command::Save => match self.save_state() {
                Ok(s) => Reply::Saved(Box::new(s)),
                Err(e) => Reply::Failed(e.to_string()),
            },
        };
        replies.send(reply).is_ok()
    }

    /// Where a vCPU that triple-faulted stood, for the log: its instruction and
    /// stack pointers, control registers, descriptor tables and the exception KVM
    /// had pending. (KVM keeps the state of the instruction that faulted.)
    fn fault_state(&self) -> String {
        let regs = self.fd.get_regs();
        let sregs = self.fd.get_sregs();
        let events = self.fd.get_vcpu_events();
        let mut out = String::new();
        if let Ok(r) = regs {
            out += &format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} ",
                r.rip, r.rsp, r.rflags, r.rax
            );
        }
        if let Ok(s) = sregs {
            out += &format!(
                "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} ss={:#x} \
                 idt={:#x}/{:#x} gdt={:#x}/{:#x} tr={:#x} ",
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector,
                s.ss.selector,
                s.idt.base,
                s.idt.limit,
                s.gdt.base,
                s.gdt.limit,
                s.tr.base
            );
        }
        if let Ok(e) = events {
            out += &format!(
                "exception={}(injected {}, pending {}, error {:#x}) nmi_pending={} interrupt={}",
                e.exception.nr,
                e.exception.injected,
                e.exception.pending,
                e.exception.error_code,
                e.nmi.pending,
                e.interrupt.nr
            );
        }
        out
    }

    /// One `KVM_RUN` and what it led to.
    fn run_once(&mut self) -> Step {
        let id = self.id;
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                self.metrics.count_port(port, true);
                self.io_bus.write(u64::from(port), data);
                Step::Continue
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.metrics.count_port(port, false);
                if !self.io_bus.read(u64::from(port), data) {
                    // Nothing decodes this port: the bus floats high.
                    data.fill(0xff);
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.metrics.count_mmio(addr, false);
                if !self.mmio_bus.read(addr, data) {
                    data.fill(0xff);
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.metrics.count_mmio(addr, true);
                self.mmio_bus.write(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::Hlt) => {
                self.metrics.count_exit(ExitKind::Hlt);
                Step::Stop(VmEvent::PowerOff)
            }
            Ok(VcpuExit::Shutdown) => {
                self.metrics.count_exit(ExitKind::Shutdown);
                tracing::error!("vCPU {id} triple-faulted: {}", self.fault_state());
                Step::Stop(VmEvent::Reset("the guest triple-faulted"))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                self.metrics.count_exit(ExitKind::SystemEvent);
                Step::Stop(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => VmEvent::Reset("the guest requested a reset"),
                    KVM_SYSTEM_EVENT_CRASH => VmEvent::Reset("the guest reported a crash"),
                    _ => VmEvent::VcpuError(format!("vCPU {id}: unknown KVM system event {kind}")),
                })
            }
            Ok(VcpuExit::Intr) => {
                self.metrics.count_exit(ExitKind::Intr);
                Step::Interrupted
            }
            Ok(VcpuExit::InternalError) => {
                self.metrics.count_exit(ExitKind::Other);
                let run = self.fd.get_kvm_run();
                // SAFETY: KVM filled the `internal` member of the exit union for a
                // KVM_EXIT_INTERNAL_ERROR exit, which is the one we are handling.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                Step::Stop(VmEvent::VcpuError(format!(
                    "vCPU {id}: KVM internal error (suberror {suberror}): KVM could not \
                     emulate a guest instruction; on a KVM-PVM or software-only KVM host a \
                     standard guest kernel cannot run, use a host with hardware \
                     virtualisation or the nested node"
                )))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                self.metrics.count_exit(ExitKind::Other);
                Step::Stop(VmEvent::VcpuError(format!(
                    "vCPU {id}: KVM could not enter the guest (hardware reason {reason:#x} on host \
                     CPU {cpu})"
                )))
            }
            Ok(other) => {
                self.metrics.count_exit(ExitKind::Other);
                Step::Stop(VmEvent::VcpuError(format!(
                    "vCPU {id}: unexpected exit {other:?}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.metrics.count_exit(ExitKind::Intr);
                Step::Interrupted
            }
            Err(e) => Step::Stop(VmEvent::VcpuError(format!(
                "vCPU {id}: KVM_RUN failed: {e}"
            ))),
        }
    }
}

/// The VMM's side of a vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u8,
    thread: Option<JoinHandle<()>>,
    commands: Sender<Command>,
    replies: Receiver<Reply>,
}

impl VcpuHandle {
    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        if let Some(t) = &self.thread {
            // SAFETY: the pthread id belongs to a thread we have not joined yet, so
            // it is valid; the kick signal's handler only sets a flag.
            let r = unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            if r != 0 && r != libc::ESRCH {
                tracing::warn!("cannot kick vCPU {}: errno {r}", self.id);
            }
        }
    }

    fn send(&self, cmd: Command) -> Result<(), VcpuCommandError> {
        self.commands
            .send(cmd)
            .map_err(|_| VcpuCommandError::Gone(self.id))?;
        self.kick();
        Ok(())
    }

    fn reply(&self) -> Result<Reply, VcpuCommandError> {
        match self.replies.recv_timeout(COMMAND_TIMEOUT) {
            Ok(Reply::Failed(why)) => Err(VcpuCommandError::Failed { id: self.id, why }),
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => {
                Err(VcpuCommandError::Timeout(self.id, COMMAND_TIMEOUT))
            }
            Err(RecvTimeoutError::Disconnected) => Err(VcpuCommandError::Gone(self.id)),
        }
    }

    /// Asks the vCPU to pause (send to every vCPU first, then [`Self::wait`]).
    pub fn request_pause(&self) -> Result<(), VcpuCommandError> {
        self.send(Command::Pause)
    }

    /// Asks the vCPU to resume (send to every vCPU first, then [`Self::wait`]).
    pub fn request_resume(&self) -> Result<(), VcpuCommandError> {
        self.send(Command::Resume)
    }

    /// Waits for the answer to a pause or resume.
    pub fn wait(&self) -> Result<(), VcpuCommandError> {
        self.reply().map(|_| ())
    }

    /// Reads the state of the paused vCPU.
    pub fn save(&self) -> Result<VcpuState, VcpuCommandError> {
        self.send(Command::Save)?;
        match self.reply()? {
            Reply::Saved(s) => Ok(*s),
            _ => Err(VcpuCommandError::Failed {
                id: self.id,
                why: "answered a save with something else".into(),
            }),
        }
    }

    /// Ends the thread and waits for it.
    pub fn exit(&mut self) {
        let _ = self.commands.send(Command::Exit);
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.exit();
    }
}
