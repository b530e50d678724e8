//! A writer for the SVR4 "newc" cpio format (magic `070701`), the archive format the
//! Linux kernel unpacks as an initramfs (`init/initramfs.c`).
//!
//! Each entry is a 110-byte ASCII header (13 fields of 8 hex digits after the magic),
//! the NUL-terminated name padded so the data starts on a 4-byte boundary, then the
//! data padded to 4 bytes. The archive ends with an entry named `TRAILER!!!`.
//!
//! The writer gives every entry its own inode number and a link count of 1 (2 for
//! directories), so the kernel never mistakes two files for hard links of each other.
//! Names are stored relative (`dev/console`, not `/dev/console`); the writer does not
//! create parent directories: callers emit a directory before its contents, because
//! the kernel's unpacker does not create missing parents.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Magic of the "new ASCII" (newc) format without checksums.
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Name of the entry that ends every archive.
pub const TRAILER_NAME: &str = "TRAILER!!!";
/// Size of a newc header in bytes (magic + 13 × 8 hex digits).
pub const HEADER_LEN: usize = 110;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFBLK: u32 = 0o060_000;
const PERMISSION_BITS: u32 = 0o7777;

/// Errors while writing a cpio archive.
#[derive(Debug, thiserror::Error)]
pub enum WriteCpioError {
    #[error("writing the cpio archive failed")]
    Io(#[from] io::Error),
    #[error("invalid cpio entry name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("{name}: {size} bytes does not fit the 32-bit newc size field")]
    TooLarge { name: String, size: u64 },
    #[error("{name}: expected {expected} bytes of data, the source gave {actual}")]
    SizeMismatch {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error("cannot read {path}")]
    ReadSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the archive is full: no more inode numbers")]
    InodesExhausted,
}

/// Ownership, permissions and modification time of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMeta {
    /// Permission bits including setuid/setgid/sticky (`0o7777` mask); the file type
    /// is added by the writer.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the Unix epoch.
    pub mtime: u32,
}

impl EntryMeta {
    /// Owned by root:root with the given permission bits and mtime 0.
    pub fn root(perm: u32) -> Self {
        Self {
            perm,
            uid: 0,
            gid: 0,
            mtime: 0,
        }
    }

    /// The same metadata with another modification time.
    pub fn with_mtime(self, mtime: u32) -> Self {
        Self { mtime, ..self }
    }
}

/// Streams entries into a newc archive. Call [`NewcWriter::finish`] to append the
/// trailer; an archive dropped without it is incomplete.
pub struct NewcWriter<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
}

impl<W: Write> NewcWriter<W> {
    /// Starts an archive on `out`. Inode numbers start at 1 (the trailer uses 0).
    pub fn new(out: W) -> Self {
        Self {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// Adds a directory.
    pub fn directory(&mut self, name: &str, meta: EntryMeta) -> Result<(), WriteCpioError> {
        let header = self.header(name, S_IFDIR, meta, 2, 0, (0, 0))?;
        self.emit_header(&header, name)
    }

    /// Adds a character device node such as `dev/console` (5, 1).
    pub fn char_device(
        &mut self,
        name: &str,
        meta: EntryMeta,
        major: u32,
        minor: u32,
    ) -> Result<(), WriteCpioError> {
        let header = self.header(name, S_IFCHR, meta, 1, 0, (major, minor))?;
        self.emit_header(&header, name)
    }

    /// Adds a block device node.
    pub fn block_device(
        &mut self,
        name: &str,
        meta: EntryMeta,
        major: u32,
        minor: u32,
    ) -> Result<(), WriteCpioError> {
        let header = self.header(name, S_IFBLK, meta, 1, 0, (major, minor))?;
        self.emit_header(&header, name)
    }

    /// Adds a symbolic link; the target is stored as the entry's data.
    pub fn symlink(
        &mut self,
        name: &str,
        meta: EntryMeta,
        target: &str,
    ) -> Result<(), WriteCpioError> {
        if target.is_empty() || target.contains('\0') {
            return Err(WriteCpioError::InvalidName {
                name: target.to_owned(),
                reason: "a symlink target must be non-empty and contain no NUL",
            });
        }
        let size = data_size(name, target.len() as u64)?;
        let header = self.header(name, S_IFLNK, meta, 1, size, (0, 0))?;
        self.emit_header(&header, name)?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    /// Adds a regular file whose `size` bytes are read from `data`. Fails if `data`
    /// gives fewer or more bytes than announced.
    pub fn file(
        &mut self,
        name: &str,
        meta: EntryMeta,
        size: u64,
        data: &mut dyn Read,
    ) -> Result<(), WriteCpioError> {
        let size32 = data_size(name, size)?;
        let header = self.header(name, S_IFREG, meta, 1, size32, (0, 0))?;
        self.emit_header(&header, name)?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        self.offset += copied;
        let mut probe = [0u8; 1];
        let extra = data.read(&mut probe)?;
        if copied != size || extra != 0 {
            return Err(WriteCpioError::SizeMismatch {
                name: name.to_owned(),
                expected: size,
                actual: copied + extra as u64,
            });
        }
        self.pad()
    }

    /// Adds a regular file streamed from `host` (its contents only: metadata comes
    /// from `meta`).
    pub fn file_from_path(
        &mut self,
        name: &str,
        meta: EntryMeta,
        host: &Path,
    ) -> Result<(), WriteCpioError> {
        let read_err = |source| WriteCpioError::ReadSource {
            path: host.to_owned(),
            source,
        };
        let mut f = std::fs::File::open(host).map_err(read_err)?;
        let size = f.metadata().map_err(read_err)?.len();
        self.file(name, meta, size, &mut f)
    }

    /// Writes the trailer and returns the underlying writer (flushed).
    pub fn finish(mut self) -> Result<W, WriteCpioError> {
        let header = format_header(0, 0, EntryMeta::root(0), 1, 0, (0, 0), TRAILER_NAME);
        self.put(header.as_bytes())?;
        self.put_name(TRAILER_NAME)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(
        &mut self,
        name: &str,
        file_type: u32,
        meta: EntryMeta,
        nlink: u32,
        size: u32,
        rdev: (u32, u32),
    ) -> Result<String, WriteCpioError> {
        validate_name(name)?;
        let ino = self.next_ino;
        self.next_ino = ino.checked_add(1).ok_or(WriteCpioError::InodesExhausted)?;
        let mode = file_type | (meta.perm & PERMISSION_BITS);
        Ok(format_header(ino, mode, meta, nlink, size, rdev, name))
    }

    fn emit_header(&mut self, header: &str, name: &str) -> Result<(), WriteCpioError> {
        self.put(header.as_bytes())?;
        self.put_name(name)
    }

    fn put_name(&mut self, name: &str) -> Result<(), WriteCpioError> {
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), WriteCpioError> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Pads with NULs to the next multiple of 4 bytes.
    fn pad(&mut self) -> Result<(), WriteCpioError> {
        let rem = (self.offset % 4) as usize;
        if rem != 0 {
            self.put(&[0u8; 3][..4 - rem])?;
        }
        Ok(())
    }
}

fn data_size(name: &str, size: u64) -> Result<u32, WriteCpioError> {
    u32::try_from(size).map_err(|_| WriteCpioError::TooLarge {
        name: name.to_owned(),
        size,
    })
}

/// Names are relative paths without `.`/`..` components, as the kernel expects them.
fn validate_name(name: &str) -> Result<(), WriteCpioError> {
    let invalid = |reason| {
        Err(WriteCpioError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("empty name");
    }
    if name.contains('\0') {
        return invalid("contains a NUL byte");
    }
    if name.starts_with('/') {
        return invalid("names must be relative (no leading '/')");
    }
    if name == TRAILER_NAME {
        return invalid("reserved for the archive trailer");
    }
    if name
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return invalid("empty, '.' or '..' path component");
    }
    Ok(())
}

fn format_header(
    ino: u32,
    mode: u32,
    meta: EntryMeta,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
    name: &str,
) -> String {
    // namesize counts the terminating NUL; the name length is bounded by the caller's
    // string, which cannot exceed u32 in any practical archive.
    let namesize = name.len() + 1;
    format!(
        "070701{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{size:08X}\
         {devmajor:08X}{devminor:08X}{rmaj:08X}{rmin:08X}{namesize:08X}{check:08X}",
        uid = meta.uid,
        gid = meta.gid,
        mtime = meta.mtime,
        devmajor = 0,
        devminor = 0,
        rmaj = rdev.0,
        rmin = rdev.1,
        check = 0,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;

    /// One parsed entry: the fields tests look at.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Parsed {
        pub name: String,
        pub ino: u32,
        pub mode: u32,
        pub uid: u32,
        pub gid: u32,
        pub nlink: u32,
        pub mtime: u32,
        pub rdev: (u32, u32),
        pub data: Vec<u8>,
        /// Offset of the header in the archive.
        pub offset: usize,
    }

    /// A minimal newc reader used to check the writer's output byte by byte.
    pub(crate) fn parse(archive: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            assert_eq!(pos % 4, 0, "header at {pos} not aligned");
            let h = &archive[pos..pos + HEADER_LEN];
            assert_eq!(&h[..6], NEWC_MAGIC);
            let field = |i: usize| {
                let s = std::str::from_utf8(&h[6 + i * 8..14 + i * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let namesize = field(11) as usize;
            let size = field(6) as usize;
            let name_start = pos + HEADER_LEN;
            let name = std::str::from_utf8(&archive[name_start..name_start + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(archive[name_start + namesize - 1], 0);
            let data_start = (name_start + namesize).next_multiple_of(4);
            let data = archive[data_start..data_start + size].to_vec();
            out.push(Parsed {
                name: name.clone(),
                ino: field(0),
                mode: field(1),
                uid: field(2),
                gid: field(3),
                nlink: field(4),
                mtime: field(5),
                rdev: (field(9), field(10)),
                data,
                offset: pos,
            });
            pos = (data_start + size).next_multiple_of(4);
            if name == TRAILER_NAME {
                assert_eq!(pos, archive.len(), "bytes after the trailer");
                return out;
            }
        }
    }

    fn sample_archive() -> Vec<u8> {
        let mut w = NewcWriter::new(Vec::new());
        w.directory("dev", EntryMeta::root(0o755)).unwrap();
        w.char_device("dev/console", EntryMeta::root(0o600), 5, 1)
            .unwrap();
        w.directory("etc", EntryMeta::root(0o755).with_mtime(1_700_000_000))
            .unwrap();
        let body = b"hello, world\n";
        w.file(
            "etc/greeting",
            EntryMeta {
                perm: 0o644,
                uid: 1000,
                gid: 100,
                mtime: 42,
            },
            body.len() as u64,
            &mut &body[..],
        )
        .unwrap();
        w.file("etc/empty", EntryMeta::root(0o600), 0, &mut io::empty())
            .unwrap();
        w.symlink("etc/link", EntryMeta::root(0o777), "greeting")
            .unwrap();
        w.block_device("dev/vda", EntryMeta::root(0o660), 254, 0)
            .unwrap();
        w.directory("tmp", EntryMeta::root(0o1777)).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn header_directory_is_110_bytes_with_expected_fields() {
        let mut w = NewcWriter::new(Vec::new());
        w.directory("ab", EntryMeta::root(0o755).with_mtime(0x1234))
            .unwrap();
        let bytes = w.finish().unwrap();
        let header = std::str::from_utf8(&bytes[..HEADER_LEN]).unwrap();
        assert_eq!(
            header,
            "070701\
             00000001\
             000041ED\
             00000000\
             00000000\
             00000002\
             00001234\
             00000000\
             00000000\
             00000000\
             00000000\
             00000000\
             00000003\
             00000000"
        );
        // 110 + "ab\0" = 113 -> padded to 116.
        assert_eq!(&bytes[HEADER_LEN..116], b"ab\0\0\0\0");
    }

    #[test]
    fn entries_every_header_and_data_aligned_to_four_bytes() {
        let archive = sample_archive();
        assert_eq!(archive.len() % 4, 0);
        // parse() asserts the alignment of every header.
        let entries = parse(&archive);
        assert_eq!(entries.len(), 9);
    }

    #[test]
    fn entries_round_trip_names_modes_owners_and_data() {
        let entries = parse(&sample_archive());
        let by_name = |n: &str| entries.iter().find(|e| e.name == n).unwrap().clone();
        assert_eq!(by_name("dev").mode, 0o040_755);
        assert_eq!(by_name("dev").nlink, 2);
        assert_eq!(by_name("dev/console").mode, 0o020_600);
        assert_eq!(by_name("dev/console").rdev, (5, 1));
        assert_eq!(by_name("dev/vda").mode, 0o060_660);
        assert_eq!(by_name("dev/vda").rdev, (254, 0));
        assert_eq!(by_name("etc").mtime, 1_700_000_000);
        let g = by_name("etc/greeting");
        assert_eq!(
            (g.mode, g.uid, g.gid, g.mtime, g.nlink),
            (0o100_644, 1000, 100, 42, 1)
        );
        assert_eq!(g.data, b"hello, world\n");
        assert_eq!(by_name("etc/empty").data, b"");
        assert_eq!(by_name("etc/link").mode, 0o120_777);
        assert_eq!(by_name("etc/link").data, b"greeting");
        assert_eq!(by_name("tmp").mode, 0o041_777);
    }

    #[test]
    fn entries_inode_numbers_unique_and_trailer_last_with_ino_zero() {
        let entries = parse(&sample_archive());
        let (last, rest) = entries.split_last().unwrap();
        assert_eq!(last.name, TRAILER_NAME);
        assert_eq!((last.ino, last.mode, last.nlink), (0, 0, 1));
        let mut inos: Vec<u32> = rest.iter().map(|e| e.ino).collect();
        inos.sort_unstable();
        inos.dedup();
        assert_eq!(inos.len(), rest.len());
        assert!(!inos.contains(&0));
    }

    #[test]
    fn file_shorter_source_than_announced_fails() {
        let mut w = NewcWriter::new(Vec::new());
        let err = w
            .file("f", EntryMeta::root(0o644), 10, &mut &b"abc"[..])
            .unwrap_err();
        assert!(matches!(
            err,
            WriteCpioError::SizeMismatch {
                expected: 10,
                actual: 3,
                ..
            }
        ));
    }

    #[test]
    fn file_longer_source_than_announced_fails() {
        let mut w = NewcWriter::new(Vec::new());
        let err = w
            .file("f", EntryMeta::root(0o644), 2, &mut &b"abc"[..])
            .unwrap_err();
        assert!(matches!(err, WriteCpioError::SizeMismatch { .. }));
    }

    #[test]
    fn name_absolute_dotdot_or_trailer_rejected() {
        for bad in ["", "/init", "a/../b", "./a", "a//b", TRAILER_NAME, "a\0b"] {
            let mut w = NewcWriter::new(Vec::new());
            let err = w.directory(bad, EntryMeta::root(0o755)).unwrap_err();
            assert!(matches!(err, WriteCpioError::InvalidName { .. }), "{bad:?}");
        }
    }

    #[test]
    fn file_from_path_streams_host_contents() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("blob");
        let body: Vec<u8> = (0..100_003u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&host, &body).unwrap();
        let mut w = NewcWriter::new(Vec::new());
        w.file_from_path("blob", EntryMeta::root(0o755), &host)
            .unwrap();
        let entries = parse(&w.finish().unwrap());
        assert_eq!(entries[0].data, body);
        assert_eq!(entries[0].mode, 0o100_755);
    }

    fn gnu_cpio(args: &[&str], dir: &Path, archive: &Path) -> String {
        let out = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(std::fs::File::open(archive).unwrap())
            .output()
            .expect("GNU cpio must be installed for this test (apt-get install cpio)");
        assert!(out.status.success(), "cpio failed: {out:?}");
        // GNU cpio prints the listing on stdout (-t) or stderr (-v while extracting).
        let mut text = String::from_utf8(out.stdout).unwrap();
        text.push_str(&String::from_utf8(out.stderr).unwrap());
        text
    }

    #[test]
    fn gnu_cpio_lists_exactly_the_written_entries() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, sample_archive()).unwrap();
        let listing = gnu_cpio(&["-t", "--quiet"], dir.path(), &archive);
        let names: Vec<&str> = listing.lines().collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "etc",
                "etc/greeting",
                "etc/empty",
                "etc/link",
                "dev/vda",
                "tmp"
            ]
        );
        let long = gnu_cpio(&["-tv", "--quiet"], dir.path(), &archive);
        let console = long.lines().find(|l| l.ends_with("dev/console")).unwrap();
        assert!(console.starts_with("crw-------"), "{console}");
        assert!(console.contains("5,"), "{console}");
        let link = long.lines().find(|l| l.contains("etc/link")).unwrap();
        assert!(link.starts_with("lrwxrwxrwx") && link.ends_with("-> greeting"));
    }

    #[test]
    fn gnu_cpio_extracts_files_dirs_and_symlinks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let host = dir.path().join("script");
        std::fs::write(&host, b"#!/bin/sh\necho hi\n").unwrap();
        // No device nodes here: extracting them needs CAP_MKNOD.
        let mut w = NewcWriter::new(Vec::new());
        w.directory("bin", EntryMeta::root(0o755)).unwrap();
        w.file_from_path("bin/script", EntryMeta::root(0o750), &host)
            .unwrap();
        w.symlink("bin/alias", EntryMeta::root(0o777), "script")
            .unwrap();
        w.directory("bin/sub", EntryMeta::root(0o700)).unwrap();
        w.file("bin/sub/odd", EntryMeta::root(0o600), 5, &mut &b"12345"[..])
            .unwrap();
        std::fs::write(&archive, w.finish().unwrap()).unwrap();

        let listing = gnu_cpio(
            &["-idmv", "--quiet", "--no-absolute-filenames"],
            &root,
            &archive,
        );
        let mut names: Vec<&str> = listing.lines().collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["bin", "bin/alias", "bin/script", "bin/sub", "bin/sub/odd"]
        );
        let script = root.join("bin/script");
        assert_eq!(std::fs::read(&script).unwrap(), b"#!/bin/sh\necho hi\n");
        assert_eq!(
            std::fs::metadata(&script).unwrap().permissions().mode() & 0o7777,
            0o750
        );
        assert_eq!(
            std::fs::read_link(root.join("bin/alias")).unwrap(),
            Path::new("script")
        );
        assert_eq!(std::fs::read(root.join("bin/sub/odd")).unwrap(), b"12345");
        assert_eq!(
            std::fs::metadata(root.join("bin/sub"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o700
        );
    }
}
