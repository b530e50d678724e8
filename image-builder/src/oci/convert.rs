//! Converts a stored image to a VM root filesystem image (erofs or ext4) plus the
//! config the guest needs, cached in the store by manifest digest.
//!
//! The tree is unpacked with [`super::unpack`] into a temporary directory of the
//! store, then `mkfs.erofs` (erofs-utils) or `mke2fs -d` (e2fsprogs) builds the
//! image from it: both are the reference writers of their formats, and Debian 12's
//! erofs-utils 1.5 cannot read a tar stream itself.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::digest::Digest;
use super::store::{write_atomic, Store, StoreError, StoredImage};
use super::unpack::{unpack_layers, UnpackError, UnpackLimits, UnpackStats};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Erofs,
    Ext4,
}

impl Format {
    pub fn ext(self) -> &'static str {
        match self {
            Format::Erofs => "erofs",
            Format::Ext4 => "ext4",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.ext())
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "erofs" => Ok(Format::Erofs),
            "ext4" => Ok(Format::Ext4),
            _ => Err(format!("unknown format {s:?}: use erofs or ext4")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {tool} ({source}); install {package}")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        tool: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ConvertError + '_ {
    move |source| ConvertError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the guest needs to start the container (written as JSON beside the image).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct GuestConfig {
    pub manifest_digest: String,
    pub config_digest: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub user: String,
    pub working_dir: String,
}

impl GuestConfig {
    pub fn from_image(img: &StoredImage) -> Self {
        let c = img.config.config().clone().unwrap_or_default();
        Self {
            manifest_digest: img.manifest_digest.to_string(),
            config_digest: img.config_digest.to_string(),
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            user: c.user().clone().unwrap_or_default(),
            working_dir: c.working_dir().clone().unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Converted {
    /// The cached image in the store.
    pub cached: PathBuf,
    pub config: GuestConfig,
    /// False when an earlier conversion was reused.
    pub built: bool,
    pub unpack: Option<UnpackStats>,
    pub unpack_time: Duration,
    pub mkfs_time: Duration,
}

/// The config file written beside `out`: `<out>.config.json`.
pub fn config_path_for(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".config.json");
    PathBuf::from(s)
}

/// Builds (or reuses) `images/<manifest>/rootfs.<fmt>` and `config.json` in the store.
pub fn convert_cached(
    store: &Store,
    manifest: &Digest,
    format: Format,
    limits: UnpackLimits,
) -> Result<Converted, ConvertError> {
    let _lock = store.lock_shared()?;
    let img = store.image(manifest)?;
    let config = GuestConfig::from_image(&img);
    let dir = store.image_dir(manifest);
    let cached = dir.join(format!("rootfs.{}", format.ext()));
    if cached.is_file() {
        return Ok(Converted {
            cached,
            config,
            built: false,
            unpack: None,
            unpack_time: Duration::ZERO,
            mkfs_time: Duration::ZERO,
        });
    }
    let work = tempfile::Builder::new()
        .prefix("convert-")
        .tempdir_in(store.tmp_dir())
        .map_err(io_err(&store.tmp_dir()))?;
    let rootfs = work.path().join("rootfs");
    fs::create_dir(&rootfs).map_err(io_err(&rootfs))?;
    let layers: Vec<PathBuf> = img
        .layer_digests()?
        .iter()
        .map(|d| store.blob_path(d))
        .collect();
    let t0 = Instant::now();
    let stats = unpack_layers(&layers, &rootfs, limits)?;
    let unpack_time = t0.elapsed();
    let t1 = Instant::now();
    let out = work.path().join(format!("rootfs.{}", format.ext()));
    make_fs(format, &rootfs, &out, &stats)?;
    let mkfs_time = t1.elapsed();
    // The unpacked tree is not needed any more: remove it while the image is synced.
    let tree = work.path().join("rootfs");
    let cleaner = std::thread::spawn(move || {
        let _ = fs::remove_dir_all(tree);
    });
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let cjson = serde_json::to_vec_pretty(&config).expect("config serializes");
    write_atomic(&dir.join("config.json"), &cjson, &store.tmp_dir())?;
    fs::File::open(&out)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&out))?;
    // Read-only: outputs may be hard links to it.
    let _ = fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o444));
    fs::rename(&out, &cached).map_err(io_err(&cached))?;
    let _ = cleaner.join();
    Ok(Converted {
        cached,
        config,
        built: true,
        unpack: Some(stats),
        unpack_time,
        mkfs_time,
    })
}

/// Converts and copies the result to `out`, with `<out>.config.json` beside it.
pub fn convert(
    store: &Store,
    manifest: &Digest,
    format: Format,
    out: &Path,
    limits: UnpackLimits,
) -> Result<Converted, ConvertError> {
    let c = convert_cached(store, manifest, format, limits)?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    // erofs is a read-only format: the output is a hard link to the cached image
    // when both are on one filesystem. ext4 is copied: a guest may write to it,
    // never to the cache.
    let tmp = super::store::unique_tmp(&parent, "partial");
    let linked = format == Format::Erofs && fs::hard_link(&c.cached, &tmp).is_ok();
    if !linked {
        fs::copy(&c.cached, &tmp).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(out)(e)
        })?;
        let _ = fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644));
    }
    fs::rename(&tmp, out).map_err(io_err(out))?;
    let cjson = serde_json::to_vec_pretty(&c.config).expect("config serializes");
    write_atomic(&config_path_for(out), &cjson, &parent)?;
    Ok(c)
}

fn run(tool: &'static str, package: &'static str, cmd: &mut Command) -> Result<(), ConvertError> {
    let out = cmd.output().map_err(|source| ConvertError::ToolMissing {
        tool,
        package,
        source,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(ConvertError::ToolFailed {
            tool,
            status: out.status,
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    Ok(())
}

/// Builds a filesystem image of `root` at `out`.
pub fn make_fs(
    format: Format,
    root: &Path,
    out: &Path,
    stats: &UnpackStats,
) -> Result<(), ConvertError> {
    match format {
        // Uncompressed: the guest reads pages straight from the disk, and a
        // mkfs without compression is several times faster.
        Format::Erofs => run(
            "mkfs.erofs",
            "erofs-utils",
            Command::new("mkfs.erofs")
                .arg("--quiet")
                .arg("--preserve-mtime")
                .arg(out)
                .arg(root),
        ),
        Format::Ext4 => {
            // Room for content rounded up to blocks, metadata and a little free space.
            let bytes = stats.bytes + stats.entries * 4096;
            let size_k = (bytes + bytes / 5) / 1024 + 32 * 1024;
            let inodes = stats.entries + stats.entries / 5 + 1024;
            run(
                "mke2fs",
                "e2fsprogs",
                Command::new("mke2fs")
                    .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
                    .arg("-N")
                    .arg(inodes.to_string())
                    .arg("-d")
                    .arg(root)
                    .arg(out)
                    .arg(format!("{size_k}k")),
            )
        }
    }
}
