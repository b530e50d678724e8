//! What the pod library gives each VMM besides its own jail (atoll-vmm's
//! `jail.rs`): an unprivileged uid and gid no other pod has, and a cgroup v2 leaf
//! that bounds its memory, tasks and (when the pod says) CPU.
//!
//! - **Uids.** Pod `n` runs as `UID_BASE + n` (gid the same), claimed as the
//!   symlink `<run dir>/uids/<uid>` → pod id, made under `<run dir>/uids.lock`. A
//!   claim whose pod directory is gone (a crash, a removed CRI sandbox) is taken
//!   back by the next allocation. Two VMMs never share a uid, so one cannot
//!   signal, trace or connect to what the other owns.
//! - **Cgroups.** `<root>/<pod id>` (root: `$ATOLL_CGROUP_ROOT`, default
//!   `/sys/fs/cgroup/atoll`; empty turns it off) with `memory.max` = guest RAM +
//!   [`MEMORY_OVERHEAD_MIB`], `memory.swap.max` 0, `pids.max` =
//!   [`TASKS_OVERHEAD`] + vCPUs and `cpu.max` from the pod's CPU limit. The VMM
//!   joins it between fork and exec, so every page it ever allocates is charged
//!   there; the leaf is removed once the VMM is gone.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// First uid (and gid) of VMMs; pod slots follow.
pub const UID_BASE: u32 = 2_000_000_000;
/// How many pods can hold a uid at once.
pub const UID_SLOTS: u32 = 1 << 20;
/// Memory a VMM may use beyond its guest's RAM: its own heap and page tables,
/// and the page cache of its snapshot and disks (which the kernel reclaims first).
pub const MEMORY_OVERHEAD_MIB: u64 = 128;
/// Tasks beyond one per vCPU: main, API, devices, console threads and headroom.
pub const TASKS_OVERHEAD: u64 = 16;
/// The cgroup root unless `ATOLL_CGROUP_ROOT` says otherwise.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup/atoll";
pub const CGROUP_ROOT_ENV: &str = "ATOLL_CGROUP_ROOT";

/// The cgroup root for pods: `$ATOLL_CGROUP_ROOT` (empty: none), else
/// [`DEFAULT_CGROUP_ROOT`] where `/sys/fs/cgroup` is cgroup v2, else none.
pub fn default_cgroup_root() -> Option<PathBuf> {
    match std::env::var_os(CGROUP_ROOT_ENV) {
        Some(v) if v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => Path::new("/sys/fs/cgroup/cgroup.controllers")
            .is_file()
            .then(|| PathBuf::from(DEFAULT_CGROUP_ROOT)),
    }
}

/// A CPU limit: `quota` µs of CPU time per `period` µs (cgroup v2 `cpu.max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuLimit {
    pub quota_us: u64,
    pub period_us: u64,
}

/// CPU time per period the VMM's own threads (devices, API) get beyond the
/// pod's CPUs.
pub const CPU_OVERHEAD_US: u64 = 10_000;
const CPU_PERIOD_US: u64 = 100_000;

impl CpuLimit {
    /// The limit of a pod allowed `cpus` CPUs (`atoll run --cpus`, the CRI's
    /// quota): those, plus [`CPU_OVERHEAD_US`] per period for the VMM itself.
    pub fn for_cpus(cpus: f64) -> Self {
        let quota = (cpus.max(0.0) * CPU_PERIOD_US as f64) as u64;
        CpuLimit {
            quota_us: (quota + CPU_OVERHEAD_US).max(1_000),
            period_us: CPU_PERIOD_US,
        }
    }
}

/// Why a pod could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("no free VMM uid: {UID_SLOTS} pods hold one (see {0})")]
    NoUid(PathBuf),
    #[error("cannot set up the pod's cgroup {path}: {source} (is cgroup v2 mounted, with the memory and pids controllers? {CGROUP_ROOT_ENV}= turns cgroups off)")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ConfineError + '_ {
    move |source| ConfineError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A uid claimed for one pod; released when dropped unless kept.
#[derive(Debug)]
pub struct UidClaim {
    pub uid: u32,
    link: PathBuf,
    pub keep: bool,
}

impl Drop for UidClaim {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.link);
        }
    }
}

impl UidClaim {
    /// Hands the uid to pod `pod_id` (a pre-started VMM that becomes that pod's):
    /// the claim names it from now on, replaced atomically under the claims' lock,
    /// so the uid is never free in between.
    pub fn transfer(&mut self, run_dir: &Path, pod_id: &str) -> Result<(), ConfineError> {
        let lock_path = run_dir.join("uids.lock");
        let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err(&lock_path)(e.into()))?;
        let mut tmp = self.link.clone().into_os_string();
        tmp.push(".new");
        let tmp = PathBuf::from(tmp);
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(pod_id, &tmp).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &self.link).map_err(io_err(&self.link))
    }
}

/// The slot a pod tries first: spread by its id, so that ids map to stable uids
/// where they can.
fn first_slot(pod_id: &str) -> u32 {
    let h = pod_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (h % u64::from(UID_SLOTS)) as u32
}

/// Claims a uid for `pod_id` under `run_dir` (whose `pods/` holds the pod
/// directories).
pub fn claim_uid(run_dir: &Path, pod_id: &str) -> Result<UidClaim, ConfineError> {
    let dir = run_dir.join("uids");
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let lock_path = run_dir.join("uids.lock");
    let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io_err(&lock_path)(e.into()))?;
    let pods = super::state::pods_dir(run_dir);
    let first = first_slot(pod_id);
    // Probing is bounded: a full table is an error, not a hang.
    for i in 0..UID_SLOTS.min(4096) {
        let uid = UID_BASE + (first + i) % UID_SLOTS;
        let link = dir.join(uid.to_string());
        match std::os::unix::fs::symlink(pod_id, &link) {
            Ok(()) => {
                return Ok(UidClaim {
                    uid,
                    link,
                    keep: false,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Taken back when its pod is gone.
                let owner = fs::read_link(&link).unwrap_or_default();
                let stale = owner.as_os_str().is_empty()
                    || owner.components().count() != 1
                    || !pods.join(&owner).is_dir();
                if stale
                    && fs::remove_file(&link).is_ok()
                    && std::os::unix::fs::symlink(pod_id, &link).is_ok()
                {
                    return Ok(UidClaim {
                        uid,
                        link,
                        keep: false,
                    });
                }
            }
            Err(e) => return Err(io_err(&link)(e)),
        }
    }
    Err(ConfineError::NoUid(dir))
}

/// A pod's cgroup leaf; removed when dropped (after its VMM is gone) unless kept.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
    /// `<path>/cgroup.procs`, ready for the child between fork and exec.
    procs: CString,
    pub keep: bool,
}

/// Enables `controllers` for the children of `dir` (those it has).
fn enable_controllers(dir: &Path, controllers: &[&str]) -> io::Result<()> {
    let available = fs::read_to_string(dir.join("cgroup.controllers"))?;
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for c in controllers {
        let has = |s: &str| s.split_whitespace().any(|x| x == *c);
        if has(&available) && !has(&enabled) {
            fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"))?;
        }
    }
    Ok(())
}

impl Cgroup {
    /// Makes `<root>/<pod_id>` with the pod's limits.
    pub fn create(
        root: &Path,
        pod_id: &str,
        mem_mib: u64,
        vcpus: u8,
        cpu: Option<CpuLimit>,
    ) -> Result<Self, ConfineError> {
        let path = root.join(pod_id);
        let fail = |path: &Path| {
            let path = path.to_owned();
            move |source| ConfineError::Cgroup { path, source }
        };
        // memory and pids are required; cpu only where it can be had (enabling it
        // fails while real-time tasks sit in other cgroups).
        const REQUIRED: [&str; 2] = ["memory", "pids"];
        if let Some(parent) = root.parent() {
            enable_controllers(parent, &REQUIRED).map_err(fail(parent))?;
            let _ = enable_controllers(parent, &["cpu"]);
        }
        match fs::create_dir(root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(fail(root)(e)),
        }
        enable_controllers(root, &REQUIRED).map_err(fail(root))?;
        let _ = enable_controllers(root, &["cpu"]);
        match fs::create_dir(&path) {
            Ok(()) => {}
            // A leaf left by a crash: its VMM is gone (the pod directory was
            // free), so it is reused.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(fail(&path)(e)),
        }
        let cg = Cgroup {
            procs: CString::new(path.join("cgroup.procs").as_os_str().as_bytes())
                .unwrap_or_default(),
            path,
            keep: false,
        };
        let mut limits = vec![
            (
                "memory.max",
                ((mem_mib + MEMORY_OVERHEAD_MIB) << 20).to_string(),
            ),
            ("pids.max", (TASKS_OVERHEAD + u64::from(vcpus)).to_string()),
        ];
        if cg.path.join("memory.swap.max").exists() {
            limits.push(("memory.swap.max", "0".into()));
        }
        if let Some(c) = cpu {
            limits.push(("cpu.max", format!("{} {}", c.quota_us, c.period_us)));
        }
        for (file, value) in limits {
            let p = cg.path.join(file);
            fs::write(&p, &value).map_err(fail(&p))?;
        }
        Ok(cg)
    }

    /// Moves the calling process into the cgroup. Async-signal-safe: for the
    /// child between fork and exec (`open`, `write`, `close` only).
    pub fn join_self(&self) -> io::Result<()> {
        // SAFETY: open(2) of a NUL-terminated path we own.
        let fd = unsafe { libc::open(self.procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: write(2) of a 1-byte static buffer ("0": this process).
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        let err = io::Error::last_os_error();
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(fd) };
        if n != 1 {
            return Err(err);
        }
        Ok(())
    }

    /// Moves process `pid` (every thread of it) into the cgroup: a pre-started VMM
    /// joins its pod's leaf. What it has allocated so far stays charged where it
    /// was; everything from now on (guest memory comes with the snapshot) is
    /// charged here.
    pub fn adopt(&self, pid: u32) -> Result<(), ConfineError> {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string()).map_err(|source| ConfineError::Cgroup {
            path: procs,
            source,
        })
    }

    /// A copy for the child's `pre_exec` (never removes the leaf).
    pub fn for_child(&self) -> Cgroup {
        Cgroup {
            path: self.path.clone(),
            procs: self.procs.clone(),
            keep: true,
        }
    }

    /// Whether the OOM killer or the limit has struck in this cgroup
    /// (`memory.events`: `oom_kill`).
    pub fn oom_kills(&self) -> u64 {
        fs::read_to_string(self.path.join("memory.events"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // The VMM has been reaped; its threads may take a moment to leave.
        for _ in 0..50 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        tracing::warn!("cannot remove the pod cgroup {}", self.path.display());
    }
}

/// What a pod's VMM has used, from its cgroup leaf: the pod's cost on the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// `cpu.stat` usage_usec, in ns.
    pub cpu_ns: u64,
    /// `memory.current`.
    pub memory_bytes: u64,
    /// `memory.current` less `inactive_file` (what kubelet calls the working set).
    pub working_set_bytes: u64,
    /// `memory.stat` anon.
    pub anon_bytes: u64,
    pub page_faults: u64,
    pub major_page_faults: u64,
    /// `pids.current`.
    pub tasks: u64,
}

/// The `key value` lines of a cgroup stat file.
fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Reads the usage of the cgroup leaf at `dir`.
pub fn usage(dir: &Path) -> io::Result<CgroupUsage> {
    let read = |f: &str| fs::read_to_string(dir.join(f));
    let number = |f: &str| -> io::Result<u64> {
        read(f)?
            .trim()
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{f} is not a number")))
    };
    let cpu = read("cpu.stat")?;
    let mem = read("memory.stat")?;
    let memory_bytes = number("memory.current")?;
    let inactive = stat_value(&mem, "inactive_file").unwrap_or(0);
    Ok(CgroupUsage {
        cpu_ns: stat_value(&cpu, "usage_usec")
            .unwrap_or(0)
            .saturating_mul(1000),
        memory_bytes,
        working_set_bytes: memory_bytes.saturating_sub(inactive),
        anon_bytes: stat_value(&mem, "anon").unwrap_or(0),
        page_faults: stat_value(&mem, "pgfault").unwrap_or(0),
        major_page_faults: stat_value(&mem, "pgmajfault").unwrap_or(0),
        tasks: number("pids.current").unwrap_or(0),
    })
}

/// The cgroup leaf a pod directory names (see [`CGROUP_FILE`]).
pub fn cgroup_of(pod_dir: &Path) -> Option<PathBuf> {
    let path = PathBuf::from(fs::read_to_string(pod_dir.join(CGROUP_FILE)).ok()?.trim());
    (path.is_absolute() && path.file_name() == pod_dir.file_name()).then_some(path)
}

/// The file in a pod directory that names the pod's cgroup leaf.
pub const CGROUP_FILE: &str = "cgroup";

/// Removes the cgroup leaf named in `pod_dir` (a pod whose VMM is gone and which
/// no [`Cgroup`] value holds any more: a CRI sandbox being removed).
pub fn remove_cgroup_of(pod_dir: &Path) {
    // Only a leaf a pod library made: `<root>/<this pod's id>`.
    let Some(path) = cgroup_of(pod_dir) else {
        return;
    };
    drop(Cgroup {
        path,
        procs: CString::default(),
        keep: false,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transferred_uid_claim_names_the_new_pod_and_stays_taken() {
        let run = tempfile::tempdir().unwrap();
        let pods = super::super::state::pods_dir(run.path());
        fs::create_dir_all(pods.join("standby-1")).unwrap();
        let mut claim = claim_uid(run.path(), "standby-1").unwrap();
        fs::rename(pods.join("standby-1"), pods.join("pod")).unwrap();
        claim.transfer(run.path(), "pod").unwrap();
        assert_eq!(fs::read_link(&claim.link).unwrap(), Path::new("pod"));
        // The renamed directory still holds it: nobody else gets the uid.
        fs::create_dir_all(pods.join("other")).unwrap();
        let other = claim_uid(run.path(), "other").unwrap();
        assert_ne!(other.uid, claim.uid);
        drop(claim);
    }

    #[test]
    fn uids_are_distinct_per_pod_and_taken_back_when_the_pod_is_gone() {
        let run = tempfile::tempdir().unwrap();
        let pods = super::super::state::pods_dir(run.path());
        fs::create_dir_all(pods.join("a")).unwrap();
        fs::create_dir_all(pods.join("b")).unwrap();
        let a = claim_uid(run.path(), "a").unwrap();
        let b = claim_uid(run.path(), "b").unwrap();
        assert_ne!(a.uid, b.uid);
        assert!(a.uid >= UID_BASE && a.uid < UID_BASE + UID_SLOTS);
        // The same id while its claim stands gets another uid.
        let a2 = claim_uid(run.path(), "a").unwrap();
        assert_ne!(a2.uid, a.uid);
        drop(a2);
        // A kept claim (a detached pod) whose pod directory went away is reused.
        drop(b);
        let mut kept = claim_uid(run.path(), "b").unwrap();
        kept.keep = true;
        let uid = kept.uid;
        drop(kept);
        assert!(claim_uid(run.path(), "b").unwrap().uid != uid, "still held");
        fs::remove_dir(pods.join("b")).unwrap();
        let again = claim_uid(run.path(), "b").unwrap();
        assert_eq!(
            again.uid, uid,
            "the stale claim of the same slot is taken back"
        );
        drop(a);
        assert_eq!(fs::read_dir(run.path().join("uids")).unwrap().count(), 1);
    }

    #[test]
    fn usage_is_read_from_the_leafs_stat_files() {
        let d = tempfile::tempdir().unwrap();
        fs::write(
            d.path().join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\n",
        )
        .unwrap();
        fs::write(d.path().join("memory.current"), "10485760\n").unwrap();
        fs::write(
            d.path().join("memory.stat"),
            "anon 4096\nfile 8192\ninactive_file 1048576\npgfault 77\npgmajfault 3\n",
        )
        .unwrap();
        fs::write(d.path().join("pids.current"), "6\n").unwrap();
        let u = usage(d.path()).unwrap();
        assert_eq!(
            u,
            CgroupUsage {
                cpu_ns: 1_500_000,
                memory_bytes: 10 << 20,
                working_set_bytes: 9 << 20,
                anon_bytes: 4096,
                page_faults: 77,
                major_page_faults: 3,
                tasks: 6,
            }
        );
        fs::write(d.path().join("memory.current"), "max\n").unwrap();
        assert!(usage(d.path()).is_err());
    }

    /// Against a directory shaped like cgroupfs (files stand in for the knobs).
    #[test]
    fn cgroup_leaf_gets_the_pods_limits_and_the_child_joins_it() {
        let fs_root = tempfile::tempdir().unwrap();
        fs::write(
            fs_root.path().join("cgroup.controllers"),
            "cpu memory pids io",
        )
        .unwrap();
        fs::write(fs_root.path().join("cgroup.subtree_control"), "").unwrap();
        let root = fs_root.path().join("atoll");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("cgroup.controllers"), "cpu memory pids").unwrap();
        fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let cpu = CpuLimit {
            quota_us: 50_000,
            period_us: 100_000,
        };
        let cg = Cgroup::create(&root, "p1", 256, 2, Some(cpu)).unwrap();
        let read = |f: &str| fs::read_to_string(cg.path.join(f)).unwrap();
        assert_eq!(
            read("memory.max"),
            ((256 + MEMORY_OVERHEAD_MIB) << 20).to_string()
        );
        assert_eq!(read("pids.max"), (TASKS_OVERHEAD + 2).to_string());
        assert_eq!(read("cpu.max"), "50000 100000");
        fs::write(cg.path.join("cgroup.procs"), "").unwrap();
        cg.join_self().unwrap();
        assert_eq!(read("cgroup.procs"), "0");
        // The knobs are files here, so the leaf is not empty: removal gives up
        // with a warning instead of hanging.
        let path = cg.path.clone();
        drop(cg);
        assert!(path.exists());
    }
}
