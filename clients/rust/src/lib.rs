//! The Rust client of freshd, the cache-coordination server.
//!
//! - [`Client`]: every RPC of `freshd.v1.Coordinator`, typed, with one
//!   [`Error`] type for the server's status codes.
//! - [`Watch`]: one invalidation stream (notices, progress, resets).
//! - [`NearCache`]: an in-process cache that leases, fills, checks and
//!   watches, so that it serves only what freshd says may be served.
//! - `freshctl` (the binary of this crate, feature `cli`): the same from a
//!   shell.
//!
//! ```no_run
//! use freshd_client::{Client, NearCache};
//!
//! # async fn demo() -> freshd_client::Result<()> {
//! let client = Client::builder("http://127.0.0.1:50051").client_id("feed-svc").connect().await?;
//! let cache: NearCache<String> = NearCache::new(client.clone());
//! let feed = cache
//!     .get("feed:user:4821", || async {
//!         let feed = "the feed, read from the origin".to_owned();
//!         Ok::<_, std::io::Error>((feed, vec!["posts:author:77".to_owned()]))
//!     })
//!     .await?;
//! client.publish_keys(["posts:author:77"]).await?; // the cached feed is now invalid
//! # let _ = feed; Ok(()) }
//! ```
//!
//! Against a server with tokens and TLS, the builder sets a bearer token
//! (sent with every request, Watch streams included) and the TLS settings:
//!
//! ```no_run
//! # async fn demo() -> freshd_client::Result<()> {
//! let client = freshd_client::Client::builder("https://freshd.internal:50051")
//!     .token("fd_...") // as printed by `freshd --new-token`
//!     .tls_ca_file("/etc/freshd/ca.pem")
//!     .connect()
//!     .await?;
//! # let _ = client; Ok(()) }
//! ```
//!
//! `proto/freshd/v1/coordinator.proto` documents every field and status code.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
pub mod coalesce;
mod credentials;
mod error;
mod near;
mod requests;
#[cfg(feature = "serde")]
mod serde_enum;

/// Generated protobuf types and gRPC client stubs of `freshd.v1`, with
/// constructors and `with_*` setters on the request types.
///
/// With the `serde` feature every message implements `serde::Serialize` and
/// `serde::Deserialize` with its proto field names (missing fields take their
/// defaults), and enum fields are written by name without their prefix
/// (`"FRESH"`, `"REVALIDATE"`, `"NEW_EPOCH"`).
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("freshd.v1");
}

pub use client::{
    normalize_addr, AuthorizedStub, Client, ClientBuilder, Watch, WatchEvent, WatchSender,
    DEFAULT_ADDR, DEFAULT_CONNECTION_WINDOW,
};
pub use credentials::BearerToken;
pub use error::{code_name, BoxError, Error, Result};
pub use near::{namespace, NearCache, NearCacheBuilder, NearCacheStats};
