//! The gateway's locks: a request-rate limit per client address, and API keys. Keys are
//! configured as SHA-256 hashes and a presented key is hashed and compared with every
//! configured hash in constant time; a key never appears in a URL, a log line or an error.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// The client address of a request (absent on a Unix socket: one client).
#[derive(Clone, Copy)]
pub struct Peer(pub Option<IpAddr>);

/// Clients tracked before idle ones are forgotten.
const CLIENTS: usize = 10_000;

/// The keys and the limit.
pub struct Doors {
    hashes: Vec<[u8; 32]>,
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<Option<IpAddr>, (f64, Instant)>>,
}

/// Parses the configured hashes (64 hex digits each).
fn parse_hash(h: &str) -> Result<[u8; 32], String> {
    let h = h.trim();
    let bytes: Option<Vec<u8>> = (h.len() == 64)
        .then(|| {
            (0..32)
                .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok())
                .collect()
        })
        .flatten();
    bytes
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| "gateway.api_key_hashes: each entry is the SHA-256 of a key, 64 hex digits (e.g. `printf %s KEY | sha256sum`)".to_string())
}

/// Whether `a` equals `b`, in time independent of where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Doors {
    /// From the gateway's config.
    pub fn new(hashes: &[String], rate: u32, burst: u32) -> Result<Doors, String> {
        Ok(Doors {
            hashes: hashes
                .iter()
                .map(|h| parse_hash(h))
                .collect::<Result<_, _>>()?,
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `token` is one of the keys (every hash is compared, whatever matches).
    fn admits(&self, token: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.hashes
            .iter()
            .fold(false, |ok, h| same(h, &presented) | ok)
    }

    /// Takes a token from the client's bucket.
    fn allow(&self, peer: Option<IpAddr>) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= CLIENTS {
            let (rate, burst) = (self.rate, self.burst);
            // Forget clients whose bucket has refilled: they lose nothing.
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = buckets.entry(peer).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The middleware: the rate limit for every request, the key for every endpoint but health.
pub async fn guard(State(doors): State<Arc<Doors>>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<Peer>().and_then(|p| p.0);
    if !doors.allow(peer) {
        let mut res = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RESOURCE_EXHAUSTED",
            "too many requests from this client; slow down and retry",
        )
        .into_response();
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return res;
    }
    if !doors.hashes.is_empty() && req.uri().path() != "/api/v1/health" {
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !token.is_some_and(|t| doors.admits(t)) {
            let mut res = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                "this endpoint needs a valid API key: send `Authorization: Bearer <key>`",
            )
            .into_response();
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return res;
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_by_hash() {
        // printf %s secret | sha256sum
        let h = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b".to_string();
        let d = Doors::new(&[h], 10, 10).unwrap();
        assert!(d.admits("secret"));
        assert!(!d.admits("Secret") && !d.admits("") && !d.admits("secret "));
        assert!(Doors::new(&["abc".into()], 1, 1).is_err());
        assert!(Doors::new(&["zz".repeat(32)], 1, 1).is_err());
    }

    #[test]
    fn a_client_over_its_burst_waits() {
        let d = Doors::new(&[], 1, 3).unwrap();
        let a = Some("10.0.0.1".parse().unwrap());
        assert!(d.allow(a) && d.allow(a) && d.allow(a));
        assert!(!d.allow(a));
        assert!(
            d.allow(Some("10.0.0.2".parse().unwrap())),
            "another client has its own bucket"
        );
    }
}
