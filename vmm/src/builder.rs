//! Assembles a VM from a [`VmConfig`]: KVM, memory, devices, kernel, vCPUs; then runs
//! it until the guest reports an exit status, resets, fails, or time runs out.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::IoEventAddress;
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{self, DsdtDevice};
use crate::arch::x86_64::boot::{self, BootSpec, KernelFormat, LoadKernelError};
use crate::arch::x86_64::layout::{SERIAL_IRQ, SERIAL_PORT, VIRTIO_GSIS, VIRTIO_MMIO_BASE};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::debug_port::{ExitPort, StagePort, EXIT_PORT, STAGE_PORT};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::legacy::EventSink;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::event_loop::EventLoop;
use crate::devices::virtio::mmio::{
    CreateTransportError, MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY,
};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{DeviceMetricsSnapshot, Interrupt, VirtioDevice};
use crate::metrics::{MetricsSnapshot, VmMetrics};
use crate::vstate::kvm::{self, KvmError};
use crate::vstate::vcpu::{ConfigureVcpuError, Vcpu, VcpuShared};
use crate::vstate::vm::{CreateVmError, Vm};
use crate::vstate::VmEvent;

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
}

/// One virtio device to attach.
#[derive(Clone, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest reported this exit status.
    Exited(u8),
    /// The guest powered off without a status.
    PoweredOff,
    /// The guest crashed, reset or a vCPU failed: why.
    Crashed(String),
    /// `--timeout` expired.
    TimedOut(Duration),
}

/// The outcome with the VM's counters.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// How it ended.
    pub outcome: Outcome,
    /// Counters at the end.
    pub metrics: MetricsSnapshot,
    /// The kernel format booted.
    pub format: KernelFormat,
    /// Per-device counters at the end.
    pub devices: Vec<DeviceMetricsSnapshot>,
}

/// Why the VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartVmError {
    /// KVM unusable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
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
}

/// The virtio devices of a VM, wired to KVM.
struct VirtioSetup {
    devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    epoll: Arc<Epoll>,
    dsdt: Vec<DsdtDevice>,
    cmdline: Vec<String>,
}

fn build_device(cfg: &DeviceConfig) -> Result<Arc<Mutex<dyn VirtioDevice>>, StartVmError> {
    let err = |what| move |source| StartVmError::Device { what, source };
    Ok(match cfg {
        DeviceConfig::Rng => Arc::new(Mutex::new(Rng::new())),
        DeviceConfig::Block {
            path,
            read_only,
            id,
        } => Arc::new(Mutex::new(
            Block::new(path, *read_only, id.clone()).map_err(err("a virtio-blk disk"))?,
        )),
        DeviceConfig::Net { tap, mac } => Arc::new(Mutex::new(
            Net::new(tap, *mac).map_err(err("a virtio-net device"))?,
        )),
        DeviceConfig::Vsock { cid, uds } => Arc::new(Mutex::new(
            Vsock::new(*cid, uds).map_err(err("a virtio-vsock device"))?,
        )),
    })
}

/// Creates every virtio device, its transport on the MMIO bus, its irqfd and
/// ioeventfds, and how the guest learns of it.
fn attach_virtio(
    vm: &Vm,
    configs: &[DeviceConfig],
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
        epoll: epoll.clone(),
        dsdt: Vec::new(),
        cmdline: Vec::new(),
    };
    for (i, (cfg, gsi)) in configs.iter().zip(VIRTIO_GSIS).enumerate() {
        let base = VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW;
        let device = build_device(cfg)?;
        let irqfd =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| dev_err("a virtio interrupt", e))?;
        vm.fd
            .register_irqfd(&irqfd, gsi)
            .map_err(|e| dev_err("a virtio interrupt", io_err(e)))?;
        let transport = MmioTransport::new(
            device.clone(),
            i as u32,
            epoll.clone(),
            vm.memory.clone(),
            Arc::new(Interrupt::new(irqfd)),
        )?;
        for (q, evt) in transport.queue_events().iter().enumerate() {
            vm.fd
                .register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
                .map_err(|e| dev_err("a virtio queue notifier", io_err(e)))?;
        }
        mmio_bus.insert(Arc::new(Mutex::new(transport)), base, MMIO_WINDOW)?;
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
    }
    Ok(setup)
}

fn io_err(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

/// Builds the VM described by `config`, runs it to its end and reports how it
/// ended. The guest console goes to `console`; `start` is the VMM's launch instant
/// (boot stage times count from it).
pub fn run(
    config: &VmConfig,
    start: Instant,
    console: Box<dyn Write + Send>,
) -> Result<RunReport, StartVmError> {
    let metrics = Arc::new(VmMetrics::new(start));
    // Process start, argument parsing and logging set-up end here.
    metrics.record_phase("process_ready");
    let kvm = kvm::open()?;
    metrics.record_phase("kvm_open");
    let max_vcpus = u8::try_from(kvm.get_max_vcpus())
        .unwrap_or(MAX_VCPUS)
        .min(MAX_VCPUS);
    if config.vcpus == 0 || config.vcpus > max_vcpus {
        return Err(StartVmError::Vcpus {
            given: config.vcpus,
            max: max_vcpus,
        });
    }
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

    let vm = Vm::new(&kvm, mem_size)?;
    metrics.record_phase("vm_created");
    let (tx, rx) = channel();
    let events = Arc::new(EventSink::new(tx));

    // Legacy devices on the port bus.
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| StartVmError::Device {
        what: "the serial console",
        source,
    })?;
    vm.fd
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|e| StartVmError::Device {
            what: "the serial console interrupt",
            source: io_err(e),
        })?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, console)));
    let mut io_bus = Bus::new();
    io_bus.insert(serial.clone(), u64::from(SERIAL_PORT), 8)?;
    io_bus.insert(Arc::new(Mutex::new(I8042::new(events.clone()))), 0x60, 5)?;
    io_bus.insert(
        Arc::new(Mutex::new(ExitPort::new(events.clone()))),
        u64::from(EXIT_PORT),
        1,
    )?;
    io_bus.insert(
        Arc::new(Mutex::new(StagePort::new(metrics.clone()))),
        u64::from(STAGE_PORT),
        1,
    )?;

    let mut mmio_bus = Bus::new();
    let virtio = attach_virtio(&vm, &config.devices, &mut mmio_bus)?;
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
            .chain(virtio.cmdline.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
            + &init_args;
    } else {
        dsdt_devices.extend(virtio.dsdt.iter().copied());
    }
    let spec = BootSpec {
        kernel: config.kernel.clone(),
        initrd: config.initrd.clone(),
        cmdline,
        num_cpus: config.vcpus,
        mem_size,
        dsdt_devices,
    };
    let boot = boot::load(&vm.memory, &spec)?;
    metrics.record_phase("kernel_loaded");
    tracing::debug!(?boot, "kernel loaded");

    let shared = VcpuShared {
        io_bus: Arc::new(io_bus),
        mmio_bus: Arc::new(mmio_bus),
        events: events.clone(),
        metrics: metrics.clone(),
    };
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        vcpus.push(Vcpu::new(
            &kvm,
            &vm.fd,
            &vm.memory,
            id,
            config.vcpus,
            boot.entry,
            shared.clone(),
        )?);
    }
    metrics.record_phase("vcpus_configured");
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu.run())
            .map_err(StartVmError::Thread)?;
    }
    if !virtio.devices.is_empty() {
        let event_loop = EventLoop::new(virtio.epoll.clone(), virtio.devices.clone());
        std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || event_loop.run())
            .map_err(StartVmError::Thread)?;
    }
    metrics.record_phase("vcpus_started");
    if config.console_input {
        let serial = serial.clone();
        std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || pump_stdin(serial))
            .map_err(StartVmError::Thread)?;
    }

    let event = match config.timeout {
        Some(t) => match rx.recv_timeout(t.saturating_sub(start.elapsed())) {
            Ok(ev) => Some(ev),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                Some(VmEvent::VcpuError("all vCPUs are gone".into()))
            }
        },
        None => Some(
            rx.recv()
                .unwrap_or(VmEvent::VcpuError("all vCPUs are gone".into())),
        ),
    };
    let outcome = match event {
        Some(VmEvent::Exit(status)) => Outcome::Exited(status),
        Some(VmEvent::PowerOff) => Outcome::PoweredOff,
        Some(VmEvent::Reset(why)) => Outcome::Crashed(format!(
            "{why} before reporting an exit status (with panic=-1 a guest kernel panic ends this way; see the console output above)"
        )),
        Some(VmEvent::VcpuError(msg)) => Outcome::Crashed(msg),
        None => Outcome::TimedOut(config.timeout.unwrap_or_default()),
    };
    serial.lock().unwrap_or_else(|p| p.into_inner()).flush();
    // vCPU threads may still be inside KVM_RUN on this memory: unmapping it (by
    // dropping `vm`) under them would turn guest accesses into faults. The caller
    // exits the process right after, which ends threads and mappings together.
    // (Pausing and kicking vCPUs comes with snapshots.)
    std::mem::forget(vm);
    let devices = virtio
        .devices
        .iter()
        .map(|d| {
            let d = d.lock().unwrap_or_else(|p| p.into_inner());
            d.metrics().snapshot(d.kind())
        })
        .collect();
    Ok(RunReport {
        outcome,
        metrics: metrics.snapshot(),
        format: boot.format,
        devices,
    })
}

/// Copies host stdin into the UART's receive FIFO as room frees up.
fn pump_stdin(serial: Arc<Mutex<SerialDevice>>) {
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
