//! Host mounts copied into a pod VM: a microVM shares no file system with the node,
//! so a read-only host directory or file (kubelet's ConfigMap, Secret, projected
//! and downward-API volumes, a read-only hostPath) is packed into one tar stream
//! and sent to the guest agent (a stream connection of kind VOLUME), which unpacks
//! it into the pod's copies tmpfs. A container then binds it read-only.
//!
//! A pod has one copy per host path ([`copy_name`]), shared by its containers as
//! the node's directory would be. Sending it again when the host path changed (a
//! ConfigMap edited, a service account token rotated) updates the guest's copy in
//! place, one atomic rename per entry, under the containers that bound it; a cheap
//! [`fingerprint`] of the tree's metadata tells when to. What a copy cannot carry
//! is refused with the path: sockets, devices and FIFOs (a live host object), OCI
//! whiteout names, and trees over [`MAX_COPY_BYTES`] or [`MAX_COPY_ENTRIES`].

use std::fs::{File, Metadata};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use atoll_agent_proto::v1::{self, attach::Stream};
use atoll_agent_proto::{read_frame, write_frame};
use sha2::{Digest, Sha256};

use crate::agent::{connect_port, AttachError, ConnectError};

/// Most bytes of file content one copy carries (ConfigMaps and Secrets are at most
/// 1 MiB each; a larger read-only tree belongs in the image).
pub const MAX_COPY_BYTES: u64 = 64 << 20;
/// Most entries one copy carries.
pub const MAX_COPY_ENTRIES: u64 = 10_000;
/// Deepest directory nesting walked.
const MAX_DEPTH: usize = 64;
/// The entry a copied file is stored as: the mount binds `copy:<name>/file`.
pub const FILE_ENTRY: &str = "file";
/// How long sending one copy may take, connection included.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// A host path that cannot be copied.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// It could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A socket, device or FIFO.
    #[error("{} is a {kind}, which cannot be copied into a microVM pod", path.display())]
    Special {
        /// Where.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// A name the guest's unpacker reads as an OCI whiteout.
    #[error("{}: names starting with \".wh.\" cannot be copied into a microVM pod", path.display())]
    Whiteout {
        /// Where.
        path: PathBuf,
    },
    /// Over a limit.
    #[error("{} holds more than {limit} {what}; a microVM pod gets copies of host mounts, up to that much", path.display())]
    TooBig {
        /// The mount's root.
        path: PathBuf,
        /// The limit.
        limit: u64,
        /// "bytes", "entries" or "levels of directories".
        what: &'static str,
    },
    /// Writing the tar failed.
    #[error("cannot write the copy of {}: {source}", path.display())]
    Write {
        /// The mount's root.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A packed host mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// sha256 of the tar stream.
    pub digest: [u8; 32],
    /// The host path was a file, stored as [`FILE_ENTRY`].
    pub is_file: bool,
    /// Bytes of the tar stream.
    pub tar_bytes: u64,
}

/// The guest's name for the copy of `host_path`: `c-` and 128 bits of its sha256.
pub fn copy_name(host_path: &Path) -> String {
    let digest = Sha256::digest(host_path.as_os_str().as_encoded_bytes());
    format!("c-{}", hex::encode(&digest[..16]))
}

/// The agent's mount source for copy `name`: `copy:<name>` or `copy:<name>/file`.
pub fn mount_source(name: &str, is_file: bool) -> String {
    if is_file {
        format!("copy:{name}/{FILE_ENTRY}")
    } else {
        format!("copy:{name}")
    }
}

/// A hash of the metadata of everything under `src` (followed at the root, not
/// below): names, types, modes, owners, sizes, change times and link targets.
/// Equal fingerprints: nothing to send. Bounded as [`pack`] is.
pub fn fingerprint(src: &Path) -> Result<[u8; 32], PackError> {
    let meta = std::fs::metadata(src).map_err(|source| PackError::Read {
        path: src.to_owned(),
        source,
    })?;
    let mut h = Sha256::new();
    let mut w = Walk {
        root: src,
        bytes: 0,
        entries: 0,
    };
    visit(
        &mut w,
        src,
        Path::new(""),
        &meta,
        0,
        &mut |path, name, meta| {
            h.update(name.as_os_str().as_encoded_bytes());
            h.update([0]);
            for v in [
                u64::from(meta.mode()),
                u64::from(meta.uid()),
                u64::from(meta.gid()),
                meta.len(),
                meta.mtime() as u64,
                meta.mtime_nsec() as u64,
                meta.ctime() as u64,
                meta.ctime_nsec() as u64,
                meta.ino(),
            ] {
                h.update(v.to_le_bytes());
            }
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(path).map_err(|source| PackError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                h.update(target.as_os_str().as_encoded_bytes());
            }
            Ok(())
        },
    )?;
    Ok(h.finalize().into())
}

/// Calls `f` on `path` (as `name`, with its metadata `meta`), then on a
/// directory's entries, sorted by name so that equal trees are visited alike,
/// symlinks not followed; every entry is counted against the limits first.
/// `pack` and `fingerprint` share it, so they see the same tree.
fn visit(
    walk: &mut Walk<'_>,
    path: &Path,
    name: &Path,
    meta: &Metadata,
    depth: usize,
    f: &mut dyn FnMut(&Path, &Path, &Metadata) -> Result<(), PackError>,
) -> Result<(), PackError> {
    let read_err = |source| PackError::Read {
        path: path.to_owned(),
        source,
    };
    if meta.is_dir() && depth > MAX_DEPTH {
        return Err(walk.too_big(MAX_DEPTH as u64, "levels of directories"));
    }
    walk.count(if meta.is_file() { meta.len() } else { 0 })?;
    f(path, name, meta)?;
    if !meta.is_dir() {
        return Ok(());
    }
    let mut children = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_err)? {
        children.push(entry.map_err(read_err)?.file_name());
        if children.len() as u64 > MAX_COPY_ENTRIES {
            return Err(walk.too_big(MAX_COPY_ENTRIES, "entries"));
        }
    }
    children.sort();
    for child in children {
        let p = path.join(&child);
        let m = std::fs::symlink_metadata(&p).map_err(|source| PackError::Read {
            path: p.clone(),
            source,
        })?;
        visit(walk, &p, &name.join(&child), &m, depth + 1, f)?;
    }
    Ok(())
}

/// Hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(buf.get(..n).unwrap_or_default());
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct Walk<'a> {
    root: &'a Path,
    bytes: u64,
    entries: u64,
}

impl Walk<'_> {
    fn too_big(&self, limit: u64, what: &'static str) -> PackError {
        PackError::TooBig {
            path: self.root.to_owned(),
            limit,
            what,
        }
    }

    /// Counts one entry of `size` content bytes against the limits.
    fn count(&mut self, size: u64) -> Result<(), PackError> {
        self.entries += 1;
        self.bytes = self.bytes.saturating_add(size);
        if self.entries > MAX_COPY_ENTRIES {
            return Err(self.too_big(MAX_COPY_ENTRIES, "entries"));
        }
        if self.bytes > MAX_COPY_BYTES {
            return Err(self.too_big(MAX_COPY_BYTES, "bytes"));
        }
        Ok(())
    }
}

fn special_kind(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_socket() {
        Some("socket")
    } else if t.is_fifo() {
        Some("FIFO")
    } else if t.is_block_device() {
        Some("block device")
    } else if t.is_char_device() {
        Some("character device")
    } else {
        None
    }
}

fn header_for(meta: &Metadata, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(u64::from(meta.uid()));
    h.set_gid(u64::from(meta.gid()));
    h.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
    h.set_size(size);
    h
}

/// Appends one entry that [`visit`] found to the tar: `path` as `name`. The
/// root directory itself (empty name) has no entry: it is the copy's directory.
fn append<W: Write>(
    b: &mut tar::Builder<W>,
    root: &Path,
    path: &Path,
    name: &Path,
    meta: &Metadata,
) -> Result<(), PackError> {
    let read_err = |source| PackError::Read {
        path: path.to_owned(),
        source,
    };
    let write_err = |source| PackError::Write {
        path: root.to_owned(),
        source,
    };
    if name
        .file_name()
        .is_some_and(|n| n.as_encoded_bytes().starts_with(b".wh."))
    {
        return Err(PackError::Whiteout {
            path: path.to_owned(),
        });
    }
    if let Some(kind) = special_kind(meta) {
        return Err(PackError::Special {
            path: path.to_owned(),
            kind,
        });
    }
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path).map_err(read_err)?;
        let mut h = header_for(meta, tar::EntryType::Symlink, 0);
        return b.append_link(&mut h, name, &target).map_err(write_err);
    }
    if meta.is_file() {
        let file = File::open(path).map_err(read_err)?;
        let mut h = header_for(meta, tar::EntryType::Regular, meta.len());
        // A file that changes size while it is read would break the stream: the
        // tar crate writes exactly the header's size or fails.
        return b
            .append_data(&mut h, name, io::Read::take(file, meta.len()))
            .map_err(write_err);
    }
    if !name.as_os_str().is_empty() {
        let mut h = header_for(meta, tar::EntryType::Directory, 0);
        b.append_data(&mut h, name, io::empty())
            .map_err(write_err)?;
    }
    Ok(())
}

/// Packs the host path `src` (followed if it is a symlink, as the CRI asks) into
/// `out` as a tar stream: a directory's tree (symlinks kept as symlinks), or a file
/// as [`FILE_ENTRY`]. `out` is truncated first and left at its end.
pub fn pack(src: &Path, out: &mut File) -> Result<Packed, PackError> {
    let meta = std::fs::metadata(src).map_err(|source| PackError::Read {
        path: src.to_owned(),
        source,
    })?;
    if let Some(kind) = special_kind(&meta) {
        return Err(PackError::Special {
            path: src.to_owned(),
            kind,
        });
    }
    let write_err = |source| PackError::Write {
        path: src.to_owned(),
        source,
    };
    out.set_len(0).map_err(write_err)?;
    out.seek(SeekFrom::Start(0)).map_err(write_err)?;
    let mut walk = Walk {
        root: src,
        bytes: 0,
        entries: 0,
    };
    let sink = Hashing {
        inner: io::BufWriter::new(&mut *out),
        hasher: Sha256::new(),
        len: 0,
    };
    let mut b = tar::Builder::new(sink);
    let is_file = !meta.is_dir();
    if is_file {
        walk.count(meta.len())?;
        let file = File::open(src).map_err(|source| PackError::Read {
            path: src.to_owned(),
            source,
        })?;
        let mut h = header_for(&meta, tar::EntryType::Regular, meta.len());
        b.append_data(&mut h, FILE_ENTRY, io::Read::take(file, meta.len()))
            .map_err(write_err)?;
    } else {
        // The root (followed) is the volume's directory in the guest: its entries.
        visit(
            &mut walk,
            src,
            Path::new(""),
            &meta,
            0,
            &mut |path, name, meta| append(&mut b, src, path, name, meta),
        )?;
    }
    let mut sink = b.into_inner().map_err(write_err)?;
    sink.flush().map_err(write_err)?;
    Ok(Packed {
        digest: sink.hasher.finalize().into(),
        is_file,
        tar_bytes: sink.len,
    })
}

/// Sending a copy to the guest failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No stream connection.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The agent refused or the connection failed.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// Reading the tar or writing it to the guest failed.
    #[error("sending copy {name}: {source}")]
    Io {
        /// The copy.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Sends the tar in `tar` (from its start) as copy `name` through the VMM's vsock
/// socket `vsock_uds`: the guest makes the copy, or updates it in place.
pub fn send(
    vsock_uds: &Path,
    name: &str,
    packed: &Packed,
    tar: &mut File,
) -> Result<(), SendError> {
    let io_err = |source| SendError::Io {
        name: name.to_owned(),
        source,
    };
    let frame_err = |source| AttachError::Frame {
        stream: "a copied volume",
        container: name.to_owned(),
        source,
    };
    let refused = |e: v1::Error| AttachError::Refused {
        stream: "a copied volume",
        container: name.to_owned(),
        code: v1::error::Code::try_from(e.code).unwrap_or(v1::error::Code::Unspecified),
        message: e.message,
    };
    let mut s = connect_port(vsock_uds, atoll_agent_proto::STREAM_PORT, SEND_TIMEOUT)?;
    s.set_read_timeout(Some(SEND_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(SEND_TIMEOUT)))
        .map_err(io_err)?;
    let req = v1::Attach {
        stream: Stream::Volume as i32,
        volume: name.to_owned(),
        ..Default::default()
    };
    write_frame(&mut s, &req).map_err(frame_err)?;
    let reply: v1::AttachReply = read_frame(&mut s).map_err(frame_err)?;
    if let Some(e) = reply.error {
        return Err(refused(e).into());
    }
    tar.seek(SeekFrom::Start(0)).map_err(io_err)?;
    io::copy(&mut io::Read::take(&mut *tar, packed.tar_bytes), &mut s).map_err(io_err)?;
    s.shutdown(std::net::Shutdown::Write).map_err(io_err)?;
    let outcome: v1::AttachReply = read_frame(&mut s).map_err(frame_err)?;
    match outcome.error {
        Some(e) => Err(refused(e).into()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn entries(tar: &mut File) -> Vec<(String, tar::EntryType, Vec<u8>)> {
        tar.seek(SeekFrom::Start(0)).unwrap();
        let mut a = tar::Archive::new(&mut *tar);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().to_string_lossy().into_owned();
                let kind = e.header().entry_type();
                let mut data = Vec::new();
                if kind == tar::EntryType::Symlink {
                    data = e
                        .link_name()
                        .unwrap()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                        .into_bytes();
                } else {
                    io::Read::read_to_end(&mut e, &mut data).unwrap();
                }
                (path, kind, data)
            })
            .collect()
    }

    /// A tree as kubelet's atomic writer leaves a ConfigMap volume.
    fn configmap(dir: &Path) {
        std::fs::create_dir(dir.join("..2026_12_05")).unwrap();
        std::fs::write(dir.join("..2026_12_05/b.conf"), "b=2\n").unwrap();
        std::fs::write(dir.join("..2026_12_05/a.conf"), "a=1\n").unwrap();
        symlink("..2026_12_05", dir.join("..data")).unwrap();
        symlink("..data/a.conf", dir.join("a.conf")).unwrap();
        symlink("..data/b.conf", dir.join("b.conf")).unwrap();
    }

    #[test]
    fn a_directory_packs_sorted_with_its_symlinks_and_names_by_content() {
        let src = tempfile::tempdir().unwrap();
        configmap(src.path());
        let mut tar = tempfile::tempfile().unwrap();
        let packed = pack(src.path(), &mut tar).unwrap();
        assert!(!packed.is_file);
        let name = copy_name(src.path());
        assert!(name.starts_with("c-") && name.len() == 34);
        assert_eq!(mount_source(&name, false), format!("copy:{name}"));
        let got = entries(&mut tar);
        let names: Vec<_> = got.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "..2026_12_05",
                "..2026_12_05/a.conf",
                "..2026_12_05/b.conf",
                "..data",
                "a.conf",
                "b.conf"
            ]
        );
        assert_eq!(got[1].2, b"a=1\n");
        assert_eq!(got[3].1, tar::EntryType::Symlink);
        assert_eq!(got[4].2, b"..data/a.conf");
        // The same tree again: the same digest and fingerprint; changed content
        // (as kubelet's writer changes it: a file rewritten): other ones.
        let print = fingerprint(src.path()).unwrap();
        let again = pack(src.path(), &mut tar).unwrap();
        assert_eq!(again, packed);
        assert_eq!(fingerprint(src.path()).unwrap(), print);
        std::fs::write(src.path().join("..2026_12_05/a.conf"), "a=9\n").unwrap();
        assert_ne!(pack(src.path(), &mut tar).unwrap().digest, packed.digest);
        assert_ne!(fingerprint(src.path()).unwrap(), print);
    }

    #[test]
    fn a_file_packs_as_one_entry_and_a_symlinked_root_is_followed() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("real"), "hello").unwrap();
        symlink(src.path().join("real"), src.path().join("link")).unwrap();
        let mut tar = tempfile::tempfile().unwrap();
        let packed = pack(&src.path().join("link"), &mut tar).unwrap();
        assert!(packed.is_file);
        assert_eq!(mount_source("c-x", true), "copy:c-x/file");
        let got = entries(&mut tar);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].0.as_str(), got[0].2.as_slice()),
            ("file", &b"hello"[..])
        );
    }

    #[test]
    fn a_symlinked_directory_root_packs_its_tree() {
        // Before pack and fingerprint shared one walk, pack looked at such a root
        // without following it and made one nameless symlink entry of it.
        let src = tempfile::tempdir().unwrap();
        let real = src.path().join("real");
        std::fs::create_dir(&real).unwrap();
        configmap(&real);
        symlink(&real, src.path().join("link")).unwrap();
        let mut tar = tempfile::tempfile().unwrap();
        let via_link = pack(&src.path().join("link"), &mut tar).unwrap();
        assert!(!via_link.is_file);
        assert_eq!(entries(&mut tar).len(), 6);
        assert_eq!(via_link.digest, pack(&real, &mut tar).unwrap().digest);
        assert_eq!(
            fingerprint(&src.path().join("link")).unwrap(),
            fingerprint(&real).unwrap()
        );
    }

    #[test]
    fn what_cannot_be_copied_is_refused_with_its_path() {
        let src = tempfile::tempdir().unwrap();
        let mut tar = tempfile::tempfile().unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(src.path().join("s.sock")).unwrap();
        let e = pack(src.path(), &mut tar).unwrap_err();
        assert!(
            matches!(e, PackError::Special { kind: "socket", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("s.sock"), "{e}");
        std::fs::remove_file(src.path().join("s.sock")).unwrap();
        std::fs::write(src.path().join(".wh.x"), "").unwrap();
        let e = pack(src.path(), &mut tar).unwrap_err();
        assert!(matches!(e, PackError::Whiteout { .. }), "{e}");
        std::fs::remove_file(src.path().join(".wh.x")).unwrap();
        let big = File::create(src.path().join("big")).unwrap();
        big.set_len(MAX_COPY_BYTES + 1).unwrap();
        let e = pack(src.path(), &mut tar).unwrap_err();
        assert!(matches!(e, PackError::TooBig { what: "bytes", .. }), "{e}");
        let e = pack(&src.path().join("missing"), &mut tar).unwrap_err();
        assert!(matches!(e, PackError::Read { .. }), "{e}");
    }
}
