//! A container's root unpacked from the image's OCI layers (`Rootfs.layers`): the
//! host lays the layer blobs end to end on a read-only "layers disk"; each request
//! names a byte range of it, the sha256 of those bytes and their media type.
//!
//! The request and the disk are both hostile: the layer count is bounded, every range
//! must lie inside the disk, the digest and media type must be well formed before
//! anything is read, and the blob is hashed as it streams through the decompressor
//! into the shared unpacker (`atoll-oci-unpack`: confined paths, whiteouts, limits).
//! A digest mismatch shows only at the end of its layer, after its entries were
//! written: the caller throws the whole tree away on any error.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use atoll_agent_proto::v1;
use atoll_oci_unpack::digest::Digest;
use atoll_oci_unpack::unpack::{
    unpack_sources, Compression, LayerSource, UnpackError, UnpackLimits, UnpackStats,
};

/// Most layers a request may name (Docker's own limit is 127 for overlayfs).
pub const MAX_LAYERS: usize = 128;

/// What unpacking in the guest may do: the tree lives in the container's tmpfs,
/// whose size (half the guest's memory) bounds the bytes; entries are bounded here.
pub const GUEST_LIMITS: UnpackLimits = UnpackLimits {
    max_entries: 1_000_000,
    max_bytes: 64 << 30,
    max_path_len: 4096,
};

/// A layer of the request, checked against the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRange {
    pub offset: u64,
    pub length: u64,
    pub digest: Digest,
    pub compression: Compression,
}

/// Unpacking `Rootfs.layers` failed.
#[derive(Debug, thiserror::Error)]
pub enum LayersError {
    /// No layer at all.
    #[error("rootfs.layers names no layer; send at least one")]
    Empty,
    /// More than [`MAX_LAYERS`].
    #[error("rootfs.layers names {count} layers; at most {max} are accepted")]
    TooMany {
        /// Layers in the request.
        count: usize,
        /// [`MAX_LAYERS`].
        max: usize,
    },
    /// The digest is not `sha256:<64 lowercase hex>`.
    #[error("rootfs.layers[{index}].digest {value:?} is not sha256:<64 lowercase hex digits>")]
    Digest {
        /// Which layer.
        index: usize,
        /// What it said.
        value: String,
    },
    /// Not a layer tar, or a compression we do not read.
    #[error(
        "rootfs.layers[{index}].media_type {media_type:?} is not an OCI layer \
         (tar, tar+gzip or tar+zstd)"
    )]
    MediaType {
        /// Which layer.
        index: usize,
        /// What it said.
        media_type: String,
    },
    /// The range does not lie inside the disk.
    #[error(
        "rootfs.layers[{index}] (offset {offset}, length {length}) goes past the end \
         of the {disk_size}-byte layers disk"
    )]
    OutOfRange {
        /// Which layer.
        index: usize,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u64,
        /// The disk's size.
        disk_size: u64,
    },
    /// The disk cannot be opened or sized.
    #[error("cannot read the layers disk {path}")]
    Disk {
        /// The block device.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The unpacker refused a layer or could not write it.
    #[error("unpacking the image layers: {0}")]
    Unpack(UnpackError),
}

impl LayersError {
    /// Whether the request or the image is at fault (rather than the guest).
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Disk { .. } => false,
            Self::Unpack(e) => !matches!(e, UnpackError::Target { .. } | UnpackError::Entry { .. }),
            _ => true,
        }
    }
}

/// Checks the request's layers against a disk of `disk_size` bytes, before anything
/// is read from it.
pub fn plan(layers: &[v1::Layer], disk_size: u64) -> Result<Vec<LayerRange>, LayersError> {
    if layers.is_empty() {
        return Err(LayersError::Empty);
    }
    if layers.len() > MAX_LAYERS {
        return Err(LayersError::TooMany {
            count: layers.len(),
            max: MAX_LAYERS,
        });
    }
    let mut out = Vec::with_capacity(layers.len());
    for (index, l) in layers.iter().enumerate() {
        let digest: Digest = l.digest.parse().map_err(|_| LayersError::Digest {
            index,
            // Quoted back to the host: keep it short.
            value: l.digest.chars().take(80).collect(),
        })?;
        let compression =
            Compression::from_media_type(&l.media_type).ok_or_else(|| LayersError::MediaType {
                index,
                media_type: l.media_type.chars().take(120).collect(),
            })?;
        let inside = l
            .offset
            .checked_add(l.length)
            .is_some_and(|end| end <= disk_size);
        if !inside {
            return Err(LayersError::OutOfRange {
                index,
                offset: l.offset,
                length: l.length,
                disk_size,
            });
        }
        out.push(LayerRange {
            offset: l.offset,
            length: l.length,
            digest,
            compression,
        });
    }
    Ok(out)
}

/// Reads `[pos, end)` of a shared file with `pread`, so every layer has its own
/// cursor on one open disk.
struct RangeReader {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let Some(dst) = buf.get_mut(..want).filter(|b| !b.is_empty()) else {
            return Ok(0);
        };
        let n = self.file.read_at(dst, self.pos)?;
        if n == 0 {
            // The range was checked against the disk's size: a shrinking disk.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the layers disk ended at byte {}", self.pos),
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// An opened layers disk and its size.
#[derive(Debug)]
pub struct LayersDisk {
    path: PathBuf,
    file: Arc<File>,
    size: u64,
}

impl LayersDisk {
    /// Opens the disk (a block device or, in tests, a file) read-only.
    pub fn open(path: &Path) -> Result<Self, LayersError> {
        let err = |source| LayersError::Disk {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(err)?;
        // A block device's metadata says 0 bytes; its end says how large it is.
        let size = file.seek(SeekFrom::End(0)).map_err(err)?;
        Ok(Self {
            path: path.to_owned(),
            file: Arc::new(file),
            size,
        })
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Checks `layers` against this disk (see [`plan`]).
    pub fn plan(&self, layers: &[v1::Layer]) -> Result<Vec<LayerRange>, LayersError> {
        plan(layers, self.size)
    }

    /// Applies the planned layers, bottom first, to `target` (an existing, empty
    /// directory), verifying each one's digest as it streams.
    pub fn unpack(
        &self,
        ranges: &[LayerRange],
        target: &Path,
        limits: UnpackLimits,
    ) -> Result<UnpackStats, LayersError> {
        let sources = ranges.iter().map(|r| {
            Ok(LayerSource {
                reader: Box::new(RangeReader {
                    file: Arc::clone(&self.file),
                    pos: r.offset,
                    end: r.offset.saturating_add(r.length),
                }),
                compression: Some(r.compression),
                digest: Some(r.digest.clone()),
            })
        });
        unpack_sources(sources, target, limits).map_err(LayersError::Unpack)
    }

    /// The device path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Layer blobs and layers disks for tests.
    use super::*;
    use std::io::Write;

    /// A tar of `(path, content)` regular files (`content: None`: a directory).
    pub fn tar_of(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, content) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match content {
                Some(data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, name, *data).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, name, io::empty()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    pub fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Writes `blobs` to `path` as the host does (4 KiB aligned, size a multiple of
    /// 512) and returns the request's layers (gzip media type).
    pub fn write_disk(path: &Path, blobs: &[Vec<u8>]) -> Vec<v1::Layer> {
        let mut disk = Vec::new();
        let mut layers = Vec::new();
        for b in blobs {
            let offset = disk.len().next_multiple_of(4096);
            disk.resize(offset, 0);
            disk.extend_from_slice(b);
            layers.push(v1::Layer {
                offset: offset as u64,
                length: b.len() as u64,
                digest: Digest::of(b).to_string(),
                media_type: Compression::Gzip.media_type().into(),
            });
        }
        disk.resize(disk.len().next_multiple_of(512), 0);
        std::fs::write(path, disk).unwrap();
        layers
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn layer(offset: u64, length: u64) -> v1::Layer {
        v1::Layer {
            offset,
            length,
            digest: Digest::of(b"x").to_string(),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        }
    }

    #[test]
    fn plan_accepts_ranges_inside_the_disk() {
        let p = plan(&[layer(0, 4096), layer(4096, 100)], 8192).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[1].offset, p[1].length), (4096, 100));
        assert_eq!(p[0].compression, Compression::Gzip);
    }

    #[test]
    fn plan_length_past_the_end_of_the_disk_is_refused() {
        let err = plan(&[layer(0, 10), layer(4096, 4097)], 8192).unwrap_err();
        assert!(
            matches!(err, LayersError::OutOfRange { index: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("8192-byte layers disk"), "{err}");
    }

    #[test]
    fn plan_offset_plus_length_overflow_is_refused() {
        let err = plan(&[layer(u64::MAX - 1, 10)], u64::MAX).unwrap_err();
        assert!(matches!(err, LayersError::OutOfRange { index: 0, .. }));
    }

    #[test]
    fn plan_too_many_layers_is_refused() {
        let many = vec![layer(0, 1); MAX_LAYERS + 1];
        let err = plan(&many, 4096).unwrap_err();
        assert!(matches!(
            err,
            LayersError::TooMany {
                count: 129,
                max: 128
            }
        ));
        assert!(plan(&many[..MAX_LAYERS], 4096).is_ok());
        assert!(matches!(plan(&[], 4096), Err(LayersError::Empty)));
    }

    #[test]
    fn plan_unknown_media_type_is_refused() {
        let mut l = layer(0, 1);
        l.media_type = "application/vnd.oci.image.layer.v1.tar+bzip2".into();
        let err = plan(&[l], 4096).unwrap_err();
        assert!(
            matches!(err, LayersError::MediaType { index: 0, .. }),
            "{err}"
        );
        assert!(err.is_bad_input());
    }

    #[test]
    fn plan_malformed_digest_is_refused() {
        let mut l = layer(0, 1);
        l.digest = "sha256:../../etc/passwd".into();
        let err = plan(&[l], 4096).unwrap_err();
        assert!(matches!(err, LayersError::Digest { index: 0, .. }), "{err}");
    }

    #[test]
    fn unpack_applies_layers_from_their_ranges() {
        let t = tempfile::tempdir().unwrap();
        let disk = t.path().join("layers.img");
        let layers = write_disk(
            &disk,
            &[
                gzip(&tar_of(&[("etc", None), ("etc/a", Some(b"lower\n"))])),
                gzip(&tar_of(&[
                    ("etc/.wh.a", Some(b"")),
                    ("etc/b", Some(b"b\n")),
                ])),
            ],
        );
        let root = t.path().join("rootfs");
        std::fs::create_dir(&root).unwrap();
        let d = LayersDisk::open(&disk).unwrap();
        assert_eq!(d.size() % 512, 0);
        let stats = d
            .unpack(&d.plan(&layers).unwrap(), &root, GUEST_LIMITS)
            .unwrap();
        assert_eq!(stats.layers, 2);
        assert!(!root.join("etc/a").exists(), "whited out");
        assert_eq!(std::fs::read(root.join("etc/b")).unwrap(), b"b\n");
    }

    #[test]
    fn unpack_digest_mismatch_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let disk = t.path().join("layers.img");
        let mut layers = write_disk(&disk, &[gzip(&tar_of(&[("f", Some(b"f\n"))]))]);
        layers[0].digest = Digest::of(b"another layer").to_string();
        let root = t.path().join("rootfs");
        std::fs::create_dir(&root).unwrap();
        let d = LayersDisk::open(&disk).unwrap();
        let err = d
            .unpack(&d.plan(&layers).unwrap(), &root, GUEST_LIMITS)
            .unwrap_err();
        assert!(
            matches!(
                err,
                LayersError::Unpack(UnpackError::Digest { layer: 0, .. })
            ),
            "{err}"
        );
        assert!(err.is_bad_input());
        assert!(err.to_string().contains("tampered"), "{err}");
    }

    #[test]
    fn unpack_range_cut_short_is_refused() {
        // The host said the blob is shorter than it is: the bytes read do not hash
        // to the digest (nor form a complete gzip stream).
        let t = tempfile::tempdir().unwrap();
        let disk = t.path().join("layers.img");
        let mut layers = write_disk(&disk, &[gzip(&tar_of(&[("f", Some(b"f\n"))]))]);
        layers[0].length -= 8;
        let root = t.path().join("rootfs");
        std::fs::create_dir(&root).unwrap();
        let d = LayersDisk::open(&disk).unwrap();
        let err = d
            .unpack(&d.plan(&layers).unwrap(), &root, GUEST_LIMITS)
            .unwrap_err();
        assert!(matches!(err, LayersError::Unpack(_)), "{err}");
    }

    #[test]
    fn open_missing_disk_names_it() {
        let err = LayersDisk::open(Path::new("/nonexistent/vdz")).unwrap_err();
        assert!(matches!(err, LayersError::Disk { .. }));
        assert!(!err.is_bad_input());
        assert!(err.to_string().contains("/nonexistent/vdz"), "{err}");
    }
}
