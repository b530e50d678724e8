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
//! | `GET /metrics`           | —                                                 | exits, stages, device counters |
//! | `PUT /actions`           | `{"action_type": "Stop"}`                         | stop the VM, exit 0 |
//!
//! Errors answer `{"error": "..."}` with 400 (bad request), 404 (no such path),
//! 405, 409 (wrong state, e.g. snapshot while running), 413, 500. Requests are
//! bounded (16 KiB), and a client that stalls for 5 s is dropped.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::time::Duration;

use serde::Deserialize;

use crate::vstate::VmMessage;

/// Largest request (head and body) we read.
const MAX_REQUEST: usize = 16 * 1024;
/// How long a client may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the VMM may take to answer (a snapshot writes all of RAM).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

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
    /// Counters.
    Metrics,
    /// Stop the VM.
    Stop,
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

/// Reads one request from `stream`: (method, path, body).
fn read_request(stream: &mut UnixStream) -> Result<(String, String, Vec<u8>), ApiError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .map_err(|e| ApiError::bad_request(format!("reading the request: {e}")))?;
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
        let method = req.method.unwrap_or_default().to_string();
        let path = req.path.unwrap_or_default().to_string();
        return Ok((method, path, buf[head_len..head_len + body_len].to_vec()));
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

fn serve(mut stream: UnixStream, vmm: &Sender<VmMessage>) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let response = read_request(&mut stream).and_then(|(method, path, body)| {
        let req = route(&method, &path, &body)?;
        let (tx, rx) = mpsc::channel();
        vmm.send(VmMessage::Api(req, tx))
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
pub fn spawn(listener: UnixListener, vmm: Sender<VmMessage>) -> io::Result<()> {
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

/// A client's side: sends one request to the API socket at `sock` and returns the
/// answer's status and body. Every step has `timeout` as its deadline.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
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
        spawn(listener, tx).unwrap();
        let vmm = std::thread::spawn(move || {
            if let Ok(VmMessage::Api(_, reply)) = rx.recv_timeout(Duration::from_secs(5)) {
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
