//! freshd-load: drives freshd, and the peers it is compared with (Redis,
//! etcd), with the same connection counts, concurrency and rates, and
//! reports HDR-histogram percentiles.
//!
//! Each workload is a module with an options struct and an async `run`
//! that returns [`stats::Report`]s; `src/main.rs` maps subcommands onto
//! them, and the smoke test calls them in-process.
//!
//! - [`check`]: version checks, one key (`Check` vs `GET`) or batches
//!   (`CheckBatch` vs `MGET` and pipelined `GET`), closed loop (throughput)
//!   or open loop at a fixed rate (latency).
//! - [`notice`]: write-to-notice latency at a fixed rate to N subscribers
//!   (`Publish` -> `Watch`, `SET` -> RESP3 tracking `invalidate`, etcd
//!   `Put` -> `Watch` event).
//! - [`fanout`]: notices delivered per second to N subscribers (`Publish`
//!   -> `Watch` vs `PUBLISH` -> `SUBSCRIBE`).
//! - [`deps`]: one publish that invalidates D dependents: time until the
//!   last notice arrives.
//! - [`floor`]: the loopback floor the notice workload also runs against,
//!   a server that does nothing but write each change to N sockets.
//! - [`memory`]: bytes per key of the server process with K keys and their
//!   dependencies.

#![warn(missing_docs)]

pub mod check;
pub mod cpu;
pub mod deps;
pub mod fanout;
pub mod floor;
pub mod grpc;
pub mod memory;
pub mod notice;
pub mod pace;
pub mod resp;
pub mod stats;
pub mod unary;
pub mod watch;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use freshd::pb::coordinator_client::CoordinatorClient;
use freshd_client::coalesce::Connector;
use tonic::transport::Channel;

/// The generated client of the etcd v3 API subset in `proto/etcd.proto`.
pub mod etcdpb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("etcdserverpb");
}

/// Which server a workload drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// freshd over gRPC.
    Freshd,
    /// redis-server over RESP.
    Redis,
    /// etcd over its v3 gRPC API.
    Etcd,
    /// `freshd-load floor-server` ([`floor`]): the loopback floor, a
    /// server that only copies each change to every subscriber's socket
    /// (notice workload only).
    Floor,
}

impl Target {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Target::Freshd => "freshd",
            Target::Redis => "redis",
            Target::Etcd => "etcd",
            Target::Floor => "floor",
        }
    }
}

/// An error message fit for the user.
pub type Error = String;

/// `host:port` as a socket address.
pub fn socket_addr(addr: &str) -> Result<SocketAddr, Error> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| format!("bad address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("address {addr} resolves to nothing"))
}

/// A TCP connection to `host:port` with `TCP_NODELAY`, as every client of
/// the load tool that writes its own socket opens it.
pub async fn connect_nodelay(addr: &str) -> Result<tokio::net::TcpStream, Error> {
    let tcp = tokio::net::TcpStream::connect(socket_addr(addr)?)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    tcp.set_nodelay(true)
        .map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
    Ok(tcp)
}

/// One gRPC channel (one HTTP/2 connection) to `host:port`, through the
/// Rust client's [`Connector`]: `TCP_NODELAY`, and each request's frames in
/// one write ([`freshd_client::coalesce`]).
pub async fn grpc_channel(addr: &str) -> Result<Channel, Error> {
    Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad address {addr}: {e}"))?
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(Connector)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))
}

/// A freshd client on a connection of its own.
pub async fn freshd_client(addr: &str) -> Result<CoordinatorClient<Channel>, Error> {
    Ok(CoordinatorClient::new(grpc_channel(addr).await?)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// Runs `job(i)` for every `i` in `0..n` on `workers` concurrent tasks
/// (`workers` requests in flight); the first error stops the rest.
pub async fn parallel<F, Fut>(n: usize, workers: usize, job: F) -> Result<(), Error>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), Error>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let job = Arc::new(job);
    let mut tasks = Vec::new();
    for worker in 0..workers.max(1) {
        let (next, job) = (next.clone(), job.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok(());
                }
                if let Err(e) = job(worker, i).await {
                    next.store(n, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }));
    }
    for task in tasks {
        task.await.map_err(|e| format!("task failed: {e}"))??;
    }
    Ok(())
}

/// Seconds as a [`Duration`].
pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}
