//! Real servers in-process for the tests; they stop on drop.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use freshd::config::Config;
use freshd::server::RunningServer;
use freshd_client::Client;

/// A server on an ephemeral loopback port, without admin HTTP, that drains
/// quickly; ready when this returns.
pub async fn start() -> RunningServer {
    start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
}

/// The same on `addr` (retrying while the port is still being released).
pub async fn start_on(addr: SocketAddr) -> RunningServer {
    let mut config = Config::ephemeral();
    config.listen = addr;
    config.admin_listen = None;
    config.shutdown_grace = Duration::from_secs(2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let server = loop {
        match RunningServer::start(config.clone()).await {
            Ok(server) => break server,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the server does not start on {addr}: {e}"),
        }
    };
    let client = Client::connect(server.url()).await.expect("connects");
    assert!(
        eventually(Duration::from_secs(10), || async {
            client.stats().await.is_ok()
        })
        .await,
        "the server is not serving after 10 s"
    );
    server
}

/// Retries `f` until it returns true, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
