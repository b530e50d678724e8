//! Content digests (`sha256:<64 hex>`), a writer and a reader that hash what passes
//! through.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A validated `sha256:<hex>` digest. Other algorithms are refused: every blob in the
/// store is addressed by its sha256, and a digest string is also a file name, so it
/// must never contain anything but 64 lowercase hex digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
pub struct ParseDigestError(pub String);

impl Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(data))
    }

    fn from_hasher(h: Sha256) -> Self {
        Self {
            hex: hex::encode(h.finalize()),
        }
    }

    /// The 64 hex digits, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl FromStr for Digest {
    type Err = ParseDigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| ParseDigestError(s.to_owned()))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ParseDigestError(s.to_owned()));
        }
        Ok(Self {
            hex: hex.to_owned(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(feature = "oci-spec")]
impl TryFrom<&oci_spec::image::Digest> for Digest {
    type Error = ParseDigestError;
    fn try_from(d: &oci_spec::image::Digest) -> Result<Self, Self::Error> {
        d.to_string().parse()
    }
}

/// Hashes and counts the bytes written through it into `inner`.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// Continues from a prefix already written elsewhere (a resumed download).
    pub fn update_prefix(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn inner_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, Digest::from_hasher(self.hasher), self.len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Content whose sha256 is not the one it was announced with.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("content is {actual}, not {expected}")]
pub struct DigestMismatch {
    pub expected: Digest,
    pub actual: Digest,
}

impl DigestMismatch {
    /// The mismatch carried by `e`, if `e` is one (see [`VerifyingReader`]).
    pub fn from_io(e: &io::Error) -> Option<&DigestMismatch> {
        e.get_ref().and_then(|inner| inner.downcast_ref())
    }
}

/// Hashes the bytes read through it and, at the end of `inner`, compares their
/// digest with the expected one: a mismatch is an [`io::ErrorKind::InvalidData`]
/// error carrying a [`DigestMismatch`] instead of the end of the stream, so nothing
/// that reads to the end can mistake tampered content for good content.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Sha256,
    expected: Option<Digest>,
    len: u64,
}

impl<R: Read> VerifyingReader<R> {
    /// Checks against `expected`; `None` only hashes and counts.
    pub fn new(inner: R, expected: Option<Digest>) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            expected,
            len: 0,
        }
    }

    /// Bytes read so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            if let Some(expected) = self.expected.take() {
                let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
                if actual != expected {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        DigestMismatch { expected, actual },
                    ));
                }
            }
            return Ok(0);
        }
        let read = buf.get(..n).unwrap_or_default();
        self.hasher.update(read);
        self.len += read.len() as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_empty_is_known_value() {
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn digest_parse_rejects_path_tricks() {
        assert!("sha256:../../etc/passwd".parse::<Digest>().is_err());
        assert!("sha512:00".parse::<Digest>().is_err());
        let upper = format!("sha256:{}", "A".repeat(64));
        assert!(upper.parse::<Digest>().is_err());
    }

    #[test]
    fn hashing_writer_matches_digest_of() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let (buf, d, n) = w.finish();
        assert_eq!(n, 11);
        assert_eq!(d, Digest::of(&buf));
    }

    fn read_all(r: &mut impl Read) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        r.read_to_end(&mut out).map(|_| out)
    }

    #[test]
    fn verifying_reader_passes_matching_content_through() {
        let data = b"layer bytes".to_vec();
        let mut r = VerifyingReader::new(&data[..], Some(Digest::of(&data)));
        assert_eq!(read_all(&mut r).unwrap(), data);
        assert_eq!(r.len(), data.len() as u64);
        // The end stays the end once checked.
        assert_eq!(r.read(&mut [0u8; 4]).unwrap(), 0);
    }

    #[test]
    fn verifying_reader_mismatch_is_an_error_at_the_end() {
        let expected = Digest::of(b"what the manifest says");
        let mut r = VerifyingReader::new(&b"something else"[..], Some(expected.clone()));
        let e = read_all(&mut r).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let m = DigestMismatch::from_io(&e).expect("carries the mismatch");
        assert_eq!(m.expected, expected);
        assert_eq!(m.actual, Digest::of(b"something else"));
    }

    #[test]
    fn verifying_reader_without_digest_only_counts() {
        let mut r = VerifyingReader::new(&b"abc"[..], None);
        assert_eq!(read_all(&mut r).unwrap(), b"abc");
        assert_eq!(r.len(), 3);
    }
}
