//! The streaming server: what the URLs returned by Exec, Attach and PortForward
//! lead to. kubelet (or crictl) connects to one with an HTTP/1.1 upgrade and then
//! speaks the Kubernetes stream protocols over it:
//!
//! - remotecommand (exec, attach) `v4.channel.k8s.io` over SPDY/3.1, where each of
//!   stdin, stdout, stderr, error and resize is a SPDY stream the client opens, and
//!   over WebSocket (`v4`/`v5.channel.k8s.io`), where each message starts with its
//!   channel's number;
//! - port-forward `portforward.k8s.io` over SPDY/3.1 (a data and an error stream
//!   per connection) and `v4.channel.k8s.io` over WebSocket (two channels per
//!   port).
//!
//! Layout: [`spdy`] and [`ws`] are the framings; [`session`] turns either into
//! the events and output of one remotecommand session; [`exec`] runs a process
//! of a container for such a session; [`portforward`] carries TCP connections to
//! the sandbox's guest; [`server`] is the HTTP side and the one-time URLs.
//!
//! There is no Rust library for these protocols; the framings are unit-tested
//! against byte captures of the Go implementation kubelet uses (spdystream) and
//! of RFC 6455's examples.

pub mod attach;
pub mod client;
pub mod exec;
pub mod portforward;
pub mod server;
pub mod session;
pub mod spdy;
pub mod ws;

use serde::Deserialize;

/// The channels of a remotecommand session, numbered as on a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Stdin = 0,
    Stdout = 1,
    Stderr = 2,
    Error = 3,
    Resize = 4,
}

impl Channel {
    pub fn from_number(n: u8) -> Option<Self> {
        Some(match n {
            0 => Channel::Stdin,
            1 => Channel::Stdout,
            2 => Channel::Stderr,
            3 => Channel::Error,
            4 => Channel::Resize,
            _ => return None,
        })
    }

    /// The `streamType` header of the SPDY stream that carries it.
    pub fn from_stream_type(t: &str) -> Option<Self> {
        Some(match t {
            "stdin" => Channel::Stdin,
            "stdout" => Channel::Stdout,
            "stderr" => Channel::Stderr,
            "error" => Channel::Error,
            "resize" => Channel::Resize,
            _ => return None,
        })
    }
}

/// A terminal size as the resize channel carries it: JSON objects, one after
/// the other (Go's `TerminalSize`; Go matches field names without case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct TerminalSize {
    #[serde(rename = "Width", alias = "width")]
    pub width: u16,
    #[serde(rename = "Height", alias = "height")]
    pub height: u16,
}

/// Splits the resize channel's bytes into sizes; bytes of an object still
/// incomplete are kept for the next call, garbage is dropped.
#[derive(Debug, Default)]
pub struct ResizeParser {
    pending: Vec<u8>,
}

impl ResizeParser {
    /// The most bytes kept while waiting for an object's end.
    const MAX_PENDING: usize = 4096;

    pub fn feed(&mut self, data: &[u8]) -> Vec<TerminalSize> {
        self.pending.extend_from_slice(data);
        let mut sizes = Vec::new();
        let mut it =
            serde_json::Deserializer::from_slice(&self.pending).into_iter::<TerminalSize>();
        let consumed = loop {
            match it.next() {
                Some(Ok(s)) => sizes.push(s),
                Some(Err(e)) if e.is_eof() => break it.byte_offset(),
                Some(Err(_)) => break self.pending.len(),
                None => break it.byte_offset(),
            }
        };
        self.pending.drain(..consumed.min(self.pending.len()));
        if self.pending.len() > Self::MAX_PENDING {
            self.pending.clear();
        }
        sizes
    }
}

/// How a command ended, as the error channel tells it (a Kubernetes
/// `metav1.Status`, JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0.
    Success,
    /// A non-zero exit status (128 + n for a signal).
    Exited(i32),
    /// The command could not run, or the session broke.
    Failed(String),
}

impl Outcome {
    pub fn status_json(&self) -> Vec<u8> {
        let v = match self {
            Outcome::Success => serde_json::json!({"metadata": {}, "status": "Success"}),
            Outcome::Exited(code) => serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: exit status {code}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            }),
            Outcome::Failed(m) => serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": m,
                "reason": "InternalError",
                "code": 500,
            }),
        };
        v.to_string().into_bytes()
    }

    /// The inverse, for clients: the exit code a status stands for, or the
    /// failure's message.
    pub fn from_status_json(b: &[u8]) -> Result<Outcome, String> {
        let v: serde_json::Value =
            serde_json::from_slice(b).map_err(|e| format!("a bad status: {e}"))?;
        match v["status"].as_str() {
            Some("Success") => Ok(Outcome::Success),
            Some("Failure") if v["reason"] == "NonZeroExitCode" => v["details"]["causes"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["reason"] == "ExitCode"))
                .and_then(|c| c["message"].as_str())
                .and_then(|m| m.parse().ok())
                .map(Outcome::Exited)
                .ok_or_else(|| "a NonZeroExitCode status without its code".to_owned()),
            Some("Failure") => Ok(Outcome::Failed(
                v["message"].as_str().unwrap_or("failed").to_owned(),
            )),
            _ => Err("a status that is neither Success nor Failure".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_objects_split_anywhere() {
        let mut p = ResizeParser::default();
        assert_eq!(p.feed(br#"{"Width":80,"He"#), vec![]);
        assert_eq!(
            p.feed(br#"ight":24}{"Width":100,"Height":50}"#),
            vec![
                TerminalSize {
                    width: 80,
                    height: 24
                },
                TerminalSize {
                    width: 100,
                    height: 50
                }
            ]
        );
        // Go's encoder ends each object with a newline.
        assert_eq!(
            p.feed(b"{\"width\":1,\"height\":2}\n"),
            vec![TerminalSize {
                width: 1,
                height: 2
            }]
        );
        // Garbage is dropped and the stream goes on.
        assert_eq!(p.feed(b"]]]"), vec![]);
        assert_eq!(p.feed(br#"{"Width":3,"Height":4}"#).len(), 1);
        // Out-of-range sizes are garbage too, not a panic.
        assert_eq!(p.feed(br#"{"Width":70000,"Height":4}"#), vec![]);
        assert_eq!(p.feed(br#"{"Width":5,"Height":6}"#).len(), 1);
        // An object that never ends is not kept forever.
        p.feed(b"{\"Width\":");
        p.feed(&vec![b' '; 8192]);
        assert!(p.pending.len() <= ResizeParser::MAX_PENDING);
    }

    #[test]
    fn statuses_are_what_client_go_decodes() {
        assert_eq!(
            String::from_utf8(Outcome::Success.status_json()).unwrap(),
            r#"{"metadata":{},"status":"Success"}"#
        );
        let s: serde_json::Value =
            serde_json::from_slice(&Outcome::Exited(3).status_json()).unwrap();
        assert_eq!(s["status"], "Failure");
        assert_eq!(s["reason"], "NonZeroExitCode");
        assert_eq!(s["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(s["details"]["causes"][0]["message"], "3");
        for o in [
            Outcome::Success,
            Outcome::Exited(137),
            Outcome::Failed("no".into()),
        ] {
            assert_eq!(Outcome::from_status_json(&o.status_json()), Ok(o));
        }
        assert!(Outcome::from_status_json(b"{}").is_err());
    }
}
