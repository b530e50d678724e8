//! SPDY/3 framing as kubelet and client-go speak it after an `Upgrade: SPDY/3.1`
//! (exec, attach, port-forward): the frames, and the header blocks, which are
//! name/value lists compressed by one zlib stream per direction and connection,
//! primed with the protocol's dictionary.
//!
//! No flow control. The protocol's Go implementation (spdystream) neither sends
//! WINDOW_UPDATE nor honours it; back-pressure is TCP's. We read and ignore it.
//!
//! The peer is untrusted: every length is checked before anything is allocated,
//! frames above [`MAX_FRAME`] and header blocks that inflate past
//! [`MAX_HEADER_BLOCK`] are errors, and nothing here panics on input.

use std::io::{self, Read, Write};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The zlib dictionary of SPDY/3 header blocks (1423 bytes), from the protocol.
pub const DICTIONARY: &[u8] = include_bytes!("spdy3-dictionary.bin");
/// The protocol version in every control frame.
const VERSION: u16 = 3;
/// The largest frame accepted (the wire allows 16 MiB; no peer of ours sends
/// more than 32 KiB of data in one frame).
pub const MAX_FRAME: usize = 1 << 20;
/// The largest header block once inflated.
pub const MAX_HEADER_BLOCK: usize = 64 << 10;
/// The most name/value pairs in one block.
const MAX_HEADERS: usize = 128;
/// The largest data frame this side writes.
pub const MAX_DATA: usize = 32 << 10;

const FLAG_FIN: u8 = 0x01;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// RST_STREAM status codes used here.
pub const RST_PROTOCOL_ERROR: u32 = 1;
pub const RST_REFUSED_STREAM: u32 = 3;

/// A header block: lower-case names, each with its values (SPDY joins several
/// with NUL bytes).
pub type Headers = Vec<(String, Vec<String>)>;

/// The first value of header `name` (lower case).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.first())
        .map(String::as_str)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream: u32,
        fin: bool,
        data: Vec<u8>,
    },
    SynStream {
        stream: u32,
        associated: u32,
        fin: bool,
        headers: Headers,
    },
    SynReply {
        stream: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream: u32,
        status: u32,
    },
    Settings,
    Ping(u32),
    GoAway {
        last_good: u32,
        status: u32,
    },
    Headers {
        stream: u32,
        fin: bool,
        headers: Headers,
    },
    WindowUpdate {
        stream: u32,
        delta: u32,
    },
    /// A control frame type SPDY/3 does not define: ignored, as the protocol says.
    Unknown(u16),
}

#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("the peer speaks SPDY version {0}, not 3")]
    Version(u16),
    #[error("a frame of {0} bytes is larger than {MAX_FRAME}")]
    TooLarge(usize),
    #[error("a malformed {0} frame")]
    Malformed(&'static str),
    #[error("a bad header block: {0}")]
    HeaderBlock(String),
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads frames from one direction of a connection.
pub struct FrameReader<R> {
    input: R,
    inflate: Decompress,
}

impl<R: Read> FrameReader<R> {
    pub fn new(input: R) -> Self {
        Self {
            input,
            inflate: Decompress::new(true),
        }
    }

    /// The next frame; `Ok(None)` at a clean end of the connection (between
    /// frames).
    pub fn read(&mut self) -> Result<Option<Frame>, SpdyError> {
        let mut head = [0u8; 8];
        match self.input.read(&mut head[..1])? {
            0 => return Ok(None),
            _ => self.input.read_exact(&mut head[1..])?,
        }
        let flags = head[4];
        let len = (usize::from(head[5]) << 16) | (usize::from(head[6]) << 8) | usize::from(head[7]);
        if len > MAX_FRAME {
            return Err(SpdyError::TooLarge(len));
        }
        let mut body = vec![0u8; len];
        self.input.read_exact(&mut body)?;
        let fin = flags & FLAG_FIN != 0;
        if head[0] & 0x80 == 0 {
            return Ok(Some(Frame::Data {
                stream: be32(&head[..4]) & 0x7fff_ffff,
                fin,
                data: body,
            }));
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        if version != VERSION {
            return Err(SpdyError::Version(version));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let need = |n: usize, what: &'static str| {
            if body.len() < n {
                Err(SpdyError::Malformed(what))
            } else {
                Ok(())
            }
        };
        let frame = match kind {
            SYN_STREAM => {
                need(10, "SYN_STREAM")?;
                Frame::SynStream {
                    stream: be32(&body) & 0x7fff_ffff,
                    associated: be32(&body[4..]) & 0x7fff_ffff,
                    fin,
                    headers: self.headers(&body[10..])?,
                }
            }
            SYN_REPLY => {
                need(4, "SYN_REPLY")?;
                Frame::SynReply {
                    stream: be32(&body) & 0x7fff_ffff,
                    fin,
                    headers: self.headers(&body[4..])?,
                }
            }
            HEADERS => {
                need(4, "HEADERS")?;
                Frame::Headers {
                    stream: be32(&body) & 0x7fff_ffff,
                    fin,
                    headers: self.headers(&body[4..])?,
                }
            }
            RST_STREAM => {
                need(8, "RST_STREAM")?;
                Frame::RstStream {
                    stream: be32(&body) & 0x7fff_ffff,
                    status: be32(&body[4..]),
                }
            }
            SETTINGS => Frame::Settings,
            PING => {
                need(4, "PING")?;
                Frame::Ping(be32(&body))
            }
            GOAWAY => {
                need(4, "GOAWAY")?;
                Frame::GoAway {
                    last_good: be32(&body) & 0x7fff_ffff,
                    status: if body.len() >= 8 { be32(&body[4..]) } else { 0 },
                }
            }
            WINDOW_UPDATE => {
                need(8, "WINDOW_UPDATE")?;
                Frame::WindowUpdate {
                    stream: be32(&body) & 0x7fff_ffff,
                    delta: be32(&body[4..]) & 0x7fff_ffff,
                }
            }
            other => Frame::Unknown(other),
        };
        Ok(Some(frame))
    }

    /// Inflates one header block (the connection's zlib stream goes on from the
    /// previous block) and parses it.
    fn headers(&mut self, mut block: &[u8]) -> Result<Headers, SpdyError> {
        let bad = |m: String| SpdyError::HeaderBlock(m);
        let mut out: Vec<u8> = Vec::with_capacity(1024);
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(bad(format!("it inflates past {MAX_HEADER_BLOCK} bytes")));
                }
                out.reserve(out.len().min(MAX_HEADER_BLOCK - out.len()));
            }
            let (in0, out0) = (self.inflate.total_in(), out.len());
            let status = self
                .inflate
                .decompress_vec(block, &mut out, FlushDecompress::Sync);
            let used = usize::try_from(self.inflate.total_in() - in0).unwrap_or(usize::MAX);
            block = block.get(used..).unwrap_or(&[]);
            match status {
                Ok(Status::StreamEnd) => break,
                Ok(_) => {
                    let full = out.len() == out.capacity();
                    if block.is_empty() && !full {
                        break;
                    }
                    if used == 0 && out.len() == out0 && !full {
                        return Err(bad("the compressed data does not progress".into()));
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(DICTIONARY)
                        .map_err(|e| bad(format!("the peer's dictionary is not SPDY/3's: {e}")))?;
                }
                Err(e) => return Err(bad(e.to_string())),
            }
        }
        parse_block(&out)
    }
}

/// Parses an inflated name/value block: a count, then for each pair a length-
/// prefixed name and a length-prefixed value (values joined by NUL).
fn parse_block(b: &[u8]) -> Result<Headers, SpdyError> {
    let bad = |m: &str| SpdyError::HeaderBlock(m.to_owned());
    let mut at = 0usize;
    let mut next = |n: usize| -> Result<&[u8], SpdyError> {
        let end = at.checked_add(n).filter(|&e| e <= b.len());
        let end = end.ok_or_else(|| bad("it ends inside a field"))?;
        let s = &b[at..end];
        at = end;
        Ok(s)
    };
    let count = be32(next(4)?) as usize;
    if count > MAX_HEADERS {
        return Err(bad("it has too many headers"));
    }
    let mut headers = Headers::with_capacity(count);
    for _ in 0..count {
        let n = be32(next(4)?) as usize;
        let name = std::str::from_utf8(next(n)?).map_err(|_| bad("a name is not UTF-8"))?;
        if name.is_empty() {
            return Err(bad("a name is empty"));
        }
        let n = be32(next(4)?) as usize;
        let value = std::str::from_utf8(next(n)?).map_err(|_| bad("a value is not UTF-8"))?;
        headers.push((
            name.to_ascii_lowercase(),
            value.split('\0').map(str::to_owned).collect(),
        ));
    }
    Ok(headers)
}

/// Writes frames in one direction of a connection (one per connection: the
/// header compressor's state spans frames).
pub struct FrameWriter<W> {
    output: W,
    deflate: Compress,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(output: W) -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        // Cannot fail on a fresh stream.
        let _ = deflate.set_dictionary(DICTIONARY);
        Self { output, deflate }
    }

    pub fn get_ref(&self) -> &W {
        &self.output
    }

    /// DATA on `stream`; `fin` ends this side of it. `data` is cut into frames of
    /// at most [`MAX_DATA`].
    pub fn data(&mut self, stream: u32, data: &[u8], fin: bool) -> io::Result<()> {
        let mut chunks = data.chunks(MAX_DATA).peekable();
        if chunks.peek().is_none() {
            return self.raw(stream & 0x7fff_ffff, if fin { FLAG_FIN } else { 0 }, &[]);
        }
        while let Some(c) = chunks.next() {
            let last = chunks.peek().is_none();
            let flags = if fin && last { FLAG_FIN } else { 0 };
            self.raw(stream & 0x7fff_ffff, flags, c)?;
        }
        Ok(())
    }

    pub fn syn_reply(&mut self, stream: u32, headers: &Headers, fin: bool) -> io::Result<()> {
        let mut body = (stream & 0x7fff_ffff).to_be_bytes().to_vec();
        self.compress(headers, &mut body)?;
        self.control(SYN_REPLY, if fin { FLAG_FIN } else { 0 }, &body)
    }

    /// A SYN_STREAM (a client's, or a test's).
    pub fn syn_stream(&mut self, stream: u32, headers: &Headers, fin: bool) -> io::Result<()> {
        let mut body = (stream & 0x7fff_ffff).to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        self.compress(headers, &mut body)?;
        self.control(SYN_STREAM, if fin { FLAG_FIN } else { 0 }, &body)
    }

    pub fn rst_stream(&mut self, stream: u32, status: u32) -> io::Result<()> {
        let mut body = (stream & 0x7fff_ffff).to_be_bytes().to_vec();
        body.extend_from_slice(&status.to_be_bytes());
        self.control(RST_STREAM, 0, &body)
    }

    pub fn ping(&mut self, id: u32) -> io::Result<()> {
        self.control(PING, 0, &id.to_be_bytes())
    }

    pub fn goaway(&mut self, last_good: u32) -> io::Result<()> {
        let mut body = (last_good & 0x7fff_ffff).to_be_bytes().to_vec();
        body.extend_from_slice(&0u32.to_be_bytes());
        self.control(GOAWAY, 0, &body)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.output.flush()
    }

    fn control(&mut self, kind: u16, flags: u8, body: &[u8]) -> io::Result<()> {
        let first = 0x8000_0000u32 | (u32::from(VERSION) << 16) | u32::from(kind);
        self.raw(first, flags, body)
    }

    fn raw(&mut self, first: u32, flags: u8, body: &[u8]) -> io::Result<()> {
        let len = u32::try_from(body.len())
            .ok()
            .filter(|&l| l < 1 << 24)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
        let mut frame = Vec::with_capacity(8 + body.len());
        frame.extend_from_slice(&first.to_be_bytes());
        frame.extend_from_slice(&((u32::from(flags) << 24) | len).to_be_bytes());
        frame.extend_from_slice(body);
        self.output.write_all(&frame)
    }

    /// Appends `headers`, encoded and compressed (sync-flushed, so the peer can
    /// inflate this block before the next arrives), to `out`.
    fn compress(&mut self, headers: &Headers, out: &mut Vec<u8>) -> io::Result<()> {
        let mut plain = Vec::new();
        plain.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, values) in headers {
            let value = values.join("\0");
            plain.extend_from_slice(&(name.len() as u32).to_be_bytes());
            plain.extend_from_slice(name.to_ascii_lowercase().as_bytes());
            plain.extend_from_slice(&(value.len() as u32).to_be_bytes());
            plain.extend_from_slice(value.as_bytes());
        }
        let mut input = &plain[..];
        loop {
            out.reserve(input.len() + 64);
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(input, out, FlushCompress::Sync)
                .map_err(io::Error::other)?;
            let used = usize::try_from(self.deflate.total_in() - before).unwrap_or(0);
            input = &input[used.min(input.len())..];
            // Done when all input is in and the flush fitted (room left over).
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn h(pairs: &[(&str, &[&str])]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    /// Frames as the Go implementation kubelet and client-go use (spdystream's
    /// framer) writes them, in this order on one connection (header blocks share
    /// one zlib stream, so the later ones only inflate after the earlier).
    const CAPTURE: &[(&str, &str)] = &[
        ("syn1", "80030001000000290000000100000000000078f9e3c6a7c26260606004a7b392a2d4c45c6851c29a0a0a6800000000ffff"),
        ("syn3fin", "80030001010000250000000300000000000002651c4ca9e292944c7006acd02d29cf0797a20c4900000000ffff"),
        ("reply1", "800300020000000e000000016260606000000000ffff"),
        ("data3", "000000030000000668656c6c6f0a"),
        ("data3fin", "0000000301000000"),
        ("ping", "800300060000000400000007"),
        ("rst", "80030003000000080000000500000005"),
        ("goaway", "80030007000000080000000900000000"),
        ("window", "80030009000000080000000300001000"),
        ("settings", "800300040000000c000000010000000700010000"),
    ];

    #[test]
    fn the_dictionary_is_spdy3s() {
        assert_eq!(DICTIONARY.len(), 1423);
        assert!(DICTIONARY.starts_with(b"\0\0\0\x07options"));
        assert!(DICTIONARY.ends_with(b",*,enq=0."));
    }

    #[test]
    fn reads_a_go_peers_frames() {
        let bytes: Vec<u8> = CAPTURE.iter().flat_map(|(_, x)| unhex(x)).collect();
        let mut r = FrameReader::new(&bytes[..]);
        let mut frames = Vec::new();
        while let Some(f) = r.read().unwrap() {
            frames.push(f);
        }
        assert_eq!(
            frames,
            vec![
                Frame::SynStream {
                    stream: 1,
                    associated: 0,
                    fin: false,
                    headers: h(&[("streamtype", &["error"])]),
                },
                Frame::SynStream {
                    stream: 3,
                    associated: 0,
                    fin: true,
                    headers: h(&[("streamtype", &["stdin"]), ("x-two", &["a", "b"])]),
                },
                Frame::SynReply {
                    stream: 1,
                    fin: false,
                    headers: vec![],
                },
                Frame::Data {
                    stream: 3,
                    fin: false,
                    data: b"hello\n".to_vec(),
                },
                Frame::Data {
                    stream: 3,
                    fin: true,
                    data: vec![],
                },
                Frame::Ping(7),
                Frame::RstStream {
                    stream: 5,
                    status: 5
                },
                Frame::GoAway {
                    last_good: 9,
                    status: 0
                },
                Frame::WindowUpdate {
                    stream: 3,
                    delta: 4096
                },
                Frame::Settings,
            ]
        );
    }

    #[test]
    fn writes_what_a_go_peer_writes() {
        // Frames without a header block are byte-for-byte the Go framer's.
        let mut w = FrameWriter::new(Vec::new());
        w.data(3, b"hello\n", false).unwrap();
        w.data(3, b"", true).unwrap();
        w.ping(7).unwrap();
        w.rst_stream(5, 5).unwrap();
        let want: Vec<u8> = ["data3", "data3fin", "ping", "rst"]
            .iter()
            .flat_map(|n| unhex(CAPTURE.iter().find(|(k, _)| k == n).unwrap().1))
            .collect();
        assert_eq!(w.output, want);
        // The GOAWAY is the Go one with our status (OK, 0).
        let mut w = FrameWriter::new(Vec::new());
        w.goaway(9).unwrap();
        assert_eq!(w.output, unhex(CAPTURE[7].1));
    }

    #[test]
    fn header_blocks_round_trip_across_frames() {
        let mut w = FrameWriter::new(Vec::new());
        let first = h(&[("streamtype", &["stdout"]), ("port", &["8080"])]);
        let second = h(&[("streamtype", &["stderr"]), ("multi", &["x", "", "y"])]);
        w.syn_stream(1, &first, false).unwrap();
        w.syn_reply(1, &second, true).unwrap();
        w.syn_reply(3, &vec![], false).unwrap();
        let mut r = FrameReader::new(&w.output[..]);
        assert_eq!(
            r.read().unwrap(),
            Some(Frame::SynStream {
                stream: 1,
                associated: 0,
                fin: false,
                headers: first
            })
        );
        assert_eq!(
            r.read().unwrap(),
            Some(Frame::SynReply {
                stream: 1,
                fin: true,
                headers: second
            })
        );
        assert_eq!(
            r.read().unwrap(),
            Some(Frame::SynReply {
                stream: 3,
                fin: false,
                headers: vec![]
            })
        );
        assert_eq!(r.read().unwrap(), None);
    }

    #[test]
    fn large_data_is_cut_into_frames() {
        let mut w = FrameWriter::new(Vec::new());
        let data = vec![7u8; MAX_DATA * 2 + 5];
        w.data(1, &data, true).unwrap();
        let mut r = FrameReader::new(&w.output[..]);
        let mut got = Vec::new();
        let mut fins = Vec::new();
        while let Some(Frame::Data { data, fin, .. }) = r.read().unwrap() {
            got.extend(data);
            fins.push(fin);
        }
        assert_eq!(got, data);
        assert_eq!(fins, vec![false, false, true]);
    }

    #[test]
    fn hostile_frames_are_errors_not_panics() {
        // A frame claiming 16 MiB.
        let mut r = FrameReader::new(&[0u8, 0, 0, 1, 0, 0xff, 0xff, 0xff][..]);
        assert!(matches!(r.read(), Err(SpdyError::TooLarge(_))));
        // SPDY/2.
        let mut r = FrameReader::new(std::io::Cursor::new(unhex("800200060000000400000007")));
        assert!(matches!(r.read(), Err(SpdyError::Version(2))));
        // A PING too short.
        let mut r = FrameReader::new(std::io::Cursor::new(unhex("8003000600000002aaaa")));
        assert!(matches!(r.read(), Err(SpdyError::Malformed("PING"))));
        // A header block that is not zlib.
        let mut r = FrameReader::new(std::io::Cursor::new(unhex(
            "8003000200000008000000010102030405",
        )));
        assert!(r.read().is_err());
        // Cut inside a frame.
        let mut r = FrameReader::new(std::io::Cursor::new(unhex("80030006000000040000")));
        assert!(matches!(r.read(), Err(SpdyError::Io(_))));
        // A block whose count or lengths run past its end.
        assert!(parse_block(&[0, 0, 0, 1, 0, 0, 0, 9, b'a']).is_err());
        assert!(parse_block(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(parse_block(&[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]).is_err());
        // An inflation bomb: a block of zeros that inflates past the limit.
        let mut plain = vec![0u8; 4];
        plain[3] = 1;
        plain.extend_from_slice(&1u32.to_be_bytes());
        plain.push(b'a');
        plain.extend_from_slice(&(10u32 << 20).to_be_bytes());
        plain.extend(std::iter::repeat_n(b'x', 10 << 20));
        let mut z = Compress::new(Compression::best(), true);
        let mut block = Vec::with_capacity(64 << 10);
        z.compress_vec(&plain, &mut block, FlushCompress::Finish)
            .unwrap();
        let mut frame = unhex("80030002");
        frame.extend_from_slice(&((block.len() + 4) as u32).to_be_bytes());
        frame.extend_from_slice(&1u32.to_be_bytes());
        frame.extend_from_slice(&block);
        let mut r = FrameReader::new(&frame[..]);
        match r.read() {
            Err(SpdyError::HeaderBlock(m)) => assert!(m.contains("inflates past"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
