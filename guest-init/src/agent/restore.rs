//! What a pod template's VM does around its snapshot: Quiesce before it (sync, drop
//! clean caches so the memory file is smaller), and Restored in each clone (fresh
//! entropy and a reseeded CRNG, the wall clock, network and hostname, and the disks
//! attached at the restore).
//!
//! The kernel's boot_id is generated on its first read, so the template never reads
//! it: each clone makes its own from its reseeded CRNG.

use std::path::Path;
use std::time::{Duration, Instant};

use atoll_agent_proto::v1;

use super::net::{self, ConfigureNetworkError};
use crate::syscall::Syscall;

/// Least and most entropy a Restored request carries.
pub const MIN_ENTROPY: usize = 32;
/// See [`MIN_ENTROPY`].
pub const MAX_ENTROPY: usize = 512;
/// How long Restored waits for the disks attached at the restore.
pub const DISK_WAIT: Duration = Duration::from_secs(5);
/// Most disks a Restored request names.
const MAX_DISKS: usize = 16;

/// Why a clone could not take its identity.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The kernel refused the entropy.
    #[error("cannot add entropy: {0}")]
    Entropy(#[source] std::io::Error),
    /// The kernel refused the clock.
    #[error("cannot set the clock: {0}")]
    Clock(#[source] std::io::Error),
    /// Network or hostname.
    #[error(transparent)]
    Network(#[from] ConfigureNetworkError),
    /// A disk did not show up.
    #[error("disk {serial:?} did not appear with a size within {waited:?} of the restore")]
    DiskMissing {
        /// Its serial.
        serial: String,
        /// How long we waited.
        waited: Duration,
    },
    /// Looking for disks failed.
    #[error("cannot look for disk {serial:?}: {source}")]
    Disk {
        /// Its serial.
        serial: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Syncs and drops clean caches before the host snapshots the VM.
pub fn quiesce(ops: &mut dyn Syscall) -> std::io::Result<()> {
    ops.drop_caches()
}

/// Applies a clone's identity; waits at most `disk_wait` for its disks.
pub fn restored(
    ops: &mut dyn Syscall,
    req: &v1::Restored,
    pod_dir: &Path,
    disk_wait: Duration,
) -> Result<(), RestoreError> {
    if !(MIN_ENTROPY..=MAX_ENTROPY).contains(&req.entropy.len()) {
        return Err(RestoreError::Invalid(format!(
            "entropy: {} bytes, give {MIN_ENTROPY} to {MAX_ENTROPY}",
            req.entropy.len()
        )));
    }
    if req.disks.len() > MAX_DISKS {
        return Err(RestoreError::Invalid(format!(
            "disks: {} named, at most {MAX_DISKS}",
            req.disks.len()
        )));
    }
    let realtime = u64::try_from(req.realtime_ns)
        .map(Duration::from_nanos)
        .map_err(|_| RestoreError::Invalid("realtime_ns: before 1970".into()))?;
    // Randomness first: nothing below may draw from the template's CRNG state.
    ops.add_entropy(&req.entropy)
        .map_err(RestoreError::Entropy)?;
    ops.set_realtime(realtime).map_err(RestoreError::Clock)?;
    if let Some(network) = &req.network {
        net::configure(ops, network, pod_dir)?;
    }
    let start = Instant::now();
    for serial in &req.disks {
        loop {
            let sectors = ops
                .disk_sectors(serial)
                .map_err(|source| RestoreError::Disk {
                    serial: serial.clone(),
                    source,
                })?;
            if sectors.is_some_and(|s| s > 0) {
                break;
            }
            if start.elapsed() >= disk_wait {
                return Err(RestoreError::DiskMissing {
                    serial: serial.clone(),
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::fake::FakeSyscall;

    fn request() -> v1::Restored {
        v1::Restored {
            entropy: vec![7; 64],
            realtime_ns: 1_800_000_000_000_000_000,
            network: Some(v1::ConfigureNetwork {
                hostname: "clone-1".into(),
                ..Default::default()
            }),
            disks: vec!["img0".into()],
        }
    }

    #[test]
    fn restored_reseeds_first_then_clock_network_and_waits_for_disks() {
        let dir = tempfile::tempdir().unwrap();
        let mut ops = FakeSyscall {
            disks: vec![("img0".into(), 2048)],
            ..FakeSyscall::default()
        };
        restored(&mut ops, &request(), dir.path(), Duration::ZERO).unwrap();
        assert_eq!(ops.log()[0], "entropy 64");
        assert_eq!(ops.log()[1], "clock 1800000000");
        assert!(
            ops.log().iter().any(|c| c == "hostname clone-1"),
            "{:?}",
            ops.calls
        );
    }

    #[test]
    fn restored_refuses_bad_entropy_and_reports_a_missing_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut ops = FakeSyscall::default();
        let mut req = request();
        req.entropy = vec![1; 8];
        let err = restored(&mut ops, &req, dir.path(), Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("entropy: 8 bytes"), "{err}");
        assert!(ops.calls.is_empty(), "nothing applied");
        req.entropy = vec![1; 32];
        let err = restored(&mut ops, &req, dir.path(), Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, RestoreError::DiskMissing { .. }), "{err}");
        // A disk still at size 0 (its resize not yet seen) is not ready either.
        let mut ops = FakeSyscall {
            disks: vec![("img0".into(), 0)],
            ..FakeSyscall::default()
        };
        let err = restored(&mut ops, &req, dir.path(), Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, RestoreError::DiskMissing { .. }), "{err}");
    }
}
