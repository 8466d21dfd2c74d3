//! Starts real servers and connects real clients; servers stop on drop.

use std::time::Duration;

use freshd::config::Config;
use freshd::pb::{self, coordinator_client::CoordinatorClient};
use freshd::server::RunningServer;
use tonic::transport::Channel;

/// A running server and a client connected to it.
pub struct TestServer {
    pub server: RunningServer,
    pub client: CoordinatorClient<Channel>,
}

pub async fn start() -> TestServer {
    start_with(Config::ephemeral()).await
}

pub async fn start_with(config: Config) -> TestServer {
    let server = RunningServer::start(config).await.expect("server starts");
    let client = connect(&server).await;
    TestServer { server, client }
}

/// A gRPC channel to a plaintext server.
pub async fn channel(server: &RunningServer) -> Channel {
    Channel::from_shared(server.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("client connects")
}

pub async fn connect(server: &RunningServer) -> CoordinatorClient<Channel> {
    CoordinatorClient::new(channel(server).await)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

pub fn change(key: &str) -> pb::Change {
    pb::Change {
        key: key.into(),
        ..Default::default()
    }
}

pub fn publish_req(keys: &[&str]) -> pb::PublishRequest {
    pb::PublishRequest {
        changes: keys.iter().map(|k| change(k)).collect(),
        ..Default::default()
    }
}

pub fn fill_req(key: &str, deps: &[&str], observed_seq: u64) -> pb::FillRequest {
    pb::FillRequest {
        key: key.into(),
        dependencies: deps.iter().map(|d| d.to_string()).collect(),
        ttl_ms: 60_000,
        observed_seq,
        epoch: 0,
        lease_token: 0,
        client_id: String::new(),
    }
}

/// Fills each of `keys` without dependencies; returns their versions.
pub async fn fill_all(c: &mut CoordinatorClient<Channel>, keys: &[&str]) -> Vec<u64> {
    let mut versions = Vec::with_capacity(keys.len());
    for key in keys {
        versions.push(
            c.fill(fill_req(key, &[], 0))
                .await
                .unwrap()
                .into_inner()
                .version,
        );
    }
    versions
}

/// Retries `f` until it returns true, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
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

/// GET `path` over plain HTTP/1.1: `(status, body)`.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: freshd\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// A new, empty directory under the system's temporary directory, its own
/// to each call.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "freshd-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `freshd` binary, with an empty environment but `PATH`.
pub fn freshd_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_freshd"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd
}

/// Reads a child's log `lines` up to the first that contains `needle`, and
/// returns it; panics naming `needle` when the log ends first.
pub fn log_line(lines: &mut impl Iterator<Item = std::io::Result<String>>, needle: &str) -> String {
    lines
        .map_while(Result::ok)
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no log line with {needle:?}"))
}

/// A CheckBatch of `keys`, each with no version of its own.
pub fn check_batch_req<'a>(keys: impl IntoIterator<Item = &'a String>) -> pb::CheckBatchRequest {
    pb::CheckBatchRequest {
        items: keys
            .into_iter()
            .map(|k| pb::CheckItem {
                key: k.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}
