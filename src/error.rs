//! The one error type of the server and its one mapping to gRPC status codes.
//!
//! The codes are part of the API: `proto/freshd/v1/coordinator.proto` lists
//! every code a client can get, and each message says what to do next.

use tonic::Status;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request broke a documented rule or limit. The message names the
    /// field, the size and the limit.
    #[error("{0}")]
    InvalidArgument(String),

    /// A fill raced a change: `key` changed at `changed_seq`, after the
    /// caller's `observed_seq`.
    #[error(
        "{key} changed at seq {changed_seq}, after observed_seq {observed_seq}: \
         the value read from the origin may be stale; refetch it and fill again \
         with the seq of a newer Check"
    )]
    FillRaced {
        /// The key (the filled key or one of its dependencies) that changed.
        key: String,
        /// When it changed (an upper bound when freshd no longer holds the key).
        changed_seq: u64,
        /// The seq the caller observed before it read the origin.
        observed_seq: u64,
    },

    /// A seq or version came from another history of the server.
    #[error(
        "epoch {got} is not the server's epoch {current}: the server's history \
         was reset; refetch from the origin and use the seq of a new Check"
    )]
    EpochMismatch {
        /// The epoch the caller sent.
        got: u64,
        /// The server's epoch.
        current: u64,
    },

    /// Inspect of a key freshd holds nothing for.
    #[error("freshd holds nothing for key {0:?}: it was never filled or published, or it expired")]
    NotFound(String),

    /// A purge would reach more keys than the blast radius allows.
    #[error(
        "purging prefix {prefix:?} would affect {affected} keys; the limit is {limit} \
         (max_purge_keys): run a dry run, narrow the prefix, or set confirm"
    )]
    PurgeTooBroad {
        /// The prefix.
        prefix: String,
        /// Keys it would affect, dependents included.
        affected: u64,
        /// The blast radius.
        limit: u64,
    },

    /// Too many purges in the last minute.
    #[error(
        "{0} purges in the last minute; the limit is {1} (purges_per_minute): try again later"
    )]
    PurgeRateLimited(u64, u64),

    /// A fill named a lease the caller does not hold.
    #[error(
        "lease token {token} is not held for key {key:?} (it expired, was released, or \
         was never granted): lease again"
    )]
    LeaseNotHeld {
        /// The key.
        key: String,
        /// The token sent.
        token: u64,
    },

    /// A read-your-writes wait ran out.
    #[error(
        "this server has applied seq {applied}, not min_seq {min_seq}, within {waited_ms} ms: \
         retry, or use a seq this server issued"
    )]
    SeqNotApplied {
        /// The seq asked for.
        min_seq: u64,
        /// The seq applied.
        applied: u64,
        /// How long the server waited.
        waited_ms: u64,
    },

    /// The ordered log could not take a mutation.
    #[error("the mutation log failed: {0}; the request may not have been applied")]
    Log(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::InvalidArgument(_) => Status::invalid_argument(message),
            Error::FillRaced { .. } | Error::EpochMismatch { .. } => Status::aborted(message),
            Error::NotFound(_) => Status::not_found(message),
            Error::PurgeTooBroad { .. } | Error::LeaseNotHeld { .. } => {
                Status::failed_precondition(message)
            }
            Error::PurgeRateLimited(..) => Status::resource_exhausted(message),
            Error::SeqNotApplied { .. } => Status::unavailable(message),
            Error::Log(_) => Status::internal(message),
        }
    }
}

/// A result whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
