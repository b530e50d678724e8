//! Reading a container's cgroup v2 counters (`/sys/fs/cgroup/atoll/<id>/`). The
//! parsers are pure; [`read`] and [`read_oom_kills`] only open the files.

use std::io;
use std::path::Path;

use atoll_agent_proto::v1;

/// Parses a single-number file (`memory.current`, `pids.current`); `max` is 0 (no
/// limit), as the protocol counts it.
pub fn parse_single(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => Some(0),
        s => s.parse().ok(),
    }
}

/// The value of `key` in a flat-keyed file (`cpu.stat`, `memory.events`).
pub fn parse_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn read_small(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(path)?
        .take(64 * 1024)
        .read_to_string(&mut s)?;
    Ok(s)
}

/// The counters of the cgroup directory `dir`. A file the kernel lacks (a controller
/// not enabled) reads as 0; a missing directory is an error.
pub fn read(dir: &Path) -> io::Result<v1::StatsReply> {
    if !dir.is_dir() {
        return Err(io::ErrorKind::NotFound.into());
    }
    let single = |name: &str| {
        read_small(&dir.join(name))
            .ok()
            .and_then(|t| parse_single(&t))
            .unwrap_or(0)
    };
    let cpu = read_small(&dir.join("cpu.stat")).unwrap_or_default();
    let keyed = |key: &str| parse_keyed(&cpu, key).unwrap_or(0);
    Ok(v1::StatsReply {
        memory_current_bytes: single("memory.current"),
        memory_limit_bytes: single("memory.max"),
        cpu_usage_us: keyed("usage_usec"),
        cpu_user_us: keyed("user_usec"),
        cpu_system_us: keyed("system_usec"),
        pids_current: single("pids.current"),
        oom_kills: read_oom_kills(dir).unwrap_or(0),
        ..v1::StatsReply::default()
    })
}

/// `oom_kill` of `memory.events` in the cgroup directory `dir`.
pub fn read_oom_kills(dir: &Path) -> io::Result<u64> {
    let text = read_small(&dir.join("memory.events"))?;
    Ok(parse_keyed(&text, "oom_kill").unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_single_max_is_zero() {
        assert_eq!(parse_single("max\n"), Some(0));
        assert_eq!(parse_single("1048576\n"), Some(1_048_576));
        assert_eq!(parse_single("garbage"), None);
    }

    #[test]
    fn parse_keyed_finds_exact_key() {
        let text = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n";
        assert_eq!(parse_keyed(text, "usage_usec"), Some(1500));
        assert_eq!(parse_keyed(text, "system_usec"), Some(500));
        assert_eq!(parse_keyed(text, "usec"), None);
    }

    #[test]
    fn parse_keyed_oom_kill_not_confused_with_oom() {
        let text = "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_keyed(text, "oom_kill"), Some(1));
        assert_eq!(parse_keyed(text, "oom"), Some(2));
    }

    #[test]
    fn read_fake_cgroup_dir() {
        let dir = tempfile::tempdir().unwrap();
        let w = |n: &str, t: &str| std::fs::write(dir.path().join(n), t).unwrap();
        w("memory.current", "4096\n");
        w("memory.max", "max\n");
        w("cpu.stat", "usage_usec 30\nuser_usec 20\nsystem_usec 10\n");
        w("pids.current", "3\n");
        w("memory.events", "oom 1\noom_kill 2\n");
        let stats = read(dir.path()).unwrap();
        assert_eq!(stats.memory_current_bytes, 4096);
        assert_eq!(stats.memory_limit_bytes, 0);
        assert_eq!(
            (stats.cpu_usage_us, stats.cpu_user_us, stats.cpu_system_us),
            (30, 20, 10)
        );
        assert_eq!(stats.pids_current, 3);
        assert_eq!(stats.oom_kills, 2);
    }

    #[test]
    fn read_missing_dir_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let err = read(&dir.path().join("nope")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
