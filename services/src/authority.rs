//! Unix-socket clients' `:authority`. Clients on gRPC's C core (Python's `grpcio`, Ruby, C++,
//! PHP, C#) send, over a Unix socket, the socket's path percent-encoded as `:authority`
//! (`run%2Fvolant%2Fipamd.sock`), which the HTTP/2 server refuses as malformed: it resets every
//! stream with PROTOCOL_ERROR. [`Authority`] sits between an accepted Unix connection and the
//! server and rewrites, in the header blocks the client sends, an `:authority` that is not a valid
//! authority to `localhost` (a Unix socket has no host), so that such clients work with their
//! defaults. Every other frame passes unchanged; header blocks are decoded as the client encoded
//! them and encoded anew for the server, since a rewritten block changes the compression state
//! the server decodes against. What the server sends is not touched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What an HTTP/2 client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame every HTTP/2 peer accepts.
const MAX_FRAME: usize = 16_384;
/// The largest header block held; a client sending a larger one is cut off.
const MAX_BLOCK: usize = 1 << 20;

/// A header block whose END_HEADERS has not arrived yet.
struct Pending {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// An accepted Unix connection as the HTTP/2 server reads it: see the module documentation.
pub struct Authority<S> {
    inner: S,
    /// Bytes from the client not yet handled (an incomplete frame).
    input: Vec<u8>,
    /// Bytes for the server, from `done` on.
    output: Vec<u8>,
    done: usize,
    /// `None` until the preface is judged; `Some(false)`: not HTTP/2, passed through as is.
    http2: Option<bool>,
    pending: Option<Pending>,
    decoder: fluke_hpack::Decoder<'static>,
    encoder: fluke_hpack::Encoder<'static>,
    eof: bool,
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from a client: {what}"),
    )
}

/// Whether `value` is an authority the server accepts.
fn valid(value: &[u8]) -> bool {
    std::str::from_utf8(value).is_ok_and(|s| s.parse::<http::uri::Authority>().is_ok())
}

impl<S> Authority<S> {
    /// Wraps an accepted connection.
    pub fn new(inner: S) -> Authority<S> {
        Authority {
            inner,
            input: Vec::new(),
            output: Vec::new(),
            done: 0,
            http2: None,
            pending: None,
            decoder: fluke_hpack::Decoder::new(),
            encoder: fluke_hpack::Encoder::new(),
            eof: false,
        }
    }

    /// Moves every complete frame of `input` to `output`, header blocks rewritten.
    fn process(&mut self) -> io::Result<()> {
        let mut at = 0;
        if self.http2.is_none() {
            let n = self.input.len().min(PREFACE.len());
            if self.input[..n] != PREFACE[..n] {
                self.http2 = Some(false);
            } else if n == PREFACE.len() {
                self.http2 = Some(true);
                self.output.extend_from_slice(PREFACE);
                at = n;
            } else {
                return Ok(());
            }
        }
        if self.http2 == Some(false) {
            self.output.append(&mut self.input);
            return Ok(());
        }
        while self.input.len() - at >= 9 {
            let head = &self.input[at..at + 9];
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            // A frame is held whole before it passes: a client may not make it hold more than
            // a header block's worth (the server accepts 16 KiB frames unless it says otherwise).
            if len > MAX_BLOCK {
                return Err(invalid("a frame larger than 1 MiB"));
            }
            if self.input.len() - at - 9 < len {
                break;
            }
            let payload = self.input[at + 9..at + 9 + len].to_vec();
            match kind {
                HEADERS => self.headers(stream, flags, &payload)?,
                CONTINUATION => {
                    let Some(p) = self.pending.as_mut().filter(|p| p.stream == stream) else {
                        return Err(invalid("CONTINUATION without its HEADERS"));
                    };
                    p.block.extend_from_slice(&payload);
                    if p.block.len() > MAX_BLOCK {
                        return Err(invalid("a header block larger than 1 MiB"));
                    }
                    if flags & END_HEADERS != 0 {
                        self.finish()?;
                    }
                }
                _ if self.pending.is_some() => {
                    return Err(invalid("a frame inside a header block"));
                }
                _ => self.output.extend_from_slice(&self.input[at..at + 9 + len]),
            }
            at += 9 + len;
        }
        self.input.drain(..at);
        Ok(())
    }

    /// A HEADERS frame: its padding and priority taken off, its block held until it is whole.
    fn headers(&mut self, stream: u32, flags: u8, payload: &[u8]) -> io::Result<()> {
        if self.pending.is_some() {
            return Err(invalid("HEADERS inside a header block"));
        }
        let mut p = payload;
        let mut pad = 0;
        if flags & PADDED != 0 {
            let (&n, rest) = p
                .split_first()
                .ok_or_else(|| invalid("a padded frame too short"))?;
            pad = usize::from(n);
            p = rest;
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            let bytes = p.get(..5).ok_or_else(|| invalid("a priority too short"))?;
            priority = Some(<[u8; 5]>::try_from(bytes).expect("five bytes"));
            p = &p[5..];
        }
        let fragment = p
            .get(
                ..p.len()
                    .checked_sub(pad)
                    .ok_or_else(|| invalid("padding too long"))?,
            )
            .unwrap_or_default();
        self.pending = Some(Pending {
            stream,
            flags,
            priority,
            block: fragment.to_vec(),
        });
        if flags & END_HEADERS != 0 {
            self.finish()?;
        }
        Ok(())
    }

    /// A whole header block: decoded, its `:authority` made valid, encoded for the server in a
    /// HEADERS frame and as many CONTINUATION frames as it needs.
    fn finish(&mut self) -> io::Result<()> {
        let p = self.pending.take().expect("a pending block");
        let mut fields = self
            .decoder
            .decode(&p.block)
            .map_err(|e| invalid(format!("a header block does not decode: {e:?}")))?;
        for (name, value) in &mut fields {
            if name == b":authority" && !valid(value) {
                *value = b"localhost".to_vec();
            }
        }
        let block = self
            .encoder
            .encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
        let room = MAX_FRAME - if p.priority.is_some() { 5 } else { 0 };
        let (first, rest) = block.split_at(block.len().min(room));
        let mut flags = p.flags & (END_STREAM | PRIORITY);
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        let prio = p.priority.as_ref().map_or(&[][..], |b| &b[..]);
        self.frame(HEADERS, flags, p.stream, &[prio, first]);
        let chunks: Vec<&[u8]> = rest.chunks(MAX_FRAME).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = if i + 1 == chunks.len() {
                END_HEADERS
            } else {
                0
            };
            self.frame(CONTINUATION, last, p.stream, &[chunk]);
        }
        Ok(())
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, parts: &[&[u8]]) {
        let len = parts.iter().map(|p| p.len()).sum::<usize>() as u32;
        self.output.extend_from_slice(&len.to_be_bytes()[1..]);
        self.output.extend_from_slice(&[kind, flags]);
        self.output.extend_from_slice(&stream.to_be_bytes());
        for p in parts {
            self.output.extend_from_slice(p);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Authority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.done < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.done);
                buf.put_slice(&this.output[this.done..this.done + n]);
                this.done += n;
                if this.done == this.output.len() {
                    this.output.clear();
                    this.done = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // The client is done: what is left of an incomplete frame goes as it is, for
                // the server to judge.
                this.eof = true;
                this.output.append(&mut this.input);
                continue;
            }
            this.input.extend_from_slice(read.filled());
            this.process()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Authority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Authority<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// What the server reads when the client writes `sent`, in pieces of `step` bytes.
    async fn through(sent: &[u8], step: usize) -> Vec<u8> {
        let (client, server) = tokio::io::duplex(1 << 20);
        let mut a = Authority::new(server);
        let sent = sent.to_vec();
        let writer = tokio::spawn(async move {
            let mut client = client;
            for piece in sent.chunks(step) {
                client.write_all(piece).await.unwrap();
            }
            client.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        a.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        got
    }

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    /// The fields of the header blocks in `bytes` (after the preface), decoded as the server
    /// would, with the frames' kinds and flags.
    fn blocks(bytes: &[u8]) -> Vec<(u8, u8, Fields)> {
        let mut d = fluke_hpack::Decoder::new();
        let mut at = PREFACE.len();
        let mut out = Vec::new();
        let mut block = Vec::new();
        while at < bytes.len() {
            let len = usize::from(bytes[at]) << 16
                | usize::from(bytes[at + 1]) << 8
                | usize::from(bytes[at + 2]);
            let (kind, flags) = (bytes[at + 3], bytes[at + 4]);
            let mut p = &bytes[at + 9..at + 9 + len];
            if kind == HEADERS && flags & PRIORITY != 0 {
                p = &p[5..];
            }
            if kind == HEADERS || kind == CONTINUATION {
                block.extend_from_slice(p);
                if flags & END_HEADERS != 0 {
                    out.push((kind, flags, d.decode(&block).unwrap()));
                    block.clear();
                }
            } else {
                out.push((kind, flags, vec![(b"payload".to_vec(), p.to_vec())]));
            }
            at += 9 + len;
        }
        out
    }

    #[tokio::test]
    async fn a_path_as_authority_becomes_localhost_and_nothing_else_changes() {
        let mut enc = fluke_hpack::Encoder::new();
        let req = |authority: &[u8]| {
            vec![
                (b":method".to_vec(), b"POST".to_vec()),
                (b":scheme".to_vec(), b"http".to_vec()),
                (b":path".to_vec(), b"/grpc.health.v1.Health/Check".to_vec()),
                (b":authority".to_vec(), authority.to_vec()),
                (b"te".to_vec(), b"trailers".to_vec()),
            ]
        };
        let enc_block = |enc: &mut fluke_hpack::Encoder, f: &[(Vec<u8>, Vec<u8>)]| {
            enc.encode(f.iter().map(|(n, v)| (&n[..], &v[..])))
        };
        let bad = req(b"run%2Fvolant%2Fipamd.sock");
        let good = req(b"localhost:50051");
        let b1 = enc_block(&mut enc, &bad);
        let b2 = enc_block(&mut enc, &good);
        let mut sent = PREFACE.to_vec();
        sent.extend(frame(0x4, 0, 0, &[0, 4, 0, 0, 0x10, 0]));
        // Padded, with a priority, split over a CONTINUATION.
        let mut p = vec![2];
        p.extend_from_slice(&[0, 0, 0, 0, 16]);
        p.extend_from_slice(&b1[..4]);
        p.extend_from_slice(&[0, 0]);
        sent.extend(frame(HEADERS, PADDED | PRIORITY, 1, &p));
        sent.extend(frame(CONTINUATION, END_HEADERS, 1, &b1[4..]));
        sent.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        sent.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &b2));
        for step in [1, 7, sent.len()] {
            let got = through(&sent, step).await;
            assert!(got.starts_with(PREFACE));
            let b = blocks(&got);
            assert_eq!(b.len(), 4, "{step}");
            assert_eq!(
                b[0].2,
                vec![(b"payload".to_vec(), vec![0, 4, 0, 0, 0x10, 0])]
            );
            let mut want = bad.clone();
            want[3].1 = b"localhost".to_vec();
            assert_eq!((b[1].0, b[1].1), (HEADERS, PRIORITY | END_HEADERS));
            assert_eq!(b[1].2, want);
            assert_eq!(b[2].2, vec![(b"payload".to_vec(), b"\0\0\0\0\0".to_vec())]);
            assert_eq!(b[3].1, END_HEADERS | END_STREAM);
            assert_eq!(b[3].2, good, "a valid authority stays");
        }
    }

    #[tokio::test]
    async fn a_large_block_is_split_and_what_is_not_http2_passes_as_it_is() {
        let mut enc = fluke_hpack::Encoder::new();
        let fields = [
            (b":authority".to_vec(), b"/a/b".to_vec()),
            (b"x-big".to_vec(), vec![b'a'; 40_000]),
        ];
        let block = enc.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut sent = PREFACE.to_vec();
        for (i, chunk) in block.chunks(MAX_FRAME).enumerate() {
            let last = if (i + 1) * MAX_FRAME >= block.len() {
                END_HEADERS
            } else {
                0
            };
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            sent.extend(frame(kind, last, 5, chunk));
        }
        let got = through(&sent, 1000).await;
        let b = blocks(&got);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].2[0].1, b"localhost");
        assert_eq!(b[0].2[1].1.len(), 40_000);
        // A frame announced larger than any block held is refused before it is read.
        let mut huge = PREFACE.to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0x0, 0, 0, 0, 0, 1]);
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut a = Authority::new(server);
        let mut client = client;
        client.write_all(&huge).await.unwrap();
        let mut got = Vec::new();
        let err = a.read_to_end(&mut got).await.unwrap_err();
        assert!(err.to_string().contains("larger than 1 MiB"), "{err}");
        let http1 = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        assert_eq!(through(http1, 3).await, http1);
    }
}
