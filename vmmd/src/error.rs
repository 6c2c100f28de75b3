//! vmmd's errors in its own terms. They become gRPC statuses only at its edge
//! ([`crate::grpc`]) and are made from its peers' statuses only where it calls them
//! ([`crate::peers`]).

use std::fmt;

/// What kind of failure: decides the caller's answer and whether a create is undone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The request is wrong.
    Invalid,
    /// What it names does not exist.
    NotFound,
    /// What it would make exists already.
    Exists,
    /// The state of things does not allow it now.
    Precondition,
    /// A limit is reached (a pool, the uids).
    Exhausted,
    /// A peer (or vmmd) cannot serve now; retrying may succeed.
    Unavailable,
    /// A bug or a failure of the host.
    Internal,
}

/// A failure with a message a person can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    kind: Kind,
    message: String,
}

/// vmmd's results.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error of `kind`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }
    /// [`Kind::Invalid`].
    pub fn invalid(m: impl Into<String>) -> Error {
        Error::new(Kind::Invalid, m)
    }
    /// [`Kind::NotFound`].
    pub fn not_found(m: impl Into<String>) -> Error {
        Error::new(Kind::NotFound, m)
    }
    /// [`Kind::Exists`].
    pub fn exists(m: impl Into<String>) -> Error {
        Error::new(Kind::Exists, m)
    }
    /// [`Kind::Precondition`].
    pub fn precondition(m: impl Into<String>) -> Error {
        Error::new(Kind::Precondition, m)
    }
    /// [`Kind::Exhausted`].
    pub fn exhausted(m: impl Into<String>) -> Error {
        Error::new(Kind::Exhausted, m)
    }
    /// [`Kind::Unavailable`].
    pub fn unavailable(m: impl Into<String>) -> Error {
        Error::new(Kind::Unavailable, m)
    }
    /// [`Kind::Internal`].
    pub fn internal(m: impl Into<String>) -> Error {
        Error::new(Kind::Internal, m)
    }
    /// Its kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// Its message.
    pub fn message(&self) -> &str {
        &self.message
    }
    /// The same error with `context` before its message.
    pub fn context(self, context: impl fmt::Display) -> Error {
        Error::new(self.kind, format!("{context}: {}", self.message))
    }
    /// Whether a create failing with it was refused before anything of it lasted: the request
    /// or the state of a peer (no pool, pool full, address taken, a peer down), not the host.
    pub fn refusal(&self) -> bool {
        matches!(
            self.kind,
            Kind::NotFound | Kind::Exhausted | Kind::Invalid | Kind::Exists | Kind::Unavailable
        )
    }
    /// The error a peer's answer `status` means, named after the peer.
    pub fn from_peer(peer: &str, status: &tonic::Status) -> Error {
        use tonic::Code;
        let kind = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => Kind::Invalid,
            Code::NotFound => Kind::NotFound,
            Code::AlreadyExists | Code::Aborted => Kind::Exists,
            Code::FailedPrecondition => Kind::Precondition,
            Code::ResourceExhausted => Kind::Exhausted,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Kind::Unavailable,
            _ => Kind::Internal,
        };
        Error::new(kind, format!("{peer}: {}", status.message()))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        let code = match e.kind {
            Kind::Invalid => tonic::Code::InvalidArgument,
            Kind::NotFound => tonic::Code::NotFound,
            Kind::Exists => tonic::Code::AlreadyExists,
            Kind::Precondition => tonic::Code::FailedPrecondition,
            Kind::Exhausted => tonic::Code::ResourceExhausted,
            Kind::Unavailable => tonic::Code::Unavailable,
            Kind::Internal => tonic::Code::Internal,
        };
        tonic::Status::new(code, e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_codes_map_to_kinds_and_back() {
        for (code, kind) in [
            (tonic::Code::InvalidArgument, Kind::Invalid),
            (tonic::Code::NotFound, Kind::NotFound),
            (tonic::Code::AlreadyExists, Kind::Exists),
            (tonic::Code::FailedPrecondition, Kind::Precondition),
            (tonic::Code::ResourceExhausted, Kind::Exhausted),
            (tonic::Code::Unavailable, Kind::Unavailable),
            (tonic::Code::Internal, Kind::Internal),
        ] {
            let e = Error::from_peer("netd", &tonic::Status::new(code, "no"));
            assert_eq!(e.kind(), kind);
            assert_eq!(e.message(), "netd: no");
            assert_eq!(tonic::Status::from(e).code(), code);
        }
        assert_eq!(
            Error::from_peer("ipamd", &tonic::Status::deadline_exceeded("slow")).kind(),
            Kind::Unavailable
        );
    }

    #[test]
    fn only_refusals_leave_no_record() {
        assert!(Error::exhausted("pool full").refusal());
        assert!(Error::unavailable("netd down").refusal());
        assert!(!Error::precondition("the VM could not start").refusal());
        assert!(!Error::internal("disk").refusal());
    }
}
