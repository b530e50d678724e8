//! The VMM's confinement once the VM is built and before any guest code runs:
//! what the process no longer needs is taken away for good.
//!
//! - New mount, IPC, UTS and network namespaces. The tap, the disks, guest memory,
//!   `/dev/kvm` and the sockets are open already, so the VMM keeps every device and
//!   loses every host network interface, the host's IPC objects and hostname.
//! - A root of its own: an empty, read-only tmpfs (pivot_root, the host's tree
//!   detached; on a host that runs from its initial ramfs, which cannot be pivoted
//!   away, the tmpfs is moved over `/` and chrooted into, as switch_root does). Files the VMM is asked to write or serve later (snapshots, the
//!   working set, a drive's new backing file) arrive as descriptors over the API
//!   socket (crate::api). The only host directories it still reaches are the ones
//!   of its vsock sockets, read-only at `/run/<n>`, for the guest's connections to
//!   `<uds>_<port>` listeners ([`inside`] maps a host path to its jailed name).
//!   No `/proc`, no `/dev`, no other pod's files or sockets.
//! - With [`JailConfig::user`], an unprivileged uid and gid of its own (no
//!   supplementary groups): other processes, even other pods' VMMs, cannot be
//!   signalled or traced, and a `<uds>_<port>` listener must let that uid connect.
//! - Every capability dropped: effective, permitted, inheritable, ambient and the
//!   bounding set.
//! - `no_new_privs` (no set-uid or file capabilities through exec), not dumpable
//!   (no core dumps of guest memory, no ptrace by other processes of the same
//!   user), resource limits: no core files, at most [`MAX_FILES`] open files.
//!
//! The seccomp filters (crate::seccomp) allow none of `unshare`, `setns`, `mount`,
//! `pivot_root`, `setuid` or `prctl` afterwards, so none of this can be undone. The
//! VMM stays in the host's PID namespace: a process that owns a KVM VM cannot move
//! into a new one (only its children could), and without `/proc` and under its own
//! uid it neither sees nor reaches other processes. Its cgroup is the pod
//! library's business (it starts the VMM inside the pod's leaf).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// The open-files limit inside the jail: queues' eventfds, disks, vsock connections
/// (the agent's and every host connection) with room to spare.
pub const MAX_FILES: u64 = 4096;

/// Where the jail's root is assembled before the pivot (in the VMM's own mount
/// namespace, so the host never sees it).
const STAGING: &str = "/tmp";

/// How to confine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JailConfig {
    /// Run as this (uid, gid) from the jail on; `None` stays uid 0 (without any
    /// capability).
    pub user: Option<(u32, u32)>,
}

/// Why the jail could not be entered.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A step failed; the VM does not run unconfined by accident.
    #[error("cannot confine the VMM ({step}); atoll-vmm needs root (CAP_SYS_ADMIN) for its namespaces; --no-jail runs it unconfined, for debugging only")]
    Step {
        /// Which step.
        step: &'static str,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// A directory to keep in reach is not one.
    #[error("cannot keep {path} in the VMM's jail: {source}")]
    Reach {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn check(step: &'static str, r: libc::c_int) -> Result<(), JailError> {
    if r != 0 {
        return Err(JailError::Step {
            step,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn cstr(p: &Path) -> CString {
    // Paths we build or open never hold NUL bytes; an empty string fails cleanly.
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

static ENTERED: AtomicBool = AtomicBool::new(false);
static REACH: OnceLock<Vec<PathBuf>> = OnceLock::new();
/// The working directory before the jail, against which relative host paths are
/// read afterwards.
static CWD: OnceLock<PathBuf> = OnceLock::new();

/// Whether this process is jailed (and sees no host files).
pub fn entered() -> bool {
    ENTERED.load(Ordering::Relaxed)
}

/// The name of host path `host` for this process: itself outside the jail, its
/// place under `/run/<n>` inside it, `None` when the jail does not reach it.
pub fn inside(host: &Path) -> Option<PathBuf> {
    if !entered() {
        return Some(host.to_path_buf());
    }
    let host = CWD.get()?.join(host);
    REACH.get()?.iter().enumerate().find_map(|(n, dir)| {
        host.strip_prefix(dir)
            .ok()
            .map(|rest| Path::new("/run").join(n.to_string()).join(rest))
    })
}

/// Enters the jail, keeping the directories `reach` (read-only) in reach. Call
/// on the main thread while it is the only thread (a mount namespace cannot be
/// left by one thread of many), or the only one besides a uffd restore's page
/// server, which confines itself after (crate::vstate::uffd).
pub fn enter(cfg: &JailConfig, reach: &[PathBuf]) -> Result<(), JailError> {
    // What needs the host's /proc is read or opened now.
    let last = last_cap();
    let _ = crate::vstate::memory::pagemap();
    let _ = CWD.set(std::env::current_dir().unwrap_or_default());
    // SAFETY: unshare(2) takes only flags.
    check("unshare", unsafe {
        libc::unshare(
            libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET,
        )
    })?;
    mount(
        None,
        "/",
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        "making mounts private",
    )?;
    // Opened in the new namespace (a bind takes its source from there), before
    // the staging tmpfs can hide any of them.
    let mut dirs: Vec<(PathBuf, OwnedFd)> = Vec::new();
    for dir in reach {
        let dir = std::path::absolute(dir).map_err(|source| JailError::Reach {
            path: dir.clone(),
            source,
        })?;
        if dirs.iter().any(|(d, _)| *d == dir) {
            continue;
        }
        let fd = rustix::fs::open(
            &dir,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| JailError::Reach {
            path: dir.clone(),
            source: e.into(),
        })?;
        dirs.push((dir, fd));
    }
    new_root(&dirs)?;
    limit_resources()?;
    drop_bounding_set(last)?;
    if let Some((uid, gid)) = cfg.user {
        become_user(uid, gid)?;
    }
    drop_capabilities()?;
    // SAFETY: prctl(2) with integer arguments only.
    check("setting no_new_privs", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    // SAFETY: as above.
    check("making the process undumpable", unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0)
    })?;
    let _ = REACH.set(dirs.into_iter().map(|(d, _)| d).collect());
    ENTERED.store(true, Ordering::Relaxed);
    Ok(())
}

fn mount(
    source: Option<&Path>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    step: &'static str,
) -> Result<(), JailError> {
    let source = source.map(cstr);
    let target = cstr(Path::new(target));
    let fstype = fstype.map(|t| CString::new(t).unwrap_or_default());
    let data = c"mode=0555,size=16k";
    // SAFETY: every pointer is a live NUL-terminated string or NULL; mount(2)
    // changes mounts of this process's own (new) mount namespace only.
    check(step, unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |t| t.as_ptr()),
            flags,
            if fstype.is_some() {
                data.as_ptr().cast()
            } else {
                std::ptr::null()
            },
        )
    })
}

/// Builds the new root (a tmpfs with `run/<n>` bound to each kept directory),
/// pivots into it, lets the host's tree go and makes the root read-only.
fn new_root(dirs: &[(PathBuf, OwnedFd)]) -> Result<(), JailError> {
    const SECURE: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        None,
        STAGING,
        Some("tmpfs"),
        SECURE,
        "mounting the jail's root",
    )?;
    let run = Path::new(STAGING).join("run");
    let mkdir = |p: &Path| {
        std::fs::create_dir(p).map_err(|source| JailError::Step {
            step: "making the jail's directories",
            source,
        })
    };
    mkdir(&run)?;
    for (n, (_, fd)) in dirs.iter().enumerate() {
        let at = run.join(n.to_string());
        mkdir(&at)?;
        let from = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let at = at.to_string_lossy().into_owned();
        mount(
            Some(&from),
            &at,
            None,
            libc::MS_BIND,
            "binding a socket directory",
        )?;
        mount(
            None,
            &at,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | SECURE,
            "making a socket directory read-only",
        )?;
    }
    std::env::set_current_dir(STAGING).map_err(|source| JailError::Step {
        step: "entering the jail's root",
        source,
    })?;
    let dot = c".";
    // SAFETY: pivot_root(2) with "." for both: the current directory (the new
    // tmpfs) becomes the root and the old root is stacked on it, to be detached.
    let pivoted = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    if pivoted == 0 {
        // SAFETY: umount2(2) of the old root stacked on ".", lazily.
        check("detaching the host's tree", unsafe {
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH)
        })?;
    } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // The host runs from its initial ramfs, which cannot be pivoted away
        // (e.g. the nested test node): move the new root over `/` and chroot
        // into it, as switch_root does. The ramfs stays underneath, out of reach
        // without the capabilities (CAP_SYS_ADMIN, CAP_SYS_CHROOT) dropped below
        // and the mount calls the seccomp filters refuse.
        tracing::debug!("pivot_root refused (initial ramfs root): moving the jail's root over /");
        detach_host_mounts()?;
        mount(
            Some(Path::new(".")),
            "/",
            None,
            libc::MS_MOVE,
            "moving the jail's root",
        )?;
        // SAFETY: chroot(2) of a NUL-terminated path.
        check("entering the jail's root", unsafe {
            libc::chroot(dot.as_ptr())
        })?;
    } else {
        return Err(JailError::Step {
            step: "pivot_root",
            source: std::io::Error::last_os_error(),
        });
    }
    std::env::set_current_dir("/").map_err(|source| JailError::Step {
        step: "entering the jail's root",
        source,
    })?;
    mount(
        None,
        "/",
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | SECURE,
        "making the jail's root read-only",
    )
}

/// A mount point as `/proc/self/mountinfo` writes it (octal escapes such as
/// `\040` for a space undone).
fn unescape_mount_point(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// The mount points of this mount namespace (`/proc/self/mountinfo`, field 5).
fn mount_points() -> std::io::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_point)
        .collect())
}

/// Where pivot_root cannot detach the host's tree, detaches every host mount but
/// `/` and the jail's own (under [`STAGING`]) before the move: this namespace's
/// copies of them would otherwise stay reachable underneath and keep alive what
/// they pin (other pods' network namespaces among them).
fn detach_host_mounts() -> Result<(), JailError> {
    let points = mount_points().map_err(|source| JailError::Step {
        step: "reading the mount table",
        source,
    })?;
    let staging = Path::new(STAGING);
    let mut points: Vec<PathBuf> = points
        .into_iter()
        .filter(|p| p != Path::new("/") && !p.starts_with(staging))
        .collect();
    // Deepest first; a mount already gone with its parent is fine.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for p in points {
        let c = cstr(&p);
        // SAFETY: umount2(2) of a NUL-terminated path, lazily.
        let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let e = std::io::Error::last_os_error();
        if r != 0 && !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
            return Err(JailError::Step {
                step: "detaching the host's mounts",
                source: e,
            });
        }
    }
    Ok(())
}

fn limit_resources() -> Result<(), JailError> {
    let core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit(2) reads the struct.
    check("limiting core files", unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &core)
    })?;
    let mut files = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) fills the struct.
    check("reading the open-files limit", unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut files)
    })?;
    let files = libc::rlimit {
        rlim_cur: files.rlim_cur.min(MAX_FILES),
        rlim_max: files.rlim_max.min(MAX_FILES),
    };
    // SAFETY: setrlimit(2) reads the struct.
    check("limiting open files", unsafe {
        libc::setrlimit(libc::RLIMIT_NOFILE, &files)
    })
}

/// Becomes `uid`:`gid` with no supplementary groups, for real, effective and saved
/// ids (so there is no way back to 0).
fn become_user(uid: u32, gid: u32) -> Result<(), JailError> {
    // SAFETY: setgroups(2) with an empty list reads no memory.
    check("dropping supplementary groups", unsafe {
        libc::setgroups(0, std::ptr::null())
    })?;
    // SAFETY: setresgid(2) takes integers.
    check("setting the jail's gid", unsafe {
        libc::setresgid(gid, gid, gid)
    })?;
    // SAFETY: setresuid(2) takes integers.
    check("setting the jail's uid", unsafe {
        libc::setresuid(uid, uid, uid)
    })
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Empties the bounding set (needs CAP_SETPCAP: before the uid changes).
fn drop_bounding_set(last: u32) -> Result<(), JailError> {
    for cap in 0..=last {
        // SAFETY: prctl(2) with integer arguments. EINVAL for a number this kernel
        // does not know is fine (nothing to drop).
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(JailError::Step {
                step: "dropping the capability bounding set",
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Clears the ambient, effective, permitted and inheritable sets.
fn drop_capabilities() -> Result<(), JailError> {
    // SAFETY: prctl(2) with integer arguments.
    check("clearing ambient capabilities", unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })?;
    /// struct __user_cap_header_struct.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    /// struct __user_cap_data_struct.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset(2) reads a version-3 header and two data structs, all live.
    check("dropping capabilities", unsafe {
        libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `child` in a forked child after entering the jail; returns its exit
    /// code (the test process keeps its namespaces, root and capabilities).
    fn in_jail(cfg: &JailConfig, reach: &[PathBuf], child: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child only runs the jail's syscalls and the checks, then
        // _exits; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match enter(cfg, reach) {
                Err(e) => {
                    // Straight to fd 2: the harness captures eprintln! in memory,
                    // which this child never hands back.
                    let msg = format!("jail test: {e}: {:?}\n", std::error::Error::source(&e));
                    // SAFETY: write(2) of a live buffer.
                    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
                    10
                }
                Ok(()) => child(),
            };
            // SAFETY: _exit is always safe.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "{status:#x}");
        libc::WEXITSTATUS(status)
    }

    /// What capget(2) says of this process: (effective, permitted) of the low word.
    fn capabilities() -> (u32, u32) {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        let header = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let mut data = [0u32; 6];
        // SAFETY: capget(2) writes two 3-word structs into `data`.
        unsafe { libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) };
        (data[0] | data[3], data[1] | data[4])
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape_mount_point("/run/a\\040b"), Path::new("/run/a b"));
        assert_eq!(unescape_mount_point("/x\\134y"), Path::new("/x\\y"));
        assert_eq!(unescape_mount_point("/odd\\9"), Path::new("/odd\\9"));
        assert!(mount_points().unwrap().contains(&PathBuf::from("/")));
    }

    /// Needs root, as CI has.
    #[test]
    fn the_jail_takes_capabilities_namespaces_and_core_dumps_away() {
        let host_net = std::fs::metadata("/proc/self/ns/net").unwrap();
        let code = in_jail(&JailConfig::default(), &[], || {
            use std::os::unix::fs::MetadataExt;
            let mut core = libc::rlimit {
                rlim_cur: 1,
                rlim_max: 1,
            };
            // SAFETY: getrlimit fills the struct.
            unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut core) };
            // SAFETY: prctl with integer arguments.
            let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
            // SAFETY: as above.
            let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
            // SAFETY: as above; 21 is CAP_SYS_ADMIN.
            let bounding = unsafe { libc::prctl(libc::PR_CAPBSET_READ, 21, 0, 0, 0) };
            // Once jailed, going back is refused: no namespace, no capability.
            // SAFETY: unshare(2) takes only flags.
            let again = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            // The network namespace: a new socket's namespace is not the host's
            // (no /proc in the jail to ask).
            let sock = std::net::UdpSocket::bind("127.0.0.1:0");
            let _ = host_net.ino();
            match () {
                () if capabilities() != (0, 0) => 11,
                () if bounding != 0 => 12,
                () if nnp != 1 => 13,
                () if sock.is_err() => 14,
                () if core.rlim_max != 0 => 15,
                () if dumpable != 0 => 16,
                () if again == 0 => 17,
                () => 0,
            }
        });
        assert_eq!(
            code, 0,
            "10 enter failed, 11 capabilities, 12 bounding set, 13 NoNewPrivs, 14 no loopback \
             in the new netns, 15 core, 16 dumpable, 17 unshare still allowed"
        );
    }

    #[test]
    fn the_jail_root_is_empty_but_for_the_kept_directories_read_only() {
        let kept = tempfile::tempdir().unwrap();
        std::fs::write(kept.path().join("mine"), b"ours").unwrap();
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("theirs"), b"secret").unwrap();
        let kept_dir = kept.path().to_path_buf();
        let other_file = other.path().join("theirs");
        let cfg = JailConfig {
            user: Some((65534, 65534)),
        };
        let code = in_jail(&cfg, std::slice::from_ref(&kept_dir), || {
            let root: Vec<_> = std::fs::read_dir("/")
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
                .unwrap_or_default();
            let mine = inside(&kept_dir.join("mine"));
            // SAFETY: setuid(2) with an integer; it must fail.
            let back_to_root = unsafe { libc::setuid(0) };
            match () {
                () if root != [std::ffi::OsString::from("run")] => 21,
                () if mine.as_deref() != Some(Path::new("/run/0/mine")) => 22,
                () if std::fs::read("/run/0/mine").ok().as_deref() != Some(&b"ours"[..]) => 23,
                () if std::fs::write("/run/0/new", b"x").is_ok() => 24,
                () if std::fs::write("/new", b"x").is_ok() => 25,
                () if inside(&other_file).is_some() => 26,
                () if std::fs::read(&other_file).is_ok() => 27,
                () if std::fs::read("/etc/passwd").is_ok() => 28,
                () if std::fs::read("/proc/1/environ").is_ok() => 29,
                // SAFETY: getuid/getgid/getgroups read ids only.
                () if unsafe { libc::getuid() } != 65534 => 30,
                // SAFETY: as above.
                () if unsafe { libc::getgid() } != 65534 => 30,
                // SAFETY: as above.
                () if unsafe { libc::getgroups(0, std::ptr::null_mut()) } != 0 => 31,
                () if back_to_root == 0 => 32,
                () if capabilities() != (0, 0) => 33,
                () => 0,
            }
        });
        assert_eq!(
            code, 0,
            "10 enter failed, 21 root not just run/, 22 kept path not mapped, 23 kept file \
             unreadable, 24 kept dir writable, 25 root writable, 26/27 another directory \
             reachable, 28 host /etc, 29 host /proc, 30 uid/gid, 31 groups, 32 setuid(0) \
             allowed, 33 capabilities"
        );
    }
}
