//! The node's output protocol: how the host tells the command's output apart from
//! everything else L1 prints.
//!
//! L1 has two serial ports:
//! - **ttyS0, the console** (QEMU stdout): kernel messages, BIOS noise and the node's
//!   progress marks, one per line: `ATOLL-NODE <nonce> <event> [args]` with events
//!   `init <uptime_s>`, `kvm <uptime_s>`, `fail <reason>`, `done <uptime_s>`.
//!   [`ConsoleMark::parse`] finds them anywhere in a line (the kernel may prefix one).
//! - **ttyS1, the data port** (a host file), in raw mode (no `\n` -> `\r\n`), written
//!   only by `/init`: `ATOLL-NODE-BEGIN <nonce>\n`, then the command's stdout+stderr
//!   byte for byte, then `ATOLL-NODE-END <nonce> <status>\n`. Kernel messages never go
//!   there, so the output needs no escaping. [`DataStream`] parses it incrementally.
//!
//! The nonce is fresh for every boot (it travels on the kernel command line), so a
//! command that prints marker-like text, or output left from an earlier boot, is never
//! mistaken for a marker. Missing the end marker means the node vanished.

/// Prefix of console progress marks.
pub const MARK_PREFIX: &str = "ATOLL-NODE";

/// Makes a fresh 128-bit hex nonce from the kernel's random source.
pub fn new_nonce() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// A progress mark seen on the console.
#[derive(Debug, Clone, PartialEq)]
pub enum ConsoleMark {
    /// `/init` started; L1 uptime in seconds.
    Init(f64),
    /// The KVM modules are loaded and `/dev/kvm` exists; L1 uptime in seconds.
    KvmReady(f64),
    /// The node could not set itself up (module load failed, no `/dev/kvm`...).
    Fail(String),
    /// The command finished and its output was flushed; L1 uptime in seconds.
    Done(f64),
    /// `/init`'s heartbeat: L1 is alive; its uptime in seconds.
    Beat(f64),
}

impl ConsoleMark {
    /// Finds this boot's mark in one console line (without its line ending).
    pub fn parse(line: &str, nonce: &str) -> Option<ConsoleMark> {
        let tag = format!("{MARK_PREFIX} {nonce} ");
        let start = line.find(&tag)? + tag.len();
        let rest = line[start..].trim_end_matches(['\r', '\n']);
        let (event, arg) = rest.split_once(' ').unwrap_or((rest, ""));
        let secs = || arg.trim().parse::<f64>().ok();
        match event {
            "init" => secs().map(ConsoleMark::Init),
            "kvm" => secs().map(ConsoleMark::KvmReady),
            "done" => secs().map(ConsoleMark::Done),
            "beat" => secs().map(ConsoleMark::Beat),
            "fail" => Some(ConsoleMark::Fail(arg.to_owned())),
            _ => None,
        }
    }
}

/// Where the data stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the begin marker (anything before it is dropped).
    BeforeBegin,
    /// Collecting output, looking for the end marker.
    Output,
    /// The end marker was seen with this exit status.
    Done(i32),
}

/// What the data port said, once finished or cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataResult {
    /// The command's output, byte for byte (without the markers).
    pub output: Vec<u8>,
    /// The command's exit status, if the end marker arrived.
    pub status: Option<i32>,
    /// Whether the begin marker arrived (the command was started).
    pub began: bool,
}

/// Incremental parser of the data port. Feed it bytes as they arrive; it hands back
/// complete output lines for live display and keeps the whole output.
#[derive(Debug)]
pub struct DataStream {
    begin: Vec<u8>,
    end: Vec<u8>,
    state: State,
    /// Before the begin marker: unmatched bytes. After: the output (plus possibly the
    /// start of the end marker).
    buf: Vec<u8>,
    /// Output bytes already handed out as lines.
    emitted: usize,
    /// Where the next end-marker search starts (earlier bytes cannot hold its start).
    scan_from: usize,
}

impl DataStream {
    /// A parser for the boot that uses `nonce`.
    pub fn new(nonce: &str) -> Self {
        Self {
            begin: format!("ATOLL-NODE-BEGIN {nonce}\n").into_bytes(),
            end: format!("ATOLL-NODE-END {nonce} ").into_bytes(),
            state: State::BeforeBegin,
            buf: Vec::new(),
            emitted: 0,
            scan_from: 0,
        }
    }

    /// True once the begin marker has been seen.
    pub fn began(&self) -> bool {
        self.state != State::BeforeBegin
    }

    /// The exit status, once the end marker has been seen.
    pub fn status(&self) -> Option<i32> {
        match self.state {
            State::Done(s) => Some(s),
            _ => None,
        }
    }

    /// Consumes `bytes`; calls `on_line` for each output line that became complete
    /// (without its `\n`; on the end marker, also for a final unterminated line).
    pub fn feed(&mut self, bytes: &[u8], on_line: &mut dyn FnMut(&str)) {
        if matches!(self.state, State::Done(_)) {
            return; // anything after the end marker is not the command's output
        }
        self.buf.extend_from_slice(bytes);
        if self.state == State::BeforeBegin {
            match find(&self.buf, &self.begin, 0) {
                Some(pos) => {
                    self.buf.drain(..pos + self.begin.len());
                    self.state = State::Output;
                    self.scan_from = 0;
                }
                None => {
                    // Keep only what could still be the start of the begin marker.
                    let keep = self.begin.len().saturating_sub(1).min(self.buf.len());
                    let cut = self.buf.len() - keep;
                    self.buf.drain(..cut);
                    return;
                }
            }
        }
        self.look_for_end();
        let limit = match self.state {
            State::Done(_) => self.buf.len(),
            _ => match self.buf[self.emitted..].iter().rposition(|&b| b == b'\n') {
                Some(i) => self.emitted + i + 1,
                None => self.emitted,
            },
        };
        for line in self.buf[self.emitted..limit].split_inclusive(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            on_line(&String::from_utf8_lossy(line));
        }
        self.emitted = limit;
    }

    /// Searches for a complete end marker (`... <status>\n`) and, when found, cuts the
    /// buffer down to the output.
    fn look_for_end(&mut self) {
        let mut from = self.scan_from;
        while let Some(pos) = find(&self.buf, &self.end, from) {
            let after = pos + self.end.len();
            let Some(nl) = self.buf[after..].iter().position(|&b| b == b'\n') else {
                // The status is still in flight: search from this marker next time.
                self.scan_from = pos;
                return;
            };
            let digits = &self.buf[after..after + nl];
            let status = std::str::from_utf8(digits)
                .ok()
                .and_then(|s| s.parse::<i32>().ok());
            if let Some(status) = status {
                self.buf.truncate(pos);
                self.state = State::Done(status);
                return;
            }
            // Marker text followed by garbage: not ours, it is output.
            from = pos + 1;
        }
        self.scan_from = self
            .buf
            .len()
            .saturating_sub(self.end.len().saturating_sub(1))
            .max(from.min(self.buf.len()));
    }

    /// Finishes parsing (the port will get no more bytes).
    pub fn finish(self) -> DataResult {
        let began = self.began();
        let status = self.status();
        DataResult {
            output: if began { self.buf } else { Vec::new() },
            status,
            began,
        }
    }
}

/// Position of `needle` in `hay` at or after `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from >= hay.len() || hay.len() - from < needle.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: &str = "0123abcd";

    fn feed_all(chunks: &[&[u8]]) -> (DataResult, Vec<String>) {
        let mut s = DataStream::new(N);
        let mut lines = Vec::new();
        for c in chunks {
            s.feed(c, &mut |l| lines.push(l.to_owned()));
        }
        (s.finish(), lines)
    }

    #[test]
    fn data_complete_stream_gives_output_and_status() {
        let (r, lines) =
            feed_all(&[b"ATOLL-NODE-BEGIN 0123abcd\nhello\nworld\nATOLL-NODE-END 0123abcd 3\n"]);
        assert_eq!(r.output, b"hello\nworld\n");
        assert_eq!(r.status, Some(3));
        assert!(r.began);
        assert_eq!(lines, ["hello", "world"]);
    }

    #[test]
    fn data_noise_before_begin_is_dropped() {
        let (r, _) = feed_all(&[
            b"\x1b[2Jgarbage ATOLL-NODE-BEGIN 0123",
            b"abcd\nout\nATOLL-NODE-END 0123abcd 0\n",
        ]);
        assert_eq!(r.output, b"out\n");
        assert_eq!(r.status, Some(0));
    }

    #[test]
    fn data_markers_split_across_every_byte_still_parse() {
        let all = b"ATOLL-NODE-BEGIN 0123abcd\na\nno newline at endATOLL-NODE-END 0123abcd 42\n";
        let chunks: Vec<&[u8]> = all.chunks(1).collect();
        let (r, lines) = feed_all(&chunks);
        assert_eq!(r.output, b"a\nno newline at end");
        assert_eq!(r.status, Some(42));
        assert_eq!(lines, ["a", "no newline at end"]);
    }

    #[test]
    fn data_partial_output_without_end_has_no_status() {
        let (r, lines) = feed_all(&[b"ATOLL-NODE-BEGIN 0123abcd\nline1\npart"]);
        assert!(r.began);
        assert_eq!(r.status, None);
        assert_eq!(r.output, b"line1\npart");
        assert_eq!(lines, ["line1"]);
    }

    #[test]
    fn data_end_marker_without_status_yet_is_not_done() {
        let mut s = DataStream::new(N);
        s.feed(
            b"ATOLL-NODE-BEGIN 0123abcd\nx\nATOLL-NODE-END 0123abcd 1",
            &mut |_| {},
        );
        assert_eq!(s.status(), None);
        s.feed(b"27\n", &mut |_| {});
        assert_eq!(s.status(), Some(127));
        assert_eq!(s.finish().output, b"x\n");
    }

    #[test]
    fn data_marker_with_other_nonce_is_output() {
        let (r, _) = feed_all(&[
            b"ATOLL-NODE-BEGIN 0123abcd\nATOLL-NODE-END ffff 9\nATOLL-NODE-END 0123abcd x\n",
            b"ATOLL-NODE-END 0123abcd 5\n",
        ]);
        assert_eq!(
            r.output,
            b"ATOLL-NODE-END ffff 9\nATOLL-NODE-END 0123abcd x\n".to_vec()
        );
        assert_eq!(r.status, Some(5));
    }

    #[test]
    fn data_without_begin_reports_not_began() {
        let (r, lines) = feed_all(&[b"ATOLL-NODE-END 0123abcd 0\n"]);
        assert!(!r.began);
        assert_eq!(r.status, None);
        assert!(lines.is_empty());
    }

    #[test]
    fn data_bytes_after_end_are_ignored() {
        let (r, _) = feed_all(&[
            b"ATOLL-NODE-BEGIN 0123abcd\nok\nATOLL-NODE-END 0123abcd 0\n",
            b"trailing\n",
        ]);
        assert_eq!(r.output, b"ok\n");
    }

    #[test]
    fn data_large_output_in_odd_chunks_is_exact() {
        let mut all = b"ATOLL-NODE-BEGIN 0123abcd\n".to_vec();
        let body: Vec<u8> = (0..2_999_997u32)
            .map(|i| b"abcdefgh\n"[(i % 9) as usize])
            .collect();
        all.extend_from_slice(&body);
        all.extend_from_slice(b"ATOLL-NODE-END 0123abcd 0\n");
        let chunks: Vec<&[u8]> = all.chunks(4093).collect();
        let (r, lines) = feed_all(&chunks);
        assert_eq!(r.output, body);
        assert_eq!(lines.len(), 2_999_997 / 9);
    }

    #[test]
    fn console_marks_are_found_amid_kernel_noise() {
        assert_eq!(
            ConsoleMark::parse("ATOLL-NODE 0123abcd init 1.48", N),
            Some(ConsoleMark::Init(1.48))
        );
        assert_eq!(
            ConsoleMark::parse("[    2.1] foo ATOLL-NODE 0123abcd kvm 2.00\r", N),
            Some(ConsoleMark::KvmReady(2.0))
        );
        assert_eq!(
            ConsoleMark::parse("ATOLL-NODE 0123abcd fail insmod kvm.ko failed", N),
            Some(ConsoleMark::Fail("insmod kvm.ko failed".into()))
        );
        assert_eq!(
            ConsoleMark::parse("ATOLL-NODE 0123abcd beat 61.5", N),
            Some(ConsoleMark::Beat(61.5))
        );
        assert_eq!(ConsoleMark::parse("ATOLL-NODE ffff init 1.0", N), None);
        assert_eq!(ConsoleMark::parse("[    9.17] reboot: Power down", N), None);
        assert_eq!(ConsoleMark::parse("ATOLL-NODE 0123abcd init x", N), None);
    }

    #[test]
    fn nonce_is_32_hex_chars_and_fresh() {
        let a = new_nonce().unwrap();
        let b = new_nonce().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
