//! Container logs in the CRI format kubelet reads (`kubectl logs`): one record per
//! line, `<RFC 3339 time, ns> <stdout|stderr> <F|P> <text>\n`. A line longer than
//! [`MAX_LINE`] is cut into `P` (partial) records ended by an `F` (full) one; text
//! still without a newline when the stream ends is written as `P`.
//!
//! A log file is bounded ([`MAX_LOG_BYTES`] until kubelet rotates it with
//! ReopenContainerLog): a container printing forever cannot fill the node's disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Longest text of one record (containerd's default, 16 KiB).
pub const MAX_LINE: usize = 16 << 10;
/// Most bytes written to one log file between rotations.
pub const MAX_LOG_BYTES: u64 = 256 << 20;

/// Which output a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A record's tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// The end of a line.
    Full,
    /// Part of a line that goes on in the next record.
    Partial,
}

/// The timestamp kubelet parses (RFC 3339, nanoseconds, UTC).
pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string()
}

/// One record, newline included.
pub fn record(time: &str, stream: Stream, tag: Tag, text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(time.len() + text.len() + 12);
    out.extend_from_slice(time.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_str().as_bytes());
    out.extend_from_slice(match tag {
        Tag::Full => b" F ",
        Tag::Partial => b" P ",
    });
    out.extend_from_slice(text);
    out.push(b'\n');
    out
}

/// Cuts a byte stream into records.
#[derive(Debug, Default)]
pub struct Lines {
    pending: Vec<u8>,
}

impl Lines {
    /// Adds `data`; calls `emit` for every complete record.
    pub fn feed(&mut self, mut data: &[u8], emit: &mut dyn FnMut(Tag, &[u8])) {
        while !data.is_empty() {
            let room = MAX_LINE - self.pending.len();
            let window = &data[..data.len().min(room)];
            if let Some(nl) = window.iter().position(|&b| b == b'\n') {
                self.pending.extend_from_slice(&window[..nl]);
                emit(Tag::Full, &self.pending);
                self.pending.clear();
                data = &data[nl + 1..];
            } else {
                self.pending.extend_from_slice(window);
                data = &data[window.len()..];
                if self.pending.len() == MAX_LINE {
                    emit(Tag::Partial, &self.pending);
                    self.pending.clear();
                }
            }
        }
    }

    /// Bytes fed but not in a record yet.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The stream ended: what is left becomes a partial record.
    pub fn finish(&mut self, emit: &mut dyn FnMut(Tag, &[u8])) {
        if !self.pending.is_empty() {
            emit(Tag::Partial, &self.pending);
            self.pending.clear();
        }
    }
}

/// A container's log file, shared by its stdout and stderr copiers.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: File,
    written: u64,
    truncated: bool,
}

/// A log file behind a lock.
pub type SharedLog = Arc<Mutex<LogFile>>;

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl LogFile {
    /// Opens (creates, appends to) `path`, making its directory.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            file: open_append(path)?,
            written: 0,
            truncated: false,
        })
    }

    /// Writes one record, unless the file is full.
    pub fn write(&mut self, stream: Stream, tag: Tag, text: &[u8]) {
        if self.truncated {
            return;
        }
        let now = timestamp(chrono::Utc::now());
        let rec = record(&now, stream, tag, text);
        if self.written + rec.len() as u64 > MAX_LOG_BYTES {
            self.truncated = true;
            let note = record(
                &now,
                Stream::Stderr,
                Tag::Full,
                format!("[atoll-cri: log larger than {MAX_LOG_BYTES} bytes; dropped until it is rotated]").as_bytes(),
            );
            let _ = self.file.write_all(&note);
            return;
        }
        match self.file.write_all(&rec) {
            Ok(()) => self.written += rec.len() as u64,
            Err(e) => tracing::warn!("{}: {e}", self.path.display()),
        }
    }

    /// Opens the path again (kubelet renamed the file away to rotate it).
    pub fn reopen(&mut self) -> io::Result<()> {
        self.file = open_append(&self.path)?;
        self.written = 0;
        self.truncated = false;
        Ok(())
    }
}

/// Copies `src` into `log` as `stream` records until `src` ends.
pub fn copy(mut src: impl Read, stream: Stream, log: &SharedLog, mut stored: impl FnMut(u64)) {
    let mut lines = Lines::default();
    let mut buf = vec![0u8; 32 << 10];
    let mut emit = |tag: Tag, text: &[u8]| {
        log.lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(stream, tag, text);
    };
    // Bytes of the stream read, and of those the ones in the log.
    let (mut read, mut logged) = (0u64, 0u64);
    loop {
        match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                lines.feed(&buf[..n], &mut emit);
                read += n as u64;
                let now = read - lines.pending_len() as u64;
                if now != logged {
                    logged = now;
                    stored(logged);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    lines.finish(&mut emit);
    if read != logged {
        stored(read);
    }
}

/// How many bytes of one output stream of a container are in its log, kept in a
/// small file of the pod directory so that a restarted server can ask the guest
/// to send again what its predecessor read but did not log (`Attach.resume_from`).
/// Written after the log, so a kill between the two repeats a chunk rather than
/// losing one.
#[derive(Debug)]
pub struct Offset {
    file: std::fs::File,
}

impl Offset {
    /// Where the offset of `stream` of container `id` lives in `pod_dir`.
    pub fn path(pod_dir: &Path, id: &str, stream: Stream) -> PathBuf {
        let name = match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        pod_dir.join(format!("{id}.{name}.offset"))
    }

    /// A new count at 0.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let o = Self { file };
        o.store(0);
        Ok(o)
    }

    /// The count a previous server left, to go on from.
    pub fn resume(path: &Path) -> io::Result<(Self, u64)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let mut b = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut b, 0)?;
        Ok((Self { file }, u64::from_le_bytes(b)))
    }

    /// Records `n` bytes logged.
    pub fn store(&self, n: u64) {
        let _ = std::os::unix::fs::FileExt::write_all_at(&self.file, &n.to_le_bytes(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(chunks: &[&[u8]]) -> Vec<(Tag, Vec<u8>)> {
        let mut out = Vec::new();
        let mut l = Lines::default();
        let mut emit = |t: Tag, b: &[u8]| out.push((t, b.to_vec()));
        for c in chunks {
            l.feed(c, &mut emit);
        }
        l.finish(&mut emit);
        out
    }

    #[test]
    fn a_record_is_time_stream_tag_and_text() {
        let t = chrono::DateTime::from_timestamp(1_475_713_029, 669_794_202).unwrap();
        assert_eq!(timestamp(t), "2016-10-06T00:17:09.669794202Z");
        assert_eq!(
            record(&timestamp(t), Stream::Stdout, Tag::Full, b"hello World"),
            b"2016-10-06T00:17:09.669794202Z stdout F hello World\n"
        );
        // The space after the tag stays for an empty line (kubelet needs it).
        assert_eq!(
            record("T", Stream::Stderr, Tag::Partial, b""),
            b"T stderr P \n"
        );
    }

    #[test]
    fn the_offset_counts_only_bytes_in_the_log_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log: SharedLog = Arc::new(Mutex::new(
            LogFile::open(&dir.path().join("0.log")).unwrap(),
        ));
        /// Reads one chunk per call.
        struct Chunks(Vec<&'static [u8]>);
        impl Read for Chunks {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Ok(0);
                }
                let c = self.0.remove(0);
                out[..c.len()].copy_from_slice(c);
                Ok(c.len())
            }
        }
        let mut seen = Vec::new();
        copy(
            Chunks(vec![b"ab\nc", b"d", b"\nef"]),
            Stream::Stdout,
            &log,
            |n| seen.push(n),
        );
        // "c" waits for its line's end; "ef" is logged as a partial record at the end.
        assert_eq!(seen, [3, 6, 8]);
        let path = Offset::path(dir.path(), "c1", Stream::Stderr);
        let o = Offset::create(&path).unwrap();
        o.store(1234);
        drop(o);
        assert_eq!(Offset::resume(&path).unwrap().1, 1234);
        assert!(Offset::resume(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn lines_split_across_reads_are_joined_and_the_rest_is_partial() {
        assert_eq!(
            records(&[b"hel", b"lo\nwor", b"ld\n\nend"]),
            vec![
                (Tag::Full, b"hello".to_vec()),
                (Tag::Full, b"world".to_vec()),
                (Tag::Full, b"".to_vec()),
                (Tag::Partial, b"end".to_vec()),
            ]
        );
    }

    #[test]
    fn long_lines_are_cut_into_partial_records() {
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let mut input = long.clone();
        input.push(b'\n');
        let r = records(&[&input]);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].0, r[0].1.len()), (Tag::Partial, MAX_LINE));
        assert_eq!((r[1].0, r[1].1.len()), (Tag::Partial, MAX_LINE));
        assert_eq!((r[2].0, r[2].1.len()), (Tag::Full, 10));
        let joined: Vec<u8> = r.iter().flat_map(|(_, b)| b.clone()).collect();
        assert_eq!(joined, long);
    }

    #[test]
    fn the_log_file_is_bounded_and_reopen_starts_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/0.log");
        let log: SharedLog = Arc::new(Mutex::new(LogFile::open(&path).unwrap()));
        copy(&b"one\ntwo"[..], Stream::Stdout, &log, |_| {});
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].ends_with(" stdout F one"), "{text}");
        assert!(lines[1].ends_with(" stdout P two"), "{text}");
        std::fs::rename(&path, dir.path().join("c/0.log.1")).unwrap();
        log.lock().unwrap().reopen().unwrap();
        copy(&b"three\n"[..], Stream::Stderr, &log, |_| {});
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with(" stderr F three\n") && text.lines().count() == 1,
            "{text}"
        );
        // Past the bound: one note, then nothing.
        log.lock().unwrap().written = MAX_LOG_BYTES - 10;
        copy(
            &b"too long for the rest\nmore\n"[..],
            Stream::Stdout,
            &log,
            |_| {},
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.matches("dropped until it is rotated").count(),
            1,
            "{text}"
        );
        assert!(!text.contains("more"), "{text}");
    }
}
