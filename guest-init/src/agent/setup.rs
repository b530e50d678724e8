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

use crate::syscall::MountFlags;

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

/// The privileged operations of the start-up, so its order is tested without root.
pub trait SetupOps {
    /// Whether this looks like an Atoll guest: the parent is PID 1 and `/` is the
    /// initramfs (ramfs or tmpfs).
    fn in_guest(&mut self) -> bool;
    /// `unshare(CLONE_NEWNS)`.
    fn unshare_mount_ns(&mut self) -> io::Result<()>;
    /// mount(2); empty strings are passed as NULL.
    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()>;
    /// Creates one directory; an existing one is fine.
    fn create_dir(&mut self, path: &Path) -> io::Result<()>;
    /// Creates an empty file (a bind-mount target); an existing one is fine.
    fn create_file(&mut self, path: &Path) -> io::Result<()>;
    /// Whether `path` exists.
    fn exists(&mut self, path: &Path) -> bool;
    /// Whether `path` is a directory.
    fn is_dir(&mut self, path: &Path) -> bool;
    /// chdir(2).
    fn chdir(&mut self, path: &Path) -> io::Result<()>;
    /// chroot(2).
    fn chroot(&mut self, path: &Path) -> io::Result<()>;
    /// Writes `text` to an existing file (a cgroup control file).
    fn write_file(&mut self, path: &Path, text: &str) -> io::Result<()>;
    /// Brings a network interface up.
    fn link_up(&mut self, ifname: &str) -> io::Result<()>;
    /// `prctl(PR_SET_CHILD_SUBREAPER)`: orphaned descendants become our children.
    fn become_subreaper(&mut self) -> io::Result<()>;
}

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
pub fn prepare(ops: &mut impl SetupOps) -> Result<(), SetupError> {
    // On a host this would write the host's cgroup controls: refuse first.
    if !ops.in_guest() {
        return Err(SetupError::NotInGuest);
    }
    switch_root(ops)?;
    for dir in [STATE_ROOT, POD_DIR] {
        ops.create_dir(Path::new(dir))
            .map_err(step(format!("create {dir}")))?;
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

fn switch_root(ops: &mut impl SetupOps) -> Result<(), SetupError> {
    let new_root = Path::new(NEW_ROOT);
    ops.unshare_mount_ns().map_err(step(
        "enter a private mount namespace (unshare CLONE_NEWNS)",
    ))?;
    ops.mount("", Path::new("/"), "", libc::MS_REC | libc::MS_PRIVATE, "")
        .map_err(step("make / private (rprivate)"))?;
    ops.create_dir(new_root)
        .map_err(step(format!("create {NEW_ROOT}")))?;
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
        ops.create_dir(&target)
            .map_err(step(format!("create {}", target.display())))?;
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

fn inside(root: &Path, absolute: &str) -> PathBuf {
    root.join(absolute.trim_start_matches('/'))
}

/// Enables [`CONTROLLERS`] for the children of the cgroup root and of `/atoll`, one
/// at a time so a failure names the missing controller.
fn enable_controllers(ops: &mut impl SetupOps) -> Result<(), SetupError> {
    let root = Path::new(CGROUP_ROOT);
    let parent = root.join(CGROUP_PARENT);
    for controller in CONTROLLERS {
        ops.write_file(&root.join("cgroup.subtree_control"), &format!("+{controller}"))
            .map_err(step(format!(
                "enable the {controller} cgroup controller in {CGROUP_ROOT} (is it in the guest kernel?)"
            )))?;
    }
    ops.create_dir(&parent)
        .map_err(step(format!("create {}", parent.display())))?;
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

/// The real [`SetupOps`].
#[derive(Debug, Default)]
pub struct LinuxSetup;

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `statfs` magic numbers of an initramfs root.
const RAMFS_MAGIC: libc::__fsword_t = 0x8584_58f6;
const TMPFS_MAGIC: libc::__fsword_t = 0x0102_1994;

impl SetupOps for LinuxSetup {
    fn in_guest(&mut self) -> bool {
        // SAFETY: getppid has no arguments.
        let parent = unsafe { libc::getppid() };
        let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
        // SAFETY: the path is a NUL-terminated literal; `fs` is writable storage.
        let rc = unsafe { libc::statfs(c"/".as_ptr(), fs.as_mut_ptr()) };
        if rc == -1 {
            return false;
        }
        // SAFETY: statfs returned 0, so it filled `fs`.
        let fs = unsafe { fs.assume_init() };
        let magic = fs.f_type;
        parent == 1 && (magic == RAMFS_MAGIC || magic == TMPFS_MAGIC)
    }

    fn unshare_mount_ns(&mut self) -> io::Result<()> {
        // SAFETY: unshare has no memory arguments.
        check(unsafe { libc::unshare(libc::CLONE_NEWNS) })
    }

    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()> {
        crate::syscall::mount(source, target, fstype, flags, data)
    }

    fn create_dir(&mut self, path: &Path) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new().mode(0o755).create(path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            other => other,
        }
    }

    fn create_file(&mut self, path: &Path) -> io::Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map(drop)
    }

    fn exists(&mut self, path: &Path) -> bool {
        path.exists()
    }

    fn is_dir(&mut self, path: &Path) -> bool {
        path.is_dir()
    }

    fn chdir(&mut self, path: &Path) -> io::Result<()> {
        std::env::set_current_dir(path)
    }

    fn chroot(&mut self, path: &Path) -> io::Result<()> {
        std::os::unix::fs::chroot(path)
    }

    fn write_file(&mut self, path: &Path, text: &str) -> io::Result<()> {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)?
            .write_all(text.as_bytes())
    }

    fn link_up(&mut self, ifname: &str) -> io::Result<()> {
        super::net::link_up(ifname)
    }

    fn become_subreaper(&mut self) -> io::Result<()> {
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes integer arguments only.
        check(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        not_guest: bool,
        calls: Vec<String>,
        missing: Vec<&'static str>,
        fail: Option<&'static str>,
    }

    impl Recorder {
        fn record(&mut self, call: String) -> io::Result<()> {
            let failed = self.fail.is_some_and(|f| call.starts_with(f));
            self.calls.push(call);
            if failed {
                Err(io::Error::from_raw_os_error(libc::ENOENT))
            } else {
                Ok(())
            }
        }
    }

    impl SetupOps for Recorder {
        fn in_guest(&mut self) -> bool {
            !self.not_guest
        }
        fn unshare_mount_ns(&mut self) -> io::Result<()> {
            self.record("unshare".into())
        }
        fn mount(
            &mut self,
            s: &str,
            t: &Path,
            f: &str,
            flags: MountFlags,
            _: &str,
        ) -> io::Result<()> {
            let kind = if flags & libc::MS_MOVE != 0 {
                "move"
            } else if flags & libc::MS_BIND != 0 {
                "bind"
            } else if flags & libc::MS_PRIVATE != 0 {
                "private"
            } else {
                f
            };
            self.record(format!("mount {kind} {s} {}", t.display()))
        }
        fn create_dir(&mut self, p: &Path) -> io::Result<()> {
            self.record(format!("mkdir {}", p.display()))
        }
        fn create_file(&mut self, p: &Path) -> io::Result<()> {
            self.record(format!("touch {}", p.display()))
        }
        fn exists(&mut self, p: &Path) -> bool {
            !self.missing.iter().any(|m| Path::new(m) == p)
        }
        fn is_dir(&mut self, p: &Path) -> bool {
            self.exists(p)
        }
        fn chdir(&mut self, p: &Path) -> io::Result<()> {
            self.record(format!("chdir {}", p.display()))
        }
        fn chroot(&mut self, p: &Path) -> io::Result<()> {
            self.record(format!("chroot {}", p.display()))
        }
        fn write_file(&mut self, p: &Path, text: &str) -> io::Result<()> {
            self.record(format!("write {} {text}", p.display()))
        }
        fn link_up(&mut self, ifname: &str) -> io::Result<()> {
            self.record(format!("up {ifname}"))
        }
        fn become_subreaper(&mut self) -> io::Result<()> {
            self.record("subreaper".into())
        }
    }

    #[test]
    fn prepare_switches_root_before_state_cgroups_and_loopback() {
        let mut ops = Recorder {
            missing: vec!["/bin"],
            ..Recorder::default()
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
        assert_eq!(ops.calls, expected);
    }

    #[test]
    fn prepare_missing_controller_is_named_and_stops() {
        let mut ops = Recorder {
            fail: Some("write /sys/fs/cgroup/cgroup.subtree_control +memory"),
            ..Recorder::default()
        };
        let err = prepare(&mut ops).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot enable the memory cgroup controller in /sys/fs/cgroup"),
            "{err}"
        );
        assert!(!ops.calls.iter().any(|c| c == "up lo"));
    }

    #[test]
    fn prepare_outside_a_guest_refuses_before_any_change() {
        let mut ops = Recorder {
            not_guest: true,
            ..Recorder::default()
        };
        let err = prepare(&mut ops).unwrap_err();
        assert!(matches!(err, SetupError::NotInGuest));
        assert!(ops.calls.is_empty());
    }

    #[test]
    fn prepare_failed_unshare_does_not_touch_mounts() {
        let mut ops = Recorder {
            fail: Some("unshare"),
            ..Recorder::default()
        };
        let err = prepare(&mut ops).unwrap_err();
        assert!(err.to_string().contains("CLONE_NEWNS"), "{err}");
        assert_eq!(ops.calls, ["unshare"]);
    }
}
