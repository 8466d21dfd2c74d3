//! Version checks: `Check` / `CheckBatch` against Redis `GET` / `MGET` /
//! pipelined `GET`, over `conns` connections.
//!
//! Setup: `keys` keys `check:N`. freshd registers each with `Fill` and one
//! dependency (`check-dep:N%1000`), and the answer must be `FRESH` with the
//! version the fill gave; Redis holds `SET check:N N`, and the value read
//! must be `N`. A batch has distinct random keys.
//!
//! A run is `batch@rate`: rate 0 is closed loop (each connection sends,
//! waits for the answer, sends again: the throughput at that concurrency,
//! latency from the actual send); a positive rate is open loop (requests at
//! that rate in total, dealt to the connections in turn, sent whether or not
//! earlier ones were answered; latency from the intended send time).

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use freshd::pb::{
    CheckBatchRequest, CheckBatchResponse, CheckItem, CheckRequest, CheckResponse, FillRequest,
    Freshness,
};
use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::mpsc;

use crate::pace::{self, Tick};
use crate::resp::{self, AsyncConn, Reply};
use crate::stats::{Latencies, Report};
use crate::{freshd_client, grpc, parallel, secs, socket_addr, Error, Target};

/// How Redis answers a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RedisBatch {
    /// One `MGET k1 .. kn`.
    Mget,
    /// `n` `GET`s written at once, the replies read after.
    Pipeline,
}

/// One measurement: keys per request and requests per second (0: closed
/// loop).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Run {
    /// Keys per request.
    pub batch: usize,
    /// Requests per second in total; 0 for closed loop.
    pub rate: f64,
}

impl Run {
    /// Parses `batch@rate` (or `batch`, closed loop).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let text = text.trim();
        let (batch, rate) = text.split_once('@').unwrap_or((text, "0"));
        let run = Self {
            batch: batch
                .parse()
                .map_err(|_| format!("bad batch in {text:?}"))?,
            rate: rate.parse().map_err(|_| format!("bad rate in {text:?}"))?,
        };
        if run.batch == 0 || run.rate < 0.0 {
            return Err(format!("bad run {text:?}"));
        }
        Ok(run)
    }
}

/// Settings of the check workload.
#[derive(Clone, Debug)]
pub struct CheckOpts {
    /// Which server.
    pub target: Target,
    /// Its `host:port`.
    pub addr: String,
    /// Connections.
    pub conns: usize,
    /// Closed loop, freshd: requests in flight on each connection (HTTP/2
    /// streams, as a gRPC client sharing one channel sends them). Redis
    /// connections carry one request at a time, so it must be 1 there.
    pub streams: usize,
    /// Keys registered before measuring.
    pub keys: usize,
    /// The measurements, in order.
    pub runs: Vec<Run>,
    /// How Redis answers batches; each listed way is one measurement.
    pub redis_batch: Vec<RedisBatch>,
    /// Warm-up seconds before each measurement.
    pub warmup: f64,
    /// Measured seconds.
    pub secs: f64,
}

/// What a measurement counts.
#[derive(Default)]
struct Tally {
    ops: AtomicU64,
    errors: AtomicU64,
    latencies: Mutex<Latencies>,
}

impl Tally {
    fn ok(&self, latency: Duration) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.latencies.lock().record(latency);
    }

    fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// One client connection, of either kind.
enum Conn {
    Freshd(Box<grpc::Conn>),
    Redis(AsyncConn),
}

/// A request: the key indexes it checks.
fn pick(rng: &mut SmallRng, keys: usize, batch: usize) -> Vec<usize> {
    if batch == 1 {
        vec![rng.random_range(0..keys)]
    } else {
        sample(rng, keys, batch.min(keys)).into_vec()
    }
}

fn key(i: usize) -> String {
    format!("check:{i}")
}

/// The registered keys: each one's name, formatted once so that neither
/// side's requests pay for it, and the version it was filled at (Redis:
/// its index, its value).
struct Keys {
    names: Vec<String>,
    versions: Vec<u64>,
}

/// Encodes the Redis commands of one request on `keys`.
fn redis_request(reg: &Keys, keys: &[usize], how: RedisBatch, out: &mut Vec<u8>) -> usize {
    out.clear();
    let name = |i: usize| reg.names[i].as_bytes();
    if keys.len() == 1 {
        resp::encode(&[b"GET", name(keys[0])], out);
        return 1;
    }
    match how {
        RedisBatch::Mget => {
            let mut args: Vec<&[u8]> = Vec::with_capacity(1 + keys.len());
            args.push(b"MGET");
            args.extend(keys.iter().map(|&i| name(i)));
            resp::encode(&args, out);
            1
        }
        RedisBatch::Pipeline => {
            for &i in keys {
                resp::encode(&[b"GET", name(i)], out);
            }
            keys.len()
        }
    }
}

/// Whether Redis's replies to a request on `keys` are right.
fn redis_right(keys: &[usize], replies: &[Reply]) -> bool {
    let value_is = |reply: &Reply, i: usize| {
        matches!(reply, Reply::Bulk(Some(v))
            if std::str::from_utf8(v).ok().and_then(|v| v.parse().ok()) == Some(i))
    };
    match replies {
        [Reply::Array(Some(items))] if keys.len() > 1 => {
            items.len() == keys.len() && items.iter().zip(keys).all(|(r, &i)| value_is(r, i))
        }
        _ => replies.len() == keys.len() && replies.iter().zip(keys).all(|(r, &i)| value_is(r, i)),
    }
}

/// A freshd request: its keys, and the moment its latency counts from.
struct Sent {
    from: Instant,
    keys: Vec<usize>,
}

/// Sends freshd requests on `conn` as `next` yields them (`Check` for one
/// key, `CheckBatch` for more), and hands each to `answered` with whether
/// its answer was right. An error only when the connection fails.
async fn freshd_calls(
    conn: &mut grpc::Conn,
    batch: usize,
    reg: &Keys,
    next: impl FnMut(&mut Context<'_>, usize) -> Poll<Option<Sent>>,
    mut answered: impl FnMut(Sent, bool),
) -> Result<(), Error> {
    let fresh = |freshness: i32, version: u64, i: usize| {
        freshness == Freshness::Fresh as i32 && version == reg.versions[i]
    };
    if batch == 1 {
        conn.calls(
            "/freshd.v1.Coordinator/Check",
            next,
            |sent: &Sent| CheckRequest {
                key: reg.names[sent.keys[0]].clone(),
                version: reg.versions[sent.keys[0]],
                ..Default::default()
            },
            |sent, answer: Result<CheckResponse, Error>| {
                let right = answer.is_ok_and(|r| fresh(r.freshness, r.version, sent.keys[0]));
                answered(sent, right)
            },
        )
        .await
    } else {
        conn.calls(
            "/freshd.v1.Coordinator/CheckBatch",
            next,
            |sent: &Sent| CheckBatchRequest {
                items: sent
                    .keys
                    .iter()
                    .map(|&i| CheckItem {
                        key: reg.names[i].clone(),
                        version: reg.versions[i],
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
            |sent, answer: Result<CheckBatchResponse, Error>| {
                let right = answer.is_ok_and(|r| {
                    r.results.len() == sent.keys.len()
                        && r.results
                            .iter()
                            .zip(&sent.keys)
                            .all(|(r, &i)| fresh(r.freshness, r.version, i))
                });
                answered(sent, right)
            },
        )
        .await
    }
}

/// Registers the keys; answers the version of each (Redis: its index).
async fn prepare(opts: &CheckOpts) -> Result<Arc<Keys>, Error> {
    match opts.target {
        Target::Freshd => {
            let client = freshd_client(&opts.addr).await?;
            let versions: Arc<Vec<AtomicU64>> =
                Arc::new((0..opts.keys).map(|_| AtomicU64::new(0)).collect());
            let v = versions.clone();
            parallel(opts.keys, 64, move |_, i| {
                let (mut client, v) = (client.clone(), v.clone());
                async move {
                    let r = client
                        .fill(FillRequest {
                            key: key(i),
                            dependencies: vec![format!("check-dep:{}", i % 1000)],
                            ttl_ms: 24 * 3_600_000,
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| format!("fill {i}: {e}"))?;
                    v[i].store(r.get_ref().version, Ordering::Relaxed);
                    Ok(())
                }
            })
            .await?;
            Ok(Arc::new(Keys {
                names: (0..opts.keys).map(key).collect(),
                versions: versions.iter().map(|v| v.load(Ordering::Relaxed)).collect(),
            }))
        }
        Target::Redis => {
            let mut conn = resp::SyncConn::connect(socket_addr(&opts.addr)?)
                .map_err(|e| format!("cannot connect to redis {}: {e}", opts.addr))?;
            let mut pipe = resp::Pipeline::new(&mut conn, 1000);
            for i in 0..opts.keys {
                let (k, v) = (key(i), i.to_string());
                pipe.push(&[b"SET", k.as_bytes(), v.as_bytes()])
                    .map_err(|e| format!("SET: {e}"))?;
            }
            pipe.flush().map_err(|e| format!("SET: {e}"))?;
            Ok(Arc::new(Keys {
                names: (0..opts.keys).map(key).collect(),
                versions: (0..opts.keys as u64).collect(),
            }))
        }
        Target::Etcd | Target::Floor => {
            Err("the check workload runs against freshd or redis".into())
        }
    }
}

/// Runs every measurement of `opts`.
pub async fn run(opts: &CheckOpts) -> Result<Vec<Report>, Error> {
    if opts.keys == 0 || opts.conns == 0 || opts.streams == 0 {
        return Err("keys, conns and streams must be positive".into());
    }
    if opts.streams > 1 && opts.target != Target::Freshd {
        return Err("streams above 1 need HTTP/2: freshd only".into());
    }
    let reg = prepare(opts).await?;
    let mut reports = Vec::new();
    for run in &opts.runs {
        let ways: Vec<Option<RedisBatch>> = match opts.target {
            Target::Redis if run.batch > 1 => opts.redis_batch.iter().copied().map(Some).collect(),
            Target::Redis => vec![Some(RedisBatch::Mget)],
            _ => vec![None],
        };
        for way in ways {
            reports.push(measure(opts, *run, way, reg.clone()).await?);
        }
    }
    Ok(reports)
}

async fn connect(opts: &CheckOpts) -> Result<Vec<Conn>, Error> {
    let mut conns = Vec::with_capacity(opts.conns);
    for _ in 0..opts.conns {
        conns.push(match opts.target {
            Target::Freshd => Conn::Freshd(Box::new(grpc::Conn::connect(&opts.addr).await?)),
            _ => Conn::Redis(
                AsyncConn::connect(socket_addr(&opts.addr)?)
                    .await
                    .map_err(|e| format!("cannot connect to redis {}: {e}", opts.addr))?,
            ),
        });
    }
    Ok(conns)
}

async fn measure(
    opts: &CheckOpts,
    run: Run,
    way: Option<RedisBatch>,
    reg: Arc<Keys>,
) -> Result<Report, Error> {
    let conns = connect(opts).await?;
    let tally = Arc::new(Tally::default());
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + secs(opts.warmup);
    let until = measure_from + secs(opts.secs);
    let cpu = crate::cpu::window(measure_from, until);
    let way_or = way.unwrap_or(RedisBatch::Mget);
    let mut unanswered = 0;
    if run.rate == 0.0 {
        let mut tasks = Vec::new();
        for (c, conn) in conns.into_iter().enumerate() {
            let (tally, reg) = (tally.clone(), reg.clone());
            let (keys, batch, streams) = (opts.keys, run.batch, opts.streams);
            tasks.push(tokio::spawn(async move {
                let mut rng = SmallRng::seed_from_u64(c as u64 + 1);
                let record = |sent: Instant, right: bool| {
                    let done = Instant::now();
                    if sent >= measure_from && done <= until {
                        if right {
                            tally.ok(done - sent);
                        } else {
                            tally.error();
                        }
                    }
                };
                tokio::time::sleep_until(start.into()).await;
                match conn {
                    // `streams` closed loops on one connection (HTTP/2
                    // streams): a new request as soon as one is answered.
                    Conn::Freshd(mut conn) => {
                        freshd_calls(
                            &mut conn,
                            batch,
                            &reg,
                            |_, in_flight| {
                                let from = Instant::now();
                                if from >= until {
                                    Poll::Ready(None)
                                } else if in_flight < streams {
                                    let keys = pick(&mut rng, keys, batch);
                                    Poll::Ready(Some(Sent { from, keys }))
                                } else {
                                    Poll::Pending
                                }
                            },
                            |sent, right| record(sent.from, right),
                        )
                        .await
                    }
                    Conn::Redis(mut redis) => {
                        let mut out = Vec::new();
                        loop {
                            let sent = Instant::now();
                            if sent >= until {
                                return Ok(());
                            }
                            let picked = pick(&mut rng, keys, batch);
                            let n = redis_request(&reg, &picked, way_or, &mut out);
                            let right = redis_exchange(&mut redis, &out, n)
                                .await
                                .is_some_and(|r| redis_right(&picked, &r));
                            record(sent, right);
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.map_err(|e| format!("client task: {e}"))??;
        }
    } else {
        let mut queues = Vec::new();
        let mut tasks = Vec::new();
        let in_flight = Arc::new(AtomicU64::new(0));
        for (c, conn) in conns.into_iter().enumerate() {
            let (tx, rx) = mpsc::unbounded_channel::<Tick>();
            queues.push(tx);
            let (tally, reg, in_flight) = (tally.clone(), reg.clone(), in_flight.clone());
            let (keys, batch) = (opts.keys, run.batch);
            tasks.push(tokio::spawn(open_conn(
                conn,
                rx,
                c,
                keys,
                batch,
                way_or,
                reg,
                tally,
                in_flight,
                measure_from,
            )));
        }
        let pacer = pace::spawn(run.rate, start, until, None, queues);
        let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
        // Let what was sent finish, for at most 10 s.
        let drain_end = Instant::now() + Duration::from_secs(10);
        for t in tasks {
            let left = drain_end.saturating_duration_since(Instant::now());
            if let Ok(r) = tokio::time::timeout(left, t).await {
                r.map_err(|e| format!("client task: {e}"))?;
            }
        }
        unanswered = in_flight.load(Ordering::Relaxed);
    }
    let latencies = tally.latencies.lock().clone();
    let ops = tally.ops.load(Ordering::Relaxed);
    let variant = match (opts.target, run.batch, way) {
        (Target::Freshd, 1, _) if opts.streams > 1 && run.rate == 0.0 => {
            format!("Check, {} streams per conn", opts.streams)
        }
        (Target::Freshd, 1, _) => "Check".to_owned(),
        (Target::Freshd, n, _) if opts.streams > 1 && run.rate == 0.0 => {
            format!("CheckBatch {n}, {} streams per conn", opts.streams)
        }
        (Target::Freshd, n, _) => format!("CheckBatch {n}"),
        (_, 1, _) => "GET".to_owned(),
        (_, n, Some(RedisBatch::Pipeline)) => format!("pipelined GET {n}"),
        (_, n, _) => format!("MGET {n}"),
    };
    let used = cpu.await.unwrap_or_default();
    Ok(Report {
        workload: "check".into(),
        target: opts.target.name().into(),
        variant,
        mode: if run.rate == 0.0 { "closed" } else { "open" }.into(),
        params: json!({
            "conns": opts.conns, "streams": opts.streams, "keys": opts.keys, "batch": run.batch,
            "rate": run.rate, "warmup_s": opts.warmup,
        }),
        secs: opts.secs,
        ops,
        ops_per_sec: ops as f64 / opts.secs,
        keys_per_sec: (ops * run.batch as u64) as f64 / opts.secs,
        errors: tally.errors.load(Ordering::Relaxed) + unanswered,
        latency: Some(latencies.summary()),
        server_cpu_s: used.server_s,
        load_cpu_s: used.load_s,
        extra: json!({ "unanswered": unanswered }),
    })
}

/// Writes a request and reads its `n` replies.
async fn redis_exchange(conn: &mut AsyncConn, bytes: &[u8], n: usize) -> Option<Vec<Reply>> {
    conn.write_raw(bytes).await.ok()?;
    let mut replies = Vec::with_capacity(n);
    for _ in 0..n {
        replies.push(conn.read_reply().await.ok()?);
    }
    Some(replies)
}

/// One connection of an open-loop measurement: sends at each tick, records
/// the latency from the tick's intended time.
#[allow(clippy::too_many_arguments)]
async fn open_conn(
    conn: Conn,
    mut ticks: mpsc::UnboundedReceiver<Tick>,
    c: usize,
    keys: usize,
    batch: usize,
    way: RedisBatch,
    reg: Arc<Keys>,
    tally: Arc<Tally>,
    in_flight: Arc<AtomicU64>,
    measure_from: Instant,
) {
    let mut rng = SmallRng::seed_from_u64(c as u64 + 1);
    match conn {
        Conn::Freshd(mut conn) => {
            // A connection that fails leaves its calls unanswered.
            let _ = freshd_calls(
                &mut conn,
                batch,
                &reg,
                |cx, _| {
                    ticks.poll_recv(cx).map(|tick| {
                        tick.map(|tick| {
                            in_flight.fetch_add(1, Ordering::Relaxed);
                            let keys = pick(&mut rng, keys, batch);
                            Sent {
                                from: tick.intended,
                                keys,
                            }
                        })
                    })
                },
                |sent, right| {
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    if sent.from >= measure_from {
                        if right {
                            tally.ok(sent.from.elapsed());
                        } else {
                            tally.error();
                        }
                    }
                },
            )
            .await;
        }
        Conn::Redis(redis) => {
            let (mut reader, mut writer) = redis.into_split();
            let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<(Tick, Vec<usize>, usize)>();
            let read = {
                let (tally, in_flight) = (tally.clone(), in_flight.clone());
                tokio::spawn(async move {
                    while let Some((tick, picked, n)) = sent_rx.recv().await {
                        let mut replies = Vec::with_capacity(n);
                        for _ in 0..n {
                            match reader.read_reply().await {
                                Ok(r) => replies.push(r),
                                Err(_) => return,
                            }
                        }
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                        if tick.intended >= measure_from {
                            if redis_right(&picked, &replies) {
                                tally.ok(tick.intended.elapsed());
                            } else {
                                tally.error();
                            }
                        }
                    }
                })
            };
            let mut out = Vec::new();
            while let Some(tick) = ticks.recv().await {
                use tokio::io::AsyncWriteExt;
                let picked = pick(&mut rng, keys, batch);
                let n = redis_request(&reg, &picked, way, &mut out);
                in_flight.fetch_add(1, Ordering::Relaxed);
                let _ = sent_tx.send((tick, picked, n));
                if writer.write_all(&out).await.is_err() {
                    break;
                }
            }
            drop(sent_tx);
            let _ = read.await;
        }
    }
}
