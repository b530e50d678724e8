//! The content-addressed image store.
//!
//! Layout (all under the store root, see the README):
//! - `blobs/sha256/<hex>`: manifests, configs and layers, verified before they appear.
//! - `tmp/`: blobs being written (`<random>.tmp`) and resumable downloads
//!   (`<hex>.partial`); nothing in `tmp/` is ever read as content.
//! - `refs.json`: `{"refs": {"<name>": "<manifest digest>"}}`, replaced atomically.
//! - `images/<manifest hex>/`: conversion results (`rootfs.erofs`, `rootfs.ext4`,
//!   `config.json`), each published by rename.
//! - `gc.lock`: held shared by every writer for its whole run and exclusively by the
//!   collector, so a blob written by a running pull is never collected before the
//!   pull records its ref. `refs.lock`: held exclusively around each update of
//!   `refs.json`.
//!
//! A crash at any point leaves at most stray files in `tmp/`: blobs and refs become
//! visible only through `rename(2)` after an `fsync`.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use oci_spec::image::{ImageConfiguration, ImageManifest};
use serde::{Deserialize, Serialize};

use super::digest::{Digest, HashingWriter};

/// Where the store lives when neither `--store` nor `ATOLL_STORE` says otherwise.
pub const DEFAULT_STORE_ROOT: &str = "/var/lib/atoll/images";
pub const STORE_ENV: &str = "ATOLL_STORE";
/// Manifests, indexes and configs are small JSON documents; anything larger is hostile.
pub const MAX_JSON_BLOB: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blob {expected}: content has digest {actual} ({size} bytes); refusing it")]
    DigestMismatch {
        expected: Digest,
        actual: Digest,
        size: u64,
    },
    #[error("blob {digest}: {actual} bytes, but its descriptor says {expected}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("blob {0} is not in the store")]
    MissingBlob(Digest),
    #[error("blob {digest} is {size} bytes, more than the {max} allowed for a JSON document")]
    TooLarge { digest: Digest, size: u64, max: u64 },
    #[error("blob {digest} is not a valid {what}: {source}")]
    BadJson {
        digest: Digest,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("no image {0:?} in the store (see `atoll-image ls`)")]
    UnknownRef(String),
    #[error("{0:?} matches more than one image; use more digits or the full name")]
    AmbiguousRef(String),
    #[error("refs.json is corrupt: {0}")]
    CorruptRefs(#[source] serde_json::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RefsFile {
    refs: BTreeMap<String, String>,
}

/// An image manifest and its config, read from the store.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub manifest_digest: Digest,
    pub manifest: ImageManifest,
    pub config_digest: Digest,
    pub config: ImageConfiguration,
}

impl StoredImage {
    /// The layer digests, bottom first.
    pub fn layer_digests(&self) -> Result<Vec<Digest>, StoreError> {
        self.manifest
            .layers()
            .iter()
            .map(|l| {
                Digest::try_from(l.digest()).map_err(|e| StoreError::Io {
                    path: PathBuf::from(l.digest().to_string()),
                    source: io::Error::new(io::ErrorKind::InvalidData, e),
                })
            })
            .collect()
    }
}

/// A lock file held with `flock(2)`; released on drop.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcStats {
    pub blobs_removed: usize,
    pub bytes_removed: u64,
    pub images_removed: usize,
}

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        for sub in ["blobs/sha256", "tmp", "images"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Where a resumable download of `d` keeps its bytes so far.
    pub fn partial_path(&self, d: &Digest) -> PathBuf {
        self.tmp_dir().join(format!("{}.partial", d.hex()))
    }

    /// Directory of the conversion results of one image.
    pub fn image_dir(&self, manifest: &Digest) -> PathBuf {
        self.root.join("images").join(manifest.hex())
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    pub fn open_blob(&self, d: &Digest) -> Result<File, StoreError> {
        File::open(self.blob_path(d)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob(d.clone()),
            _ => io_err(&self.blob_path(d))(e),
        })
    }

    /// Reads a small blob (manifest, config), refusing more than `MAX_JSON_BLOB`.
    pub fn read_small_blob(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        let f = self.open_blob(d)?;
        let mut buf = Vec::new();
        f.take(MAX_JSON_BLOB + 1)
            .read_to_end(&mut buf)
            .map_err(io_err(&self.blob_path(d)))?;
        if buf.len() as u64 > MAX_JSON_BLOB {
            return Err(StoreError::TooLarge {
                digest: d.clone(),
                size: buf.len() as u64,
                max: MAX_JSON_BLOB,
            });
        }
        Ok(buf)
    }

    /// A writer for a new blob; nothing is visible until [`BlobWriter::commit`].
    pub fn blob_writer(&self) -> Result<BlobWriter, StoreError> {
        let path = unique_tmp(&self.tmp_dir(), "tmp");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(BlobWriter {
            store: self.clone(),
            tmp: path,
            w: Some(HashingWriter::new(io::BufWriter::with_capacity(
                1 << 20,
                file,
            ))),
        })
    }

    /// Stores `data`, checking it against `expected` when given.
    pub fn put_blob(&self, data: &[u8], expected: Option<&Digest>) -> Result<Digest, StoreError> {
        let d = Digest::of(data);
        if let Some(e) = expected {
            if *e != d {
                return Err(StoreError::DigestMismatch {
                    expected: e.clone(),
                    actual: d,
                    size: data.len() as u64,
                });
            }
        }
        if self.has_blob(&d) {
            return Ok(d);
        }
        let mut w = self.blob_writer()?;
        w.write_all(data).map_err(io_err(&w.tmp.clone()))?;
        w.commit(Some(&d), Some(data.len() as u64))
    }

    /// Moves a fully written file (whose digest the caller computed while writing it)
    /// into the store as `digest`.
    pub fn publish_file(&self, tmp: &Path, digest: &Digest) -> Result<(), StoreError> {
        let f = File::open(tmp).map_err(io_err(tmp))?;
        f.sync_all().map_err(io_err(tmp))?;
        let dst = self.blob_path(digest);
        fs::rename(tmp, &dst).map_err(io_err(&dst))?;
        sync_dir(dst.parent().unwrap_or(&self.root));
        Ok(())
    }

    /// Takes `gc.lock` shared: held by everything that adds blobs, for its whole run.
    pub fn lock_shared(&self) -> Result<StoreLock, StoreError> {
        self.lock("gc.lock", rustix::fs::FlockOperation::LockShared)
    }

    fn lock(&self, name: &str, op: rustix::fs::FlockOperation) -> Result<StoreLock, StoreError> {
        let path = self.root.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        rustix::fs::flock(file.as_fd(), op).map_err(|e| io_err(&path)(e.into()))?;
        Ok(StoreLock { _file: file })
    }

    /// All refs and the manifest each names.
    pub fn refs(&self) -> Result<BTreeMap<String, Digest>, StoreError> {
        let path = self.root.join("refs.json");
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let file: RefsFile = serde_json::from_slice(&data).map_err(StoreError::CorruptRefs)?;
        file.refs
            .into_iter()
            .map(|(k, v)| {
                let d = v.parse().map_err(|e| StoreError::Io {
                    path: path.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidData, e),
                })?;
                Ok((k, d))
            })
            .collect()
    }

    fn update_refs(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, Digest>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let _lock = self.lock("refs.lock", rustix::fs::FlockOperation::LockExclusive)?;
        let mut refs = self.refs()?;
        f(&mut refs)?;
        let file = RefsFile {
            refs: refs.into_iter().map(|(k, v)| (k, v.to_string())).collect(),
        };
        let data = serde_json::to_vec_pretty(&file).expect("refs serialize");
        write_atomic(&self.root.join("refs.json"), &data, &self.tmp_dir())
    }

    /// Records `name` -> `manifest`. The manifest, its config and layers must already
    /// be in the store.
    pub fn set_ref(&self, name: &str, manifest: &Digest) -> Result<(), StoreError> {
        self.update_refs(|refs| {
            refs.insert(name.to_owned(), manifest.clone());
            Ok(())
        })
    }

    /// Removes a ref (resolved like [`Store::resolve`]) and returns its name.
    pub fn remove_ref(&self, reference: &str) -> Result<String, StoreError> {
        let (name, _) = self.resolve(reference)?;
        let mut removed = None;
        self.update_refs(|refs| {
            if refs.remove(&name).is_none() {
                return Err(StoreError::UnknownRef(name.clone()));
            }
            removed = Some(name.clone());
            Ok(())
        })?;
        Ok(removed.unwrap_or(name))
    }

    /// Finds an image by exact ref name, by name with `:latest` added, by manifest
    /// digest, or by a unique prefix (>= 6 hex digits) of one.
    pub fn resolve(&self, reference: &str) -> Result<(String, Digest), StoreError> {
        let refs = self.refs()?;
        if let Some(d) = refs.get(reference) {
            return Ok((reference.to_owned(), d.clone()));
        }
        let normalized = super::reference::Reference::parse(reference)
            .ok()
            .map(|r| r.to_string());
        if let Some(n) = normalized {
            if let Some(d) = refs.get(&n) {
                return Ok((n, d.clone()));
            }
        }
        let with_tag = format!("{reference}:latest");
        if let Some(d) = refs.get(&with_tag) {
            return Ok((with_tag, d.clone()));
        }
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        if hex.len() >= 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hits: Vec<_> = refs
                .iter()
                .filter(|(_, d)| d.hex().starts_with(hex))
                .collect();
            let distinct: HashSet<_> = hits.iter().map(|(_, d)| *d).collect();
            match distinct.len() {
                0 => {}
                1 => {
                    let (n, d) = hits[0];
                    return Ok((n.clone(), d.clone()));
                }
                _ => return Err(StoreError::AmbiguousRef(reference.to_owned())),
            }
        }
        Err(StoreError::UnknownRef(reference.to_owned()))
    }

    /// Reads a manifest and its config from the store.
    pub fn image(&self, manifest_digest: &Digest) -> Result<StoredImage, StoreError> {
        let data = self.read_small_blob(manifest_digest)?;
        let manifest: ImageManifest =
            serde_json::from_slice(&data).map_err(|source| StoreError::BadJson {
                digest: manifest_digest.clone(),
                what: "image manifest",
                source,
            })?;
        let config_digest =
            Digest::try_from(manifest.config().digest()).map_err(|e| StoreError::Io {
                path: self.blob_path(manifest_digest),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?;
        let cdata = self.read_small_blob(&config_digest)?;
        let config: ImageConfiguration =
            serde_json::from_slice(&cdata).map_err(|source| StoreError::BadJson {
                digest: config_digest.clone(),
                what: "image config",
                source,
            })?;
        Ok(StoredImage {
            manifest_digest: manifest_digest.clone(),
            manifest,
            config_digest,
            config,
        })
    }

    /// Removes blobs and conversion results no ref reaches. Waits for running
    /// writers (they hold `gc.lock` shared).
    pub fn gc(&self) -> Result<GcStats, StoreError> {
        let _lock = self.lock("gc.lock", rustix::fs::FlockOperation::LockExclusive)?;
        let mut live: HashSet<String> = HashSet::new();
        let mut live_images: HashSet<String> = HashSet::new();
        for d in self.refs()?.values() {
            live.insert(d.hex().to_owned());
            live_images.insert(d.hex().to_owned());
            // A ref whose manifest cannot be read keeps only itself alive.
            if let Ok(img) = self.image(d) {
                live.insert(img.config_digest.hex().to_owned());
                for l in img.layer_digests()? {
                    live.insert(l.hex().to_owned());
                }
            }
        }
        let mut stats = GcStats::default();
        let blobs = self.root.join("blobs/sha256");
        for e in fs::read_dir(&blobs).map_err(io_err(&blobs))? {
            let e = e.map_err(io_err(&blobs))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !live.contains(&name) {
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
                stats.blobs_removed += 1;
                stats.bytes_removed += size;
            }
        }
        let images = self.root.join("images");
        for e in fs::read_dir(&images).map_err(io_err(&images))? {
            let e = e.map_err(io_err(&images))?;
            if !live_images.contains(&*e.file_name().to_string_lossy()) {
                fs::remove_dir_all(e.path()).map_err(io_err(&e.path()))?;
                stats.images_removed += 1;
            }
        }
        // Leftovers of crashed writers; `.partial` downloads stay resumable.
        let tmp = self.tmp_dir();
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let e = e.map_err(io_err(&tmp))?;
            if !e.file_name().to_string_lossy().ends_with(".partial") {
                let p = e.path();
                let _ = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        }
        Ok(stats)
    }
}

/// A blob being written into `tmp/`; dropped without `commit`, it is removed.
pub struct BlobWriter {
    store: Store,
    tmp: PathBuf,
    /// `None` once committed.
    w: Option<HashingWriter<io::BufWriter<File>>>,
}

impl BlobWriter {
    pub fn len(&self) -> u64 {
        self.w.as_ref().map_or(0, |w| w.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Verifies the content against `expected` (digest and size, when given) and
    /// publishes it by rename.
    pub fn commit(
        mut self,
        expected: Option<&Digest>,
        expected_size: Option<u64>,
    ) -> Result<Digest, StoreError> {
        let tmp = std::mem::take(&mut self.tmp);
        let Some(w) = self.w.take() else {
            unreachable!("commit consumes the writer");
        };
        let (bw, digest, size) = w.finish();
        let file = bw.into_inner().map_err(|e| io_err(&tmp)(e.into_error()))?;
        let cleanup = |e| {
            let _ = fs::remove_file(&tmp);
            e
        };
        if let Some(e) = expected {
            if *e != digest {
                return Err(cleanup(StoreError::DigestMismatch {
                    expected: e.clone(),
                    actual: digest,
                    size,
                }));
            }
        }
        if let Some(s) = expected_size {
            if s != size {
                return Err(cleanup(StoreError::SizeMismatch {
                    digest,
                    expected: s,
                    actual: size,
                }));
            }
        }
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        let dst = self.store.blob_path(&digest);
        fs::rename(&tmp, &dst).map_err(|e| cleanup(io_err(&dst)(e)))?;
        sync_dir(dst.parent().unwrap_or(self.store.root()));
        Ok(digest)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.w {
            Some(w) => w.write(buf),
            None => Err(io::Error::other("blob already committed")),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.w {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A fresh name in `dir`: pid, time and a counter, so two processes never collide.
pub fn unique_tmp(dir: &Path, ext: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    dir.join(format!("{}-{t}-{n}.{ext}", std::process::id()))
}

/// Writes `data` to `path` through a temp file in `tmp_dir` (same filesystem),
/// `fsync` and rename.
pub fn write_atomic(path: &Path, data: &[u8], tmp_dir: &Path) -> Result<(), StoreError> {
    let tmp = unique_tmp(tmp_dir, "tmp");
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map_err(io_err(path))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_blob_wrong_digest_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let wrong = Digest::of(b"other");
        let err = store.put_blob(b"content", Some(&wrong)).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!store.has_blob(&wrong));
        assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn blob_writer_dropped_without_commit_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut w = store.blob_writer().unwrap();
        w.write_all(b"half").unwrap();
        drop(w);
        assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
        assert_eq!(
            fs::read_dir(dir.path().join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn resolve_by_name_and_digest_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::of(b"m");
        store.set_ref("example/app:1", &d).unwrap();
        assert_eq!(store.resolve("example/app:1").unwrap().1, d);
        assert_eq!(store.resolve(&d.hex()[..12]).unwrap().1, d);
        assert!(matches!(
            store.resolve("nope"),
            Err(StoreError::UnknownRef(_))
        ));
    }

    #[test]
    fn gc_removes_unreferenced_blobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let orphan = store.put_blob(b"orphan", None).unwrap();
        let stats = store.gc().unwrap();
        assert_eq!(stats.blobs_removed, 1);
        assert!(!store.has_blob(&orphan));
    }
}
