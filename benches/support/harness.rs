//! What the loopback benches share: settings from the environment, a freshd
//! server on its own runtime beside a client runtime, and CPU time read from
//! `/proc`.

#![allow(dead_code)]

use std::time::Duration;

use freshd::config::Config;
use freshd::server::RunningServer;
use tokio::runtime::Runtime;

/// `name` from the environment as a number, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A freshd server on loopback, on a runtime of its own (threads named
/// `freshd-server`, so their CPU time can be read), and a 2-thread runtime
/// for the clients.
pub struct Bench {
    /// The server's runtime.
    pub server_rt: Runtime,
    /// The clients' runtime.
    pub client_rt: Runtime,
    /// The server.
    pub server: RunningServer,
}

impl Bench {
    /// Starts a memory-only server with `server_threads` worker threads.
    pub fn start(server_threads: usize) -> Self {
        let server_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(server_threads)
            .thread_name("freshd-server")
            .enable_all()
            .build()
            .expect("server runtime");
        let client_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-client")
            .enable_all()
            .build()
            .expect("client runtime");
        let server = server_rt
            .block_on(RunningServer::start(Config::ephemeral()))
            .expect("start freshd");
        Self {
            server_rt,
            client_rt,
            server,
        }
    }
}

/// CPU time (user + system) from a `/proc/.../stat` line.
pub fn stat_cpu(stat: &str, ticks_per_sec: u64) -> Duration {
    // Fields after the `(comm)`, which may hold spaces: utime is field 14,
    // stime 15.
    let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / ticks_per_sec as f64)
}

/// Clock ticks per second of `/proc` times.
pub fn ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// CPU time of this process's threads whose name starts with one of
/// `prefixes`.
pub fn threads_cpu(prefixes: &[&str], ticks: u64) -> Duration {
    let mut total = Duration::ZERO;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return total;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if prefixes.iter().any(|p| comm.trim_end().starts_with(p)) {
            if let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) {
                total += stat_cpu(&stat, ticks);
            }
        }
    }
    total
}

/// CPU time of process `pid`.
pub fn process_cpu(pid: u32, ticks: u64) -> Duration {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| stat_cpu(&s, ticks))
        .unwrap_or_default()
}
