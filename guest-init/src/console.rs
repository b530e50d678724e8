//! Lines PID 1 prints on the serial console: `atoll-init: ...` diagnostics and the
//! `ATOLL-READY <uptime_ms>` marker the benchmarks wait for.
//!
//! Each line goes out in a single `write` so it is not split by other writers, and a
//! console that cannot be written is never a reason to fail: output errors are dropped.

use std::fmt;
use std::io::Write;
use std::time::Duration;

/// Prefix of every diagnostic line.
pub const PREFIX: &str = "atoll-init: ";
/// The readiness marker, followed by the uptime in milliseconds.
pub const READY_MARKER: &str = "ATOLL-READY";

/// Where PID 1's lines go (stderr, i.e. `/dev/console`, in the real binary).
#[derive(Debug)]
pub struct Console<W: Write> {
    out: W,
}

impl<W: Write> Console<W> {
    /// Wraps `out`, which should be unbuffered.
    pub fn new(out: W) -> Self {
        Self { out }
    }

    /// The underlying writer (tests read what was printed).
    pub fn get_ref(&self) -> &W {
        &self.out
    }

    /// Prints `atoll-init: <message>`.
    pub fn say(&mut self, message: fmt::Arguments<'_>) {
        self.write_line(&format!("{PREFIX}{message}\n"));
    }

    /// Prints `ATOLL-READY <uptime_ms>`.
    pub fn ready(&mut self, uptime: Duration) {
        self.write_line(&format!("{READY_MARKER} {}\n", uptime.as_millis()));
    }

    fn write_line(&mut self, line: &str) {
        let _ = self.out.write_all(line.as_bytes());
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn printed(console: &Console<Vec<u8>>) -> &str {
        std::str::from_utf8(console.get_ref()).unwrap()
    }

    #[test]
    fn say_prefixes_and_terminates_the_line() {
        let mut console = Console::new(Vec::new());
        console.say(format_args!("exit {}", 7));
        assert_eq!(printed(&console), "atoll-init: exit 7\n");
    }

    #[test]
    fn ready_prints_marker_with_whole_milliseconds() {
        let mut console = Console::new(Vec::new());
        console.ready(Duration::from_micros(812_999));
        assert_eq!(printed(&console), "ATOLL-READY 812\n");
    }
}
