//! atoll-cri's durable state: one JSON record per sandbox and per container under
//! `<state_dir>/sandboxes/` and `<state_dir>/containers/`, each replaced atomically
//! (written to a temporary file, synced, renamed), so a server killed at any moment
//! leaves every record whole: the old one or the new one.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Largest record read back (a hostile or corrupt file is skipped, not loaded).
const MAX_RECORD: u64 = 1 << 20;

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxState {
    /// Being made: a record left in this state by a killed server is half-made and
    /// removed at the next start.
    Creating,
    /// Its VM runs.
    Ready,
    /// Stopped, or its VM is gone.
    NotReady,
}

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    #[default]
    Created,
    Running,
    Exited,
    Unknown,
}

/// What kubelet named something.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
}

/// A spare disk slot of the sandbox VM and the image it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// The disk's id in the VM now (`slot0` while empty, the image's serial after).
    pub drive_id: String,
    /// The image (its id) the slot holds.
    pub image: Option<String>,
}

/// One sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub meta: Meta,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub runtime_handler: String,
    pub log_directory: String,
    pub hostname: String,
    pub created_ns: i64,
    pub state: SandboxState,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// `<run_dir>/pods/<id>`.
    pub pod_dir: PathBuf,
    pub vmm_pid: Option<u32>,
    /// The VMM's start time (clock ticks since boot, `/proc/PID/stat` field 22): a
    /// recycled pid is not taken for our VMM.
    pub vmm_start: Option<u64>,
    pub slots: Vec<Slot>,
    /// Why it is NotReady when it was not stopped (its VM died).
    pub message: String,
    /// The pod's addresses (CIDR), IPv4 first; kept after the network goes.
    #[serde(default)]
    pub ips: Vec<String>,
    /// Its CNI attachment while it stands: what teardown needs.
    #[serde(default)]
    pub network: Option<NetworkRecord>,
}

/// A sandbox's CNI attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The pinned namespace (`<run dir>/netns/<id>`).
    pub netns: PathBuf,
    /// The ADD result, given back to DEL (`None`: ADD did not finish).
    pub result: Option<serde_json::Value>,
    pub port_mappings: Vec<super::cni::PortMapping>,
}

/// One container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub sandbox_id: String,
    pub meta: Meta,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The image as asked for.
    pub image: String,
    /// The image's id (`sha256:` of its manifest), what ImageStatus answers.
    pub image_id: String,
    /// `repo@sha256:...`.
    pub image_ref: String,
    /// The disk id the guest mounts its image from.
    pub serial: String,
    /// Absolute log file ("" when kubelet gave none).
    pub log_path: String,
    pub tty: bool,
    pub stdin: bool,
    /// Stdin closes when the first attach session that had it ends.
    #[serde(default)]
    pub stdin_once: bool,
    /// What exec processes start from.
    pub env: Vec<String>,
    pub cwd: String,
    pub user: String,
    pub created_ns: i64,
    pub started_ns: i64,
    pub finished_ns: i64,
    pub exit_code: i32,
    pub state: ContainerState,
    pub reason: String,
    pub message: String,
    /// The host mounts it was given (kubelet's own files left out).
    #[serde(default)]
    pub mounts: Vec<HostMount>,
    /// The disk serials (image slots) its image volumes are on.
    #[serde(default)]
    pub volume_serials: Vec<String>,
}

/// A host mount of a container as CreateContainer asked for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMount {
    pub container_path: String,
    pub host_path: String,
    pub readonly: bool,
    /// `cri::MountPropagation` as a number.
    pub propagation: i32,
    pub selinux_relabel: bool,
    pub recursive_read_only: bool,
    /// An image volume's image (the id kubelet pulled), mounted read-only in place
    /// of a host path; empty for a host path.
    #[serde(default)]
    pub image: String,
}

impl HostMount {
    /// kubelet's emptyDir volumes live under this path component: the guest gives
    /// each its own pod tmpfs (shared by the pod's containers) instead of a copy.
    pub const EMPTY_DIR: &'static str = "/volumes/kubernetes.io~empty-dir/";

    /// Whether this is one of kubelet's emptyDir volumes.
    pub fn is_empty_dir(&self) -> bool {
        self.host_path.contains(Self::EMPTY_DIR)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// Writes `data` to `path` whole or not at all.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // The rename itself reaches the disk with the directory.
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn read_records<T: for<'de> Deserialize<'de>>(dir: &Path) -> Vec<T> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        if e.metadata().map_or(true, |m| m.len() > MAX_RECORD) {
            tracing::warn!("{}: too large for a record; ignored", p.display());
            continue;
        }
        match fs::read(&p).map(|b| serde_json::from_slice::<T>(&b)) {
            Ok(Ok(r)) => out.push(r),
            Ok(Err(e)) => tracing::warn!("{}: not a record ({e}); ignored", p.display()),
            Err(e) => tracing::warn!("{}: {e}", p.display()),
        }
    }
    out
}

/// How much of an ended VM's console a sandbox keeps.
pub const KEPT_CONSOLE_BYTES: u64 = 64 * 1024;

impl Store {
    /// The store in `dir` (made when missing).
    pub fn open(dir: &Path) -> io::Result<Self> {
        for sub in ["sandboxes", "containers"] {
            fs::create_dir_all(dir.join(sub)).map_err(|e| {
                io::Error::new(e.kind(), format!("{}: {e}", dir.join(sub).display()))
            })?;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn sandbox_path(&self, id: &str) -> PathBuf {
        self.dir.join("sandboxes").join(format!("{id}.json"))
    }

    fn container_path(&self, id: &str) -> PathBuf {
        self.dir.join("containers").join(format!("{id}.json"))
    }

    fn write<T: Serialize>(&self, path: PathBuf, r: &T) -> Result<(), WriteError> {
        let data = serde_json::to_vec_pretty(r).map_err(|e| WriteError {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        write_atomic(&path, &data).map_err(|source| WriteError { path, source })
    }

    pub fn put_sandbox(&self, r: &SandboxRecord) -> Result<(), WriteError> {
        self.write(self.sandbox_path(&r.id), r)
    }

    pub fn put_container(&self, r: &ContainerRecord) -> Result<(), WriteError> {
        self.write(self.container_path(&r.id), r)
    }

    pub fn delete_sandbox(&self, id: &str) {
        let _ = fs::remove_file(self.sandbox_path(id));
        let _ = fs::remove_file(self.console_path(id));
    }

    /// Where the console of a sandbox whose VM ended unasked is kept (until the
    /// sandbox is removed).
    pub fn console_path(&self, id: &str) -> PathBuf {
        self.dir.join("consoles").join(format!("{id}.log"))
    }

    /// Keeps, for sandbox `id` whose VM ended unasked (`why`), a line saying so
    /// and the last [`KEPT_CONSOLE_BYTES`] of `console` (the VM's console log,
    /// about to go with its pod directory: a guest panic's trace is there).
    /// Returns where, or `None` when it could not be written.
    pub fn keep_console(&self, id: &str, console: &Path, why: &str) -> Option<PathBuf> {
        use std::io::{Read, Seek, SeekFrom};
        let mut tail = Vec::new();
        if let Ok(mut f) = fs::File::open(console) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if f.seek(SeekFrom::Start(len.saturating_sub(KEPT_CONSOLE_BYTES)))
                .is_ok()
            {
                let _ = f.take(KEPT_CONSOLE_BYTES).read_to_end(&mut tail);
            }
        }
        let mut kept = format!(
            "atoll-cri: the VM of sandbox {id} ended without being stopped: {why}\n\
             --- the last {} bytes of its console ---\n",
            tail.len()
        )
        .into_bytes();
        kept.extend_from_slice(&tail);
        let path = self.console_path(id);
        fs::create_dir_all(path.parent()?).ok()?;
        write_atomic(&path, &kept).ok()?;
        Some(path)
    }

    pub fn delete_container(&self, id: &str) {
        let _ = fs::remove_file(self.container_path(id));
    }

    /// Every record (unreadable ones are skipped with a warning).
    pub fn load(&self) -> (Vec<SandboxRecord>, Vec<ContainerRecord>) {
        (
            read_records(&self.dir.join("sandboxes")),
            read_records(&self.dir.join("containers")),
        )
    }
}

pub use crate::pod::state::process_start;

/// Whether the sandbox's VMM is the process it was (not a recycled pid).
pub fn vmm_alive(r: &SandboxRecord) -> bool {
    match (r.vmm_pid, r.vmm_start) {
        (Some(pid), Some(start)) => process_start(pid) == Some(start),
        _ => false,
    }
}

/// Whether `labels` has every pair of `selector`.
pub fn matches_labels(
    labels: &BTreeMap<String, String>,
    selector: &std::collections::HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            meta: Meta {
                name: "web".into(),
                uid: "u1".into(),
                namespace: "default".into(),
                attempt: 0,
            },
            labels: BTreeMap::from([("app".into(), "web".into())]),
            annotations: BTreeMap::new(),
            runtime_handler: "atoll".into(),
            log_directory: "/var/log/pods/x".into(),
            hostname: "web".into(),
            created_ns: 1,
            state: SandboxState::Ready,
            vcpus: 1,
            mem_mib: 256,
            pod_dir: "/run/atoll/cri/pods/x".into(),
            vmm_pid: Some(std::process::id()),
            vmm_start: process_start(std::process::id()),
            slots: vec![Slot {
                drive_id: "slot0".into(),
                image: None,
            }],
            message: String::new(),
            ips: vec!["10.88.0.7/16".into()],
            network: Some(NetworkRecord {
                netns: "/run/atoll/cri/netns/x".into(),
                result: Some(serde_json::json!({"ips": [{"address": "10.88.0.7/16"}]})),
                port_mappings: Vec::new(),
            }),
        }
    }

    #[test]
    fn records_survive_a_reload_and_garbage_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.put_sandbox(&sandbox("a")).unwrap();
        s.put_sandbox(&sandbox("b")).unwrap();
        s.delete_sandbox("b");
        fs::write(dir.path().join("sandboxes/bad.json"), b"{not json").unwrap();
        let (sb, c) = s.load();
        assert_eq!(sb, vec![sandbox("a")]);
        assert!(c.is_empty());
        let left: Vec<_> = fs::read_dir(dir.path().join("sandboxes"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .filter(|n| n.contains("tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn an_ended_vms_console_tail_is_kept_until_the_sandbox_goes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let console = dir.path().join("console.log");
        // No console at all: the line saying what happened is still kept.
        let kept = s.keep_console("a", &console, "killed").unwrap();
        let got = fs::read_to_string(&kept).unwrap();
        assert!(
            got.starts_with("atoll-cri: the VM of sandbox a ended"),
            "{got}"
        );
        assert!(
            got.contains("killed") && got.contains("last 0 bytes"),
            "{got}"
        );
        let mut text = vec![b'x'; usize::try_from(KEPT_CONSOLE_BYTES).unwrap()];
        text.extend_from_slice(b"\nKernel panic - not syncing: boom\n");
        fs::write(&console, &text).unwrap();
        let kept = s.keep_console("a", &console, "a panic").unwrap();
        assert_eq!(kept, s.console_path("a"));
        let got = fs::read(&kept).unwrap();
        assert!(got.ends_with(b"Kernel panic - not syncing: boom\n"));
        let first = got.iter().position(|&b| b == b'\n').unwrap() + 1;
        let header = first + got[first..].iter().position(|&b| b == b'\n').unwrap() + 1;
        assert_eq!((got.len() - header) as u64, KEPT_CONSOLE_BYTES);
        s.put_sandbox(&sandbox("a")).unwrap();
        s.delete_sandbox("a");
        assert!(!kept.exists());
    }

    #[test]
    fn a_recycled_pid_is_not_our_vmm() {
        let mut r = sandbox("a");
        assert!(vmm_alive(&r), "this process runs");
        r.vmm_start = r.vmm_start.map(|s| s + 1);
        assert!(!vmm_alive(&r));
        r.vmm_pid = None;
        assert!(!vmm_alive(&r));
    }

    #[test]
    fn label_selectors_need_every_pair() {
        let labels = BTreeMap::from([
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ]);
        let sel = |p: &[(&str, &str)]| {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::HashMap<_, _>>()
        };
        assert!(matches_labels(&labels, &sel(&[])));
        assert!(matches_labels(&labels, &sel(&[("a", "1")])));
        assert!(!matches_labels(&labels, &sel(&[("a", "12")])));
        assert!(!matches_labels(&labels, &sel(&[("a", "1"), ("c", "3")])));
    }
}
