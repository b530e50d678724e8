//! The built-in default image `atoll/busybox:latest`: a real OCI image made from the
//! host's static busybox, so `atoll run busybox` works without a registry.
//!
//! One gzip'd tar layer holds `/bin/busybox`, a symlink per applet (`busybox
//! --list`), `/etc/passwd` and `/etc/group` (root and nobody), `/tmp` (1777),
//! `/root` (0700), `/home` and the usual mount points; the config runs `sh` with a
//! standard `PATH`. Every entry has owner 0:0 and mtime 0, so the same busybox always
//! gives the same digests. The image is written as an OCI layout in the store's
//! `tmp/` and taken in by [`super::import::import`], which verifies and records it.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::digest::{Digest, HashingWriter};
use super::import::{self, ImportError, REF_NAME_ANNOTATION};
use super::manifest::{self, LayerInfo, OCI_MANIFEST};
use super::store::{Store, StoreError};
use super::unpack::Compression;

/// The name the image is recorded under.
pub const BUILTIN_REF: &str = "atoll/busybox:latest";
/// Where Debian's busybox-static puts its binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";
/// `PATH` of the image config.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// A busybox larger than this is not the one we mean.
const MAX_BUSYBOX: u64 = 64 << 20;
/// More applets than this is not busybox either.
const MAX_APPLETS: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{0} is not a static busybox binary; install busybox-static (`apt-get install \
         busybox-static`) or pass --busybox PATH"
    )]
    NotBusybox(PathBuf),
    #[error("{path}: `busybox --list` failed: {why}")]
    List { path: PathBuf, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Import(#[from] ImportError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BuiltinError + '_ {
    move |source| BuiltinError::Io {
        path: path.to_owned(),
        source,
    }
}

/// An applet name must be a plain file name (`[`, `[[` and `run-parts` included).
fn applet_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "busybox"
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'[' | b']'))
}

/// The applets `busybox --list` prints, filtered to safe file names, sorted.
pub fn applets(busybox: &Path) -> Result<Vec<String>, BuiltinError> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| BuiltinError::List {
            path: busybox.to_owned(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(BuiltinError::List {
            path: busybox.to_owned(),
            why: out.status.to_string(),
        });
    }
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|n| applet_ok(n))
        .map(str::to_owned)
        .take(MAX_APPLETS)
        .collect();
    v.sort();
    v.dedup();
    if v.is_empty() {
        return Err(BuiltinError::NotBusybox(busybox.to_owned()));
    }
    Ok(v)
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h
}

/// Writes the layer's tar (uncompressed) into `w`.
pub fn write_layer_tar<W: Write>(w: W, busybox: &[u8], applets: &[String]) -> io::Result<W> {
    let mut b = tar::Builder::new(w);
    let dirs: [(&str, u32); 15] = [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("home", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("run", 0o755),
        ("sbin", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("var", 0o755),
        ("var/tmp", 0o1777),
    ];
    for (d, mode) in dirs {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        b.append_data(&mut h, format!("{d}/"), io::empty())?;
    }
    let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", busybox)?;
    for a in applets {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, format!("bin/{a}"), "busybox")?;
    }
    let files: [(&str, &[u8]); 3] = [
        (
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        ("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
        (
            "etc/shadow",
            b"root:*:0:0:99999:7:::\nnobody:*:0:0:99999:7:::\n",
        ),
    ];
    for (name, data) in files {
        let mode = if name == "etc/shadow" { 0o600 } else { 0o644 };
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        b.append_data(&mut h, name, data)?;
    }
    b.into_inner()
}

/// The image config: `sh`, a standard `PATH`, the layer's diff id.
pub fn image_config(diff_id: &Digest) -> Vec<u8> {
    let c = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": [DEFAULT_PATH],
            "Cmd": ["sh"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
        "history": [{"created_by": "atoll-image builtin (host busybox)"}],
    });
    serde_json::to_vec(&c).unwrap_or_default()
}

fn read_busybox(path: &Path) -> Result<Vec<u8>, BuiltinError> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut data = Vec::new();
    f.take(MAX_BUSYBOX + 1)
        .read_to_end(&mut data)
        .map_err(io_err(path))?;
    if data.len() as u64 > MAX_BUSYBOX || !data.starts_with(b"\x7fELF") {
        return Err(BuiltinError::NotBusybox(path.to_owned()));
    }
    Ok(data)
}

/// Builds the image from `busybox` and records it as [`BUILTIN_REF`]; returns the
/// manifest digest.
pub fn build(store: &Store, busybox: &Path) -> Result<Digest, BuiltinError> {
    let data = read_busybox(busybox)?;
    let applets = applets(busybox)?;
    let tmp = store.tmp_dir();
    let layout = tempfile::Builder::new()
        .prefix("builtin-")
        .tempdir_in(&tmp)
        .map_err(io_err(&tmp))?;
    let blobs = layout.path().join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
    let write_blob = |bytes: &[u8]| -> Result<Digest, BuiltinError> {
        let d = Digest::of(bytes);
        let p = blobs.join(d.hex());
        fs::write(&p, bytes).map_err(io_err(&p))?;
        Ok(d)
    };

    // Hash the tar (the diff id) inside the gzip stream, the gzip stream (the blob).
    let gz = flate2::write::GzEncoder::new(
        HashingWriter::new(Vec::new()),
        flate2::Compression::default(),
    );
    let tar_w =
        write_layer_tar(HashingWriter::new(gz), &data, &applets).map_err(io_err(layout.path()))?;
    let (gz, diff_id, _) = tar_w.finish();
    let (layer, layer_digest, layer_size) = gz.finish().map_err(io_err(layout.path()))?.finish();
    write_blob(&layer)?;

    let config = image_config(&diff_id);
    let config_digest = write_blob(&config)?;
    let manifest = manifest::build_manifest(
        &config_digest,
        config.len() as u64,
        &[LayerInfo {
            digest: layer_digest,
            size: layer_size,
            compression: Compression::Gzip,
        }],
    );
    let manifest_digest = write_blob(&manifest)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": manifest_digest.to_string(),
            "size": manifest.len(),
            "annotations": {REF_NAME_ANNOTATION: BUILTIN_REF},
        }],
    });
    let index_path = layout.path().join("index.json");
    fs::write(&index_path, serde_json::to_vec(&index).unwrap_or_default())
        .map_err(io_err(&index_path))?;
    let marker = layout.path().join("oci-layout");
    fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_err(&marker))?;

    let imported = import::import(store, layout.path(), Some(BUILTIN_REF), None)?;
    Ok(imported
        .into_iter()
        .next()
        .map(|i| i.manifest)
        .unwrap_or(manifest_digest))
}

/// The builtin image's manifest digest, building it first when the store lacks it.
pub fn ensure(store: &Store, busybox: &Path) -> Result<Digest, BuiltinError> {
    match store.resolve(BUILTIN_REF) {
        Ok((_, d)) if store.image(&d).is_ok() => Ok(d),
        _ => build(store, busybox),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applet_names_that_could_be_paths_are_skipped() {
        for ok in ["ls", "[", "[[", "run-parts", "ipcalc"] {
            assert!(applet_ok(ok), "{ok}");
        }
        for bad in ["", "..", "a/b", "busybox", "x y", "/bin/ls"] {
            assert!(!applet_ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn layer_tar_has_busybox_links_users_and_modes() {
        let tar_bytes =
            write_layer_tar(Vec::new(), b"\x7fELFfake", &["ls".into(), "sh".into()]).unwrap();
        let mut ar = tar::Archive::new(tar_bytes.as_slice());
        let mut seen = std::collections::BTreeMap::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mode = e.header().mode().unwrap();
            let link = e
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned());
            let mut body = String::new();
            let _ = e.read_to_string(&mut body);
            assert_eq!(e.header().uid().unwrap(), 0);
            seen.insert(path, (mode, link, body));
        }
        assert_eq!(seen["tmp/"].0, 0o1777);
        assert_eq!(seen["root/"].0, 0o700);
        assert!(seen.contains_key("home/"));
        assert_eq!(seen["bin/ls"].1.as_deref(), Some("busybox"));
        assert_eq!(seen["bin/sh"].1.as_deref(), Some("busybox"));
        assert_eq!(seen["bin/busybox"].0, 0o755);
        assert!(seen["etc/passwd"].2.starts_with("root:x:0:0:"));
        assert!(seen["etc/passwd"].2.contains("nobody:x:65534:65534:"));
        assert!(seen["etc/group"].2.contains("root:x:0:"));
    }

    #[test]
    fn builtin_is_stored_resolvable_and_runs_sh() {
        let bb = Path::new(DEFAULT_BUSYBOX);
        if !bb.is_file() {
            // busybox-static is a build dependency of the initramfs; its absence is
            // reported by the check below rather than skipped silently.
            panic!("{DEFAULT_BUSYBOX} is missing: install busybox-static");
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = ensure(&store, bb).unwrap();
        let (name, d2) = store.resolve("atoll/busybox").unwrap();
        assert_eq!((name.as_str(), &d2), (BUILTIN_REF, &d));
        let img = store.image(&d).unwrap();
        let cfg = img.config.config().clone().unwrap();
        assert_eq!(cfg.cmd().clone().unwrap(), vec!["sh".to_string()]);
        assert_eq!(img.manifest.layers().len(), 1);
        // Same busybox, same image: building again gives the same digest.
        assert_eq!(build(&store, bb).unwrap(), d);
        // The layer unpacks with the store's own (hostile-input) unpacker.
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let layers: Vec<_> = img
            .layer_digests()
            .unwrap()
            .iter()
            .map(|l| store.blob_path(l))
            .collect();
        super::super::unpack::unpack_layers(&layers, &root, Default::default()).unwrap();
        assert_eq!(
            fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert!(root.join("etc/passwd").is_file());
    }
}
