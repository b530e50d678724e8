//! The running VM and its lifecycle: running ⇄ paused → snapshot; stop. Built by
//! [`crate::builder`] (fresh boot or restore), driven by its main thread through
//! [`Vmm::run`], which serves the control API and ends when the guest does.
//!
//! Teardown is ordered by the fields: vCPU threads are told to exit and joined,
//! then the device thread, and only then is guest memory unmapped.

use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::api::{ApiError, Request, Response};
use crate::arch::x86_64::boot::KernelFormat;
use crate::builder::{DeviceConfig, Outcome, RunReport};
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::legacy::EventSink;
use crate::devices::virtio::event_loop::EventLoopHandle;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::persist::VirtioDeviceState;
use crate::devices::virtio::VirtioDevice;
use crate::metrics::VmMetrics;
use crate::persist::{self, MicrovmState, Output};
use crate::vstate::memory::DumpStats;
use crate::vstate::vcpu::VcpuHandle;
use crate::vstate::vm::Vm;
use crate::vstate::{VmEvent, VmMessage};

/// Whether the guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RunState {
    /// vCPUs and devices run.
    Running,
    /// vCPUs are parked outside KVM_RUN and devices are still.
    Paused,
}

/// What [`crate::builder`] hands over.
pub(crate) struct VmmParts {
    pub vcpus: Vec<VcpuHandle>,
    pub event_loop: EventLoopHandle,
    pub vm: Vm,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub configs: Vec<DeviceConfig>,
    pub sink: Arc<EventSink>,
    pub tx: Sender<VmMessage>,
    pub rx: Receiver<VmMessage>,
    pub metrics: Arc<VmMetrics>,
    pub paused: bool,
    pub cmdline: String,
    pub format: Option<KernelFormat>,
    /// The generation ID device's interrupt, when the VM has one.
    pub generation: Option<vmm_sys_util::eventfd::EventFd>,
}

/// What taking a snapshot did.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotReport {
    /// The state file.
    pub state_path: PathBuf,
    /// The memory file.
    pub mem_path: PathBuf,
    /// Bytes of state.
    pub state_bytes: u64,
    /// RAM scanned and written.
    pub memory: DumpStats,
    /// Time taken.
    pub ms: u64,
}

/// One VM.
pub struct Vmm {
    // Field order is teardown order.
    vcpus: Vec<VcpuHandle>,
    event_loop: EventLoopHandle,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    vm: Vm,
    serial: Arc<Mutex<SerialDevice>>,
    configs: Vec<DeviceConfig>,
    sink: Arc<EventSink>,
    tx: Sender<VmMessage>,
    rx: Receiver<VmMessage>,
    metrics: Arc<VmMetrics>,
    state: RunState,
    cmdline: String,
    format: Option<KernelFormat>,
    generation: Option<vmm_sys_util::eventfd::EventFd>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Vmm {
    pub(crate) fn new(p: VmmParts) -> Self {
        Self {
            vcpus: p.vcpus,
            event_loop: p.event_loop,
            transports: p.transports,
            devices: p.devices,
            vm: p.vm,
            serial: p.serial,
            configs: p.configs,
            sink: p.sink,
            tx: p.tx,
            rx: p.rx,
            metrics: p.metrics,
            state: if p.paused {
                RunState::Paused
            } else {
                RunState::Running
            },
            cmdline: p.cmdline,
            format: p.format,
            generation: p.generation,
        }
    }

    /// A sender for control requests (the API server's end).
    pub fn requests(&self) -> Sender<VmMessage> {
        self.tx.clone()
    }

    /// Running or paused.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// Parks every vCPU outside KVM_RUN, then stills the devices.
    pub fn pause(&mut self) -> Result<(), ApiError> {
        if self.state == RunState::Paused {
            return Ok(());
        }
        for v in &self.vcpus {
            v.request_pause().map_err(ApiError::internal)?;
        }
        for v in &self.vcpus {
            v.wait().map_err(ApiError::internal)?;
        }
        self.event_loop.pause().map_err(ApiError::internal)?;
        self.state = RunState::Paused;
        Ok(())
    }

    /// Lets devices, then vCPUs, run again.
    pub fn resume(&mut self) -> Result<(), ApiError> {
        if self.state == RunState::Running {
            return Ok(());
        }
        self.event_loop.resume().map_err(ApiError::internal)?;
        for v in &self.vcpus {
            v.request_resume().map_err(ApiError::internal)?;
        }
        for v in &self.vcpus {
            v.wait().map_err(ApiError::internal)?;
        }
        self.state = RunState::Running;
        Ok(())
    }

    /// Writes a full snapshot of the paused VM: the state to `state_out`, memory
    /// to `mem_out`. Both appear whole or not at all.
    pub fn snapshot(
        &mut self,
        state_out: Output,
        mem_out: Output,
    ) -> Result<SnapshotReport, ApiError> {
        if self.state != RunState::Paused {
            return Err(ApiError::conflict("pause the VM before taking a snapshot"));
        }
        let t0 = Instant::now();
        let vcpus = self
            .vcpus
            .iter()
            .map(VcpuHandle::save)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ApiError::internal)?;
        let vm = self.vm.save_state().map_err(ApiError::internal)?;
        let devices = self
            .transports
            .iter()
            .zip(&self.configs)
            .map(|(t, c)| VirtioDeviceState {
                config: c.clone(),
                transport: t.lock().unwrap_or_else(|p| p.into_inner()).save_state(),
            })
            .collect();
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save_state();
        let mut id = [0u8; 16];
        getrandom(&mut id).map_err(ApiError::internal)?;
        let state = MicrovmState {
            id,
            mem_size: self.vm.ram.size,
            cmdline: self.cmdline.clone(),
            vm,
            vcpus,
            serial,
            devices,
            vmgenid: self.generation.is_some(),
        };
        // Memory first: a state file never names a memory file that is not whole.
        let memory = mem_out
            .write(|f| self.vm.ram.dump(f, &id).map_err(std::io::Error::other))
            .map_err(|e| {
                ApiError::bad_request(format!(
                    "cannot write the memory file {}: {e}",
                    mem_out.shown().display()
                ))
            })?;
        if let Err(e) = persist::write_state(&state_out, &state) {
            mem_out.discard();
            return Err(ApiError::bad_request(e.to_string()));
        }
        let state_bytes = match &state_out {
            Output::Path(p) => std::fs::metadata(p).map_or(0, |m| m.len()),
            Output::Handed { file, .. } => file.metadata().map_or(0, |m| m.len()),
        };
        Ok(SnapshotReport {
            state_path: state_out.shown().to_path_buf(),
            mem_path: mem_out.shown().to_path_buf(),
            state_bytes,
            memory,
            ms: t0.elapsed().as_millis() as u64,
        })
    }

    /// Serves one control request with the files it carried (none, or one for
    /// each file it names; crate::api checked which).
    fn handle(&mut self, req: Request, files: Vec<File>) -> Response {
        let mut files = files.into_iter();
        match req {
            Request::Describe => Ok(serde_json::json!({
                "state": self.state,
                "vcpus": self.vcpus.len(),
                "mem_mib": self.vm.ram.size >> 20,
            })),
            Request::Pause => self
                .pause()
                .map(|()| serde_json::json!({"state": self.state})),
            Request::Resume => self
                .resume()
                .map(|()| serde_json::json!({"state": self.state})),
            Request::Snapshot {
                snapshot_path,
                mem_file_path,
            } => {
                let state = Output::new(snapshot_path, files.next());
                let mem = Output::new(mem_file_path, files.next());
                self.snapshot(state, mem)
                    .and_then(|r| serde_json::to_value(r).map_err(ApiError::internal))
            }
            Request::WorkingSet { path } => {
                let ws = self.vm.ram.resident().map_err(ApiError::internal)?;
                ws.write(&Output::new(path, files.next()))
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                Ok(serde_json::json!({"ranges": ws.ranges.len(), "bytes": ws.bytes()}))
            }
            Request::UpdateDrive {
                drive_id,
                path,
                new_id,
            } => self.update_drive(&drive_id, path, new_id, files.next()),
            Request::Load(_) | Request::Preload(_) => Err(ApiError::conflict(
                "this VMM runs a VM already: a snapshot loads only into a VMM started with \
                 --standby, before any VM",
            )),
            Request::Metrics => serde_json::to_value(self.report(None)).map_err(ApiError::internal),
            Request::Stop => Ok(serde_json::json!({"state": "Stopped"})),
        }
    }

    /// Swaps the backing file (and id) of the disk now called `drive_id` for `path`
    /// (or the file handed over for it); what a snapshot records follows.
    fn update_drive(
        &mut self,
        drive_id: &str,
        path: PathBuf,
        new_id: Option<String>,
        handed: Option<File>,
    ) -> Response {
        let index = self
            .configs
            .iter()
            .position(|c| matches!(c, DeviceConfig::Block { id: Some(i), .. } if i == drive_id))
            .ok_or_else(|| ApiError {
                status: 404,
                message: format!("no disk has the id {drive_id:?}"),
            })?;
        if let Some(n) = new_id.as_deref().filter(|n| *n != drive_id) {
            let taken = self
                .configs
                .iter()
                .any(|c| matches!(c, DeviceConfig::Block { id: Some(i), .. } if i == n));
            if taken {
                return Err(ApiError::conflict(format!(
                    "another disk already has the id {n:?}"
                )));
            }
        }
        let device = self.devices.get(index).ok_or_else(|| {
            ApiError::internal(format!("device {index} has a configuration but no device"))
        })?;
        let read_only = matches!(
            self.configs.get(index),
            Some(DeviceConfig::Block {
                read_only: true,
                ..
            })
        );
        let file = match handed {
            Some(f) => {
                if !read_only && !open_for_writing(&f) {
                    return Err(ApiError::bad_request(format!(
                        "disk {drive_id:?} is writable: hand over {} open for reading and writing",
                        path.display()
                    )));
                }
                f
            }
            None => crate::devices::virtio::block::open_disk(&path, read_only)
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
        };
        let capacity = device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .swap_backing(file, new_id.as_deref())
            .map_err(|e| ApiError::bad_request(format!("{}: {e}", path.display())))?;
        if let Some(DeviceConfig::Block { path: p, id, .. }) = self.configs.get_mut(index) {
            *p = path;
            if let Some(n) = new_id {
                *id = Some(n);
            }
        }
        Ok(serde_json::json!({"drive": index, "bytes": capacity}))
    }

    /// Runs until the guest ends, `timeout` (from `start`) passes, or the API stops
    /// the VM; serves control requests meanwhile.
    pub fn run(&mut self, start: Instant, timeout: Option<Duration>) -> Outcome {
        loop {
            let msg = match timeout {
                Some(t) => match self.rx.recv_timeout(t.saturating_sub(start.elapsed())) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => return Outcome::TimedOut(t),
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match self.rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            match msg {
                VmMessage::Vm(ev) => return outcome(ev),
                VmMessage::Api(req, files, reply) => {
                    let stop = matches!(req, Request::Stop);
                    let _ = reply.send(self.handle(req, files));
                    if stop {
                        return Outcome::Stopped;
                    }
                }
            }
        }
        Outcome::Crashed("all vCPUs are gone".into())
    }

    /// Counters now, with `outcome`.
    pub fn report(&self, outcome: Option<Outcome>) -> RunReport {
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush();
        RunReport {
            outcome: outcome.unwrap_or(Outcome::Stopped),
            metrics: self.metrics.snapshot(),
            format: self.format,
            devices: self
                .devices
                .iter()
                .map(|d| {
                    let d = d.lock().unwrap_or_else(|p| p.into_inner());
                    d.metrics().snapshot(d.kind())
                })
                .collect(),
            uffd_pages: match &self.vm.ram.backing {
                crate::vstate::memory::Backing::Uffd(s) => Some(s.stats.counts()),
                _ => None,
            },
        }
    }

    /// Stops the guest and joins every thread (also what dropping does).
    pub fn shutdown(&mut self) {
        // Makes vCPU loops that are between exits return instead of running on.
        self.sink.mark_stopping();
        for v in &mut self.vcpus {
            v.exit();
        }
        self.event_loop.exit();
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether `f` was opened for writing.
pub(crate) fn open_for_writing(f: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl(2) F_GETFL on a descriptor we own reads its flags only.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_ACCMODE != libc::O_RDONLY
}

fn outcome(ev: VmEvent) -> Outcome {
    match ev {
        VmEvent::Exit(status) => Outcome::Exited(status),
        VmEvent::PowerOff => Outcome::PoweredOff,
        VmEvent::Reset(why) => Outcome::Crashed(format!(
            "{why} before reporting an exit status (with panic=-1 a guest kernel panic ends this way; see the console output above)"
        )),
        VmEvent::VcpuError(msg) => Outcome::Crashed(msg),
    }
}

/// Fills `buf` from the host's CSPRNG.
pub(crate) fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 || n as usize != buf.len() {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
