//! `atoll-image convert`: erofs and ext4 images that the Debian checkers accept and
//! whose trees, read back with the Debian tools (`fsck.erofs --extract`,
//! `debugfs rdump`), match `atoll-image unpack`. Also the digest cache and the guest
//! config. Needs root (ownership, devices) and erofs-utils, e2fsprogs.

mod common;

use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;

fn image(t: &Path, upper_comp: Comp) -> std::path::PathBuf {
    let dir = t.join("app");
    let mut layout = Layout::new(&dir);
    let base = tar(&[
        E::Dir("bin/", 0o755),
        E::File("bin/busybox", 0o755, busybox()),
        E::Symlink("bin/sh", "busybox"),
        E::Dir("etc/", 0o755),
        E::File("etc/hostname", 0o644, b"atoll\n".to_vec()),
        E::File("etc/secret", 0o600, b"s3cret\n".to_vec()),
        E::Hardlink("etc/hostname.bak", "etc/hostname"),
        E::Dir("dev/", 0o755),
        E::Char("dev/null", 0o666, 1, 3),
        E::Fifo("run-fifo", 0o620),
        E::Dir("tmp/", 0o1777),
        E::FileFull {
            name: "home/user/data",
            mode: 0o4750,
            uid: 1000,
            gid: 100,
            mtime: 1_650_000_000,
            xattrs: vec![("user.kind", b"data")],
            data: vec![9; 100_000],
        },
    ]);
    let upper = tar(&[
        E::File("etc/.wh.secret", 0o644, vec![]),
        E::File("etc/motd", 0o644, b"hello\n".to_vec()),
    ]);
    let img = layout.image(
        &[(base, Comp::Gzip), (upper, upper_comp)],
        serde_json::json!({"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "User": "1000:100",
                           "WorkingDir": "/home/user", "Env": ["PATH=/bin", "A=b"]}),
    );
    layout.tag("v1", &img);
    dir
}

fn setup() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::collections::BTreeMap<String, Node>,
) {
    setup_with(Comp::Zstd)
}

fn setup_with(
    upper: Comp,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::collections::BTreeMap<String, Node>,
) {
    let t = tempfile::tempdir().unwrap();
    let dir = image(t.path(), upper);
    let store = t.path().join("store");
    atoll_ok(&store, &["import", dir.to_str().unwrap()]);
    let unpacked = t.path().join("unpacked");
    atoll_ok(&store, &["unpack", "app:v1", unpacked.to_str().unwrap()]);
    let snap = snapshot(&unpacked);
    assert!(!snap.contains_key("etc/secret"));
    (t, store, snap)
}

fn check_guest_config(out: &Path) {
    let mut p = out.as_os_str().to_owned();
    p.push(".config.json");
    let c: serde_json::Value = serde_json::from_slice(&fs::read(p).unwrap()).unwrap();
    assert_eq!(c["entrypoint"], serde_json::json!(["/bin/sh", "-c"]));
    assert_eq!(c["cmd"], serde_json::json!(["echo hi"]));
    assert_eq!(c["env"], serde_json::json!(["PATH=/bin", "A=b"]));
    assert_eq!(c["user"], "1000:100");
    assert_eq!(c["working_dir"], "/home/user");
    assert!(c["manifest_digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
}

/// A read-only loop mount, unmounted on drop (`-o loop` detaches the device).
struct Mount(std::path::PathBuf);

impl Mount {
    fn new(image: &Path, fstype: &str, at: &Path) -> Self {
        fs::create_dir_all(at).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", fstype, "-o", "loop,ro"])
                .arg(image)
                .arg(at),
        );
        Self(at.to_owned())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn convert_erofs_passes_fsck_and_matches_unpack() {
    let (t, store, snap) = setup();
    let out = t.path().join("rootfs.erofs");
    atoll_ok(
        &store,
        &[
            "convert",
            "app:v1",
            "--format",
            "erofs",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    run_ok(Command::new("fsck.erofs").arg(&out));
    // Content read back by erofs-utils' own reader.
    let back = t.path().join("erofs-back");
    run_ok(
        Command::new("fsck.erofs")
            .arg(format!("--extract={}", back.display()))
            .arg(&out),
    );
    assert_eq!(
        fs::read(back.join("home/user/data")).unwrap(),
        vec![9; 100_000]
    );
    assert_eq!(
        fs::read_link(back.join("bin/sh")).unwrap().to_str(),
        Some("busybox")
    );
    // Everything else (hard links, set-uid, xattrs, devices) through the kernel.
    let m = Mount::new(&out, "erofs", &t.path().join("mnt"));
    assert_same_tree(&snap, &snapshot(&m.0), "unpack vs mounted erofs");
    check_guest_config(&out);
}

#[test]
fn convert_ext4_passes_e2fsck_and_matches_unpack() {
    let (t, store, snap) = setup();
    let out = t.path().join("rootfs.ext4");
    atoll_ok(
        &store,
        &[
            "convert",
            "app:v1",
            "--format",
            "ext4",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    run_ok(Command::new("e2fsck").arg("-fn").arg(&out));
    let stat = run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg("stat /etc/hostname")
            .arg(&out),
    );
    assert!(String::from_utf8_lossy(&stat.stdout).contains("Links: 2"));
    let m = Mount::new(&out, "ext4", &t.path().join("mnt"));
    let mut mounted = snapshot(&m.0);
    assert_eq!(mounted.remove("lost+found").map(|n| n.kind), Some("dir"));
    assert_same_tree(&snap, &mounted, "unpack vs mounted ext4");
    check_guest_config(&out);
}

#[test]
fn convert_twice_reuses_cached_result() {
    let (t, store, _) = setup();
    let a = t.path().join("a.erofs");
    let b = t.path().join("b.erofs");
    let first = atoll(&store, &["convert", "app:v1", "-o", a.to_str().unwrap()]);
    assert!(first.status.success());
    assert!(String::from_utf8_lossy(&first.stderr).contains("mkfs.erofs in"));
    let second = atoll(&store, &["convert", "app:v1", "-o", b.to_str().unwrap()]);
    assert!(second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("reused"), "{err}");
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
}

#[test]
fn rm_collects_blobs_and_conversions() {
    let (t, store, _) = setup();
    atoll_ok(
        &store,
        &[
            "convert",
            "app:v1",
            "-o",
            t.path().join("x.erofs").to_str().unwrap(),
        ],
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&atoll_ok(&store, &["inspect", "app:v1"])).unwrap();
    assert_eq!(inspect["layers"].as_array().unwrap().len(), 2);
    assert_eq!(inspect["config"]["config"]["User"], "1000:100");
    atoll_ok(&store, &["rm", "app:v1"]);
    assert_eq!(fs::read_dir(store.join("blobs/sha256")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(store.join("images")).unwrap().count(), 0);
    assert_eq!(atoll_ok(&store, &["ls"]).lines().count(), 1);
}

#[test]
fn docker_archive_import_matches_oci_layout() {
    // skopeo (Debian) writes the docker-archive from our OCI layout; docker
    // archives cannot hold zstd layers.
    let (t, store, snap) = setup_with(Comp::Gzip);
    let archive = t.path().join("app.tar");
    run_ok(
        Command::new("skopeo")
            .arg("copy")
            .arg(format!("oci:{}:v1", t.path().join("app").display()))
            .arg(format!(
                "docker-archive:{}:example/app:v1",
                archive.display()
            )),
    );
    let name = atoll_ok(&store, &["import", archive.to_str().unwrap()]);
    assert_eq!(name.trim(), "docker.io/example/app:v1");
    let out = t.path().join("from-archive");
    atoll_ok(&store, &["unpack", "example/app:v1", out.to_str().unwrap()]);
    assert_same_tree(&snap, &snapshot(&out), "OCI layout vs docker-archive");
}
