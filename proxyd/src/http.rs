//! HTTP plumbing shared by both data planes: the body type, plain answers, and byte pipes with
//! limits.

use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Any error a body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every request and answer proxyd sends.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// Boxes a hyper body.
pub fn boxed<B>(b: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed()
}

/// An answer proxyd gives itself, in the API's error shape (`{"error": message, "details":
/// {"code": …}}`).
pub fn error(status: StatusCode, details: impl Into<String>) -> Response<Body> {
    let body = error_body(status, &details.into());
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .expect("a valid response")
}

/// The JSON of an error answer: `{"error": message, "details": {"code": …}}`.
pub fn error_body(status: StatusCode, message: &str) -> String {
    let code = status
        .canonical_reason()
        .unwrap_or("ERROR")
        .to_ascii_uppercase()
        .replace(' ', "_");
    serde_json::json!({ "error": message, "details": { "code": code } }).to_string()
}

/// What a pipe does with each chunk it carries: count it, and say how long to wait before the
/// next read (a byte budget).
pub trait Meter: Send + Sync {
    /// `n` bytes went the way `outbound` says; returns the pause owed.
    fn carried(&self, outbound: bool, n: usize) -> Duration;
}

/// Carries bytes both ways between `a` (the guest side) and `b` until both sides have finished,
/// a side is idle for `idle`, or `total` passes. Returns the bytes carried (a→b, b→a).
pub async fn pipe<A, B>(
    a: A,
    b: B,
    idle: Duration,
    total: Duration,
    meter: &dyn Meter,
) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let both = async {
        tokio::try_join!(
            copy(&mut ar, &mut bw, idle, meter, true),
            copy(&mut br, &mut aw, idle, meter, false)
        )
    };
    match tokio::time::timeout(total, both).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the connection lived longer than {total:?}"),
        )),
    }
}

async fn copy<R, W>(
    r: &mut R,
    w: &mut W,
    idle: Duration,
    meter: &dyn Meter,
    outbound: bool,
) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0u64;
    loop {
        let n = match tokio::time::timeout(idle, r.read(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("idle for {idle:?}"),
                ));
            }
        };
        if n == 0 {
            w.shutdown().await?;
            return Ok(done);
        }
        w.write_all(&buf[..n]).await?;
        done += n as u64;
        let pause = meter.carried(outbound, n);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}
