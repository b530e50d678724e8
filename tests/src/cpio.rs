//! A minimal writer for the `newc` cpio format (the format the Linux kernel unpacks
//! as an initramfs).
//!
//! Only what the node's initramfs needs: directories, regular files (streamed from a
//! reader), symlinks and device nodes, all owned by root. No hardlinks, no checksums
//! (`070701`, not `070702`). Inode numbers are assigned sequentially, so an archive's
//! bytes depend only on the entries written and their order (mtime is fixed at 0).

use std::io::{self, Read, Write};

/// Magic of a `newc` header without checksum.
const MAGIC: &[u8; 6] = b"070701";
/// Name of the entry that terminates an archive.
const TRAILER: &str = "TRAILER!!!";

/// File type bits (`S_IF*`) as the kernel expects them in the mode field.
pub const S_IFDIR: u32 = 0o040_000;
/// Regular file.
pub const S_IFREG: u32 = 0o100_000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120_000;
/// Character device.
pub const S_IFCHR: u32 = 0o020_000;

/// Writing a cpio entry failed.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// The underlying writer or a file reader failed.
    #[error("writing the cpio archive failed")]
    Io(#[from] io::Error),
    /// A field does not fit the format's 32-bit hex fields.
    #[error("entry {name:?}: {field} {value} does not fit a 32-bit cpio field")]
    TooLarge {
        /// Entry name.
        name: String,
        /// Which field overflowed.
        field: &'static str,
        /// The value that did not fit.
        value: u64,
    },
    /// Names must be relative (the kernel unpacks them below `/`) and free of NULs.
    #[error("entry name {0:?} is empty, absolute or contains a NUL byte")]
    BadName(String),
}

/// Streams `newc` entries into `W`; call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

/// The numeric fields of one header.
struct Header {
    mode: u32,
    size: u64,
    rdev_major: u32,
    rdev_minor: u32,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Adds a directory with permission bits `perm` (e.g. `0o755`).
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        let h = Header {
            mode: S_IFDIR | (perm & 0o7777),
            size: 0,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.header(name, &h)
    }

    /// Adds a regular file of exactly `size` bytes read from `data`.
    pub fn file(
        &mut self,
        name: &str,
        perm: u32,
        size: u64,
        data: &mut dyn Read,
    ) -> Result<(), CpioError> {
        let h = Header {
            mode: S_IFREG | (perm & 0o7777),
            size,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.header(name, &h)?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        if copied != size {
            return Err(CpioError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name}: file shrank while archiving ({copied} of {size} bytes)"),
            )));
        }
        self.written += copied;
        self.pad()
    }

    /// Adds a regular file from memory.
    pub fn file_bytes(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        let len = u64::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            name: name.to_owned(),
            field: "filesize",
            value: u64::MAX,
        })?;
        self.file(name, perm, len, &mut &data[..])
    }

    /// Adds a symbolic link `name -> target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        let h = Header {
            mode: S_IFLNK | 0o777,
            size: target.len() as u64,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.header(name, &h)?;
        self.out.write_all(target.as_bytes())?;
        self.written += target.len() as u64;
        self.pad()
    }

    /// Adds a character device node (e.g. `dev/console`, 5:1).
    pub fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        let h = Header {
            mode: S_IFCHR | (perm & 0o7777),
            size: 0,
            rdev_major: major,
            rdev_minor: minor,
        };
        self.header(name, &h)
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        let h = Header {
            mode: 0,
            size: 0,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.raw_header(TRAILER, &h, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(&mut self, name: &str, h: &Header) -> Result<(), CpioError> {
        if name.is_empty() || name.starts_with('/') || name.contains('\0') {
            return Err(CpioError::BadName(name.to_owned()));
        }
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        self.raw_header(name, h, ino)
    }

    fn raw_header(&mut self, name: &str, h: &Header, ino: u32) -> Result<(), CpioError> {
        let size = u32::try_from(h.size).map_err(|_| CpioError::TooLarge {
            name: name.to_owned(),
            field: "filesize",
            value: h.size,
        })?;
        // The name size counts the terminating NUL.
        let namesize = u32::try_from(name.len() + 1).map_err(|_| CpioError::TooLarge {
            name: name.to_owned(),
            field: "namesize",
            value: name.len() as u64 + 1,
        })?;
        let nlink: u32 = if h.mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let fields: [u32; 13] = [
            ino,
            h.mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            h.rdev_major,
            h.rdev_minor,
            namesize,
            0, // check
        ];
        let mut head = Vec::with_capacity(110 + name.len() + 4);
        head.extend_from_slice(MAGIC);
        for f in fields {
            head.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        head.extend_from_slice(name.as_bytes());
        head.push(0);
        self.out.write_all(&head)?;
        self.written += head.len() as u64;
        self.pad()
    }

    /// Pads the stream to a multiple of 4 bytes (header+name and data are each aligned).
    fn pad(&mut self) -> Result<(), CpioError> {
        let rem = (4 - (self.written % 4)) % 4;
        if rem > 0 {
            let zeros = [0u8; 4];
            // rem < 4, so the cast cannot truncate.
            self.out.write_all(&zeros[..rem as usize])?;
            self.written += rem;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parsed entry: (name, mode, rdev major, rdev minor, data).
    type Entry = (String, u32, u32, u32, Vec<u8>);

    /// A small newc reader, enough to check what the writer produced.
    fn parse(mut buf: &[u8]) -> Vec<Entry> {
        let mut entries = Vec::new();
        let mut off = 0usize;
        loop {
            assert_eq!(&buf[..6], MAGIC, "bad magic at offset {off}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[6 + i * 8..6 + (i + 1) * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let mode = field(1);
            let size = field(6) as usize;
            let (rmaj, rmin) = (field(9), field(10));
            let namesize = field(11) as usize;
            let name = std::str::from_utf8(&buf[110..110 + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(buf[110 + namesize - 1], 0, "name not NUL-terminated");
            let data_start = (110 + namesize).div_ceil(4) * 4;
            let data = buf[data_start..data_start + size].to_vec();
            let next = (data_start + size).div_ceil(4) * 4;
            off += next;
            buf = &buf[next..];
            if name == TRAILER {
                assert!(buf.is_empty(), "bytes after trailer");
                return entries;
            }
            entries.push((name, mode, rmaj, rmin, data));
        }
    }

    #[test]
    fn cpio_entries_round_trip_with_types_and_data() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file_bytes("bin/hello", 0o755, b"abcde").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.file_bytes("empty", 0o644, b"").unwrap();
        let written = w.written();
        let bytes = w.finish().unwrap();
        assert!(bytes.len() as u64 > written);
        assert_eq!(bytes.len() % 4, 0);

        let e = parse(&bytes);
        assert_eq!(e.len(), 5);
        assert_eq!(e[0].0, "bin");
        assert_eq!(e[0].1, S_IFDIR | 0o755);
        assert_eq!(e[1].0, "bin/hello");
        assert_eq!(e[1].1, S_IFREG | 0o755);
        assert_eq!(e[1].4, b"abcde");
        assert_eq!(e[2].1, S_IFLNK | 0o777);
        assert_eq!(e[2].4, b"busybox");
        assert_eq!((e[3].1, e[3].2, e[3].3), (S_IFCHR | 0o600, 5, 1));
        assert_eq!(e[4].4, b"");
    }

    #[test]
    fn cpio_absolute_name_is_rejected() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(matches!(
            w.file_bytes("/etc/passwd", 0o644, b"x"),
            Err(CpioError::BadName(_))
        ));
    }

    #[test]
    fn cpio_short_reader_is_an_error() {
        let mut w = CpioWriter::new(Vec::new());
        let r = w.file("f", 0o644, 10, &mut &b"abc"[..]);
        assert!(matches!(r, Err(CpioError::Io(_))));
    }

    #[test]
    fn cpio_output_is_accepted_by_gnu_cpio_when_available() {
        let Ok(status) = std::process::Command::new("cpio")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status()
        else {
            return; // cpio(1) is an optional cross-check
        };
        assert!(status.success());
        let mut w = CpioWriter::new(Vec::new());
        w.dir("d", 0o755).unwrap();
        w.file_bytes("d/f", 0o644, b"123").unwrap();
        w.symlink("d/l", "f").unwrap();
        let bytes = w.finish().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "-H", "newc"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "d\nd/f\nd/l\n");
    }
}
