//! `atoll-image pull` against Debian's docker-registry (images pushed with skopeo,
//! a single-platform image and a multi-platform index) and against our own small
//! registry for bearer tokens, resume after a cut connection and corrupt blobs.
//! Needs the packages docker-registry and skopeo; no root.

mod common;
#[path = "common/registry.rs"]
mod registry;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use registry::{ServerOpts, TestRegistry};

/// Debian's docker-registry on a free 127.0.0.1 port, killed on drop.
struct DockerRegistry {
    child: Child,
    addr: String,
}

impl DockerRegistry {
    fn start(dir: &Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let cfg = dir.join("registry.yml");
        fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry (package docker-registry)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, addr }
    }
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn push(layout: &Path, tag: &str, dest: &str, all: bool) {
    let mut cmd = Command::new("skopeo");
    cmd.arg("copy").arg("--dest-tls-verify=false");
    if all {
        cmd.arg("--all");
    }
    run_ok(
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{dest}")),
    );
}

fn arch_layer(arch: &str) -> Vec<(Vec<u8>, Comp)> {
    vec![
        (
            tar(&[
                E::Dir("bin/", 0o755),
                E::File("bin/busybox", 0o755, busybox()),
                E::Symlink("bin/sh", "busybox"),
            ]),
            Comp::Gzip,
        ),
        (
            tar(&[E::File("etc/arch", 0o644, arch.as_bytes().to_vec())]),
            Comp::Gzip,
        ),
    ]
}

#[test]
fn pull_from_docker_registry_matches_layout() {
    let t = tempfile::tempdir().unwrap();
    let reg = DockerRegistry::start(t.path());
    let dir = t.path().join("app");
    let mut layout = Layout::new(&dir);
    let img = layout.image(&arch_layer("amd64"), serde_json::json!({}));
    layout.tag("v1", &img);
    push(&dir, "v1", &format!("{}/test/app:v1", reg.addr), false);

    let store = t.path().join("store");
    let r = format!("{}/test/app:v1", reg.addr);
    let name = atoll_ok(&store, &["pull", &r, "--plain-http"]);
    assert_eq!(name.trim(), r);
    let pulled = t.path().join("pulled");
    atoll_ok(&store, &["unpack", &r, pulled.to_str().unwrap()]);
    atoll_ok(
        &store,
        &["import", dir.to_str().unwrap(), "--name", "local"],
    );
    let local = t.path().join("local");
    atoll_ok(&store, &["unpack", "local", local.to_str().unwrap()]);
    assert_same_tree(&snapshot(&local), &snapshot(&pulled), "layout vs pulled");

    // Pulling again downloads nothing.
    let again = atoll(&store, &["pull", &r, "--plain-http"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already in the store"));
}

#[test]
fn pull_multi_platform_index_picks_linux_amd64() {
    let t = tempfile::tempdir().unwrap();
    let reg = DockerRegistry::start(t.path());
    let dir = t.path().join("multi");
    let mut layout = Layout::new(&dir);
    let amd = layout.image_for(&arch_layer("amd64"), serde_json::json!({}), "amd64");
    let arm = layout.image_for(&arch_layer("arm64"), serde_json::json!({}), "arm64");
    layout.tag_multi("v1", &amd, &arm);
    push(&dir, "v1", &format!("{}/test/multi:v1", reg.addr), true);

    let store = t.path().join("store");
    let r = format!("{}/test/multi:v1", reg.addr);
    atoll_ok(&store, &["pull", &r, "--plain-http"]);
    let inspect: serde_json::Value =
        serde_json::from_str(&atoll_ok(&store, &["inspect", &r])).unwrap();
    assert_eq!(inspect["config"]["architecture"], "amd64");
    let out = t.path().join("out");
    atoll_ok(&store, &["unpack", &r, out.to_str().unwrap()]);
    assert_eq!(fs::read(out.join("etc/arch")).unwrap(), b"amd64");
}

fn token_registry(opts: ServerOpts) -> (tempfile::TempDir, TestRegistry, BuiltImage) {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("app");
    let mut layout = Layout::new(&dir);
    let img = layout.image(&arch_layer("amd64"), serde_json::json!({}));
    layout.tag("v1", &img);
    let reg = TestRegistry::start(dir, "test/app", opts);
    (t, reg, img)
}

fn layer_digest(img: &BuiltImage, i: usize) -> String {
    let m: serde_json::Value = serde_json::from_slice(&img.manifest).unwrap();
    m["layers"][i]["digest"].as_str().unwrap().to_owned()
}

#[test]
fn pull_with_bearer_token_auth() {
    let (t, reg, _) = token_registry(ServerOpts {
        token: Some("s3cr3t".into()),
        ..ServerOpts::default()
    });
    let store = t.path().join("store");
    let r = format!("{}/test/app:v1", reg.addr);
    atoll_ok(&store, &["pull", &r, "--plain-http"]);
    let log = reg.requests();
    let token_req = log
        .iter()
        .find(|l| l.starts_with("/token"))
        .expect("token fetched");
    assert!(
        token_req.contains("scope=repository%3Atest%2Fapp%3Apull"),
        "{token_req}"
    );
    assert!(token_req.contains("service=atoll-test"), "{token_req}");
    assert!(log
        .iter()
        .any(|l| l.contains("/blobs/") && l.contains("auth=Bearer s3cr3t")));
    let out = t.path().join("out");
    atoll_ok(&store, &["unpack", &r, out.to_str().unwrap()]);
    assert_eq!(fs::read(out.join("etc/arch")).unwrap(), b"amd64");
}

#[test]
fn interrupted_pull_resumes_with_range() {
    let t0 = tempfile::tempdir().unwrap();
    // The busybox layer (~1 MB compressed) is cut after 300 000 bytes.
    let probe = Layout::new(&t0.path().join("probe"));
    let digest = layer_digest(&probe.image(&arch_layer("amd64"), serde_json::json!({})), 0);
    let (t, reg, _) = token_registry(ServerOpts {
        cut_blob_once: Some((digest.clone(), 300_000)),
        ..ServerOpts::default()
    });
    let store = t.path().join("store");
    let r = format!("{}/test/app:v1", reg.addr);
    let first = atoll(&store, &["pull", &r, "--plain-http"]);
    assert!(!first.status.success(), "the cut must fail the first pull");
    let partial = store.join("tmp").join(format!("{}.partial", &digest[7..]));
    assert_eq!(fs::metadata(&partial).unwrap().len(), 300_000);
    assert!(!store.join("blobs/sha256").join(&digest[7..]).exists());

    atoll_ok(&store, &["pull", &r, "--plain-http"]);
    assert!(
        reg.requests()
            .iter()
            .any(|l| l.contains(&digest) && l.contains("range=bytes=300000-")),
        "{:?}",
        reg.requests()
    );
    assert!(!partial.exists());
    let data = fs::read(store.join("blobs/sha256").join(&digest[7..])).unwrap();
    assert_eq!(format!("sha256:{}", sha256_hex(&data)), digest);
}

#[test]
fn corrupt_blob_from_registry_is_refused() {
    let t0 = tempfile::tempdir().unwrap();
    let probe = Layout::new(&t0.path().join("probe"));
    let digest = layer_digest(&probe.image(&arch_layer("amd64"), serde_json::json!({})), 1);
    let (t, reg, _) = token_registry(ServerOpts {
        corrupt_blob: Some(digest.clone()),
        ..ServerOpts::default()
    });
    let store = t.path().join("store");
    let out = atoll(
        &store,
        &["pull", &format!("{}/test/app:v1", reg.addr), "--plain-http"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&digest) && err.contains("refusing"), "{err}");
    assert!(!store.join("blobs/sha256").join(&digest[7..]).exists());
    assert_eq!(
        atoll_ok(&store, &["ls"]).lines().count(),
        1,
        "no ref recorded"
    );
}
