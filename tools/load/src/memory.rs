//! Memory per key of the server process, with K cached keys and their
//! dependencies.
//!
//! Shape: K keys `mem:feed:N`, each depending on 4 distinct entities among
//! K/4 `mem:post:M` (picked by a fixed hash of N), so 4K edges.
//!
//! - freshd: every key registered with `Fill` (TTL one day) and its 4
//!   dependencies. Measured: the resident set (`VmRSS` in
//!   `/proc/<pid>/status`) of the server process before and after, so it
//!   includes allocator slack and the tables' spare capacity; the server's
//!   own `Stats` gives the keys and edges it holds.
//! - Redis: `SET mem:feed:N <version> EX 86400` and, for each dependency,
//!   `SADD dependents:mem:post:M mem:feed:N` (the reverse edges a
//!   Redis-based design needs to find what a change invalidates), over one
//!   pipelined connection. Measured: `used_memory` (what Redis's allocator
//!   holds for data) and `used_memory_rss` before and after.
//!
//! Per key = growth / K. Both servers should be fresh (nothing else loaded).

use std::time::{Duration, Instant};

use freshd::pb::{FillRequest, StatsRequest};
use serde_json::json;

use crate::resp::{self, SyncConn};
use crate::stats::Report;
use crate::{freshd_client, parallel, socket_addr, Error, Target};

/// Settings of the memory workload.
#[derive(Clone, Debug)]
pub struct MemoryOpts {
    /// `freshd` or `redis`.
    pub target: Target,
    /// Its `host:port`.
    pub addr: String,
    /// The server's process id (freshd: to read its resident set).
    pub pid: Option<u32>,
    /// Cached keys.
    pub keys: usize,
    /// Fills in flight (freshd).
    pub concurrency: usize,
}

/// Dependencies per key.
pub const DEPS: usize = 4;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The 4 distinct entities key `n` depends on, among `entities`.
pub fn deps_of(n: usize, entities: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(DEPS);
    let mut salt = 0u64;
    while out.len() < DEPS.min(entities) {
        let m = (splitmix(n as u64 * 8 + salt) % entities as u64) as usize;
        if !out.contains(&m) {
            out.push(m);
        }
        salt += 1;
    }
    out
}

/// The resident set of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| format!("no VmRSS for process {pid}"))
}

/// A figure once it has stopped moving: read every 200 ms until two reads in
/// a row agree (the server finished growing its tables, Redis its
/// incremental rehash), for at most 10 s; the last read otherwise.
async fn settled(mut read: impl FnMut() -> Result<u64, Error>) -> Result<u64, Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = read()?;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = read()?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

/// Runs the workload once.
pub async fn run(opts: &MemoryOpts) -> Result<Report, Error> {
    let k = opts.keys;
    if k < DEPS {
        return Err(format!("keys must be at least {DEPS}"));
    }
    let entities = (k / 4).max(DEPS);
    let started = Instant::now();
    let (per_key, extra) = match opts.target {
        Target::Freshd => {
            let pid = opts.pid.ok_or("the freshd memory run needs --pid")?;
            let mut client = freshd_client(&opts.addr).await?;
            let before = rss_bytes(pid)?;
            let c = client.clone();
            parallel(k, opts.concurrency, move |_, n| {
                let mut client = c.clone();
                async move {
                    client
                        .fill(FillRequest {
                            key: format!("mem:feed:{n}"),
                            dependencies: deps_of(n, entities)
                                .into_iter()
                                .map(|m| format!("mem:post:{m}"))
                                .collect(),
                            ttl_ms: 86_400_000,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("fill {n}: {e}"))
                }
            })
            .await?;
            let load_secs = started.elapsed().as_secs_f64();
            let after = settled(|| rss_bytes(pid)).await?;
            let stats = client
                .stats(StatsRequest {})
                .await
                .map_err(|e| format!("stats: {e}"))?
                .into_inner();
            let grown = after.saturating_sub(before);
            (
                grown as f64 / k as f64,
                json!({
                    "measure": "VmRSS", "rss_before": before, "rss_after": after,
                    "server_keys": stats.keys, "server_edges": stats.edges,
                    "load_secs": load_secs,
                }),
            )
        }
        Target::Redis => {
            let mut conn = SyncConn::connect(socket_addr(&opts.addr)?)
                .map_err(|e| format!("cannot connect to redis: {e}"))?;
            let info = |conn: &mut SyncConn, f: &str| {
                conn.info_field("memory", f)
                    .map_err(|e| format!("INFO: {e}"))
            };
            let used_before = info(&mut conn, "used_memory")?;
            let rss_before = info(&mut conn, "used_memory_rss")?;
            {
                let mut pipe = resp::Pipeline::new(&mut conn, 1000);
                for n in 0..k {
                    let key = format!("mem:feed:{n}");
                    let version = (n + 1).to_string();
                    pipe.push(&[b"SET", key.as_bytes(), version.as_bytes(), b"EX", b"86400"])
                        .map_err(|e| e.to_string())?;
                    for m in deps_of(n, entities) {
                        let set = format!("dependents:mem:post:{m}");
                        pipe.push(&[b"SADD", set.as_bytes(), key.as_bytes()])
                            .map_err(|e| e.to_string())?;
                    }
                }
                pipe.flush().map_err(|e| e.to_string())?;
            }
            let load_secs = started.elapsed().as_secs_f64();
            let used_after = settled(|| info(&mut conn, "used_memory")).await?;
            let rss_after = info(&mut conn, "used_memory_rss")?;
            let grown = used_after.saturating_sub(used_before);
            (
                grown as f64 / k as f64,
                json!({
                    "measure": "used_memory",
                    "used_memory_before": used_before, "used_memory_after": used_after,
                    "rss_before": rss_before, "rss_after": rss_after,
                    "rss_per_key": rss_after.saturating_sub(rss_before) as f64 / k as f64,
                    "load_secs": load_secs,
                }),
            )
        }
        Target::Etcd | Target::Floor => {
            return Err("the memory workload runs against freshd or redis".into())
        }
    };
    let mut extra = extra;
    extra["bytes_per_key"] = json!(per_key);
    let load_secs = extra["load_secs"].as_f64().unwrap_or(0.0);
    Ok(Report {
        workload: "memory".into(),
        target: opts.target.name().into(),
        variant: match opts.target {
            Target::Freshd => "Fill with 4 deps (RSS)",
            _ => "SET EX + SADD reverse (used_memory)",
        }
        .into(),
        mode: "closed".into(),
        params: json!({ "keys": k, "entities": entities, "deps": DEPS }),
        secs: load_secs,
        ops: k as u64,
        ops_per_sec: k as f64 / load_secs.max(1e-9),
        keys_per_sec: k as f64 / load_secs.max(1e-9),
        errors: 0,
        latency: None,
        server_cpu_s: None,
        load_cpu_s: None,
        extra,
    })
}
