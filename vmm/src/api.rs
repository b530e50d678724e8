//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (`--api-sock`), as
//! Firecracker and Cloud Hypervisor users know it (`curl --unix-socket`). One
//! thread accepts connections one at a time; each request becomes a [`Request`] to
//! the VMM's main thread, which owns the VM, and its answer goes back as JSON.
//!
//! | method and path          | body                                              | does |
//! |--------------------------|---------------------------------------------------|------|
//! | `GET /vm`                | —                                                 | state, vCPUs, memory |
//! | `PATCH /vm`              | `{"state": "Paused"}` or `{"state": "Resumed"}`   | pause / resume |
//! | `PUT /snapshot/create`   | `{"snapshot_path": P, "mem_file_path": M}`        | full snapshot of a paused VM |
//! | `PUT /snapshot/working-set` | `{"path": P}`                                | record the guest pages resident now |
//! | `PATCH /drives/{id}`      | `{"path_on_host": P, "id": NEW?}`                 | new backing file (and id) for a disk |
//! | `PUT /snapshot/preload`  | `{"snapshot_path", "mem_file_path", "working_set_path"?}` ([`PreloadSnapshot`]) | prepare a standby VMM for the clones of one snapshot |
//! | `PUT /snapshot/load`     | `{"snapshot_path", "mem_file_path", ...}` ([`LoadSnapshot`]) | restore into a VMM started with `--standby` |
//! | `GET /metrics`           | —                                                 | exits, stages, device counters |
//! | `PUT /actions`           | `{"action_type": "Stop"}`                         | stop the VM, exit 0 |
//!
//! Errors answer `{"error": "..."}` with 400 (bad request), 404 (no such path),
//! 405, 409 (wrong state, e.g. snapshot while running), 413, 500. Requests are
//! bounded (16 KiB), and a client that stalls for 5 s is dropped.
//!
//! **Files travel as descriptors.** A request that names files (the two snapshot
//! files, the working set, a drive's new backing file) may carry them, open, as
//! `SCM_RIGHTS` with its bytes, in the order of the table; the paths in the body
//! are then only what the VMM records and reports. A jailed VMM (crate::jail) sees
//! no host file at all, so there they must come this way; [`call`] and
//! `atoll-vmm-api` open the named files and hand them over (files to be written
//! are created under a temporary name and renamed into place after a 2xx answer).

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use serde::Deserialize;

use crate::vstate::VmMessage;

/// Largest request (head and body) we read.
const MAX_REQUEST: usize = 16 * 1024;
/// How long a client may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the VMM may take to answer (a snapshot writes all of RAM).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// The most file descriptors one request carries (a load: state, memory, working
/// set, [`MAX_LOAD_DRIVES`] disks, a tap).
pub const MAX_REQUEST_FILES: usize = 8;

/// The most disks one load hands over.
pub const MAX_LOAD_DRIVES: usize = 4;

/// `PUT /snapshot/load`: what a VMM started with `--standby` restores, and what
/// the clone changes. Its files travel in this order: state, memory, working set
/// (if named), each drive's file, the tap (if named).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSnapshot {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// The memory file.
    pub mem_file_path: PathBuf,
    /// Prefetch the pages this working-set file lists before the guest runs.
    #[serde(default)]
    pub working_set_path: Option<PathBuf>,
    /// Disks of the snapshot given another backing file (and id).
    #[serde(default)]
    pub drives: Vec<LoadDrive>,
    /// The tap for the snapshot's net device.
    #[serde(default)]
    pub net_tap: Option<String>,
    /// The guest's new vsock CID.
    #[serde(default)]
    pub vsock_cid: Option<u64>,
    /// Run the VM once loaded (default: leave it paused).
    #[serde(default)]
    pub resume_vm: bool,
}

/// `PUT /snapshot/preload`: the snapshot whose clones a VMM started with
/// `--standby` will be, prepared ahead: its state read, its memory mapped, its VM
/// and vCPUs created and its working set prefetched, all before a pod asks. A
/// later load of the same files (unchanged) then only builds the clone's devices
/// and starts it; a load of other files restores in full. Preloading again
/// replaces what an earlier preload prepared.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreloadSnapshot {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// The memory file.
    pub mem_file_path: PathBuf,
    /// The working set to prefetch.
    #[serde(default)]
    pub working_set_path: Option<PathBuf>,
}

/// One disk of a [`LoadSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadDrive {
    /// The disk's id in the snapshot.
    pub drive_id: String,
    /// Its new backing file (handed over read-only).
    pub path_on_host: PathBuf,
    /// The id the guest sees from now on.
    #[serde(default)]
    pub id: Option<String>,
}

/// A control request to the VMM's main thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Describe the VM.
    Describe,
    /// Pause it.
    Pause,
    /// Resume it.
    Resume,
    /// Take a full snapshot.
    Snapshot {
        /// Where the state goes.
        snapshot_path: PathBuf,
        /// Where the memory goes.
        mem_file_path: PathBuf,
    },
    /// Record the resident guest pages.
    WorkingSet {
        /// Where the set goes.
        path: PathBuf,
    },
    /// Give the disk whose id is `drive_id` a new backing file (and id), running or
    /// paused: a pod's image reaching one of its template's spare slots.
    UpdateDrive {
        /// The disk's id now.
        drive_id: String,
        /// The new backing file.
        path: PathBuf,
        /// The id the guest sees from now on (default: unchanged).
        new_id: Option<String>,
    },
    /// Prepare the restore of a snapshot (only in a VMM that waits for one).
    Preload(Box<PreloadSnapshot>),
    /// Restore a snapshot (only into a VMM that waits for one).
    Load(Box<LoadSnapshot>),
    /// Counters.
    Metrics,
    /// Stop the VM.
    Stop,
}

impl Request {
    /// How many files the request names, which it may carry as descriptors.
    pub fn files(&self) -> usize {
        match self {
            Request::Snapshot { .. } => 2,
            Request::WorkingSet { .. } | Request::UpdateDrive { .. } => 1,
            Request::Preload(p) => 2 + usize::from(p.working_set_path.is_some()),
            Request::Load(l) => {
                2 + usize::from(l.working_set_path.is_some())
                    + l.drives.len()
                    + usize::from(l.net_tap.is_some())
            }
            _ => 0,
        }
    }
}

/// A failed request: HTTP status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }

    /// 409: not in this state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: 409,
            message: message.into(),
        }
    }

    /// 500, from any error.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self {
            status: 500,
            message: e.to_string(),
        }
    }
}

/// The answer to a [`Request`].
pub type Response = Result<serde_json::Value, ApiError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmPatch {
    state: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotCreate {
    snapshot_path: PathBuf,
    mem_file_path: PathBuf,
    #[serde(default)]
    snapshot_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkingSetCreate {
    path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DrivePatch {
    path_on_host: PathBuf,
    #[serde(default)]
    id: Option<String>,
}

/// Longest disk id (what VIRTIO_BLK_T_GET_ID can carry).
pub const MAX_DRIVE_ID: usize = 20;

fn valid_drive_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DRIVE_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Action {
    action_type: String,
}

fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("bad JSON body: {e}")))
}

/// Maps method, path and body to a request.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<Request, ApiError> {
    let not_allowed = || ApiError {
        status: 405,
        message: format!("{method} is not allowed on {path}"),
    };
    match path {
        "/vm" => match method {
            "GET" => Ok(Request::Describe),
            "PATCH" => match json::<VmPatch>(body)?.state.as_str() {
                "Paused" => Ok(Request::Pause),
                "Resumed" => Ok(Request::Resume),
                other => Err(ApiError::bad_request(format!(
                    "state {other:?}: give \"Paused\" or \"Resumed\""
                ))),
            },
            _ => Err(not_allowed()),
        },
        "/snapshot/create" => match method {
            "PUT" => {
                let s: SnapshotCreate = json(body)?;
                if s.snapshot_type.as_deref().is_some_and(|t| t != "Full") {
                    return Err(ApiError::bad_request(
                        "only \"Full\" snapshots are supported",
                    ));
                }
                Ok(Request::Snapshot {
                    snapshot_path: s.snapshot_path,
                    mem_file_path: s.mem_file_path,
                })
            }
            _ => Err(not_allowed()),
        },
        "/snapshot/working-set" => match method {
            "PUT" => Ok(Request::WorkingSet {
                path: json::<WorkingSetCreate>(body)?.path,
            }),
            _ => Err(not_allowed()),
        },
        "/snapshot/preload" => match method {
            "PUT" => Ok(Request::Preload(Box::new(json(body)?))),
            _ => Err(not_allowed()),
        },
        "/snapshot/load" => match method {
            "PUT" => {
                let l: LoadSnapshot = json(body)?;
                if l.drives.len() > MAX_LOAD_DRIVES {
                    return Err(ApiError::bad_request(format!(
                        "a load hands over at most {MAX_LOAD_DRIVES} drives"
                    )));
                }
                for d in &l.drives {
                    for id in std::iter::once(&d.drive_id).chain(&d.id) {
                        if !valid_drive_id(id) {
                            return Err(ApiError::bad_request(format!(
                                "drive id {id:?}: give 1 to {MAX_DRIVE_ID} of [A-Za-z0-9_.-]"
                            )));
                        }
                    }
                }
                if let Some(t) = l
                    .net_tap
                    .as_deref()
                    .filter(|t| !crate::devices::virtio::net::tap::valid_name(t))
                {
                    return Err(ApiError::bad_request(format!(
                        "net_tap {t:?}: give 1 to 15 characters without '/', ':', '%' or spaces"
                    )));
                }
                if let Some(c) = l
                    .vsock_cid
                    .filter(|c| !(3..=u64::from(u32::MAX)).contains(c))
                {
                    return Err(ApiError::bad_request(format!(
                        "vsock_cid {c}: give 3 to 4294967295"
                    )));
                }
                Ok(Request::Load(Box::new(l)))
            }
            _ => Err(not_allowed()),
        },
        "/metrics" => match method {
            "GET" => Ok(Request::Metrics),
            _ => Err(not_allowed()),
        },
        "/actions" => match method {
            "PUT" => match json::<Action>(body)?.action_type.as_str() {
                "Stop" => Ok(Request::Stop),
                other => Err(ApiError::bad_request(format!(
                    "action_type {other:?}: give \"Stop\""
                ))),
            },
            _ => Err(not_allowed()),
        },
        p if p.starts_with("/drives/") => {
            let drive_id = &p["/drives/".len()..];
            if !valid_drive_id(drive_id) {
                return Err(ApiError::bad_request(format!(
                    "drive id {drive_id:?}: give 1 to {MAX_DRIVE_ID} of [A-Za-z0-9_.-]"
                )));
            }
            match method {
                "PATCH" => {
                    let d = json::<DrivePatch>(body)?;
                    if let Some(id) = d.id.as_deref().filter(|i| !valid_drive_id(i)) {
                        return Err(ApiError::bad_request(format!(
                            "id {id:?}: give 1 to {MAX_DRIVE_ID} of [A-Za-z0-9_.-]"
                        )));
                    }
                    if !d.path_on_host.is_absolute() {
                        return Err(ApiError::bad_request("path_on_host: give an absolute path"));
                    }
                    Ok(Request::UpdateDrive {
                        drive_id: drive_id.to_owned(),
                        path: d.path_on_host,
                        new_id: d.id,
                    })
                }
                _ => Err(not_allowed()),
            }
        }
        _ => Err(ApiError {
            status: 404,
            message: format!("no such resource {path}"),
        }),
    }
}

/// One request as read: method, path, body and the descriptors that came with it.
struct RawRequest {
    method: String,
    path: String,
    body: Vec<u8>,
    files: Vec<File>,
}

/// Reads up to `chunk.len()` bytes of the request, keeping any descriptors sent
/// with them in `files` (at most [`MAX_REQUEST_FILES`] in all).
fn recv_chunk(
    stream: &UnixStream,
    chunk: &mut [u8],
    files: &mut Vec<File>,
) -> Result<usize, ApiError> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_REQUEST_FILES))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        stream,
        &mut [IoSliceMut::new(chunk)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| ApiError::bad_request(format!("reading the request: {e}")))?;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            files.extend(fds.map(File::from));
        }
    }
    if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) || files.len() > MAX_REQUEST_FILES {
        return Err(ApiError::bad_request(format!(
            "a request carries at most {MAX_REQUEST_FILES} file descriptors"
        )));
    }
    Ok(got.bytes)
}

/// Reads one request from `stream`.
fn read_request(stream: &mut UnixStream) -> Result<RawRequest, ApiError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let mut files = Vec::new();
    loop {
        let n = recv_chunk(stream, &mut chunk, &mut files)?;
        if n == 0 {
            return Err(ApiError::bad_request("the request ended early"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return Err(ApiError {
                status: 413,
                message: format!("requests are limited to {MAX_REQUEST} bytes"),
            });
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err(ApiError::bad_request(format!("bad HTTP request: {e}"))),
        };
        let mut body_len = 0usize;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                body_len = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| ApiError::bad_request("bad Content-Length"))?;
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(ApiError::bad_request(
                    "chunked bodies are not supported: send Content-Length",
                ));
            }
        }
        if head_len + body_len > MAX_REQUEST {
            return Err(ApiError {
                status: 413,
                message: format!("requests are limited to {MAX_REQUEST} bytes"),
            });
        }
        if buf.len() < head_len + body_len {
            continue;
        }
        return Ok(RawRequest {
            method: req.method.unwrap_or_default().to_string(),
            path: req.path.unwrap_or_default().to_string(),
            body: buf[head_len..head_len + body_len].to_vec(),
            files,
        });
    }
}

fn write_response(stream: &mut UnixStream, response: &Response) -> io::Result<()> {
    let (status, body) = match response {
        Ok(v) => (200, v.clone()),
        Err(e) => (e.status, serde_json::json!({ "error": e.message })),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&body)
}

/// A request carries no descriptors or one for each file it names; a jailed VMM
/// cannot open the named files itself.
fn check_files(req: &Request, handed: usize, jailed: bool) -> Result<(), ApiError> {
    let wanted = req.files();
    match handed {
        0 if wanted > 0 && jailed => Err(ApiError::bad_request(format!(
            "the VMM is jailed and sees no host files: send the request's {wanted} file(s) \
             as descriptors with it (SCM_RIGHTS, as atoll-vmm-api does), or start atoll-vmm \
             with --no-jail"
        ))),
        0 => Ok(()),
        n if n == wanted => Ok(()),
        n => Err(ApiError::bad_request(format!(
            "this request names {wanted} file(s) but carries {n} descriptor(s)"
        ))),
    }
}

/// Where the API thread sends requests: the VMM's main thread, whichever channel
/// it serves now (a VMM that waited for a snapshot moves to the VM's own once
/// loaded, before it answers the load, so no request is sent to the old one).
pub type Target = std::sync::Arc<std::sync::Mutex<Sender<VmMessage>>>;

/// A [`Target`] that stays `tx`.
pub fn target(tx: Sender<VmMessage>) -> Target {
    std::sync::Arc::new(std::sync::Mutex::new(tx))
}

fn serve(mut stream: UnixStream, target: &Target) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let response = read_request(&mut stream).and_then(|raw| {
        let req = route(&raw.method, &raw.path, &raw.body)?;
        check_files(&req, raw.files.len(), crate::jail::entered())?;
        let (tx, rx) = mpsc::channel();
        let vmm = target.lock().unwrap_or_else(|p| p.into_inner()).clone();
        PENDING.store(true, std::sync::atomic::Ordering::Release);
        vmm.send(VmMessage::Api(req, raw.files, tx))
            .map_err(|_| ApiError::internal("the VM has ended"))?;
        rx.recv_timeout(ANSWER_TIMEOUT).map_err(|_| ApiError {
            status: 503,
            message: "the VMM did not answer in time".into(),
        })?
    });
    if let Err(e) = &response {
        tracing::info!("API request failed: {} {}", e.status, e.message);
    }
    let _ = write_response(&mut stream, &response);
    PENDING.store(false, std::sync::atomic::Ordering::Release);
}

/// Whether a request has gone to the main thread and its answer is not written
/// yet.
static PENDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Waits (up to `timeout`) until the API thread has written the answer to the
/// request in hand: the VMM's main thread, about to exit after a Stop, lets the
/// answer reach its client first.
pub fn wait_answered(timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while PENDING.load(std::sync::atomic::Ordering::Acquire) && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Binds the API socket at `path` (replacing a stale socket, never another file).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    UnixListener::bind(path)
}

/// Serves `listener` on a thread of its own until the process ends.
pub fn spawn(listener: UnixListener, vmm: Target) -> io::Result<()> {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::Thread::Api);
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => serve(s, &vmm),
                    Err(e) => tracing::warn!("API socket accept failed: {e}"),
                }
            }
        })
        .map(|_| ())
}

/// The files a request names, opened on the client's side to travel with it.
struct Handover {
    files: Vec<File>,
    /// (temporary name, final name) of each file written, in renaming order.
    renames: Vec<(PathBuf, PathBuf)>,
}

impl Handover {
    fn open(req: &Request) -> io::Result<Self> {
        let mut h = Handover {
            files: Vec::new(),
            renames: Vec::new(),
        };
        let create = |h: &mut Handover, path: &Path| -> io::Result<File> {
            let tmp = crate::persist::tmp_path(path);
            let f = File::create(&tmp).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot create {}: {e}", tmp.display()))
            })?;
            h.renames.push((tmp, path.to_owned()));
            Ok(f)
        };
        let open = |path: &Path| {
            File::open(path).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
            })
        };
        match req {
            Request::Snapshot {
                snapshot_path,
                mem_file_path,
            } => {
                // Memory is renamed first: a state file never names a memory file
                // that is not whole.
                let mem = create(&mut h, mem_file_path)?;
                let state = create(&mut h, snapshot_path)?;
                h.files = vec![state, mem];
            }
            Request::WorkingSet { path } => {
                let f = create(&mut h, path)?;
                h.files = vec![f];
            }
            Request::Preload(p) => {
                h.files.push(open(&p.snapshot_path)?);
                h.files.push(open(&p.mem_file_path)?);
                if let Some(ws) = &p.working_set_path {
                    h.files.push(open(ws)?);
                }
            }
            Request::Load(l) => {
                h.files.push(open(&l.snapshot_path)?);
                h.files.push(open(&l.mem_file_path)?);
                if let Some(ws) = &l.working_set_path {
                    h.files.push(open(ws)?);
                }
                for d in &l.drives {
                    // Read-only, as for a drive update below.
                    h.files.push(open(&d.path_on_host)?);
                }
                if let Some(t) = &l.net_tap {
                    // Opened here, in the caller's network namespace (the pod's),
                    // which a jailed VMM has left.
                    let tap = crate::devices::virtio::net::tap::open(t).map_err(io::Error::from)?;
                    h.files.push(tap.file);
                }
            }
            Request::UpdateDrive { path, .. } => {
                // Read-only: a template's spare slots, where images arrive, are,
                // and a writable descriptor to a shared image is what a
                // compromised VMM must not get. (A writable disk refuses it.)
                let f = File::open(path).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
                })?;
                h.files = vec![f];
            }
            _ => {}
        }
        Ok(h)
    }

    /// After the answer: written files go into place on success, away otherwise.
    fn finish(self, ok: bool) -> io::Result<()> {
        drop(self.files);
        let mut result = Ok(());
        for (tmp, path) in &self.renames {
            if ok && result.is_ok() {
                result = std::fs::rename(tmp, path);
            }
            if !ok || result.is_err() {
                let _ = std::fs::remove_file(tmp);
            }
        }
        result
    }
}

/// Writes `bytes` to `stream`, the descriptors of `files` (if any) with the first
/// of them.
pub fn send_with_files(stream: &UnixStream, bytes: &[u8], files: &[File]) -> io::Result<()> {
    let mut sent = 0;
    if !files.is_empty() {
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_REQUEST_FILES))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other(format!(
                "a request carries at most {MAX_REQUEST_FILES} file descriptors"
            )));
        }
        sent = rustix::net::sendmsg(
            stream,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::empty(),
        )?;
    }
    let mut w: &UnixStream = stream;
    w.write_all(&bytes[sent..])
}

/// Why [`call`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// A file the request names could not be opened, created or renamed into
    /// place here, on the client's side.
    #[error("{0}")]
    Files(io::Error),
    /// The VMM could not be reached, or did not answer in time.
    #[error("{0}")]
    Exchange(io::Error),
}

/// A client's side: sends one request to the API socket at `sock` and returns the
/// answer's status and body. Every step has `timeout` as its deadline. The files
/// the request names are opened here and travel with it (see the module docs), so
/// this works with a jailed VMM.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<(u16, String), CallError> {
    // A request the VMM will refuse goes as it is, for the VMM's own answer.
    let handover = match route(method, path, body.as_bytes()) {
        Ok(req) => Handover::open(&req).map_err(CallError::Files)?,
        Err(_) => Handover {
            files: Vec::new(),
            renames: Vec::new(),
        },
    };
    let answer = exchange(sock, method, path, body, &handover.files, timeout);
    let ok = matches!(&answer, Ok((status, _)) if (200..300).contains(status));
    handover.finish(ok).map_err(CallError::Files)?;
    answer.map_err(CallError::Exchange)
}

fn exchange(
    sock: &Path,
    method: &str,
    path: &str,
    body: &str,
    files: &[File],
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    send_with_files(&s, req.as_bytes(), files)?;
    let mut answer = Vec::new();
    // The server closes after one answer; bound what we keep.
    s.take(16 << 20).read_to_end(&mut answer)?;
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(&answer) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(io::Error::other("the VMM's answer is not HTTP")),
    };
    let status = resp.code.unwrap_or(0);
    Ok((
        status,
        String::from_utf8_lossy(&answer[head..]).into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_routes_known_requests_and_refuses_the_rest_clearly() {
        assert_eq!(route("GET", "/vm", b"").unwrap(), Request::Describe);
        assert_eq!(
            route("PATCH", "/vm", br#"{"state":"Paused"}"#).unwrap(),
            Request::Pause
        );
        assert_eq!(
            route("PATCH", "/vm", br#"{"state":"Resumed"}"#).unwrap(),
            Request::Resume
        );
        assert_eq!(
            route(
                "PUT",
                "/snapshot/create",
                br#"{"snapshot_path":"/s","mem_file_path":"/m"}"#
            )
            .unwrap(),
            Request::Snapshot {
                snapshot_path: "/s".into(),
                mem_file_path: "/m".into()
            }
        );
        assert_eq!(
            route("PUT", "/actions", br#"{"action_type":"Stop"}"#).unwrap(),
            Request::Stop
        );
        assert_eq!(
            route("PUT", "/snapshot/working-set", br#"{"path":"/w"}"#).unwrap(),
            Request::WorkingSet { path: "/w".into() }
        );
        assert_eq!(
            route("PATCH", "/vm", br#"{"state":"Gone"}"#)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(route("PATCH", "/vm", b"{").unwrap_err().status, 400);
        assert_eq!(
            route("PATCH", "/vm", br#"{"state":"Paused","x":1}"#)
                .unwrap_err()
                .status,
            400,
            "unknown fields are refused"
        );
        assert_eq!(
            route(
                "PATCH",
                "/drives/slot0",
                br#"{"path_on_host":"/img/a.erofs","id":"img-1"}"#
            )
            .unwrap(),
            Request::UpdateDrive {
                drive_id: "slot0".into(),
                path: "/img/a.erofs".into(),
                new_id: Some("img-1".into()),
            }
        );
        for (path, body) in [
            ("/drives/", r#"{"path_on_host":"/a"}"#),
            ("/drives/a%2f..", r#"{"path_on_host":"/a"}"#),
            ("/drives/slot0", r#"{"path_on_host":"rel"}"#),
            (
                "/drives/slot0",
                r#"{"path_on_host":"/a","id":"twenty-one-characters"}"#,
            ),
            (
                "/drives/slot0",
                r#"{"path_on_host":"/a","is_read_only":false}"#,
            ),
        ] {
            assert_eq!(
                route("PATCH", path, body.as_bytes()).unwrap_err().status,
                400,
                "{path} {body}"
            );
        }
        let load = route(
            "PUT",
            "/snapshot/load",
            br#"{"snapshot_path":"/s","mem_file_path":"/m","working_set_path":"/w",
                 "drives":[{"drive_id":"slot0","path_on_host":"/i","id":"img0"}],
                 "net_tap":"tap0","vsock_cid":7,"resume_vm":true}"#,
        )
        .unwrap();
        assert_eq!(
            load.files(),
            5,
            "state, memory, working set, one drive, the tap"
        );
        let Request::Load(l) = load else {
            panic!("not a load: {load:?}")
        };
        assert_eq!(l.drives[0].id.as_deref(), Some("img0"));
        assert!(l.resume_vm);
        let preload = route(
            "PUT",
            "/snapshot/preload",
            br#"{"snapshot_path":"/s","mem_file_path":"/m","working_set_path":"/w"}"#,
        )
        .unwrap();
        assert_eq!(preload.files(), 3, "state, memory, working set");
        assert!(route("PUT", "/snapshot/preload", br#"{"snapshot_path":"/s"}"#).is_err());
        assert!(
            route(
                "PUT",
                "/snapshot/preload",
                br#"{"snapshot_path":"/s","mem_file_path":"/m","net_tap":"t"}"#
            )
            .is_err(),
            "clone-specific fields belong to the load"
        );
        assert_eq!(
            route("GET", "/snapshot/preload", b"").unwrap_err().status,
            405
        );
        let bare = route(
            "PUT",
            "/snapshot/load",
            br#"{"snapshot_path":"/s","mem_file_path":"/m"}"#,
        )
        .unwrap();
        assert_eq!(bare.files(), 2);
        assert!(
            matches!(bare, Request::Load(ref l) if !l.resume_vm),
            "paused by default"
        );
        let five_drives = format!(
            r#"{{"snapshot_path":"/s","mem_file_path":"/m","drives":[{}]}}"#,
            [r#"{"drive_id":"a","path_on_host":"/i"}"#; 5].join(",")
        );
        for body in [
            five_drives.as_str(),
            r#"{"snapshot_path":"/s","mem_file_path":"/m","net_tap":"a/b"}"#,
            r#"{"snapshot_path":"/s","mem_file_path":"/m","vsock_cid":2}"#,
            r#"{"snapshot_path":"/s","mem_file_path":"/m","drives":[{"drive_id":"a b","path_on_host":"/i"}]}"#,
            r#"{"snapshot_path":"/s","mem_file_path":"/m","mem_backend":{}}"#,
            r#"{"snapshot_path":"/s"}"#,
        ] {
            assert_eq!(
                route("PUT", "/snapshot/load", body.as_bytes())
                    .unwrap_err()
                    .status,
                400,
                "{body}"
            );
        }
        assert_eq!(route("GET", "/snapshot/load", b"").unwrap_err().status, 405);
        assert_eq!(route("GET", "/drives/slot0", b"").unwrap_err().status, 405);
        assert_eq!(route("DELETE", "/vm", b"").unwrap_err().status, 405);
        assert_eq!(route("GET", "/nope", b"").unwrap_err().status, 404);
        let diff = route(
            "PUT",
            "/snapshot/create",
            br#"{"snapshot_path":"/s","mem_file_path":"/m","snapshot_type":"Diff"}"#,
        );
        assert_eq!(diff.unwrap_err().status, 400);
    }

    fn exchange(request: &[u8], answer: Response) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = bind(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        spawn(listener, target(tx)).unwrap();
        let vmm = std::thread::spawn(move || {
            if let Ok(VmMessage::Api(_, _, reply)) = rx.recv_timeout(Duration::from_secs(5)) {
                let _ = reply.send(answer);
            }
        });
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(request).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        drop(c);
        let _ = vmm.join();
        out
    }

    #[test]
    fn api_answers_over_http_with_json() {
        let out = exchange(
            b"GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n",
            Ok(serde_json::json!({"state": "Running"})),
        );
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with(r#"{"state":"Running"}"#), "{out}");
        let out = exchange(
            b"PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}",
            Err(ApiError::conflict("no")),
        );
        assert!(out.starts_with("HTTP/1.1 409 Conflict\r\n"), "{out}");
        assert!(out.ends_with(r#"{"error":"no"}"#), "{out}");
    }

    #[test]
    fn api_refuses_oversized_and_garbage_requests() {
        let big = format!(
            "PUT /actions HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_REQUEST * 2
        );
        let out = exchange(big.as_bytes(), Ok(serde_json::json!({})));
        assert!(out.starts_with("HTTP/1.1 413"), "{out}");
        let out = exchange(b"\x00\x01garbage\r\n\r\n", Ok(serde_json::json!({})));
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    }

    /// A VMM stand-in: answers one request by writing `contents[i]` into the
    /// i-th file it carried, with `answer`; returns the request and the access
    /// mode of each file.
    fn file_server(
        path: &Path,
        contents: &'static [&'static [u8]],
        answer: Response,
    ) -> std::thread::JoinHandle<Option<(Request, Vec<i32>)>> {
        let listener = bind(path).unwrap();
        let (tx, rx) = mpsc::channel();
        spawn(listener, target(tx)).unwrap();
        std::thread::spawn(move || {
            let Ok(VmMessage::Api(req, files, reply)) = rx.recv_timeout(Duration::from_secs(5))
            else {
                return None;
            };
            let modes = files
                .iter()
                .map(|f| {
                    use std::os::fd::AsRawFd;
                    // SAFETY: F_GETFL reads the flags of a descriptor we own.
                    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) & libc::O_ACCMODE }
                })
                .collect();
            for (mut f, c) in files.into_iter().zip(contents) {
                f.write_all(c).unwrap();
            }
            let _ = reply.send(answer);
            Some((req, modes))
        })
    }

    #[test]
    fn api_files_travel_as_descriptors_and_land_only_on_success() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let (state, mem) = (dir.path().join("state"), dir.path().join("memory"));
        let body = serde_json::json!({"snapshot_path": state, "mem_file_path": mem}).to_string();
        let vmm = file_server(&sock, &[b"STATE", b"MEM"], Ok(serde_json::json!({})));
        let (status, _) = call(
            &sock,
            "PUT",
            "/snapshot/create",
            &body,
            Duration::from_secs(5),
        )
        .unwrap();
        let (req, modes) = vmm.join().unwrap().unwrap();
        assert_eq!((status, modes.len()), (200, 2));
        assert!(matches!(req, Request::Snapshot { .. }));
        assert_eq!(std::fs::read(&state).unwrap(), b"STATE", "state first");
        assert_eq!(std::fs::read(&mem).unwrap(), b"MEM");
        let names = |d: &Path| std::fs::read_dir(d).unwrap().count();
        assert_eq!(names(dir.path()), 3, "no temporary file is left");

        // A refused request leaves nothing, not even the old files' names.
        std::fs::remove_file(&state).unwrap();
        std::fs::remove_file(&mem).unwrap();
        let vmm = file_server(&sock, &[b"half"], Err(ApiError::bad_request("disk full")));
        let (status, answer) = call(
            &sock,
            "PUT",
            "/snapshot/create",
            &body,
            Duration::from_secs(5),
        )
        .unwrap();
        vmm.join().unwrap();
        assert_eq!(status, 400, "{answer}");
        assert_eq!(names(dir.path()), 1, "only the socket is left");

        // A drive's file travels read-only.
        let img = dir.path().join("img");
        std::fs::write(&img, b"image").unwrap();
        let vmm = file_server(&sock, &[], Ok(serde_json::json!({})));
        let body = serde_json::json!({"path_on_host": img}).to_string();
        let (status, _) = call(
            &sock,
            "PATCH",
            "/drives/slot0",
            &body,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(
            (status, vmm.join().unwrap().unwrap().1),
            (200, vec![libc::O_RDONLY])
        );
    }

    #[test]
    fn api_a_jailed_vmm_asks_for_descriptors() {
        let snap = Request::Snapshot {
            snapshot_path: "/s".into(),
            mem_file_path: "/m".into(),
        };
        let err = check_files(&snap, 0, true).unwrap_err();
        assert!(
            err.message.contains("jailed") && err.message.contains("SCM_RIGHTS"),
            "{err:?}"
        );
        assert!(
            check_files(&snap, 0, false).is_ok(),
            "unjailed, it opens the paths"
        );
        assert!(check_files(&snap, 2, true).is_ok());
        assert_eq!(check_files(&snap, 1, true).unwrap_err().status, 400);
        assert_eq!(
            check_files(&Request::Pause, 1, false).unwrap_err().status,
            400
        );
    }

    #[test]
    fn api_bind_replaces_a_stale_socket_but_not_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        drop(UnixListener::bind(&sock).unwrap());
        assert!(bind(&sock).is_ok());
        let file = dir.path().join("f");
        std::fs::write(&file, b"keep").unwrap();
        assert!(bind(&file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }
}
