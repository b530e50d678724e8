//! What a pod leaves in its state directory for `atoll ps`, `stop` and `logs`:
//! `state.json` (who runs it, which VMM, which image, since when), replaced
//! atomically, and where the run directory keeps the last log of ended pods.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The run directory when `ATOLL_RUN_DIR` does not say otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/atoll";
pub const RUN_DIR_ENV: &str = "ATOLL_RUN_DIR";
/// A state file larger than this is not ours.
const MAX_STATE: u64 = 64 << 10;

/// The run directory: `$ATOLL_RUN_DIR` or `/run/atoll`.
pub fn run_dir() -> PathBuf {
    std::env::var_os(RUN_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
}

/// `<run dir>/pods`.
pub fn pods_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("pods")
}

/// `<run dir>/logs`: container logs (and state) of pods that have ended.
pub fn logs_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("logs")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodStatus {
    Starting,
    Running,
    Stopping,
    Exited,
}

impl std::fmt::Display for PodStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PodStatus::Starting => "starting",
            PodStatus::Running => "running",
            PodStatus::Stopping => "stopping",
            PodStatus::Exited => "exited",
        })
    }
}

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    pub id: String,
    pub name: String,
    pub image: String,
    pub status: PodStatus,
    /// The process that owns the pod (`atoll run`): `atoll stop` signals it.
    pub owner_pid: u32,
    pub vmm_pid: Option<u32>,
    /// Seconds since the epoch.
    pub created: u64,
    /// The main container's exit status, once known.
    pub exit_status: Option<i32>,
    /// The guest's address on its tap (`atoll run --net`).
    #[serde(default)]
    pub address: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a pod state file")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Writes `value` to `path` atomically (a temp file beside it, then rename).
fn write_json<T: Serialize>(value: &T, path: &Path) -> Result<(), StateError> {
    let io_err = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    let data = serde_json::to_vec_pretty(value).map_err(|e| io_err(e.into()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, data).map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)
}

/// Reads a JSON file of at most [`MAX_STATE`] bytes.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StateError> {
    use std::io::Read;
    let io_err = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    let mut data = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_STATE).read_to_end(&mut data))
        .map_err(io_err)?;
    serde_json::from_slice(&data).map_err(|source| StateError::Corrupt {
        path: path.to_owned(),
        source,
    })
}

impl PodState {
    /// Writes `path` atomically (a temp file beside it, then rename).
    pub fn write(&self, path: &Path) -> Result<(), StateError> {
        write_json(self, path)
    }

    pub fn read(path: &Path) -> Result<Self, StateError> {
        read_json(path)
    }
}

/// The file of a pod's directory holding its [`ExecDefaults`].
pub const EXEC_DEFAULTS_FILE: &str = "process.json";

/// What `atoll exec` starts from (as `docker exec`): the main container's
/// environment, working directory and user, as `atoll run` resolved them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecDefaults {
    pub env: Vec<String>,
    pub cwd: String,
    pub user: String,
}

impl ExecDefaults {
    /// Writes `<pod dir>/process.json`.
    pub fn write(&self, pod_dir: &Path) -> Result<(), StateError> {
        write_json(self, &pod_dir.join(EXEC_DEFAULTS_FILE))
    }

    /// Reads `<pod dir>/process.json`.
    pub fn read(pod_dir: &Path) -> Result<Self, StateError> {
        read_json(&pod_dir.join(EXEC_DEFAULTS_FILE))
    }
}

/// Seconds since the epoch, now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`), if it runs:
/// with the pid, it names one process even after the pid is recycled.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field 22 is index 19. A zombie does not run.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether a process of that pid exists (signal 0).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks the pid.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The pods of a run directory whose state file can be read, oldest first.
pub fn list(run_dir: &Path) -> Vec<(PathBuf, PodState)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(pods_dir(run_dir)) else {
        return out;
    };
    for e in rd.flatten() {
        let dir = e.path();
        if let Ok(s) = PodState::read(&dir.join("state.json")) {
            out.push((dir, s));
        }
    }
    out.sort_by(|a, b| (a.1.created, &a.1.id).cmp(&(b.1.created, &b.1.id)));
    out
}

/// Finds a live pod by id, unique id prefix, or name.
pub fn find(run_dir: &Path, what: &str) -> Option<(PathBuf, PodState)> {
    let pods = list(run_dir);
    if let Some(p) = pods.iter().find(|(_, s)| s.id == what || s.name == what) {
        return Some(p.clone());
    }
    let mut hits = pods.into_iter().filter(|(_, s)| s.id.starts_with(what));
    match (hits.next(), hits.next()) {
        (Some(p), None) if !what.is_empty() => Some(p),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(id: &str, name: &str, created: u64) -> PodState {
        PodState {
            id: id.into(),
            name: name.into(),
            image: "atoll/busybox:latest".into(),
            status: PodStatus::Running,
            owner_pid: std::process::id(),
            vmm_pid: Some(1),
            created,
            exit_status: None,
            address: None,
        }
    }

    #[test]
    fn state_file_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        let mut s = state("abc", "web", 7);
        s.exit_status = Some(137);
        s.status = PodStatus::Exited;
        s.write(&p).unwrap();
        assert_eq!(PodState::read(&p).unwrap(), s);
        let text = fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"status\": \"exited\""), "{text}");
    }

    #[test]
    fn exec_defaults_round_trip_and_old_state_files_still_read() {
        let d = tempfile::tempdir().unwrap();
        let e = ExecDefaults {
            env: vec!["PATH=/bin".into(), "A=1".into()],
            cwd: "/work".into(),
            user: "nobody".into(),
        };
        e.write(d.path()).unwrap();
        assert_eq!(ExecDefaults::read(d.path()).unwrap(), e);
        // A state file written before `address` existed.
        let p = d.path().join("state.json");
        fs::write(
            &p,
            r#"{"id":"a","name":"a","image":"i","status":"running","owner_pid":1,
               "vmm_pid":null,"created":1,"exit_status":null}"#,
        )
        .unwrap();
        assert_eq!(PodState::read(&p).unwrap().address, None);
    }

    #[test]
    fn state_file_garbage_is_corrupt_not_panic() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        fs::write(&p, b"{\"id\": 3").unwrap();
        assert!(matches!(
            PodState::read(&p),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn find_by_id_name_and_prefix() {
        let d = tempfile::tempdir().unwrap();
        for (id, name, t) in [("aaa111", "web", 1), ("aab222", "db", 2)] {
            let dir = pods_dir(d.path()).join(id);
            fs::create_dir_all(&dir).unwrap();
            state(id, name, t).write(&dir.join("state.json")).unwrap();
        }
        assert_eq!(find(d.path(), "db").unwrap().1.id, "aab222");
        assert_eq!(find(d.path(), "aaa111").unwrap().1.name, "web");
        assert_eq!(find(d.path(), "aaa").unwrap().1.id, "aaa111");
        assert!(find(d.path(), "aa").is_none(), "ambiguous prefix");
        assert!(find(d.path(), "zzz").is_none());
        let ids: Vec<_> = list(d.path()).into_iter().map(|(_, s)| s.id).collect();
        assert_eq!(ids, ["aaa111", "aab222"]);
    }

    #[test]
    fn pid_alive_sees_self_not_nonsense() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
    }
}
