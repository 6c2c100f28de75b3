//! Errors as the API answers them, `{"error": "...", "details": {...}}`, and extractors whose
//! rejections (malformed JSON, unknown fields, wrong types, oversized bodies, bad query strings)
//! are such errors with status 400, never a 500.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tonic::Code;
use utoipa::ToSchema;

/// The body of every error.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What is wrong and what to do.
    pub error: String,
    /// Machine-readable details: at least the gRPC `code` behind the answer.
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: String,
    details: serde_json::Value,
}

impl ApiError {
    /// An error with any status and code.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error: message.into(),
            details: json!({ "code": code }),
        }
    }

    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: message.into(),
            details: json!({ "code": "INVALID_ARGUMENT" }),
        }
    }

    /// A 404 with `message`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            error: message.into(),
            details: json!({ "code": "NOT_FOUND" }),
        }
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> ApiError {
        let status = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::ResourceExhausted | Code::Aborted => StatusCode::CONFLICT,
            Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = match s.code() {
            Code::Unavailable | Code::DeadlineExceeded => format!(
                "a Volant service did not answer ({}); check that it runs and retry",
                s.message()
            ),
            _ => s.message().to_string(),
        };
        ApiError {
            status,
            error: message,
            details: json!({ "code": code_name(s.code()) }),
        }
    }
}

/// The gRPC code's canonical name, e.g. `ALREADY_EXISTS`.
fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.error,
            details: self.details,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// Names the service behind a failed call in the error.
pub trait By<T> {
    /// Maps a gRPC error of `service` to the API's error.
    fn by(self, service: &str) -> Result<T, ApiError>;
}

impl<T> By<T> for Result<T, tonic::Status> {
    fn by(self, service: &str) -> Result<T, ApiError> {
        self.map_err(|s| match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                error: format!(
                    "{service} did not answer ({}); check that it runs and retry",
                    s.message()
                ),
                details: json!({ "code": code_name(s.code()), "service": service }),
            },
            _ => ApiError::from(s),
        })
    }
}

/// A JSON body whose rejections are 400s naming the problem.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // The whole body is read even when it is too large, up to a bound: answering before the
        // client has sent it all would reset the connection under the answer (RFC 9112 §9.6).
        let (parts, mut body) = req.into_parts();
        let mut kept = Vec::new();
        let mut seen = 0usize;
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            let Ok(frame) = frame else { break };
            if let Some(data) = frame.data_ref() {
                seen += data.len();
                if seen <= crate::router::BODY_LIMIT {
                    kept.extend_from_slice(data);
                } else if seen > DRAIN_LIMIT {
                    break;
                }
            }
        }
        if seen > crate::router::BODY_LIMIT {
            return Err(ApiError::bad_request(format!(
                "the request body is larger than {} KiB",
                crate::router::BODY_LIMIT / 1024
            )));
        }
        let req = Request::from_parts(parts, axum::body::Body::from(kept));
        let value = match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) => integral(v),
            Err(r) => return Err(json_rejection(r)),
        };
        serde_path_to_error::deserialize(value)
            .map(Body)
            .map_err(|e| {
                let at = e.path().to_string();
                let at = if at == "." {
                    String::new()
                } else {
                    format!("{at}: ")
                };
                ApiError::bad_request(format!("invalid request body: {at}{}", e.inner()))
            })
    }
}

/// `v` with every number that has no fraction as an integer: JSON has one number type, and
/// `2.0` is the integer 2 for JSON Schema (and for any client that writes it so).
fn integral(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            let whole = f.fract() == 0.0;
            if whole && (0.0..=u64::MAX as f64).contains(&f) && f < u64::MAX as f64 {
                Value::from(f as u64)
            } else if whole && f >= i64::MIN as f64 && f < 0.0 {
                Value::from(f as i64)
            } else {
                Value::Number(n)
            }
        }
        Value::Array(a) => Value::Array(a.into_iter().map(integral).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, integral(v))).collect()),
        other => other,
    }
}

/// How much of an oversized body is read and thrown away before the connection is given up.
const DRAIN_LIMIT: usize = 64 << 20;

/// Maps a JSON body rejection to a 400.
pub fn json_rejection(r: JsonRejection) -> ApiError {
    let text = r.body_text();
    let detail = text
        .strip_prefix("Failed to deserialize the JSON body into the target type: ")
        .or_else(|| text.strip_prefix("Failed to parse the request body as JSON: "))
        .unwrap_or(&text);
    ApiError::bad_request(match r {
        JsonRejection::JsonDataError(_) => format!("invalid request body: {detail}"),
        JsonRejection::JsonSyntaxError(_) => format!("malformed JSON: {detail}"),
        JsonRejection::MissingJsonContentType(_) => {
            "send the body as JSON, with Content-Type: application/json".into()
        }
        _ => format!("unreadable request body: {text}"),
    })
}

/// Query parameters whose rejections are 400s.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|r: QueryRejection| {
                ApiError::bad_request(format!("invalid query string: {}", r.body_text()))
            })
    }
}

/// Path parameters whose rejections are 400s.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|r: PathRejection| {
                ApiError::bad_request(format!("invalid path: {}", r.body_text()))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_the_documented_statuses() {
        let cases = [
            (Code::InvalidArgument, 400, "INVALID_ARGUMENT"),
            (Code::NotFound, 404, "NOT_FOUND"),
            (Code::AlreadyExists, 409, "ALREADY_EXISTS"),
            (Code::ResourceExhausted, 409, "RESOURCE_EXHAUSTED"),
            (Code::FailedPrecondition, 412, "FAILED_PRECONDITION"),
            (Code::Unavailable, 503, "UNAVAILABLE"),
            (Code::DeadlineExceeded, 503, "DEADLINE_EXCEEDED"),
            (Code::Internal, 500, "INTERNAL"),
        ];
        for (code, status, name) in cases {
            let e = ApiError::from(tonic::Status::new(code, "why"));
            assert_eq!(e.status.as_u16(), status, "{code:?}");
            assert_eq!(e.details["code"], name);
        }
    }

    #[test]
    fn whole_numbers_become_integers_and_nothing_else_changes() {
        use serde_json::json;
        let v = integral(json!({"a": 49.0, "b": [1.5, -2.0, 0.0], "c": 1e300, "d": "7.0", "e": 3}));
        assert_eq!(
            v,
            json!({"a": 49, "b": [1.5, -2, 0], "c": 1e300, "d": "7.0", "e": 3})
        );
        assert!(v["a"].is_u64() && v["b"][1].is_i64());
    }
}
