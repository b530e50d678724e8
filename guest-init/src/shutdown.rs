//! The end of the guest: report the status, stop what is left, power off.
//!
//! Order: print `atoll-init: exit <status>`, sync, SIGTERM every remaining process
//! and then SIGKILL after a short bound, detach the mounts, sync, write the status
//! to the exit port (our VMM and QEMU's isa-debug-exit stop here), and only if the
//! machine is still running, reboot(2): restart first, power-off only if refused.
//!
//! Why restart first: when the kernel has no power-off method (no ACPI, as on a
//! minimal microvm), `RB_POWER_OFF` silently becomes a halt that never returns,
//! and the VM hangs ("reboot: Power off not available: System halted instead").
//! A restart always ends: with the contract's `reboot=k` it resets through the
//! keyboard controller (falling back to a triple fault), which our VMM treats as a
//! stop and `qemu -no-reboot` as an exit.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::console::Console;
use crate::mounts::{self, MOUNT_PLAN};
use crate::ports::EXIT_PORT;
use crate::syscall::{Reaped, RebootCmd, Syscall};

/// At most this long is spent letting the serial port send what is queued: the exit
/// stops the VM at once, and output still queued in the guest would be lost.
pub const CONSOLE_DRAIN: Duration = Duration::from_millis(200);

/// How long remaining processes get after SIGTERM, and again after SIGKILL.
pub const GRACE: Duration = Duration::from_millis(1000);

/// Runs the whole shutdown sequence for `status`. Returns only if every way of
/// stopping the machine failed.
pub fn finish<S: Syscall, W: Write>(sys: &mut S, console: &mut Console<W>, status: u8) {
    console.say(format_args!("exit {status}"));
    sys.sync();
    stop_processes(sys, GRACE);
    mounts::unmount_all(sys, &MOUNT_PLAN);
    sys.sync();
    power_off(sys, console, status);
}

/// Ends every process but PID 1: SIGTERM, up to `grace` to exit, then SIGKILL and
/// up to `grace` again. Returns at once when PID 1 has no children left (every user
/// process descends from PID 1, so none is running).
pub fn stop_processes<S: Syscall>(sys: &mut S, grace: Duration) {
    if reap_all(sys) {
        return;
    }
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        // ESRCH (nothing left to signal) is fine; there is no other failure to act on.
        let _ = sys.kill(-1, signal);
        if wait_for_no_children(sys, grace) {
            return;
        }
    }
}

/// Reaps every ended child; true when no children are left.
fn reap_all<S: Syscall>(sys: &mut S) -> bool {
    loop {
        match sys.wait_any() {
            Ok(Reaped::Child { .. }) => {}
            Ok(Reaped::NoneReady) => return false,
            // An error here means waitpid cannot be used at all: nothing to wait for.
            Ok(Reaped::NoChildren) | Err(_) => return true,
        }
    }
}

/// Reaps until no children are left (true) or `grace` has passed (false).
fn wait_for_no_children<S: Syscall>(sys: &mut S, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    loop {
        if reap_all(sys) {
            return true;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return false;
        }
        match sys.wait_signal(Some(remaining)) {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return reap_all(sys),
        }
    }
}

/// Writes `status` to the exit port, then falls back to reboot(2) (see the module
/// docs for the order).
pub fn power_off<S: Syscall, W: Write>(sys: &mut S, console: &mut Console<W>, status: u8) {
    drain_console(sys, CONSOLE_DRAIN);
    if let Err(err) = sys.outb(EXIT_PORT, status) {
        console.say(format_args!("cannot write the exit port: {err}"));
    }
    // Still running: no exit device at 0xf4 (not our VMM, not isa-debug-exit).
    console.say(format_args!("no exit device answered; restarting"));
    if let Err(err) = sys.reboot(RebootCmd::Restart) {
        console.say(format_args!("restart failed: {err}"));
    }
    if let Err(err) = sys.reboot(RebootCmd::PowerOff) {
        console.say(format_args!("power-off failed: {err}"));
    }
}

/// Waits, up to `bound`, until the console has sent everything queued. Bounded and
/// polled rather than tcdrain(3), which waits forever on a stuck UART.
pub fn drain_console<S: Syscall>(sys: &mut S, bound: Duration) {
    let deadline = Instant::now() + bound;
    while matches!(sys.console_pending(), Ok(n) if n > 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::fake::{Call, FakeSyscall};

    fn printed(console: &Console<Vec<u8>>) -> &str {
        std::str::from_utf8(console.get_ref()).unwrap()
    }

    #[test]
    fn stop_processes_without_children_signals_nobody() {
        let mut sys = FakeSyscall::default();
        stop_processes(&mut sys, Duration::from_secs(5));
        assert!(sys.calls.is_empty());
    }

    #[test]
    fn stop_processes_children_exiting_on_sigterm_get_no_sigkill() {
        let mut sys = FakeSyscall::default();
        sys.reaps.extend([Reaped::NoneReady, Reaped::NoneReady]);
        sys.signals.push_back(libc::SIGCHLD);
        stop_processes(&mut sys, Duration::from_secs(5));
        assert_eq!(sys.calls[0], Call::Kill(-1, libc::SIGTERM));
        assert!(!sys.calls.contains(&Call::Kill(-1, libc::SIGKILL)));
    }

    #[test]
    fn stop_processes_stragglers_get_sigkill_after_grace() {
        let mut sys = FakeSyscall::default();
        sys.reaps.extend([Reaped::NoneReady; 3]);
        stop_processes(&mut sys, Duration::from_millis(10));
        assert_eq!(sys.calls[0], Call::Kill(-1, libc::SIGTERM));
        assert!(matches!(sys.calls[1], Call::WaitSignal(Some(_))));
        assert_eq!(sys.calls[2], Call::Kill(-1, libc::SIGKILL));
    }

    #[test]
    fn power_off_writes_status_then_restarts_before_powering_off() {
        let mut sys = FakeSyscall::default();
        let mut console = Console::new(Vec::new());
        power_off(&mut sys, &mut console, 7);
        assert_eq!(
            sys.calls,
            vec![
                Call::ConsolePending,
                Call::Outb(EXIT_PORT, 7),
                Call::Reboot(RebootCmd::Restart),
                Call::Reboot(RebootCmd::PowerOff),
            ]
        );
    }

    #[test]
    fn drain_console_polls_until_nothing_is_queued() {
        let mut sys = FakeSyscall::default();
        sys.console_pending.extend([30, 12]);
        drain_console(&mut sys, Duration::from_secs(5));
        assert_eq!(sys.calls, vec![Call::ConsolePending; 3]);
    }

    #[test]
    fn drain_console_gives_up_after_bound() {
        let mut sys = FakeSyscall::default();
        sys.console_pending.extend([5; 1000]);
        drain_console(&mut sys, Duration::from_millis(5));
        assert!(sys.console_pending.len() > 900);
    }

    #[test]
    fn power_off_reboot_failures_are_reported() {
        let mut sys = FakeSyscall {
            reboot_error: Some(libc::EPERM),
            ..FakeSyscall::default()
        };
        let mut console = Console::new(Vec::new());
        power_off(&mut sys, &mut console, 0);
        assert!(printed(&console).contains("atoll-init: power-off failed: "));
        assert!(printed(&console).contains("atoll-init: restart failed: "));
    }

    #[test]
    fn finish_prints_exit_before_writing_the_port() {
        let mut sys = FakeSyscall::default();
        let mut console = Console::new(Vec::new());
        finish(&mut sys, &mut console, 42);
        assert!(printed(&console).starts_with("atoll-init: exit 42\n"));
        assert_eq!(sys.port_writes(EXIT_PORT), [42]);
        assert_eq!(sys.calls.first(), Some(&Call::Sync));
        let unmounts = sys
            .calls
            .iter()
            .filter(|c| matches!(c, Call::Unmount(_)))
            .count();
        assert_eq!(unmounts, MOUNT_PLAN.len());
    }
}
