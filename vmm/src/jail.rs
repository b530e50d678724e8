//! The VMM's confinement once the VM is built and before any guest code runs:
//! what the process no longer needs is taken away for good.
//!
//! - New mount, IPC, UTS and network namespaces (mounts made private). The tap, the
//!   disks, guest memory and `/dev/kvm` are open already; vsock and the API are
//!   Unix sockets by path, which a network namespace does not hide. So the VMM
//!   keeps every device and loses every host network interface, the host's IPC
//!   objects and the ability to change the host's mounts or hostname.
//! - Every capability dropped: effective, permitted, inheritable, ambient and the
//!   bounding set. Root's files stay reachable by ownership (disk swaps, snapshots
//!   into root's directories) but nothing that needs privilege is.
//! - `no_new_privs` (no set-uid or file capabilities through exec), not dumpable
//!   (no core dumps of guest memory, no ptrace by other processes of the same
//!   user), resource limits: no core files, at most [`MAX_FILES`] open files.
//!
//! The seccomp filters (crate::seccomp) allow none of `unshare`, `setns`, `mount`,
//! `capset` or `prctl` afterwards, so none of this can be undone. Not done yet (see
//! issue 11): a private root (pivot_root into the pod directory), a PID namespace,
//! an unprivileged uid per pod and a cgroup leaf.

/// The open-files limit inside the jail: queues' eventfds, disks, vsock connections
/// (the agent's and every host connection) with room to spare.
pub const MAX_FILES: u64 = 4096;

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

/// Enters the jail. Call on the main thread while it is the only thread (namespaces
/// that carry the file-system context cannot be left by one thread of many).
pub fn enter() -> Result<(), JailError> {
    // SAFETY: unshare(2) takes only flags.
    check("unshare", unsafe {
        libc::unshare(
            libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET,
        )
    })?;
    // SAFETY: mount(2) with NULL source/type/data changes the propagation of `/`
    // (recursively) in our new mount namespace only.
    check("making mounts private", unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
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
    })?;
    drop_capabilities()?;
    // SAFETY: prctl(2) with integer arguments only.
    check("setting no_new_privs", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    // SAFETY: as above.
    check("making the process undumpable", unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0)
    })?;
    Ok(())
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn drop_capabilities() -> Result<(), JailError> {
    for cap in 0..=last_cap() {
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

    fn status_field(name: &str) -> String {
        std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            .unwrap_or_default()
    }

    /// Enters the jail in a forked child (the test process keeps its own
    /// namespaces and capabilities) and checks what the child is left with. Needs
    /// root, as CI has.
    #[test]
    fn the_jail_takes_capabilities_namespaces_and_core_dumps_away() {
        let host_net = std::fs::read_link("/proc/self/ns/net").unwrap();
        // SAFETY: the child only runs the jail's syscalls and reads of /proc, then
        // _exits; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match enter() {
                Err(e) => {
                    eprintln!("{e}");
                    10
                }
                Ok(()) if status_field("CapEff:") != "0000000000000000" => 11,
                Ok(()) if status_field("CapBnd:") != "0000000000000000" => 12,
                Ok(()) if status_field("NoNewPrivs:") != "1" => 13,
                Ok(()) if std::fs::read_link("/proc/self/ns/net").ok() == Some(host_net) => 14,
                Ok(()) => {
                    let mut core = libc::rlimit {
                        rlim_cur: 1,
                        rlim_max: 1,
                    };
                    // SAFETY: getrlimit fills the struct.
                    unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut core) };
                    // SAFETY: prctl with integer arguments.
                    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
                    // Once jailed, going back is refused: no namespace, no capability.
                    // SAFETY: unshare(2) takes only flags.
                    let again = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                    if core.rlim_max != 0 {
                        15
                    } else if dumpable != 0 {
                        16
                    } else if again == 0 {
                        17
                    } else {
                        0
                    }
                }
            };
            // SAFETY: _exit is always safe.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "{status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "10 enter failed, 11 CapEff, 12 CapBnd, 13 NoNewPrivs, 14 netns, 15 core, \
             16 dumpable, 17 unshare still allowed"
        );
    }
}
