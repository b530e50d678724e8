//! Test helpers: hand-built layers and OCI layouts, the CLI, tree snapshots.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest as _, Sha256};

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// One tar entry, written with the name bytes exactly as given (hostile names too).
#[derive(Clone, Debug)]
pub enum E {
    Dir(&'static str, u32),
    File(&'static str, u32, Vec<u8>),
    Symlink(&'static str, &'static str),
    Hardlink(&'static str, &'static str),
    Fifo(&'static str, u32),
    Char(&'static str, u32, u32, u32),
    /// A file with owner, mtime and xattrs (PAX).
    FileFull {
        name: &'static str,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
        xattrs: Vec<(&'static str, &'static [u8])>,
        data: Vec<u8>,
    },
    /// A header claiming `size` bytes followed by fewer.
    Truncated(&'static str, u64, Vec<u8>),
}

pub const MTIME: u64 = 1_700_000_000;

fn header(name: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    let bytes = name.as_bytes();
    assert!(bytes.len() < 100, "test names stay short");
    let old = h.as_old_mut();
    old.name = [0; 100];
    old.name[..bytes.len()].copy_from_slice(bytes);
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h
}

fn set_link(h: &mut tar::Header, target: &str) {
    let b = target.as_bytes();
    assert!(b.len() < 100);
    let old = h.as_old_mut();
    old.linkname = [0; 100];
    old.linkname[..b.len()].copy_from_slice(b);
}

fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body_len = 1 + k.len() + 1 + v.len() + 1;
        let mut len = body_len + 1;
        while len.to_string().len() + body_len != len {
            len = len.to_string().len() + body_len;
        }
        out.extend_from_slice(format!("{len} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

/// An uncompressed tar of `entries`.
pub fn tar(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let raw_append = |b: &mut tar::Builder<Vec<u8>>, mut h: tar::Header, data: &[u8]| {
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    for e in entries {
        match e {
            E::Dir(n, m) => raw_append(&mut b, header(n, tar::EntryType::Directory, *m, 0), &[]),
            E::File(n, m, d) => raw_append(
                &mut b,
                header(n, tar::EntryType::Regular, *m, d.len() as u64),
                d,
            ),
            E::Symlink(n, t) => {
                let mut h = header(n, tar::EntryType::Symlink, 0o777, 0);
                set_link(&mut h, t);
                raw_append(&mut b, h, &[]);
            }
            E::Hardlink(n, t) => {
                let mut h = header(n, tar::EntryType::Link, 0o644, 0);
                set_link(&mut h, t);
                raw_append(&mut b, h, &[]);
            }
            E::Fifo(n, m) => raw_append(&mut b, header(n, tar::EntryType::Fifo, *m, 0), &[]),
            E::Char(n, m, maj, min) => {
                let mut h = header(n, tar::EntryType::Char, *m, 0);
                h.set_device_major(*maj).unwrap();
                h.set_device_minor(*min).unwrap();
                raw_append(&mut b, h, &[]);
            }
            E::FileFull {
                name,
                mode,
                uid,
                gid,
                mtime,
                xattrs,
                data,
            } => {
                let recs: Vec<(String, &[u8])> = xattrs
                    .iter()
                    .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                    .collect();
                if !recs.is_empty() {
                    let r: Vec<(&str, &[u8])> =
                        recs.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                    let body = pax(&r);
                    let h = header(
                        "PaxHeaders/x",
                        tar::EntryType::XHeader,
                        0o644,
                        body.len() as u64,
                    );
                    raw_append(&mut b, h, &body);
                }
                let mut h = header(name, tar::EntryType::Regular, *mode, data.len() as u64);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_mtime(*mtime);
                raw_append(&mut b, h, data);
            }
            E::Truncated(n, size, d) => {
                let mut h = header(n, tar::EntryType::Regular, 0o644, *size);
                h.set_cksum();
                // Without the end-of-archive blocks `into_inner` would add.
                let mut out = b.get_ref().clone();
                out.extend_from_slice(h.as_bytes());
                out.extend_from_slice(d);
                return out;
            }
        }
    }
    b.into_inner().unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

pub fn compress(data: &[u8], c: Comp) -> Vec<u8> {
    match c {
        Comp::None => data.to_vec(),
        Comp::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Comp::Zstd => zstd::encode_all(data, 1).unwrap(),
    }
}

fn media(c: Comp) -> &'static str {
    match c {
        Comp::None => "application/vnd.oci.image.layer.v1.tar",
        Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
}

/// Writes blobs of an OCI image layout.
pub struct Layout {
    pub dir: PathBuf,
    pub index: Vec<serde_json::Value>,
}

pub struct BuiltImage {
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub manifest: Vec<u8>,
}

impl Layout {
    pub fn new(dir: &Path) -> Self {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Self {
            dir: dir.to_owned(),
            index: Vec::new(),
        }
    }

    pub fn blob(&self, data: &[u8]) -> String {
        let hex = sha256_hex(data);
        fs::write(self.dir.join("blobs/sha256").join(&hex), data).unwrap();
        format!("sha256:{hex}")
    }

    /// An image manifest with `layers` (uncompressed tars) compressed as given.
    pub fn image(&self, layers: &[(Vec<u8>, Comp)], config_extra: serde_json::Value) -> BuiltImage {
        self.image_for(layers, config_extra, "amd64")
    }

    pub fn image_for(
        &self,
        layers: &[(Vec<u8>, Comp)],
        config_extra: serde_json::Value,
        arch: &str,
    ) -> BuiltImage {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for (t, c) in layers {
            let z = compress(t, *c);
            diff_ids.push(format!("sha256:{}", sha256_hex(t)));
            descs.push(serde_json::json!({
                "mediaType": media(*c), "digest": self.blob(&z), "size": z.len(),
            }));
        }
        let mut config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        if let serde_json::Value::Object(extra) = config_extra {
            for (k, v) in extra {
                config["config"][k] = v;
            }
        }
        let cdata = serde_json::to_vec(&config).unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.blob(&cdata), "size": cdata.len()},
            "layers": descs,
        }))
        .unwrap();
        BuiltImage {
            manifest_digest: self.blob(&manifest),
            manifest_size: manifest.len() as u64,
            manifest,
        }
    }

    pub fn tag(&mut self, name: &str, img: &BuiltImage) {
        self.index.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": img.manifest_digest, "size": img.manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": name},
        }));
        self.write_index();
    }

    /// A multi-platform index (amd64 + arm64), tagged `name`.
    pub fn tag_multi(&mut self, name: &str, amd64: &BuiltImage, arm64: &BuiltImage) -> String {
        let idx = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": arm64.manifest_digest, "size": arm64.manifest_size,
                 "platform": {"os": "linux", "architecture": "arm64"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": amd64.manifest_digest, "size": amd64.manifest_size,
                 "platform": {"os": "linux", "architecture": "amd64"}},
            ],
        }))
        .unwrap();
        let d = self.blob(&idx);
        self.index.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": d, "size": idx.len(),
            "annotations": {"org.opencontainers.image.ref.name": name},
        }));
        self.write_index();
        d
    }

    pub fn write_index(&self) {
        let idx = serde_json::json!({"schemaVersion": 2, "manifests": self.index});
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&idx).unwrap(),
        )
        .unwrap();
    }
}

/// Runs the `atoll-image` binary with a store.
pub fn atoll(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atoll-image"))
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("run atoll-image")
}

pub fn atoll_ok(store: &Path, args: &[&str]) -> String {
    let out = atoll(store, args);
    assert!(
        out.status.success(),
        "atoll-image {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What we compare of one tree entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Content hash for files, target for symlinks, rdev for devices.
    pub content: String,
    /// Regular-file mtime in seconds (directory mtimes differ between tools that
    /// restore them and tools that do not, so they are compared separately).
    pub mtime: Option<i64>,
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// The first path (sorted) sharing this inode: hard-link groups.
    pub link_group: String,
}

pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut paths = Vec::new();
    walk(root, &mut paths);
    paths.sort();
    for p in paths {
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let md = fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let (kind, content) = if ft.is_symlink() {
            (
                "symlink",
                fs::read_link(&p).unwrap().to_string_lossy().into_owned(),
            )
        } else if ft.is_dir() {
            ("dir", String::new())
        } else if ft.is_file() {
            let mut data = Vec::new();
            fs::File::open(&p).unwrap().read_to_end(&mut data).unwrap();
            ("file", sha256_hex(&data))
        } else if ft.is_fifo() {
            ("fifo", String::new())
        } else if ft.is_char_device() {
            ("char", format!("{:x}", md.rdev()))
        } else if ft.is_block_device() {
            ("block", format!("{:x}", md.rdev()))
        } else {
            ("socket", String::new())
        };
        let link_group = if ft.is_file() && md.nlink() > 1 {
            inodes
                .entry((md.dev(), md.ino()))
                .or_insert_with(|| rel.clone())
                .clone()
        } else {
            rel.clone()
        };
        let mut xattrs = Vec::new();
        if !ft.is_symlink() {
            if let Ok(names) = xattr_list(&p) {
                for n in names {
                    if n.starts_with("user.") {
                        xattrs.push((n.clone(), xattr_get(&p, &n)));
                    }
                }
            }
        }
        xattrs.sort();
        out.insert(
            rel,
            Node {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                content,
                mtime: if ft.is_file() { Some(md.mtime()) } else { None },
                xattrs,
                link_group,
            },
        );
    }
    out
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        out.push(p.clone());
        if e.file_type().unwrap().is_dir() {
            walk(&p, out);
        }
    }
}

fn xattr_list(p: &Path) -> std::io::Result<Vec<String>> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: c is a valid C string and buf is writable for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

fn xattr_get(p: &Path, name: &str) -> Vec<u8> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C strings, buf writable for its length.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "getxattr {name} on {}", p.display());
    buf.truncate(r as usize);
    buf
}

/// Asserts two snapshots are equal, listing the first differences.
pub fn assert_same_tree(a: &BTreeMap<String, Node>, b: &BTreeMap<String, Node>, what: &str) {
    let mut diffs = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => diffs.push(format!("only in first: {k}")),
            Some(w) if w != v => diffs.push(format!("{k}: {v:?} != {w:?}")),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            diffs.push(format!("only in second: {k}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The static busybox binary, read from Debian's busybox-static.
pub fn busybox() -> Vec<u8> {
    fs::read("/bin/busybox").expect("/bin/busybox (package busybox-static)")
}
