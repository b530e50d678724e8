//! The guest initramfs: an uncompressed newc archive holding `/init` (the static
//! atoll-init binary), the mount points PID 1 needs (`dev proc sys run tmp etc`),
//! `/dev/console` (so the kernel can open a console before devtmpfs is mounted) and
//! any extra host files or directory trees.
//!
//! All entries are owned by root; the mtime is `SOURCE_DATE_EPOCH` when set, else 0,
//! so the same inputs give the same bytes. The archive is written to a temporary file
//! next to the output and renamed into place.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::cpio::{EntryMeta, NewcWriter, WriteCpioError};

/// Directories every Atoll initramfs has, with their permissions.
pub const BASE_DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("etc", 0o755),
];

/// Errors while building an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum BuildInitramfsError {
    #[error("invalid --add {spec:?}: expected HOST:GUEST, e.g. ./busybox:/bin/busybox")]
    BadAddSpec { spec: String },
    #[error("invalid guest path {path:?}: {reason}")]
    BadGuestPath { path: String, reason: &'static str },
    #[error("cannot read {path}")]
    ReadHost {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: unsupported file type (only files, directories and symlinks)")]
    UnsupportedFileType { path: PathBuf },
    #[error("{path}: the name or symlink target is not valid UTF-8")]
    NonUtf8 { path: PathBuf },
    #[error("/{guest} is added twice (from {first} and {second})")]
    Duplicate {
        guest: String,
        first: String,
        second: String,
    },
    #[error("/{guest} is used both as a directory and as a file")]
    NotADirectory { guest: String },
    #[error("cannot write {path}")]
    WriteOutput {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `--busybox` did not list its applets.
    #[error("{path} is not a usable busybox: `{path} --list` failed or listed odd names", path = path.display())]
    BadBusybox { path: PathBuf },
    #[error("cannot write the archive")]
    Archive(#[from] WriteCpioError),
}

/// One `--add HOST:GUEST`: a host file, symlink or directory tree placed at `GUEST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddSpec {
    pub host: PathBuf,
    /// Normalised guest path, relative to the archive root (`usr/bin/x`).
    pub guest: String,
}

impl FromStr for AddSpec {
    type Err = BuildInitramfsError;

    /// Splits at the last `:` so host paths may contain colons.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = || BuildInitramfsError::BadAddSpec {
            spec: spec.to_owned(),
        };
        let (host, guest) = spec.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || guest.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            host: PathBuf::from(host),
            guest: normalize_guest_path(guest)?,
        })
    }
}

/// What to put in the initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// The static init binary, stored as `/init` with mode 0755.
    pub init: PathBuf,
    pub extra: Vec<AddSpec>,
    /// A static busybox to install as `/bin/busybox`, with one `/bin/<applet>`
    /// symlink per applet it lists (`busybox --list`), so guest commands find
    /// `sh`, `cat`, ... on PATH.
    pub busybox: Option<PathBuf>,
    /// Modification time of every entry.
    pub mtime: u32,
}

impl InitramfsSpec {
    /// A spec with the mtime taken from `SOURCE_DATE_EPOCH` (0 when unset or invalid).
    pub fn new(init: PathBuf, extra: Vec<AddSpec>) -> Self {
        let mtime = std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Self {
            init,
            extra,
            busybox: None,
            mtime,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsSummary {
    pub entries: usize,
    pub bytes: u64,
}

/// Turns `/usr//bin/./x` into `usr/bin/x`; rejects `..` and the root itself.
pub fn normalize_guest_path(path: &str) -> Result<String, BuildInitramfsError> {
    let bad = |reason| BuildInitramfsError::BadGuestPath {
        path: path.to_owned(),
        reason,
    };
    if path.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(bad("'..' is not allowed")),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(bad("names the root directory"));
    }
    Ok(parts.join("/"))
}

/// Writes the initramfs described by `spec` to `out` atomically.
pub fn write_initramfs(
    spec: &InitramfsSpec,
    out: &Path,
) -> Result<InitramfsSummary, BuildInitramfsError> {
    let write_err = |source| BuildInitramfsError::WriteOutput {
        path: out.to_owned(),
        source,
    };
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = out
        .file_name()
        .ok_or_else(|| write_err(io::Error::other("the output path has no file name")))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let file = fs::File::create(&tmp).map_err(write_err)?;
        let mut builder = Builder::new(BufWriter::new(file), spec.mtime);
        builder.add_base(&spec.init)?;
        for add in &spec.extra {
            builder.add_host(&add.host, &add.guest)?;
        }
        if let Some(busybox) = &spec.busybox {
            builder.add_busybox(busybox)?;
        }
        let (entries, buffered) = builder.finish()?;
        let file = buffered
            .into_inner()
            .map_err(|e| write_err(e.into_error()))?;
        file.sync_all().map_err(write_err)?;
        let bytes = file.metadata().map_err(write_err)?.len();
        drop(file);
        fs::rename(&tmp, out).map_err(write_err)?;
        Ok(InitramfsSummary { entries, bytes })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The applet names `busybox --list` prints, each checked to be a plain file name.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, BuildInitramfsError> {
    let out = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|source| BuildInitramfsError::ReadHost {
            path: busybox.to_owned(),
            source,
        })?;
    let bad = || BuildInitramfsError::BadBusybox {
        path: busybox.to_owned(),
    };
    if !out.status.success() {
        return Err(bad());
    }
    let text = String::from_utf8(out.stdout).map_err(|_| bad())?;
    let applets: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    if applets.is_empty()
        || applets
            .iter()
            .any(|a| a.contains('/') || a == "." || a == "..")
    {
        return Err(bad());
    }
    Ok(applets)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    Other,
}

/// Emits entries in order, creating parent directories first and refusing duplicates.
struct Builder<W: Write> {
    cpio: NewcWriter<W>,
    mtime: u32,
    /// Guest path -> (kind, where it came from), for duplicate detection.
    seen: BTreeMap<String, (Kind, String)>,
}

impl<W: Write> Builder<W> {
    fn new(out: W, mtime: u32) -> Self {
        Self {
            cpio: NewcWriter::new(out),
            mtime,
            seen: BTreeMap::new(),
        }
    }

    fn meta(&self, perm: u32) -> EntryMeta {
        EntryMeta::root(perm).with_mtime(self.mtime)
    }

    fn add_base(&mut self, init: &Path) -> Result<(), BuildInitramfsError> {
        for (dir, perm) in BASE_DIRS {
            self.dir(dir, *perm, "base layout")?;
        }
        self.claim("dev/console", Kind::Other, "base layout")?;
        self.cpio
            .char_device("dev/console", self.meta(0o600), 5, 1)?;
        let meta = fs::metadata(init).map_err(|source| BuildInitramfsError::ReadHost {
            path: init.to_owned(),
            source,
        })?;
        if !meta.is_file() {
            return Err(BuildInitramfsError::UnsupportedFileType {
                path: init.to_owned(),
            });
        }
        self.claim("init", Kind::Other, &init.display().to_string())?;
        self.cpio.file_from_path("init", self.meta(0o755), init)?;
        Ok(())
    }

    /// Adds `host` at `guest`. A symlink given on the command line is followed; inside
    /// a directory tree symlinks are kept as symlinks.
    fn add_host(&mut self, host: &Path, guest: &str) -> Result<(), BuildInitramfsError> {
        let meta = fs::metadata(host).map_err(|source| BuildInitramfsError::ReadHost {
            path: host.to_owned(),
            source,
        })?;
        self.parents(guest)?;
        self.add_entry(host, guest, &meta)
    }

    fn add_entry(
        &mut self,
        host: &Path,
        guest: &str,
        meta: &fs::Metadata,
    ) -> Result<(), BuildInitramfsError> {
        let read_err = |source| BuildInitramfsError::ReadHost {
            path: host.to_owned(),
            source,
        };
        let perm = meta.mode() & 0o7777;
        let origin = host.display().to_string();
        let ft = meta.file_type();
        if ft.is_dir() {
            self.dir(guest, perm, &origin)?;
            let mut children: Vec<_> = fs::read_dir(host)
                .map_err(read_err)?
                .collect::<Result<_, _>>()
                .map_err(read_err)?;
            children.sort_by_key(|e| e.file_name());
            for child in children {
                let name = child.file_name();
                let name = name
                    .to_str()
                    .ok_or_else(|| BuildInitramfsError::NonUtf8 { path: child.path() })?;
                let child_meta = fs::symlink_metadata(child.path()).map_err(|source| {
                    BuildInitramfsError::ReadHost {
                        path: child.path(),
                        source,
                    }
                })?;
                self.add_entry(&child.path(), &format!("{guest}/{name}"), &child_meta)?;
            }
        } else if ft.is_file() {
            self.claim(guest, Kind::Other, &origin)?;
            self.cpio.file_from_path(guest, self.meta(perm), host)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(host).map_err(read_err)?;
            let target = target
                .to_str()
                .ok_or_else(|| BuildInitramfsError::NonUtf8 {
                    path: host.to_owned(),
                })?;
            self.claim(guest, Kind::Other, &origin)?;
            self.cpio.symlink(guest, self.meta(0o777), target)?;
        } else {
            return Err(BuildInitramfsError::UnsupportedFileType {
                path: host.to_owned(),
            });
        }
        Ok(())
    }

    /// Adds a busybox binary as `bin/busybox` and a symlink per applet in `bin/`,
    /// except where an earlier entry already claimed the name.
    fn add_busybox(&mut self, busybox: &Path) -> Result<(), BuildInitramfsError> {
        let list = busybox_applets(busybox)?;
        self.add_host(busybox, "bin/busybox")?;
        for applet in list {
            let guest = format!("bin/{applet}");
            if self.seen.contains_key(&guest) {
                continue;
            }
            self.claim(&guest, Kind::Other, "busybox applet")?;
            self.cpio.symlink(&guest, self.meta(0o777), "busybox")?;
        }
        Ok(())
    }

    /// Emits every missing ancestor of `guest` as a 0755 directory.
    fn parents(&mut self, guest: &str) -> Result<(), BuildInitramfsError> {
        let mut end = 0;
        while let Some(i) = guest[end..].find('/') {
            end += i;
            self.dir(&guest[..end], 0o755, "parent directory")?;
            end += 1;
        }
        Ok(())
    }

    /// Emits a directory unless it already exists (directories merge).
    fn dir(&mut self, guest: &str, perm: u32, origin: &str) -> Result<(), BuildInitramfsError> {
        match self.seen.get(guest) {
            Some((Kind::Dir, _)) => Ok(()),
            Some((Kind::Other, _)) => Err(BuildInitramfsError::NotADirectory {
                guest: guest.to_owned(),
            }),
            None => {
                self.seen
                    .insert(guest.to_owned(), (Kind::Dir, origin.to_owned()));
                self.cpio.directory(guest, self.meta(perm))?;
                Ok(())
            }
        }
    }

    fn claim(&mut self, guest: &str, kind: Kind, origin: &str) -> Result<(), BuildInitramfsError> {
        if let Some((_, first)) = self.seen.get(guest) {
            return Err(BuildInitramfsError::Duplicate {
                guest: guest.to_owned(),
                first: first.clone(),
                second: origin.to_owned(),
            });
        }
        self.seen
            .insert(guest.to_owned(), (kind, origin.to_owned()));
        Ok(())
    }

    /// Writes the trailer; returns the number of entries and the writer.
    fn finish(self) -> Result<(usize, W), BuildInitramfsError> {
        let entries = self.seen.len();
        Ok((entries, self.cpio.finish()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::tests::parse;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn normalize_guest_path_strips_slashes_and_dots() {
        assert_eq!(normalize_guest_path("/usr//bin/./x").unwrap(), "usr/bin/x");
        assert_eq!(normalize_guest_path("etc/hosts").unwrap(), "etc/hosts");
    }

    #[test]
    fn normalize_guest_path_dotdot_or_root_rejected() {
        for bad in ["/", "", "/a/../b", "..", "a\0b"] {
            assert!(
                matches!(
                    normalize_guest_path(bad),
                    Err(BuildInitramfsError::BadGuestPath { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn add_spec_splits_at_last_colon() {
        let a: AddSpec = "/host/a:b/c:/bin/c".parse().unwrap();
        assert_eq!(a.host, PathBuf::from("/host/a:b/c"));
        assert_eq!(a.guest, "bin/c");
        for bad in ["nocolon", ":/x", "/x:"] {
            assert!(bad.parse::<AddSpec>().is_err(), "{bad}");
        }
    }

    fn build(spec: &InitramfsSpec) -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.cpio");
        let summary = write_initramfs(spec, &out).unwrap();
        let bytes = fs::read(&out).unwrap();
        assert_eq!(summary.bytes, bytes.len() as u64);
        (dir, bytes)
    }

    #[test]
    fn write_initramfs_busybox_links_every_applet_to_busybox() {
        let src = tempfile::tempdir().unwrap();
        let init = src.path().join("atoll-init");
        fs::write(&init, b"\x7fELF fake").unwrap();
        // A stand-in busybox that lists two applets.
        let bb = src.path().join("busybox");
        fs::write(&bb, "#!/bin/sh\nprintf 'sh\\ncat\\n'\n").unwrap();
        fs::set_permissions(&bb, fs::Permissions::from_mode(0o755)).unwrap();
        let spec = InitramfsSpec {
            init,
            extra: vec![],
            busybox: Some(bb),
            mtime: 0,
        };
        let (_dir, bytes) = build(&spec);
        let entries = parse(&bytes);
        let find = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(find("bin/busybox").mode & 0o170_000, 0o100_000);
        for applet in ["bin/sh", "bin/cat"] {
            let e = find(applet);
            assert_eq!(e.mode & 0o170_000, 0o120_000, "{applet} is a symlink");
            assert_eq!(e.data, b"busybox");
        }
    }

    #[test]
    fn write_initramfs_busybox_that_lists_nothing_is_rejected() {
        let src = tempfile::tempdir().unwrap();
        let init = src.path().join("atoll-init");
        fs::write(&init, b"x").unwrap();
        let spec = InitramfsSpec {
            init,
            extra: vec![],
            busybox: Some(PathBuf::from("/bin/true")),
            mtime: 0,
        };
        let out = src.path().join("out.cpio");
        let err = write_initramfs(&spec, &out).unwrap_err();
        assert!(
            matches!(err, BuildInitramfsError::BadBusybox { .. }),
            "{err}"
        );
        assert!(!out.exists());
    }

    #[test]
    fn write_initramfs_base_layout_init_and_console() {
        let src = tempfile::tempdir().unwrap();
        let init = src.path().join("atoll-init");
        fs::write(&init, b"\x7fELF fake").unwrap();
        let spec = InitramfsSpec {
            init,
            extra: vec![],
            busybox: None,
            mtime: 7,
        };
        let (_dir, bytes) = build(&spec);
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "proc",
                "sys",
                "run",
                "tmp",
                "etc",
                "dev/console",
                "init",
                "TRAILER!!!"
            ]
        );
        let init = &entries[7];
        assert_eq!(init.mode, 0o100_755);
        assert_eq!(init.data, b"\x7fELF fake");
        assert_eq!(init.mtime, 7);
        assert_eq!((init.uid, init.gid), (0, 0));
        assert_eq!(entries[6].mode, 0o020_600);
        assert_eq!(entries[6].rdev, (5, 1));
        assert_eq!(entries[4].mode, 0o041_777);
    }

    #[test]
    fn write_initramfs_extra_tree_gets_parents_and_keeps_symlinks() {
        let src = tempfile::tempdir().unwrap();
        let init = src.path().join("init");
        fs::write(&init, b"i").unwrap();
        let tree = src.path().join("tree");
        fs::create_dir_all(tree.join("sub")).unwrap();
        fs::write(tree.join("sub/file"), b"data").unwrap();
        fs::set_permissions(tree.join("sub/file"), fs::Permissions::from_mode(0o640)).unwrap();
        symlink("sub/file", tree.join("link")).unwrap();
        let single = src.path().join("single");
        fs::write(&single, b"s").unwrap();
        let spec = InitramfsSpec {
            init,
            extra: vec![
                format!("{}:/opt/pkg", tree.display()).parse().unwrap(),
                format!("{}:/usr/local/bin/single", single.display())
                    .parse()
                    .unwrap(),
                format!("{}:/etc/single", single.display()).parse().unwrap(),
            ],
            busybox: None,
            mtime: 0,
        };
        let (_dir, bytes) = build(&spec);
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            &names[8..],
            [
                "opt",
                "opt/pkg",
                "opt/pkg/link",
                "opt/pkg/sub",
                "opt/pkg/sub/file",
                "usr",
                "usr/local",
                "usr/local/bin",
                "usr/local/bin/single",
                "etc/single",
                "TRAILER!!!"
            ]
        );
        let link = entries.iter().find(|e| e.name == "opt/pkg/link").unwrap();
        assert_eq!(link.mode, 0o120_777);
        assert_eq!(link.data, b"sub/file");
        let file = entries
            .iter()
            .find(|e| e.name == "opt/pkg/sub/file")
            .unwrap();
        assert_eq!(file.mode, 0o100_640);
        assert_eq!(file.data, b"data");
    }

    #[test]
    fn write_initramfs_duplicate_guest_path_fails_and_leaves_no_output() {
        let src = tempfile::tempdir().unwrap();
        let init = src.path().join("init");
        fs::write(&init, b"i").unwrap();
        let spec = InitramfsSpec {
            init: init.clone(),
            extra: vec![format!("{}:/init", init.display()).parse().unwrap()],
            busybox: None,
            mtime: 0,
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.cpio");
        let err = write_initramfs(&spec, &out).unwrap_err();
        assert!(
            matches!(err, BuildInitramfsError::Duplicate { .. }),
            "{err}"
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn write_initramfs_file_over_base_directory_fails() {
        let src = tempfile::tempdir().unwrap();
        let init = src.path().join("init");
        fs::write(&init, b"i").unwrap();
        let spec = InitramfsSpec {
            init: init.clone(),
            extra: vec![format!("{}:/dev/console/x", init.display())
                .parse()
                .unwrap()],
            busybox: None,
            mtime: 0,
        };
        let dir = tempfile::tempdir().unwrap();
        let err = write_initramfs(&spec, &dir.path().join("o")).unwrap_err();
        assert!(
            matches!(err, BuildInitramfsError::NotADirectory { .. }),
            "{err}"
        );
    }
}
