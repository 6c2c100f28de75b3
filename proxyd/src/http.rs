//! HTTP plumbing shared by both data planes: the body type and plain answers.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

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
