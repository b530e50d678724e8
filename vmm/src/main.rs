//! `atoll-vmm`: boot (or restore) one microVM and exit with the guest's exit status.

use std::io::{IsTerminal, LineWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use atoll_vmm::api::{self, ApiError, Request};
use atoll_vmm::builder::{self, DeviceConfig, DiskSwap, Outcome, RestoreConfig, VmConfig};
use atoll_vmm::devices::virtio::vsock;
use atoll_vmm::jail::JailConfig;
use atoll_vmm::metrics::VmMetrics;
use atoll_vmm::persist;
use atoll_vmm::vmm::Vmm;
use atoll_vmm::vstate::memory::MemBackend;
use atoll_vmm::vstate::VmMessage;
use clap::Parser;

/// The command line every guest gets unless `--cmdline` replaces it.
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";

/// Exit status when the guest crashed or reset without reporting a status.
const EXIT_GUEST_CRASHED: u8 = 123;
/// Exit status when `--timeout` expired (as coreutils `timeout`).
const EXIT_TIMED_OUT: u8 = 124;

/// Boot a Linux kernel in a KVM microVM; exit with the status the guest reports.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    after_help = "\
Exit status: the guest's own status (0-255) as reported through the exit port;
1 when the VM cannot start; 123 when the guest crashed or reset without reporting;
124 when --timeout expired; 159 when a VMM thread made a system call outside its
seccomp filter (one line on stderr names the thread and the call).

Arguments after `--` are passed to the guest's init as its argv (appended to the
kernel command line after `--`).

With --api-sock, the VM is driven over HTTP+JSON on that Unix socket while it runs
(docs/vmm-api.md): pause, resume, snapshot, stop, metrics. --restore starts from a
snapshot instead of a kernel; --standby starts no VM and waits, jailed, for a
snapshot to arrive as `PUT /snapshot/load` (a pre-started VMM of a pool)."
)]
struct Args {
    /// Kernel image: an ELF vmlinux (booted through its PVH entry) or a bzImage.
    #[arg(long, required_unless_present_any = ["restore", "standby", "test_malloc_trim"])]
    kernel: Option<PathBuf>,
    /// Restore the VM from this snapshot state file instead of booting a kernel.
    #[arg(long, requires = "mem_file", conflicts_with_all = ["kernel", "initrd", "vcpus", "mem", "rng", "disk", "net", "vsock"])]
    restore: Option<PathBuf>,
    /// The snapshot memory file written together with the state file.
    #[arg(long, requires = "restore")]
    mem_file: Option<PathBuf>,
    /// Start no VM: open KVM, bind the API and vsock sockets, enter the jail and
    /// wait for `PUT /snapshot/load` (the snapshot and what the clone changes
    /// arrive with it). --timeout counts from the load.
    #[arg(long, requires = "api_sock", conflicts_with_all = ["kernel", "restore", "initrd", "vcpus", "mem", "rng", "disk", "net", "vsock"])]
    standby: bool,
    /// With --restore: stay paused until resumed through the API.
    #[arg(long, requires = "restore")]
    paused: bool,
    /// With --restore or --standby: this clone's vsock socket path (each clone
    /// needs its own).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// With --restore: this clone's guest CID (3..=4294967295).
    #[arg(long, requires = "restore", value_parser = parse_cid)]
    vsock_cid: Option<u64>,
    /// With --restore: back the disk with id SLOT by another file, optionally under a
    /// new id: SLOT=PATH[,id=ID] (repeatable).
    #[arg(long, requires = "restore", value_name = "SLOT=PATH[,id=ID]", value_parser = parse_disk_swap)]
    disk_path: Vec<DiskSwap>,
    /// With --restore: prefetch the guest pages listed in this working-set file
    /// (recorded with PUT /snapshot/working-set) before the guest runs.
    #[arg(long, requires = "restore")]
    working_set: Option<PathBuf>,
    /// With --restore: how guest memory comes in: `file` maps the memory file
    /// copy-on-write (pages shared with every clone through the page cache), `uffd`
    /// copies each page into anonymous memory on first touch (userfaultfd).
    #[arg(long, requires = "restore", value_enum, default_value_t = MemBackend::File)]
    mem_backend: MemBackend,
    /// With --restore: this clone's tap for the net device.
    #[arg(long, requires = "restore", value_name = "NAME")]
    net_tap: Option<String>,
    /// Serve the control API on this Unix socket.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Initial ramdisk (cpio, optionally compressed).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem: u64,
    /// Stop the VM after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// Attach a virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// Attach a virtio-blk disk: PATH[,ro][,id=ID] (repeatable).
    #[arg(long, value_name = "PATH[,ro][,id=ID]", value_parser = parse_disk)]
    disk: Vec<DeviceConfig>,
    /// Attach a virtio-net device on a tap: tap=NAME[,mac=AA:BB:CC:DD:EE:FF].
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    net: Vec<DeviceConfig>,
    /// Attach a virtio-vsock device: cid=N,uds=PATH.
    #[arg(long, value_name = "cid=N,uds=PATH", value_parser = parse_vsock)]
    vsock: Option<DeviceConfig>,
    /// Write VM exit counts, boot stage times and peak RSS as JSON to this file.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Log filter (also RUST_LOG), e.g. `debug`.
    #[arg(long, default_value = "warn")]
    log: String,
    /// Run without the jail (new namespaces, an empty root, no capabilities,
    /// limits; see docs/architecture.md). For debugging only.
    #[arg(long)]
    no_jail: bool,
    /// In the jail, run as this unprivileged uid (one per pod, so that VMMs cannot
    /// reach each other); default: uid 0 without capabilities.
    #[arg(long, conflicts_with = "no_jail", value_parser = clap::value_parser!(u32).range(1..))]
    jail_uid: Option<u32>,
    /// In the jail, run as this gid (default: the jail uid).
    #[arg(long, requires = "jail_uid", value_parser = clap::value_parser!(u32).range(1..))]
    jail_gid: Option<u32>,
    /// Test only: once jailed, report on stderr what each of these paths gives
    /// (the end-to-end test of what the jail leaves reachable).
    #[arg(long, hide = true, value_name = "PATH")]
    test_jail_probe: Vec<PathBuf>,
    /// Test only: a thread under the devices filter allocates and frees a burst
    /// of buffers (glibc trims its arena), then the VMM exits 0; nothing is built.
    #[arg(long, hide = true)]
    test_malloc_trim: bool,
    /// Run without the per-thread seccomp filters. For debugging only: a guest
    /// that finds a device bug then has every system call of the host.
    #[arg(long)]
    no_seccomp: bool,
    /// Test only: the vCPU thread makes a call outside its filter when the guest's
    /// command starts (the end-to-end test of the filters).
    #[arg(long, hide = true)]
    test_seccomp_trip: bool,
    /// Test only: a thread under the devices filter makes a call outside it after
    /// this many seconds (a VMM that dies while a pod runs).
    #[arg(long, hide = true, value_name = "SECS")]
    test_seccomp_trip_after: Option<u64>,
    /// Arguments for the guest's init.
    #[arg(last = true)]
    init_args: Vec<String>,
}

fn cmdline_with_init_args(base: &str, args: &[String]) -> anyhow::Result<String> {
    if args.is_empty() {
        return Ok(base.to_string());
    }
    let mut s = format!("{base} --");
    for a in args {
        if a.contains('"') || a.contains('\n') {
            bail!("init argument {a:?} contains a double quote or newline, which the kernel command line cannot carry");
        }
        if a.is_empty() || a.contains(char::is_whitespace) {
            s.push_str(&format!(" \"{a}\""));
        } else {
            s.push(' ');
            s.push_str(a);
        }
    }
    Ok(s)
}

fn main() -> ExitCode {
    let start = Instant::now();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log)),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args, start) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("atoll-vmm: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args, start: Instant) -> anyhow::Result<u8> {
    let timeout = (args.timeout > 0).then(|| Duration::from_secs(args.timeout));
    let console_input = std::io::stdin().is_terminal() || !stdin_is_devnull();
    let console = Box::new(LineWriter::new(std::io::stdout()));
    if args.no_seccomp {
        tracing::warn!(
            "--no-seccomp: the VMM's threads run WITHOUT seccomp filters; a guest that \
             finds a device bug has every system call of this host (debugging only)"
        );
    }
    if args.no_jail {
        tracing::warn!(
            "--no-jail: the VMM keeps its capabilities and the host's namespaces \
             (debugging only)"
        );
    }
    atoll_vmm::seccomp::init(!args.no_seccomp)?;
    if args.test_malloc_trim {
        // A thread under the devices filter frees a burst of buffers.
        let moved = std::thread::Builder::new()
            .name("devices".into())
            .spawn(|| {
                atoll_vmm::seccomp::apply_or_exit(atoll_vmm::seccomp::Thread::Devices);
                atoll_vmm::seccomp::exercise_allocator()
            })?
            .join()
            .map_err(|_| anyhow::anyhow!("the allocating thread panicked"))?;
        eprintln!("atoll-vmm: malloc trim probe: {moved} bytes allocated and freed");
        return Ok(0);
    }
    if args.test_seccomp_trip {
        atoll_vmm::seccomp::arm_trip();
    }
    // Bind before building, so a bad socket path fails before any guest runs; the
    // socket file goes when this function returns, however it returns.
    let api = match &args.api_sock {
        Some(p) => Some((
            atoll_vmm::api::bind(p)
                .with_context(|| format!("cannot listen on the API socket {}", p.display()))?,
            RemoveOnDrop(p.clone()),
        )),
        None => None,
    };
    // Opened now: the jail leaves no path to open at the end.
    let metrics_out = match &args.metrics {
        Some(p) => Some(
            std::fs::File::create(p)
                .with_context(|| format!("cannot write metrics to {}", p.display()))?,
        ),
        None => None,
    };
    let jail = (!args.no_jail).then(|| JailConfig {
        user: args.jail_uid.map(|u| (u, args.jail_gid.unwrap_or(u))),
    });
    if args.vsock_uds.is_some() && args.restore.is_none() && !args.standby {
        bail!("--vsock-uds goes with --restore or --standby (a booted VM takes --vsock cid=N,uds=PATH)");
    }
    let (mut vmm, clock, _api_sock) = if args.standby {
        let Some((listener, file)) = api else {
            bail!("--standby needs --api-sock: the snapshot arrives through the API");
        };
        match standby(&args, listener, jail.as_ref(), console_input, start)? {
            Some((vmm, loaded)) => (vmm, loaded, Some(file)),
            None => return Ok(0),
        }
    } else {
        let vmm = match (&args.restore, &args.mem_file) {
            (Some(state), Some(mem)) => builder::restore(
                &RestoreConfig {
                    jail: jail.clone(),
                    paused: args.paused,
                    console_input,
                    vsock_uds: args.vsock_uds.clone(),
                    vsock_cid: args.vsock_cid,
                    disks: args.disk_path.clone(),
                    tap: args.net_tap.clone(),
                    working_set: args.working_set.clone().map(persist::Input::path),
                    mem_backend: args.mem_backend,
                    ..RestoreConfig::new(
                        persist::Input::path(state.clone()),
                        persist::Input::path(mem.clone()),
                    )
                },
                start,
                console,
            )?,
            _ => {
                let config = VmConfig {
                    jail,
                    cmdline: cmdline_with_init_args(&args.cmdline, &args.init_args)?,
                    kernel: args.kernel.clone().context("--kernel is required")?,
                    initrd: args.initrd.clone(),
                    vcpus: args.vcpus,
                    mem_mib: args.mem,
                    timeout,
                    console_input,
                    devices: args
                        .rng
                        .then_some(DeviceConfig::Rng)
                        .into_iter()
                        .chain(args.disk.clone())
                        .chain(args.net.clone())
                        .chain(args.vsock.clone())
                        .collect(),
                };
                builder::boot(&config, start, console)?
            }
        };
        let file = match api {
            Some((listener, file)) => {
                atoll_vmm::api::spawn(listener, atoll_vmm::api::target(vmm.requests()))
                    .context("cannot start the API thread")?;
                Some(file)
            }
            None => None,
        };
        (vmm, start, file)
    };
    for p in &args.test_jail_probe {
        eprintln!("atoll-vmm: jail probe {}: {}", p.display(), probe(p));
    }
    // Every other thread exists now (each filtered itself as it started): the
    // main thread is filtered last, so no thread inherits its filter.
    if let Some(secs) = args.test_seccomp_trip_after {
        std::thread::Builder::new()
            .name("trip".into())
            .spawn(move || {
                atoll_vmm::seccomp::apply_or_exit(atoll_vmm::seccomp::Thread::Devices);
                std::thread::sleep(Duration::from_secs(secs));
                atoll_vmm::seccomp::trip_now();
            })
            .context("cannot start the test trip thread")?;
    }
    atoll_vmm::seccomp::apply(atoll_vmm::seccomp::Thread::Main)?;
    let outcome = vmm.run(clock, timeout);
    if matches!(outcome, Outcome::Stopped) {
        // The API thread writes the answer to the Stop; exiting first would cut it.
        atoll_vmm::api::wait_answered(Duration::from_secs(1));
    }
    let report = vmm.report(Some(outcome));
    drop(vmm);
    if let (Some(path), Some(mut out)) = (&args.metrics, metrics_out) {
        let mut json = serde_json::to_value(&report.metrics)?;
        json["outcome"] = serde_json::Value::String(format!("{:?}", report.outcome));
        json["kernel_format"] = match report.format {
            Some(f) => serde_json::Value::String(format!("{f:?}")),
            None => serde_json::Value::String("restored".into()),
        };
        json["devices"] = serde_json::to_value(&report.devices)?;
        if let Some(p) = report.uffd_pages {
            json["uffd_pages"] = serde_json::to_value(p)?;
        }
        out.write_all(&serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("cannot write metrics to {}", path.display()))?;
    }
    Ok(match report.outcome {
        Outcome::Exited(status) => status,
        Outcome::PoweredOff => {
            eprintln!("atoll-vmm: the guest powered off without reporting an exit status");
            0
        }
        Outcome::Crashed(why) => {
            eprintln!("atoll-vmm: error: {why}");
            EXIT_GUEST_CRASHED
        }
        Outcome::Stopped => 0,
        Outcome::TimedOut(t) => {
            eprintln!(
                "atoll-vmm: error: the guest did not finish within {}s (--timeout); stopped it",
                t.as_secs()
            );
            EXIT_TIMED_OUT
        }
    })
}

/// `--standby`: opens KVM, binds the vsock socket, enters the jail, then serves
/// the API until a snapshot loads (the VM and the instant its load began) or a
/// Stop arrives (`None`). A preload prepares the restore of the snapshot a load
/// will most likely name (`builder::prepare_restore`); a load of exactly those
/// files finishes it, any other load restores in full. A preload or load that
/// fails is answered with why, and the VMM waits for the next one: nothing of the
/// failed VM is left.
fn standby(
    args: &Args,
    listener: UnixListener,
    jail: Option<&JailConfig>,
    console_input: bool,
    start: Instant,
) -> anyhow::Result<Option<(Vmm, Instant)>> {
    let kvm = atoll_vmm::vstate::kvm::open()?;
    let vsock = match &args.vsock_uds {
        Some(p) => Some(Arc::new(vsock::device::bind(p).with_context(|| {
            format!("cannot listen on the vsock socket {}", p.display())
        })?)),
        None => None,
    };
    if let Some(j) = jail {
        builder::confine_standby(j, args.vsock_uds.as_deref(), &VmMetrics::new(start))?;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let target = api::target(tx);
    api::spawn(listener, target.clone()).context("cannot start the API thread")?;
    tracing::info!("standing by for PUT /snapshot/load");
    // What a PUT /snapshot/preload prepared, for a load of the same files.
    let mut preloaded: Option<builder::PreparedRestore> = None;
    let dup_kvm = || {
        atoll_vmm::vstate::kvm::duplicate(&kvm)
            .map_err(|e| anyhow::anyhow!("cannot use /dev/kvm again: {e}"))
    };
    for msg in rx {
        let VmMessage::Api(req, files, reply) = msg else {
            continue;
        };
        let answer = match req {
            Request::Preload(p) => {
                let t = Instant::now();
                // The earlier one goes first: two VMs' page tables never coexist.
                preloaded = None;
                let (state, mem, ws) = snapshot_inputs(
                    p.snapshot_path,
                    p.mem_file_path,
                    p.working_set_path,
                    &mut files.into_iter(),
                );
                let metrics = atoll_vmm::metrics::VmMetrics::new(t);
                match dup_kvm().and_then(|kvm| {
                    builder::prepare_restore(
                        Some(kvm),
                        &state,
                        &mem,
                        ws.as_ref(),
                        MemBackend::File,
                        &metrics,
                    )
                    .map_err(anyhow::Error::from)
                }) {
                    Ok(p) => {
                        tracing::info!("preloaded {}: {p:?}", state.path.display());
                        preloaded = Some(p);
                        Ok(serde_json::json!({
                            "state": "Standby",
                            "ms": t.elapsed().as_millis() as u64,
                        }))
                    }
                    Err(e) => {
                        tracing::warn!("snapshot preload failed: {e:#}");
                        Err(ApiError::bad_request(format!(
                            "{e:#}; this VMM still waits for a snapshot"
                        )))
                    }
                }
            }
            Request::Load(load) => {
                let loaded = Instant::now();
                let cfg = load_config(*load, files, args, vsock.clone(), console_input);
                let console = Box::new(LineWriter::new(std::io::stdout()));
                let vmm = match preloaded.take() {
                    Some(p) if p.serves(&cfg) => {
                        let metrics = Arc::new(atoll_vmm::metrics::VmMetrics::new(loaded));
                        metrics.record_phase("process_ready");
                        metrics.record_phase("template_preloaded");
                        builder::restore_prepared(p, &cfg, metrics, console)
                            .map_err(anyhow::Error::from)
                    }
                    other => {
                        if other.is_some() {
                            tracing::info!(
                                "the load names other snapshot files than the preload (or \
                                 they changed): restoring {} in full",
                                cfg.state.path.display()
                            );
                        }
                        // Its VM goes before another is made.
                        drop(other);
                        dup_kvm().and_then(|kvm| {
                            builder::restore_with(Some(kvm), &cfg, loaded, console)
                                .map_err(anyhow::Error::from)
                        })
                    }
                };
                match vmm {
                    Ok(vmm) => {
                        // Requests go to the VM from now on; the load's answer
                        // goes out only then.
                        *target.lock().unwrap_or_else(|p| p.into_inner()) = vmm.requests();
                        let _ = reply.send(Ok(serde_json::json!({
                            "state": vmm.state(),
                            "ms": loaded.elapsed().as_millis() as u64,
                        })));
                        return Ok(Some((vmm, loaded)));
                    }
                    Err(e) => {
                        tracing::warn!("snapshot load failed: {e:#}");
                        Err(ApiError::bad_request(format!(
                            "{e:#}; this VMM still waits for a snapshot"
                        )))
                    }
                }
            }
            Request::Describe => Ok(serde_json::json!({"state": "Standby"})),
            Request::Stop => {
                let _ = reply.send(Ok(serde_json::json!({"state": "Stopped"})));
                api::wait_answered(Duration::from_secs(1));
                return Ok(None);
            }
            _ => Err(ApiError::conflict(
                "no VM yet: this VMM waits for PUT /snapshot/load",
            )),
        };
        let _ = reply.send(answer);
    }
    bail!("the API thread ended")
}

/// The state, memory and working-set files a preload or load names, each with the
/// file handed over for it (taken from `files` in that order, when there are).
fn snapshot_inputs(
    state: PathBuf,
    mem: PathBuf,
    working_set: Option<PathBuf>,
    files: &mut impl Iterator<Item = std::fs::File>,
) -> (persist::Input, persist::Input, Option<persist::Input>) {
    let state = persist::Input::new(state, files.next());
    let mem = persist::Input::new(mem, files.next());
    let working_set = working_set.map(|w| persist::Input::new(w, files.next()));
    (state, mem, working_set)
}

/// The restore a `PUT /snapshot/load` asks for, with the files it carried (none,
/// or one for each file it names, in [`api::LoadSnapshot`]'s order).
fn load_config(
    load: api::LoadSnapshot,
    files: Vec<std::fs::File>,
    args: &Args,
    vsock: Option<Arc<std::os::unix::net::UnixListener>>,
    console_input: bool,
) -> RestoreConfig {
    let mut files = files.into_iter();
    let (state, mem, working_set) = snapshot_inputs(
        load.snapshot_path,
        load.mem_file_path,
        load.working_set_path,
        &mut files,
    );
    let disks = load
        .drives
        .into_iter()
        .map(|d| DiskSwap {
            slot: d.drive_id,
            path: d.path_on_host,
            id: d.id,
            handed: files.next().map(Arc::new),
        })
        .collect();
    let tap_file = load
        .net_tap
        .as_ref()
        .and_then(|_| files.next())
        .map(Arc::new);
    RestoreConfig {
        paused: !load.resume_vm,
        console_input,
        vsock_uds: args.vsock_uds.clone(),
        vsock_listener: vsock,
        vsock_cid: load.vsock_cid,
        disks,
        tap: load.net_tap,
        tap_file,
        working_set,
        ..RestoreConfig::new(state, mem)
    }
}

/// What `path` gives this process: the jail test's probe.
fn probe(path: &std::path::Path) -> String {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => return format!("unreachable ({e})"),
    };
    let t = meta.file_type();
    if t.is_dir() {
        match std::fs::read_dir(path) {
            Ok(d) => {
                let mut names: Vec<String> = d
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                format!("directory [{}]", names.join(" "))
            }
            Err(e) => format!("directory, unreadable ({e})"),
        }
    } else if t.is_socket() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => "socket, connected".into(),
            Err(e) => format!("socket, cannot connect ({e})"),
        }
    } else {
        match std::fs::File::open(path) {
            Ok(_) => "file, readable".into(),
            Err(e) => format!("file, unreadable ({e})"),
        }
    }
}

/// Removes a file (the API socket) when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Splits `a=1,b,c=3` into (key, optional value) pairs.
fn options(s: &str) -> Vec<(&str, Option<&str>)> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        })
        .collect()
}

fn parse_disk(s: &str) -> Result<DeviceConfig, String> {
    let mut parts = options(s).into_iter();
    let Some((path, None)) = parts.next() else {
        return Err("expected PATH[,ro][,id=ID]".into());
    };
    let (mut read_only, mut id) = (false, None);
    for (k, v) in parts {
        match (k, v) {
            ("ro", None) => read_only = true,
            ("id", Some(v)) if v.len() <= 20 => id = Some(v.to_string()),
            ("id", Some(_)) => {
                return Err("id= takes at most 20 bytes (VIRTIO_BLK_ID_BYTES)".into())
            }
            _ => return Err(format!("unknown disk option {k:?}: expected ro or id=ID")),
        }
    }
    Ok(DeviceConfig::Block {
        path: PathBuf::from(path),
        read_only,
        id,
    })
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("bad MAC address {s:?}"))?;
    bytes
        .try_into()
        .map_err(|_| format!("bad MAC address {s:?}: six bytes expected"))
}

fn parse_net(s: &str) -> Result<DeviceConfig, String> {
    let (mut tap, mut mac) = (None, None);
    for (k, v) in options(s) {
        match (k, v) {
            ("tap", Some(v)) if !v.is_empty() && v.len() < 16 => tap = Some(v.to_string()),
            ("tap", _) => return Err("tap= needs an interface name of 1 to 15 bytes".into()),
            ("mac", Some(v)) => mac = Some(parse_mac(v)?),
            _ => {
                return Err(format!(
                    "unknown net option {k:?}: expected tap=NAME[,mac=MAC]"
                ))
            }
        }
    }
    let tap = tap.ok_or("tap=NAME is required")?;
    Ok(DeviceConfig::Net { tap, mac })
}

fn parse_cid(v: &str) -> Result<u64, String> {
    let c: u64 = v.parse().map_err(|_| format!("bad cid {v:?}"))?;
    // 0-2 are reserved (hypervisor, local, host).
    if c < 3 || c > u64::from(u32::MAX) {
        return Err(format!(
            "cid {c} is reserved or too large: use 3..=4294967295"
        ));
    }
    Ok(c)
}

fn parse_vsock(s: &str) -> Result<DeviceConfig, String> {
    let (mut cid, mut uds) = (None, None);
    for (k, v) in options(s) {
        match (k, v) {
            ("cid", Some(v)) => cid = Some(parse_cid(v)?),
            ("uds", Some(v)) if !v.is_empty() => uds = Some(PathBuf::from(v)),
            _ => {
                return Err(format!(
                    "unknown vsock option {k:?}: expected cid=N,uds=PATH"
                ))
            }
        }
    }
    Ok(DeviceConfig::Vsock {
        cid: cid.ok_or("cid=N is required")?,
        uds: uds.ok_or("uds=PATH is required")?,
    })
}

fn parse_disk_swap(s: &str) -> Result<DiskSwap, String> {
    let (slot, rest) = s
        .split_once('=')
        .filter(|(slot, rest)| !slot.is_empty() && !rest.is_empty())
        .ok_or("expected SLOT=PATH[,id=ID]")?;
    let mut parts = options(rest).into_iter();
    let Some((path, None)) = parts.next() else {
        return Err("expected SLOT=PATH[,id=ID]".into());
    };
    let mut id = None;
    for (k, v) in parts {
        match (k, v) {
            ("id", Some(v)) if !v.is_empty() && v.len() <= 20 => id = Some(v.to_string()),
            _ => {
                return Err(format!(
                    "bad disk-path option {k:?}: expected id=ID (1 to 20 bytes)"
                ))
            }
        }
    }
    Ok(DiskSwap {
        handed: None,
        slot: slot.to_string(),
        path: PathBuf::from(path),
        id,
    })
}

/// True when stdin is /dev/null or closed: nothing to feed the console.
fn stdin_is_devnull() -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(stdin), Ok(null)) = (
        std::fs::metadata("/proc/self/fd/0"),
        std::fs::metadata("/dev/null"),
    ) else {
        return true;
    };
    stdin.rdev() == null.rdev() && stdin.ino() == null.ino()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_options_parse_and_reject_nonsense() {
        assert_eq!(
            parse_disk("/d.img,ro,id=root").unwrap(),
            DeviceConfig::Block {
                path: "/d.img".into(),
                read_only: true,
                id: Some("root".into())
            }
        );
        assert!(parse_disk("/d.img,rw").is_err());
        assert!(parse_disk("/d.img,id=123456789012345678901").is_err());
        assert_eq!(
            parse_net("tap=tap0,mac=02:00:00:00:00:01").unwrap(),
            DeviceConfig::Net {
                tap: "tap0".into(),
                mac: Some([2, 0, 0, 0, 0, 1])
            }
        );
        assert!(parse_net("mac=02:00:00:00:00:01").is_err());
        assert!(parse_net("tap=x,mac=02:00").is_err());
        assert!(parse_net("tap=averyveryverylongname").is_err());
        assert_eq!(
            parse_vsock("cid=3,uds=/tmp/v.sock").unwrap(),
            DeviceConfig::Vsock {
                cid: 3,
                uds: "/tmp/v.sock".into()
            }
        );
        assert!(parse_vsock("cid=2,uds=/tmp/v").is_err());
        assert!(parse_vsock("cid=3").is_err());
        assert_eq!(
            parse_disk_swap("slot0=/img.erofs,id=img0").unwrap(),
            DiskSwap {
                slot: "slot0".into(),
                path: "/img.erofs".into(),
                id: Some("img0".into()),
                handed: None,
            }
        );
        assert_eq!(parse_disk_swap("slot1=/x").unwrap().id, None);
        assert_eq!(parse_cid("7"), Ok(7));
        assert!(parse_cid("2").is_err());
        assert!(parse_cid("4294967296").is_err());
        assert!(parse_disk_swap("=/x").is_err());
        assert!(parse_disk_swap("slot0=/x,ro").is_err());
        assert!(parse_disk_swap("slot0=/x,id=123456789012345678901").is_err());
    }

    #[test]
    fn init_args_are_appended_and_quoted() {
        let c = cmdline_with_init_args(
            "console=ttyS0",
            &["sh".into(), "-c".into(), "exit 7".into()],
        )
        .unwrap();
        assert_eq!(c, "console=ttyS0 -- sh -c \"exit 7\"");
        assert_eq!(cmdline_with_init_args("a", &[]).unwrap(), "a");
        assert!(cmdline_with_init_args("a", &["say \"hi\"".into()]).is_err());
    }
}
