//! Image references: `[registry[:port]/]repository[:tag][@sha256:...]`.

use std::fmt;

use super::digest::Digest;

pub const DEFAULT_REGISTRY: &str = "docker.io";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Host (and port) as written, `docker.io` when none was given.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid image reference {0:?}: {1}")]
pub struct ParseReferenceError(pub String, pub &'static str);

impl Reference {
    pub fn parse(s: &str) -> Result<Self, ParseReferenceError> {
        let bad = |why| ParseReferenceError(s.to_owned(), why);
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>().map_err(|_| bad("bad digest"))?)),
            None => (s, None),
        };
        // The registry is the first component if it looks like a host.
        let (registry, path) = match rest.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), path)
            }
            _ => (DEFAULT_REGISTRY.to_owned(), rest),
        };
        let (repo, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_owned())),
            _ => (path, None),
        };
        if repo.is_empty() {
            return Err(bad("empty repository"));
        }
        let repo_ok = repo.split('/').all(|c| {
            c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        });
        if !repo_ok {
            return Err(bad(
                "repository components must be lowercase [a-z0-9._-], starting alphanumeric",
            ));
        }
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !ok {
                return Err(bad("bad tag"));
            }
        }
        let repository = if registry == DEFAULT_REGISTRY && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo.to_owned()
        };
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What the registry's API calls this image: the digest if pinned, else the tag.
    pub fn api_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_owned(),
        }
    }

    /// The host to talk to (Docker Hub's API is not at docker.io).
    pub fn api_host(&self) -> &str {
        if self.registry == DEFAULT_REGISTRY {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_short_name_gets_docker_hub_library_and_latest() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(r.api_host(), "registry-1.docker.io");
    }

    #[test]
    fn reference_with_port_and_tag() {
        let r = Reference::parse("127.0.0.1:5000/test/app:v1").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "test/app");
        assert_eq!(r.tag.as_deref(), Some("v1"));
    }

    #[test]
    fn reference_with_digest_has_no_default_tag() {
        let d = Digest::of(b"x");
        let r = Reference::parse(&format!("localhost:5000/a@{d}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.api_reference(), d.to_string());
    }

    #[test]
    fn reference_rejects_uppercase_and_traversal() {
        assert!(Reference::parse("Foo/bar").is_err());
        assert!(Reference::parse("localhost/../x").is_err());
    }
}
