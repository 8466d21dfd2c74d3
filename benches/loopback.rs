//! freshd against Redis over loopback, in the same run, with the same keys,
//! batch sizes and client concurrency. Prints markdown tables.
//!
//! - freshd: a real gRPC server started in-process with
//!   `RunningServer::start(Config::ephemeral())` on its own tokio runtime
//!   (threads named `freshd-server`, [`SERVER_THREADS`] workers by default).
//!   [`KEYS`] keys `feed:user:N`, each depending on one `posts:author:M` of
//!   10k, are registered through the gRPC `Fill` RPC.
//! - Redis: a real `redis-server` child on a free loopback port
//!   (`--save '' --appendonly no`), the same keys `SET feed:user:N <version>`,
//!   killed at the end.
//! - Clients: one client runtime (threads `bench-client`, 2 workers) runs
//!   [`TASKS`] tasks per measurement, each with its own connection (a tonic
//!   channel, i.e. one HTTP/2 connection, or one RESP TCP connection), closed
//!   loop: send a request, wait for the answer, send the next. Keys are
//!   uniform random over the [`KEYS`]; a batch has distinct keys. Every answer
//!   is checked (FRESH with the filled version; the value Redis returns equals
//!   that version).
//! - Workloads: `Check` vs `GET` (one key per request), `CheckBatch` vs
//!   `MGET` with 64 and 1,000 keys per request. Each runs 1 s of warm-up,
//!   then [`SECS`] s measured.
//! - Columns: throughput (requests/s, and keys/s for batches), latency p50 and
//!   p99 per request, and server CPU per 1,000 keys (freshd: the
//!   `freshd-server` threads only; Redis: the whole `redis-server` process),
//!   from `/proc`.
//!
//! What it measures: a gRPC request is HTTP/2 framing, protobuf and tonic's
//! per-request machinery on both ends; a Redis request is RESP over a plain
//! socket, with a minimal client (`benches/support/redis.rs`) that parses
//! every reply. The client runs in this process; freshd's server does too,
//! Redis's in its own. On a 2-core machine both sides share the cores.
//!
//! Settings, by environment: `LOOPBACK_SECS` (default 5),
//! `LOOPBACK_TASKS` (16), `LOOPBACK_KEYS` (100000),
//! `LOOPBACK_SERVER_THREADS` (2).
//!
//! Run: `cargo bench --bench loopback` (about one minute once built). Exits
//! non-zero when `redis-server` is not installed.

#[path = "support/harness.rs"]
mod harness;
#[path = "support/redis.rs"]
mod redis;

use harness::{env_usize, process_cpu, threads_cpu, ticks_per_sec, Bench};
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshd::pb::coordinator_client::CoordinatorClient;
use freshd::pb::{CheckBatchRequest, CheckItem, CheckRequest, FillRequest, Freshness};
use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use redis::{AsyncConn, RedisServer, Reply};
use tonic::transport::Channel;

/// Keys registered on both sides.
const KEYS: usize = 100_000;
/// Concurrent client tasks (and connections) per measurement.
const TASKS: usize = 16;
/// Measured seconds per workload and system.
const SECS: u64 = 5;
/// Worker threads of freshd's server runtime.
const SERVER_THREADS: usize = 2;
/// Warm-up before each measurement.
const WARM_UP: Duration = Duration::from_secs(1);
/// TTL of every fill: longer than the run.
const TTL_MS: u64 = 3_600_000;

struct Settings {
    keys: usize,
    tasks: usize,
    secs: u64,
    server_threads: usize,
}

/// The keys and the versions freshd gave them.
struct Keys {
    names: Vec<String>,
    versions: Vec<u64>,
}

/// A workload: keys per request, and its name on either side.
#[derive(Clone, Copy)]
struct Workload {
    batch: usize,
    freshd: &'static str,
    redis: &'static str,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        batch: 1,
        freshd: "Check",
        redis: "GET",
    },
    Workload {
        batch: 64,
        freshd: "CheckBatch 64",
        redis: "MGET 64",
    },
    Workload {
        batch: 1000,
        freshd: "CheckBatch 1000",
        redis: "MGET 1000",
    },
];

/// What one measurement saw.
struct Measured {
    requests: u64,
    keys: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    server_cpu: Duration,
}

impl Measured {
    fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn keys_per_sec(&self) -> f64 {
        self.keys as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_us(&self, p: f64) -> u32 {
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i]
    }

    fn cpu_us_per_1k_keys(&self) -> f64 {
        self.server_cpu.as_secs_f64() * 1e6 / self.keys as f64 * 1000.0
    }
}

/// One task's count, recording only requests that start after the warm-up.
struct Recorder {
    measure_from: Instant,
    until: Instant,
    requests: u64,
    keys: u64,
    last_end: Instant,
    latencies_us: Vec<u32>,
}

impl Recorder {
    fn new(measure_from: Instant, until: Instant) -> Self {
        Self {
            measure_from,
            until,
            requests: 0,
            keys: 0,
            last_end: measure_from,
            latencies_us: Vec::new(),
        }
    }

    /// The start time of the next request, or `None` when time is up.
    fn next(&self) -> Option<Instant> {
        let now = Instant::now();
        (now < self.until).then_some(now)
    }

    fn record(&mut self, started: Instant, keys: usize) {
        let end = Instant::now();
        if started >= self.measure_from {
            self.requests += 1;
            self.keys += keys as u64;
            self.latencies_us
                .push((end - started).as_micros().min(u32::MAX as u128) as u32);
            self.last_end = end;
        }
    }
}

/// Where the server's CPU time is read.
#[derive(Clone, Copy)]
enum CpuSource {
    /// The threads of this process named `freshd-server`.
    Threads,
    /// A whole process.
    Process(u32),
}

impl CpuSource {
    fn read(self, ticks: u64) -> Duration {
        match self {
            CpuSource::Process(pid) => process_cpu(pid, ticks),
            CpuSource::Threads => threads_cpu(&["freshd-server"], ticks),
        }
    }
}

/// Runs one closed-loop task per connection for the warm-up and `secs`, and
/// sums what they saw. `op` sends one request on a connection and returns
/// how many keys it checked.
async fn closed_loop<C, F, Fut>(
    conns: Vec<C>,
    secs: u64,
    cpu: CpuSource,
    ticks: u64,
    op: F,
) -> Measured
where
    C: Send + 'static,
    F: Fn(C, SmallRng) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = (C, SmallRng, usize)> + Send + 'static,
{
    let measure_from = Instant::now() + WARM_UP;
    let until = measure_from + Duration::from_secs(secs);
    let op = Arc::new(op);
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut rec = Recorder::new(measure_from, until);
                let mut state = (conn, SmallRng::seed_from_u64(i as u64 + 1));
                while let Some(started) = rec.next() {
                    let (conn, rng, keys) = op(state.0, state.1).await;
                    rec.record(started, keys);
                    state = (conn, rng);
                }
                rec
            })
        })
        .collect();
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_start = cpu.read(ticks);
    let wall_start = Instant::now();
    let mut total = Measured {
        requests: 0,
        keys: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
        server_cpu: Duration::ZERO,
    };
    let mut last_end = measure_from;
    for task in tasks {
        let rec = task.await.expect("client task");
        total.requests += rec.requests;
        total.keys += rec.keys;
        total.latencies_us.extend(rec.latencies_us);
        last_end = last_end.max(rec.last_end);
    }
    let cpu_end = cpu.read(ticks);
    let wall = wall_start.elapsed();
    total.elapsed = last_end - measure_from;
    // Scale the CPU read over [wall_start, now] to the measured window.
    total.server_cpu =
        (cpu_end - cpu_start).mul_f64(total.elapsed.as_secs_f64() / wall.as_secs_f64());
    total.latencies_us.sort_unstable();
    total
}

/// `n` distinct random key indices.
fn pick(rng: &mut SmallRng, keys: usize, n: usize) -> Vec<usize> {
    if n == 1 {
        vec![rng.random_range(0..keys)]
    } else {
        sample(rng, keys, n).into_vec()
    }
}

async fn freshd_clients(url: &str, n: usize) -> Vec<CoordinatorClient<Channel>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        // One channel each: one HTTP/2 connection per task, like Redis.
        let channel = Channel::from_shared(url.to_owned())
            .expect("url")
            .connect()
            .await
            .expect("connect to freshd");
        clients.push(
            CoordinatorClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        );
    }
    clients
}

async fn redis_conns(port: u16, n: usize) -> Vec<AsyncConn> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(
            AsyncConn::connect(redis::local(port))
                .await
                .expect("connect to redis"),
        );
    }
    conns
}

/// Registers every key through gRPC `Fill`, `tasks` at a time; returns the
/// versions and the fills per second.
async fn fill_freshd(url: &str, names: Arc<Vec<String>>, tasks: usize) -> (Vec<u64>, f64) {
    let clients = freshd_clients(url, tasks).await;
    let start = Instant::now();
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(t, mut client)| {
            let names = names.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in (t..names.len()).step_by(tasks) {
                    let response = client
                        .fill(FillRequest {
                            key: names[i].clone(),
                            dependencies: vec![format!("posts:author:{}", i % 10_000)],
                            ttl_ms: TTL_MS,
                            ..Default::default()
                        })
                        .await
                        .expect("fill");
                    out.push((i, response.into_inner().version));
                }
                out
            })
        })
        .collect();
    let mut versions = vec![0; names.len()];
    for handle in handles {
        for (i, v) in handle.await.expect("fill task") {
            versions[i] = v;
        }
    }
    let rate = names.len() as f64 / start.elapsed().as_secs_f64();
    (versions, rate)
}

/// `SET`s every key to its version, pipelined.
async fn fill_redis(port: u16, keys: &Keys) {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to redis");
    let (read, mut write) = conn.split();
    let mut buf = Vec::new();
    for (name, version) in keys.names.iter().zip(&keys.versions) {
        redis::encode(
            &[b"SET", name.as_bytes(), version.to_string().as_bytes()],
            &mut buf,
        );
    }
    // Write and read at once, so that neither side's buffers fill up.
    let writer = async {
        write.write_all(&buf).await.expect("write to redis");
    };
    let reader = async {
        use tokio::io::AsyncReadExt;
        let expected = keys.names.len() * b"+OK\r\n".len();
        let mut got = vec![0u8; expected];
        let mut read = read;
        read.read_exact(&mut got).await.expect("read from redis");
        assert!(got.chunks(5).all(|c| c == b"+OK\r\n"), "SET failed");
    };
    tokio::join!(writer, reader);
}

async fn measure_freshd(
    url: &str,
    keys: Arc<Keys>,
    w: Workload,
    s: &Settings,
    ticks: u64,
) -> Measured {
    let clients = freshd_clients(url, s.tasks).await;
    let n = keys.names.len();
    closed_loop(
        clients,
        s.secs,
        CpuSource::Threads,
        ticks,
        move |mut client, mut rng| {
            let keys = keys.clone();
            async move {
                let picked = pick(&mut rng, n, w.batch);
                if w.batch == 1 {
                    let i = picked[0];
                    let answer = client
                        .check(CheckRequest {
                            key: keys.names[i].clone(),
                            version: keys.versions[i],
                            ..Default::default()
                        })
                        .await
                        .expect("check")
                        .into_inner();
                    assert_eq!(answer.freshness(), Freshness::Fresh);
                } else {
                    let items = picked
                        .iter()
                        .map(|&i| CheckItem {
                            key: keys.names[i].clone(),
                            version: keys.versions[i],
                            ..Default::default()
                        })
                        .collect();
                    let answer = client
                        .check_batch(CheckBatchRequest {
                            items,
                            ..Default::default()
                        })
                        .await
                        .expect("check_batch")
                        .into_inner();
                    assert_eq!(answer.results.len(), w.batch);
                    assert!(answer
                        .results
                        .iter()
                        .all(|r| r.freshness() == Freshness::Fresh));
                }
                (client, rng, w.batch)
            }
        },
    )
    .await
}

fn redis_version_matches(reply: &Reply, version: u64) -> bool {
    match reply {
        Reply::Bulk(Some(v)) => {
            std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                == Some(version)
        }
        _ => false,
    }
}

async fn measure_redis(
    port: u16,
    pid: u32,
    keys: Arc<Keys>,
    w: Workload,
    s: &Settings,
    ticks: u64,
) -> Measured {
    let conns = redis_conns(port, s.tasks).await;
    let n = keys.names.len();
    closed_loop(
        conns,
        s.secs,
        CpuSource::Process(pid),
        ticks,
        move |mut conn, mut rng| {
            let keys = keys.clone();
            async move {
                let picked = pick(&mut rng, n, w.batch);
                if w.batch == 1 {
                    let i = picked[0];
                    let reply = conn
                        .command(&[b"GET", keys.names[i].as_bytes()])
                        .await
                        .expect("GET");
                    assert!(redis_version_matches(&reply, keys.versions[i]));
                } else {
                    let mut args: Vec<&[u8]> = Vec::with_capacity(w.batch + 1);
                    args.push(b"MGET");
                    args.extend(picked.iter().map(|&i| keys.names[i].as_bytes()));
                    let reply = conn.command(&args).await.expect("MGET");
                    let Reply::Array(Some(values)) = reply else {
                        panic!("MGET answered {reply:?}");
                    };
                    assert_eq!(values.len(), w.batch);
                    assert!(values
                        .iter()
                        .zip(&picked)
                        .all(|(v, &i)| redis_version_matches(v, keys.versions[i])));
                }
                (conn, rng, w.batch)
            }
        },
    )
    .await
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}", a / b)
}

fn main() -> ExitCode {
    let s = Settings {
        keys: env_usize("LOOPBACK_KEYS", KEYS),
        tasks: env_usize("LOOPBACK_TASKS", TASKS),
        secs: env_usize("LOOPBACK_SECS", SECS as usize) as u64,
        server_threads: env_usize("LOOPBACK_SERVER_THREADS", SERVER_THREADS),
    };
    let redis = match RedisServer::start() {
        Ok(r) => r,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::FAILURE;
        }
    };
    let ticks = ticks_per_sec();
    let Bench {
        server_rt,
        client_rt,
        server,
    } = Bench::start(s.server_threads);
    let url = server.url();

    println!(
        "freshd {} on {} ({} server threads), {} on port {}",
        env!("CARGO_PKG_VERSION"),
        server.addr,
        s.server_threads,
        RedisServer::version(),
        redis.port
    );
    println!(
        "{} keys, {} concurrent tasks (one connection each), {} s measured after 1 s warm-up per row\n",
        s.keys, s.tasks, s.secs
    );

    let names: Arc<Vec<String>> = Arc::new((0..s.keys).map(|i| format!("feed:user:{i}")).collect());
    let (versions, fill_rate) = client_rt.block_on(fill_freshd(&url, names.clone(), s.tasks));
    let keys = Arc::new(Keys {
        names: Arc::unwrap_or_clone(names),
        versions,
    });
    let set_start = Instant::now();
    client_rt.block_on(fill_redis(redis.port, &keys));
    let set_rate = keys.names.len() as f64 / set_start.elapsed().as_secs_f64();
    let stats = server.store.stats();
    println!(
        "setup: freshd Fill (gRPC, {} tasks, 1 dependency each): {:.0} fills/s, store holds {} keys / {} edges; \
         Redis SET (one pipelined connection): {:.0} sets/s\n",
        s.tasks, fill_rate, stats.keys, stats.edges, set_rate
    );

    let mut rows = Vec::new();
    for w in WORKLOADS {
        let f = client_rt.block_on(measure_freshd(&url, keys.clone(), w, &s, ticks));
        let r = client_rt.block_on(measure_redis(
            redis.port,
            redis.pid(),
            keys.clone(),
            w,
            &s,
            ticks,
        ));
        eprintln!(
            "{:>16}: freshd {:>10.0} keys/s | {:>10}: redis {:>10.0} keys/s",
            w.freshd,
            f.keys_per_sec(),
            w.redis,
            r.keys_per_sec()
        );
        rows.push((w, f, r));
    }

    println!("Throughput ({} concurrent closed-loop tasks)\n", s.tasks);
    println!("| workload | freshd | redis | ratio freshd/redis |");
    println!("|---|---:|---:|---:|");
    for (w, f, r) in &rows {
        if w.batch == 1 {
            println!(
                "| {} vs {}, requests/s | {:.0} | {:.0} | {} |",
                w.freshd,
                w.redis,
                f.requests_per_sec(),
                r.requests_per_sec(),
                ratio(f.requests_per_sec(), r.requests_per_sec())
            );
        } else {
            println!(
                "| {} vs {}, keys/s | {:.0} | {:.0} | {} |",
                w.freshd,
                w.redis,
                f.keys_per_sec(),
                r.keys_per_sec(),
                ratio(f.keys_per_sec(), r.keys_per_sec())
            );
            println!(
                "| {} vs {}, requests/s | {:.0} | {:.0} | {} |",
                w.freshd,
                w.redis,
                f.requests_per_sec(),
                r.requests_per_sec(),
                ratio(f.requests_per_sec(), r.requests_per_sec())
            );
        }
    }

    println!("\nLatency per request, µs (p50 / p99)\n");
    println!("| workload | freshd p50 | redis p50 | ratio | freshd p99 | redis p99 | ratio |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (w, f, r) in &rows {
        let (f50, r50, f99, r99) = (
            f.percentile_us(0.50),
            r.percentile_us(0.50),
            f.percentile_us(0.99),
            r.percentile_us(0.99),
        );
        println!(
            "| {} vs {} | {} | {} | {} | {} | {} | {} |",
            w.freshd,
            w.redis,
            f50,
            r50,
            ratio(f50 as f64, r50.max(1) as f64),
            f99,
            r99,
            ratio(f99 as f64, r99.max(1) as f64)
        );
    }

    println!(
        "\nServer CPU per 1,000 keys checked, µs (freshd: `freshd-server` threads; Redis: redis-server process)\n"
    );
    println!(
        "| workload | freshd | redis | ratio freshd/redis | freshd cores busy | redis cores busy |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (w, f, r) in &rows {
        println!(
            "| {} vs {} | {:.0} | {:.0} | {} | {:.2} | {:.2} |",
            w.freshd,
            w.redis,
            f.cpu_us_per_1k_keys(),
            r.cpu_us_per_1k_keys(),
            ratio(f.cpu_us_per_1k_keys(), r.cpu_us_per_1k_keys()),
            f.server_cpu.as_secs_f64() / f.elapsed.as_secs_f64(),
            r.server_cpu.as_secs_f64() / r.elapsed.as_secs_f64(),
        );
    }

    drop(client_rt);
    if let Err(e) = server_rt.block_on(server.stop()) {
        eprintln!("freshd stopped with an error: {e}");
    }
    drop(redis);
    ExitCode::SUCCESS
}
