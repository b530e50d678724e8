//! Everything `atoll-init` asks of the operating system, behind one trait.
//!
//! PID 1 mounts file systems, talks to the VMM through I/O ports, spawns and reaps
//! processes and finally powers the machine off. None of that can run in a unit test
//! (no root, and a test process is not PID 1), so the boot logic in this crate is
//! written against [`Syscall`]: [`LinuxSyscall`] does the real work, and a recording
//! fake (tests only) scripts answers and records calls.

mod linux;

#[cfg(test)]
pub(crate) mod fake;

use std::ffi::OsString;
use std::io;
use std::path::Path;
use std::time::Duration;

pub use linux::{mount, rename_exchange, LinuxSyscall};

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

/// The operating-system effects PID 1 needs.
///
/// Methods return raw `io::Error`s (an errno); callers wrap them in the error enum of
/// the operation they were doing.
pub trait Syscall {
    /// Creates one directory (not its parents) with `mode`; `EEXIST` is an error here.
    fn create_dir(&mut self, path: &Path, mode: u32) -> io::Result<()>;

    /// mount(2).
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

    /// sync(2).
    fn sync(&mut self);

    /// Grants this process access to one I/O port (`ioperm`).
    fn enable_port(&mut self, port: u16) -> io::Result<()>;

    /// Writes one byte to an I/O port previously enabled with [`Syscall::enable_port`].
    fn outb(&mut self, port: u16, value: u8) -> io::Result<()>;

    /// reboot(2). Returns only if the kernel refused.
    fn reboot(&mut self, cmd: RebootCmd) -> io::Result<()>;

    /// Time since boot (`CLOCK_BOOTTIME`).
    fn uptime(&mut self) -> io::Result<Duration>;

    /// The kernel command line (`/proc/cmdline`).
    fn kernel_cmdline(&mut self) -> io::Result<String>;

    /// Makes sure fds 0, 1 and 2 are open, on `/dev/console` if they were closed.
    fn attach_console(&mut self) -> io::Result<()>;

    /// Bytes written to the console (fd 2) that the serial port has not sent yet.
    fn console_pending(&mut self) -> io::Result<usize>;

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
}
