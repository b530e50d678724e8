//! vCPUs: boot-time configuration (CPUID, MSRs, registers, FPU, LAPIC) and the run
//! loop that serves exits from the port and MMIO buses, one thread per vCPU.

use std::sync::Arc;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
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
}

/// One vCPU with what its run loop needs.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    events: Arc<EventSink>,
    metrics: Arc<VmMetrics>,
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
}

impl Vcpu {
    /// Creates vCPU `id` of `num_cpus` and gives it its boot state. Only the boot
    /// processor (id 0) gets entry registers; the others wait for INIT/SIPI.
    pub fn new(
        kvm: &Kvm,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        id: u8,
        num_cpus: u8,
        entry: regs::EntryMode,
        shared: VcpuShared,
    ) -> Result<Self, ConfigureVcpuError> {
        let kvm_err = |what| move |source| ConfigureVcpuError::Kvm { id, what, source };
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| ConfigureVcpuError::Create { id, source })?;

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
        Ok(Self {
            id,
            fd,
            io_bus: shared.io_bus,
            mmio_bus: shared.mmio_bus,
            events: shared.events,
            metrics: shared.metrics,
        })
    }

    /// Runs the guest until it stops, then reports why through the event sink.
    /// Returns without a report when another part of the VM already ended it (the
    /// exit port, the i8042 reset line, another vCPU).
    pub fn run(mut self) {
        let event = loop {
            match self.run_once() {
                Ok(None) if self.events.stopping() => return,
                Ok(None) => continue,
                Ok(Some(ev)) | Err(ev) => break ev,
            }
        };
        self.events.send(event);
    }

    /// One `KVM_RUN`: `Ok(None)` to go on, `Ok(Some)`/`Err` to stop with that event.
    fn run_once(&mut self) -> Result<Option<VmEvent>, VmEvent> {
        let id = self.id;
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                self.metrics.count_port(port, true);
                self.io_bus.write(u64::from(port), data);
                Ok(None)
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.metrics.count_port(port, false);
                if !self.io_bus.read(u64::from(port), data) {
                    // Nothing decodes this port: the bus floats high.
                    data.fill(0xff);
                }
                Ok(None)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.metrics.count_mmio(addr, false);
                if !self.mmio_bus.read(addr, data) {
                    data.fill(0xff);
                }
                Ok(None)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.metrics.count_mmio(addr, true);
                self.mmio_bus.write(addr, data);
                Ok(None)
            }
            Ok(VcpuExit::Hlt) => {
                self.metrics.count_exit(ExitKind::Hlt);
                Ok(Some(VmEvent::PowerOff))
            }
            Ok(VcpuExit::Shutdown) => {
                self.metrics.count_exit(ExitKind::Shutdown);
                Ok(Some(VmEvent::Reset("the guest triple-faulted")))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                self.metrics.count_exit(ExitKind::SystemEvent);
                Ok(Some(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => VmEvent::Reset("the guest requested a reset"),
                    KVM_SYSTEM_EVENT_CRASH => VmEvent::Reset("the guest reported a crash"),
                    _ => VmEvent::VcpuError(format!("vCPU {id}: unknown KVM system event {kind}")),
                }))
            }
            Ok(VcpuExit::Intr) => {
                self.metrics.count_exit(ExitKind::Intr);
                Ok(None)
            }
            Ok(VcpuExit::InternalError) => {
                self.metrics.count_exit(ExitKind::Other);
                let run = self.fd.get_kvm_run();
                // SAFETY: KVM filled the `internal` member of the exit union for a
                // KVM_EXIT_INTERNAL_ERROR exit, which is the one we are handling.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                Err(VmEvent::VcpuError(format!(
                    "vCPU {id}: KVM internal error (suberror {suberror}): KVM could not \
                     emulate a guest instruction; on a KVM-PVM or software-only KVM host a \
                     standard guest kernel cannot run, use a host with hardware \
                     virtualisation or the nested node"
                )))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                self.metrics.count_exit(ExitKind::Other);
                Err(VmEvent::VcpuError(format!(
                    "vCPU {id}: KVM could not enter the guest (hardware reason {reason:#x} on host \
                     CPU {cpu})"
                )))
            }
            Ok(other) => {
                self.metrics.count_exit(ExitKind::Other);
                Err(VmEvent::VcpuError(format!(
                    "vCPU {id}: unexpected exit {other:?}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.metrics.count_exit(ExitKind::Intr);
                Ok(None)
            }
            Err(e) => Err(VmEvent::VcpuError(format!(
                "vCPU {id}: KVM_RUN failed: {e}"
            ))),
        }
    }
}
