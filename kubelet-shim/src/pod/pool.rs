//! Pre-started VMMs: `atoll-vmm --standby` processes that have paid for
//! everything a VMM costs before a guest can run (exec, the jail's namespaces and
//! mounts, KVM opened, the API and vsock sockets bound) before any pod asks. A pod
//! that starts from a template takes one and sends it the template's snapshot as
//! `PUT /snapshot/load` ([`super::Pod::start`]), instead of spawning a VMM.
//!
//! A VMM is also handed the snapshot of the template the last pod asked for
//! (`PUT /snapshot/preload`): it reads it, maps its memory, creates the VM and
//! its vCPUs and prefetches the working set while it waits, so that a pod's load
//! only builds the clone's devices and starts it. A pod of another template still
//! gets a waiting VMM; its load restores in full.
//!
//! Each waits in a directory of its own, `<pods dir>/standby-<n>`, which becomes the
//! pod's directory by a rename when a pod takes it (its sockets and files keep
//! working: the VMM's jail holds the directory, not its name). It runs under a uid
//! of its own (handed to the pod with it) and in a cgroup leaf of its own; the pod
//! makes its own leaf, sized for its VM, and moves the VMM there before the load.
//!
//! The VMMs run in sessions of their own, as pods' VMMs do, so a pod that took one
//! outlives the server. The pool kills the ones still waiting when it is dropped;
//! those a killed server left behind are found by [`sweep`] (a pid file with the
//! process's start time, so a recycled pid is never killed).

use std::collections::VecDeque;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{confine, state, template::Template, PodError, API_SOCK, CONSOLE_LOG_MAX};

/// Directory names of waiting VMMs start with this.
pub const PREFIX: &str = "standby-";
/// The file in a waiting VMM's directory with its pid and start time.
pub(super) const PID_FILE: &str = "standby.pid";
/// How long a fresh standby VMM may take to answer on its API socket.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One VMM waiting for a snapshot. Dropping it kills the VMM and removes its
/// directory, cgroup leaf and uid claim.
#[derive(Debug)]
pub struct Standby {
    /// Its directory (a pod's once taken).
    pub(super) dir: PathBuf,
    pub(super) child: Option<Child>,
    /// Copies the VMM's output into `console.log` in the directory.
    pub(super) console: Option<JoinHandle<()>>,
    // Dropped after the VMM is gone.
    pub(super) cgroup: Option<confine::Cgroup>,
    pub(super) uid: Option<confine::UidClaim>,
    /// Spawn to the API's first answer.
    pub ready_ms: f64,
    /// How long its preload took, if it had one.
    pub preload_ms: Option<f64>,
    /// The template it was given to preload (whether or not that worked).
    preloaded_for: Option<PathBuf>,
}

impl Standby {
    /// Starts one in a new directory under `run_dir`'s pods directory, and waits
    /// until it answers on its API socket.
    pub fn start(
        run_dir: &Path,
        vmm: &Path,
        cgroup_root: Option<&Path>,
    ) -> Result<Standby, PodError> {
        Self::start_for(run_dir, vmm, cgroup_root, None)
    }

    /// [`Standby::start`], then preloads `template`'s snapshot into it (a
    /// preload that fails is logged: the VMM still takes any load, in full).
    pub fn start_for(
        run_dir: &Path,
        vmm: &Path,
        cgroup_root: Option<&Path>,
        template: Option<&Template>,
    ) -> Result<Standby, PodError> {
        let t0 = Instant::now();
        let pods = state::pods_dir(run_dir);
        fs::create_dir_all(&pods).map_err(super::io_err(&pods))?;
        let (id, dir) = new_dir(&pods)?;
        let mut s = Standby {
            dir,
            child: None,
            console: None,
            cgroup: None,
            uid: None,
            ready_ms: 0.0,
            preload_ms: None,
            preloaded_for: None,
        };
        let uid = confine::claim_uid(run_dir, &id)?;
        let uid_value = uid.uid;
        s.uid = Some(uid);
        if let Some(root) = cgroup_root {
            // Sized for a VMM without a VM; the pod's own leaf has the pod's limits.
            let cg = confine::Cgroup::create(root, &id, 0, 0, None)?;
            // Leaves compete by weight, whatever their tasks' nice values: the
            // waiting VMM's gets the least, so pods' VMMs always come first.
            let weight = cg.path.join("cpu.weight");
            if weight.exists() {
                fs::write(&weight, "1").map_err(super::io_err(&weight))?;
            }
            let named = s.dir.join(confine::CGROUP_FILE);
            fs::write(&named, cg.path.as_os_str().as_encoded_bytes())
                .map_err(super::io_err(&named))?;
            s.cgroup = Some(cg);
        }
        let log_path = s.dir.join("console.log");
        let log = File::create(&log_path).map_err(super::io_err(&log_path))?;
        let (reader, writer) = std::io::pipe().map_err(super::io_err(&log_path))?;
        let writer2 = writer.try_clone().map_err(super::io_err(&log_path))?;
        let mut cmd = Command::new(vmm);
        cmd.args(Template::standby_args(&s.dir))
            .args(["--jail-uid".to_string(), uid_value.to_string()])
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(writer2);
        // SAFETY: the closure runs in the child between fork and exec and only
        // calls setsid(2) and setpriority(2), which are async-signal-safe and touch
        // no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                super::new_session()?;
                lowest_priority(0)
            });
        }
        if let Some(cg) = &s.cgroup {
            let cg = cg.for_child();
            // SAFETY: the closure runs in the child between fork and exec and only
            // makes open(2), write(2) and close(2) calls on data prepared before
            // the fork (`Cgroup::join_self`).
            unsafe {
                cmd.pre_exec(move || cg.join_self());
            }
        }
        let child = cmd.spawn().map_err(|source| PodError::Spawn {
            vmm: vmm.to_owned(),
            source,
        })?;
        drop(cmd);
        s.console = Some(std::thread::spawn(move || {
            super::copy_bounded(reader, log, CONSOLE_LOG_MAX)
        }));
        let pid = child.id();
        s.child = Some(child);
        // Its session is a scheduling group of its own where autogroups are on
        // (and its cgroup does not weigh it): that group waits for idle CPU too.
        let _ = fs::write(format!("/proc/{pid}/autogroup"), "19");
        let pid_file = s.dir.join(PID_FILE);
        let start = state::process_start(pid).unwrap_or(0);
        fs::write(&pid_file, format!("{pid} {start}\n")).map_err(super::io_err(&pid_file))?;
        s.wait_ready(&log_path)?;
        s.ready_ms = t0.elapsed().as_secs_f64() * 1000.0;
        if let Some(t) = template {
            s.preload(t);
        }
        Ok(s)
    }

    /// Has the VMM prepare the restore of `t`'s snapshot (replacing an earlier
    /// preload). A failure is logged: the VMM still takes any load, in full.
    fn preload(&mut self, t: &Template) {
        let t1 = Instant::now();
        let sock = self.dir.join(API_SOCK);
        self.preloaded_for = Some(t.dir.clone());
        self.preload_ms = None;
        match super::template::api_call(&sock, "PUT", "/snapshot/preload", &t.preload_body()) {
            Ok(_) => self.preload_ms = Some(t1.elapsed().as_secs_f64() * 1000.0),
            Err(e) => tracing::warn!(
                "a standby VMM could not preload template {}: {e} (a pod's load \
                 restores it in full)",
                t.dir.display()
            ),
        }
    }

    /// Waits until the VMM answers `GET /vm` (it is jailed and listening).
    fn wait_ready(&mut self, log: &Path) -> Result<(), PodError> {
        let sock = self.dir.join(API_SOCK);
        let start = Instant::now();
        loop {
            if !self.alive() {
                let tail = fs::read_to_string(log).unwrap_or_default();
                let line = tail.lines().last().unwrap_or("no message").to_owned();
                return Err(PodError::VmmFailed(format!(
                    "a standby atoll-vmm ended before it was ready: {line}"
                )));
            }
            if super::template::api_call(&sock, "GET", "/vm", "").is_ok() {
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                return Err(PodError::VmmFailed(format!(
                    "a standby atoll-vmm did not answer on {} within {READY_TIMEOUT:?}",
                    sock.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether its VMM still runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The VMM's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(t) = self.console.take() {
            let _ = t.join();
        }
        let _ = fs::remove_dir_all(&self.dir);
        // The cgroup leaf and the uid claim go as the fields drop.
    }
}

/// Gives thread `tid` (0: the caller) the lowest CPU priority: VMMs are
/// pre-started on idle CPU, never at the expense of pods starting or running.
fn lowest_priority(tid: libc::id_t) -> std::io::Result<()> {
    // SAFETY: setpriority(2) with integer arguments only.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Gives every thread of process `pid` the normal CPU priority again (a standby
/// VMM becoming a pod's; threads it makes later inherit it from its main thread).
pub(super) fn normal_priority(pid: u32) {
    let _ = fs::write(format!("/proc/{pid}/autogroup"), "0");
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<libc::id_t>().ok())
        {
            // SAFETY: setpriority(2) with integer arguments only.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 0) } != 0 {
                tracing::warn!(
                    "cannot give thread {tid} of VMM {pid} its priority back: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// A fresh `standby-<n>` directory under `pods`.
fn new_dir(pods: &Path) -> Result<(String, PathBuf), PodError> {
    let mut bytes = [0u8; 6];
    for _ in 0..16 {
        super::getrandom(&mut bytes).map_err(super::io_err(Path::new("getrandom")))?;
        let id = format!(
            "{PREFIX}{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let dir = pods.join(&id);
        match fs::create_dir(&dir) {
            Ok(()) => return Ok((id, dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(super::io_err(&dir)(e)),
        }
    }
    Err(PodError::AlreadyExists(pods.join(PREFIX)))
}

/// Keeps up to `size` standby VMMs ready.
#[derive(Debug)]
pub struct Pool {
    size: usize,
    run_dir: PathBuf,
    vmm: PathBuf,
    cgroup_root: Option<PathBuf>,
    ready: Mutex<VecDeque<Standby>>,
    /// The template new VMMs preload: the one the last pod asked for.
    expected: Mutex<Option<Template>>,
    /// Whether a thread is filling the pool now.
    filling: AtomicBool,
    /// Set when the pool is being dropped: fillers stop.
    closed: AtomicBool,
}

impl Pool {
    /// A pool of `size` VMMs (none start until [`Pool::fill`]).
    pub fn new(
        size: usize,
        run_dir: PathBuf,
        vmm: PathBuf,
        cgroup_root: Option<PathBuf>,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            size,
            run_dir,
            vmm,
            cgroup_root,
            ready: Mutex::new(VecDeque::new()),
            expected: Mutex::new(None),
            filling: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, VecDeque<Standby>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many wait now.
    pub fn len(&self) -> usize {
        self.ready().len()
    }

    /// Whether none waits now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes the VMMs started from now on preload `t` (the template of the pod
    /// asking now is the best guess for the next).
    pub fn expect(&self, t: &Template) {
        let mut e = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        if e.as_ref().is_none_or(|old| old.dir != t.dir) {
            *e = Some(t.clone());
        }
    }

    /// A waiting VMM that still runs, if there is one. The pool does not fill up
    /// again by itself: the caller calls [`Pool::fill`] once its pod has started,
    /// so that starting the next VMM never competes with the pod's own start.
    pub fn take(self: &Arc<Self>) -> Option<Standby> {
        let taken = {
            let mut ready = self.ready();
            loop {
                match ready.pop_front() {
                    Some(mut s) => {
                        if s.alive() {
                            break Some(s);
                        }
                        // One that died waiting (killed, out of memory) goes.
                    }
                    None => break None,
                }
            }
        };
        taken
    }

    /// Starts VMMs in the background until `size` wait (one filler at a time;
    /// a failure is logged and ends this round, the next take tries again).
    pub fn fill(self: &Arc<Self>) {
        if self.size == 0 || self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("standby-pool".into())
            .spawn(move || {
                // Filling waits for idle CPU like the VMMs it starts.
                let _ = lowest_priority(0);
                // VMMs that waited since before the expected template changed
                // get it now (each out of the queue only while it preloads).
                let expected = me
                    .expected
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                if let Some(t) = &expected {
                    while let Some(mut s) = me.take_unprepared(t) {
                        s.preload(t);
                        if me.closed.load(Ordering::Acquire) {
                            break; // `s` goes, and its VMM with it.
                        }
                        me.ready().push_back(s);
                    }
                }
                while !me.closed.load(Ordering::Acquire) && me.len() < me.size {
                    let expected = me
                        .expected
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    match Standby::start_for(
                        &me.run_dir,
                        &me.vmm,
                        me.cgroup_root.as_deref(),
                        expected.as_ref(),
                    ) {
                        Ok(s) => {
                            tracing::debug!(
                                "standby VMM ready in {:.1} ms, preloaded in {:?} ms",
                                s.ready_ms,
                                s.preload_ms
                            );
                            me.ready().push_back(s);
                        }
                        Err(e) => {
                            tracing::warn!("cannot pre-start a standby VMM: {e}");
                            break;
                        }
                    }
                }
                me.filling.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.filling.store(false, Ordering::Release);
        }
    }

    /// A waiting VMM not yet given template `t` to preload, out of the queue.
    fn take_unprepared(&self, t: &Template) -> Option<Standby> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let mut ready = self.ready();
        let i = ready
            .iter()
            .position(|s| s.preloaded_for.as_ref() != Some(&t.dir))?;
        ready.remove(i)
    }

    /// Stops filling and kills every waiting VMM.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready().clear();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.close();
    }
}

/// Kills the standby VMMs a previous process left under `run_dir` (a killed
/// server) and removes their directories, cgroup leaves and uid claims. A pid is
/// killed only if its start time is the one recorded.
pub fn sweep(run_dir: &Path) -> usize {
    let pods = state::pods_dir(run_dir);
    let Ok(entries) = fs::read_dir(&pods) else {
        return 0;
    };
    let mut swept = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let dir = e.path();
        let recorded = fs::read_to_string(dir.join(PID_FILE)).unwrap_or_default();
        let mut it = recorded.split_whitespace().map(str::parse::<u64>);
        if let (Some(Ok(pid)), Some(Ok(start))) = (it.next(), it.next()) {
            if let Ok(pid) = u32::try_from(pid) {
                if start != 0 && state::process_start(pid) == Some(start) {
                    // SAFETY: kill(2) with a pid whose start time we just checked.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    for _ in 0..100 {
                        if state::process_start(pid).is_none() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
        confine::remove_cgroup_of(&dir);
        let _ = fs::remove_dir_all(&dir);
        swept += 1;
    }
    swept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_kills_only_the_recorded_process_and_removes_standby_directories() {
        let run = tempfile::tempdir().unwrap();
        let pods = state::pods_dir(run.path());
        // A waiting VMM left by a killed server (a sleep stands in for it).
        let mut child = Command::new("sleep").arg("60").spawn().unwrap();
        let pid = child.id();
        let start = state::process_start(pid).unwrap();
        fs::create_dir_all(pods.join("standby-aa")).unwrap();
        fs::write(
            pods.join("standby-aa").join(PID_FILE),
            format!("{pid} {start}\n"),
        )
        .unwrap();
        // One whose pid was recycled: the recorded start time does not match.
        let mut other = Command::new("sleep").arg("60").spawn().unwrap();
        fs::create_dir_all(pods.join("standby-bb")).unwrap();
        fs::write(
            pods.join("standby-bb").join(PID_FILE),
            format!("{} {}\n", other.id(), start.wrapping_add(12345)),
        )
        .unwrap();
        // A pod's directory is none of its business.
        fs::create_dir_all(pods.join("pod-1")).unwrap();
        assert_eq!(sweep(run.path()), 2);
        let status = child.wait().unwrap();
        assert!(!status.success(), "the recorded process was killed");
        assert!(
            other.try_wait().unwrap().is_none(),
            "a recycled pid is spared"
        );
        other.kill().unwrap();
        other.wait().unwrap();
        assert!(!pods.join("standby-aa").exists());
        assert!(!pods.join("standby-bb").exists());
        assert!(pods.join("pod-1").is_dir());
    }

    #[test]
    fn waiting_vmms_not_given_the_expected_template_are_found_one_by_one() {
        let run = tempfile::tempdir().unwrap();
        let pool = Pool::new(2, run.path().to_owned(), "/nonexistent".into(), None);
        let standby = |n: &str, t: Option<&str>| Standby {
            dir: run.path().join(n),
            child: None,
            console: None,
            cgroup: None,
            uid: None,
            ready_ms: 0.0,
            preload_ms: None,
            preloaded_for: t.map(PathBuf::from),
        };
        let template = |d: &str| Template {
            dir: d.into(),
            key: "k".into(),
            net: false,
        };
        pool.ready().push_back(standby("a", Some("/t/old")));
        pool.ready().push_back(standby("b", Some("/t/new")));
        pool.ready().push_back(standby("c", None));
        pool.expect(&template("/t/new"));
        let expected = pool.expected.lock().unwrap().clone();
        assert_eq!(expected, Some(template("/t/new")));
        let t = template("/t/new");
        let first = pool.take_unprepared(&t).unwrap();
        assert!(first.dir.ends_with("a"), "{first:?}");
        let second = pool.take_unprepared(&t).unwrap();
        assert!(second.dir.ends_with("c"), "{second:?}");
        assert!(pool.take_unprepared(&t).is_none(), "b has it already");
        assert_eq!(pool.len(), 1);
        pool.close();
        pool.ready().push_back(standby("d", None));
        assert!(
            pool.take_unprepared(&t).is_none(),
            "a closed pool prepares nothing"
        );
    }

    #[test]
    fn an_empty_pool_gives_nothing_and_a_pool_of_none_never_fills() {
        let run = tempfile::tempdir().unwrap();
        let pool = Pool::new(
            0,
            run.path().to_owned(),
            "/nonexistent/atoll-vmm".into(),
            None,
        );
        pool.fill();
        assert!(pool.take().is_none());
        assert!(pool.is_empty());
    }
}
