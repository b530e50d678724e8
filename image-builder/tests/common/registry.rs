//! A small registry of our own for what Debian's docker-registry cannot do simply:
//! anonymous bearer tokens, a connection cut mid-blob (resume), a corrupt blob.
//! Serves one repository from an OCI layout over HTTP/1.1 (one request per
//! connection).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default, Clone)]
pub struct ServerOpts {
    /// Require `Authorization: Bearer <token>`, handed out by `/token`.
    pub token: Option<String>,
    /// Cut the connection after this many bytes of this blob, the first time only.
    pub cut_blob_once: Option<(String, usize)>,
    /// Flip a byte in this blob every time it is served.
    pub corrupt_blob: Option<String>,
}

pub struct TestRegistry {
    pub addr: String,
    /// Request line and the headers we care about, one string per request.
    pub log: Arc<Mutex<Vec<String>>>,
}

struct Shared {
    layout: PathBuf,
    repo: String,
    addr: String,
    opts: ServerOpts,
    cut_done: AtomicBool,
    log: Arc<Mutex<Vec<String>>>,
}

impl TestRegistry {
    pub fn start(layout: PathBuf, repo: &str, opts: ServerOpts) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new(Shared {
            layout,
            repo: repo.to_owned(),
            addr: addr.clone(),
            opts,
            cut_done: AtomicBool::new(false),
            log: log.clone(),
        });
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let sh = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(&sh, s);
                });
            }
        });
        Self { addr, log }
    }

    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn respond(
    s: &mut TcpStream,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)
}

fn serve(sh: &Shared, mut s: TcpStream) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let _method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("").to_owned();
    let mut auth = None;
    let mut range = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((&h, ""));
        match k.to_ascii_lowercase().as_str() {
            "authorization" => auth = Some(v.trim().to_owned()),
            "range" => range = Some(v.trim().to_owned()),
            _ => {}
        }
    }
    sh.log.lock().unwrap().push(format!(
        "{target} auth={} range={}",
        auth.as_deref().unwrap_or("-"),
        range.as_deref().unwrap_or("-")
    ));
    if target.starts_with("/token") {
        return match &sh.opts.token {
            Some(t) => respond(
                &mut s,
                "200 OK",
                &[],
                format!("{{\"token\":\"{t}\"}}").as_bytes(),
            ),
            None => respond(&mut s, "404 Not Found", &[], b""),
        };
    }
    if let Some(t) = &sh.opts.token {
        if auth.as_deref() != Some(&format!("Bearer {t}")) {
            let ch = format!(
                "Bearer realm=\"http://{}/token\",service=\"atoll-test\",scope=\"repository:{}:pull\"",
                sh.addr, sh.repo
            );
            return respond(
                &mut s,
                "401 Unauthorized",
                &[("WWW-Authenticate".into(), ch)],
                b"",
            );
        }
    }
    if target == "/v2/" {
        return respond(&mut s, "200 OK", &[], b"{}");
    }
    let prefix = format!("/v2/{}/", sh.repo);
    let Some(rest) = target.strip_prefix(&prefix) else {
        return respond(&mut s, "404 Not Found", &[], b"");
    };
    let blob = |d: &str| {
        std::fs::read(
            sh.layout
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
    };
    if let Some(reference) = rest.strip_prefix("manifests/") {
        let idx: serde_json::Value =
            serde_json::from_slice(&std::fs::read(sh.layout.join("index.json"))?).unwrap();
        let desc = idx["manifests"].as_array().unwrap().iter().find(|m| {
            m["digest"] == reference
                || m["annotations"]["org.opencontainers.image.ref.name"] == reference
        });
        let (digest, mt) = match desc {
            Some(m) => (
                m["digest"].as_str().unwrap().to_owned(),
                m["mediaType"].as_str().unwrap().to_owned(),
            ),
            None if reference.starts_with("sha256:") => {
                let data = blob(reference)?;
                let v: serde_json::Value = serde_json::from_slice(&data).unwrap();
                (
                    reference.to_owned(),
                    v["mediaType"].as_str().unwrap_or("").to_owned(),
                )
            }
            None => return respond(&mut s, "404 Not Found", &[], b""),
        };
        let data = blob(&digest)?;
        return respond(&mut s, "200 OK", &[("Content-Type".into(), mt)], &data);
    }
    if let Some(d) = rest.strip_prefix("blobs/") {
        let Ok(mut data) = blob(d) else {
            return respond(&mut s, "404 Not Found", &[], b"");
        };
        if sh.opts.corrupt_blob.as_deref() == Some(d) {
            let n = data.len() / 2;
            data[n] ^= 0xff;
        }
        if let Some((cut, n)) = &sh.opts.cut_blob_once {
            if cut == d && !sh.cut_done.swap(true, Ordering::SeqCst) {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                    data.len()
                );
                s.write_all(head.as_bytes())?;
                s.write_all(&data[..*n])?;
                s.flush()?;
                return s.shutdown(std::net::Shutdown::Both);
            }
        }
        if let Some(from) = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|r| r.parse::<usize>().ok())
        {
            let total = data.len();
            let part = data[from.min(total)..].to_vec();
            return respond(
                &mut s,
                "206 Partial Content",
                &[(
                    "Content-Range".into(),
                    format!("bytes {from}-{}/{total}", total - 1),
                )],
                &part,
            );
        }
        return respond(&mut s, "200 OK", &[], &data);
    }
    let _ = r.read(&mut [0u8; 0]);
    respond(&mut s, "404 Not Found", &[], b"")
}
