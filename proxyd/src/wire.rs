//! HTTP/1.1 framing for the ingress: parse a head, decide how its body is delimited (RFC 9112
//! §6), and write the head for the next hop without its hop-by-hop headers. Bodies are carried
//! verbatim, so `Content-Length` and `Transfer-Encoding` stay; anything ambiguous is refused.

use std::io;
use std::time::Duration;

use http::StatusCode;

use crate::splice::{Buf, Pipe, Sink, Source};

/// The most header fields in one head.
pub const MAX_HEADERS: usize = 128;
/// Bodies smaller than this are copied through the buffer; larger ones are spliced.
const SPLICE_FROM: u64 = 64 * 1024;
/// The longest chunk-size or trailer line.
const MAX_LINE: usize = 8 * 1024;

/// How a message's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the sender closes (answers only).
    ToEnd,
}

/// A parsed request, ready for the workload.
#[derive(Debug)]
pub struct Request {
    /// The VM the path names.
    pub vm: String,
    /// The head to send to the workload: the path without the proxy prefix, one hop's headers
    /// removed.
    pub head: Vec<u8>,
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether it asks to switch protocols (WebSocket).
    pub upgrade: bool,
    /// Whether the client keeps the connection after the answer.
    pub keep_alive: bool,
    /// Whether it is a `HEAD` request (its answer has no body whatever it says).
    pub head_only: bool,
    /// The method.
    pub method: String,
    /// The W3C trace context it carries (`traceparent`, `tracestate`), sent on as is.
    pub trace: http::HeaderMap,
    /// The length of the head in the buffer.
    pub len: usize,
}

/// What an answer is read against: the parts of its request that decide how it ends.
#[derive(Clone, Copy, Debug)]
pub struct Asked {
    /// The request asked to switch protocols.
    pub upgrade: bool,
    /// It was a `HEAD`: the answer has no body whatever it says.
    pub head_only: bool,
    /// The client keeps its connection after the answer.
    pub keep_alive: bool,
}

impl Request {
    /// What its answer is read against.
    pub fn asked(&self) -> Asked {
        Asked {
            upgrade: self.upgrade,
            head_only: self.head_only,
            keep_alive: self.keep_alive,
        }
    }
}

/// A request proxyd answers itself.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The status to answer with.
    pub status: StatusCode,
    /// What is wrong, for a person.
    pub message: String,
    /// Whether the connection must close (the body's extent is unknown or unread).
    pub close: bool,
    /// The length of the refused head, to skip when the connection goes on.
    pub len: usize,
}

pub(crate) fn refuse(status: StatusCode, message: impl Into<String>, close: bool) -> Refusal {
    Refusal {
        status,
        message: message.into(),
        close,
        len: 0,
    }
}

/// A parsed answer, ready for the client.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The head to send to the client.
    pub head: Vec<u8>,
    /// How the body is delimited.
    pub framing: Framing,
    /// A 1xx other than 101: more heads follow.
    pub interim: bool,
    /// 101 to an upgrade request: the connection is the workload's from here on.
    pub switched: bool,
    /// Whether the connection to the workload may carry another request.
    pub reusable: bool,
    /// Whether the client connection closes after this answer.
    pub closes: bool,
    /// The length of the head in the buffer.
    pub len: usize,
}

/// The VM name and the workload's path (with the query) of an ingress request path.
pub fn split_path(path_and_query: &str) -> Option<(&str, String)> {
    let rest = path_and_query
        .strip_prefix("/api/v1/vms/")
        .or_else(|| path_and_query.strip_prefix("/vms/"))?;
    let (name, rest) = rest.split_once('/')?;
    let tail = rest.strip_prefix("proxy")?;
    let target = match tail.as_bytes().first() {
        None => "/".to_string(),
        Some(b'/') => tail.to_string(),
        Some(b'?') => format!("/{tail}"),
        Some(_) => return None,
    };
    Some((name, target))
}

/// The lower-cased tokens of every `Connection` field.
pub(crate) fn connection_tokens(headers: &[httparse::Header]) -> Vec<String> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether a field describes one hop only; with `upgrade`, `Upgrade` passes.
pub(crate) fn hop_by_hop(name: &str, tokens: &[String], upgrade: bool) -> bool {
    let n = name.to_ascii_lowercase();
    match n.as_str() {
        "connection"
        | "keep-alive"
        | "proxy-authorization"
        | "proxy-authenticate"
        | "proxy-connection"
        | "te"
        | "trailer" => true,
        "upgrade" => !upgrade,
        "content-length" | "transfer-encoding" => false,
        _ => tokens.contains(&n),
    }
}

/// The body framing the fields declare: `Err` names what is ambiguous.
pub(crate) fn framing(headers: &[httparse::Header]) -> Result<Option<Framing>, String> {
    let mut length: Option<u64> = None;
    let mut codings = Vec::new();
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            for v in h.value.split(|b| *b == b',') {
                let v = v.trim_ascii();
                let n = std::str::from_utf8(v)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or("Content-Length is not a number")?;
                if length.is_some_and(|l| l != n) {
                    return Err("Content-Length has conflicting values".into());
                }
                length = Some(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            codings.extend(
                h.value
                    .split(|b| *b == b',')
                    .map(|c| c.trim_ascii().to_ascii_lowercase()),
            );
        }
    }
    match (codings.is_empty(), length) {
        (true, None) => Ok(None),
        (true, Some(n)) => Ok(Some(Framing::Length(n))),
        (false, Some(_)) => Err("both Transfer-Encoding and Content-Length are set".into()),
        (false, None) if codings.last().is_some_and(|c| c == b"chunked") => {
            Ok(Some(Framing::Chunked))
        }
        (false, None) => Ok(Some(Framing::ToEnd)),
    }
}

pub(crate) fn push_fields(
    out: &mut Vec<u8>,
    headers: &[httparse::Header],
    tokens: &[String],
    upgrade: bool,
) {
    for h in headers {
        if !hop_by_hop(h.name, tokens, upgrade) {
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
    }
    if upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
}

/// A request head parsed by the rules both data planes share: framing unambiguous (no
/// `Content-Length` with `Transfer-Encoding`, no conflicting lengths, a final `chunked` the only
/// coding, none on HTTP/1.0).
pub(crate) struct Head<'h, 'b> {
    /// The method.
    pub method: &'b str,
    /// The request target as written.
    pub target: &'b str,
    /// The header fields.
    pub headers: &'h [httparse::Header<'b>],
    /// How the body is delimited.
    pub framing: Framing,
    /// The `Connection` tokens, lower case.
    pub tokens: Vec<String>,
    /// Whether the client keeps the connection after the answer.
    pub keep_alive: bool,
    /// The length of the head in the buffer.
    pub len: usize,
}

/// Parses a request head at the start of `buf` into `fields`: `Ok(None)` while it is
/// incomplete. Every refusal closes the connection.
pub(crate) fn head<'h, 'b>(
    buf: &'b [u8],
    fields: &'h mut [httparse::Header<'b>],
) -> Result<Option<Head<'h, 'b>>, Refusal> {
    let mut req = httparse::Request::new(fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("more than {MAX_HEADERS} header fields"),
                true,
            ));
        }
        Err(e) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("not an HTTP/1 request: {e}"),
                true,
            ));
        }
    };
    let version = req.version.unwrap_or_default();
    let headers: &'h [httparse::Header<'b>] = req.headers;
    let framing = match framing(headers) {
        Ok(Some(Framing::ToEnd)) => {
            return Err(refuse(
                StatusCode::NOT_IMPLEMENTED,
                "the only transfer coding accepted on requests is a final `chunked`",
                true,
            ));
        }
        Ok(f) => f.unwrap_or(Framing::None),
        Err(e) => return Err(refuse(StatusCode::BAD_REQUEST, e, true)),
    };
    if version == 0 && framing == Framing::Chunked {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "HTTP/1.0 has no chunked transfer coding",
            true,
        ));
    }
    let tokens = connection_tokens(headers);
    let keep_alive = if version == 0 {
        tokens.iter().any(|t| t == "keep-alive")
    } else {
        !tokens.iter().any(|t| t == "close")
    };
    Ok(Some(Head {
        method: req.method.unwrap_or_default(),
        target: req.path.unwrap_or_default(),
        headers,
        framing,
        tokens,
        keep_alive,
        len,
    }))
}

/// Parses an ingress request head at the start of `buf`: `Ok(None)` while it is incomplete.
pub fn parse_request(buf: &[u8], max_body: u64) -> Result<Option<Request>, Refusal> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Some(Head {
        method,
        target: path,
        headers,
        framing,
        tokens,
        keep_alive,
        len,
    }) = head(buf, &mut fields)?
    else {
        return Ok(None);
    };
    let unread = framing != Framing::None;
    if let Framing::Length(n) = framing
        && n > max_body
    {
        return Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {max_body} bytes"),
            true,
        ));
    }
    let Some((vm, target)) = split_path(path) else {
        return Err(Refusal {
            len,
            ..refuse(
                StatusCode::NOT_FOUND,
                "ingress paths are /api/v1/vms/{name}/proxy/{path...}",
                unread || !keep_alive,
            )
        });
    };
    let upgrade = tokens.iter().any(|t| t == "upgrade")
        && headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade"));
    let mut head = Vec::with_capacity(len + 64);
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    push_fields(&mut head, headers, &tokens, upgrade);
    head.extend_from_slice(b"\r\n");
    let mut trace = http::HeaderMap::new();
    for f in headers.iter() {
        for name in ["traceparent", "tracestate"] {
            if f.name.eq_ignore_ascii_case(name)
                && let Ok(v) = http::HeaderValue::from_bytes(f.value)
            {
                trace.insert(name, v);
            }
        }
    }
    Ok(Some(Request {
        vm: vm.to_string(),
        head,
        framing,
        upgrade,
        keep_alive,
        head_only: method == "HEAD",
        method: method.to_string(),
        trace,
        len,
    }))
}

/// Parses an answer head at the start of `buf` to `req`: `Ok(None)` while it is incomplete.
pub fn parse_answer(buf: &[u8], req: &Asked) -> Result<Option<Answer>, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut fields);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("the workload's answer is not HTTP/1: {e}")),
    };
    let code = res.code.unwrap_or_default();
    let headers = &*res.headers;
    let tokens = connection_tokens(headers);
    let switched = code == 101;
    if switched && !req.upgrade {
        return Err("the workload switched protocols unasked".into());
    }
    let interim = (100..200).contains(&code) && !switched;
    let framing = if interim || switched || req.head_only || code == 204 || code == 304 {
        Framing::None
    } else {
        framing(headers)?.unwrap_or(Framing::ToEnd)
    };
    let persistent = if res.version == Some(0) {
        tokens.iter().any(|t| t == "keep-alive")
    } else {
        !tokens.iter().any(|t| t == "close")
    };
    let reusable = persistent && framing != Framing::ToEnd && !switched;
    let closes = !interim && !switched && (!req.keep_alive || framing == Framing::ToEnd);
    let mut head = Vec::with_capacity(len + 32);
    head.extend_from_slice(format!("HTTP/1.1 {code} ").as_bytes());
    head.extend_from_slice(res.reason.unwrap_or_default().as_bytes());
    head.extend_from_slice(b"\r\n");
    push_fields(&mut head, headers, &tokens, switched);
    if closes {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
    Ok(Some(Answer {
        status: code,
        head,
        framing,
        interim,
        switched,
        reusable,
        closes,
        len,
    }))
}

/// An answer proxyd gives itself, in the API's error shape.
pub fn refusal(r: &Refusal) -> Vec<u8> {
    let body = crate::http::error_body(r.status, &r.message);
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{body}",
        r.status.as_u16(),
        r.status.canonical_reason().unwrap_or(""),
        body.len(),
        if r.close { "connection: close\r\n" } else { "" },
    )
    .into_bytes()
}

/// Carries a body of `framing` from `from` (with `buf` holding what was already read) to `to`.
/// A chunked body larger than `max` fails. Between two sockets large bodies are spliced through
/// `pipe` (made when first needed); anything else is copied through `buf`.
pub async fn carry(
    from: &mut impl Source,
    buf: &mut Buf,
    to: &mut impl Sink,
    framing: Framing,
    max: u64,
    pipe: &mut Option<Pipe>,
    idle: Duration,
) -> io::Result<()> {
    match framing {
        Framing::None => Ok(()),
        Framing::Length(n) => exact(from, buf, to, n, pipe, idle).await,
        Framing::Chunked => chunked(from, buf, to, max, idle).await,
        Framing::ToEnd => {
            if let (Some(f), Some(t)) = (from.socket(), to.socket()) {
                if !buf.is_empty() {
                    t.write_all(buf.bytes()).await?;
                    buf.consume(buf.bytes().len());
                }
                return spliced(pipe)?.to_end(f, t, idle).await.map(drop);
            }
            loop {
                if !buf.is_empty() {
                    to.write_all(buf.bytes()).await?;
                    buf.consume(buf.bytes().len());
                }
                match tokio::time::timeout(idle, buf.fill(from)).await {
                    Ok(Ok(0)) => break,
                    Ok(r) => r.map(drop)?,
                    Err(_) => return Err(idle_for(idle)),
                }
            }
            to.finish().await;
            Ok(())
        }
    }
}

fn spliced(pipe: &mut Option<Pipe>) -> io::Result<&Pipe> {
    if pipe.is_none() {
        *pipe = Some(Pipe::new()?);
    }
    Ok(pipe.as_ref().expect("just made"))
}

fn idle_for(idle: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("idle for {idle:?}"))
}

/// Reads more into `buf` within `idle`; the end of the stream is an error here.
async fn more(from: &mut impl Source, buf: &mut Buf, idle: Duration) -> io::Result<()> {
    match tokio::time::timeout(idle, buf.fill(from)).await {
        Ok(Ok(0)) => Err(io::ErrorKind::UnexpectedEof.into()),
        Ok(r) => r.map(drop),
        Err(_) => Err(idle_for(idle)),
    }
}

async fn exact(
    from: &mut impl Source,
    buf: &mut Buf,
    to: &mut impl Sink,
    mut n: u64,
    pipe: &mut Option<Pipe>,
    idle: Duration,
) -> io::Result<()> {
    loop {
        let k = (buf.bytes().len() as u64).min(n) as usize;
        if k > 0 {
            to.write_all(&buf.bytes()[..k]).await?;
            buf.consume(k);
            n -= k as u64;
        }
        if n == 0 {
            return Ok(());
        }
        if n >= SPLICE_FROM
            && let (Some(f), Some(t)) = (from.socket(), to.socket())
        {
            return spliced(pipe)?.exact(f, t, n, idle).await;
        }
        more(from, buf, idle).await?;
    }
}

/// One CRLF-terminated line at the start of `buf` (read until it is there), its length with
/// the CRLF.
async fn line(from: &mut impl Source, buf: &mut Buf, idle: Duration) -> io::Result<usize> {
    loop {
        if let Some(i) = buf.bytes().windows(2).position(|w| w == b"\r\n") {
            return Ok(i + 2);
        }
        if buf.bytes().len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a chunk line is too long",
            ));
        }
        more(from, buf, idle).await?;
    }
}

/// The size a chunk-size line announces (extensions ignored).
pub fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|b| *b == b';').next()?.trim_ascii();
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

async fn chunked(
    from: &mut impl Source,
    buf: &mut Buf,
    to: &mut impl Sink,
    max: u64,
    idle: Duration,
) -> io::Result<()> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut total = 0u64;
    loop {
        let n = line(from, buf, idle).await?;
        let size = chunk_size(&buf.bytes()[..n - 2]).ok_or_else(|| bad("bad chunk size"))?;
        to.write_all(&buf.bytes()[..n]).await?;
        buf.consume(n);
        if size == 0 {
            loop {
                let n = line(from, buf, idle).await?;
                to.write_all(&buf.bytes()[..n]).await?;
                buf.consume(n);
                if n == 2 {
                    return Ok(());
                }
            }
        }
        total += size;
        if total > max {
            return Err(bad("the body is larger than allowed"));
        }
        let mut left = size;
        while left > 0 {
            if buf.is_empty() {
                more(from, buf, idle).await?;
            }
            let k = (buf.bytes().len() as u64).min(left) as usize;
            to.write_all(&buf.bytes()[..k]).await?;
            buf.consume(k);
            left -= k as u64;
        }
        while buf.bytes().len() < 2 {
            more(from, buf, idle).await?;
        }
        if &buf.bytes()[..2] != b"\r\n" {
            return Err(bad("a chunk does not end with CRLF"));
        }
        to.write_all(b"\r\n").await?;
        buf.consume(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Result<Option<Request>, Refusal> {
        parse_request(text.as_bytes(), 1000)
    }

    #[test]
    fn a_request_loses_its_prefix_and_one_hop() {
        let r = req("POST /api/v1/vms/web/proxy/a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, x-secret\r\nX-Secret: 1\r\nProxy-Authorization: Basic eA==\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!(r.vm, "web");
        assert_eq!(
            String::from_utf8(r.head).unwrap(),
            "POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n"
        );
        assert_eq!(r.framing, Framing::Length(3));
        assert!(r.keep_alive && !r.upgrade);
        assert_eq!(r.len, 153);
    }

    #[test]
    fn partial_heads_wait() {
        assert!(req("GET /vms/a/proxy HTTP/1.1\r\nHost:").unwrap().is_none());
    }

    #[test]
    fn an_upgrade_keeps_its_fields() {
        let r = req(
            "GET /vms/a/proxy/ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(r.upgrade);
        assert_eq!(
            String::from_utf8(r.head).unwrap(),
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        );
    }

    #[test]
    fn ambiguous_requests_are_refused() {
        for (text, status) in [
            (
                "GET /vms/a/proxy HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (
                "GET /vms/a/proxy HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (
                "GET /vms/a/proxy HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
                400,
            ),
            (
                "GET /vms/a/proxy HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                501,
            ),
            (
                "GET /vms/a/proxy HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (
                "GET /vms/a/proxy HTTP/1.1\r\nContent-Length: 1001\r\n\r\n",
                413,
            ),
            ("GET /elsewhere HTTP/1.1\r\n\r\n", 404),
            ("GET /vms/a/proxy\x01 HTTP/1.1\r\n\r\n", 400),
        ] {
            let e = req(text).unwrap_err();
            assert_eq!(e.status.as_u16(), status, "{text:?}: {e:?}");
        }
        let not_found = req("GET /elsewhere HTTP/1.1\r\n\r\n").unwrap_err();
        assert!(!not_found.close, "a bodiless miss keeps the connection");
        assert_eq!(not_found.len, 27, "and is skipped");
        assert!(req("GET /vms/a/proxy HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n").is_ok());
    }

    #[test]
    fn answers_say_how_their_body_ends() {
        let get = req("GET /vms/a/proxy HTTP/1.1\r\n\r\n").unwrap().unwrap();
        let head = req("HEAD /vms/a/proxy HTTP/1.1\r\n\r\n").unwrap().unwrap();
        let a =
            |text: &str, r: &Request| parse_answer(text.as_bytes(), &r.asked()).unwrap().unwrap();
        let x = a(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nKeep-Alive: timeout=5\r\n\r\n",
            &get,
        );
        assert_eq!(x.framing, Framing::Length(5));
        assert!(x.reusable && !x.closes);
        assert_eq!(
            String::from_utf8(x.head).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        );
        let x = a("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", &head);
        assert_eq!(x.framing, Framing::None);
        let x = a("HTTP/1.0 200 OK\r\n\r\n", &get);
        assert_eq!(x.framing, Framing::ToEnd);
        assert!(!x.reusable && x.closes);
        assert!(
            String::from_utf8(x.head)
                .unwrap()
                .ends_with("connection: close\r\n\r\n")
        );
        let x = a("HTTP/1.1 100 Continue\r\n\r\n", &get);
        assert!(x.interim && !x.closes);
        let x = a(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            &get,
        );
        assert_eq!(x.framing, Framing::Chunked);
        assert!(parse_answer(b"HTTP/1.1 101 Switching\r\n\r\n", &get.asked()).is_err());
        assert!(
            parse_answer(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                &get.asked()
            )
            .is_err()
        );
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1f"), Some(31));
        assert_eq!(chunk_size(b"0;ext=1"), Some(0));
        for bad in [&b""[..], b"g", b"-1", b"ffffffffffffffff"] {
            assert_eq!(chunk_size(bad), None);
        }
    }
}
