//! PID 1's wait loop while the command runs: reap every child (orphans are
//! re-parented to PID 1), return the command's own status, forward SIGTERM/SIGINT.
//!
//! Signals are blocked and taken synchronously with `sigtimedwait`, so there are no
//! signal handlers and no races between a handler and `waitpid`.

use std::io;
use std::io::Write;

use crate::console::Console;
use crate::status;
use crate::syscall::{Reaped, Syscall};

/// Why PID 1 stopped waiting for the command.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// waitpid(2) failed.
    #[error("waiting for children failed: {0}")]
    Wait(io::Error),
    /// sigtimedwait(2) failed.
    #[error("waiting for signals failed: {0}")]
    Signal(io::Error),
    /// No children are left but the command was never reaped.
    #[error("the command (pid {0}) vanished without being reaped")]
    CommandLost(libc::pid_t),
}

/// Waits until the command `pid` ends and returns its reported status, reaping any
/// other child on the way.
pub fn supervise<S: Syscall, W: Write>(
    sys: &mut S,
    console: &mut Console<W>,
    pid: libc::pid_t,
) -> Result<u8, SuperviseError> {
    loop {
        loop {
            match sys.wait_any().map_err(SuperviseError::Wait)? {
                Reaped::Child {
                    pid: reaped,
                    status,
                } if reaped == pid => {
                    return Ok(status::from_wait_status(status));
                }
                Reaped::Child { .. } => {}
                Reaped::NoneReady => break,
                Reaped::NoChildren => return Err(SuperviseError::CommandLost(pid)),
            }
        }
        // SIGCHLD is handled by reaping at the top of the loop; SIGHUP is ignored.
        if let Some(signal @ (libc::SIGTERM | libc::SIGINT)) =
            sys.wait_signal(None).map_err(SuperviseError::Signal)?
        {
            if let Err(err) = sys.kill(pid, signal) {
                console.say(format_args!("cannot forward signal {signal}: {err}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::fake::{Call, FakeSyscall};

    const EXITED_7: libc::c_int = 7 << 8;

    #[test]
    fn supervise_command_already_exited_returns_its_status() {
        let mut sys = FakeSyscall::default();
        sys.reaps.push_back(Reaped::Child {
            pid: 100,
            status: EXITED_7,
        });
        let mut console = Console::new(Vec::new());
        assert_eq!(supervise(&mut sys, &mut console, 100).unwrap(), 7);
        assert!(sys.calls.is_empty());
    }

    #[test]
    fn supervise_orphans_are_reaped_until_command_exits() {
        let mut sys = FakeSyscall::default();
        sys.reaps.extend([
            Reaped::Child {
                pid: 205,
                status: 0,
            },
            Reaped::NoneReady,
            Reaped::Child {
                pid: 206,
                status: libc::SIGKILL,
            },
            Reaped::Child {
                pid: 100,
                status: libc::SIGKILL,
            },
        ]);
        sys.signals.push_back(libc::SIGCHLD);
        let mut console = Console::new(Vec::new());
        assert_eq!(supervise(&mut sys, &mut console, 100).unwrap(), 137);
        assert_eq!(sys.calls, vec![Call::WaitSignal(None)]);
    }

    #[test]
    fn supervise_sigterm_is_forwarded_to_command() {
        let mut sys = FakeSyscall::default();
        sys.reaps.extend([
            Reaped::NoneReady,
            Reaped::Child {
                pid: 100,
                status: libc::SIGTERM,
            },
        ]);
        sys.signals.push_back(libc::SIGTERM);
        let mut console = Console::new(Vec::new());
        assert_eq!(supervise(&mut sys, &mut console, 100).unwrap(), 143);
        assert_eq!(
            sys.calls,
            vec![Call::WaitSignal(None), Call::Kill(100, libc::SIGTERM)]
        );
    }

    #[test]
    fn supervise_sighup_is_not_forwarded() {
        let mut sys = FakeSyscall::default();
        sys.reaps.extend([
            Reaped::NoneReady,
            Reaped::Child {
                pid: 100,
                status: 0,
            },
        ]);
        sys.signals.push_back(libc::SIGHUP);
        let mut console = Console::new(Vec::new());
        assert_eq!(supervise(&mut sys, &mut console, 100).unwrap(), 0);
        assert!(!sys.calls.iter().any(|c| matches!(c, Call::Kill(..))));
    }

    #[test]
    fn supervise_no_children_left_is_an_error() {
        let mut sys = FakeSyscall::default();
        let mut console = Console::new(Vec::new());
        let err = supervise(&mut sys, &mut console, 100).unwrap_err();
        assert!(matches!(err, SuperviseError::CommandLost(100)));
    }
}
