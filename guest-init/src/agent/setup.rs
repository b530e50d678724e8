//! What the agent does before it listens: its own root, cgroups, state directories,
//! loopback.
//!
//! Why a new root: the guest's root is the initramfs, i.e. the kernel's `rootfs`
//! mount, which has no parent mount; `pivot_root` (libcontainer's way into a
//! container's root) refuses with EINVAL when the caller's root is such a mount. PID 1
//! keeps the initramfs root (its boot path stays as it is); the agent, in its own
//! mount namespace, builds a tmpfs root holding bind mounts of what it needs, moves
//! it over `/` and `chroot`s into it (the switch_root technique). Its root is then a
//! mount on top of `rootfs`, so containers created from the agent can `pivot_root`.
//! This must run while the agent is single-threaded (`unshare(CLONE_NEWNS)` fails in
//! a process whose threads share its `fs_struct`).
//!
//! PID 1 has already mounted /proc, /sys, /sys/fs/cgroup (cgroup2), /dev, /dev/pts
//! (`ptmxmode=0666`; every devpts mount is its own instance on current kernels),
//! /dev/shm, /run and /tmp (see `crate::mounts`); the agent's root binds them all.

use std::io;
use std::path::{Path, PathBuf};

use crate::syscall::Syscall;

/// Where the agent's new root is built (a directory of the initramfs).
pub const NEW_ROOT: &str = "/.agent-root";
/// Directories of the initramfs root the agent's root binds (recursively).
pub const BIND_DIRS: [&str; 6] = ["/proc", "/sys", "/dev", "/run", "/tmp", "/bin"];
/// Files bound in the same way (`/init` is the agent's own binary).
pub const BIND_FILES: [&str; 1] = ["/init"];
/// The runtime's state root and the pod's files under it.
pub const STATE_ROOT: &str = "/run/atoll";
/// Pod-wide files (`resolv.conf`, `hosts`, `hostname`).
pub const POD_DIR: &str = "/run/atoll/pod";
/// cgroup v2 root, and the parent of every container's cgroup (`/atoll/<id>`).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The runtime's cgroupsPath parent, below [`CGROUP_ROOT`].
pub const CGROUP_PARENT: &str = "atoll";
/// Controllers every container needs (limits and stats).
pub const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// A start-up step failed; the agent cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Not run by PID 1 of an Atoll guest.
    #[error("refusing to run: the agent runs only as PID 1's command in an Atoll guest (`/init agent`), whose root is the initramfs")]
    NotInGuest,
    /// One operation failed.
    #[error("cannot {action}: {cause}")]
    Step {
        /// What was being done.
        action: String,
        /// What the kernel said.
        cause: io::Error,
    },
}

fn step(action: impl Into<String>) -> impl FnOnce(io::Error) -> SetupError {
    let action = action.into();
    move |cause| SetupError::Step { action, cause }
}

/// Builds the agent's environment (see the module comment), in order.
pub fn prepare(ops: &mut impl Syscall) -> Result<(), SetupError> {
    // On a host this would write the host's cgroup controls: refuse first.
    if !ops.in_guest() {
        return Err(SetupError::NotInGuest);
    }
    switch_root(ops)?;
    for dir in [STATE_ROOT, POD_DIR] {
        ensure_dir(ops, Path::new(dir)).map_err(step(format!("create {dir}")))?;
    }
    enable_controllers(ops)?;
    ops.link_up("lo")
        .map_err(step("bring the loopback interface up"))?;
    // The guest's OOM killer must pick a container's process, never the agent that
    // reports it (PID 1 the kernel never picks). Containers are set back to 0.
    ops.write_file(Path::new("/proc/self/oom_score_adj"), "-1000")
        .map_err(step("protect the agent from the OOM killer"))?;
    // Containers are created in a forked child (`container::forked`) that exits
    // once they exist: their processes must then become the agent's, not PID 1's.
    ops.become_subreaper().map_err(step(
        "become the reaper of container processes (PR_SET_CHILD_SUBREAPER)",
    ))?;
    Ok(())
}

fn switch_root(ops: &mut impl Syscall) -> Result<(), SetupError> {
    let new_root = Path::new(NEW_ROOT);
    ops.unshare_mount_ns().map_err(step(
        "enter a private mount namespace (unshare CLONE_NEWNS)",
    ))?;
    ops.mount("", Path::new("/"), "", libc::MS_REC | libc::MS_PRIVATE, "")
        .map_err(step("make / private (rprivate)"))?;
    ensure_dir(ops, new_root).map_err(step(format!("create {NEW_ROOT}")))?;
    ops.mount(
        "agent-root",
        new_root,
        "tmpfs",
        libc::MS_NOSUID,
        "mode=0755",
    )
    .map_err(step(format!("mount a tmpfs on {NEW_ROOT}")))?;
    for dir in BIND_DIRS {
        let source = Path::new(dir);
        if !ops.is_dir(source) {
            continue;
        }
        let target = inside(new_root, dir);
        ensure_dir(ops, &target).map_err(step(format!("create {}", target.display())))?;
        ops.mount(dir, &target, "", libc::MS_BIND | libc::MS_REC, "")
            .map_err(step(format!("bind {dir} into the agent's root")))?;
    }
    for file in BIND_FILES {
        if !ops.exists(Path::new(file)) {
            continue;
        }
        let target = inside(new_root, file);
        ops.create_file(&target)
            .map_err(step(format!("create {}", target.display())))?;
        ops.mount(file, &target, "", libc::MS_BIND, "")
            .map_err(step(format!("bind {file} into the agent's root")))?;
    }
    ops.chdir(new_root)
        .map_err(step(format!("enter {NEW_ROOT}")))?;
    ops.mount(".", Path::new("/"), "", libc::MS_MOVE, "")
        .map_err(step(format!("move {NEW_ROOT} over /")))?;
    ops.chroot(Path::new("."))
        .map_err(step("chroot into the agent's root"))?;
    ops.chdir(Path::new("/")).map_err(step("enter /"))?;
    Ok(())
}

/// Creates one directory (mode 0755); one that exists already is fine.
fn ensure_dir(ops: &mut impl Syscall, path: &Path) -> io::Result<()> {
    match ops.create_dir(path, 0o755) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

fn inside(root: &Path, absolute: &str) -> PathBuf {
    root.join(absolute.trim_start_matches('/'))
}

/// Enables [`CONTROLLERS`] for the children of the cgroup root and of `/atoll`, one
/// at a time so a failure names the missing controller.
fn enable_controllers(ops: &mut impl Syscall) -> Result<(), SetupError> {
    let root = Path::new(CGROUP_ROOT);
    let parent = root.join(CGROUP_PARENT);
    for controller in CONTROLLERS {
        ops.write_file(&root.join("cgroup.subtree_control"), &format!("+{controller}"))
            .map_err(step(format!(
                "enable the {controller} cgroup controller in {CGROUP_ROOT} (is it in the guest kernel?)"
            )))?;
    }
    ensure_dir(ops, &parent).map_err(step(format!("create {}", parent.display())))?;
    for controller in CONTROLLERS {
        ops.write_file(
            &parent.join("cgroup.subtree_control"),
            &format!("+{controller}"),
        )
        .map_err(step(format!(
            "enable the {controller} cgroup controller in {}",
            parent.display()
        )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::fake::FakeSyscall;

    #[test]
    fn prepare_switches_root_before_state_cgroups_and_loopback() {
        let mut ops = FakeSyscall {
            missing: vec!["/bin".into()],
            ..FakeSyscall::default()
        };
        prepare(&mut ops).unwrap();
        let expected = [
            "unshare",
            "mount private  /",
            "mkdir /.agent-root",
            "mount tmpfs agent-root /.agent-root",
            "mkdir /.agent-root/proc",
            "mount bind /proc /.agent-root/proc",
            "mkdir /.agent-root/sys",
            "mount bind /sys /.agent-root/sys",
            "mkdir /.agent-root/dev",
            "mount bind /dev /.agent-root/dev",
            "mkdir /.agent-root/run",
            "mount bind /run /.agent-root/run",
            "mkdir /.agent-root/tmp",
            "mount bind /tmp /.agent-root/tmp",
            "touch /.agent-root/init",
            "mount bind /init /.agent-root/init",
            "chdir /.agent-root",
            "mount move . /",
            "chroot .",
            "chdir /",
            "mkdir /run/atoll",
            "mkdir /run/atoll/pod",
            "write /sys/fs/cgroup/cgroup.subtree_control +cpu",
            "write /sys/fs/cgroup/cgroup.subtree_control +memory",
            "write /sys/fs/cgroup/cgroup.subtree_control +pids",
            "mkdir /sys/fs/cgroup/atoll",
            "write /sys/fs/cgroup/atoll/cgroup.subtree_control +cpu",
            "write /sys/fs/cgroup/atoll/cgroup.subtree_control +memory",
            "write /sys/fs/cgroup/atoll/cgroup.subtree_control +pids",
            "up lo",
            "write /proc/self/oom_score_adj -1000",
            "subreaper",
        ];
        assert_eq!(ops.log(), expected);
    }

    #[test]
    fn prepare_missing_controller_is_named_and_stops() {
        let mut ops = FakeSyscall::default();
        ops.fail(
            "write /sys/fs/cgroup/cgroup.subtree_control +memory",
            libc::ENOENT,
        );
        let err = prepare(&mut ops).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot enable the memory cgroup controller in /sys/fs/cgroup"),
            "{err}"
        );
        assert!(!ops.log().iter().any(|c| c == "up lo"));
    }

    #[test]
    fn prepare_outside_a_guest_refuses_before_any_change() {
        let mut ops = FakeSyscall {
            in_guest: false,
            ..FakeSyscall::default()
        };
        let err = prepare(&mut ops).unwrap_err();
        assert!(matches!(err, SetupError::NotInGuest));
        assert!(ops.calls.is_empty());
    }

    #[test]
    fn prepare_failed_unshare_does_not_touch_mounts() {
        let mut ops = FakeSyscall::default();
        ops.fail("unshare", libc::EPERM);
        let err = prepare(&mut ops).unwrap_err();
        assert!(err.to_string().contains("CLONE_NEWNS"), "{err}");
        assert_eq!(ops.log(), ["unshare"]);
    }
}
