//! `atoll-image import` + `unpack` against Debian's `umoci unpack` on the same
//! multi-layer OCI layout: the trees must be identical (paths, types, modes,
//! owners, contents, link targets, hard-link groups, file mtimes, user xattrs).
//! Needs root (ownership, device nodes) and the packages umoci and busybox-static.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn layers(busybox: Vec<u8>) -> Vec<(Vec<u8>, Comp)> {
    let base = tar(&[
        E::Dir("bin/", 0o755),
        E::File("bin/busybox", 0o755, busybox),
        E::Symlink("bin/sh", "busybox"),
        E::Dir("etc/", 0o755),
        E::File(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        ),
        E::FileFull {
            name: "etc/shadow",
            mode: 0o640,
            uid: 0,
            gid: 42,
            mtime: 1_600_000_000,
            xattrs: vec![],
            data: b"root:*:19000::::::\n".to_vec(),
        },
        E::Dir("run/", 0o755),
        E::Dir("var/", 0o755),
        E::Symlink("var/run", "/run"),
        E::Dir("tmp/", 0o1777),
        E::Dir("opq/", 0o755),
        E::File("opq/lower1", 0o644, b"lower1".to_vec()),
        E::Dir("opq/sub/", 0o700),
        E::File("opq/sub/lower2", 0o644, b"lower2".to_vec()),
        E::File("gone", 0o644, b"whited out".to_vec()),
        E::Dir("gonedir/", 0o755),
        E::File("gonedir/x", 0o644, b"x".to_vec()),
        E::File("hl-src", 0o644, b"shared inode".to_vec()),
        E::Hardlink("hl-same-layer", "hl-src"),
        E::Fifo("fifo", 0o600),
        E::Dir("dev/", 0o755),
        E::Char("dev/null", 0o666, 1, 3),
        E::FileFull {
            name: "usr/bin/suid",
            mode: 0o4755,
            uid: 1000,
            gid: 1000,
            mtime: 1_500_000_000,
            xattrs: vec![("user.test", b"hello")],
            data: b"#!/bin/sh\n".to_vec(),
        },
    ]);
    let upper = tar(&[
        E::File(".wh.gone", 0o644, vec![]),
        E::File(".wh.gonedir", 0o644, vec![]),
        E::Dir("opq/", 0o755),
        E::File("opq/.wh..wh..opq", 0o644, vec![]),
        E::File("opq/upper", 0o644, b"upper".to_vec()),
        E::Hardlink("hl-upper", "hl-src"),
        E::File("var/run/pidfile", 0o644, b"42\n".to_vec()),
        E::File(
            "etc/passwd",
            0o600,
            b"root:x:0:0::/:/bin/sh\nuser:x:1000:1000::/:/bin/sh\n".to_vec(),
        ),
        E::Symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
        E::Dir("etc/ssl/", 0o750),
    ]);
    let top = tar(&[
        E::File("bin/.wh.sh", 0o644, vec![]),
        E::Symlink("bin/sh", "/bin/busybox"),
        E::File("opq/sub-new", 0o644, b"after opaque".to_vec()),
        E::File("tmp/.keep", 0o600, vec![]),
        E::Symlink("dangling", "../../made/by/link"),
        E::File("dangling/f", 0o644, b"through a dangling link".to_vec()),
    ]);
    vec![(base, Comp::Gzip), (upper, Comp::None), (top, Comp::Gzip)]
}

fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) {
    run_ok(
        Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{tag}", layout.display()))
            .arg(bundle),
    );
}

#[test]
fn unpack_multilayer_matches_umoci() {
    let t = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&t.path().join("layout"));
    let img = layout.image(&layers(busybox()), serde_json::json!({}));
    layout.tag("test", &img);
    let store = t.path().join("store");
    let name = atoll_ok(
        &store,
        &["import", t.path().join("layout").to_str().unwrap()],
    );
    assert_eq!(name.trim(), "layout:test");
    let ours = t.path().join("ours");
    atoll_ok(&store, &["unpack", "layout:test", ours.to_str().unwrap()]);
    let bundle = t.path().join("bundle");
    umoci_unpack(&t.path().join("layout"), "test", &bundle);

    let a = snapshot(&ours);
    let b = snapshot(&bundle.join("rootfs"));
    assert_same_tree(&a, &b, "atoll-image unpack vs umoci unpack");

    // The semantics themselves, so both tools being wrong the same way is caught.
    assert!(!a.contains_key("gone") && !a.contains_key("gonedir"));
    assert!(!a.contains_key("opq/lower1") && !a.contains_key("opq/sub"));
    assert_eq!(
        a["run/pidfile"].kind, "file",
        "write through var/run -> /run"
    );
    assert_eq!(
        a["hl-upper"].link_group, a["hl-src"].link_group,
        "link to a lower file"
    );
    assert_eq!(a["hl-same-layer"].link_group, a["hl-src"].link_group);
    assert_eq!(a["usr/bin/suid"].mode, 0o4755);
    assert_eq!((a["usr/bin/suid"].uid, a["usr/bin/suid"].gid), (1000, 1000));
    assert_eq!(
        a["usr/bin/suid"].xattrs,
        vec![("user.test".to_owned(), b"hello".to_vec())]
    );
    assert_eq!(a["etc/shadow"].gid, 42);
    assert_eq!(a["etc/shadow"].mtime, Some(1_600_000_000));
    assert_eq!(a["bin/sh"].content, "/bin/busybox");
    assert_eq!(a["made/by/link/f"].kind, "file");
    assert_eq!(a["dev/null"].kind, "char");
    assert_eq!(a["fifo"].kind, "fifo");
    assert_eq!(a["tmp"].mode, 0o1777);
}

#[test]
fn unpack_zstd_layers_match_gzip_and_plain() {
    // umoci 0.4.7 predates zstd layers: the same tars compressed three ways must
    // give the same tree, and the gzip one is checked against umoci above.
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let mut snaps = Vec::new();
    for (i, c) in [Comp::Gzip, Comp::Zstd, Comp::None].into_iter().enumerate() {
        let dir = t.path().join(format!("l{i}"));
        let mut layout = Layout::new(&dir);
        let ls: Vec<_> = layers(b"not really busybox".to_vec())
            .into_iter()
            .map(|(tar, _)| (tar, c))
            .collect();
        let img = layout.image(&ls, serde_json::json!({}));
        layout.tag("t", &img);
        atoll_ok(
            &store,
            &["import", dir.to_str().unwrap(), "--name", &format!("c{i}")],
        );
        let out = t.path().join(format!("out{i}"));
        atoll_ok(&store, &["unpack", &format!("c{i}"), out.to_str().unwrap()]);
        snaps.push(snapshot(&out));
    }
    assert_same_tree(&snaps[0], &snaps[1], "gzip vs zstd");
    assert_same_tree(&snaps[0], &snaps[2], "gzip vs uncompressed");
}
