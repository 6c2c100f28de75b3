//! What a guest asks its egress proxy, parsed strictly: `CONNECT host:port` (authority form) or
//! an absolute-form `http://` / `https://` request. A port is 1–5 digits from 1 to 65535; the
//! body's framing follows the ingress's rules (`Content-Length` with `Transfer-Encoding`,
//! conflicting lengths and HTTP/1.0 chunking are refused); no credentials in the URL, no
//! fragment, no body on a CONNECT. Pure: no I/O.

use http::StatusCode;

use crate::rules::Host;
use crate::wire::{self, Asked, Framing, MAX_HEADERS, Refusal, refuse};

/// How the guest wants to reach its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A tunnel (`CONNECT`).
    Connect,
    /// A request proxyd sends on over plain HTTP.
    Http,
    /// A request proxyd sends on over TLS it originates.
    Https,
}

/// A parsed egress request head.
#[derive(Debug)]
pub struct Ask {
    /// Tunnel or request.
    pub kind: Kind,
    /// The host as the guest wrote it (IPv6 literals in brackets).
    pub host: String,
    /// The port, given or the scheme's.
    pub port: u16,
    /// The method.
    pub method: String,
    /// The path and query to ask the upstream for.
    pub path: String,
    /// The header fields to send on: hop-by-hop fields and `Host` removed.
    pub fields: Vec<u8>,
    /// How the request's body is delimited.
    pub framing: Framing,
    /// What the answer is read against.
    pub asked: Asked,
    /// The length of the head.
    pub len: usize,
}

impl Ask {
    /// The head to send upstream for a request to `host`: origin form, its own `Host`, one
    /// request per upstream connection.
    pub fn upstream_head(&self, host: &Host) -> Vec<u8> {
        let default = if self.kind == Kind::Https { 443 } else { 80 };
        let name = match host {
            Host::Ip(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
            h => h.to_string(),
        };
        let authority = if self.port == default {
            name
        } else {
            format!("{name}:{}", self.port)
        };
        let mut head = Vec::with_capacity(self.fields.len() + 128);
        head.extend_from_slice(
            format!(
                "{} {} HTTP/1.1\r\nhost: {authority}\r\n",
                self.method, self.path
            )
            .as_bytes(),
        );
        head.extend_from_slice(&self.fields);
        head.extend_from_slice(b"connection: close\r\n\r\n");
        head
    }
}

fn bad(message: impl Into<String>) -> Refusal {
    refuse(StatusCode::BAD_REQUEST, message, true)
}

/// A port as a URL or a CONNECT target writes it: 1–5 digits, 1–65535.
fn port(text: &str) -> Result<u16, String> {
    let digits = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    match text.parse::<u32>() {
        Ok(p) if digits && (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(format!(
            "{text:?} is not a port: give 1–5 digits from 1 to 65535"
        )),
    }
}

/// Splits an authority `host[:port]` (no credentials); `default` is the scheme's port, `None`
/// when a port is required.
pub fn authority(text: &str, default: Option<u16>) -> Result<(String, u16), String> {
    if text.contains('@') {
        return Err("credentials in the target are refused".into());
    }
    let (host, port_text) = if text.starts_with('[') {
        let end = text
            .find(']')
            .ok_or_else(|| format!("{text:?}: an IPv6 literal lacks its ']'"))?;
        let rest = &text[end + 1..];
        let port = match rest.strip_prefix(':') {
            Some(p) => Some(p),
            None if rest.is_empty() => None,
            None => return Err(format!("{text:?} is not host:port")),
        };
        (&text[..=end], port)
    } else {
        match text.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    if host.is_empty() {
        return Err("the target names no host".into());
    }
    let port = match (port_text, default) {
        (Some(p), _) => port(p)?,
        (None, Some(d)) => d,
        (None, None) => return Err("CONNECT needs host:port".into()),
    };
    Ok((host.to_string(), port))
}

/// The kind, host, port and path of a request target.
fn target(method: &str, target: &str) -> Result<(Kind, String, u16, String), String> {
    if method == "CONNECT" {
        let (host, port) = authority(target, None)?;
        return Ok((Kind::Connect, host, port, String::new()));
    }
    let (scheme, rest) = target.split_once("://").ok_or(
        "send absolute-form requests (http://host/path) or CONNECT host:port through this proxy",
    )?;
    let (kind, default) = match scheme.to_ascii_lowercase().as_str() {
        "http" => (Kind::Http, 80),
        "https" => (Kind::Https, 443),
        other => {
            return Err(format!(
                "scheme {other:?} is not proxied; use http or https"
            ));
        }
    };
    if rest.contains('#') {
        return Err("a request target has no fragment".into());
    }
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (auth, path) = rest.split_at(split);
    let (host, port) = authority(auth, Some(default))?;
    let path = match path.as_bytes().first() {
        None => "/".to_string(),
        Some(b'?') => format!("/{path}"),
        Some(_) => path.to_string(),
    };
    Ok((kind, host, port, path))
}

/// Parses an egress request head at the start of `buf`: `Ok(None)` while it is incomplete.
/// Every refusal closes the connection.
pub fn parse(buf: &[u8]) -> Result<Option<Ask>, Refusal> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Some(wire::Head {
        method,
        target: raw_target,
        headers,
        framing,
        tokens,
        keep_alive,
        len,
    }) = wire::head(buf, &mut fields)?
    else {
        return Ok(None);
    };
    let (kind, host, port, path) = target(method, raw_target).map_err(bad)?;
    if kind == Kind::Connect && framing != Framing::None {
        return Err(bad("a CONNECT has no body"));
    }
    let kept: Vec<httparse::Header> = headers
        .iter()
        .filter(|h| !h.name.eq_ignore_ascii_case("host"))
        .copied()
        .collect();
    let mut forwarded = Vec::new();
    wire::push_fields(&mut forwarded, &kept, &tokens, false);
    Ok(Some(Ask {
        kind,
        host,
        port,
        method: method.to_string(),
        path,
        fields: forwarded,
        framing,
        asked: Asked {
            upgrade: false,
            head_only: method == "HEAD",
            keep_alive,
        },
        len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(text: &str) -> Result<Option<Ask>, Refusal> {
        parse(text.as_bytes())
    }

    #[test]
    fn targets() {
        let a = ask("CONNECT api.example.com:443 HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (a.kind, a.host.as_str(), a.port),
            (Kind::Connect, "api.example.com", 443)
        );
        let a = ask("CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((a.host.as_str(), a.port), ("[2001:db8::1]", 8443));
        let a = ask("GET HTTP://a.example?x=1 HTTP/1.1\r\nHost: evil\r\nX-A: 1\r\nProxy-Authorization: Basic eA==\r\nConnection: x-b\r\nX-B: 2\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (a.kind, a.host.as_str(), a.port, a.path.as_str()),
            (Kind::Http, "a.example", 80, "/?x=1")
        );
        assert_eq!(
            String::from_utf8(a.upstream_head(&Host::Name("a.example".into()))).unwrap(),
            "GET /?x=1 HTTP/1.1\r\nhost: a.example\r\nX-A: 1\r\nconnection: close\r\n\r\n"
        );
        let a = ask("POST https://[::1]:8443/p HTTP/1.1\r\ncontent-length: 2\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (a.kind, a.port, a.framing),
            (Kind::Https, 8443, Framing::Length(2))
        );
        assert!(
            String::from_utf8(a.upstream_head(&Host::Ip("::1".parse().unwrap())))
                .unwrap()
                .contains("host: [::1]:8443\r\n")
        );
        assert!(
            ask("GET http://a.example/ HTTP/1.1\r\nhost:")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn anything_ambiguous_is_refused() {
        for (text, status) in [
            ("CONNECT a.example:+443 HTTP/1.1\r\n\r\n", 400),
            ("CONNECT a.example:443x HTTP/1.1\r\n\r\n", 400),
            ("CONNECT a.example:000443 HTTP/1.1\r\n\r\n", 400),
            ("CONNECT a.example:0 HTTP/1.1\r\n\r\n", 400),
            ("CONNECT a.example:65536 HTTP/1.1\r\n\r\n", 400),
            ("CONNECT a.example: HTTP/1.1\r\n\r\n", 400),
            ("CONNECT a.example HTTP/1.1\r\n\r\n", 400),
            ("CONNECT :443 HTTP/1.1\r\n\r\n", 400),
            ("CONNECT [::1] HTTP/1.1\r\n\r\n", 400),
            ("CONNECT [::1]x:443 HTTP/1.1\r\n\r\n", 400),
            ("CONNECT a@a.example:443 HTTP/1.1\r\n\r\n", 400),
            (
                "CONNECT a.example:443 HTTP/1.1\r\ncontent-length: 1\r\n\r\nx",
                400,
            ),
            ("GET http://a.example:+80/ HTTP/1.1\r\n\r\n", 400),
            ("GET http://a.example:/ HTTP/1.1\r\n\r\n", 400),
            ("GET http://u:p@a.example/ HTTP/1.1\r\n\r\n", 400),
            ("GET http:///x HTTP/1.1\r\n\r\n", 400),
            ("GET http://a.example/#f HTTP/1.1\r\n\r\n", 400),
            ("GET /origin HTTP/1.1\r\n\r\n", 400),
            ("GET ftp://a.example/ HTTP/1.1\r\n\r\n", 400),
            ("GET * HTTP/1.1\r\n\r\n", 400),
            (
                "POST http://a.example/ HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
                400,
            ),
            (
                "POST http://a.example/ HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
                400,
            ),
            (
                "POST http://a.example/ HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
                400,
            ),
            (
                "POST http://a.example/ HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n",
                501,
            ),
            ("GET http://a.example/\x01 HTTP/1.1\r\n\r\n", 400),
        ] {
            let r = ask(text).unwrap_err();
            assert_eq!(r.status.as_u16(), status, "{text:?}: {r:?}");
            assert!(r.close, "{text:?}");
        }
    }
}
