//! What the load tool's tests share.

use freshd::config::Config;
use freshd::server::RunningServer;

/// A memory-only freshd on a loopback port, and its address.
pub async fn server() -> (RunningServer, String) {
    let server = RunningServer::start(Config::ephemeral())
        .await
        .expect("freshd starts");
    let addr = server.addr.to_string();
    (server, addr)
}
