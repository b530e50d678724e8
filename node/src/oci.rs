//! Test images from real tar layers in OCI layout (shared by the end-to-end tests
//! and the benchmarks), and a Debian `docker-registry` filled with them by skopeo.
//! Test tooling: every failure panics with what went wrong.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

pub fn sha(data: &[u8]) -> String {
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

/// A `docker-registry` config serving `storage` on `addr`, logging errors only.
pub fn registry_config(storage: &Path, addr: &str) -> String {
    format!(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
        storage.display()
    )
}

/// Where node scripts copy [`fill_registry`]'s storage (`cp -r
/// $ATOLL_ARTIFACTS/registry /run/reg/data`).
pub const NODE_REGISTRY_DATA: &str = "/run/reg/data";
/// Where the node's registry listens.
pub const NODE_REGISTRY_ADDR: &str = "127.0.0.1:5000";

/// The config of the registry a node script runs (carry it as a file).
pub fn node_registry_config(work: &Path) -> PathBuf {
    let p = work.join("node-registry.yml");
    fs::write(
        &p,
        registry_config(Path::new(NODE_REGISTRY_DATA), NODE_REGISTRY_ADDR),
    )
    .unwrap();
    p
}

/// Runs Debian's `docker-registry` with its storage in `storage` on a free
/// 127.0.0.1 port, copies each `(layout, "repo:tag")` into it with skopeo, and stops
/// it. The storage can then be served by another docker-registry (in the node).
pub fn fill_registry(work: &Path, storage: &Path, images: &[(&Path, &str)]) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = work.join("registry.yml");
    fs::write(&cfg, registry_config(storage, &addr)).unwrap();
    let mut reg = Command::new("docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry (package docker-registry)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "docker-registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut failed = None;
    for (layout, name) in images {
        let out = Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{addr}/{name}"))
            .output()
            .expect("skopeo (package skopeo)");
        if !out.status.success() {
            failed = Some(format!(
                "skopeo copy {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
            break;
        }
    }
    let _ = reg.kill();
    let _ = reg.wait();
    let _ = fs::remove_file(&cfg);
    if let Some(f) = failed {
        panic!("{f}");
    }
}

/// Where [`fill_registry`]'s storage goes when carried into the node.
pub fn registry_dir(work: &Path) -> PathBuf {
    work.join("registry")
}
