//! `atoll-image bench`: OCI layout -> VM-ready erofs, `atoll-image import` +
//! `convert` against `umoci unpack` + `mkfs.erofs` on the same layout, in the same
//! run. Each step runs as a child process so its wall time and peak RSS
//! (`wait4`'s `ru_maxrss`) are its own.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Serialize;

use super::digest::{Digest, HashingWriter};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{cmd} failed ({status})")]
    Failed { cmd: String, status: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub layout: PathBuf,
    pub tag: String,
    pub runs: usize,
    /// Scratch space (stores, bundles, images); emptied between runs.
    pub work: PathBuf,
    /// The `atoll-image` binary to time.
    pub exe: PathBuf,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Step {
    pub seconds: f64,
    pub max_rss_kib: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub atoll_import: Step,
    pub atoll_convert: Step,
    pub atoll_total_s: f64,
    pub umoci_unpack: Step,
    pub mkfs_erofs: Step,
    pub peer_total_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub layout: String,
    pub compressed_bytes: u64,
    pub runs: Vec<Run>,
    pub atoll_median_s: f64,
    pub peer_median_s: f64,
    /// atoll / peer, median over runs: the target is <= 0.5.
    pub ratio: f64,
    pub atoll_max_rss_kib: i64,
    pub peer_max_rss_kib: i64,
    pub erofs_bytes_atoll: u64,
    pub erofs_bytes_peer: u64,
}

/// Runs `cmd`, returning its wall time and peak RSS.
fn timed(cmd: &mut Command) -> Result<Step, BenchError> {
    let name = format!("{cmd:?}");
    let t0 = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| io_err(Path::new(&name))(e))?;
    let pid = i32::try_from(child.id()).expect("pid fits i32");
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet reaped (we never call `wait` on `child`);
    // status and ru point to live, writable values.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let elapsed = t0.elapsed();
    if r < 0 {
        return Err(io_err(Path::new(&name))(io::Error::last_os_error()));
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(BenchError::Failed {
            cmd: name,
            status: format!("wait status {status:#x}"),
        });
    }
    Ok(Step {
        seconds: elapsed.as_secs_f64(),
        max_rss_kib: ru.ru_maxrss,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn dir_size(p: &Path) -> u64 {
    fs::read_dir(p)
        .map(|it| {
            it.filter_map(Result::ok)
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_size(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

pub fn run(opts: &BenchOptions, progress: &dyn Fn(&str)) -> Result<BenchReport, BenchError> {
    let mut runs = Vec::new();
    let image_ref = format!("{}:{}", opts.layout.display(), opts.tag);
    let (mut ours_size, mut peer_size) = (0, 0);
    for i in 0..opts.runs.max(1) {
        let _ = fs::remove_dir_all(&opts.work);
        fs::create_dir_all(&opts.work).map_err(io_err(&opts.work))?;
        let store = opts.work.join("store");
        let ours_out = opts.work.join("atoll.erofs");
        let bundle = opts.work.join("bundle");
        let peer_out = opts.work.join("peer.erofs");
        let ours = |sub: &[&str]| {
            let mut c = Command::new(&opts.exe);
            c.arg("--store").arg(&store).args(sub);
            c
        };
        let atoll = |runs: &mut Vec<Step>| -> Result<(), BenchError> {
            runs.push(timed(
                ours(&[
                    "import",
                    &opts.layout.to_string_lossy(),
                    "--name",
                    "bench",
                    "--tag",
                    &opts.tag,
                ])
                .stderr(std::process::Stdio::null()),
            )?);
            runs.push(timed(
                ours(&[
                    "convert",
                    "bench",
                    "--format",
                    "erofs",
                    "-o",
                    &ours_out.to_string_lossy(),
                ])
                .stderr(std::process::Stdio::null()),
            )?);
            Ok(())
        };
        let peer = |runs: &mut Vec<Step>| -> Result<(), BenchError> {
            runs.push(timed(
                Command::new("umoci")
                    .arg("unpack")
                    .arg("--image")
                    .arg(&image_ref)
                    .arg(&bundle),
            )?);
            runs.push(timed(
                Command::new("mkfs.erofs")
                    .arg("--quiet")
                    .arg("--preserve-mtime")
                    .arg(&peer_out)
                    .arg(bundle.join("rootfs")),
            )?);
            Ok(())
        };
        let (mut a, mut p) = (Vec::new(), Vec::new());
        // Alternate who goes first so neither always gets the warmer cache.
        if i % 2 == 0 {
            atoll(&mut a)?;
            peer(&mut p)?;
        } else {
            peer(&mut p)?;
            atoll(&mut a)?;
        }
        let run = Run {
            atoll_import: a[0],
            atoll_convert: a[1],
            atoll_total_s: a[0].seconds + a[1].seconds,
            umoci_unpack: p[0],
            mkfs_erofs: p[1],
            peer_total_s: p[0].seconds + p[1].seconds,
        };
        progress(&format!(
            "run {}: atoll import {:.2}s + convert {:.2}s = {:.2}s; umoci unpack {:.2}s + mkfs.erofs {:.2}s = {:.2}s",
            i + 1,
            run.atoll_import.seconds,
            run.atoll_convert.seconds,
            run.atoll_total_s,
            run.umoci_unpack.seconds,
            run.mkfs_erofs.seconds,
            run.peer_total_s
        ));
        ours_size = fs::metadata(&ours_out).map(|m| m.len()).unwrap_or(0);
        peer_size = fs::metadata(&peer_out).map(|m| m.len()).unwrap_or(0);
        runs.push(run);
    }
    let _ = fs::remove_dir_all(&opts.work);
    let a = median(runs.iter().map(|r| r.atoll_total_s).collect());
    let p = median(runs.iter().map(|r| r.peer_total_s).collect());
    Ok(BenchReport {
        layout: opts.layout.display().to_string(),
        compressed_bytes: dir_size(&opts.layout.join("blobs")),
        atoll_median_s: a,
        peer_median_s: p,
        ratio: if p > 0.0 { a / p } else { 0.0 },
        atoll_max_rss_kib: runs
            .iter()
            .flat_map(|r| [r.atoll_import.max_rss_kib, r.atoll_convert.max_rss_kib])
            .max()
            .unwrap_or(0),
        peer_max_rss_kib: runs
            .iter()
            .flat_map(|r| [r.umoci_unpack.max_rss_kib, r.mkfs_erofs.max_rss_kib])
            .max()
            .unwrap_or(0),
        erofs_bytes_atoll: ours_size,
        erofs_bytes_peer: peer_size,
        runs,
    })
}

/// Writes an OCI layout with one gzip layer holding `rootfs` (the benchmark input).
pub fn layout_from_rootfs(rootfs: &Path, layout: &Path, tag: &str) -> Result<Digest, BenchError> {
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
    let tmp = layout.join("layer.tmp");
    let file = File::create(&tmp).map_err(io_err(&tmp))?;
    // Hash the compressed stream (the blob digest) and the tar (the diff id).
    let gz = flate2::write::GzEncoder::new(
        HashingWriter::new(io::BufWriter::new(file)),
        flate2::Compression::default(),
    );
    let mut b = tar::Builder::new(HashingWriter::new(gz));
    b.follow_symlinks(false);
    b.append_dir_all(".", rootfs).map_err(io_err(rootfs))?;
    let (gz, diff_id, _) = b.into_inner().map_err(io_err(&tmp))?.finish();
    let (bw, layer_digest, layer_size) = gz.finish().map_err(io_err(&tmp))?.finish();
    bw.into_inner().map_err(|e| io_err(&tmp)(e.into_error()))?;
    fs::rename(&tmp, blobs.join(layer_digest.hex())).map_err(io_err(&tmp))?;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/bash"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
    }))
    .expect("config");
    let cd = Digest::of(&config);
    fs::write(blobs.join(cd.hex()), &config).map_err(io_err(&blobs))?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": super::manifest::OCI_MANIFEST,
        "config": {"mediaType": super::manifest::OCI_CONFIG, "digest": cd.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest.to_string(), "size": layer_size}],
    }))
    .expect("manifest");
    let md = Digest::of(&manifest);
    fs::write(blobs.join(md.hex()), &manifest).map_err(io_err(&blobs))?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": super::manifest::OCI_MANIFEST, "digest": md.to_string(), "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }]});
    let p = layout.join("index.json");
    let mut f = File::create(&p).map_err(io_err(&p))?;
    f.write_all(&serde_json::to_vec(&index).expect("index"))
        .map_err(io_err(&p))?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .map_err(io_err(layout))?;
    Ok(md)
}
