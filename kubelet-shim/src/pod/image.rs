//! Images and volumes for a pod: resolving IMAGE in the atoll-image store (building
//! the built-in busybox image on first use), converting it to an erofs disk or
//! handing its layer blobs to the guest as they are (a "layers disk" the agent
//! unpacks), merging its config with the user's overrides as `docker run` does, and
//! read-only erofs snapshots of host directories for `-v`.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use atoll_agent_proto::v1;
use atoll_image::oci::builtin::{self, BuiltinError};
use atoll_image::oci::convert::{self, ConvertError, Format, GuestConfig};
use atoll_image::oci::store::{Store, StoreError, DEFAULT_STORE_ROOT, STORE_ENV};
use atoll_image::oci::unpack::{Compression, UnpackLimits};

/// Where the built-in image's busybox comes from unless `ATOLL_BUSYBOX` says.
pub const BUSYBOX_ENV: &str = "ATOLL_BUSYBOX";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image store {root}")]
    Store {
        root: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error(
        "no image {0:?} in the store; import or pull it first (`atoll-image pull {0}`), \
         or use the built-in `busybox`"
    )]
    Unknown(String),
    #[error("building the built-in busybox image")]
    Builtin(#[source] BuiltinError),
    #[error("converting {image} to erofs")]
    Convert {
        image: String,
        #[source]
        source: ConvertError,
    },
    #[error("image {image}: cannot open its layer {digest} in the store")]
    Blob {
        image: String,
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("image {0} has neither Entrypoint nor Cmd: give a command after `--`")]
    NoCommand(String),
    #[error("-e {0:?}: expected KEY=VALUE (or KEY to pass the host's value)")]
    BadEnv(String),
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("-v {0:?}: expected HOST:GUEST or HOST:GUEST:ro")]
    Syntax(String),
    #[error("-v {spec:?}: the guest path must be absolute")]
    GuestNotAbsolute { spec: String },
    #[error("-v {spec:?}: {host} is neither a directory nor an erofs image (volumes are read-only snapshots of host directories)")]
    NotADirectory { spec: String, host: PathBuf },
    #[error("cannot run mkfs.erofs for volume {host}; install erofs-utils")]
    ToolMissing {
        host: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mkfs.erofs failed on volume {host}: {stderr}")]
    ToolFailed { host: PathBuf, stderr: String },
}

/// Writing the layers disk failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the layers disk {path}")]
pub struct LayersDiskError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// The virtio-blk serial of the layers disk.
pub const LAYERS_SERIAL: &str = "layers0";
/// Every blob starts at a multiple of this on the layers disk.
pub const LAYER_ALIGN: u64 = 4096;
/// The layers disk's size is a multiple of this (a virtio-blk sector).
pub const SECTOR: u64 = 512;

/// One layer blob of the store, opened (a later `atoll-image gc` cannot take it
/// away) and recognised by its first bytes.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    pub file: Arc<File>,
    /// `sha256:<hex>`, the blob's name in the store.
    pub digest: String,
    pub size: u64,
    pub compression: Compression,
}

/// The image's layers laid end to end on one disk, each at a [`LAYER_ALIGN`]ed
/// offset: the plan, written by [`LayersDisk::write`] into the pod directory.
#[derive(Debug, Clone)]
pub struct LayersDisk {
    blobs: Vec<LayerBlob>,
    layers: Vec<v1::Layer>,
    size: u64,
}

fn align_up(n: u64, to: u64) -> Option<u64> {
    n.checked_next_multiple_of(to)
}

impl LayersDisk {
    /// Lays `blobs` out (bottom layer first).
    pub fn plan(blobs: Vec<LayerBlob>) -> Self {
        let mut layers = Vec::with_capacity(blobs.len());
        let mut end = 0u64;
        for b in &blobs {
            // Blob sizes are file sizes: their sum fits u64 on any real machine.
            let offset = align_up(end, LAYER_ALIGN).unwrap_or(u64::MAX);
            end = offset.saturating_add(b.size);
            layers.push(v1::Layer {
                offset,
                length: b.size,
                digest: b.digest.clone(),
                media_type: b.compression.media_type().to_owned(),
            });
        }
        Self {
            blobs,
            layers,
            size: align_up(end, SECTOR).unwrap_or(u64::MAX),
        }
    }

    /// What the guest is told about the disk (`Rootfs.layers`).
    pub fn request(&self) -> v1::OciLayers {
        v1::OciLayers {
            serial: LAYERS_SERIAL.to_owned(),
            layers: self.layers.clone(),
        }
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Writes the disk to `out` (created; the gaps between blobs are holes).
    pub fn write(&self, out: &Path) -> Result<(), LayersDiskError> {
        let err = |source| LayersDiskError {
            path: out.to_owned(),
            source,
        };
        let mut dst = File::options()
            .write(true)
            .create_new(true)
            .open(out)
            .map_err(err)?;
        for (b, l) in self.blobs.iter().zip(&self.layers) {
            copy_range(&b.file, &mut dst, l.offset, l.length).map_err(err)?;
        }
        dst.set_len(self.size).map_err(err)?;
        Ok(())
    }
}

/// Copies the first `len` bytes of `src` to `dst` at `offset`: `copy_file_range`
/// (a reflink or an in-kernel copy), falling back to reading and writing across
/// file systems that refuse it.
fn copy_range(src: &File, dst: &mut File, offset: u64, len: u64) -> io::Result<()> {
    let mut off_in = 0u64;
    let mut off_out = offset;
    while off_in < len {
        let chunk = usize::try_from(len - off_in)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rustix::fs::copy_file_range(src, Some(&mut off_in), &*dst, Some(&mut off_out), chunk)
        {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("a layer blob ended after {off_in} of {len} bytes"),
                ))
            }
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::NOSYS
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::OPNOTSUPP,
            ) => break,
            Err(e) => return Err(e.into()),
        }
    }
    if off_in == len {
        return Ok(());
    }
    let mut r = src;
    r.seek(SeekFrom::Start(off_in))?;
    dst.seek(SeekFrom::Start(off_out))?;
    let want = len - off_in;
    let copied = io::copy(&mut r.take(want), dst)?;
    if copied != want {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "a layer blob ended after {} of {len} bytes",
                off_in + copied
            ),
        ));
    }
    dst.flush()
}

/// Where the container's root comes from.
#[derive(Debug, Clone)]
pub enum ImageRootfs {
    /// An erofs conversion of the image, attached read-only.
    Erofs(PathBuf),
    /// The layer blobs, unpacked by the guest agent.
    Layers(LayersDisk),
}

/// An image ready to attach: its root and its config.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// The name the store knows it by.
    pub name: String,
    pub rootfs: ImageRootfs,
    pub config: GuestConfig,
    /// False when an earlier conversion was reused (or nothing was converted).
    pub converted: bool,
    /// Layers are unpacked in the guest although not asked for: mkfs.erofs is not
    /// installed and the image was never converted.
    pub fell_back: bool,
}

/// How [`prepare`] gives the container its root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsFrom {
    /// erofs (cached, or converted now), or the layers if that needs a mkfs.erofs
    /// that is not installed.
    Auto,
    /// The layers, unpacked in the guest (`--unpack-in-guest`).
    Layers,
}

/// Whether `program` is an executable file in one of `path`'s directories.
pub fn in_path(program: &str, path: Option<&std::ffi::OsStr>) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = path else { return false };
    std::env::split_paths(path).any(|dir| {
        std::fs::metadata(dir.join(program))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The store root: `$ATOLL_STORE` or `/var/lib/atoll/images`.
pub fn store_root() -> PathBuf {
    std::env::var_os(STORE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE_ROOT))
}

/// Whether `reference` means the built-in image.
pub fn is_builtin(reference: &str) -> bool {
    matches!(
        reference,
        "busybox" | "busybox:latest" | "atoll/busybox" | "atoll/busybox:latest"
    )
}

/// Resolves `reference` (building the built-in image when asked for and missing)
/// and converts it to erofs, reusing an earlier conversion; or, as `from` says (or
/// when converting needs a missing mkfs.erofs), opens its layer blobs for a layers
/// disk.
pub fn prepare(
    store_root: &Path,
    reference: &str,
    from: RootfsFrom,
) -> Result<PreparedImage, ImageError> {
    let store_err = |source| ImageError::Store {
        root: store_root.to_owned(),
        source,
    };
    let store = Store::open(store_root).map_err(store_err)?;
    let (name, digest) = match store.resolve(reference) {
        Ok(found) => found,
        Err(StoreError::UnknownRef(_)) if is_builtin(reference) => {
            let busybox = std::env::var_os(BUSYBOX_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(builtin::DEFAULT_BUSYBOX));
            let d = builtin::ensure(&store, &busybox).map_err(ImageError::Builtin)?;
            (builtin::BUILTIN_REF.to_owned(), d)
        }
        Err(StoreError::UnknownRef(r)) => return Err(ImageError::Unknown(r)),
        Err(e) => return Err(store_err(e)),
    };
    let cached = store
        .image_dir(&digest)
        .join(format!("rootfs.{}", Format::Erofs.ext()));
    let fell_back = from == RootfsFrom::Auto
        && !cached.is_file()
        && !in_path("mkfs.erofs", std::env::var_os("PATH").as_deref());
    if from == RootfsFrom::Layers || fell_back {
        let (disk, config) = open_layers(&store, &digest, &name).map_err(|e| match e {
            LayersOpenError::Store(source) => store_err(source),
            LayersOpenError::Blob(e) => e,
        })?;
        return Ok(PreparedImage {
            name,
            rootfs: ImageRootfs::Layers(disk),
            config,
            converted: false,
            fell_back,
        });
    }
    let c = convert::convert_cached(&store, &digest, Format::Erofs, UnpackLimits::default())
        .map_err(|source| ImageError::Convert {
            image: name.clone(),
            source,
        })?;
    Ok(PreparedImage {
        name,
        rootfs: ImageRootfs::Erofs(c.cached),
        config: c.config,
        converted: c.built,
        fell_back: false,
    })
}

enum LayersOpenError {
    Store(StoreError),
    Blob(ImageError),
}

/// Opens the image's layer blobs (under the store's shared lock, so a concurrent
/// gc cannot remove them first) and plans the layers disk.
fn open_layers(
    store: &Store,
    manifest: &atoll_image::oci::digest::Digest,
    name: &str,
) -> Result<(LayersDisk, GuestConfig), LayersOpenError> {
    let _lock = store.lock_shared().map_err(LayersOpenError::Store)?;
    let img = store.image(manifest).map_err(LayersOpenError::Store)?;
    let mut blobs = Vec::new();
    for d in img.layer_digests().map_err(LayersOpenError::Store)? {
        let blob_err = |source| {
            LayersOpenError::Blob(ImageError::Blob {
                image: name.to_owned(),
                digest: d.to_string(),
                source,
            })
        };
        let mut file = File::open(store.blob_path(&d)).map_err(blob_err)?;
        let size = file.metadata().map_err(blob_err)?.len();
        let mut head = [0u8; 4];
        let n = read_head(&mut file, &mut head).map_err(blob_err)?;
        blobs.push(LayerBlob {
            file: Arc::new(file),
            digest: d.to_string(),
            size,
            compression: Compression::sniff(head.get(..n).unwrap_or_default()),
        });
    }
    Ok((LayersDisk::plan(blobs), GuestConfig::from_image(&img)))
}

/// Reads up to `buf.len()` bytes from the start of `f`.
fn read_head(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while let Some(rest) = buf.get_mut(n..).filter(|r| !r.is_empty()) {
        match f.read(rest) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What the user says on the command line about the process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessOverrides {
    /// `-- CMD ARGS`: replaces the image's Cmd.
    pub cmd: Vec<String>,
    /// `--entrypoint X`: replaces the image's Entrypoint (and drops its Cmd).
    pub entrypoint: Option<String>,
    /// `-e K=V`: appended, overriding the image's value of K.
    pub env: Vec<String>,
    /// `-w DIR`.
    pub workdir: Option<String>,
    /// `-u USER`.
    pub user: Option<String>,
}

/// The merged process: argv, env, cwd, user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedProcess {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: String,
}

/// Merges the image config with the user's overrides like `docker run`: `-- CMD`
/// replaces Cmd and keeps Entrypoint; `--entrypoint` replaces Entrypoint and drops
/// the image's Cmd; `-e` overrides by key; `-w` and `-u` replace.
pub fn merge(
    image: &str,
    cfg: &GuestConfig,
    o: &ProcessOverrides,
) -> Result<MergedProcess, ImageError> {
    let (entrypoint, image_cmd) = match &o.entrypoint {
        Some(e) if e.is_empty() => (Vec::new(), Vec::new()),
        Some(e) => (vec![e.clone()], Vec::new()),
        None => (cfg.entrypoint.clone(), cfg.cmd.clone()),
    };
    let cmd = if o.cmd.is_empty() {
        image_cmd
    } else {
        o.cmd.clone()
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() {
        return Err(ImageError::NoCommand(image.to_owned()));
    }
    let mut env = cfg.env.clone();
    for e in &o.env {
        let kv = match e.split_once('=') {
            Some((k, _)) if !k.is_empty() => e.clone(),
            Some(_) => return Err(ImageError::BadEnv(e.clone())),
            // `-e KEY`: the host's value, as docker does; unset on the host: skipped.
            None if e.is_empty() => return Err(ImageError::BadEnv(e.clone())),
            None => match std::env::var(e) {
                Ok(v) => format!("{e}={v}"),
                Err(_) => continue,
            },
        };
        let key = kv.split_once('=').map(|(k, _)| k).unwrap_or(&kv).to_owned();
        env.retain(|x| x.split_once('=').map(|(k, _)| k) != Some(key.as_str()));
        env.push(kv);
    }
    let cwd = o
        .workdir
        .clone()
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| cfg.working_dir.clone());
    let user = o.user.clone().unwrap_or_else(|| cfg.user.clone());
    Ok(MergedProcess {
        args,
        env,
        cwd: if cwd.is_empty() { "/".into() } else { cwd },
        user,
    })
}

/// A `-v HOST:GUEST[:ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub host: PathBuf,
    pub guest: String,
}

impl std::str::FromStr for VolumeSpec {
    type Err = VolumeError;
    fn from_str(s: &str) -> Result<Self, VolumeError> {
        let parts: Vec<&str> = s.split(':').collect();
        let (host, guest) = match parts.as_slice() {
            [h, g] | [h, g, "ro"] if !h.is_empty() && !g.is_empty() => (*h, *g),
            _ => return Err(VolumeError::Syntax(s.to_owned())),
        };
        if !guest.starts_with('/') {
            return Err(VolumeError::GuestNotAbsolute { spec: s.to_owned() });
        }
        Ok(Self {
            host: PathBuf::from(host),
            guest: guest.to_owned(),
        })
    }
}

/// Writes an erofs snapshot of `spec.host` to `out`.
pub fn make_volume(spec: &VolumeSpec, out: &Path) -> Result<(), VolumeError> {
    if !spec.host.is_dir() {
        return Err(VolumeError::NotADirectory {
            spec: format!("{}:{}", spec.host.display(), spec.guest),
            host: spec.host.clone(),
        });
    }
    let o = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(out)
        .arg(&spec.host)
        .output()
        .map_err(|source| VolumeError::ToolMissing {
            host: spec.host.clone(),
            source,
        })?;
    if !o.status.success() {
        let stderr = String::from_utf8_lossy(&o.stderr);
        return Err(VolumeError::ToolFailed {
            host: spec.host.clone(),
            stderr: stderr.lines().rev().take(3).collect::<Vec<_>>().join(" | "),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(entrypoint: &[&str], cmd: &[&str], env: &[&str]) -> GuestConfig {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        GuestConfig {
            manifest_digest: String::new(),
            config_digest: String::new(),
            entrypoint: v(entrypoint),
            cmd: v(cmd),
            env: v(env),
            user: "app".into(),
            working_dir: "/srv".into(),
        }
    }

    fn strings(x: &[&str]) -> Vec<String> {
        x.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn merge_without_overrides_is_entrypoint_then_cmd() {
        let m = merge("i", &cfg(&["/ep"], &["-x"], &["A=1"]), &Default::default()).unwrap();
        assert_eq!(m.args, strings(&["/ep", "-x"]));
        assert_eq!((m.cwd.as_str(), m.user.as_str()), ("/srv", "app"));
        assert_eq!(m.env, strings(&["A=1"]));
    }

    #[test]
    fn merge_cmd_replaces_cmd_keeps_entrypoint() {
        let o = ProcessOverrides {
            cmd: strings(&["echo", "hi"]),
            ..Default::default()
        };
        let m = merge("i", &cfg(&["/ep"], &["-x"], &[]), &o).unwrap();
        assert_eq!(m.args, strings(&["/ep", "echo", "hi"]));
    }

    #[test]
    fn merge_entrypoint_replaces_entrypoint_and_drops_image_cmd() {
        let o = ProcessOverrides {
            entrypoint: Some("/bin/sh".into()),
            ..Default::default()
        };
        let m = merge("i", &cfg(&["/ep"], &["-x"], &[]), &o).unwrap();
        assert_eq!(m.args, strings(&["/bin/sh"]));
        let o = ProcessOverrides {
            entrypoint: Some("/bin/sh".into()),
            cmd: strings(&["-c", "true"]),
            ..Default::default()
        };
        let m = merge("i", &cfg(&["/ep"], &["-x"], &[]), &o).unwrap();
        assert_eq!(m.args, strings(&["/bin/sh", "-c", "true"]));
    }

    #[test]
    fn merge_env_overrides_by_key_and_appends() {
        let o = ProcessOverrides {
            env: strings(&["A=2", "B=x=y"]),
            workdir: Some("/tmp".into()),
            user: Some("0:0".into()),
            ..Default::default()
        };
        let m = merge("i", &cfg(&[], &["sh"], &["A=1", "PATH=/bin"]), &o).unwrap();
        assert_eq!(m.env, strings(&["PATH=/bin", "A=2", "B=x=y"]));
        assert_eq!((m.cwd.as_str(), m.user.as_str()), ("/tmp", "0:0"));
    }

    #[test]
    fn merge_nothing_to_run_is_an_error() {
        let err = merge("img", &cfg(&[], &[], &[]), &Default::default()).unwrap_err();
        assert!(matches!(err, ImageError::NoCommand(ref i) if i == "img"));
        let o = ProcessOverrides {
            env: strings(&["=v"]),
            ..Default::default()
        };
        assert!(matches!(
            merge("i", &cfg(&[], &["sh"], &[]), &o),
            Err(ImageError::BadEnv(_))
        ));
    }

    #[test]
    fn merge_empty_workdir_is_root() {
        let mut c = cfg(&[], &["sh"], &[]);
        c.working_dir.clear();
        assert_eq!(merge("i", &c, &Default::default()).unwrap().cwd, "/");
    }

    #[test]
    fn volume_spec_parses_and_refuses() {
        let v: VolumeSpec = "/data:/mnt/data:ro".parse().unwrap();
        assert_eq!(v.host, PathBuf::from("/data"));
        assert_eq!(v.guest, "/mnt/data");
        assert!("/a:/b".parse::<VolumeSpec>().is_ok());
        assert!(matches!(
            "/a:b".parse::<VolumeSpec>(),
            Err(VolumeError::GuestNotAbsolute { .. })
        ));
        for bad in ["/a", "/a:/b:rw", ":/b", "/a:/b:ro:x"] {
            assert!(
                matches!(bad.parse::<VolumeSpec>(), Err(VolumeError::Syntax(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn make_volume_snapshots_a_directory_and_refuses_a_missing_one() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), "data\n").unwrap();
        let out = d.path().join("v.erofs");
        let spec = VolumeSpec {
            host: src,
            guest: "/mnt".into(),
        };
        make_volume(&spec, &out).unwrap();
        let img = std::fs::read(&out).unwrap();
        // The erofs superblock magic at offset 1024.
        assert_eq!(img.get(1024..1028), Some(&0xE0F5_E1E2u32.to_le_bytes()[..]));
        let missing = VolumeSpec {
            host: d.path().join("none"),
            guest: "/mnt".into(),
        };
        assert!(matches!(
            make_volume(&missing, &out),
            Err(VolumeError::NotADirectory { .. })
        ));
    }

    fn blob(dir: &Path, name: &str, data: &[u8], c: Compression) -> LayerBlob {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        LayerBlob {
            file: Arc::new(File::open(&p).unwrap()),
            digest: atoll_image::oci::digest::Digest::of(data).to_string(),
            size: data.len() as u64,
            compression: c,
        }
    }

    #[test]
    fn layers_disk_plan_aligns_offsets_and_rounds_the_size_to_sectors() {
        let d = tempfile::tempdir().unwrap();
        let blobs = vec![
            blob(d.path(), "a", &[1; 10], Compression::Gzip),
            blob(d.path(), "b", &[2; 5000], Compression::Zstd),
            blob(d.path(), "c", &[3; 1], Compression::None),
        ];
        let disk = LayersDisk::plan(blobs);
        let req = disk.request();
        assert_eq!(req.serial, LAYERS_SERIAL);
        let ranges: Vec<_> = req.layers.iter().map(|l| (l.offset, l.length)).collect();
        assert_eq!(ranges, [(0, 10), (4096, 5000), (12288, 1)]);
        assert_eq!(disk.size(), 12800);
        assert_eq!(
            req.layers[1].media_type,
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
    }

    #[test]
    fn layers_disk_write_puts_each_blob_at_its_offset() {
        let d = tempfile::tempdir().unwrap();
        let a: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let blobs = vec![
            blob(d.path(), "a", &a, Compression::Gzip),
            blob(d.path(), "b", b"second", Compression::Gzip),
        ];
        let disk = LayersDisk::plan(blobs);
        let out = d.path().join("layers.img");
        disk.write(&out).unwrap();
        let img = std::fs::read(&out).unwrap();
        assert_eq!(img.len() as u64, disk.size());
        assert_eq!(img.len() % 512, 0);
        assert_eq!(&img[..5000], &a[..]);
        assert!(img[5000..8192].iter().all(|&b| b == 0), "gap is zeros");
        assert_eq!(&img[8192..8198], b"second");
        // Never over an existing file.
        assert!(disk.write(&out).is_err());
    }

    #[test]
    fn prepare_layers_gives_a_disk_the_unpacker_accepts_with_digests() {
        use atoll_image::oci::unpack::{unpack_sources, LayerSource};
        let d = tempfile::tempdir().unwrap();
        let store = d.path().join("store");
        let p = prepare(&store, "busybox", RootfsFrom::Layers).unwrap();
        assert!(!p.converted && !p.fell_back);
        let ImageRootfs::Layers(disk) = p.rootfs else {
            panic!("asked for layers, got {:?}", p.rootfs);
        };
        assert!(
            !store.join("images").exists()
                || std::fs::read_dir(store.join("images"))
                    .unwrap()
                    .flatten()
                    .all(|e| !e.path().join("rootfs.erofs").exists()),
            "nothing converted"
        );
        let out = d.path().join("layers.img");
        disk.write(&out).unwrap();
        let img = Arc::new(std::fs::read(&out).unwrap());
        let req = disk.request();
        let sources = req.layers.iter().map(|l| {
            let start = usize::try_from(l.offset).unwrap();
            let end = start + usize::try_from(l.length).unwrap();
            Ok(LayerSource {
                reader: Box::new(io::Cursor::new(img[start..end].to_vec())),
                compression: Compression::from_media_type(&l.media_type),
                digest: Some(l.digest.parse().unwrap()),
            })
        });
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        unpack_sources(sources, &root, UnpackLimits::default()).unwrap();
        assert!(root.join("bin/sh").exists());
        assert_eq!(p.config.cmd, ["sh"]);
    }

    #[test]
    fn in_path_finds_only_executable_files() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let exe = d.path().join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::write(d.path().join("plain"), "").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths(["/nonexistent", d.path().to_str().unwrap()]).unwrap();
        assert!(in_path("tool", Some(&path)));
        assert!(!in_path("plain", Some(&path)));
        assert!(!in_path("missing", Some(&path)));
        assert!(!in_path("tool", None));
    }

    #[test]
    fn builtin_names_are_recognised() {
        assert!(is_builtin("busybox"));
        assert!(is_builtin("atoll/busybox:latest"));
        assert!(!is_builtin("alpine"));
    }
}
