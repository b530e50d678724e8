//! The file systems PID 1 mounts before anything else runs.
//!
//! The plan is a fixed, ordered table so a test can check it line by line. A mount
//! point is created when missing; a mount that fails ends the boot with status 125,
//! except `EBUSY` (already mounted there), which counts as done.

use std::io;
use std::path::{Path, PathBuf};

use crate::syscall::{MountFlags, Syscall};

/// One entry of the mount plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountSpec {
    /// The `source` argument of mount(2) (a name only, for these virtual file systems).
    pub source: &'static str,
    /// The mount point.
    pub target: &'static str,
    /// The file system type.
    pub fstype: &'static str,
    /// `MS_*` flags.
    pub flags: MountFlags,
    /// File-system-specific options.
    pub data: &'static str,
}

const NOSUID_NODEV_NOEXEC: MountFlags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// What gets mounted, in order (each parent before its children).
pub const MOUNT_PLAN: [MountSpec; 8] = [
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "mode=0620,ptmxmode=0666,gid=5",
    },
    MountSpec {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=0755",
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
    MountSpec {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
];

/// Mode for mount points created on the way.
const MOUNT_POINT_MODE: u32 = 0o755;

/// Why the file systems could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A missing mount point could not be created.
    #[error("cannot create mount point {path}: {cause}")]
    CreateMountPoint {
        /// The directory that could not be created.
        path: PathBuf,
        /// What mkdir(2) said.
        cause: io::Error,
    },
    /// mount(2) failed.
    #[error("cannot mount {fstype} on {target}: {cause} (is it enabled in the guest kernel?)")]
    Mount {
        /// The file system type.
        fstype: &'static str,
        /// The mount point.
        target: &'static str,
        /// What mount(2) said.
        cause: io::Error,
    },
}

/// Mounts everything in `plan`, in order, creating mount points as needed.
pub fn mount_all(sys: &mut impl Syscall, plan: &[MountSpec]) -> Result<(), MountError> {
    for spec in plan {
        let target = Path::new(spec.target);
        match sys.create_dir(target, MOUNT_POINT_MODE) {
            Err(cause) if cause.kind() != io::ErrorKind::AlreadyExists => {
                return Err(MountError::CreateMountPoint {
                    path: target.to_owned(),
                    cause,
                });
            }
            _ => {}
        }
        match sys.mount(spec.source, target, spec.fstype, spec.flags, spec.data) {
            Err(cause) if cause.raw_os_error() != Some(libc::EBUSY) => {
                return Err(MountError::Mount {
                    fstype: spec.fstype,
                    target: spec.target,
                    cause,
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// Detaches everything in `plan`, children first, ignoring failures: this runs on
/// the way to power-off, where nothing can be done about them.
pub fn unmount_all(sys: &mut impl Syscall, plan: &[MountSpec]) {
    for spec in plan.iter().rev() {
        let _ = sys.unmount(Path::new(spec.target));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::fake::{Call, FakeSyscall};

    fn mount_call(spec: &MountSpec) -> Call {
        Call::Mount {
            source: spec.source.to_owned(),
            target: spec.target.into(),
            fstype: spec.fstype.to_owned(),
            flags: spec.flags,
            data: spec.data.to_owned(),
        }
    }

    #[test]
    fn mount_plan_covers_contract_file_systems_in_parent_first_order() {
        let targets: Vec<&str> = MOUNT_PLAN.iter().map(|s| s.target).collect();
        assert_eq!(
            targets,
            [
                "/proc",
                "/sys",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/run",
                "/tmp",
                "/sys/fs/cgroup"
            ]
        );
        let devpts = MOUNT_PLAN.iter().find(|s| s.fstype == "devpts").unwrap();
        assert!(devpts.data.contains("ptmxmode=0666"));
        let cgroup = MOUNT_PLAN
            .iter()
            .find(|s| s.target == "/sys/fs/cgroup")
            .unwrap();
        assert_eq!(cgroup.fstype, "cgroup2");
    }

    #[test]
    fn mount_all_creates_each_mount_point_then_mounts_it() {
        let mut sys = FakeSyscall::default();
        mount_all(&mut sys, &MOUNT_PLAN).unwrap();
        let expected: Vec<Call> = MOUNT_PLAN
            .iter()
            .flat_map(|spec| {
                [
                    Call::CreateDir {
                        path: spec.target.into(),
                        mode: 0o755,
                    },
                    mount_call(spec),
                ]
            })
            .collect();
        assert_eq!(sys.calls, expected);
    }

    #[test]
    fn mount_all_existing_mount_point_is_fine() {
        let mut sys = FakeSyscall::default();
        sys.fail_create_dir("/proc", libc::EEXIST);
        mount_all(&mut sys, &MOUNT_PLAN[..1]).unwrap();
        assert_eq!(sys.calls.last(), Some(&mount_call(&MOUNT_PLAN[0])));
    }

    #[test]
    fn mount_all_already_mounted_ebusy_continues() {
        let mut sys = FakeSyscall::default();
        sys.fail_mount("/dev", libc::EBUSY);
        mount_all(&mut sys, &MOUNT_PLAN).unwrap();
        assert_eq!(sys.mount_targets().len(), MOUNT_PLAN.len());
    }

    #[test]
    fn mount_all_failure_stops_with_clear_error() {
        let mut sys = FakeSyscall::default();
        sys.fail_mount("/sys/fs/cgroup", libc::ENODEV);
        let err = mount_all(&mut sys, &MOUNT_PLAN).unwrap_err();
        assert!(matches!(
            err,
            MountError::Mount {
                target: "/sys/fs/cgroup",
                ..
            }
        ));
        let message = err.to_string();
        assert!(
            message.starts_with("cannot mount cgroup2 on /sys/fs/cgroup: "),
            "{message}"
        );
        assert!(message.contains("No such device"), "{message}");
    }

    #[test]
    fn mount_all_failure_skips_later_mounts() {
        let mut sys = FakeSyscall::default();
        sys.fail_mount("/sys", libc::EPERM);
        mount_all(&mut sys, &MOUNT_PLAN).unwrap_err();
        assert_eq!(sys.mount_targets(), ["/proc", "/sys"]);
    }

    #[test]
    fn mount_all_mkdir_failure_is_an_error() {
        let mut sys = FakeSyscall::default();
        sys.fail_create_dir("/run", libc::EROFS);
        let err = mount_all(&mut sys, &MOUNT_PLAN).unwrap_err();
        assert!(matches!(err, MountError::CreateMountPoint { .. }));
        assert!(err
            .to_string()
            .starts_with("cannot create mount point /run: "));
    }

    #[test]
    fn unmount_all_detaches_in_reverse_order() {
        let mut sys = FakeSyscall::default();
        unmount_all(&mut sys, &MOUNT_PLAN[..3]);
        assert_eq!(
            sys.calls,
            vec![
                Call::Unmount("/dev".into()),
                Call::Unmount("/sys".into()),
                Call::Unmount("/proc".into()),
            ]
        );
    }
}
