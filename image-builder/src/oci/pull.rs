//! Pulls an image from a registry (OCI distribution API) into the store.
//!
//! Manifests and indexes (linux/amd64 is chosen from an index), anonymous bearer
//! tokens when the registry asks (`WWW-Authenticate: Bearer realm=...`), blobs
//! streamed to `tmp/<hex>.partial` and verified before they enter the store, layers
//! fetched concurrently, interrupted downloads resumed with `Range`.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::digest::{Digest, HashingWriter};
use super::manifest::{self, ManifestError, Parsed, MAX_INDEX_DEPTH};
use super::reference::Reference;
use super::store::{Store, StoreError, MAX_JSON_BLOB};

/// Blobs downloaded at the same time.
pub const PARALLEL_BLOBS: usize = 3;

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("{url}: HTTP {status}{hint}")]
    Status {
        url: String,
        status: u16,
        hint: &'static str,
    },
    #[error("{url}: the registry asks for {scheme} authentication, which atoll-image does not do")]
    UnsupportedAuth { url: String, scheme: String },
    #[error("token from {url}: {what}")]
    Token { url: String, what: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("manifest {reference}: {size} bytes, more than {MAX_JSON_BLOB}")]
    ManifestTooLarge { reference: String, size: u64 },
    #[error("blob {digest}: {source}")]
    Io {
        digest: String,
        #[source]
        source: io::Error,
    },
}

fn http_err(url: &str) -> impl FnOnce(ureq::Error) -> PullError + '_ {
    move |e| PullError::Http {
        url: url.to_owned(),
        source: Box::new(e),
    }
}

/// Options of one pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Talk HTTP instead of HTTPS (local test registries).
    pub plain_http: bool,
    /// Fetch from this mirror (`http://127.0.0.1:5000`, scheme included) instead of
    /// the reference's registry; the image keeps its name.
    pub endpoint: Option<String>,
    /// Credentials for the registry: sent as Basic authentication when it asks for
    /// it, or to its token service when it asks for a bearer token.
    pub credentials: Option<Credentials>,
}

/// A user name and password (or token) for a registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The `Authorization` header value.
    pub fn basic(&self) -> String {
        use base64::Engine as _;
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// From a Docker config `auth` field (`base64(user:password)`).
    pub fn from_auth(auth: &str) -> Option<Self> {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (u, p) = raw.split_once(':')?;
        Some(Self {
            username: u.to_owned(),
            password: p.to_owned(),
        })
    }
}

/// A repository on a registry, with the bearer token once we have one.
struct Repo {
    agent: ureq::Agent,
    base: String,
    name: String,
    /// The `Authorization` header once the registry asked for one.
    token: Mutex<Option<String>>,
    credentials: Option<Credentials>,
}

/// The parameters of a `WWW-Authenticate` challenge.
fn parse_challenge(h: &str) -> (String, Vec<(String, String)>) {
    let (scheme, rest) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    let mut params = Vec::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let Some((k, v)) = s.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let v = v.trim_start();
        let (val, rest) = if let Some(q) = v.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match v.find(',') {
                Some(end) => (&v[..end], &v[end..]),
                None => (v, ""),
            }
        };
        params.push((k, val.to_owned()));
        s = rest.trim_start_matches([',', ' ']);
    }
    (scheme.to_ascii_lowercase(), params)
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Repo {
    fn new(r: &Reference, opts: &PullOptions) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(5)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("atoll-image/", env!("CARGO_PKG_VERSION")))
            .build();
        let scheme = if opts.plain_http { "http" } else { "https" };
        let base = match &opts.endpoint {
            Some(e) => format!("{}/v2/{}", e.trim_end_matches('/'), r.repository),
            None => format!("{scheme}://{}/v2/{}", r.api_host(), r.repository),
        };
        Self {
            agent: config.into(),
            base,
            name: r.repository.clone(),
            token: Mutex::new(None),
            credentials: opts.credentials.clone(),
        }
    }

    /// GET `url`, answering one bearer challenge if the registry sends it.
    fn get(
        &self,
        url: &str,
        headers: &[(&str, String)],
    ) -> Result<ureq::http::Response<ureq::Body>, PullError> {
        for attempt in 0..2 {
            let mut req = self.agent.get(url);
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            let token = self.token.lock().expect("token lock").clone();
            if let Some(t) = token {
                req = req.header("Authorization", t);
            }
            let resp = req.call().map_err(http_err(url))?;
            if resp.status().as_u16() != 401 || attempt == 1 {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            self.fetch_token(url, &challenge)?;
        }
        unreachable!("the loop returns on its second attempt")
    }

    fn fetch_token(&self, url: &str, challenge: &str) -> Result<(), PullError> {
        let (scheme, params) = parse_challenge(challenge);
        if scheme == "basic" {
            let Some(c) = &self.credentials else {
                return Err(PullError::Status {
                    url: url.to_owned(),
                    status: 401,
                    hint: " (the registry wants a user name and password)",
                });
            };
            *self.token.lock().expect("token lock") = Some(c.basic());
            return Ok(());
        }
        if scheme != "bearer" {
            return Err(PullError::UnsupportedAuth {
                url: url.to_owned(),
                scheme: if scheme.is_empty() {
                    "unspecified".into()
                } else {
                    scheme
                },
            });
        }
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let realm = get("realm").ok_or_else(|| PullError::Token {
            url: url.to_owned(),
            what: "challenge without realm".into(),
        })?;
        let scope = get("scope").unwrap_or_else(|| format!("repository:{}:pull", self.name));
        let mut turl = format!("{realm}?scope={}", urlencode(&scope));
        if let Some(s) = get("service") {
            turl.push_str(&format!("&service={}", urlencode(&s)));
        }
        let mut treq = self.agent.get(&turl);
        if let Some(c) = &self.credentials {
            treq = treq.header("Authorization", c.basic());
        }
        let mut resp = treq.call().map_err(http_err(&turl))?;
        if !resp.status().is_success() {
            return Err(PullError::Status {
                url: turl,
                status: resp.status().as_u16(),
                hint: " (token request refused)",
            });
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(http_err(&turl))?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| PullError::Token {
            url: turl.clone(),
            what: e.to_string(),
        })?;
        let token = v
            .get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| PullError::Token {
                url: turl.clone(),
                what: "no token in the answer".into(),
            })?;
        *self.token.lock().expect("token lock") = Some(format!("Bearer {token}"));
        Ok(())
    }

    fn manifest(&self, reference: &str) -> Result<Vec<u8>, PullError> {
        let url = format!("{}/manifests/{reference}", self.base);
        let mut resp = self.get(&url, &[("Accept", ACCEPT.to_owned())])?;
        check_status(&url, resp.status().as_u16())?;
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_JSON_BLOB + 1)
            .read_to_vec()
            .map_err(|_| PullError::ManifestTooLarge {
                reference: reference.to_owned(),
                size: MAX_JSON_BLOB + 1,
            })?;
        Ok(body)
    }

    /// Downloads one blob into the store, resuming a `.partial` left by an earlier
    /// run. Two processes pulling the same blob serialise on the partial file.
    fn blob(
        &self,
        store: &Store,
        d: &Digest,
        size: u64,
        progress: &Progress,
    ) -> Result<(), PullError> {
        if store.has_blob(d) {
            progress.done(d, size, "already in the store");
            return Ok(());
        }
        let io_err = |source| PullError::Io {
            digest: d.to_string(),
            source,
        };
        let path = store.partial_path(d);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        rustix::fs::flock(file.as_fd(), rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err(e.into()))?;
        if store.has_blob(d) {
            let _ = std::fs::remove_file(&path);
            progress.done(d, size, "fetched by another process");
            return Ok(());
        }
        let mut have = file.metadata().map_err(io_err)?.len();
        if have > size {
            file.set_len(0).map_err(io_err)?;
            have = 0;
        }
        let url = format!("{}/blobs/{d}", self.base);
        let mut headers = Vec::new();
        if have > 0 {
            headers.push(("Range", format!("bytes={have}-")));
        }
        let resp = self.get(&url, &headers)?;
        let status = resp.status().as_u16();
        check_status(&url, status)?;
        let mut w = HashingWriter::new(io::BufWriter::with_capacity(1 << 20, &mut file));
        if have > 0 && status == 206 {
            // Hash what we already have, then append.
            let mut prefix = w.get_mut_inner();
            prefix.seek(SeekFrom::Start(0)).map_err(io_err)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut left = have;
            while left > 0 {
                let n = prefix
                    .read(&mut buf[..left.min(1 << 20) as usize])
                    .map_err(io_err)?;
                if n == 0 {
                    break;
                }
                w.update_prefix(&buf[..n]);
                left -= n as u64;
                prefix = w.get_mut_inner();
            }
            w.get_mut_inner()
                .seek(SeekFrom::Start(have))
                .map_err(io_err)?;
            progress.resumed(d, have);
        } else {
            w.get_mut_inner().set_len(0).map_err(io_err)?;
            w.get_mut_inner().seek(SeekFrom::Start(0)).map_err(io_err)?;
            have = 0;
        }
        let bar = progress.bar(d, size, have);
        let mut body = resp
            .into_body()
            .into_with_config()
            .limit(size - have + 1)
            .reader();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = w.flush();
                    return Err(io_err(e));
                }
            };
            w.write_all(&buf[..n]).map_err(io_err)?;
            bar.inc(n as u64);
        }
        w.flush().map_err(io_err)?;
        let (_, actual, got) = w.finish();
        bar.finish_and_clear();
        if got != size || actual != *d {
            let _ = std::fs::remove_file(&path);
            return Err(if got != size {
                StoreError::SizeMismatch {
                    digest: d.clone(),
                    expected: size,
                    actual: got,
                }
            } else {
                StoreError::DigestMismatch {
                    expected: d.clone(),
                    actual,
                    size: got,
                }
            }
            .into());
        }
        store.publish_file(&path, d)?;
        progress.done(d, size, "verified");
        Ok(())
    }
}

fn check_status(url: &str, status: u16) -> Result<(), PullError> {
    match status {
        200..=299 => Ok(()),
        401 | 403 => Err(PullError::Status {
            url: url.to_owned(),
            status,
            hint: " (access denied: private image or bad credentials?)",
        }),
        404 => Err(PullError::Status {
            url: url.to_owned(),
            status,
            hint: " (no such image, tag or blob)",
        }),
        _ => Err(PullError::Status {
            url: url.to_owned(),
            status,
            hint: "",
        }),
    }
}

trait InnerMut {
    fn get_mut_inner(&mut self) -> &mut File;
}

impl InnerMut for HashingWriter<io::BufWriter<&mut File>> {
    fn get_mut_inner(&mut self) -> &mut File {
        // Callers only seek or read while the buffer is empty (before any write).
        self.inner_mut().get_mut()
    }
}

/// Progress bars on a terminal, one plain line per blob otherwise.
struct Progress {
    multi: Option<MultiProgress>,
}

impl Progress {
    fn new() -> Self {
        Self {
            multi: io::stderr().is_terminal().then(MultiProgress::new),
        }
    }

    fn bar(&self, d: &Digest, size: u64, have: u64) -> ProgressBar {
        match &self.multi {
            Some(m) => {
                let b = m.add(ProgressBar::new(size));
                b.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                    )
                    .expect("template")
                    .progress_chars("=> "),
                );
                b.set_prefix(d.hex()[..12].to_owned());
                b.set_position(have);
                b
            }
            None => ProgressBar::hidden(),
        }
    }

    fn line(&self, s: String) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(s);
            }
            None => eprintln!("{s}"),
        }
    }

    fn done(&self, d: &Digest, size: u64, how: &str) {
        self.line(format!(
            "atoll-image: blob {} ({size} bytes): {how}",
            &d.hex()[..12]
        ));
    }

    fn resumed(&self, d: &Digest, have: u64) {
        self.line(format!(
            "atoll-image: blob {}: resuming at byte {have}",
            &d.hex()[..12]
        ));
    }
}

/// What a pull recorded.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub name: String,
    pub manifest: Digest,
}

/// Pulls `reference` into `store` and records it under its normalised name.
pub fn pull(store: &Store, reference: &str, opts: &PullOptions) -> Result<Pulled, PullError> {
    let r = Reference::parse(reference).map_err(|e| PullError::Token {
        url: reference.to_owned(),
        what: e.to_string(),
    })?;
    let _lock = store.lock_shared()?;
    let repo = Repo::new(&r, opts);
    let progress = Progress::new();
    let mut want = r.api_reference();
    let mut expected: Option<Digest> = r.digest.clone();
    let mut seen = HashSet::new();
    for _ in 0..=MAX_INDEX_DEPTH {
        let data = repo.manifest(&want)?;
        let d = Digest::of(&data);
        if let Some(e) = &expected {
            if *e != d {
                return Err(StoreError::DigestMismatch {
                    expected: e.clone(),
                    actual: d,
                    size: data.len() as u64,
                }
                .into());
            }
        }
        if !seen.insert(d.clone()) {
            return Err(ManifestError::Loop(d.to_string()).into());
        }
        match manifest::parse(&d.to_string(), &data)? {
            Parsed::Index(idx) => {
                let sel = manifest::select_platform(&d.to_string(), &idx)?;
                let sd = Digest::try_from(sel.digest()).map_err(ManifestError::from)?;
                want = sd.to_string();
                expected = Some(sd);
            }
            Parsed::Manifest(m) => {
                let mut blobs = vec![(
                    Digest::try_from(m.config().digest()).map_err(ManifestError::from)?,
                    m.config().size(),
                )];
                for l in m.layers() {
                    blobs.push((
                        Digest::try_from(l.digest()).map_err(ManifestError::from)?,
                        l.size(),
                    ));
                }
                fetch_all(&repo, store, &blobs, &progress)?;
                store.put_blob(&data, Some(&d))?;
                let name = r.to_string();
                store.set_ref(&name, &d)?;
                return Ok(Pulled { name, manifest: d });
            }
        }
    }
    Err(ManifestError::Loop(reference.to_owned()).into())
}

/// Downloads `blobs` with up to [`PARALLEL_BLOBS`] at a time; the first error wins.
fn fetch_all(
    repo: &Repo,
    store: &Store,
    blobs: &[(Digest, u64)],
    progress: &Progress,
) -> Result<(), PullError> {
    let next = Mutex::new(0usize);
    let first_err: Mutex<Option<PullError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL_BLOBS.min(blobs.len()) {
            s.spawn(|| loop {
                if first_err.lock().expect("err lock").is_some() {
                    return;
                }
                let i = {
                    let mut n = next.lock().expect("next lock");
                    let i = *n;
                    *n += 1;
                    i
                };
                let Some((d, size)) = blobs.get(i) else {
                    return;
                };
                if let Err(e) = repo.blob(store, d, *size, progress) {
                    first_err.lock().expect("err lock").get_or_insert(e);
                    return;
                }
            });
        }
    });
    match first_err.into_inner().expect("err lock") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_challenge_reads_quoted_params() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(s, "bearer");
        assert_eq!(
            p[0],
            ("realm".into(), "https://auth.docker.io/token".into())
        );
        assert_eq!(
            p[2],
            ("scope".into(), "repository:library/busybox:pull".into())
        );
    }

    #[test]
    fn urlencode_escapes_scope_separators() {
        assert_eq!(
            urlencode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }
}
