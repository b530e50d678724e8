//! Hostile layers and images: nothing is written outside the target root or the
//! store, confined paths resolve like the container sees them, and every refusal is
//! a clear error. Needs root only for nothing; runs anywhere.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use atoll_image::oci::unpack::{unpack_layers, UnpackError, UnpackLimits};
use common::*;

struct Case {
    _t: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    layers: Vec<PathBuf>,
}

/// A root to unpack into and an `outside` directory next to it that must stay empty.
fn case(layers: &[Vec<u8>]) -> Case {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("a/b/root");
    let outside = t.path().join("outside");
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(&outside).unwrap();
    let mut paths = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let p = t.path().join(format!("layer{i}"));
        fs::write(&p, l).unwrap();
        paths.push(p);
    }
    Case {
        _t: t,
        root,
        outside,
        layers: paths,
    }
}

impl Case {
    fn unpack(&self) -> Result<(), UnpackError> {
        self.unpack_with(UnpackLimits::default())
    }
    fn unpack_with(&self, l: UnpackLimits) -> Result<(), UnpackError> {
        unpack_layers(&self.layers, &self.root, l).map(|_| ())
    }
    fn assert_outside_untouched(&self) {
        assert_eq!(
            fs::read_dir(&self.outside).unwrap().count(),
            0,
            "outside written"
        );
        let top = self.root.parent().unwrap();
        let names: Vec<_> = fs::read_dir(top)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("root")],
            "sibling of root written"
        );
    }
}

fn s(p: &Path) -> &'static str {
    Box::leak(p.to_str().unwrap().to_owned().into_boxed_str())
}

#[test]
fn dotdot_entry_is_refused() {
    let c = case(&[tar(&[E::File("../../escape", 0o644, b"x".to_vec())])]);
    let err = c.unpack().unwrap_err();
    assert!(matches!(err, UnpackError::Hostile { .. }), "{err}");
    assert!(err.to_string().contains("`..`"), "{err}");
    c.assert_outside_untouched();
}

#[test]
fn absolute_entry_lands_inside_root() {
    let c = case(&[tar(&[E::File("/etc/abs", 0o644, b"x".to_vec())])]);
    c.unpack().unwrap();
    assert_eq!(fs::read(c.root.join("etc/abs")).unwrap(), b"x");
    c.assert_outside_untouched();
}

#[test]
fn relative_symlink_out_of_root_is_followed_inside_root() {
    let c = case(&[tar(&[
        E::Symlink("up", "../../../../../../outside"),
        E::File("up/pwned", 0o644, b"x".to_vec()),
    ])]);
    c.unpack().unwrap();
    assert_eq!(fs::read(c.root.join("outside/pwned")).unwrap(), b"x");
    c.assert_outside_untouched();
}

#[test]
fn absolute_symlink_to_host_dir_is_followed_inside_root() {
    let outside = tempfile::tempdir().unwrap();
    let host = s(outside.path());
    let c = case(&[
        tar(&[E::Symlink("evil", host)]),
        tar(&[E::File("evil/pwned", 0o644, b"x".to_vec())]),
    ]);
    c.unpack().unwrap();
    assert!(
        !outside.path().join("pwned").exists(),
        "written on the host"
    );
    let inside = c.root.join(host.trim_start_matches('/')).join("pwned");
    assert_eq!(fs::read(inside).unwrap(), b"x");
    c.assert_outside_untouched();
}

#[test]
fn legitimate_write_through_absolute_symlink_lands_in_root() {
    let c = case(&[
        tar(&[
            E::Dir("run/", 0o755),
            E::Dir("var/", 0o755),
            E::Symlink("var/run", "/run"),
        ]),
        tar(&[E::File("var/run/app.pid", 0o644, b"1".to_vec())]),
    ]);
    c.unpack().unwrap();
    assert_eq!(fs::read(c.root.join("run/app.pid")).unwrap(), b"1");
    assert!(fs::symlink_metadata(c.root.join("var/run"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn symlinked_parent_chain_cannot_escape() {
    let c = case(&[tar(&[
        E::Symlink("a", "b/../../.."),
        E::Dir("b/", 0o755),
        E::File("a/x", 0o644, b"x".to_vec()),
    ])]);
    c.unpack().unwrap();
    assert_eq!(fs::read(c.root.join("x")).unwrap(), b"x");
    c.assert_outside_untouched();
}

#[test]
fn file_replacing_symlink_does_not_write_through_it() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("victim");
    fs::write(&target, b"host").unwrap();
    let c = case(&[
        tar(&[E::Symlink("f", s(&target))]),
        tar(&[E::File("f", 0o644, b"image".to_vec())]),
    ]);
    c.unpack().unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"host");
    assert_eq!(fs::read(c.root.join("f")).unwrap(), b"image");
    assert!(fs::symlink_metadata(c.root.join("f")).unwrap().is_file());
}

#[test]
fn hardlink_with_dotdot_is_refused() {
    let c = case(&[tar(&[E::Hardlink("hl", "../../../outside/x")])]);
    let err = c.unpack().unwrap_err();
    assert!(matches!(err, UnpackError::Hostile { .. }), "{err}");
    c.assert_outside_untouched();
}

#[test]
fn hardlink_to_host_file_through_symlink_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    fs::write(&secret, b"host secret").unwrap();
    let c = case(&[tar(&[
        E::Symlink("h", s(outside.path())),
        E::Hardlink("stolen", "h/secret"),
        E::Hardlink("stolen2", s(&secret)),
    ])]);
    let err = c.unpack().unwrap_err();
    assert!(
        err.to_string().contains("does not exist in the image"),
        "{err}"
    );
    assert_eq!(
        fs::metadata(&secret).unwrap().nlink(),
        1,
        "host file linked"
    );
    assert!(!c.root.join("stolen").exists());
}

#[test]
fn whiteout_cannot_name_parent() {
    let c = case(&[tar(&[E::File("dir/.wh..", 0o644, vec![])])]);
    let err = c.unpack().unwrap_err();
    assert!(matches!(err, UnpackError::Hostile { .. }), "{err}");
}

#[test]
fn whiteout_through_symlink_stays_inside_root() {
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("keep"), b"host").unwrap();
    let c = case(&[
        tar(&[E::Symlink("l", s(outside.path()))]),
        tar(&[E::File("l/.wh.keep", 0o644, vec![])]),
    ]);
    c.unpack().unwrap();
    assert!(outside.path().join("keep").exists(), "host file removed");
}

#[test]
fn giant_size_in_short_stream_is_a_stream_error() {
    let c = case(&[tar(&[E::Truncated("big", 1 << 40, vec![0; 4096])])]);
    let err = c.unpack().unwrap_err();
    assert!(matches!(err, UnpackError::Stream { .. }), "{err}");
}

#[test]
fn content_over_byte_limit_is_refused() {
    let c = case(&[tar(&[E::File("big", 0o644, vec![7; 3 << 20])])]);
    let limits = UnpackLimits {
        max_bytes: 1 << 20,
        ..UnpackLimits::default()
    };
    let err = c.unpack_with(limits).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { .. }), "{err}");
}

#[test]
fn entry_count_over_limit_is_refused() {
    let names: Vec<&'static str> = (0..50)
        .map(|i| &*Box::leak(format!("f{i}").into_boxed_str()))
        .collect();
    let entries: Vec<E> = names.iter().map(|n| E::File(n, 0o644, vec![])).collect();
    let c = case(&[tar(&entries)]);
    let limits = UnpackLimits {
        max_entries: 10,
        ..UnpackLimits::default()
    };
    let err = c.unpack_with(limits).unwrap_err();
    assert!(matches!(err, UnpackError::TooManyEntries { .. }), "{err}");
}

#[test]
fn truncated_gzip_stream_is_an_error() {
    let z = compress(&tar(&[E::File("f", 0o644, vec![42; 200_000])]), Comp::Gzip);
    let c = case(&[z[..z.len() / 2].to_vec()]);
    let err = c.unpack().unwrap_err();
    assert!(matches!(err, UnpackError::Stream { .. }), "{err}");
}

#[test]
fn gzip_missing_only_its_trailer_is_an_error() {
    let z = compress(&tar(&[E::File("f", 0o644, b"small".to_vec())]), Comp::Gzip);
    let c = case(&[z[..z.len() - 4].to_vec()]);
    assert!(c.unpack().is_err());
}

#[test]
fn truncated_zstd_stream_is_an_error() {
    let z = compress(&tar(&[E::File("f", 0o644, vec![42; 200_000])]), Comp::Zstd);
    let c = case(&[z[..z.len() / 2].to_vec()]);
    assert!(matches!(
        c.unpack().unwrap_err(),
        UnpackError::Stream { .. }
    ));
}

// ---- images and the store ----

fn store_is_consistent(store: &Path) {
    for e in fs::read_dir(store.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let data = fs::read(e.path()).unwrap();
        assert_eq!(
            sha256_hex(&data),
            e.file_name().to_string_lossy(),
            "blob content != name"
        );
    }
    let tmp: Vec<_> = fs::read_dir(store.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "leftovers in tmp: {tmp:?}");
}

#[test]
fn import_blob_with_wrong_digest_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("l");
    let mut layout = Layout::new(&dir);
    let layer = compress(&tar(&[E::File("f", 0o644, b"good".to_vec())]), Comp::Gzip);
    let img = layout.image(
        &[(tar(&[E::File("f", 0o644, b"good".to_vec())]), Comp::Gzip)],
        serde_json::json!({}),
    );
    layout.tag("t", &img);
    let _ = layer;
    // Corrupt the layer blob in place (same size).
    let manifest: serde_json::Value = serde_json::from_slice(&img.manifest).unwrap();
    let ld = manifest["layers"][0]["digest"].as_str().unwrap();
    let lp = dir.join("blobs/sha256").join(&ld[7..]);
    let mut data = fs::read(&lp).unwrap();
    let n = data.len();
    data[n / 2] ^= 0xff;
    fs::write(&lp, &data).unwrap();

    let store = t.path().join("store");
    let out = atoll(&store, &["import", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(ld) && err.contains("refusing"), "{err}");
    assert!(!store.join("blobs/sha256").join(&ld[7..]).exists());
    assert!(
        atoll_ok(&store, &["ls"]).lines().count() == 1,
        "a ref was recorded"
    );
    store_is_consistent(&store);
}

#[test]
fn index_naming_itself_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("l");
    let mut layout = Layout::new(&dir);
    // An index that claims digest X and lists X: its content cannot hash to X.
    let fake = format!("sha256:{}", "ab".repeat(32));
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                       "digest": fake, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}}],
    }))
    .unwrap();
    fs::write(dir.join("blobs/sha256").join("ab".repeat(32)), &body).unwrap();
    layout.index.push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": fake, "size": body.len(),
        "annotations": {"org.opencontainers.image.ref.name": "loop"},
    }));
    layout.write_index();
    let store = t.path().join("store");
    let out = atoll(&store, &["import", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing"));
    store_is_consistent(&store);
}

#[test]
fn nested_indexes_deeper_than_limit_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("l");
    let mut layout = Layout::new(&dir);
    let img = layout.image(
        &[(tar(&[E::File("f", 0o644, b"x".to_vec())]), Comp::Gzip)],
        serde_json::json!({}),
    );
    let (mut digest, mut size, mut mt) = (
        img.manifest_digest.clone(),
        img.manifest_size as usize,
        "application/vnd.oci.image.manifest.v1+json",
    );
    for _ in 0..8 {
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": mt, "digest": digest, "size": size,
                           "platform": {"os": "linux", "architecture": "amd64"}}],
        }))
        .unwrap();
        digest = layout.blob(&body);
        size = body.len();
        mt = "application/vnd.oci.image.index.v1+json";
    }
    layout.index.push(serde_json::json!({
        "mediaType": mt, "digest": digest, "size": size,
        "annotations": {"org.opencontainers.image.ref.name": "deep"},
    }));
    layout.write_index();
    let store = t.path().join("store");
    let out = atoll(&store, &["import", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("deeper than"), "{err}");
}

#[test]
fn failed_unpack_leaves_store_consistent_and_image_listed() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("l");
    let mut layout = Layout::new(&dir);
    let img = layout.image(
        &[(tar(&[E::File("../../x", 0o644, b"x".to_vec())]), Comp::Gzip)],
        serde_json::json!({}),
    );
    layout.tag("bad", &img);
    let store = t.path().join("store");
    atoll_ok(&store, &["import", dir.to_str().unwrap()]);
    let out = atoll(
        &store,
        &[
            "convert",
            "l:bad",
            "-o",
            t.path().join("x.erofs").to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to write outside"), "{err}");
    assert!(!t.path().join("x").exists() && !t.path().join("x.erofs").exists());
    store_is_consistent(&store);
}

#[test]
fn concurrent_imports_and_rm_keep_store_consistent() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let mut dirs = Vec::new();
    for i in 0..4u8 {
        let dir = t.path().join(format!("img{i}"));
        let mut layout = Layout::new(&dir);
        let shared = tar(&[E::File("shared", 0o644, vec![1; 300_000])]);
        let own = tar(&[E::File("own", 0o644, vec![i; 300_000])]);
        let img = layout.image(
            &[(shared, Comp::Gzip), (own, Comp::Gzip)],
            serde_json::json!({}),
        );
        layout.tag("t", &img);
        dirs.push(dir);
    }
    atoll_ok(
        &store,
        &["import", dirs[0].to_str().unwrap(), "--name", "victim"],
    );
    let bin = env!("CARGO_BIN_EXE_atoll-image");
    let mut children: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            std::process::Command::new(bin)
                .args([
                    "--store",
                    store.to_str().unwrap(),
                    "import",
                    d.to_str().unwrap(),
                ])
                .args(["--name", &format!("img{i}")])
                .spawn()
                .unwrap()
        })
        .collect();
    children.push(
        std::process::Command::new(bin)
            .args(["--store", store.to_str().unwrap(), "rm", "victim"])
            .spawn()
            .unwrap(),
    );
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let ls = atoll_ok(&store, &["ls"]);
    for i in 0..4 {
        assert!(ls.contains(&format!("img{i}")), "{ls}");
        let out = t.path().join(format!("out{i}"));
        atoll_ok(
            &store,
            &["unpack", &format!("img{i}"), out.to_str().unwrap()],
        );
        assert_eq!(fs::read(out.join("own")).unwrap(), vec![i as u8; 300_000]);
    }
    assert!(!ls.contains("victim"));
    store_is_consistent(&store);
}
