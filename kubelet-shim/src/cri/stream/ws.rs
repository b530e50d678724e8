//! WebSocket (RFC 6455) over a blocking stream, split in a reading and a writing
//! half so that one thread can wait for the peer while others write: the frames
//! are tungstenite's codec; messages (fragments joined, control frames between
//! them) are assembled here, bounded by [`MAX_MESSAGE`].

use std::io::{self, Cursor, Read, Write};

use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::{CloseFrame, Frame, FrameHeader};

/// The largest message accepted (a stdin chunk or a resize event is far smaller).
pub const MAX_MESSAGE: usize = 1 << 20;
/// The largest message this side writes in one frame.
pub const MAX_WRITE: usize = 32 << 10;

/// The value of `Sec-WebSocket-Accept` for a request's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    tungstenite::handshake::derive_accept_key(key.trim().as_bytes())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Binary(Vec<u8>),
    Text(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close,
}

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("a WebSocket protocol error: {0}")]
    Protocol(String),
    #[error("a WebSocket message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
}

/// Reads messages. A server's reader requires masked frames (RFC 6455 5.1), a
/// client's unmasked ones.
pub struct WsReader<R> {
    input: R,
    from_client: bool,
    partial: Option<(bool, Vec<u8>)>,
}

impl<R: Read> WsReader<R> {
    pub fn new(input: R, from_client: bool) -> Self {
        Self {
            input,
            from_client,
            partial: None,
        }
    }

    /// The next message; `Ok(None)` when the connection ends between frames.
    pub fn read(&mut self) -> Result<Option<Message>, WsError> {
        loop {
            let Some((header, payload)) = self.frame()? else {
                return Ok(None);
            };
            let proto = |m: &str| Err(WsError::Protocol(m.to_owned()));
            match header.opcode {
                OpCode::Control(c) => {
                    if !header.is_final || payload.len() > 125 {
                        return proto("a fragmented or long control frame");
                    }
                    match c {
                        Control::Close => return Ok(Some(Message::Close)),
                        Control::Ping => return Ok(Some(Message::Ping(payload))),
                        Control::Pong => return Ok(Some(Message::Pong)),
                        Control::Reserved(_) => return proto("a reserved control opcode"),
                    }
                }
                OpCode::Data(Data::Continue) => {
                    let Some((_, buf)) = self.partial.as_mut() else {
                        return proto("a continuation frame outside a message");
                    };
                    if buf.len() + payload.len() > MAX_MESSAGE {
                        return Err(WsError::TooLarge);
                    }
                    buf.extend_from_slice(&payload);
                }
                OpCode::Data(d @ (Data::Text | Data::Binary)) => {
                    if self.partial.is_some() {
                        return proto("a new message inside a fragmented one");
                    }
                    self.partial = Some((d == Data::Text, payload));
                }
                OpCode::Data(Data::Reserved(_)) => return proto("a reserved data opcode"),
            }
            if header.is_final {
                if let Some((text, data)) = self.partial.take() {
                    return Ok(Some(if text {
                        Message::Text(data)
                    } else {
                        Message::Binary(data)
                    }));
                }
            }
        }
    }

    fn frame(&mut self) -> Result<Option<(FrameHeader, Vec<u8>)>, WsError> {
        let mut head = [0u8; 14];
        match self.input.read(&mut head[..1])? {
            0 => return Ok(None),
            _ => self.input.read_exact(&mut head[1..2])?,
        }
        let extra = match head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        } + if head[1] & 0x80 != 0 { 4 } else { 0 };
        self.input.read_exact(&mut head[2..2 + extra])?;
        let parsed = FrameHeader::parse(&mut Cursor::new(&head[..2 + extra]))
            .map_err(|e| WsError::Protocol(e.to_string()))?;
        let Some((header, len)) = parsed else {
            return Err(WsError::Protocol("a cut frame header".into()));
        };
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(WsError::Protocol(
                "reserved bits set (no extension was agreed)".into(),
            ));
        }
        if header.mask.is_some() != self.from_client {
            return Err(WsError::Protocol(if self.from_client {
                "a client frame without a mask".into()
            } else {
                "a server frame with a mask".into()
            }));
        }
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_MESSAGE)
            .ok_or(WsError::TooLarge)?;
        let mut payload = vec![0u8; len];
        self.input.read_exact(&mut payload)?;
        if let Some(mask) = header.mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        Ok(Some((header, payload)))
    }
}

/// Writes messages; a client's writer masks them.
pub struct WsWriter<W> {
    output: W,
    client: bool,
}

impl<W: Write> WsWriter<W> {
    pub fn new(output: W, client: bool) -> Self {
        Self { output, client }
    }

    pub fn get_ref(&self) -> &W {
        &self.output
    }

    /// `data` as binary messages of at most [`MAX_WRITE`] bytes each, every one
    /// starting with `prefix` (a channel number).
    pub fn binary(&mut self, prefix: &[u8], data: &[u8]) -> io::Result<()> {
        let mut chunks = data.chunks(MAX_WRITE - prefix.len()).peekable();
        if chunks.peek().is_none() {
            return self.message(prefix.to_vec());
        }
        for c in chunks {
            let mut m = Vec::with_capacity(prefix.len() + c.len());
            m.extend_from_slice(prefix);
            m.extend_from_slice(c);
            self.message(m)?;
        }
        Ok(())
    }

    pub fn pong(&mut self, data: Vec<u8>) -> io::Result<()> {
        self.send(Frame::pong(data))
    }

    pub fn close(&mut self, reason: &str) -> io::Result<()> {
        self.send(Frame::close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: reason.chars().take(100).collect::<String>().into(),
        })))
    }

    fn message(&mut self, m: Vec<u8>) -> io::Result<()> {
        self.send(Frame::message(m, OpCode::Data(Data::Binary), true))
    }

    fn send(&mut self, mut frame: Frame) -> io::Result<()> {
        if self.client {
            let mut mask = [0u8; 4];
            crate::pod::getrandom(&mut mask)?;
            frame.header_mut().mask = Some(mask);
        }
        let mut buf = Vec::with_capacity(frame.len());
        frame.format(&mut buf).map_err(io::Error::other)?;
        self.output.write_all(&buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handshake_key_of_rfc_6455() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn reads_the_examples_of_rfc_6455() {
        // 5.7: a masked "Hello" from a client, and a masked Pong.
        let mut r = WsReader::new(
            &[
                0x81u8, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58, 0x8a, 0x85,
                0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
            ][..],
            true,
        );
        assert_eq!(r.read().unwrap(), Some(Message::Text(b"Hello".to_vec())));
        assert_eq!(r.read().unwrap(), Some(Message::Pong));
        assert_eq!(r.read().unwrap(), None);
        // 5.7: a fragmented unmasked "Hel" + "lo", with an unmasked Ping between,
        // from a server; then 256 bytes with a 16-bit length.
        let mut bytes = vec![0x01u8, 0x03, 0x48, 0x65, 0x6c];
        bytes.extend([0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        bytes.extend([0x80, 0x02, 0x6c, 0x6f]);
        bytes.extend([0x82, 0x7e, 0x01, 0x00]);
        bytes.extend([9u8; 256]);
        let mut r = WsReader::new(&bytes[..], false);
        assert_eq!(r.read().unwrap(), Some(Message::Ping(b"Hello".to_vec())));
        assert_eq!(r.read().unwrap(), Some(Message::Text(b"Hello".to_vec())));
        assert_eq!(r.read().unwrap(), Some(Message::Binary(vec![9u8; 256])));
    }

    #[test]
    fn writes_the_examples_of_rfc_6455() {
        let mut w = WsWriter::new(Vec::new(), false);
        w.binary(&[], &[9u8; 256]).unwrap();
        let mut want = vec![0x82u8, 0x7e, 0x01, 0x00];
        want.extend([9u8; 256]);
        assert_eq!(w.output, want);
        let mut w = WsWriter::new(Vec::new(), false);
        w.binary(&[1], &vec![5u8; 65535]).unwrap();
        // 65535 bytes + a channel byte each: two frames, the first 32 KiB long.
        assert_eq!(&w.output[..4], &[0x82, 0x7e, 0x80, 0x00]);
        assert_eq!(w.output[4], 1);
    }

    #[test]
    fn a_client_writer_masks_and_a_server_reader_unmasks() {
        let mut w = WsWriter::new(Vec::new(), true);
        w.binary(&[0], b"echo hi\n").unwrap();
        w.close("bye").unwrap();
        assert_ne!(w.output[1] & 0x80, 0);
        let mut r = WsReader::new(&w.output[..], true);
        assert_eq!(
            r.read().unwrap(),
            Some(Message::Binary(b"\0echo hi\n".to_vec()))
        );
        assert_eq!(r.read().unwrap(), Some(Message::Close));
    }

    #[test]
    fn hostile_frames_are_errors() {
        // Unmasked from a client.
        let mut r = WsReader::new(&[0x82u8, 0x01, 0x00][..], true);
        assert!(matches!(r.read(), Err(WsError::Protocol(_))));
        // A length of 2^63.
        let mut r = WsReader::new(
            &[
                0x82u8, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4,
            ][..],
            true,
        );
        assert!(matches!(
            r.read(),
            Err(WsError::TooLarge) | Err(WsError::Protocol(_))
        ));
        // A continuation without a start; a long ping; reserved bits.
        let mut r = WsReader::new(&[0x80u8, 0x00][..], false);
        assert!(r.read().is_err());
        let mut ping = vec![0x89u8, 126, 0, 200];
        ping.extend([0u8; 200]);
        assert!(WsReader::new(&ping[..], false).read().is_err());
        assert!(WsReader::new(&[0xc2u8, 0x00][..], false).read().is_err());
        // Fragments adding up past the limit.
        let mut big = Vec::new();
        let chunk = 600 << 10;
        for (i, op) in [0x02u8, 0x80].iter().enumerate() {
            let _ = i;
            big.push(*op);
            big.push(127);
            big.extend((chunk as u64).to_be_bytes());
            big.extend(vec![0u8; chunk]);
        }
        assert!(matches!(
            WsReader::new(&big[..], false).read(),
            Err(WsError::TooLarge)
        ));
        // Cut short.
        assert!(matches!(
            WsReader::new(&[0x82u8, 0x05, 1][..], false).read(),
            Err(WsError::Io(_))
        ));
    }
}
