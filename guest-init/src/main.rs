//! The `atoll-init` binary: wires the real syscalls, the console and the panic hook
//! to the library, and never returns (PID 1 exiting panics the kernel).
//!
//! Run as `/init agent` by PID 1, the same binary is the guest agent instead
//! ([`atoll_init::agent::run`]) and exits with the status Shutdown asked for.

use std::ffi::OsString;
use std::io;
use std::time::Duration;

use atoll_init::console::Console;
use atoll_init::ports::EXIT_PORT;
use atoll_init::status::INIT_FAILURE;
use atoll_init::syscall::{LinuxSyscall, Syscall};
use atoll_init::{boot, shutdown};

/// Rust's runtime starts every program with SIGPIPE ignored, and an ignored signal
/// stays ignored across exec: every command and container would inherit it (`yes |
/// head` spinning on EPIPE instead of ending). A handler that does nothing keeps
/// this process alive on a closed pipe or socket (writes still fail with EPIPE)
/// and, being a handler, is reset to the default by exec.
fn sigpipe_to_a_handler() {
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: an all-zero sigaction is valid: an empty mask, no flags.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = ignore as extern "C" fn(libc::c_int) as usize;
    sa.sa_flags = libc::SA_RESTART;
    // SAFETY: `sa` is initialised; the handler does nothing, which is
    // async-signal-safe.
    let rc = unsafe { libc::sigaction(libc::SIGPIPE, &sa, std::ptr::null_mut()) };
    if rc != 0 {
        // SIGPIPE stays ignored: commands inherit that, as before this existed.
        eprintln!(
            "atoll-init: cannot catch SIGPIPE ({}); commands will start with it ignored",
            io::Error::last_os_error()
        );
    }
}

fn main() {
    sigpipe_to_a_handler();
    if std::process::id() != 1 && std::env::args_os().nth(1).is_some_and(|a| a == "agent") {
        // The agent: PID 1's supervised command (`/init agent`).
        std::process::exit(i32::from(atoll_init::agent::run()));
    }
    if std::process::id() != 1
        && std::env::args_os()
            .nth(1)
            .is_some_and(|a| a == atoll_init::container::pidns::PAUSE_ARG)
    {
        // The holder of a pod's shared PID namespace, started by the agent.
        std::process::exit(atoll_init::container::pidns::pause_main());
    }
    if std::process::id() != 1 {
        // Mounting over the host's /dev and rebooting it would be a disaster.
        eprintln!("atoll-init: refusing to run: this is PID 1 of an Atoll guest VM only");
        std::process::exit(i32::from(INIT_FAILURE));
    }
    std::panic::set_hook(Box::new(|info| {
        let mut console = Console::new(io::stderr());
        console.say(format_args!("panic: {info}"));
        let mut sys = LinuxSyscall::new();
        if let Err(err) = sys.enable_port(EXIT_PORT) {
            let hint = atoll_init::port_hint(&err);
            console.say(format_args!(
                "cannot use I/O port {EXIT_PORT:#x}: {err}{hint}"
            ));
        }
        console.say(format_args!("exit {INIT_FAILURE}"));
        sys.sync();
        shutdown::power_off(&mut sys, &mut console, INIT_FAILURE);
        wait_forever();
    }));

    let mut sys = LinuxSyscall::new();
    let mut console = Console::new(io::stderr());
    let init_args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let status = boot(&mut sys, &mut console, &init_args);
    shutdown::finish(&mut sys, &mut console, status);
    wait_forever();
}

/// Where PID 1 ends up if every way of stopping the machine failed.
fn wait_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
