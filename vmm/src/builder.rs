//! The one place that assembles a VM: from a [`VmConfig`] (KVM, memory, devices,
//! kernel, vCPUs, booted fresh) or from a snapshot (the same pieces, their state
//! read back). The result is a [`Vmm`](crate::vmm::Vmm), which runs and drives it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use kvm_ioctls::IoEventAddress;
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{self, DsdtDevice};
use crate::arch::x86_64::boot::{self, BootSpec, KernelFormat, LoadKernelError};
use crate::arch::x86_64::layout::{
    GED_GSI, SERIAL_IRQ, SERIAL_PORT, VIRTIO_GSIS, VIRTIO_MMIO_BASE, VMGENID_ADDR,
};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::debug_port::{ExitPort, StagePort, EXIT_PORT, STAGE_PORT};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::legacy::EventSink;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::event_loop::{EventLoop, EventLoopError};
use crate::devices::virtio::mmio::{
    CreateTransportError, MmioTransport, RestoreTransportError, MMIO_WINDOW, QUEUE_NOTIFY,
};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::persist::VirtioDeviceState;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{DeviceMetricsSnapshot, Interrupt, VirtioDevice};
use crate::jail::JailConfig;
use crate::metrics::{MetricsSnapshot, VmMetrics};
use crate::persist::{self, MicrovmState, SnapshotFileError};
use crate::vmm::{Vmm, VmmParts};
use crate::vstate::kvm::{self, KvmError};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{self, ConfigureVcpuError, Vcpu, VcpuShared};
use crate::vstate::vm::{CreateVmError, Vm, VmStateError};
use crate::vstate::VmMessage;

/// Smallest guest we start: below this a Linux guest cannot even unpack itself.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest vCPU count (8-bit APIC ids, one kept for the IOAPIC).
pub const MAX_VCPUS: u8 = 254;

/// What to run.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Full kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Stop the VM after this long.
    pub timeout: Option<Duration>,
    /// Feed the VMM's stdin to the guest console.
    pub console_input: bool,
    /// virtio devices, in the order the guest will see them.
    pub devices: Vec<DeviceConfig>,
    /// Confine the process ([`crate::jail`]) before the vCPUs start.
    pub jail: Option<JailConfig>,
}

/// One virtio device to attach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceConfig {
    /// virtio-rng fed from the host's getrandom.
    Rng,
    /// virtio-blk backed by a host file.
    Block {
        /// The backing file.
        path: PathBuf,
        /// Refuse guest writes.
        read_only: bool,
        /// What VIRTIO_BLK_T_GET_ID answers.
        id: Option<String>,
    },
    /// virtio-net backed by a tap device.
    Net {
        /// The tap interface name.
        tap: String,
        /// The guest MAC address.
        mac: Option<[u8; 6]>,
    },
    /// virtio-vsock backed by Unix domain sockets.
    Vsock {
        /// The guest's context id.
        cid: u64,
        /// The host-side socket path.
        uds: PathBuf,
    },
}

/// How the VM ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// The guest reported this exit status.
    Exited(u8),
    /// The guest powered off without a status.
    PoweredOff,
    /// The guest crashed, reset or a vCPU failed: why.
    Crashed(String),
    /// `--timeout` expired.
    TimedOut(Duration),
    /// Stopped through the control API.
    Stopped,
}

/// The outcome with the VM's counters.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// How it ended.
    pub outcome: Outcome,
    /// Counters at the end.
    pub metrics: MetricsSnapshot,
    /// The kernel format booted (none for a restored VM).
    pub format: Option<KernelFormat>,
    /// Per-device counters at the end.
    pub devices: Vec<DeviceMetricsSnapshot>,
    /// What the page server did (a restore with `--mem-backend uffd`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uffd_pages: Option<crate::vstate::uffd::PageCounts>,
}

/// Why the VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartVmError {
    /// KVM unusable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The confinement could not be entered.
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    /// Bad vCPU count.
    #[error("--vcpus {given} is out of range: give 1 to {max}")]
    Vcpus {
        /// Asked.
        given: u8,
        /// Limit here.
        max: u8,
    },
    /// Too little (or absurd) memory.
    #[error("--mem {given} MiB is too little: a guest needs at least {MIN_MEM_MIB} MiB")]
    TooLittleMemory {
        /// Asked.
        given: u64,
    },
    /// Absurd memory size.
    #[error("--mem {0} MiB is larger than this VMM can address")]
    TooMuchMemory(u64),
    /// VM creation.
    #[error(transparent)]
    CreateVm(#[from] CreateVmError),
    /// Kernel, initrd, tables.
    #[error(transparent)]
    Load(#[from] LoadKernelError),
    /// vCPU set-up.
    #[error(transparent)]
    Vcpu(#[from] ConfigureVcpuError),
    /// A device could not be placed or wired.
    #[error("cannot attach {what}")]
    Device {
        /// Which device.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Bus conflict (a bug in our layout).
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A thread could not be started.
    #[error("cannot start a VMM thread")]
    Thread(#[source] std::io::Error),
    /// More virtio devices than interrupt lines.
    #[error("at most {max} virtio devices fit, {given} were asked for")]
    TooManyDevices {
        /// Asked.
        given: usize,
        /// Limit.
        max: usize,
    },
    /// A virtio transport could not be built.
    #[error(transparent)]
    Transport(#[from] CreateTransportError),
    /// The device event loop could not start.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// The snapshot's state file.
    #[error(transparent)]
    StateFile(#[from] SnapshotFileError),
    /// The snapshot's memory file.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The working set to prefetch.
    #[error(transparent)]
    WorkingSet(#[from] memory::WorkingSetError),
    /// VM-wide state did not restore.
    #[error("cannot restore the VM from the snapshot")]
    VmState(#[source] VmStateError),
    /// A device's saved state did not restore.
    #[error("cannot restore virtio device {index} from the snapshot")]
    DeviceState {
        /// Device index.
        index: usize,
        /// Why.
        #[source]
        source: RestoreTransportError,
    },
    /// The snapshot does not fit this host or these options.
    #[error("cannot restore the snapshot: {0}")]
    Incompatible(String),
}

/// The virtio devices of a VM, wired to KVM.
pub(crate) struct VirtioSetup {
    /// The devices, in bus order.
    pub devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    /// Their transports.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// What each was built from (a net device's MAC filled in).
    pub configs: Vec<DeviceConfig>,
    /// The device event loop's epoll.
    pub epoll: Arc<Epoll>,
    dsdt: Vec<DsdtDevice>,
    cmdline: Vec<String>,
}

/// Builds the device `cfg` describes; returns it with its configuration as built
/// (a net device's random MAC filled in, so a snapshot keeps it).
fn build_device(
    cfg: &DeviceConfig,
    backing: Option<Backing>,
) -> Result<(Arc<Mutex<dyn VirtioDevice>>, DeviceConfig), StartVmError> {
    let err = |what| move |source| StartVmError::Device { what, source };
    Ok(match (cfg, backing) {
        (DeviceConfig::Rng, _) => (Arc::new(Mutex::new(Rng::new())), cfg.clone()),
        (
            DeviceConfig::Block {
                path,
                read_only,
                id,
            },
            backing,
        ) => {
            let block = match backing {
                Some(Backing::Disk(f)) => Block::with_file(f, *read_only, id.clone()),
                _ => Block::new(path, *read_only, id.clone()),
            };
            (
                Arc::new(Mutex::new(block.map_err(err("a virtio-blk disk"))?)),
                cfg.clone(),
            )
        }
        (DeviceConfig::Net { tap, mac }, backing) => {
            let net = match backing {
                Some(Backing::Tap(f)) => Net::over_tap(f, tap, *mac),
                _ => Net::new(tap, *mac),
            }
            .map_err(err("a virtio-net device"))?;
            let built = DeviceConfig::Net {
                tap: tap.clone(),
                mac: Some(net.mac()),
            };
            (Arc::new(Mutex::new(net)), built)
        }
        (DeviceConfig::Vsock { cid, uds }, backing) => {
            let vsock = match backing {
                Some(Backing::Vsock(l)) => Vsock::with_listener(*cid, uds, l),
                _ => Vsock::new(*cid, uds),
            };
            (
                Arc::new(Mutex::new(vsock.map_err(err("a virtio-vsock device"))?)),
                cfg.clone(),
            )
        }
    })
}

/// Creates every virtio device, its transport on the MMIO bus, its irqfd and
/// ioeventfds, and how the guest learns of it.
fn attach_virtio(
    vm: &Vm,
    configs: &[DeviceConfig],
    backings: Vec<Option<Backing>>,
    mmio_bus: &mut Bus,
) -> Result<VirtioSetup, StartVmError> {
    let max = VIRTIO_GSIS.clone().count();
    if configs.len() > max {
        return Err(StartVmError::TooManyDevices {
            given: configs.len(),
            max,
        });
    }
    let dev_err = |what, source| StartVmError::Device { what, source };
    let epoll = Arc::new(Epoll::new().map_err(|e| dev_err("the device event loop", e))?);
    let mut setup = VirtioSetup {
        devices: Vec::new(),
        transports: Vec::new(),
        configs: Vec::new(),
        epoll: epoll.clone(),
        dsdt: Vec::new(),
        cmdline: Vec::new(),
    };
    let mut backings = backings.into_iter();
    for (i, (cfg, gsi)) in configs.iter().zip(VIRTIO_GSIS).enumerate() {
        let base = VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW;
        let (device, built) = build_device(cfg, backings.next().flatten())?;
        let irqfd =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| dev_err("a virtio interrupt", e))?;
        vm.fd
            .register_irqfd(&irqfd, gsi)
            .map_err(|e| dev_err("a virtio interrupt", io_err(e)))?;
        let transport = MmioTransport::new(
            device.clone(),
            i as u32,
            epoll.clone(),
            vm.ram.memory.clone(),
            Arc::new(Interrupt::new(irqfd)),
        )?;
        for (q, evt) in transport.queue_events().iter().enumerate() {
            vm.fd
                .register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
                .map_err(|e| dev_err("a virtio queue notifier", io_err(e)))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio_bus.insert(transport.clone(), base, MMIO_WINDOW)?;
        // Below 4 GiB by construction of the layout.
        let base32 = u32::try_from(base).unwrap_or(u32::MAX);
        setup.dsdt.push(DsdtDevice::VirtioMmio {
            base: base32,
            size: MMIO_WINDOW as u32,
            irq: gsi,
            index: i as u8,
        });
        setup
            .cmdline
            .push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
        setup.devices.push(device);
        setup.transports.push(transport);
        setup.configs.push(built);
    }
    Ok(setup)
}

/// What every VM has before its vCPUs exist: KVM, the VM and its RAM, the buses with
/// the legacy and virtio devices, the channel to the VMM's main thread.
struct Assembly {
    kvm: kvm_ioctls::Kvm,
    vm: Vm,
    io_bus: Bus,
    mmio_bus: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    virtio: VirtioSetup,
    sink: Arc<EventSink>,
    tx: Sender<VmMessage>,
    rx: Receiver<VmMessage>,
    metrics: Arc<VmMetrics>,
}

/// Checks the vCPU count against KVM and this VMM.
fn check_vcpus(kvm: &kvm_ioctls::Kvm, given: u8) -> Result<(), StartVmError> {
    let max = u8::try_from(kvm.get_max_vcpus())
        .unwrap_or(MAX_VCPUS)
        .min(MAX_VCPUS);
    if given == 0 || given > max {
        return Err(StartVmError::Vcpus { given, max });
    }
    Ok(())
}

/// An interrupt line on `gsi`, wired to KVM.
fn irq_line(vm: &Vm, gsi: u32, what: &'static str) -> Result<EventFd, StartVmError> {
    let err = |source| StartVmError::Device { what, source };
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(err)?;
    vm.fd
        .register_irqfd(&irq, gsi)
        .map_err(|e| err(io_err(e)))?;
    Ok(irq)
}

/// The serial console's interrupt line.
fn serial_irq(vm: &Vm) -> Result<EventFd, StartVmError> {
    irq_line(vm, SERIAL_IRQ, "the serial console interrupt")
}

/// Writes a fresh random VM generation ID into guest memory.
fn new_generation_id(vm: &Vm) -> Result<(), StartVmError> {
    use vm_memory::Bytes;
    let err = |source| StartVmError::Device {
        what: "the VM generation ID",
        source,
    };
    let mut id = [0u8; 16];
    crate::vmm::getrandom(&mut id).map_err(err)?;
    vm.ram
        .memory
        .write_slice(&id, vm_memory::GuestAddress(VMGENID_ADDR))
        .map_err(|e| err(std::io::Error::other(e.to_string())))
}

/// Puts the legacy devices and the virtio devices on their buses.
fn assemble(
    kvm: kvm_ioctls::Kvm,
    vm: Vm,
    serial: SerialDevice,
    devices: &[DeviceConfig],
    backings: Vec<Option<Backing>>,
    metrics: Arc<VmMetrics>,
) -> Result<Assembly, StartVmError> {
    let (tx, rx) = channel();
    let sink = Arc::new(EventSink::new(tx.clone()));
    let serial = Arc::new(Mutex::new(serial));
    let mut io_bus = Bus::new();
    io_bus.insert(serial.clone(), u64::from(SERIAL_PORT), 8)?;
    io_bus.insert(Arc::new(Mutex::new(I8042::new(sink.clone()))), 0x60, 5)?;
    io_bus.insert(
        Arc::new(Mutex::new(ExitPort::new(sink.clone()))),
        u64::from(EXIT_PORT),
        1,
    )?;
    io_bus.insert(
        Arc::new(Mutex::new(StagePort::new(metrics.clone()))),
        u64::from(STAGE_PORT),
        1,
    )?;
    let mut mmio_bus = Bus::new();
    let virtio = attach_virtio(&vm, devices, backings, &mut mmio_bus)?;
    Ok(Assembly {
        kvm,
        vm,
        io_bus,
        mmio_bus,
        serial,
        virtio,
        sink,
        tx,
        rx,
        metrics,
    })
}

impl Assembly {
    fn vcpu_shared(&self) -> VcpuShared {
        let msr_list = self
            .kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        VcpuShared {
            io_bus: Arc::new(self.io_bus.clone()),
            mmio_bus: Arc::new(self.mmio_bus.clone()),
            events: self.sink.clone(),
            metrics: self.metrics.clone(),
            msr_list: Arc::new(msr_list),
        }
    }

    /// Starts the threads: vCPUs (paused or running) and the device loop.
    fn start(
        self,
        vcpus: Vec<Vcpu>,
        paused: bool,
        console_input: bool,
        cmdline: String,
        format: Option<KernelFormat>,
        generation: Option<EventFd>,
    ) -> Result<Vmm, StartVmError> {
        let (event_loop, handle) = EventLoop::new(
            self.virtio.epoll.clone(),
            self.virtio.devices.clone(),
            self.sink.clone(),
        )
        .map_err(StartVmError::Thread)?;
        let mut handles = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            handles.push(vcpu.spawn(paused).map_err(StartVmError::Thread)?);
        }
        let event_loop = event_loop.spawn(handle)?;
        if paused {
            event_loop.pause()?;
        }
        self.metrics.record_phase("vcpus_started");
        if console_input {
            let serial = self.serial.clone();
            std::thread::Builder::new()
                .name("console-in".into())
                .spawn(move || pump_stdin(serial))
                .map_err(StartVmError::Thread)?;
        }
        Ok(Vmm::new(VmmParts {
            vcpus: handles,
            event_loop,
            vm: self.vm,
            serial: self.serial,
            devices: self.virtio.devices,
            transports: self.virtio.transports,
            configs: self.virtio.configs,
            sink: self.sink,
            tx: self.tx,
            rx: self.rx,
            metrics: self.metrics,
            paused,
            cmdline,
            format,
            generation,
        }))
    }
}

/// Builds the VM described by `config` and starts it. The guest console goes to
/// `console`; `start` is the VMM's launch instant (boot stage times count from it).
pub fn boot(
    config: &VmConfig,
    start: Instant,
    console: Box<dyn Write + Send>,
) -> Result<Vmm, StartVmError> {
    let metrics = Arc::new(VmMetrics::new(start));
    // Process start, argument parsing and logging set-up end here.
    metrics.record_phase("process_ready");
    let kvm = kvm::open()?;
    metrics.record_phase("kvm_open");
    check_vcpus(&kvm, config.vcpus)?;
    if config.mem_mib < MIN_MEM_MIB {
        return Err(StartVmError::TooLittleMemory {
            given: config.mem_mib,
        });
    }
    let mem_size = config
        .mem_mib
        .checked_mul(1 << 20)
        .filter(|s| *s <= (1u64 << 46))
        .ok_or(StartVmError::TooMuchMemory(config.mem_mib))?;

    let ram = memory::create(mem_size).map_err(CreateVmError::from)?;
    let vm = Vm::new(&kvm, ram)?;
    metrics.record_phase("vm_created");
    let serial = SerialDevice::new(serial_irq(&vm)?, console);
    let a = assemble(kvm, vm, serial, &config.devices, Vec::new(), metrics)?;

    // The guest finds virtio devices in the DSDT; a guest booted with acpi=off
    // gets them on its command line instead (never both: it would probe twice).
    let acpi_off = config.cmdline.split_whitespace().any(|w| w == "acpi=off");
    let mut cmdline = config.cmdline.clone();
    let mut dsdt_devices = acpi::legacy_devices();
    if acpi_off {
        // Device parameters go before any `--` (init arguments).
        let (kernel_args, init_args) = match cmdline.find(" -- ") {
            Some(i) => (cmdline[..i].to_string(), cmdline[i..].to_string()),
            None => (cmdline.clone(), String::new()),
        };
        cmdline = [kernel_args]
            .into_iter()
            .chain(a.virtio.cmdline.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
            + &init_args;
    } else {
        dsdt_devices.extend(a.virtio.dsdt.iter().copied());
        dsdt_devices.push(DsdtDevice::VmGenId {
            addr: VMGENID_ADDR,
            gsi: GED_GSI,
        });
    }
    let spec = BootSpec {
        kernel: config.kernel.clone(),
        initrd: config.initrd.clone(),
        cmdline: cmdline.clone(),
        num_cpus: config.vcpus,
        mem_size,
        dsdt_devices,
    };
    let boot = boot::load(&a.vm.ram.memory, &spec)?;
    let generation = if acpi_off {
        None
    } else {
        new_generation_id(&a.vm)?;
        Some(irq_line(&a.vm, GED_GSI, "the VM generation ID interrupt")?)
    };
    a.metrics.record_phase("kernel_loaded");
    tracing::debug!(?boot, "kernel loaded");

    let shared = a.vcpu_shared();
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let vcpu = Vcpu::create(&a.vm.fd, id, shared.clone())?;
        vcpu.configure_boot(&a.kvm, &a.vm.ram.memory, config.vcpus, boot.entry)?;
        vcpus.push(vcpu);
    }
    a.metrics.record_phase("vcpus_configured");
    enter_jail(config.jail.as_ref(), &config.devices, &a.metrics)?;
    a.start(
        vcpus,
        false,
        config.console_input,
        cmdline,
        Some(boot.format),
        generation,
    )
}

/// What to restore, and what a clone changes.
#[derive(Clone, Debug)]
pub struct RestoreConfig {
    /// Confine the process ([`crate::jail`]) before the vCPUs start (`None` also
    /// when it is confined already: a VMM that waited for its snapshot).
    pub jail: Option<JailConfig>,
    /// The state file.
    pub state: persist::Input,
    /// The memory file written with it.
    pub mem: persist::Input,
    /// Stay paused after the restore (resume through the API).
    pub paused: bool,
    /// Feed the VMM's stdin to the guest console.
    pub console_input: bool,
    /// A new host socket path for the vsock device (each clone needs its own).
    pub vsock_uds: Option<PathBuf>,
    /// That socket, bound already (a VMM that waited for its snapshot bound it
    /// before its jail, which leaves no directory to bind in).
    pub vsock_listener: Option<Arc<UnixListener>>,
    /// A new guest CID for the vsock device (the guest re-reads it with the
    /// transport reset every restore sends).
    pub vsock_cid: Option<u64>,
    /// New backing files for block devices.
    pub disks: Vec<DiskSwap>,
    /// A new tap for the net device (each clone needs its own).
    pub tap: Option<String>,
    /// That tap, opened already (by the API client, in the pod's network
    /// namespace: a jailed VMM has a network namespace of its own).
    pub tap_file: Option<Arc<File>>,
    /// Prefetch these pages of the memory file before the guest runs.
    pub working_set: Option<persist::Input>,
    /// How the memory comes in.
    pub mem_backend: memory::MemBackend,
}

impl RestoreConfig {
    /// Restore the snapshot `state` + `mem`, changing nothing.
    pub fn new(state: persist::Input, mem: persist::Input) -> Self {
        Self {
            jail: None,
            state,
            mem,
            paused: false,
            console_input: false,
            vsock_uds: None,
            vsock_listener: None,
            vsock_cid: None,
            disks: Vec::new(),
            tap: None,
            tap_file: None,
            working_set: None,
            mem_backend: memory::MemBackend::File,
        }
    }
}

/// A block device of a snapshot given another backing file (and serial) at restore:
/// how a pod template's spare slot receives the pod's image.
#[derive(Clone, Debug)]
pub struct DiskSwap {
    /// The id the disk had in the snapshot.
    pub slot: String,
    /// The new backing file.
    pub path: PathBuf,
    /// The id the guest sees from now on (default: unchanged).
    pub id: Option<String>,
    /// The file, opened by the API client (read-only: template slots are).
    pub handed: Option<Arc<File>>,
}

impl PartialEq for DiskSwap {
    fn eq(&self, other: &Self) -> bool {
        self.slot == other.slot
            && self.path == other.path
            && self.id == other.id
            && self.handed.is_some() == other.handed.is_some()
    }
}

impl Eq for DiskSwap {}

/// What a device is built over when the VMM cannot open it by name itself.
enum Backing {
    Disk(File),
    Tap(File),
    Vsock(UnixListener),
}

/// Applies a clone's changes to the saved device configurations; with each, what
/// it is built over when that came open (`None`: by its configuration).
fn override_devices(
    saved: &[VirtioDeviceState],
    cfg: &RestoreConfig,
) -> Result<Vec<(DeviceConfig, Option<Backing>)>, StartVmError> {
    let mut used_disks = vec![false; cfg.disks.len()];
    let dup = |f: &Arc<File>| {
        f.try_clone().map_err(|source| StartVmError::Device {
            what: "a handed-over file",
            source,
        })
    };
    let mut out = Vec::with_capacity(saved.len());
    for d in saved {
        out.push(match &d.config {
            DeviceConfig::Vsock { cid, uds } => {
                let backing = match &cfg.vsock_listener {
                    Some(l) => Some(Backing::Vsock(l.try_clone().map_err(|source| {
                        StartVmError::Device {
                            what: "the vsock socket",
                            source,
                        }
                    })?)),
                    None => None,
                };
                let config = DeviceConfig::Vsock {
                    cid: cfg.vsock_cid.unwrap_or(*cid),
                    uds: cfg.vsock_uds.clone().unwrap_or_else(|| uds.clone()),
                };
                (config, backing)
            }
            DeviceConfig::Block {
                path,
                read_only,
                id,
            } => match cfg.disks.iter().position(|s| Some(&s.slot) == id.as_ref()) {
                Some(i) => {
                    used_disks[i] = true;
                    let swap = &cfg.disks[i];
                    let backing = match &swap.handed {
                        Some(f) if !*read_only && !crate::vmm::open_for_writing(f) => {
                            return Err(StartVmError::Incompatible(format!(
                                "disk {:?} is writable: hand over {} open for reading and writing",
                                swap.slot,
                                swap.path.display()
                            )))
                        }
                        Some(f) => Some(Backing::Disk(dup(f)?)),
                        None => None,
                    };
                    let config = DeviceConfig::Block {
                        path: swap.path.clone(),
                        read_only: *read_only,
                        id: swap.id.clone().or_else(|| id.clone()),
                    };
                    (config, backing)
                }
                None => (
                    DeviceConfig::Block {
                        path: path.clone(),
                        read_only: *read_only,
                        id: id.clone(),
                    },
                    None,
                ),
            },
            DeviceConfig::Net { tap, mac } => {
                let backing = match &cfg.tap_file {
                    Some(f) => Some(Backing::Tap(dup(f)?)),
                    None => None,
                };
                let config = DeviceConfig::Net {
                    tap: cfg.tap.clone().unwrap_or_else(|| tap.clone()),
                    mac: *mac,
                };
                (config, backing)
            }
            DeviceConfig::Rng => (DeviceConfig::Rng, None),
        });
    }
    if let Some(i) = used_disks.iter().position(|u| !u) {
        return Err(StartVmError::Incompatible(format!(
            "the snapshot has no disk with id {:?}",
            cfg.disks[i].slot
        )));
    }
    if cfg.tap.is_some()
        && !out
            .iter()
            .any(|(d, _)| matches!(d, DeviceConfig::Net { .. }))
    {
        return Err(StartVmError::Incompatible(
            "a tap was given but the snapshot has no net device".into(),
        ));
    }
    Ok(out)
}

/// Rebuilds the VM saved in a snapshot and starts it (or leaves it paused).
pub fn restore(
    cfg: &RestoreConfig,
    start: Instant,
    console: Box<dyn Write + Send>,
) -> Result<Vmm, StartVmError> {
    restore_with(None, cfg, start, console)
}

/// [`restore`] with `/dev/kvm` opened already (`kvm`; `None` opens it), as a VMM
/// that waited for its snapshot has it. Times count from `start`.
pub fn restore_with(
    kvm: Option<kvm_ioctls::Kvm>,
    cfg: &RestoreConfig,
    start: Instant,
    console: Box<dyn Write + Send>,
) -> Result<Vmm, StartVmError> {
    let metrics = Arc::new(VmMetrics::new(start));
    metrics.record_phase("process_ready");
    let prepared = prepare_restore(
        kvm,
        &cfg.state,
        &cfg.mem,
        cfg.working_set.as_ref(),
        cfg.mem_backend,
        &metrics,
    )?;
    restore_prepared(prepared, cfg, metrics, console)
}

/// The files a restore was prepared from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sources {
    state: persist::FileIdentity,
    mem: persist::FileIdentity,
    working_set: Option<persist::FileIdentity>,
}

impl Sources {
    /// `None` when one cannot be inspected (reading it will say why).
    fn of(
        state: &persist::Input,
        mem: &persist::Input,
        working_set: Option<&persist::Input>,
    ) -> Option<Self> {
        Some(Self {
            state: state.identity().ok()?,
            mem: mem.identity().ok()?,
            working_set: match working_set {
                Some(w) => Some(w.identity().ok()?),
                None => None,
            },
        })
    }
}

/// The part of a restore that is the same for every clone of one snapshot: the
/// state file read and checked, the memory file mapped, the VM with its irqchip
/// and its vCPUs created (no state set: the clock and TSC start at the load), and
/// the working set mapped and built into KVM's page tables. A VMM waiting for its
/// snapshot (`--standby`) does this ahead (`PUT /snapshot/preload`), so that a
/// clone's load does only what is its own ([`restore_prepared`]).
pub struct PreparedRestore {
    kvm: kvm_ioctls::Kvm,
    state: MicrovmState,
    vm: Vm,
    vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
    sources: Option<Sources>,
}

impl std::fmt::Debug for PreparedRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedRestore")
            .field("vcpus", &self.vcpu_fds.len())
            .field("mem_size", &self.state.mem_size)
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

impl PreparedRestore {
    /// Whether `cfg` restores the very files (unchanged) this was prepared from.
    pub fn serves(&self, cfg: &RestoreConfig) -> bool {
        self.sources.is_some()
            && Sources::of(&cfg.state, &cfg.mem, cfg.working_set.as_ref()) == self.sources
    }
}

/// Prepares the restore of the snapshot `state` + `mem` (prefetching the pages of
/// `working_set`, bringing memory in the `backend` way): everything but the
/// clone's own devices and vCPU state. `kvm` is `/dev/kvm` opened already (`None`
/// opens it). Phases go to `metrics`.
pub fn prepare_restore(
    kvm: Option<kvm_ioctls::Kvm>,
    state: &persist::Input,
    mem: &persist::Input,
    working_set: Option<&persist::Input>,
    backend: memory::MemBackend,
    metrics: &VmMetrics,
) -> Result<PreparedRestore, StartVmError> {
    // Before reading: a file changed meanwhile no longer matches a later load.
    let sources = Sources::of(state, mem, working_set);
    let saved: MicrovmState = persist::read_state_from(state)?;
    metrics.record_phase("state_read");
    let kvm = match kvm {
        Some(k) => k,
        None => kvm::open()?,
    };
    metrics.record_phase("kvm_open");
    let vcpu_count = u8::try_from(saved.vcpus.len())
        .map_err(|_| StartVmError::Incompatible("more vCPUs than this VMM runs".into()))?;
    check_vcpus(&kvm, vcpu_count)?;
    let ram = match backend {
        memory::MemBackend::File => memory::restore(mem, saved.mem_size, &saved.id)?,
        memory::MemBackend::Uffd => memory::restore_uffd(mem, saved.mem_size, &saved.id)?,
    };
    let working_set = match working_set {
        Some(input) => Some(memory::WorkingSet::read(input, saved.mem_size)?),
        None => None,
    };
    let vm = Vm::new(&kvm, ram)?;
    let vcpu_fds = (0..vcpu_count)
        .map(|id| vcpu::create_fd(&vm.fd, id))
        .collect::<Result<Vec<_>, _>>()?;
    metrics.record_phase("vm_created");
    if let Some(ws) = &working_set {
        let ranges = vm.ram.populate(ws)?;
        metrics.record_phase("working_set_populated");
        if let Some(fd) = vcpu_fds.first() {
            if !vcpu::prefault(fd, 0, &ranges)? {
                tracing::info!("this KVM cannot prefault memory: pages fault in as touched");
            }
        }
        metrics.record_phase("working_set_prefaulted");
    }
    Ok(PreparedRestore {
        kvm,
        state: saved,
        vm,
        vcpu_fds,
        sources,
    })
}

/// Finishes a restore prepared by [`prepare_restore`] with what is the clone's own
/// (`cfg`: its disks, tap, vsock socket and CID, jail): the VM and vCPU state, the
/// devices, a new generation ID; then starts it.
pub fn restore_prepared(
    prepared: PreparedRestore,
    cfg: &RestoreConfig,
    metrics: Arc<VmMetrics>,
    console: Box<dyn Write + Send>,
) -> Result<Vmm, StartVmError> {
    let PreparedRestore {
        kvm,
        state,
        vm,
        vcpu_fds,
        ..
    } = prepared;
    vm.restore_state(&state.vm).map_err(StartVmError::VmState)?;
    let serial =
        SerialDevice::from_state(&state.serial, serial_irq(&vm)?, console).map_err(|source| {
            StartVmError::Device {
                what: "the serial console",
                source,
            }
        })?;
    let (configs, backings): (Vec<_>, Vec<_>) =
        override_devices(&state.devices, cfg)?.into_iter().unzip();
    let a = assemble(kvm, vm, serial, &configs, backings, metrics)?;
    let shared = a.vcpu_shared();
    if let memory::Backing::Uffd(server) = &a.vm.ram.backing {
        // A fault it cannot answer ends the VM from now on.
        let _ = server.sink.set(shared.events.clone());
    }
    for (index, (t, d)) in a.virtio.transports.iter().zip(&state.devices).enumerate() {
        t.lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore_state(&d.transport)
            .map_err(|source| StartVmError::DeviceState { index, source })?;
    }
    a.metrics.record_phase("devices_restored");
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for ((id, fd), s) in (0u8..).zip(vcpu_fds).zip(&state.vcpus) {
        let vcpu = Vcpu::over(fd, id, shared.clone());
        vcpu.restore_state(s)?;
        vcpus.push(vcpu);
    }
    // Interrupts the devices raise now reach restored LAPICs.
    for t in &a.virtio.transports {
        t.lock().unwrap_or_else(|p| p.into_inner()).restored();
    }
    // A clone is a new generation: a new ID, and the GED's interrupt, whose _EVT
    // notifies the ID device; the guest's vmgenid driver reseeds its CRNG from it.
    let generation = if state.vmgenid {
        new_generation_id(&a.vm)?;
        let irq = irq_line(&a.vm, GED_GSI, "the VM generation ID interrupt")?;
        let _ = irq.write(1);
        Some(irq)
    } else {
        None
    };
    a.metrics.record_phase("vcpus_configured");
    enter_jail(cfg.jail.as_ref(), &configs, &a.metrics)?;
    if let memory::Backing::Uffd(server) = &a.vm.ram.backing {
        server.confine().map_err(StartVmError::Thread)?;
    }
    a.start(
        vcpus,
        cfg.paused,
        cfg.console_input,
        state.cmdline,
        None,
        generation,
    )
}

/// Confines a VMM that waits for its snapshot (`--standby`), before any VM
/// exists: the directory of its vsock socket `vsock_uds` (bound already) stays in
/// reach for the guest's connections to `<uds>_<port>`.
pub fn confine_standby(
    jail: &JailConfig,
    vsock_uds: Option<&Path>,
    metrics: &VmMetrics,
) -> Result<(), StartVmError> {
    let devices: Vec<DeviceConfig> = vsock_uds
        .map(|uds| DeviceConfig::Vsock {
            cid: 3,
            uds: uds.to_path_buf(),
        })
        .into_iter()
        .collect();
    enter_jail(Some(jail), &devices, metrics)
}

/// Enters the jail (when asked to), keeping the directories of the vsock sockets
/// in reach for the guest's connections to `<uds>_<port>`; records the phase.
fn enter_jail(
    jail: Option<&JailConfig>,
    devices: &[DeviceConfig],
    metrics: &VmMetrics,
) -> Result<(), StartVmError> {
    let Some(jail) = jail else {
        return Ok(());
    };
    let reach: Vec<PathBuf> = devices
        .iter()
        .filter_map(|d| match d {
            DeviceConfig::Vsock { uds, .. } => uds.parent().map(Path::to_path_buf),
            _ => None,
        })
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p
            }
        })
        .filter_map(|p| std::path::absolute(p).ok())
        .collect();
    crate::jail::enter(jail, &reach)?;
    metrics.record_phase("jailed");
    Ok(())
}

fn io_err(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

/// Copies host stdin into the UART's receive FIFO as room frees up.
fn pump_stdin(serial: Arc<Mutex<SerialDevice>>) {
    crate::seccomp::apply_or_exit(crate::seccomp::Thread::ConsoleIn);
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let taken = serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .enqueue_input(pending);
            pending = &pending[taken..];
            if !pending.is_empty() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
