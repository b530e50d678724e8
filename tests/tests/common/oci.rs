//! Test images built here from real tar layers, in OCI layout, imported into a store
//! with the real `atoll-image`, and their expected trees taken from `umoci unpack`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// One entry of a layer.
pub enum E<'a> {
    /// A directory with its mode and owner.
    Dir(&'a str, u32, u64),
    /// A regular file with its mode and contents.
    File(&'a str, u32, &'a [u8]),
    /// A symlink.
    Link(&'a str, &'a str),
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A gzip'd tar layer of `entries`; returns (blob, diff_id hex).
pub fn layer(entries: &[E<'_>]) -> (Vec<u8>, String) {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            E::Dir(p, mode, uid) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*uid);
                h.set_size(0);
                b.append_data(&mut h, format!("{p}/"), std::io::empty())
                    .unwrap();
            }
            E::File(p, mode, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            E::Link(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    let tar = b.into_inner().unwrap();
    let diff_id = sha(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), diff_id)
}

/// The busybox base layer: `/bin/busybox`, an applet link per applet, `/etc/passwd`
/// (root, nobody), `/etc/group`, `/tmp`.
pub fn busybox_layer() -> (Vec<u8>, String) {
    let busybox = fs::read("/bin/busybox").expect("/bin/busybox (apt-get install busybox-static)");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    let applets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|a| !a.is_empty() && *a != "busybox")
        .map(|a| format!("bin/{a}"))
        .collect();
    let mut entries = vec![
        E::Dir("bin", 0o755, 0),
        E::File("bin/busybox", 0o755, &busybox),
        E::Dir("etc", 0o755, 0),
        E::File(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
        ),
        E::File("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n"),
        E::Dir("tmp", 0o1777, 0),
        E::Dir("root", 0o700, 0),
    ];
    entries.extend(applets.iter().map(|a| E::Link(a, "/bin/busybox")));
    layer(&entries)
}

/// Writes an OCI layout at `dir` with one image of `layers` and `config` (the
/// image config's `config` object), tagged `latest`.
pub fn write_layout(dir: &Path, layers: &[(Vec<u8>, String)], config: serde_json::Value) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let d = sha(data);
        fs::write(blobs.join(&d), data).unwrap();
        (format!("sha256:{d}"), data.len())
    };
    let mut layer_descs = Vec::new();
    for (blob, _) in layers {
        let (digest, size) = put(blob);
        layer_descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest, "size": size
        }));
    }
    let image_config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers",
                   "diff_ids": layers.iter().map(|(_, d)| format!("sha256:{d}")).collect::<Vec<_>>()},
    });
    let (cdigest, csize) = put(&serde_json::to_vec(&image_config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cdigest, "size": csize},
        "layers": layer_descs,
    });
    let (mdigest, msize) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": mdigest, "size": msize,
                       "annotations": {"org.opencontainers.image.ref.name": "latest"}}],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// Runs the static `atoll-image` on `store`; panics with its stderr on failure.
pub fn atoll_image(bin: &Path, store: &Path, args: &[&str]) {
    let out = Command::new(bin.join("atoll-image"))
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("run atoll-image");
    assert!(
        out.status.success(),
        "atoll-image {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Imports `layout` as `name` and converts it (so the node finds the erofs cached).
pub fn import(bin: &Path, store: &Path, layout: &Path, name: &str) {
    atoll_image(
        bin,
        store,
        &["import", &layout.to_string_lossy(), "--name", name],
    );
    let tmp = store.join(format!("{}.erofs", name.replace(['/', ':'], "_")));
    atoll_image(bin, store, &["convert", name, "-o", &tmp.to_string_lossy()]);
    fs::remove_file(&tmp).ok();
    let mut cfg = tmp.into_os_string();
    cfg.push(".config.json");
    fs::remove_file(PathBuf::from(cfg)).ok();
}

/// `umoci unpack` of `layout:latest`, listed under `subtree` in the format of
/// [`LIST_SCRIPT`]: `d PATH MODE`, `f PATH MODE MD5`, `l PATH TARGET`, sorted.
pub fn umoci_listing(layout: &Path, work: &Path, subtree: &str) -> String {
    let bundle = work.join("umoci-bundle");
    let out = Command::new("umoci")
        .args(["--log", "error", "unpack", "--rootless", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .arg(&bundle)
        .output()
        .expect("umoci (apt-get install umoci)");
    assert!(
        out.status.success(),
        "umoci unpack failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = bundle.join("rootfs");
    let mut lines = BTreeMap::new();
    walk(
        &root,
        &root.join(subtree.trim_start_matches('/')),
        &mut lines,
    );
    let mut s = String::new();
    for line in lines.values() {
        s.push_str(line);
        s.push('\n');
    }
    s
}

fn walk(root: &Path, p: &Path, out: &mut BTreeMap<String, String>) {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::symlink_metadata(p).unwrap();
    let name = format!("/{}", p.strip_prefix(root).unwrap().display());
    let mode = meta.permissions().mode() & 0o7777;
    let line = if meta.file_type().is_symlink() {
        format!("l {name} {}", fs::read_link(p).unwrap().display())
    } else if meta.is_dir() {
        for e in fs::read_dir(p).unwrap() {
            walk(root, &e.unwrap().path(), out);
        }
        format!("d {name} {mode:o}")
    } else {
        let md5 = Command::new("md5sum").arg(p).output().unwrap();
        let md5 = String::from_utf8_lossy(&md5.stdout);
        format!("f {name} {mode:o} {}", &md5[..32])
    };
    out.insert(name, line);
}

/// The same listing, made inside the container by busybox: `sh -c LIST_SCRIPT -- DIR`.
pub const LIST_SCRIPT: &str = "find \"$1\" | sort | while read -r p; do \
    if [ -L \"$p\" ]; then echo \"l $p $(readlink \"$p\")\"; \
    elif [ -d \"$p\" ]; then echo \"d $p $(stat -c %a \"$p\")\"; \
    else echo \"f $p $(stat -c %a \"$p\") $(md5sum < \"$p\" | cut -c1-32)\"; fi; done";
