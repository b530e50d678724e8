//! Applies image layers to a directory, exactly and confined to it.
//!
//! Every path in a layer is hostile. An entry's parent directory is opened with
//! `openat2(RESOLVE_IN_ROOT)`, so symlinks (absolute or relative) and `..` inside
//! symlink targets are resolved the way the container sees them: against the image
//! root, never the host's. The final component is then created, replaced or removed
//! with `*at` calls that never follow it. Entry names containing `..` are refused;
//! a leading `/` is dropped (tar convention).
//!
//! Layer semantics follow the OCI image spec: `.wh.NAME` removes NAME from lower
//! layers, `.wh..wh..opq` hides everything lower layers put in its directory.
//! Ownership, modes, mtimes and `SCHILY.xattr.*` xattrs are kept; directory modes
//! and mtimes are applied after the last layer (writing into a directory changes its
//! mtime, and a read-only directory must stay writable while it is filled).
//! Without root, ownership is not changed and device nodes are skipped (counted).
//!
//! A layer comes from a file ([`unpack_layers`]) or any reader ([`unpack_sources`]),
//! with its compression recognised by its first bytes or given by its media type,
//! and optionally with the digest its raw bytes must have: the digest is checked
//! while the layer streams, so a mismatch is noticed at its end, after its entries
//! were written. The caller must then discard the whole target.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};

use crate::digest::{Digest, DigestMismatch, VerifyingReader};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Bounds on what a set of layers may make us do.
#[derive(Debug, Clone, Copy)]
pub struct UnpackLimits {
    /// Tar entries over all layers.
    pub max_entries: u64,
    /// File content bytes over all layers.
    pub max_bytes: u64,
    /// Bytes in one entry name or link target.
    pub max_path_len: usize,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self {
            max_entries: 8_000_000,
            max_bytes: 256 << 30,
            max_path_len: 4096,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("cannot open target directory {path}: {source}")]
    Target {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: reading the stream failed: {source}")]
    Stream {
        layer: usize,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: entry {path:?}: {reason}")]
    Hostile {
        layer: usize,
        path: String,
        reason: String,
    },
    #[error("layer {layer}: entry {path:?}: {op} failed: {source}")]
    Entry {
        layer: usize,
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: more than {max} entries; refusing the image")]
    TooManyEntries { layer: usize, max: u64 },
    #[error("layer {layer}: more than {max} bytes of file content; refusing the image")]
    TooLarge { layer: usize, max: u64 },
    #[error(
        "layer {layer}: its content is {actual}, not {expected} as the image says; \
         refusing the corrupt or tampered layer"
    )]
    Digest {
        layer: usize,
        expected: Digest,
        actual: Digest,
    },
    #[error("layer {layer}: entry {path:?} has unsupported tar type {kind:?}")]
    UnsupportedType {
        layer: usize,
        path: String,
        kind: char,
    },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    pub layers: usize,
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
    /// Device nodes not created because we are not root.
    pub skipped_devices: u64,
}

/// The compression of a layer, recognised by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression a layer starting with `head` has (tar when not recognised).
    pub fn sniff(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The compression an OCI or Docker layer media type says; `None` for anything
    /// that is not a layer tar (or uses another compression).
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }

    /// The OCI media type of a layer with this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// Wraps a raw layer stream into a decompressing reader, sniffing the format.
pub fn decompress<'a, R: Read + Send + 'a>(
    r: R,
) -> io::Result<(Compression, Box<dyn Read + Send + 'a>)> {
    let mut br = BufReader::with_capacity(1 << 20, r);
    let c = Compression::sniff(br.fill_buf()?);
    Ok((c, decompress_buffered(c, br)?))
}

/// Wraps a raw layer stream into a reader decompressing `c` (as its media type says).
pub fn decompress_as<'a, R: Read + Send + 'a>(
    c: Compression,
    r: R,
) -> io::Result<Box<dyn Read + Send + 'a>> {
    decompress_buffered(c, BufReader::with_capacity(1 << 20, r))
}

fn decompress_buffered<'a, R: Read + Send + 'a>(
    c: Compression,
    br: BufReader<R>,
) -> io::Result<Box<dyn Read + Send + 'a>> {
    Ok(match c {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(br)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(br)?),
        Compression::None => Box::new(br),
    })
}

/// One layer to apply: its raw bytes and how to read them.
pub struct LayerSource {
    /// The blob as stored (compressed or not), to its end.
    pub reader: Box<dyn Read + Send>,
    /// `None`: recognised by the first bytes.
    pub compression: Option<Compression>,
    /// The digest the raw bytes must have (checked to the end of `reader`).
    pub digest: Option<Digest>,
}

impl std::fmt::Debug for LayerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerSource")
            .field("compression", &self.compression)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

/// Decompresses `source` into `tx` in [`CHUNK`]s, then reads what the decoder left
/// so the digest covers the whole blob.
fn pump(source: LayerSource, tx: &mpsc::SyncSender<io::Result<Vec<u8>>>) -> io::Result<()> {
    let mut raw = VerifyingReader::new(source.reader, source.digest);
    {
        let mut r = match source.compression {
            Some(c) => decompress_as(c, &mut raw)?,
            None => decompress(&mut raw)?.1,
        };
        loop {
            let mut buf = vec![0u8; CHUNK];
            let mut filled = 0;
            while let Some(rest) = buf.get_mut(filled..).filter(|b| !b.is_empty()) {
                match r.read(rest) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            if filled == 0 {
                break;
            }
            buf.truncate(filled);
            if tx.send(Ok(buf)).is_err() {
                // The reader is gone (the unpack failed): nothing to check for.
                return Ok(());
            }
        }
    }
    io::copy(&mut raw, &mut io::sink())?;
    Ok(())
}

/// Decompresses on its own thread, handing 1 MiB chunks through a bounded channel:
/// decompression of one layer overlaps with writing files, memory stays bounded.
struct PipeReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
    done: bool,
}

const CHUNK: usize = 1 << 20;
const CHUNKS_IN_FLIGHT: usize = 8;

impl PipeReader {
    fn spawn(source: LayerSource) -> Self {
        let (tx, rx) = mpsc::sync_channel(CHUNKS_IN_FLIGHT);
        thread::spawn(move || {
            if let Err(e) = pump(source, &tx) {
                let _ = tx.send(Err(e));
            }
        });
        Self {
            rx,
            cur: Vec::new(),
            pos: 0,
            done: false,
        }
    }
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(buf)) => {
                    self.cur = buf;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Applies `layers` (raw blob files, bottom first) to `target`, which must exist.
pub fn unpack_layers(
    layers: &[PathBuf],
    target: &Path,
    limits: UnpackLimits,
) -> Result<UnpackStats, UnpackError> {
    let sources = layers.iter().map(|path| {
        File::open(path).map(|f| LayerSource {
            reader: Box::new(f),
            compression: None,
            digest: None,
        })
    });
    unpack_sources(sources, target, limits)
}

/// Applies the layers `sources` yields (bottom first) to `target`, which must exist.
/// The next source is taken (and starts decompressing on its own thread) while the
/// current one is written; an `Err` item fails that layer.
pub fn unpack_sources<I>(
    sources: I,
    target: &Path,
    limits: UnpackLimits,
) -> Result<UnpackStats, UnpackError>
where
    I: IntoIterator<Item = io::Result<LayerSource>>,
{
    let root = rustix::fs::open(
        target,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Target {
        path: target.to_owned(),
        source: e.into(),
    })?;
    let mut u = Unpacker::new(root, limits);
    let mut sources = sources.into_iter().map(|s| s.map(PipeReader::spawn));
    // The next layer decompresses while this one is written.
    let mut next = sources.next();
    let mut i = 0;
    while let Some(reader) = next.take() {
        next = sources.next();
        let reader = reader.map_err(|source| UnpackError::Stream { layer: i, source })?;
        u.apply_layer(i, reader)?;
        i += 1;
    }
    u.finish()?;
    Ok(u.stats)
}

/// A stream error, or the digest mismatch it carries.
fn stream_err(layer: usize, source: io::Error) -> UnpackError {
    match DigestMismatch::from_io(&source) {
        Some(m) => UnpackError::Digest {
            layer,
            expected: m.expected.clone(),
            actual: m.actual.clone(),
        },
        None => UnpackError::Stream { layer, source },
    }
}

struct DirMeta {
    mode: u32,
    mtime: Timespec,
}

struct Unpacker {
    root: OwnedFd,
    limits: UnpackLimits,
    rootless: bool,
    stats: UnpackStats,
    layer: usize,
    /// Paths (and their ancestors) the current layer has put in place: an opaque
    /// marker hides everything else in its directory.
    layer_paths: HashSet<Vec<u8>>,
    dir_meta: HashMap<Vec<u8>, DirMeta>,
    buf: Vec<u8>,
}

/// What a tar entry asks for, with the metadata we keep.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timespec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn hostile(layer: usize, path: &[u8], reason: impl Into<String>) -> UnpackError {
    UnpackError::Hostile {
        layer,
        path: String::from_utf8_lossy(path).into_owned(),
        reason: reason.into(),
    }
}

/// Splits an entry name into its components: leading `/`, empty and `.` components
/// are dropped, `..` is refused.
fn components(layer: usize, raw: &[u8], max_len: usize) -> Result<Vec<&[u8]>, UnpackError> {
    if raw.len() > max_len {
        return Err(hostile(layer, &raw[..64.min(raw.len())], "name too long"));
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(hostile(
                    layer,
                    raw,
                    "path contains `..`; refusing to write outside the image root",
                ))
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn join(components: &[&[u8]]) -> Vec<u8> {
    components.join(&b'/')
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

fn parse_pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    let tv_sec: i64 = sec.parse().ok()?;
    let mut nsec = 0i64;
    let digits: String = frac.chars().take(9).collect();
    if !digits.is_empty() {
        nsec = format!("{digits:0<9}").parse().ok()?;
    }
    Some(Timespec {
        tv_sec,
        tv_nsec: nsec,
    })
}

impl Unpacker {
    fn new(root: OwnedFd, limits: UnpackLimits) -> Self {
        Self {
            root,
            limits,
            rootless: !rustix::process::geteuid().is_root(),
            stats: UnpackStats::default(),
            layer: 0,
            layer_paths: HashSet::new(),
            dir_meta: HashMap::new(),
            buf: vec![0u8; 1 << 20],
        }
    }

    fn entry_err(
        &self,
        path: &[u8],
        op: &'static str,
    ) -> impl FnOnce(rustix::io::Errno) -> UnpackError {
        let layer = self.layer;
        let path = String::from_utf8_lossy(path).into_owned();
        move |e| UnpackError::Entry {
            layer,
            path,
            op,
            source: e.into(),
        }
    }

    fn apply_layer<R: Read>(&mut self, layer: usize, reader: R) -> Result<(), UnpackError> {
        self.layer = layer;
        self.layer_paths.clear();
        self.stats.layers += 1;
        let mut ar = tar::Archive::new(reader);
        let entries = ar.entries().map_err(|source| stream_err(layer, source))?;
        for entry in entries {
            let mut entry = entry.map_err(|source| stream_err(layer, source))?;
            self.stats.entries += 1;
            if self.stats.entries > self.limits.max_entries {
                return Err(UnpackError::TooManyEntries {
                    layer,
                    max: self.limits.max_entries,
                });
            }
            self.apply_entry(&mut entry)?;
        }
        // Read to the end so a compressed stream's trailer (CRC, size) is checked and a
        // truncated stream is noticed even when only the tar padding was lost.
        let mut inner = ar.into_inner();
        io::copy(&mut inner, &mut io::sink()).map_err(|source| stream_err(layer, source))?;
        Ok(())
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>) -> Result<Meta, UnpackError> {
        let h = entry.header();
        let layer = self.layer;
        let path = entry.path_bytes().into_owned();
        let bad = |what: &str, e: io::Error| hostile(layer, &path, format!("bad {what}: {e}"));
        let mode = h.mode().map_err(|e| bad("mode", e))? & 0o7777;
        let mut uid = u32::try_from(h.uid().map_err(|e| bad("uid", e))?)
            .map_err(|_| hostile(layer, &path, "uid out of range"))?;
        let mut gid = u32::try_from(h.gid().map_err(|e| bad("gid", e))?)
            .map_err(|_| hostile(layer, &path, "gid out of range"))?;
        let mut mtime = Timespec {
            tv_sec: i64::try_from(h.mtime().map_err(|e| bad("mtime", e))?).unwrap_or(0),
            tv_nsec: 0,
        };
        let mut xattrs = Vec::new();
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts {
                let ext = ext.map_err(|e| bad("pax header", e))?;
                let key = ext.key_bytes();
                let value = ext.value_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((name.to_vec(), value.to_vec()));
                } else if key == b"uid" {
                    uid = std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| hostile(layer, &path, "bad pax uid"))?;
                } else if key == b"gid" {
                    gid = std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| hostile(layer, &path, "bad pax gid"))?;
                } else if key == b"mtime" {
                    if let Some(t) = parse_pax_time(value) {
                        mtime = t;
                    }
                }
            }
        }
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        })
    }

    /// Opens the directory `comps` inside the root (following symlinks inside it),
    /// creating missing directories (0755, owned by root) on the way.
    fn open_dir(&mut self, comps: &[&[u8]], create: bool) -> Result<OwnedFd, UnpackError> {
        let rel = if comps.is_empty() {
            b".".to_vec()
        } else {
            join(comps)
        };
        match rustix::fs::openat2(
            &self.root,
            os(&rel),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => Ok(fd),
            Err(rustix::io::Errno::NOENT) if create && !comps.is_empty() => {
                self.create_dirs(comps, &rel)
            }
            Err(e) => Err(self.entry_err(&rel, "open parent directory")(e)),
        }
    }

    /// Slow path of [`Self::open_dir`]: walks `comps` one at a time from the root,
    /// following symlinks by hand (absolute targets restart at the image root, `..`
    /// stops at it) and creating what is missing, as `MkdirAll` on a securely
    /// joined path would. Every step is an `*at` call on a directory we opened with
    /// `O_NOFOLLOW`, so nothing outside the root is touched.
    fn create_dirs(&mut self, comps: &[&[u8]], rel: &[u8]) -> Result<OwnedFd, UnpackError> {
        const MAX_LINKS: usize = 40;
        let layer = self.layer;
        let err = |op: &'static str, e: rustix::io::Errno| UnpackError::Entry {
            layer,
            path: String::from_utf8_lossy(rel).into_owned(),
            op,
            source: e.into(),
        };
        // Components still to walk, the next one last.
        let mut todo: Vec<Vec<u8>> = comps.iter().rev().map(|c| c.to_vec()).collect();
        let mut stack: Vec<(Vec<u8>, OwnedFd)> = Vec::new();
        let mut links = 0;
        while let Some(c) = todo.pop() {
            match c.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    stack.pop();
                    continue;
                }
                _ => {}
            }
            let cur = match stack.last() {
                Some((_, fd)) => fd.as_fd(),
                None => self.root.as_fd(),
            };
            let st = match rustix::fs::statat(cur, os(&c), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => Some(FileType::from_raw_mode(st.st_mode)),
                Err(rustix::io::Errno::NOENT) => None,
                Err(e) => return Err(err("stat parent", e)),
            };
            match st {
                Some(FileType::Symlink) => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(err("resolve parent", rustix::io::Errno::LOOP));
                    }
                    let target = rustix::fs::readlinkat(cur, os(&c), Vec::new())
                        .map_err(|e| err("readlink", e))?;
                    let target = target.into_bytes();
                    if target.starts_with(b"/") {
                        stack.clear();
                    }
                    for t in target.split(|&b| b == b'/').rev() {
                        todo.push(t.to_vec());
                    }
                    continue;
                }
                Some(FileType::Directory) => {}
                Some(_) => return Err(err("open parent directory", rustix::io::Errno::NOTDIR)),
                None => {
                    match rustix::fs::mkdirat(cur, os(&c), Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(err("mkdir (parent)", e)),
                    }
                    let mut p: Vec<&[u8]> = stack.iter().map(|(n, _)| n.as_slice()).collect();
                    p.push(&c);
                    let joined = join(&p);
                    self.note_path(&joined);
                }
            }
            let cur = match stack.last() {
                Some((_, fd)) => fd.as_fd(),
                None => self.root.as_fd(),
            };
            let fd = rustix::fs::openat(
                cur,
                os(&c),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| err("open parent directory", e))?;
            stack.push((c, fd));
        }
        match stack.pop() {
            Some((_, fd)) => Ok(fd),
            None => rustix::fs::openat(
                &self.root,
                ".",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| err("open root", e)),
        }
    }

    /// Records that this layer provides `path` and its ancestors.
    fn note_path(&mut self, path: &[u8]) {
        let mut p = path;
        loop {
            if !self.layer_paths.insert(p.to_vec()) {
                return;
            }
            match p.iter().rposition(|&b| b == b'/') {
                Some(i) => p = &p[..i],
                None => return,
            }
        }
    }

    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let comps = components(self.layer, &raw, self.limits.max_path_len)?;
        let Some((&name, parent)) = comps.split_last() else {
            // The root itself ("./"): only its metadata matters.
            if kind.is_dir() {
                let meta = self.meta(entry)?;
                self.set_owner_at(&self.root.as_fd(), b".", &meta, &raw)?;
                self.dir_meta.insert(
                    Vec::new(),
                    DirMeta {
                        mode: meta.mode,
                        mtime: meta.mtime,
                    },
                );
                return Ok(());
            }
            return Err(hostile(
                self.layer,
                &raw,
                "names the root but is not a directory",
            ));
        };
        let path = join(&comps);

        if name.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            self.stats.whiteouts += 1;
            if name == OPAQUE.as_bytes() {
                let Ok(dir) = self.open_dir(parent, false) else {
                    return Ok(());
                };
                let dpath = join(parent);
                return self.opaque(&dir, &dpath, &raw);
            }
            if name.starts_with(b".wh..wh.") {
                return Ok(()); // aufs bookkeeping, never content
            }
            let target = &name[WHITEOUT_PREFIX.len()..];
            if target.is_empty() || target == b"." || target == b".." {
                return Err(hostile(self.layer, &raw, "whiteout of an invalid name"));
            }
            let mut tpath = join(parent);
            if !tpath.is_empty() {
                tpath.push(b'/');
            }
            tpath.extend_from_slice(target);
            if self.layer_paths.contains(&tpath) {
                return Ok(()); // whiteouts only hide lower layers
            }
            let Ok(dir) = self.open_dir(parent, false) else {
                return Ok(());
            };
            return remove_all_at(&dir, target).map_err(self.entry_err(&raw, "whiteout"));
        }

        let dir = self.open_dir(parent, true)?;
        self.note_path(&path);
        match kind {
            tar::EntryType::Directory => {
                let meta = self.meta(entry)?;
                match rustix::fs::statat(&dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                    Ok(_) => {
                        remove_all_at(&dir, name).map_err(self.entry_err(&raw, "replace"))?;
                        self.mkdir(&dir, name, &raw)?;
                    }
                    Err(_) => self.mkdir(&dir, name, &raw)?,
                }
                let fd = rustix::fs::openat(
                    &dir,
                    os(name),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(self.entry_err(&raw, "open directory"))?;
                self.set_owner_fd(&fd, &meta, &raw)?;
                self.set_xattrs(&fd, &meta, &raw)?;
                self.dir_meta.insert(
                    path,
                    DirMeta {
                        mode: meta.mode,
                        mtime: meta.mtime,
                    },
                );
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let meta = self.meta(entry)?;
                self.clear(&dir, name, &raw)?;
                let fd = rustix::fs::openat(
                    &dir,
                    os(name),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(self.entry_err(&raw, "create file"))?;
                let mut file = File::from(fd);
                let expected = entry.size();
                let written = self.copy_content(entry, &mut file, &raw)?;
                if written != expected && kind != tar::EntryType::GNUSparse {
                    return Err(UnpackError::Stream {
                        layer: self.layer,
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "entry {:?}: stream ended after {written} of {expected} bytes",
                                String::from_utf8_lossy(&raw)
                            ),
                        ),
                    });
                }
                self.set_owner_fd(&file, &meta, &raw)?;
                rustix::fs::fchmod(&file, Mode::from_raw_mode(meta.mode))
                    .map_err(self.entry_err(&raw, "chmod"))?;
                self.set_xattrs(&file, &meta, &raw)?;
                rustix::fs::futimens(&file, &times(meta.mtime))
                    .map_err(self.entry_err(&raw, "set mtime"))?;
            }
            tar::EntryType::Symlink => {
                let meta = self.meta(entry)?;
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| hostile(self.layer, &raw, "symlink without a target"))?
                    .into_owned();
                if target.len() > self.limits.max_path_len {
                    return Err(hostile(self.layer, &raw, "symlink target too long"));
                }
                self.clear(&dir, name, &raw)?;
                // The target is stored as is: it is only ever resolved inside the root.
                rustix::fs::symlinkat(os(&target), &dir, os(name))
                    .map_err(self.entry_err(&raw, "symlink"))?;
                if !self.rootless {
                    rustix::fs::chownat(
                        &dir,
                        os(name),
                        Some(rustix::fs::Uid::from_raw(meta.uid)),
                        Some(rustix::fs::Gid::from_raw(meta.gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(self.entry_err(&raw, "chown"))?;
                }
                rustix::fs::utimensat(
                    &dir,
                    os(name),
                    &times(meta.mtime),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(self.entry_err(&raw, "set mtime"))?;
            }
            tar::EntryType::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .ok_or_else(|| hostile(self.layer, &raw, "hard link without a target"))?
                    .into_owned();
                let tcomps = components(self.layer, &target_raw, self.limits.max_path_len)?;
                let Some((&tname, tparent)) = tcomps.split_last() else {
                    return Err(hostile(self.layer, &raw, "hard link to the root"));
                };
                if join(&tcomps) == path {
                    return Ok(());
                }
                let tdir = self.open_dir(tparent, false).map_err(|_| {
                    hostile(
                        self.layer,
                        &raw,
                        format!(
                            "hard link target {:?} does not exist in the image",
                            String::from_utf8_lossy(&target_raw)
                        ),
                    )
                })?;
                self.clear(&dir, name, &raw)?;
                rustix::fs::linkat(&tdir, os(tname), &dir, os(name), AtFlags::empty())
                    .map_err(self.entry_err(&raw, "hard link"))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let meta = self.meta(entry)?;
                let ft = match kind {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                if self.rootless && ft != FileType::Fifo {
                    self.stats.skipped_devices += 1;
                    return Ok(());
                }
                let h = entry.header();
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                self.clear(&dir, name, &raw)?;
                rustix::fs::mknodat(
                    &dir,
                    os(name),
                    ft,
                    Mode::from_raw_mode(0o600),
                    rustix::fs::makedev(major, minor),
                )
                .map_err(self.entry_err(&raw, "mknod"))?;
                self.set_owner_at(&dir, name, &meta, &raw)?;
                rustix::fs::chmodat(
                    &dir,
                    os(name),
                    Mode::from_raw_mode(meta.mode),
                    AtFlags::empty(),
                )
                .map_err(self.entry_err(&raw, "chmod"))?;
                rustix::fs::utimensat(
                    &dir,
                    os(name),
                    &times(meta.mtime),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(self.entry_err(&raw, "set mtime"))?;
            }
            other => {
                return Err(UnpackError::UnsupportedType {
                    layer: self.layer,
                    path: String::from_utf8_lossy(&raw).into_owned(),
                    kind: char::from(other.as_byte()),
                })
            }
        }
        Ok(())
    }

    fn mkdir(&self, dir: &OwnedFd, name: &[u8], raw: &[u8]) -> Result<(), UnpackError> {
        // Kept writable by us until `finish` applies the real mode.
        rustix::fs::mkdirat(dir, os(name), Mode::from_raw_mode(0o700))
            .map_err(self.entry_err(raw, "mkdir"))
    }

    /// Removes whatever is at `name` so a non-directory can take its place.
    fn clear(&self, dir: &OwnedFd, name: &[u8], raw: &[u8]) -> Result<(), UnpackError> {
        match rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                remove_all_at(dir, name).map_err(self.entry_err(raw, "replace directory"))
            }
            Ok(_) => rustix::fs::unlinkat(dir, os(name), AtFlags::empty())
                .map_err(self.entry_err(raw, "replace")),
            Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(self.entry_err(raw, "stat")(e)),
        }
    }

    fn copy_content<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        file: &mut File,
        raw: &[u8],
    ) -> Result<u64, UnpackError> {
        let mut total = 0u64;
        let mut buf = std::mem::take(&mut self.buf);
        let res = loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => break Err(stream_err(self.layer, source)),
            };
            total += n as u64;
            self.stats.bytes += n as u64;
            if self.stats.bytes > self.limits.max_bytes {
                break Err(UnpackError::TooLarge {
                    layer: self.layer,
                    max: self.limits.max_bytes,
                });
            }
            if let Err(e) = file.write_all(&buf[..n]) {
                break Err(UnpackError::Entry {
                    layer: self.layer,
                    path: String::from_utf8_lossy(raw).into_owned(),
                    op: "write",
                    source: e,
                });
            }
        };
        self.buf = buf;
        res
    }

    fn set_owner_fd(&self, fd: &impl AsFd, meta: &Meta, raw: &[u8]) -> Result<(), UnpackError> {
        if self.rootless {
            return Ok(());
        }
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(meta.uid)),
            Some(rustix::fs::Gid::from_raw(meta.gid)),
        )
        .map_err(self.entry_err(raw, "chown"))
    }

    fn set_owner_at(
        &self,
        dir: &impl AsFd,
        name: &[u8],
        meta: &Meta,
        raw: &[u8],
    ) -> Result<(), UnpackError> {
        if self.rootless {
            return Ok(());
        }
        rustix::fs::chownat(
            dir,
            os(name),
            Some(rustix::fs::Uid::from_raw(meta.uid)),
            Some(rustix::fs::Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(self.entry_err(raw, "chown"))
    }

    fn set_xattrs(&self, fd: &impl AsFd, meta: &Meta, raw: &[u8]) -> Result<(), UnpackError> {
        for (name, value) in &meta.xattrs {
            match rustix::fs::fsetxattr(fd, os(name), value, rustix::fs::XattrFlags::empty()) {
                Ok(()) => {}
                // Without root, trusted.* and security.* cannot be set; umoci's
                // rootless mode drops them too.
                Err(rustix::io::Errno::PERM) if self.rootless => {}
                Err(e) => return Err(self.entry_err(raw, "setxattr")(e)),
            }
        }
        Ok(())
    }

    /// Hides everything in `dir` that the current layer did not put there.
    fn opaque(&self, dir: &OwnedFd, dpath: &[u8], raw: &[u8]) -> Result<(), UnpackError> {
        let rd = rustix::fs::openat(
            dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(self.entry_err(raw, "open opaque directory"))?;
        let mut names = Vec::new();
        for e in rustix::fs::Dir::read_from(&rd).map_err(self.entry_err(raw, "read directory"))? {
            let e = e.map_err(self.entry_err(raw, "read directory"))?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push((n.to_vec(), e.file_type()));
            }
        }
        for (n, ft) in names {
            let mut child = dpath.to_vec();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(&n);
            if !self.layer_paths.contains(&child) {
                remove_all_at(&rd, &n).map_err(self.entry_err(raw, "opaque removal"))?;
            } else if ft == FileType::Directory {
                let sub = rustix::fs::openat(
                    &rd,
                    os(&n),
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(self.entry_err(raw, "open directory"))?;
                self.opaque(&sub, &child, raw)?;
            }
        }
        Ok(())
    }

    /// Applies directory modes and mtimes, deepest first, once all content is in.
    fn finish(&mut self) -> Result<(), UnpackError> {
        let mut dirs: Vec<_> = self.dir_meta.drain().collect();
        dirs.sort_by(|a, b| b.0.cmp(&a.0));
        for (path, meta) in dirs {
            let rel = if path.is_empty() { b".".to_vec() } else { path };
            // Gone or replaced by a non-directory in a later layer: nothing to do.
            let Ok(fd) = rustix::fs::openat2(
                &self.root,
                os(&rel),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            ) else {
                continue;
            };
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode))
                .map_err(self.entry_err(&rel, "chmod"))?;
            rustix::fs::futimens(&fd, &times(meta.mtime))
                .map_err(self.entry_err(&rel, "set mtime"))?;
        }
        Ok(())
    }
}

fn times(mtime: Timespec) -> Timestamps {
    Timestamps {
        last_access: mtime,
        last_modification: mtime,
    }
}

/// Removes `name` in `dir` and, if it is a directory, everything below it, without
/// following any symlink.
pub fn remove_all_at(dir: &impl AsFd, name: &[u8]) -> Result<(), rustix::io::Errno> {
    let dir = dir.as_fd();
    match rustix::fs::unlinkat(dir, os(name), AtFlags::empty()) {
        Ok(()) => return Ok(()),
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => {}
        Err(e) => return Err(e),
    }
    remove_tree(dir, name, 0)
}

fn remove_tree(dir: BorrowedFd<'_>, name: &[u8], depth: usize) -> Result<(), rustix::io::Errno> {
    // Deeper than any path we accept could make: a loop we did not create.
    if depth > 4096 {
        return Err(rustix::io::Errno::LOOP);
    }
    let sub = rustix::fs::openat(
        dir,
        os(name),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut children = Vec::new();
    for e in rustix::fs::Dir::read_from(&sub)? {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            children.push((n.to_vec(), e.file_type()));
        }
    }
    for (n, ft) in children {
        if ft == FileType::Directory {
            remove_tree(sub.as_fd(), &n, depth + 1)?;
        } else {
            match rustix::fs::unlinkat(&sub, os(&n), AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(rustix::io::Errno::ISDIR) => remove_tree(sub.as_fd(), &n, depth + 1)?,
                Err(e) => return Err(e),
            }
        }
    }
    rustix::fs::unlinkat(dir, os(name), AtFlags::REMOVEDIR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A tar with one regular file per `(name, content)`.
    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn source(blob: Vec<u8>, c: Option<Compression>, digest: Option<Digest>) -> LayerSource {
        LayerSource {
            reader: Box::new(Cursor::new(blob)),
            compression: c,
            digest,
        }
    }

    fn unpack(sources: Vec<LayerSource>) -> (tempfile::TempDir, Result<UnpackStats, UnpackError>) {
        let t = tempfile::tempdir().unwrap();
        let r = unpack_sources(
            sources.into_iter().map(Ok),
            t.path(),
            UnpackLimits::default(),
        );
        (t, r)
    }

    #[test]
    fn unpack_sources_verified_gzip_and_zstd_layers_are_applied_in_order() {
        let l0 = gzip(&tar_of(&[("a", b"one\n"), ("b", b"b\n")]));
        let l1 = zstd::stream::encode_all(&tar_of(&[("a", b"two\n")])[..], 1).unwrap();
        let (d0, d1) = (Digest::of(&l0), Digest::of(&l1));
        let (t, r) = unpack(vec![
            source(l0, Some(Compression::Gzip), Some(d0)),
            source(l1, Some(Compression::Zstd), Some(d1)),
        ]);
        let stats = r.unwrap();
        assert_eq!((stats.layers, stats.entries), (2, 3));
        assert_eq!(std::fs::read(t.path().join("a")).unwrap(), b"two\n");
        assert_eq!(std::fs::read(t.path().join("b")).unwrap(), b"b\n");
    }

    #[test]
    fn unpack_sources_digest_mismatch_is_refused_with_both_digests() {
        let good = gzip(&tar_of(&[("a", b"one\n")]));
        let claimed = Digest::of(b"another blob");
        let (_t, r) = unpack(vec![source(
            good.clone(),
            Some(Compression::Gzip),
            Some(claimed.clone()),
        )]);
        match r {
            Err(UnpackError::Digest {
                layer,
                expected,
                actual,
            }) => {
                assert_eq!(layer, 0);
                assert_eq!(expected, claimed);
                assert_eq!(actual, Digest::of(&good));
            }
            other => panic!("expected a digest error, got {other:?}"),
        }
    }

    #[test]
    fn unpack_sources_digest_mismatch_in_a_later_layer_names_it() {
        let l0 = tar_of(&[("a", b"a\n")]);
        let l1 = tar_of(&[("b", b"b\n")]);
        let d0 = Digest::of(&l0);
        let (_t, r) = unpack(vec![
            source(l0, Some(Compression::None), Some(d0.clone())),
            source(l1, Some(Compression::None), Some(d0)),
        ]);
        assert!(
            matches!(r, Err(UnpackError::Digest { layer: 1, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn unpack_sources_wrong_compression_is_a_stream_error() {
        let plain = tar_of(&[("a", b"a\n")]);
        let d = Digest::of(&plain);
        let (_t, r) = unpack(vec![source(plain, Some(Compression::Gzip), Some(d))]);
        assert!(
            matches!(r, Err(UnpackError::Stream { layer: 0, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn unpack_sources_failing_source_fails_its_layer() {
        let l0 = tar_of(&[("a", b"a\n")]);
        let t = tempfile::tempdir().unwrap();
        let sources = vec![
            Ok(source(l0, None, None)),
            Err(io::Error::other("disk gone")),
        ];
        let r = unpack_sources(sources, t.path(), UnpackLimits::default());
        assert!(
            matches!(r, Err(UnpackError::Stream { layer: 1, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn media_types_map_to_compression_and_unknown_ones_do_not() {
        for (mt, c) in [
            ("application/vnd.oci.image.layer.v1.tar", Compression::None),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Compression::Zstd,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Compression::Gzip,
            ),
        ] {
            assert_eq!(Compression::from_media_type(mt), Some(c), "{mt}");
        }
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            assert_eq!(Compression::from_media_type(c.media_type()), Some(c));
        }
        for bad in [
            "",
            "application/vnd.oci.image.layer.v1.tar+bzip2",
            "application/vnd.oci.image.config.v1+json",
            "application/vnd.oci.image.layer.v1.tar+gzip ",
        ] {
            assert_eq!(Compression::from_media_type(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn sniff_recognises_gzip_and_zstd_magic() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Compression::Zstd
        );
        assert_eq!(Compression::sniff(b"usta"), Compression::None);
        assert_eq!(Compression::sniff(&[]), Compression::None);
    }
}
