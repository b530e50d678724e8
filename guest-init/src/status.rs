//! Exit statuses reported to the VMM through port 0xf4 (see docs/guest-contract.md).

use std::io;

/// `atoll-init` itself failed: a mount failed, it panicked, the command line was bad.
pub const INIT_FAILURE: u8 = 125;
/// The command exists but cannot be executed.
pub const CANNOT_EXECUTE: u8 = 126;
/// The command was not found.
pub const NOT_FOUND: u8 = 127;
/// A command killed by signal N reports `SIGNAL_BASE + N`.
pub const SIGNAL_BASE: u8 = 128;

/// Maps a raw `waitpid` status to the reported status: the exit code, or
/// `128 + N` for a command killed by signal N.
pub fn from_wait_status(raw: libc::c_int) -> u8 {
    if libc::WIFEXITED(raw) {
        // WEXITSTATUS is `(raw >> 8) & 0xff`: always 0..=255.
        u8::try_from(libc::WEXITSTATUS(raw)).unwrap_or(INIT_FAILURE)
    } else if libc::WIFSIGNALED(raw) {
        u8::try_from(libc::WTERMSIG(raw))
            .map_or(u8::MAX, |signal| SIGNAL_BASE.saturating_add(signal))
    } else {
        // Stopped or continued: waitpid without WUNTRACED/WCONTINUED never says so.
        INIT_FAILURE
    }
}

/// Maps a failure to start the command to the reported status, as shells do:
/// not found is 127, found but not runnable is 126. Anything else (out of memory,
/// no console) is a failure of init itself.
pub fn from_spawn_error(err: &io::Error) -> u8 {
    match err.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR) => NOT_FOUND,
        Some(
            libc::EACCES
            | libc::EPERM
            | libc::ENOEXEC
            | libc::EISDIR
            | libc::ETXTBSY
            | libc::ELOOP
            | libc::ENAMETOOLONG
            | libc::E2BIG
            | libc::ELIBBAD,
        ) => CANNOT_EXECUTE,
        _ => INIT_FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, ExitStatus};

    /// Builds raw wait statuses the way the kernel encodes them.
    fn exited(code: i32) -> libc::c_int {
        ExitStatus::from_raw(code << 8).into_raw()
    }

    fn signaled(signal: i32) -> libc::c_int {
        ExitStatus::from_raw(signal).into_raw()
    }

    #[test]
    fn from_wait_status_exit_code_is_passed_through() {
        assert_eq!(from_wait_status(exited(0)), 0);
        assert_eq!(from_wait_status(exited(7)), 7);
        assert_eq!(from_wait_status(exited(255)), 255);
    }

    #[test]
    fn from_wait_status_killed_by_signal_is_128_plus_n() {
        assert_eq!(from_wait_status(signaled(libc::SIGKILL)), 137);
        assert_eq!(from_wait_status(signaled(libc::SIGTERM)), 143);
    }

    #[test]
    fn from_wait_status_core_dump_bit_still_maps_to_signal() {
        assert_eq!(from_wait_status(signaled(libc::SIGSEGV) | 0x80), 139);
    }

    #[test]
    fn from_wait_status_real_child_killed_by_sigkill_is_137() {
        let status = Command::new("/bin/sh")
            .args(["-c", "kill -9 $$"])
            .status()
            .expect("run /bin/sh");
        assert_eq!(from_wait_status(status.into_raw()), 137);
    }

    #[test]
    fn from_spawn_error_enoent_is_127() {
        assert_eq!(
            from_spawn_error(&io::Error::from_raw_os_error(libc::ENOENT)),
            127
        );
    }

    #[test]
    fn from_spawn_error_eacces_and_enoexec_are_126() {
        assert_eq!(
            from_spawn_error(&io::Error::from_raw_os_error(libc::EACCES)),
            126
        );
        assert_eq!(
            from_spawn_error(&io::Error::from_raw_os_error(libc::ENOEXEC)),
            126
        );
    }

    #[test]
    fn from_spawn_error_resource_failure_is_init_failure() {
        assert_eq!(
            from_spawn_error(&io::Error::from_raw_os_error(libc::ENOMEM)),
            125
        );
    }

    #[test]
    fn from_spawn_error_real_missing_program_is_127() {
        let err = Command::new("/nonexistent/atoll-test-program")
            .spawn()
            .expect_err("spawning a missing program must fail");
        assert_eq!(from_spawn_error(&err), 127);
    }
}
