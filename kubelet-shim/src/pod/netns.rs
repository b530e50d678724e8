//! Network namespaces of CNI pods, and the tap that joins a pod's VM to one.
//!
//! A namespace is made by a short-lived thread that unshares its network namespace
//! and bind-mounts it on an empty file (`<run dir>/netns/<sandbox id>`), which
//! keeps it alive for the CNI plugins, the VMM and teardown. Inside it the plugins
//! make `eth0`; [`NetNs::join_tap`] adds the VM's tap and joins the two with tc
//! ingress redirects both ways (what Kata calls tcfilter): every frame that reaches
//! `eth0` leaves through the tap to the guest, and back, whatever MAC or address the
//! guest uses, with no bridge or NAT in the namespace. The VMM is started inside the
//! namespace ([`NetNs::enter_fd`] between fork and exec) so that it opens the tap
//! by name; its own jail then moves it to an empty namespace, and the tap's
//! descriptor keeps working.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::net;

/// The tap of a CNI pod, in its namespace.
pub const POD_TAP: &str = "tap0";
/// How long one `tc` call may take.
const TC_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("cannot make the network namespace {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter the network namespace {path}: {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot join the pod's {iface} to its VM: {message}")]
    Join { iface: String, message: String },
}

/// A pinned network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs {
    pub path: PathBuf,
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

impl NetNs {
    /// Makes a new network namespace pinned at `path` (whose directory is made).
    pub fn create(path: &Path) -> Result<Self, NetNsError> {
        let err = |source| NetNsError::Create {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(err)?;
        let target = cpath(path);
        let pinned = std::thread::spawn(move || -> io::Result<()> {
            // SAFETY: unshare(2) with a flag: only this thread, which ends right
            // after, moves to the new namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: mount(2) of NUL-terminated paths; a bind mount of this
            // thread's namespace file on the empty file.
            let r = unsafe {
                libc::mount(
                    c"/proc/thread-self/ns/net".as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")));
        if let Err(e) = pinned {
            let _ = std::fs::remove_file(path);
            return Err(err(e));
        }
        let ns = NetNs {
            path: path.to_owned(),
        };
        // Its loopback, up (the plugins' loopback does it too; a list without it
        // must not leave the pod without one).
        let _ = ns.run_in(net::loopback_up);
        Ok(ns)
    }

    /// The namespace pinned at `path` already (made by [`NetNs::create`]).
    pub fn at(path: &Path) -> Self {
        NetNs {
            path: path.to_owned(),
        }
    }

    /// Unpins and removes the namespace file; the namespace goes with its last
    /// user. Removing one that is gone is fine.
    pub fn remove(path: &Path) {
        let c = cpath(path);
        // SAFETY: umount2(2) of a NUL-terminated path, lazily.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_file(path);
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetNsError> {
        let fd = File::open(&self.path).map_err(|source| NetNsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns(2) on a namespace file we opened; only this scoped
                // thread, which ends right after `f`, moves.
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(NetNsError::Enter {
                        path: self.path.clone(),
                        source: io::Error::last_os_error(),
                    });
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetNsError::Enter {
                    path: self.path.clone(),
                    source: io::Error::other("the namespace thread panicked"),
                })
            })
        })
    }

    /// The namespace file, open, for [`enter_fd`] in a child.
    pub fn open(&self) -> Result<File, NetNsError> {
        File::open(&self.path).map_err(|source| NetNsError::Enter {
            path: self.path.clone(),
            source,
        })
    }

    /// Makes the VM's tap (with `iface`'s MTU) and joins it to `iface` both ways.
    pub fn join_tap(&self, iface: &str) -> Result<(), NetNsError> {
        let join = |message: String| NetNsError::Join {
            iface: iface.to_owned(),
            message,
        };
        self.run_in(|| -> Result<(), NetNsError> {
            let mtu = net::link_mtu(iface).map_err(|e| join(format!("{iface}: {e}")))?;
            net::create_link_tap(POD_TAP, Some(mtu)).map_err(|e| join(e.to_string()))
        })??;
        for (from, to) in [(iface, POD_TAP), (POD_TAP, iface)] {
            self.tc(&["qdisc", "add", "dev", from, "ingress"])
                .map_err(&join)?;
            self.tc(&[
                "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
                "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ])
            .map_err(&join)?;
        }
        Ok(())
    }

    /// Runs `tc ARGS` inside the namespace.
    fn tc(&self, args: &[&str]) -> Result<(), String> {
        let ns = self.open().map_err(|e| e.to_string())?;
        let mut cmd = Command::new("tc");
        cmd.args(args)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let fd = ns.as_raw_fd();
        // SAFETY: the closure runs in the child between fork and exec and makes one
        // setns(2) call on a descriptor opened before the fork.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || enter_fd(fd));
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run tc (iproute2): {e}"))?;
        let deadline = std::time::Instant::now() + TC_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "tc {} took longer than {TC_TIMEOUT:?}",
                        args.join(" ")
                    ));
                }
            }
        };
        if status.success() {
            return Ok(());
        }
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = (&mut e).take(4096).read_to_string(&mut err);
        }
        Err(format!("tc {}: {status}: {}", args.join(" "), err.trim()))
    }
}

/// An interface's counters (`/proc/net/dev`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IfaceCounters {
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
}

/// `iface`'s counters in a `/proc/net/dev` text.
pub fn parse_net_dev(text: &str, iface: &str) -> Option<IfaceCounters> {
    text.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        if name.trim() != iface {
            return None;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        (v.len() >= 11).then(|| IfaceCounters {
            rx_bytes: v[0],
            rx_errors: v[2],
            tx_bytes: v[8],
            tx_errors: v[10],
        })
    })
}

impl NetNs {
    /// `iface`'s counters inside the namespace.
    pub fn counters(&self, iface: &str) -> Result<Option<IfaceCounters>, NetNsError> {
        // /proc/thread-self/net is the reading thread's namespace.
        self.run_in(|| {
            std::fs::read_to_string("/proc/thread-self/net/dev")
                .ok()
                .and_then(|t| parse_net_dev(&t, iface))
        })
    }
}

/// Moves the calling process (a child between fork and exec) into the network
/// namespace open at `fd`. Async-signal-safe: one setns(2).
pub fn enter_fd(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: setns(2) with a descriptor and a flag.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_counters_are_parsed_by_interface() {
        let text = "Inter-|   Receive                            |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  eth0: 5000      40    2    0    0     0          0         0     7000      50    3    0    0     0       0          0\n";
        assert_eq!(
            parse_net_dev(text, "eth0"),
            Some(IfaceCounters {
                rx_bytes: 5000,
                rx_errors: 2,
                tx_bytes: 7000,
                tx_errors: 3
            })
        );
        assert_eq!(parse_net_dev(text, "tap0"), None);
    }

    /// Needs root (CI has it) and iproute2's tc.
    #[test]
    fn netns_is_pinned_joined_to_a_tap_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netns/sb1");
        let ns = NetNs::create(&path).unwrap();
        // A veth pair inside stands in for the CNI plugin's eth0.
        let inside = ns
            .run_in(|| {
                Command::new("ip")
                    .args([
                        "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
                    ])
                    .status()
                    .map(|s| s.success())
            })
            .unwrap()
            .unwrap();
        assert!(inside, "ip link add in the namespace");
        ns.join_tap("eth0").unwrap();
        let links = ns
            .run_in(|| Command::new("ip").args(["-o", "link"]).output().unwrap())
            .unwrap();
        let links = String::from_utf8_lossy(&links.stdout).into_owned();
        assert!(links.contains("tap0") && links.contains("eth0"), "{links}");
        let filters = ns
            .run_in(|| {
                Command::new("tc")
                    .args(["filter", "show", "dev", "eth0", "ingress"])
                    .output()
                    .unwrap()
            })
            .unwrap();
        let filters = String::from_utf8_lossy(&filters.stdout).into_owned();
        assert!(
            filters.contains("Egress Redirect to device tap0"),
            "{filters}"
        );
        // The host's namespace has neither.
        let host = Command::new("ip").args(["-o", "link"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&host.stdout).contains("peer0"));
        NetNs::remove(&path);
        assert!(!path.exists());
        assert!(ns.run_in(|| ()).is_err(), "gone");
    }
}
