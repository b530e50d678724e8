//! Memory-stall relief: the agent ends a container that is stuck at its memory
//! limit, which the kernel's OOM killer does not.
//!
//! A container at its `memory.max` with no swap can reclaim only page cache: the
//! pages of its own binaries and libraries. The memory controller invokes the OOM
//! killer only when reclaim frees nothing, over and over (`try_charge_memcg` retries
//! for as long as reclaim frees any page), so a container whose processes keep
//! faulting their program text back in can live at its limit for good: every charge
//! evicts a page another process needs next, which is read back from the image
//! disk, and none of them gets anywhere. In the nested node that was a container
//! that never ended, its vCPU busy and the VMM reading its image disk at about
//! 38 MB/s (the `oom` scenario of `tests/tests/containers.rs`: 7 runs in 94 of a
//! soak).
//!
//! The kernel leaves this to user space and gives it pressure stall information
//! (PSI): `memory.pressure`'s `full` line is the share of time in which every
//! runnable process of the cgroup was stalled on memory. As systemd-oomd and oomd
//! do, a watch thread reads it for every container with a memory limit, every
//! [`StallPolicy::interval`]; a container that stays at its limit with `full avg10`
//! at or over [`StallPolicy::full_avg10_min`] % for [`StallPolicy::sustain`] is
//! killed as a whole (`cgroup.kill`), and its Wait reports it OOM-killed (exit 137),
//! as the kernel's kill would have been. The watch only reads files and writes
//! `cgroup.kill`; a container costs one small read a second (three with a limit).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// When a container counts as stuck.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StallPolicy {
    /// The least `full avg10` (percent of time all its processes were stalled on
    /// memory, averaged over 10 s) that counts.
    pub full_avg10_min: f64,
    /// How close to `memory.max` its usage must be (bytes; at least this, or
    /// 1/32 of the limit if that is more).
    pub at_limit_margin: u64,
    /// How long both must hold, at every check, before the container is killed.
    pub sustain: Duration,
    /// Time between checks.
    pub interval: Duration,
}

impl Default for StallPolicy {
    /// 30 % full stall at the limit for 30 s, checked every second. Measured in
    /// the nested node: a container stuck for good sat at 44 to 47 % `full avg10`
    /// for minutes (every process stalled about half the time, the other half
    /// spent faulting and scanning), with `memory.events` `max` rising by about
    /// 300 a second and `oom` at 0; the 6 of 100 soak runs that got stuck were at
    /// 43 to 56 % when killed; one that the kernel OOM-killed after 15 s of
    /// thrashing reached 36 % on the way; an ordinary OOM kill leaves it at 0. systemd-oomd's
    /// default is 60 % for 30 s; a thrashing container reaches less than that here,
    /// its running half being slowed by the emulation as much as its stalls.
    fn default() -> Self {
        Self {
            full_avg10_min: 30.0,
            at_limit_margin: 1 << 20,
            sustain: Duration::from_secs(30),
            interval: Duration::from_secs(1),
        }
    }
}

/// One check of one container's cgroup.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The container id (its cgroup directory's name).
    pub id: String,
    /// `memory.max`.
    pub limit: u64,
    /// `memory.current`.
    pub usage: u64,
    /// `memory.pressure`, `full avg10`.
    pub full_avg10: f64,
}

impl Sample {
    /// Reads the cgroup directory `dir` of container `id`; `None` for a container
    /// without a limit (`max`: never stuck at it, and read no further) and when a
    /// file is missing or unreadable (the container is going, or PSI is off).
    pub fn read(id: &str, dir: &Path) -> Option<Self> {
        let limit = fs::read_to_string(dir.join("memory.max"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let usage = fs::read_to_string(dir.join("memory.current"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let full_avg10 = full_avg10(&fs::read_to_string(dir.join("memory.pressure")).ok()?)?;
        Some(Self {
            id: id.to_owned(),
            limit,
            usage,
            full_avg10,
        })
    }
}

/// `avg10` of the `full` line of a PSI file (`full avg10=12.34 avg60=... total=...`).
pub fn full_avg10(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix("full "))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("avg10="))?
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
}

/// The ids of containers the watch has killed; their Wait reports an OOM kill.
#[derive(Debug, Default)]
pub struct StallKills(Mutex<HashSet<String>>);

impl StallKills {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether container `id` was killed for being stuck at its limit.
    pub fn contains(&self, id: &str) -> bool {
        self.set().contains(id)
    }

    /// Records a kill (before it happens: a Wait answered in between must see it).
    pub fn insert(&self, id: &str) {
        self.set().insert(id.to_owned());
    }

    /// Forgets `id` (a new container of that id is a new container).
    pub fn forget(&self, id: &str) {
        self.set().remove(id);
    }
}

/// Decides, check after check, which containers are stuck.
#[derive(Debug)]
pub struct StallWatch {
    policy: StallPolicy,
    /// Since when each container has been stuck, by id.
    since: HashMap<String, Instant>,
}

impl StallWatch {
    /// A watch with `policy`.
    pub fn new(policy: StallPolicy) -> Self {
        Self {
            policy,
            since: HashMap::new(),
        }
    }

    /// Whether `s` is stuck right now: at its limit and stalled.
    fn stuck(&self, s: &Sample) -> bool {
        let margin = self.policy.at_limit_margin.max(s.limit / 32);
        s.usage.saturating_add(margin) >= s.limit && s.full_avg10 >= self.policy.full_avg10_min
    }

    /// Takes one check of every container (those absent are forgotten); returns the
    /// containers stuck for the whole of [`StallPolicy::sustain`], with how long.
    pub fn observe(&mut self, samples: &[Sample], now: Instant) -> Vec<(String, Duration)> {
        self.since
            .retain(|id, _| samples.iter().any(|s| &s.id == id));
        let mut due = Vec::new();
        for s in samples {
            if !self.stuck(s) {
                self.since.remove(&s.id);
                continue;
            }
            let since = *self.since.entry(s.id.clone()).or_insert(now);
            let stuck_for = now.saturating_duration_since(since);
            if stuck_for >= self.policy.sustain {
                // Once: a killed container that lingers starts a new count.
                self.since.remove(&s.id);
                due.push((s.id.clone(), stuck_for));
            }
        }
        due
    }
}

/// Reads every container cgroup under `containers` (`/sys/fs/cgroup/atoll`).
fn samples(containers: &Path) -> Vec<Sample> {
    let Ok(dir) = fs::read_dir(containers) else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Sample::read(e.file_name().to_str()?, &e.path()))
        .collect()
}

/// One round: checks the containers under `containers`, kills those due (recording
/// them in `kills` first) and says so on the console; returns the ids killed.
pub fn check_once(
    watch: &mut StallWatch,
    containers: &Path,
    kills: &StallKills,
    now: Instant,
) -> Vec<String> {
    let found = samples(containers);
    let due = watch.observe(&found, now);
    let mut killed = Vec::new();
    for (id, stuck_for) in due {
        let Some(s) = found.iter().find(|s| s.id == id) else {
            continue;
        };
        kills.insert(&id);
        match crate::container::pidns::kill_cgroup(&containers.join(&id)) {
            Ok(()) => {
                eprintln!(
                    "atoll-init agent: killed container {id}: stuck at its memory limit \
                     ({} of {} bytes) with every process stalled on memory {:.0}% of the \
                     time for {} s; the kernel's OOM killer does not act while reclaim \
                     keeps evicting the container's page cache",
                    s.usage,
                    s.limit,
                    s.full_avg10,
                    stuck_for.as_secs()
                );
                killed.push(id);
            }
            Err(e) => {
                kills.forget(&id);
                eprintln!(
                    "atoll-init agent: cannot kill container {id}, stuck at its memory limit: {e}"
                );
            }
        }
    }
    killed
}

/// Starts the watch over the container cgroups under `containers`, for the life of
/// the agent.
pub fn spawn(
    containers: PathBuf,
    policy: StallPolicy,
    kills: Arc<StallKills>,
) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("memory-stall".into())
        .spawn(move || {
            let mut watch = StallWatch::new(policy);
            loop {
                thread::sleep(policy.interval);
                check_once(&mut watch, &containers, &kills, Instant::now());
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRESSURE: &str = "some avg10=95.10 avg60=40.00 avg300=9.00 total=123\n\
                            full avg10=91.50 avg60=38.20 avg300=8.10 total=100\n";

    fn sample(id: &str, limit: u64, usage: u64, full: f64) -> Sample {
        Sample {
            id: id.into(),
            limit,
            usage,
            full_avg10: full,
        }
    }

    fn policy() -> StallPolicy {
        StallPolicy::default()
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn full_avg10_is_read_from_the_full_line_only() {
        assert_eq!(full_avg10(PRESSURE), Some(91.5));
        assert_eq!(
            full_avg10("some avg10=50.00 avg60=0 avg300=0 total=0\n"),
            None
        );
        assert_eq!(full_avg10("full avg10=x avg60=0\n"), None);
        assert_eq!(full_avg10("full avg10=NaN avg60=0\n"), None);
        assert_eq!(full_avg10(""), None);
    }

    #[test]
    fn a_container_stuck_for_the_whole_sustain_is_due_once() {
        let mut w = StallWatch::new(policy());
        let t0 = Instant::now();
        let stuck = [sample("c", 32 * MIB, 32 * MIB - 4096, 95.0)];
        assert!(w.observe(&stuck, t0).is_empty());
        assert!(w.observe(&stuck, t0 + Duration::from_secs(29)).is_empty());
        let due = w.observe(&stuck, t0 + Duration::from_secs(30));
        assert_eq!(due, vec![("c".to_owned(), Duration::from_secs(30))]);
        // The count starts again: not due at the next check.
        assert!(w.observe(&stuck, t0 + Duration::from_secs(31)).is_empty());
    }

    #[test]
    fn one_check_below_the_threshold_or_off_the_limit_starts_the_count_again() {
        let mut w = StallWatch::new(policy());
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let stuck = [sample("c", 32 * MIB, 32 * MIB, 95.0)];
        assert!(w.observe(&stuck, at(0)).is_empty());
        assert!(w
            .observe(&[sample("c", 32 * MIB, 32 * MIB, 29.9)], at(10))
            .is_empty());
        assert!(w.observe(&stuck, at(11)).is_empty());
        assert!(
            w.observe(&stuck, at(40)).is_empty(),
            "stuck since 11 s only"
        );
        // Far from the limit (2 MiB under it; the margin is 1 MiB): not stuck.
        assert!(w
            .observe(&[sample("c", 32 * MIB, 30 * MIB, 99.0)], at(41))
            .is_empty());
        assert!(w.observe(&stuck, at(50)).is_empty());
        assert_eq!(w.observe(&stuck, at(80)).len(), 1);
    }

    #[test]
    fn a_large_limit_has_a_proportional_margin() {
        let mut w = StallWatch::new(policy());
        let t0 = Instant::now();
        // 1 GiB limit: within 1/32 (32 MiB) counts as at the limit.
        let big = [sample("b", 1024 * MIB, 1000 * MIB, 90.0)];
        assert!(w.observe(&big, t0).is_empty());
        assert_eq!(w.observe(&big, t0 + Duration::from_secs(30)).len(), 1);
    }

    #[test]
    fn containers_that_go_away_are_forgotten() {
        let mut w = StallWatch::new(policy());
        let t0 = Instant::now();
        let stuck = |id: &str| sample(id, 32 * MIB, 32 * MIB, 95.0);
        assert!(w.observe(&[stuck("a"), stuck("b")], t0).is_empty());
        assert!(w
            .observe(&[stuck("b")], t0 + Duration::from_secs(5))
            .is_empty());
        // "a" is back: a new container of that id, counted from now.
        let due = w.observe(&[stuck("a"), stuck("b")], t0 + Duration::from_secs(30));
        assert_eq!(due, vec![("b".to_owned(), Duration::from_secs(30))]);
    }

    fn cgroup(root: &Path, id: &str, max: &str, current: u64, pressure: &str) -> PathBuf {
        let d = root.join(id);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("memory.max"), format!("{max}\n")).unwrap();
        fs::write(d.join("memory.current"), format!("{current}\n")).unwrap();
        fs::write(d.join("memory.pressure"), pressure).unwrap();
        d
    }

    #[test]
    fn a_round_reads_the_cgroup_files_kills_with_cgroup_kill_and_records_it() {
        let root = tempfile::tempdir().unwrap();
        let stuck = cgroup(root.path(), "stuck", "33554432", 33_550_000, PRESSURE);
        let calm = cgroup(
            root.path(),
            "calm",
            "33554432",
            33_550_000,
            "some avg10=1.00 avg60=0 avg300=0 total=1\nfull avg10=0.50 avg60=0 avg300=0 total=1\n",
        );
        let unlimited = cgroup(root.path(), "free", "max", 1 << 30, PRESSURE);
        // PSI off: no memory.pressure, never counted.
        let no_psi = cgroup(root.path(), "nopsi", "33554432", 33_550_000, PRESSURE);
        fs::remove_file(no_psi.join("memory.pressure")).unwrap();
        fs::write(root.path().join("not-a-cgroup"), "").unwrap();

        let kills = StallKills::default();
        let mut w = StallWatch::new(policy());
        let t0 = Instant::now();
        assert!(check_once(&mut w, root.path(), &kills, t0).is_empty());
        let killed = check_once(&mut w, root.path(), &kills, t0 + Duration::from_secs(30));
        assert_eq!(killed, vec!["stuck".to_owned()]);
        assert_eq!(fs::read_to_string(stuck.join("cgroup.kill")).unwrap(), "1");
        for d in [&calm, &unlimited, &no_psi] {
            assert!(!d.join("cgroup.kill").exists(), "{}", d.display());
        }
        assert!(kills.contains("stuck"));
        assert!(!kills.contains("calm"));
        kills.forget("stuck");
        assert!(!kills.contains("stuck"));
    }

    #[test]
    fn a_kill_that_fails_is_not_reported_as_an_oom_kill() {
        let root = tempfile::tempdir().unwrap();
        let d = cgroup(root.path(), "c", "33554432", 33_554_432, PRESSURE);
        // cgroup.kill cannot be written: a directory stands in its place.
        fs::create_dir(d.join("cgroup.kill")).unwrap();
        let kills = StallKills::default();
        let mut w = StallWatch::new(policy());
        let t0 = Instant::now();
        check_once(&mut w, root.path(), &kills, t0);
        let killed = check_once(&mut w, root.path(), &kills, t0 + Duration::from_secs(30));
        assert!(killed.is_empty());
        assert!(!kills.contains("c"));
    }
}
