//! Import from an OCI image layout directory or a `docker save` tarball.
//!
//! Every blob is streamed into the store through [`super::store::BlobWriter`], its
//! sha256 and size checked against the descriptor before it becomes visible.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use super::digest::{Digest, HashingWriter};
use super::manifest::{self, LayerInfo, ManifestError, Parsed, MAX_INDEX_DEPTH};
use super::store::{Store, StoreError, MAX_JSON_BLOB};
use super::unpack::decompress;

pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{0}: not an OCI image layout (no oci-layout file) nor a docker-archive tarball")]
    NotAnImage(PathBuf),
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{0}: no image in it")]
    Empty(PathBuf),
    #[error("{path} holds {count} images; give --name only with one (or pick with --tag)")]
    NameNeedsOne { path: PathBuf, count: usize },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImportError + '_ {
    move |source| ImportError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One image recorded in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub name: String,
    pub manifest: Digest,
}

/// Imports every tagged image at `path` (only `tag`, when given); `name` renames a
/// single one.
pub fn import(
    store: &Store,
    path: &Path,
    name: Option<&str>,
    tag: Option<&str>,
) -> Result<Vec<Imported>, ImportError> {
    let _lock = store.lock_shared()?;
    let found = if path.join("oci-layout").is_file() {
        import_layout(store, path, tag)?
    } else if path.is_file() {
        import_docker_archive(store, path, tag)?
    } else {
        return Err(ImportError::NotAnImage(path.to_owned()));
    };
    if found.is_empty() {
        return Err(ImportError::Empty(path.to_owned()));
    }
    if name.is_some() && found.len() > 1 {
        return Err(ImportError::NameNeedsOne {
            path: path.to_owned(),
            count: found.len(),
        });
    }
    let mut out = Vec::new();
    for (n, d) in found {
        let n = name.map(str::to_owned).unwrap_or(n);
        store.set_ref(&n, &d)?;
        out.push(Imported {
            name: n,
            manifest: d,
        });
    }
    Ok(out)
}

fn default_base(path: &Path) -> String {
    let stem = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".to_owned());
    let stem = stem.trim_end_matches(".tar").to_lowercase();
    let cleaned: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if cleaned.is_empty() {
        "image".into()
    } else {
        cleaned
    }
}

/// A blob of an OCI layout, by digest (the digest is validated, so it is a safe
/// file name).
fn layout_blob(layout: &Path, d: &Digest) -> PathBuf {
    layout.join("blobs/sha256").join(d.hex())
}

fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>, ImportError> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut buf = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    if buf.len() as u64 > max {
        return Err(ImportError::Invalid {
            path: path.to_owned(),
            what: format!("larger than {max} bytes"),
        });
    }
    Ok(buf)
}

/// Copies one blob into the store, verifying digest and size.
fn copy_blob(store: &Store, src: &Path, d: &Digest, size: u64) -> Result<(), ImportError> {
    if store.has_blob(d) {
        return Ok(());
    }
    let f = File::open(src).map_err(io_err(src))?;
    let mut w = store.blob_writer()?;
    // One byte more than announced is enough to notice a size mismatch.
    io::copy(&mut f.take(size.saturating_add(1)), &mut w).map_err(io_err(src))?;
    w.commit(Some(d), Some(size))?;
    Ok(())
}

fn import_layout(
    store: &Store,
    layout: &Path,
    tag: Option<&str>,
) -> Result<Vec<(String, Digest)>, ImportError> {
    let index_path = layout.join("index.json");
    let data = read_limited(&index_path, MAX_JSON_BLOB)?;
    let Parsed::Index(index) = manifest::parse("index.json", &data)? else {
        return Err(ImportError::Invalid {
            path: index_path,
            what: "index.json is not an image index".into(),
        });
    };
    let base = default_base(layout);
    let mut out = Vec::new();
    for desc in index.manifests() {
        let ref_name = desc
            .annotations()
            .as_ref()
            .and_then(|a| a.get(REF_NAME_ANNOTATION))
            .cloned();
        if let Some(t) = tag {
            if ref_name.as_deref() != Some(t) {
                continue;
            }
        }
        let name = match ref_name {
            Some(r) if r.contains(':') || r.contains('/') => r,
            Some(r) => format!("{base}:{r}"),
            None => format!("{base}:latest"),
        };
        let d = Digest::try_from(desc.digest()).map_err(ManifestError::from)?;
        let m = import_layout_manifest(store, layout, &d, desc.size(), 0)?;
        out.push((name, m));
    }
    Ok(out)
}

/// Follows `d` (an index or manifest) to the linux/amd64 image manifest and copies
/// it, its config and layers into the store. Returns the manifest digest.
fn import_layout_manifest(
    store: &Store,
    layout: &Path,
    d: &Digest,
    size: u64,
    depth: usize,
) -> Result<Digest, ImportError> {
    if depth > MAX_INDEX_DEPTH {
        return Err(ManifestError::Loop(d.to_string()).into());
    }
    let path = layout_blob(layout, d);
    let data = read_limited(&path, MAX_JSON_BLOB)?;
    let actual = Digest::of(&data);
    if actual != *d || data.len() as u64 != size {
        return Err(StoreError::DigestMismatch {
            expected: d.clone(),
            actual,
            size: data.len() as u64,
        }
        .into());
    }
    match manifest::parse(&d.to_string(), &data)? {
        Parsed::Index(idx) => {
            let sel = manifest::select_platform(&d.to_string(), &idx)?;
            let sd = Digest::try_from(sel.digest()).map_err(ManifestError::from)?;
            import_layout_manifest(store, layout, &sd, sel.size(), depth + 1)
        }
        Parsed::Manifest(m) => {
            let c = m.config();
            let cd = Digest::try_from(c.digest()).map_err(ManifestError::from)?;
            copy_blob(store, &layout_blob(layout, &cd), &cd, c.size())?;
            for l in m.layers() {
                let ld = Digest::try_from(l.digest()).map_err(ManifestError::from)?;
                copy_blob(store, &layout_blob(layout, &ld), &ld, l.size())?;
            }
            store.put_blob(&data, Some(d))?;
            Ok(d.clone())
        }
    }
}

/// A file of the archive, spilled into the store's tmp directory with its digest.
struct Spilled {
    path: PathBuf,
    digest: Digest,
    size: u64,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Lexically normalises a path inside the archive; `None` if it leaves it.
fn archive_path(p: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

fn import_docker_archive(
    store: &Store,
    path: &Path,
    tag: Option<&str>,
) -> Result<Vec<(String, Digest)>, ImportError> {
    let f = File::open(path).map_err(io_err(path))?;
    let spill = tempfile::Builder::new()
        .prefix("import-")
        .tempdir_in(store.tmp_dir())
        .map_err(io_err(&store.tmp_dir()))?;
    let mut files: HashMap<String, Spilled> = HashMap::new();
    let mut links: HashMap<String, String> = HashMap::new();
    let mut ar = tar::Archive::new(BufReader::with_capacity(1 << 20, f));
    let bad = |what: String| ImportError::Invalid {
        path: path.to_owned(),
        what,
    };
    for (n, entry) in ar.entries().map_err(io_err(path))?.enumerate() {
        let mut entry = entry.map_err(io_err(path))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some(name) = archive_path(&name) else {
            return Err(bad(format!("entry {name:?} leaves the archive")));
        };
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let dst = spill.path().join(n.to_string());
                let file = File::create(&dst).map_err(io_err(&dst))?;
                let mut w = HashingWriter::new(io::BufWriter::with_capacity(1 << 20, file));
                io::copy(&mut entry, &mut w).map_err(io_err(path))?;
                let (bw, digest, size) = w.finish();
                bw.into_inner().map_err(|e| io_err(&dst)(e.into_error()))?;
                files.insert(
                    name,
                    Spilled {
                        path: dst,
                        digest,
                        size,
                    },
                );
            }
            tar::EntryType::Symlink => {
                // `docker save` links repeated layers to their first copy.
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                let joined = if target.starts_with('/') {
                    target
                } else {
                    format!("{dir}/{target}")
                };
                if let Some(t) = archive_path(&joined) {
                    links.insert(name, t);
                }
            }
            _ => {}
        }
    }
    let lookup = |name: &str| -> Result<&Spilled, ImportError> {
        let mut n =
            archive_path(name).ok_or_else(|| bad(format!("{name:?} leaves the archive")))?;
        for _ in 0..8 {
            if let Some(s) = files.get(&n) {
                return Ok(s);
            }
            match links.get(&n) {
                Some(t) => n = t.clone(),
                None => break,
            }
        }
        Err(bad(format!(
            "{name:?} is referenced but not in the archive"
        )))
    };
    let mf = files
        .get("manifest.json")
        .ok_or_else(|| ImportError::NotAnImage(path.to_owned()))?;
    let mdata = read_limited(&mf.path, MAX_JSON_BLOB)?;
    let entries: Vec<DockerManifestEntry> =
        serde_json::from_slice(&mdata).map_err(|e| bad(format!("manifest.json: {e}")))?;
    let base = default_base(path);
    let mut out = Vec::new();
    for e in entries {
        let tags = e.repo_tags.clone().unwrap_or_default();
        if let Some(t) = tag {
            if !tags.iter().any(|x| x == t || x.ends_with(&format!(":{t}"))) {
                continue;
            }
        }
        let cfg = lookup(&e.config)?;
        let cdata = read_limited(&cfg.path, MAX_JSON_BLOB)?;
        let cd = store.put_blob(&cdata, Some(&cfg.digest))?;
        let mut layers = Vec::new();
        for l in &e.layers {
            let s = lookup(l)?;
            let compression = {
                let f = File::open(&s.path).map_err(io_err(&s.path))?;
                decompress(f).map_err(io_err(&s.path))?.0
            };
            if !store.has_blob(&s.digest) {
                // Hashed while spilled: moved into the store without another copy.
                store.publish_file(&s.path, &s.digest)?;
            }
            layers.push(LayerInfo {
                digest: s.digest.clone(),
                size: s.size,
                compression,
            });
        }
        let mdata = manifest::build_manifest(&cd, cdata.len() as u64, &layers);
        let md = store.put_blob(&mdata, None)?;
        let names = if tags.is_empty() {
            vec![format!("{base}:latest")]
        } else {
            tags
        };
        for n in names {
            out.push((n, md.clone()));
        }
    }
    Ok(out)
}
