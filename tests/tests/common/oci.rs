//! Test images built here from real tar layers, in OCI layout, imported into a store
//! with the real `atoll-image`, and their expected trees taken from `umoci unpack`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[allow(unused_imports)] // each test file uses a different part
pub use atoll_node::oci::{busybox_layer, layer, write_layout, E};

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
