//! The one error type of the client, and its one mapping from gRPC status
//! codes (the codes and their meaning are documented in
//! `proto/freshd/v1/coordinator.proto`).

use std::error::Error as StdError;

use tonic::Code;

/// A boxed error, as a loader of [`crate::NearCache`] may return.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// A result whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a call to freshd (or a [`crate::NearCache`] load) can fail with.
///
/// Each server answer keeps the server's message, which names the field, the
/// limit or the seq involved and says what to do next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server could not be reached: the connection was refused, reset or
    /// timed out. Nothing is known about whether a request was applied.
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// The address the client dials.
        addr: String,
        /// What the transport said.
        message: String,
    },

    /// The address is not a URI the client can dial.
    #[error("invalid address {addr:?}: {message}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// Why it cannot be used.
        message: String,
    },

    /// A client setting cannot be used: a token that cannot be sent in a
    /// header, a CA or key file that cannot be read or holds no PEM, TLS
    /// settings for an `http://` address. Nothing was sent.
    #[error("invalid setting {setting}: {message}")]
    InvalidSetting {
        /// The setting (`token`, `tls_ca`, `tls_cert`, `tls_key`, `tls`).
        setting: String,
        /// What is wrong with it.
        message: String,
    },

    /// `UNAUTHENTICATED`: the server requires a token and the request
    /// carried none, or one it does not know, or one that expired. Set one
    /// with [`crate::ClientBuilder::token`].
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),

    /// `PERMISSION_DENIED`: the token's principal lacks the scope the call
    /// needs in the key's namespace; the message names the principal, the
    /// scope and the namespace. Nothing was changed.
    #[error("permission denied: {0}")]
    PermissionDenied(String),

    /// `INVALID_ARGUMENT`: a request broke a documented rule or limit; the
    /// message names the field, the size and the limit. Nothing was changed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// `ABORTED` (Fill only): the key or one of its dependencies changed after
    /// the fill's `observed_seq`, or the seq is from another epoch. The value
    /// read from the origin may be stale: refetch it and fill again with a
    /// newer seq. Nothing was changed.
    #[error("fill raced a change: {0}")]
    FillRaced(String),

    /// `NOT_FOUND`: freshd holds nothing for the key (Inspect), or the
    /// namespace has no policy of its own (DeletePolicy).
    #[error("not found: {0}")]
    NotFound(String),

    /// `FAILED_PRECONDITION`: a fill named a lease the caller does not hold
    /// (lease again), or a purge would affect more than `max_purge_keys` keys
    /// without `confirm`.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),

    /// `RESOURCE_EXHAUSTED`: more than `purges_per_minute` purges, a Watch
    /// stream went past a per-stream limit (the message names it), or the
    /// principal went past one of its quotas (the message says `quota
    /// <name>` and, for rates, when to retry).
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),

    /// `OUT_OF_RANGE`: the encoded request is larger than `max_message_bytes`.
    #[error("message too large: {0}")]
    OutOfRange(String),

    /// `UNAVAILABLE` from the server: it is shutting down or not ready, or a
    /// `min_seq` was not applied in time. Retry, later or elsewhere.
    #[error("unavailable: {0}")]
    Unavailable(String),

    /// `INTERNAL`: a bug or a failed log append; the request may not have been
    /// applied. Retrying a Publish that carries external versions is safe.
    #[error("internal server error: {0}")]
    Internal(String),

    /// The call took longer than the client's timeout (or the server's
    /// `DEADLINE_EXCEEDED`).
    #[error("timed out: {0}")]
    Timeout(String),

    /// Any other status code.
    #[error("{code:?}: {message}")]
    Status {
        /// The gRPC status code.
        code: Code,
        /// The server's message.
        message: String,
    },

    /// A Watch stream broke a rule of the protocol (say, its first message was
    /// not `started`).
    #[error("watch protocol: {0}")]
    Protocol(String),

    /// The Watch stream or the background task behind a call has ended.
    #[error("closed: {0}")]
    Closed(String),

    /// The loader of a [`crate::NearCache`] failed.
    #[error("loading from the origin failed: {0}")]
    Load(#[source] BoxError),
}

impl Error {
    /// Maps a gRPC status to the error it means. `addr` names the server in
    /// connection errors.
    pub fn from_status(status: tonic::Status, addr: &str) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            Code::InvalidArgument => Error::InvalidArgument(message),
            Code::Aborted => Error::FillRaced(message),
            Code::NotFound => Error::NotFound(message),
            Code::FailedPrecondition => Error::FailedPrecondition(message),
            // Made on this side: the client's own HTTP/2 library ended the
            // connection (h2's guard against floods of small frames).
            Code::ResourceExhausted if is_transport(&status) => {
                Error::ResourceExhausted(local_exhaustion(&status))
            }
            Code::ResourceExhausted => Error::ResourceExhausted(message),
            Code::OutOfRange => Error::OutOfRange(message),
            Code::Unauthenticated => Error::Unauthenticated(message),
            Code::PermissionDenied => Error::PermissionDenied(message),
            Code::DeadlineExceeded => Error::Timeout(message),
            // A status made on this side from a transport failure carries
            // its cause; one sent by the server does not.
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
                if is_transport(&status) =>
            {
                Error::Connect {
                    addr: addr.to_owned(),
                    message: transport_message(&status),
                }
            }
            Code::Unavailable => Error::Unavailable(message),
            Code::Internal => Error::Internal(message),
            code => Error::Status { code, message },
        }
    }

    /// The gRPC status code this error stands for, if it came from one
    /// (`UNAVAILABLE` for connection errors).
    pub fn code(&self) -> Option<Code> {
        Some(match self {
            Error::Connect { .. } => Code::Unavailable,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::FillRaced(_) => Code::Aborted,
            Error::NotFound(_) => Code::NotFound,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
            Error::Timeout(_) => Code::DeadlineExceeded,
            Error::Status { code, .. } => *code,
            Error::InvalidAddress { .. }
            | Error::InvalidSetting { .. }
            | Error::Protocol(_)
            | Error::Closed(_)
            | Error::Load(_) => return None,
        })
    }

    /// The message alone: the server's for status errors.
    pub fn message(&self) -> String {
        match self {
            Error::Connect { message, .. }
            | Error::InvalidAddress { message, .. }
            | Error::InvalidSetting { message, .. } => message.clone(),
            Error::InvalidArgument(m)
            | Error::Unauthenticated(m)
            | Error::PermissionDenied(m)
            | Error::FillRaced(m)
            | Error::NotFound(m)
            | Error::FailedPrecondition(m)
            | Error::ResourceExhausted(m)
            | Error::OutOfRange(m)
            | Error::Unavailable(m)
            | Error::Internal(m)
            | Error::Timeout(m)
            | Error::Protocol(m)
            | Error::Closed(m) => m.clone(),
            Error::Status { message, .. } => message.clone(),
            Error::Load(e) => e.to_string(),
        }
    }

    /// A copy of this error, for answering several waiters with one
    /// failure (a loader's error keeps only its message).
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Connect { addr, message } => Error::Connect {
                addr: addr.clone(),
                message: message.clone(),
            },
            Error::InvalidAddress { addr, message } => Error::InvalidAddress {
                addr: addr.clone(),
                message: message.clone(),
            },
            Error::InvalidSetting { setting, message } => Error::InvalidSetting {
                setting: setting.clone(),
                message: message.clone(),
            },
            Error::Unauthenticated(m) => Error::Unauthenticated(m.clone()),
            Error::PermissionDenied(m) => Error::PermissionDenied(m.clone()),
            Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
            Error::FillRaced(m) => Error::FillRaced(m.clone()),
            Error::NotFound(m) => Error::NotFound(m.clone()),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(m.clone()),
            Error::ResourceExhausted(m) => Error::ResourceExhausted(m.clone()),
            Error::OutOfRange(m) => Error::OutOfRange(m.clone()),
            Error::Unavailable(m) => Error::Unavailable(m.clone()),
            Error::Internal(m) => Error::Internal(m.clone()),
            Error::Timeout(m) => Error::Timeout(m.clone()),
            Error::Status { code, message } => Error::Status {
                code: *code,
                message: message.clone(),
            },
            Error::Protocol(m) => Error::Protocol(m.clone()),
            Error::Closed(m) => Error::Closed(m.clone()),
            Error::Load(e) => Error::Load(e.to_string().into()),
        }
    }

    /// Whether freshd could not be reached, or could not answer now: the
    /// server was not reached, is shutting down, or the call timed out.
    /// A [`crate::NearCache`] then loads from the origin without caching.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. } | Error::Unavailable(_) | Error::Timeout(_) | Error::Closed(_)
        )
    }
}

/// The name of a status code as gRPC writes it (`"INVALID_ARGUMENT"`).
pub fn code_name(code: Code) -> &'static str {
    match code {
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

/// Whether a status was made on this side from a transport failure (tonic
/// keeps the cause as its source); a status sent by the server has none.
fn is_transport(status: &tonic::Status) -> bool {
    StdError::source(status).is_some()
}

/// The innermost cause of a transport failure ("Connection refused"), which
/// says more than tonic's outer "transport error".
fn transport_message(status: &tonic::Status) -> String {
    let mut last = status.message().to_owned();
    let mut source = StdError::source(status);
    while let Some(e) = source {
        last = e.to_string();
        source = e.source();
    }
    last
}

/// A `RESOURCE_EXHAUSTED` made on this side, with its cause, and what to do
/// when it is h2 ending a connection that held too many unread small frames
/// (each Watch notice is one).
fn local_exhaustion(status: &tonic::Status) -> String {
    let cause = transport_message(status);
    let mut message = format!("{}: {cause}", status.message());
    if ended_by_h2_for_calm(status) {
        message.push_str(
            " (this client's HTTP/2 library ended the connection as abusive, as it \
             does when it holds too many unread small frames: read Watch streams \
             promptly, or raise ClientBuilder::connection_window)",
        );
    }
    message
}

/// Whether h2 on this side ended the connection with `ENHANCE_YOUR_CALM`,
/// its answer to a peer it judges abusive (here: too many unread small
/// DATA frames).
fn ended_by_h2_for_calm(status: &tonic::Status) -> bool {
    let mut source = StdError::source(status);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_library() && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
        }
        source = e.source();
    }
    false
}

/// The innermost cause of a transport error.
pub(crate) fn innermost(error: &(dyn StdError + 'static)) -> String {
    let mut last = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        last = e.to_string();
        source = e.source();
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_their_errors() {
        let e = Error::from_status(tonic::Status::aborted("k changed at seq 9"), "a");
        assert!(matches!(&e, Error::FillRaced(m) if m == "k changed at seq 9"));
        assert_eq!(e.code(), Some(Code::Aborted));
        let e = Error::from_status(tonic::Status::not_found("nothing"), "a");
        assert!(matches!(e, Error::NotFound(_)));
        let e = Error::from_status(tonic::Status::unavailable("shutting down"), "a");
        assert!(matches!(e, Error::Unavailable(_)));
        assert!(e.is_unreachable());
        let e = Error::from_status(tonic::Status::invalid_argument("key is 9 bytes"), "a");
        assert!(!e.is_unreachable());
        assert_eq!(code_name(e.code().unwrap()), "INVALID_ARGUMENT");
        assert_eq!(e.message(), "key is 9 bytes");
    }

    #[test]
    fn security_codes_map_to_their_errors_and_keep_the_message() {
        let e = Error::from_status(tonic::Status::unauthenticated("unknown token"), "a");
        assert!(matches!(&e, Error::Unauthenticated(m) if m == "unknown token"));
        assert_eq!(e.code(), Some(Code::Unauthenticated));
        assert!(!e.is_unreachable());
        let denied = "principal \"feed-api\" lacks scope publish in namespace \"feed\"";
        let e = Error::from_status(tonic::Status::permission_denied(denied), "a");
        assert!(matches!(&e, Error::PermissionDenied(m) if m == denied));
        assert_eq!(e.code(), Some(Code::PermissionDenied));
        assert_eq!(e.duplicate().to_string(), e.to_string());
        let e = Error::from_status(
            tonic::Status::resource_exhausted("quota streams: 2 open"),
            "a",
        );
        assert!(matches!(&e, Error::ResourceExhausted(m) if m.contains("quota streams")));
    }

    #[test]
    fn a_local_transport_failure_is_a_connect_error() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let status = tonic::Status::from_error(Box::new(tonic::ConnectError(Box::new(io))));
        let e = Error::from_status(status, "http://127.0.0.1:1");
        assert!(
            matches!(&e, Error::Connect { addr, .. } if addr == "http://127.0.0.1:1"),
            "{e:?}"
        );
        assert!(e.to_string().contains("Connection refused"), "{e}");
    }
}
