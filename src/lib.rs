//! freshd: a gRPC cache-coordination server.
//!
//! freshd holds a version for every key and the dependency edges between
//! keys. A publish bumps a key and every transitive dependent; a version check
//! tells a cache whether its copy is still right. See `README.md` for the
//! service and `proto/freshd/v1/coordinator.proto` for the API.
//!
//! The path of every mutation: [`service`] (thin handlers) -> [`validate`] ->
//! [`log`] (gives the seq) -> [`store`] (applies it). [`server`] wires the
//! services, health, reflection and shutdown; [`routes`] serves connections;
//! [`config`] resolves settings.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod auth;
pub mod codec;
pub mod config;
pub mod conn;
pub mod error;
pub mod fanout;
#[doc(hidden)]
pub mod fuzzing;
pub mod http2;
pub mod lease;
pub mod log;
pub mod metrics;
pub mod policy;
pub mod routes;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod store;
pub mod tls;
pub mod validate;
pub mod wal;
pub mod watch;
pub mod wire;

/// Generated protobuf types and gRPC stubs of `freshd.v1`.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("freshd.v1");
    pub use crate::wire::NoticeBatch;
    /// The encoded descriptor set of `freshd.v1`, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("freshd_descriptor");
}
