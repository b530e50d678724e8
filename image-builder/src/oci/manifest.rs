//! Manifests and indexes: telling them apart, choosing linux/amd64, building an OCI
//! manifest for images that arrive without one (`docker save` archives).

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use super::digest::Digest;
use super::unpack::Compression;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Nested indexes deeper than this are refused (an index naming itself, directly or
/// through others, would otherwise be followed forever).
pub const MAX_INDEX_DEPTH: usize = 4;

pub const WANT_OS: &str = "linux";
pub const WANT_ARCH: &str = "amd64";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{digest}: not a JSON image manifest or index: {source}")]
    Json {
        digest: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}: neither an image manifest nor an index (no `layers` or `manifests`)")]
    Unknown(String),
    #[error("index {digest} has no linux/amd64 image (it has: {available})")]
    NoPlatform { digest: String, available: String },
    #[error("index {0} nests indexes deeper than {MAX_INDEX_DEPTH} levels or names itself")]
    Loop(String),
    #[error("descriptor has an invalid digest: {0}")]
    BadDigest(#[from] super::digest::ParseDigestError),
}

#[derive(Debug)]
pub enum Parsed {
    Manifest(Box<ImageManifest>),
    Index(Box<ImageIndex>),
}

/// Parses a manifest or an index by its shape (registries and layouts do not always
/// label them correctly).
pub fn parse(digest: &str, data: &[u8]) -> Result<Parsed, ManifestError> {
    let json_err = |source| ManifestError::Json {
        digest: digest.to_owned(),
        source,
    };
    let v: serde_json::Value = serde_json::from_slice(data).map_err(json_err)?;
    if v.get("manifests").is_some() {
        Ok(Parsed::Index(Box::new(
            serde_json::from_value(v).map_err(json_err)?,
        )))
    } else if v.get("layers").is_some() {
        Ok(Parsed::Manifest(Box::new(
            serde_json::from_value(v).map_err(json_err)?,
        )))
    } else {
        Err(ManifestError::Unknown(digest.to_owned()))
    }
}

/// The linux/amd64 entry of an index; an index with a single entry without platform
/// is taken as is.
pub fn select_platform<'a>(
    digest: &str,
    index: &'a ImageIndex,
) -> Result<&'a Descriptor, ManifestError> {
    let ms = index.manifests();
    let hit = ms.iter().find(|d| {
        d.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == WANT_OS && p.architecture().to_string() == WANT_ARCH
        })
    });
    if let Some(d) = hit {
        return Ok(d);
    }
    if ms.len() == 1 && ms[0].platform().is_none() {
        return Ok(&ms[0]);
    }
    let available = ms
        .iter()
        .map(|d| match d.platform() {
            Some(p) => format!("{}/{}", p.os(), p.architecture()),
            None => "unspecified".to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ");
    Err(ManifestError::NoPlatform {
        digest: digest.to_owned(),
        available,
    })
}

/// A layer as the synthesised manifest describes it.
#[derive(Debug, Clone)]
pub struct LayerInfo {
    pub digest: Digest,
    pub size: u64,
    pub compression: Compression,
}

pub fn layer_media_type(c: Compression) -> &'static str {
    c.media_type()
}

/// An OCI image manifest for a config and layers (bytes, canonical JSON).
pub fn build_manifest(config: &Digest, config_size: u64, layers: &[LayerInfo]) -> Vec<u8> {
    let layers: Vec<_> = layers
        .iter()
        .map(|l| {
            serde_json::json!({
                "mediaType": layer_media_type(l.compression),
                "digest": l.digest.to_string(),
                "size": l.size,
            })
        })
        .collect();
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.to_string(), "size": config_size},
        "layers": layers,
    });
    serde_json::to_vec(&m).expect("manifest serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_json(platforms: &[(&str, &str)]) -> Vec<u8> {
        let ms: Vec<_> = platforms
            .iter()
            .enumerate()
            .map(|(i, (os, arch))| {
                serde_json::json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": Digest::of(&[i as u8]).to_string(),
                    "size": 1,
                    "platform": {"os": os, "architecture": arch},
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": ms})).unwrap()
    }

    #[test]
    fn select_platform_picks_linux_amd64() {
        let data = index_json(&[("linux", "arm64"), ("linux", "amd64")]);
        let Parsed::Index(idx) = parse("i", &data).unwrap() else {
            panic!("not an index")
        };
        let d = select_platform("i", &idx).unwrap();
        assert_eq!(d.digest().to_string(), Digest::of(&[1]).to_string());
    }

    #[test]
    fn select_platform_without_amd64_lists_what_exists() {
        let data = index_json(&[("linux", "arm64")]);
        let Parsed::Index(idx) = parse("i", &data).unwrap() else {
            panic!("not an index")
        };
        let err = select_platform("i", &idx).unwrap_err().to_string();
        assert!(err.contains("linux/arm64"), "{err}");
    }

    #[test]
    fn parse_rejects_documents_that_are_neither() {
        assert!(matches!(
            parse("x", b"{\"schemaVersion\": 2}"),
            Err(ManifestError::Unknown(_))
        ));
    }
}
