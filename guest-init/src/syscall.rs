//! Everything `atoll-init` asks of the operating system, behind one trait.
//!
//! PID 1 mounts file systems, talks to the VMM through I/O ports, spawns and reaps
//! processes and finally powers the machine off; the agent switches its root,
//! enables cgroup controllers, configures the pod's network, renews a restored
//! clone's entropy and clock, and mounts container root file systems. None of that
//! can run in a unit test (no root, and a test process is not PID 1), so all of it is
//! written against the one trait [`Syscall`]: [`LinuxSyscall`] does the real work,
//! and one recording fake (tests only, `fake.rs`) scripts answers and records calls.
//! (libcontainer, which creates the containers themselves, has its own.)

mod linux;
mod netdev;

#[cfg(test)]
pub(crate) mod fake;

use std::ffi::OsString;
use std::io;
use std::path::Path;
use std::time::Duration;

pub use crate::agent::net::{Cidr, RoutePlan};
pub use linux::{rename_exchange, LinuxSyscall};
/// Mount flags (`MS_*`), as passed to mount(2).
pub type MountFlags = libc::c_ulong;

/// One result of a non-blocking `waitpid(-1, ..., WNOHANG)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaped {
    /// A child ended; `status` is the raw wait status.
    Child {
        /// The child's process id.
        pid: libc::pid_t,
        /// The raw wait status (decode with [`crate::status::from_wait_status`]).
        status: libc::c_int,
    },
    /// Children exist but none has ended yet.
    NoneReady,
    /// There are no children at all (ECHILD).
    NoChildren,
}

/// How [`Syscall::reboot`] should end the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootCmd {
    /// `RB_POWER_OFF`.
    PowerOff,
    /// `RB_AUTOBOOT`: a restart, which `reboot=k` + `-no-reboot` turn into an exit.
    Restart,
}

/// The operating-system effects of PID 1 and the agent.
///
/// Methods return raw `io::Error`s (an errno); callers wrap them in the error enum of
/// the operation they were doing.
pub trait Syscall: Send {
    // Files and mounts.

    /// Creates one directory (not its parents) with `mode`; `EEXIST` is an error here.
    fn create_dir(&mut self, path: &Path, mode: u32) -> io::Result<()>;

    /// Creates an empty file (a bind-mount target); an existing one is kept as it is.
    fn create_file(&mut self, path: &Path) -> io::Result<()>;

    /// Writes `text` to an existing file (a cgroup or `/proc` control file).
    fn write_file(&mut self, path: &Path, text: &str) -> io::Result<()>;

    /// Whether `path` exists.
    fn exists(&mut self, path: &Path) -> bool;

    /// Whether `path` is a directory.
    fn is_dir(&mut self, path: &Path) -> bool;

    /// The size in 512-byte sectors of the virtio-blk disk whose serial is `serial`
    /// (read from the device, never a stale cache), if one is attached.
    fn disk_sectors(&mut self, serial: &str) -> io::Result<Option<u64>>;

    /// mount(2); an empty `source`, `fstype` or `data` is passed as NULL (what a
    /// bind, a move or a file system without options wants).
    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()>;

    /// Lazily detaches the mount at `target` (`umount2(MNT_DETACH)`).
    fn unmount(&mut self, target: &Path) -> io::Result<()>;

    /// `unshare(CLONE_NEWNS)`: a private mount namespace.
    fn unshare_mount_ns(&mut self) -> io::Result<()>;

    /// chdir(2).
    fn chdir(&mut self, path: &Path) -> io::Result<()>;

    /// chroot(2).
    fn chroot(&mut self, path: &Path) -> io::Result<()>;

    /// sync(2).
    fn sync(&mut self);

    /// sync(2), then drops clean page, dentry and inode caches.
    fn drop_caches(&mut self) -> io::Result<()>;

    // The machine.

    /// Whether this looks like an Atoll guest's agent: the parent is PID 1 and `/` is
    /// the initramfs (ramfs or tmpfs).
    fn in_guest(&mut self) -> bool;

    /// Grants this process access to one I/O port (`ioperm`).
    fn enable_port(&mut self, port: u16) -> io::Result<()>;

    /// Writes one byte to an I/O port previously enabled with [`Syscall::enable_port`].
    fn outb(&mut self, port: u16, value: u8) -> io::Result<()>;

    /// reboot(2). Returns only if the kernel refused.
    fn reboot(&mut self, cmd: RebootCmd) -> io::Result<()>;

    /// Time since boot (`CLOCK_BOOTTIME`).
    fn uptime(&mut self) -> io::Result<Duration>;

    /// clock_settime(CLOCK_REALTIME).
    fn set_realtime(&mut self, since_epoch: Duration) -> io::Result<()>;

    /// Credits `bytes` to the kernel's entropy pool (RNDADDENTROPY) and reseeds the
    /// CRNG from it (RNDRESEEDCRNG).
    fn add_entropy(&mut self, bytes: &[u8]) -> io::Result<()>;

    /// The kernel command line (`/proc/cmdline`).
    fn kernel_cmdline(&mut self) -> io::Result<String>;

    /// Makes sure fds 0, 1 and 2 are open, on `/dev/console` if they were closed.
    fn attach_console(&mut self) -> io::Result<()>;

    /// Bytes written to the console (fd 2) that the serial port has not sent yet.
    fn console_pending(&mut self) -> io::Result<usize>;

    // Processes.

    /// Blocks the signals PID 1 handles synchronously (`SIGCHLD`, `SIGTERM`, `SIGINT`,
    /// `SIGHUP`) so they queue for [`Syscall::wait_signal`].
    fn block_signals(&mut self) -> io::Result<()>;

    /// Waits for one of the blocked signals; `None` when `timeout` passed first.
    fn wait_signal(&mut self, timeout: Option<Duration>) -> io::Result<Option<libc::c_int>>;

    /// Reaps at most one ended child without blocking.
    fn wait_any(&mut self) -> io::Result<Reaped>;

    /// kill(2); `pid == -1` means every process but PID 1.
    fn kill(&mut self, pid: libc::pid_t, signal: libc::c_int) -> io::Result<()>;

    /// Starts the command `argv` as a child in its own session, with stdio on
    /// `/dev/console` and the standard environment. Returns its pid.
    fn spawn(&mut self, argv: &[OsString]) -> io::Result<libc::pid_t>;

    /// `prctl(PR_SET_CHILD_SUBREAPER)`: orphaned descendants become our children.
    fn become_subreaper(&mut self) -> io::Result<()>;

    // The network (`SIOC*` ioctls on an `AF_INET` socket) and the host name.

    /// The name of the interface whose MAC is `mac` (lower case), if any.
    fn interface_by_mac(&mut self, mac: &str) -> io::Result<Option<String>>;

    /// SIOCSIFHWADDR: the interface's MAC (`aa:bb:cc:dd:ee:ff`).
    fn set_mac(&mut self, ifname: &str, mac: &str) -> io::Result<()>;

    /// SIOCSIFADDR + SIOCSIFNETMASK.
    fn set_address(&mut self, ifname: &str, cidr: Cidr) -> io::Result<()>;

    /// SIOCSIFMTU.
    fn set_mtu(&mut self, ifname: &str, mtu: u32) -> io::Result<()>;

    /// Sets IFF_UP (SIOCGIFFLAGS, SIOCSIFFLAGS).
    fn link_up(&mut self, ifname: &str) -> io::Result<()>;

    /// SIOCADDRT.
    fn add_route(&mut self, route: &RoutePlan) -> io::Result<()>;

    /// sethostname(2).
    fn set_hostname(&mut self, name: &str) -> io::Result<()>;
}
