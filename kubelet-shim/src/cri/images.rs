//! The CRI ImageService over atoll's image store: an image's id is the `sha256:`
//! digest of its manifest (what PullImage returns and every answer names it by);
//! it keeps its own name whichever mirror served it. Pulled images are converted
//! to erofs at once, so creating a container does not wait for it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use atoll_image::oci::pull::{self, Credentials, PullOptions};
use atoll_image::oci::reference::Reference;
use atoll_image::oci::store::{Store, StoreError};
use k8s_cri::v1 as cri;
use tonic::{Request, Response, Status};

use super::config::RegistryConfig;
use super::runtime::blocking;
use super::server::{clean_message, now_ns, repo_digest, CriError, Server};
use crate::pod::image::{self, RootfsFrom};

/// Most files counted by ImageFsInfo (a bound on the walk).
const MAX_FS_WALK: u64 = 1_000_000;

/// Where to fetch `reference` from, in order: its mirrors, then its registry (over
/// HTTP when the config says so).
pub fn endpoints(reg: &RegistryConfig, reference: &str) -> Result<Vec<PullOptions>, CriError> {
    let r = Reference::parse(reference).map_err(|e| CriError::InvalidArgument(e.to_string()))?;
    let mut out: Vec<PullOptions> = reg
        .mirrors
        .get(&r.registry)
        .into_iter()
        .flatten()
        .map(|e| PullOptions {
            plain_http: e.starts_with("http://"),
            endpoint: Some(e.clone()),
            credentials: None,
        })
        .collect();
    out.push(PullOptions {
        plain_http: reg.plain_http.contains(&r.registry),
        endpoint: None,
        credentials: None,
    });
    Ok(out)
}

/// The credentials of a PullImage's auth config.
pub fn credentials(auth: Option<&cri::AuthConfig>) -> Option<Credentials> {
    let a = auth?;
    if !a.username.is_empty() {
        return Some(Credentials {
            username: a.username.clone(),
            password: a.password.clone(),
        });
    }
    if !a.auth.is_empty() {
        return Credentials::from_auth(&a.auth);
    }
    if !a.identity_token.is_empty() {
        return Some(Credentials {
            username: "<token>".into(),
            password: a.identity_token.clone(),
        });
    }
    None
}

/// The CRI description of the image `digest`, named by every ref in `refs` that
/// points at it.
fn describe(
    store: &Store,
    refs: &BTreeMap<String, atoll_image::oci::digest::Digest>,
    digest: &atoll_image::oci::digest::Digest,
) -> Option<cri::Image> {
    let names: Vec<&String> = refs
        .iter()
        .filter(|(_, d)| *d == digest)
        .map(|(n, _)| n)
        .collect();
    let img = store.image(digest).ok()?;
    let mut size = store.blob_path(digest).metadata().map_or(0, |m| m.len());
    for l in img.layer_digests().ok()? {
        size += store.blob_path(&l).metadata().map_or(0, |m| m.len());
    }
    size += store
        .blob_path(&img.config_digest)
        .metadata()
        .map_or(0, |m| m.len());
    let user = atoll_image::oci::convert::GuestConfig::from_image(&img).user;
    let user = user.split(':').next().unwrap_or("").to_owned();
    let (uid, username) = match user.parse::<i64>() {
        Ok(n) => (Some(cri::Int64Value { value: n }), String::new()),
        Err(_) => (None, user),
    };
    let digests = repo_digests(&names, &digest.to_string());
    Some(cri::Image {
        id: format!("sha256:{}", digest.hex()),
        repo_tags: names
            .iter()
            .filter(|n| !n.contains('@'))
            .map(|n| n.to_string())
            .collect(),
        repo_digests: digests,
        size,
        uid,
        username,
        spec: None,
        pinned: false,
    })
}

/// The `repo@digest` names of an image whose manifest is `digest`, known by
/// `names`: a name pulled by digest is its own (the digest asked for, which may be
/// an index's: the CRI client gets back what it pulled), a tag gives its repository
/// at the manifest's digest.
fn repo_digests(names: &[&String], digest: &str) -> Vec<String> {
    let mut digests: Vec<String> = names
        .iter()
        .map(|n| {
            if n.contains('@') {
                n.to_string()
            } else {
                repo_digest(n, digest)
            }
        })
        .collect();
    digests.sort();
    digests.dedup();
    digests
}

/// Finds an image by id, name or `repo@digest`.
fn find(store: &Store, reference: &str) -> Result<Option<cri::Image>, CriError> {
    let refs = store
        .refs()
        .map_err(|e| CriError::Internal(format!("the image store: {e}")))?;
    let by_repo_digest = reference
        .split_once('@')
        .and_then(|(_, d)| refs.values().find(|v| v.to_string() == d).cloned());
    let digest = match by_repo_digest {
        Some(d) => d,
        None => match store.resolve(reference) {
            Ok((_, d)) => d,
            Err(StoreError::UnknownRef(_)) | Err(StoreError::AmbiguousRef(_)) => return Ok(None),
            Err(e) => return Err(CriError::Internal(format!("the image store: {e}"))),
        },
    };
    Ok(describe(store, &refs, &digest))
}

fn open(root: &Path) -> Result<Store, CriError> {
    Store::open(root)
        .map_err(|e| CriError::Internal(format!("the image store {}: {e}", root.display())))
}

/// Bytes and inodes under `root` (at most [`MAX_FS_WALK`] entries).
fn usage(root: &Path) -> (u64, u64) {
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            inodes += 1;
            if inodes > MAX_FS_WALK {
                return (bytes, inodes);
            }
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                bytes += m.len();
            }
        }
    }
    (bytes, inodes)
}

/// The ImageService.
#[derive(Debug, Clone)]
pub struct Images {
    pub server: Arc<Server>,
}

impl Images {
    /// Pulls `reference` (trying each endpoint) and converts it; the image id.
    fn pull(
        server: &Server,
        reference: &str,
        creds: Option<Credentials>,
    ) -> Result<String, CriError> {
        let store = open(&server.image_store)?;
        let mut errors = Vec::new();
        let mut pulled = None;
        for mut opts in endpoints(&server.cfg.registry, reference)? {
            opts.credentials = creds.clone();
            let from = opts
                .endpoint
                .clone()
                .unwrap_or_else(|| "its registry".into());
            match pull::pull(&store, reference, &opts) {
                Ok(p) => {
                    pulled = Some(p);
                    break;
                }
                Err(e) => errors.push(format!("from {from}: {e}")),
            }
        }
        let Some(p) = pulled else {
            let all = errors.join("; ");
            let m = clean_message(&format!("pulling {reference}: {all}"));
            return Err(
                if all.contains("HTTP 404") || all.contains("MANIFEST_UNKNOWN") {
                    CriError::NotFound(m)
                } else {
                    CriError::Unavailable(m)
                },
            );
        };
        // Converted now: the first container of the image starts without waiting.
        if let Err(e) = image::prepare(&server.image_store, &p.name, RootfsFrom::Auto) {
            return Err(CriError::InvalidArgument(clean_message(&format!(
                "image {reference} cannot be used: {e}"
            ))));
        }
        Ok(format!("sha256:{}", p.manifest.hex()))
    }
}

#[tonic::async_trait]
impl cri::image_service_server::ImageService for Images {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let filter = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|i| i.image)
            .filter(|i| !i.is_empty());
        let root = self.server.image_store.clone();
        let images = blocking(move || {
            let store = open(&root)?;
            if let Some(f) = filter {
                return Ok(find(&store, &f)?.into_iter().collect());
            }
            let refs = store
                .refs()
                .map_err(|e| CriError::Internal(format!("the image store: {e}")))?;
            let mut seen = std::collections::HashSet::new();
            Ok(refs
                .values()
                .filter(|d| seen.insert((*d).clone()))
                .filter_map(|d| describe(&store, &refs, d))
                .collect::<Vec<_>>())
        })
        .await?;
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let r = request.into_inner();
        let reference = r.image.map(|i| i.image).unwrap_or_default();
        if reference.is_empty() {
            return Err(Status::invalid_argument("image.image is required"));
        }
        let root = self.server.image_store.clone();
        let image = blocking(move || find(&open(&root)?, &reference)).await?;
        let mut info = HashMap::new();
        if r.verbose {
            if let Some(i) = &image {
                info.insert(
                    "info".to_owned(),
                    serde_json::json!({"id": i.id}).to_string(),
                );
            }
        }
        Ok(Response::new(cri::ImageStatusResponse { image, info }))
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let r = request.into_inner();
        let reference = r.image.map(|i| i.image).unwrap_or_default();
        if reference.is_empty() {
            return Err(Status::invalid_argument("image.image is required"));
        }
        let creds = credentials(r.auth.as_ref());
        let server = Arc::clone(&self.server);
        let t0 = std::time::Instant::now();
        let r2 = reference.clone();
        let id = blocking(move || Self::pull(&server, &r2, creds)).await?;
        tracing::info!(
            "pulled {reference} as {id} in {} ms",
            t0.elapsed().as_millis()
        );
        Ok(Response::new(cri::PullImageResponse { image_ref: id }))
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let reference = request
            .into_inner()
            .image
            .map(|i| i.image)
            .unwrap_or_default();
        if reference.is_empty() {
            return Err(Status::invalid_argument("image.image is required"));
        }
        let root = self.server.image_store.clone();
        blocking(move || {
            let store = open(&root)?;
            let Some(img) = find(&store, &reference)? else {
                return Ok(());
            };
            for name in &img.repo_tags {
                match store.remove_ref(name) {
                    Ok(_) | Err(StoreError::UnknownRef(_)) => {}
                    Err(e) => return Err(CriError::Internal(format!("removing {name}: {e}"))),
                }
            }
            // Refs made by digest pulls have no tag.
            let refs = store
                .refs()
                .map_err(|e| CriError::Internal(format!("the image store: {e}")))?;
            for (name, d) in &refs {
                if format!("sha256:{}", d.hex()) == img.id {
                    let _ = store.remove_ref(name);
                }
            }
            if let Err(e) = store.gc() {
                tracing::warn!("image store gc: {e}");
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let root = self.server.image_store.clone();
        let (bytes, inodes) = blocking(move || Ok(usage(&root))).await?;
        let fs = cri::FilesystemUsage {
            timestamp: now_ns(),
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: self.server.image_store.display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value { value: bytes }),
            inodes_used: Some(cri::UInt64Value { value: inodes }),
        };
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![fs],
            container_filesystems: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_come_first_then_the_registry_itself() {
        let mut reg = RegistryConfig::default();
        reg.mirrors.insert(
            "registry.k8s.io".into(),
            vec!["http://127.0.0.1:5000".into(), "https://m.example".into()],
        );
        reg.plain_http.push("127.0.0.1:5001".into());
        let e = endpoints(&reg, "registry.k8s.io/pause:3.9").unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].endpoint.as_deref(), Some("http://127.0.0.1:5000"));
        assert!(e[0].plain_http);
        assert_eq!(e[1].endpoint.as_deref(), Some("https://m.example"));
        assert!(!e[1].plain_http);
        assert_eq!((e[2].endpoint.as_deref(), e[2].plain_http), (None, false));
        let e = endpoints(&reg, "127.0.0.1:5001/a/b").unwrap();
        assert_eq!(e.len(), 1);
        assert!(e[0].plain_http);
        assert!(matches!(
            endpoints(&reg, "UPPER/case"),
            Err(CriError::InvalidArgument(_))
        ));
    }

    #[test]
    fn auth_configs_give_credentials() {
        let a = cri::AuthConfig {
            auth: "dXNlcjpwYXNz".into(), // user:pass
            ..Default::default()
        };
        assert_eq!(
            credentials(Some(&a)),
            Some(Credentials {
                username: "user".into(),
                password: "pass".into()
            })
        );
        let a = cri::AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        assert_eq!(credentials(Some(&a)).unwrap().basic(), "Basic dTpw");
        assert_eq!(credentials(None), None);
        assert_eq!(credentials(Some(&cri::AuthConfig::default())), None);
    }

    #[test]
    fn a_digest_pull_reports_the_digest_asked_for_and_a_tag_its_manifests() {
        let index = "registry.k8s.io/t/digest@sha256:9700f9a2f5bf2c45f2f605a0bd3bce7cf37420ec9d3ed50ac2758413308766bf".to_owned();
        let tag = "registry.k8s.io/t/digest:v1".to_owned();
        assert_eq!(
            repo_digests(&[&index], "sha256:ab"),
            std::slice::from_ref(&index)
        );
        assert_eq!(
            repo_digests(&[&tag, &index], "sha256:ab"),
            [
                index.clone(),
                "registry.k8s.io/t/digest@sha256:ab".to_owned()
            ]
        );
        assert_eq!(repo_digests(&[&tag, &tag], "sha256:ab").len(), 1);
    }
}
