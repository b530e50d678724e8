//! `atoll-init`: PID 1 of an Atoll guest.
//!
//! It mounts the basic file systems, reports boot stages to the VMM, runs the one
//! command the VM exists for, reaps every process, and powers the VM off with the
//! command's exit status. The protocol is docs/guest-contract.md.
//!
//! All operating-system effects go through [`syscall::Syscall`], so [`boot`] and
//! [`shutdown::finish`] are tested with a recording fake; `main.rs` only wires the
//! real implementation, the console and the panic hook together.

pub mod agent;
mod arch;
pub mod cmdline;
pub mod console;
pub mod container;
pub mod mounts;
pub mod ports;
pub mod shutdown;
pub mod status;
pub mod supervise;
pub mod syscall;

use std::ffi::OsString;
use std::io;
use std::io::Write;

use console::Console;
use ports::{BootStage, EXIT_PORT, STAGE_PORT};
use syscall::Syscall;

/// Why the boot could not run the command; each maps to a reported status.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Signals could not be blocked, so children could not be supervised.
    #[error("cannot block signals: {0}")]
    BlockSignals(io::Error),
    /// A file system could not be mounted.
    #[error(transparent)]
    Mount(#[from] mounts::MountError),
    /// `/proc/cmdline` could not be read.
    #[error("cannot read the kernel command line: {0}")]
    ReadCmdline(io::Error),
    /// The command could not be started.
    #[error("cannot run {program:?}: {cause}")]
    Spawn {
        /// `argv[0]` of the command.
        program: OsString,
        /// What fork/exec said.
        cause: io::Error,
    },
    /// Waiting for the command failed.
    #[error(transparent)]
    Supervise(#[from] supervise::SuperviseError),
}

impl BootError {
    /// The status reported through the exit port for this failure.
    pub fn status(&self) -> u8 {
        match self {
            Self::Spawn { cause, .. } => status::from_spawn_error(cause),
            _ => status::INIT_FAILURE,
        }
    }
}

/// Boots the guest up to the end of its command and returns the status to report.
///
/// `init_args` is PID 1's `argv[1..]`. Failures are printed on the console and turned
/// into their status; nothing here powers off (see [`shutdown::finish`]).
pub fn boot<S: Syscall, W: Write>(
    sys: &mut S,
    console: &mut Console<W>,
    init_args: &[OsString],
) -> u8 {
    match try_boot(sys, console, init_args) {
        Ok(status) => status,
        Err(err) => {
            console.say(format_args!("{err}"));
            err.status()
        }
    }
}

fn try_boot<S: Syscall, W: Write>(
    sys: &mut S,
    console: &mut Console<W>,
    init_args: &[OsString],
) -> Result<u8, BootError> {
    for port in [EXIT_PORT, STAGE_PORT] {
        if let Err(err) = sys.enable_port(port) {
            console.say(format_args!(
                "cannot use I/O port {port:#x}: {err}{}",
                port_hint(&err)
            ));
        }
    }
    stage(sys, BootStage::Entered);
    // Before any child exists, so no SIGCHLD can be missed.
    sys.block_signals().map_err(BootError::BlockSignals)?;

    let mounted = mounts::mount_all(sys, &mounts::MOUNT_PLAN);
    // With /dev mounted, a console the kernel could not open for us can be opened now,
    // so that even a mount failure gets printed.
    if let Err(err) = sys.attach_console() {
        console.say(format_args!("cannot open /dev/console: {err}"));
    }
    mounted?;

    let command = cmdline::select_command(init_args, || sys.kernel_cmdline())
        .map_err(BootError::ReadCmdline)?;

    stage(sys, BootStage::Ready);
    match sys.uptime() {
        Ok(uptime) => console.ready(uptime),
        Err(err) => console.say(format_args!("cannot read the uptime: {err}")),
    }

    let Some(command) = command else {
        return Ok(0);
    };
    let pid = sys.spawn(&command.argv).map_err(|cause| BootError::Spawn {
        program: command.argv[0].clone(),
        cause,
    })?;
    stage(sys, BootStage::CommandStarted);
    Ok(supervise::supervise(sys, console, pid)?)
}

/// What to do about a failed `ioperm`: without `CONFIG_X86_IOPL_IOPERM` the kernel
/// has no such syscall, and the VMM never hears the exit status.
pub fn port_hint(err: &io::Error) -> &'static str {
    if err.raw_os_error() == Some(libc::ENOSYS) {
        " (the guest kernel needs CONFIG_X86_IOPL_IOPERM=y)"
    } else {
        ""
    }
}

/// Reports a boot stage; a missing stage port only costs the VMM a timestamp.
fn stage<S: Syscall>(sys: &mut S, stage: BootStage) {
    let _ = sys.outb(STAGE_PORT, stage as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::fake::{Call, FakeSyscall};
    use crate::syscall::Reaped;

    fn os(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    fn run(sys: &mut FakeSyscall, args: &[&str]) -> (u8, String) {
        let mut console = Console::new(Vec::new());
        let status = boot(sys, &mut console, &os(args));
        (
            status,
            String::from_utf8(console.get_ref().clone()).unwrap(),
        )
    }

    #[test]
    fn boot_without_command_reports_zero_right_after_ready() {
        let mut sys = FakeSyscall {
            cmdline: "console=ttyS0 quiet\n".to_owned(),
            ..FakeSyscall::default()
        };
        let (status, printed) = run(&mut sys, &[]);
        assert_eq!(status, 0);
        assert_eq!(printed, "ATOLL-READY 1234\n");
        assert_eq!(sys.port_writes(STAGE_PORT), [1, 2]);
        assert!(!sys.calls.iter().any(|c| matches!(c, Call::Spawn(_))));
    }

    #[test]
    fn boot_stage_order_is_entered_mounts_ready_started() {
        let mut sys = FakeSyscall::default();
        sys.reaps.push_back(Reaped::Child {
            pid: 100,
            status: 0,
        });
        run(&mut sys, &["/bin/true"]);
        let position = |wanted: &Call| sys.calls.iter().position(|c| c == wanted).unwrap();
        let first_mount = sys
            .calls
            .iter()
            .position(|c| matches!(c, Call::Mount { .. }))
            .unwrap();
        assert!(position(&Call::Outb(STAGE_PORT, 1)) < position(&Call::BlockSignals));
        assert!(position(&Call::BlockSignals) < first_mount);
        assert!(first_mount < position(&Call::Outb(STAGE_PORT, 2)));
        assert!(position(&Call::Outb(STAGE_PORT, 2)) < position(&Call::Spawn(os(&["/bin/true"]))));
        assert!(position(&Call::Spawn(os(&["/bin/true"]))) < position(&Call::Outb(STAGE_PORT, 3)));
    }

    #[test]
    fn boot_argv_command_wins_and_cmdline_is_not_read() {
        let mut sys = FakeSyscall {
            cmdline: "atoll.cmd=/bin/other".to_owned(),
            ..FakeSyscall::default()
        };
        sys.reaps.push_back(Reaped::Child {
            pid: 100,
            status: 7 << 8,
        });
        let (status, _) = run(&mut sys, &["/bin/sh", "-c", "exit 7"]);
        assert_eq!(status, 7);
        assert!(sys
            .calls
            .contains(&Call::Spawn(os(&["/bin/sh", "-c", "exit 7"]))));
        assert!(!sys.calls.contains(&Call::KernelCmdline));
    }

    #[test]
    fn boot_atoll_cmd_used_when_argv_is_empty() {
        let mut sys = FakeSyscall {
            cmdline: r#"quiet atoll.cmd="/bin/echo hi""#.to_owned(),
            ..FakeSyscall::default()
        };
        sys.reaps.push_back(Reaped::Child {
            pid: 100,
            status: 0,
        });
        let (status, _) = run(&mut sys, &[]);
        assert_eq!(status, 0);
        assert!(sys.calls.contains(&Call::Spawn(os(&["/bin/echo", "hi"]))));
    }

    #[test]
    fn boot_command_not_found_reports_127() {
        let mut sys = FakeSyscall {
            spawn_result: Err(libc::ENOENT),
            ..FakeSyscall::default()
        };
        let (status, printed) = run(&mut sys, &["/nope"]);
        assert_eq!(status, 127);
        assert!(
            printed.contains("atoll-init: cannot run \"/nope\": "),
            "{printed}"
        );
        assert_eq!(sys.port_writes(STAGE_PORT), [1, 2]);
    }

    #[test]
    fn boot_command_not_executable_reports_126() {
        let mut sys = FakeSyscall {
            spawn_result: Err(libc::EACCES),
            ..FakeSyscall::default()
        };
        assert_eq!(run(&mut sys, &["/etc/passwd"]).0, 126);
    }

    #[test]
    fn boot_port_unavailable_says_which_kernel_option_is_missing() {
        let mut sys = FakeSyscall {
            enable_port_error: Some(libc::ENOSYS),
            ..FakeSyscall::default()
        };
        let (status, printed) = run(&mut sys, &[]);
        assert_eq!(status, 0);
        assert!(
            printed.starts_with(
                "atoll-init: cannot use I/O port 0xf4: Function not implemented (os error 38) \
                 (the guest kernel needs CONFIG_X86_IOPL_IOPERM=y)\n"
            ),
            "{printed}"
        );
    }

    #[test]
    fn boot_mount_failure_reports_125_without_ready_or_command() {
        let mut sys = FakeSyscall::default();
        sys.fail_mount("/proc", libc::ENODEV);
        let (status, printed) = run(&mut sys, &["/bin/true"]);
        assert_eq!(status, 125);
        assert!(
            printed.starts_with("atoll-init: cannot mount proc on /proc: "),
            "{printed}"
        );
        assert!(!printed.contains("ATOLL-READY"));
        assert_eq!(sys.port_writes(STAGE_PORT), [1]);
        assert!(!sys.calls.iter().any(|c| matches!(c, Call::Spawn(_))));
    }
}
