//! Images and volumes for a pod: resolving IMAGE in the atoll-image store (building
//! the built-in busybox image on first use), converting it to an erofs disk, merging
//! its config with the user's overrides as `docker run` does, and read-only erofs
//! snapshots of host directories for `-v`.

use std::path::{Path, PathBuf};
use std::process::Command;

use atoll_image::oci::builtin::{self, BuiltinError};
use atoll_image::oci::convert::{self, ConvertError, Format, GuestConfig};
use atoll_image::oci::store::{Store, StoreError, DEFAULT_STORE_ROOT, STORE_ENV};
use atoll_image::oci::unpack::UnpackLimits;

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

/// An image ready to attach: its erofs and its config.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// The name the store knows it by.
    pub name: String,
    pub erofs: PathBuf,
    pub config: GuestConfig,
    /// False when an earlier conversion was reused.
    pub converted: bool,
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
/// and converts it to erofs, reusing an earlier conversion.
pub fn prepare(store_root: &Path, reference: &str) -> Result<PreparedImage, ImageError> {
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
    let c = convert::convert_cached(&store, &digest, Format::Erofs, UnpackLimits::default())
        .map_err(|source| ImageError::Convert {
            image: name.clone(),
            source,
        })?;
    Ok(PreparedImage {
        name,
        erofs: c.cached,
        config: c.config,
        converted: c.built,
    })
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

    #[test]
    fn builtin_names_are_recognised() {
        assert!(is_builtin("busybox"));
        assert!(is_builtin("atoll/busybox:latest"));
        assert!(!is_builtin("alpine"));
    }
}
