//! What the loopback, memory and notices benches need of Redis: a
//! `redis-server` child process on a free loopback port, and the load tool's
//! minimal RESP client (`tools/load/src/resp.rs`: an encoder, an incremental
//! reply parser for RESP2 and the RESP3 types Redis 7 sends after `HELLO 3`,
//! including push messages, and blocking and tokio connections).
//!
//! Included by each bench with `#[path = "support/redis.rs"] mod redis;`;
//! each bench uses a different part of it.
#![allow(dead_code)]

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to get `redis-server` when it is missing.
pub const INSTALL_HINT: &str = "redis-server is not installed: this bench compares freshd with \
     Redis in the same run and cannot go on without it.\n\
     Install it with `apt-get install -y redis-server` (Debian/Ubuntu, as root) and run again.";

/// A `redis-server` child on `127.0.0.1:port`, without persistence; killed
/// when dropped.
pub struct RedisServer {
    child: Child,
    /// The port it listens on.
    pub port: u16,
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port and waits until it
    /// answers PING. `Err` carries a message fit for the user, including
    /// [`INSTALL_HINT`] when the binary is missing.
    pub fn start() -> Result<Self, String> {
        Self::start_with(&[])
    }

    /// [`RedisServer::start`] with more command-line arguments.
    pub fn start_with(extra: &[&str]) -> Result<Self, String> {
        // A free port: bind port 0, note the port, let go of it.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot find a free loopback port: {e}"))?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => INSTALL_HINT.to_owned(),
                _ => format!("cannot start redis-server: {e}"),
            })?;
        let mut server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("redis-server exited at start: {status}"));
            }
            if let Ok(mut conn) = SyncConn::connect(local(port)) {
                if let Ok(Reply::Simple(s)) = conn.command(&[b"PING"]) {
                    if s == "PONG" {
                        return Ok(server);
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server did not answer on port {port} within 10 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, to read its CPU time from `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `redis-server --version`, first line.
    pub fn version() -> String {
        Command::new("redis-server")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|e| format!("unknown ({e})"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// The RESP client is the load tool's, so that the benches and the suite
// speak to Redis with the same code.
#[path = "../../tools/load/src/resp.rs"]
mod resp;
#[allow(unused_imports)]
pub use resp::*;

/// `127.0.0.1:port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}
