//! The invalidation stream against Redis, in the same run: how long a change
//! takes to reach subscribers, and how many notices per second reach 1,000
//! of them. Prints markdown tables.
//!
//! - freshd: a real gRPC server started in-process with
//!   `RunningServer::start(Config::ephemeral())` on its own tokio runtime
//!   (threads named `freshd-server`, 2 workers by default). Subscribers are
//!   `Watch` streams, each on its own tonic channel (one HTTP/2 connection per
//!   stream; `NOTICES_STREAMS_PER_CONNECTION` shares them), tracking keys
//!   (tracking mode) given in `start.track`. Changes go in through the
//!   `Publish` RPC on a connection of their own.
//! - Redis: a real `redis-server` child on a free loopback port
//!   (`--save '' --appendonly no`). Peers: RESP3 client-side caching
//!   (`HELLO 3`, `CLIENT TRACKING on`, the keys read with `MGET`; a `SET`
//!   pushes `invalidate` to every client that read the key), RESP3 tracking
//!   in broadcast mode (`CLIENT TRACKING on BCAST PREFIX p`, no read needed),
//!   and pub/sub (`SUBSCRIBE` / `PUBLISH`, RESP2), each subscriber on its own
//!   connection.
//! - Subscribers run as tasks on one client runtime (threads `bench-client`,
//!   2 workers) in this process; writers on threads of their own
//!   (`bench-writer`). Server CPU is read from `/proc`: the `freshd-server`
//!   threads, or the whole `redis-server` process; client CPU is the
//!   `bench-client` and `bench-writer` threads.
//!
//! # Publish-to-notice latency (open loop)
//! Runs (subscribers @ changes per second): 1 @ 200, 100 @ 200, 1,000 @ 200,
//! and 1,000 @ 20, where the machine is not saturated. Every subscriber
//! tracks the same `rate x (1 + SECS)` keys `hot:0`, `hot:1`, ... (registered
//! with `Fill` in freshd, `SET` in Redis): a set of popular keys that every
//! cache instance holds. A writer changes them one at a time, in order, at a
//! fixed rate: change `i` is scheduled at `start + i / rate` and sent at that
//! time whether or not earlier ones were answered (each freshd `Publish` is
//! its own task on the writer's runtime; Redis commands are written without
//! waiting for replies, which another task reads). Each key changes once, so
//! a notice's key names the change it reports and nothing is conflated or
//! merged. For every notice each subscriber receives, latency = receive time
//! minus the *scheduled* send time, so a late writer or a stalled server
//! counts against the system instead of hiding (no coordinated omission).
//! The writer sleeps with tokio's timer (millisecond granularity) to 1.5 ms
//! before the scheduled time, then with `thread::sleep` for the rest; how
//! late it actually sent is reported, and so is the latency from the actual
//! send. The first second is warm-up and not counted. A subscriber that has
//! every notice keeps its stream open until all have: closing streams costs
//! the server work that would delay the others.
//!
//! - freshd: `Publish {changes: [hot:i]}`; notice `{key: hot:i}`.
//! - Redis tracking: `SET hot:i v`; push `invalidate [hot:i]`. Default
//!   tracking forgets a key for a client once it has sent its invalidation,
//!   which is why each key changes once: no re-read is needed.
//! - Redis pub/sub: `PUBLISH hot i` on one channel all subscribe to;
//!   message `i`.
//!
//! # Fan-out throughput to 1,000 subscribers (closed loop)
//! 1,000 subscribers, one writer that sends as fast as it is answered, 1 s
//! of warm-up, then `SECS` s counted at the subscribers: notices (or keys,
//! or messages) received per second across all of them.
//!
//! - freshd: every stream tracks the 1,000 keys `fan:0..999`; each
//!   `Publish` carries 10 changes (`fan:j..j+9`, cycling). A stream that
//!   falls behind gets notices in batches of up to 512 and, for a key still
//!   queued, only the latest (conflation), so fewer notices than
//!   changes x subscribers may arrive: the table says how many.
//! - Redis pub/sub: pipelined rounds of 10 `PUBLISH fan j` (one round trip per
//!   10, like one freshd `Publish` of 10 changes); every message is
//!   delivered (Redis buffers for slow subscribers).
//! - Redis tracking BCAST: every subscriber `CLIENT TRACKING on BCAST PREFIX
//!   fan:`; pipelined rounds of 10 `SET fan:j`. Redis sends the keys a prefix
//!   collected during one event-loop iteration as one push.
//!
//! Settings, by environment: `NOTICES_CASES` (the latency runs,
//! `1@200,100@200,1000@200,1000@20`; empty for none), `NOTICES_SECS`
//! (measured seconds per run, 5), `NOTICES_FANOUT_SUBSCRIBERS` (1000; 0 for
//! no fan-out run), `NOTICES_STREAMS_PER_CONNECTION` (1),
//! `NOTICES_SERVER_THREADS` (2), `NOTICES_REDIS` (1; 0 skips the Redis
//! peers, to profile freshd alone), `NOTICES_SLOW_MS` (unset; prints which
//! changes reached some subscriber later than this, and which subscribers).
//!
//! Run: `cargo bench --bench notices` (about two minutes once built). Exits
//! non-zero when `redis-server` is not installed.

#[path = "support/harness.rs"]
mod harness;
#[path = "support/redis.rs"]
mod redis;

use harness::{env_usize, process_cpu, threads_cpu, ticks_per_sec, Bench};
use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use freshd::pb::coordinator_client::CoordinatorClient;
use freshd::pb::watch_request::Request as WatchIn;
use freshd::pb::watch_response::Response as WatchOut;
use freshd::pb::{Change, CheckRequest, FillRequest, PublishRequest, WatchRequest, WatchStart};
use freshd::server::RunningServer;
use hdrhistogram::Histogram;
use redis::{AsyncConn, Pipeline, RedisServer, Reply, SyncConn};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// The latency runs: subscribers and changes per second, as
/// `NOTICES_CASES` writes them.
const CASES: &str = "1@200,100@200,1000@200,1000@20";
/// Measured seconds per run.
const SECS: u64 = 5;
/// Warm-up before each measurement.
const WARM_UP: Duration = Duration::from_secs(1);
/// Subscribers of the fan-out runs.
const FANOUT_SUBSCRIBERS: usize = 1000;
/// Keys every fan-out subscriber tracks.
const FANOUT_KEYS: usize = 1000;
/// Changes per `Publish`, and commands per pipelined Redis round.
const FANOUT_BATCH: usize = 10;
/// Worker threads of freshd's server runtime.
const SERVER_THREADS: usize = 2;
/// Connections opened at once while subscribers start.
const CONNECT_CONCURRENCY: usize = 64;
/// How long subscribers may take to receive the last notices after the
/// writer stops.
const DRAIN: Duration = Duration::from_secs(10);

/// One latency run: how many subscribers, how many changes per second.
#[derive(Clone, Copy)]
struct Case {
    subscribers: usize,
    rate: u64,
}

impl Case {
    /// `N@rate`, or `N` for 200 changes per second.
    fn parse(text: &str) -> Option<Self> {
        let (n, rate) = text.trim().split_once('@').unwrap_or((text.trim(), "200"));
        Some(Self {
            subscribers: n.parse().ok()?,
            rate: rate.parse().ok().filter(|&r| r > 0)?,
        })
    }
}

struct Settings {
    secs: u64,
    cases: Vec<Case>,
    fanout_subscribers: usize,
    streams_per_connection: usize,
    server_threads: usize,
    /// Run the Redis peers (off only to profile freshd alone).
    redis: bool,
}

impl Settings {
    fn from_env() -> Self {
        let cases = std::env::var("NOTICES_CASES").unwrap_or_else(|_| CASES.to_owned());
        Self {
            secs: env_usize("NOTICES_SECS", SECS as usize) as u64,
            cases: cases.split(',').filter_map(Case::parse).collect(),
            fanout_subscribers: env_usize("NOTICES_FANOUT_SUBSCRIBERS", FANOUT_SUBSCRIBERS),
            streams_per_connection: env_usize("NOTICES_STREAMS_PER_CONNECTION", 1).max(1),
            server_threads: env_usize("NOTICES_SERVER_THREADS", SERVER_THREADS),
            redis: env_usize("NOTICES_REDIS", 1) != 0,
        }
    }

    /// Changes in a latency run at `rate`, warm-up included.
    fn changes(&self, rate: u64) -> u64 {
        rate * (WARM_UP.as_secs() + self.secs)
    }
}

// ---------------------------------------------------------------- CPU time

/// Which server is measured.
#[derive(Clone, Copy)]
enum Server {
    Freshd,
    Redis(u32),
}

/// Server and client CPU at one instant.
#[derive(Clone, Copy)]
struct CpuMark {
    at: Instant,
    server: Duration,
    client: Duration,
}

impl CpuMark {
    fn now(server: Server, ticks: u64) -> Self {
        Self {
            at: Instant::now(),
            server: match server {
                Server::Freshd => threads_cpu(&["freshd-server"], ticks),
                Server::Redis(pid) => process_cpu(pid, ticks),
            },
            client: threads_cpu(&["bench-client", "bench-writer"], ticks),
        }
    }

    /// Cores busy `(server, client)` from `self` to `later`.
    fn busy(&self, later: &CpuMark) -> (f64, f64) {
        let wall = (later.at - self.at).as_secs_f64();
        (
            later.server.saturating_sub(self.server).as_secs_f64() / wall,
            later.client.saturating_sub(self.client).as_secs_f64() / wall,
        )
    }
}

// ------------------------------------------------------------ scheduling

/// When each change of a latency run is due: change `i` at
/// `start + i * interval`. `start` is set once every subscriber is ready.
struct Schedule {
    start: OnceLock<Instant>,
    interval: Duration,
    /// Changes `0..warm` are warm-up.
    warm: u64,
    /// Changes in the run.
    total: u64,
}

impl Schedule {
    fn at(&self, i: u64) -> Instant {
        let start = *self.start.get().expect("start is set before any send");
        start + Duration::from_nanos(self.interval.as_nanos() as u64 * i)
    }

    /// The latency of change `i` received at `now`, in ns, if it is counted.
    fn latency_ns(&self, i: u64, now: Instant) -> Option<u64> {
        (i >= self.warm && i < self.total)
            .then(|| now.saturating_duration_since(self.at(i)).as_nanos() as u64)
    }
}

/// Sleeps until `t`: a tokio sleep to 1.5 ms before (tokio's timer has
/// millisecond granularity, and the runtime's other tasks run meanwhile),
/// then a thread sleep for the rest. Only for a writer's own current-thread
/// runtime, where blocking briefly delays nothing but that writer.
async fn wait_until(t: Instant) {
    let coarse = t.checked_sub(Duration::from_micros(1500));
    if let Some(coarse) = coarse.filter(|c| *c > Instant::now()) {
        tokio::time::sleep_until(coarse.into()).await;
    }
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// A writer thread. It stays alive, idle, after its work until joined, so
/// that its CPU time is still in `/proc` when the window is read.
struct Writer<T> {
    handle: std::thread::JoinHandle<T>,
    release: std::sync::mpsc::Sender<()>,
}

/// Runs `body` on a new thread named `bench-writer`.
fn spawn_writer<T, F>(body: F) -> Writer<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (release, released) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("bench-writer".into())
        .spawn(move || {
            let out = body();
            let _ = released.recv();
            out
        })
        .expect("writer thread");
    Writer { handle, release }
}

/// Runs `body` on a writer thread with a current-thread runtime of its own.
fn writer_thread<T, F, Fut>(body: F) -> Writer<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    spawn_writer(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("writer runtime")
            .block_on(body())
    })
}

/// The index in `key`, a key `prefix<i>`.
fn index_of(key: &[u8], prefix: &[u8]) -> Option<u64> {
    std::str::from_utf8(key.strip_prefix(prefix)?)
        .ok()?
        .parse()
        .ok()
}

// --------------------------------------------------------------- results

/// What one latency run saw.
struct LatencyRun {
    system: &'static str,
    subscribers: usize,
    /// Changes per second.
    rate: u64,
    /// Notices received and counted, all subscribers together.
    counted: u64,
    /// Notices expected: counted changes x subscribers.
    expected: u64,
    /// Receive time minus scheduled send time, ns.
    hist: Histogram<u64>,
    /// Receive time minus the time the writer actually sent, ns: what is
    /// left once the writer's own lateness is taken out.
    from_send: Histogram<u64>,
    /// How late the writer sent, ns.
    late: Histogram<u64>,
    server_busy: f64,
    client_busy: f64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds")
}

fn us(ns: u64) -> String {
    let us = ns as f64 / 1000.0;
    if us < 100.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

/// What each subscriber of a latency run hands back.
#[derive(Default)]
struct SubscriberSeen {
    /// `(change, ns from its scheduled send)` of counted changes.
    latencies_ns: Vec<(u32, u64)>,
    /// Changes of the run seen, warm-up included.
    seen: u64,
}

impl SubscriberSeen {
    fn note(&mut self, schedule: &Schedule, i: u64, now: Instant) {
        self.seen += 1;
        if let Some(ns) = schedule.latency_ns(i, now) {
            self.latencies_ns.push((i as u32, ns));
        }
    }

    fn done(&self, schedule: &Schedule) -> bool {
        self.seen >= schedule.total
    }
}

/// Gathers a latency run's subscribers and writer into a [`LatencyRun`].
fn latency_run(
    system: &'static str,
    case: Case,
    schedule: &Schedule,
    seen: Vec<SubscriberSeen>,
    late_ns: Vec<u64>,
    cpu: (CpuMark, CpuMark),
) -> LatencyRun {
    let mut hist = histogram();
    let mut from_send = histogram();
    let mut counted = 0;
    for s in &seen {
        for &(i, ns) in &s.latencies_ns {
            hist.saturating_record(ns.max(1));
            from_send.saturating_record(ns.saturating_sub(late_ns[i as usize]).max(1));
            counted += 1;
        }
    }
    let mut late = histogram();
    for (i, &ns) in late_ns.iter().enumerate() {
        if i as u64 >= schedule.warm {
            late.saturating_record(ns.max(1));
        }
    }
    if let Some(slow_ms) = std::env::var("NOTICES_SLOW_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        report_slow(system, case, &seen, slow_ms * 1_000_000);
    }
    let (server_busy, client_busy) = cpu.0.busy(&cpu.1);
    LatencyRun {
        system,
        subscribers: case.subscribers,
        rate: case.rate,
        counted,
        expected: (schedule.total - schedule.warm) * case.subscribers as u64,
        hist,
        from_send,
        late,
        server_busy,
        client_busy,
    }
}

/// Diagnostic: which changes some subscriber received more than `slow_ns`
/// late, and how many subscribers did, to tell a server-wide stall (every
/// subscriber, one change) from one slow connection (one subscriber, a run
/// of changes).
fn report_slow(system: &str, case: Case, seen: &[SubscriberSeen], slow_ns: u64) {
    let mut by_change: std::collections::BTreeMap<u32, (usize, u64)> = Default::default();
    let mut subscribers = std::collections::BTreeMap::new();
    for (who, s) in seen.iter().enumerate() {
        for &(i, ns) in s.latencies_ns.iter().filter(|(_, ns)| *ns > slow_ns) {
            let e = by_change.entry(i).or_default();
            e.0 += 1;
            e.1 = e.1.max(ns);
            *subscribers.entry(who).or_insert(0usize) += 1;
        }
    }
    eprintln!(
        "{} subscribers at {}/s, {system}: {} changes reached some subscriber after more than {} ms; \
         {} subscribers were that late at least once",
        case.subscribers,
        case.rate,
        by_change.len(),
        slow_ns / 1_000_000,
        subscribers.len()
    );
    for (i, (n, worst)) in by_change.iter().take(40) {
        eprintln!(
            "  change {i}: {n} subscribers, worst {} ms",
            worst / 1_000_000
        );
    }
    let mut worst: Vec<(usize, usize)> = subscribers.into_iter().collect();
    worst.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    for (who, n) in worst.iter().take(10) {
        eprintln!("  subscriber {who}: {n} slow changes");
    }
}

/// What one fan-out run saw.
struct FanoutRun {
    system: &'static str,
    /// Writer calls (freshd `Publish`es, Redis rounds of commands) per second.
    calls_per_sec: f64,
    /// Changes per second (changes in a `Publish`, or commands).
    changes_per_sec: f64,
    /// Notices (keys, messages) received per second, all subscribers.
    delivered_per_sec: f64,
    /// Over the whole run, drained: received / (changes x subscribers).
    coverage: f64,
    server_busy: f64,
    client_busy: f64,
    /// Anything the system reported on the side.
    note: String,
}

impl FanoutRun {
    fn server_us_per_1k(&self) -> f64 {
        self.server_busy * 1e6 / self.delivered_per_sec * 1000.0
    }
}

/// One counter per subscriber, each on its own cache line.
#[repr(align(64))]
#[derive(Default)]
struct Counter(AtomicU64);

struct Counters(Vec<Counter>);

impl Counters {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Self((0..n).map(|_| Counter::default()).collect()))
    }

    fn add(&self, i: usize, n: u64) {
        self.0[i].0.fetch_add(n, Ordering::Relaxed);
    }

    fn sum(&self) -> u64 {
        self.0.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

/// Waits (at most [`DRAIN`]) until `counters` reach `expected` or stop
/// growing for 500 ms.
async fn drain(counters: &Counters, expected: u64) -> u64 {
    let deadline = Instant::now() + DRAIN;
    let mut last = counters.sum();
    let mut still_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = counters.sum();
        if now >= expected || Instant::now() > deadline {
            return now;
        }
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() > Duration::from_millis(500) {
            return now;
        }
    }
}

// ----------------------------------------------------------- subscribers

/// What a subscriber does with each notice (key, message) it receives.
trait Sink: Send + 'static {
    /// Notes one notice received at `now`; true once the subscriber has seen
    /// everything it waits for.
    fn note(&mut self, key: &[u8], now: Instant) -> bool;
}

/// Records each `<prefix>i` against the schedule.
struct LatencySink {
    schedule: Arc<Schedule>,
    prefix: &'static [u8],
    seen: SubscriberSeen,
}

impl LatencySink {
    fn new(schedule: &Arc<Schedule>, prefix: &'static [u8]) -> Self {
        Self {
            schedule: schedule.clone(),
            prefix,
            seen: SubscriberSeen::default(),
        }
    }
}

impl Sink for LatencySink {
    fn note(&mut self, key: &[u8], now: Instant) -> bool {
        if let Some(i) = index_of(key, self.prefix) {
            self.seen.note(&self.schedule, i, now);
        }
        self.seen.done(&self.schedule)
    }
}

/// Counts notices in the subscriber's counter.
struct CountSink {
    counters: Arc<Counters>,
    index: usize,
}

impl Sink for CountSink {
    fn note(&mut self, _key: &[u8], _now: Instant) -> bool {
        self.counters.add(self.index, 1);
        false
    }
}

/// Waits until `n` subscribers said they are ready.
async fn all_ready(mut ready: mpsc::Receiver<()>, n: usize) {
    for _ in 0..n {
        ready.recv().await.expect("a subscriber failed to start");
    }
}

// ---------------------------------------------------------------- freshd

async fn connect(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect to freshd")
}

/// `Fill`s every key, up to 1,000 at a time on one connection, as a cache
/// would: with the seq of a `Check` made before.
async fn fill_freshd(url: &str, keys: &[String]) {
    let mut client = CoordinatorClient::new(connect(url).await);
    let observed_seq = client
        .check(CheckRequest {
            key: keys[0].clone(),
            ..Default::default()
        })
        .await
        .expect("check")
        .into_inner()
        .seq;
    for chunk in keys.chunks(1000) {
        let calls: Vec<_> = chunk
            .iter()
            .map(|key| {
                let mut client = client.clone();
                let request = FillRequest {
                    key: key.clone(),
                    ttl_ms: 3_600_000,
                    observed_seq,
                    ..Default::default()
                };
                tokio::spawn(async move { client.fill(request).await })
            })
            .collect();
        for call in calls {
            call.await.expect("fill task").expect("fill");
        }
    }
}

/// A started Watch stream; dropping it closes the stream.
struct WatchStream {
    _requests: mpsc::Sender<WatchRequest>,
    responses: tonic::Streaming<freshd::pb::WatchResponse>,
}

/// Opens a Watch stream tracking `track` and waits for `started`.
async fn open_watch(
    mut client: CoordinatorClient<Channel>,
    id: usize,
    track: Vec<String>,
) -> WatchStream {
    let (tx, rx) = mpsc::channel(4);
    // The server reads `start` before it answers the call.
    tx.send(WatchRequest {
        request: Some(WatchIn::Start(WatchStart {
            client_id: format!("sub-{id}"),
            track,
            ..Default::default()
        })),
    })
    .await
    .expect("queue start");
    let mut responses = client
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    match responses.message().await {
        Ok(Some(freshd::pb::WatchResponse {
            response: Some(WatchOut::Started(_)),
        })) => {}
        other => panic!("expected `started`, got {other:?}"),
    }
    WatchStream {
        _requests: tx,
        responses,
    }
}

/// Starts one task per sink, each on a Watch stream tracking `track`
/// (streams share a connection `per_connection` at a time), and returns once
/// every stream has started. A task ends when its sink has seen everything,
/// or on `stop`, and hands its sink back.
async fn freshd_subscribers<S: Sink>(
    url: &str,
    per_connection: usize,
    track: Arc<Vec<String>>,
    ending: &Ending,
    sinks: Vec<S>,
) -> Vec<tokio::task::JoinHandle<S>> {
    let n = sinks.len();
    let limit = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let (ready_tx, ready_rx) = mpsc::channel::<()>(n.max(1));
    let mut tasks = Vec::with_capacity(n);
    let mut client = None;
    for (id, mut sink) in sinks.into_iter().enumerate() {
        if id % per_connection == 0 {
            client = Some(CoordinatorClient::new(connect(url).await));
        }
        let client = client.clone().expect("connected");
        let (track, limit, ready) = (track.clone(), limit.clone(), ready_tx.clone());
        let (mut stop, finished) = (ending.stop.subscribe(), ending.finished.clone());
        tasks.push(tokio::spawn(async move {
            let mut stream = {
                let _permit = limit.acquire().await.expect("semaphore");
                open_watch(client, id, track.to_vec()).await
            };
            ready.send(()).await.expect("ready");
            drop(ready);
            loop {
                tokio::select! {
                    biased;
                    _ = stop.changed() => break,
                    message = stream.responses.message() => {
                        let Ok(Some(message)) = message else { break };
                        let now = Instant::now();
                        if let Some(WatchOut::Notices(batch)) = message.response {
                            let mut done = false;
                            for notice in &batch.notices {
                                done |= sink.note(notice.key.as_bytes(), now);
                            }
                            if done {
                                finished.fetch_add(1, Ordering::Relaxed);
                                // Keep the stream open until every subscriber
                                // is done: closing it costs the server work
                                // that would delay the others.
                                let _ = stop.changed().await;
                                break;
                            }
                        }
                    }
                }
            }
            sink
        }));
    }
    drop(ready_tx);
    all_ready(ready_rx, n).await;
    tasks
}

/// Publishes `keys[i]` at `schedule.at(i)`, each `Publish` a task of its own
/// on this thread's runtime; returns how late each was sent, ns.
fn freshd_paced_writer(
    url: String,
    schedule: Arc<Schedule>,
    keys: Arc<Vec<String>>,
    ready: tokio::sync::oneshot::Sender<()>,
    go: std::sync::mpsc::Receiver<()>,
) -> Writer<Vec<u64>> {
    writer_thread(move || async move {
        let mut client = CoordinatorClient::new(connect(&url).await);
        // A first call on the connection, for a key nobody tracks.
        client
            .publish(PublishRequest {
                changes: vec![Change {
                    key: "warm:writer".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .expect("publish");
        ready.send(()).expect("ready");
        go.recv().expect("go");
        let mut late = Vec::with_capacity(schedule.total as usize);
        let mut calls = Vec::with_capacity(schedule.total as usize);
        for i in 0..schedule.total {
            let t = schedule.at(i);
            wait_until(t).await;
            late.push(t.elapsed().as_nanos() as u64);
            let mut client = client.clone();
            let request = PublishRequest {
                changes: vec![Change {
                    key: keys[i as usize].clone(),
                    ..Default::default()
                }],
                ..Default::default()
            };
            calls.push(tokio::spawn(async move { client.publish(request).await }));
        }
        for call in calls {
            call.await.expect("publish task").expect("publish");
        }
        late
    })
}

/// How a run ends its subscriber tasks: a subscriber that has seen
/// everything counts itself `finished` and waits for `stop`.
struct Ending {
    stop: watch::Sender<bool>,
    finished: Arc<AtomicUsize>,
}

impl Ending {
    fn new() -> Self {
        Self {
            stop: watch::Sender::new(false),
            finished: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Ends the subscribers now (a fan-out run, whose never finish).
    fn stop(&self) {
        self.stop.send_replace(true);
    }
}

/// Waits until every subscriber has seen everything (at most [`DRAIN`]),
/// unless they were already stopped; then stops them, which closes their
/// streams, and gathers what they saw.
async fn gather<S: Send + 'static>(
    tasks: Vec<tokio::task::JoinHandle<S>>,
    ending: Ending,
) -> Vec<S> {
    let deadline = Instant::now() + DRAIN;
    while !*ending.stop.borrow()
        && ending.finished.load(Ordering::Relaxed) < tasks.len()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ending.stop();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.expect("subscriber task"));
    }
    out
}

/// Marks CPU at the end of the warm-up and at the end of the schedule.
async fn cpu_window(schedule: &Schedule, server: Server, ticks: u64) -> (CpuMark, CpuMark) {
    tokio::time::sleep_until(schedule.at(schedule.warm).into()).await;
    let from = CpuMark::now(server, ticks);
    tokio::time::sleep_until(schedule.at(schedule.total).into()).await;
    (from, CpuMark::now(server, ticks))
}

fn new_schedule(case: Case, s: &Settings) -> Arc<Schedule> {
    Arc::new(Schedule {
        start: OnceLock::new(),
        interval: Duration::from_nanos(1_000_000_000 / case.rate),
        warm: case.rate * WARM_UP.as_secs(),
        total: s.changes(case.rate),
    })
}

/// Sets the schedule's start a little ahead and lets the writer go.
fn start_schedule(schedule: &Schedule, go: std::sync::mpsc::Sender<()>) {
    schedule
        .start
        .set(Instant::now() + Duration::from_millis(50))
        .expect("one start");
    go.send(()).expect("writer waiting");
}

async fn join_writer<T: Send + 'static>(writer: Writer<T>) -> T {
    let _ = writer.release.send(());
    tokio::task::spawn_blocking(move || writer.handle.join().expect("writer thread"))
        .await
        .expect("join")
}

async fn freshd_latency(
    url: &str,
    case: Case,
    s: &Settings,
    keys: Arc<Vec<String>>,
    ticks: u64,
) -> LatencyRun {
    let n = case.subscribers;
    let schedule = new_schedule(case, s);
    let ending = Ending::new();
    let sinks = (0..n)
        .map(|_| LatencySink::new(&schedule, b"hot:"))
        .collect();
    let tasks =
        freshd_subscribers(url, s.streams_per_connection, keys.clone(), &ending, sinks).await;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let writer = freshd_paced_writer(url.to_owned(), schedule.clone(), keys, ready_tx, go_rx);
    ready_rx.await.expect("writer ready");
    start_schedule(&schedule, go_tx);
    let cpu = cpu_window(&schedule, Server::Freshd, ticks).await;
    let late = join_writer(writer).await;
    let seen = gather(tasks, ending).await;
    latency_run(
        "freshd Watch",
        case,
        &schedule,
        seen.into_iter().map(|s| s.seen).collect(),
        late,
        cpu,
    )
}

async fn freshd_fanout(server: &RunningServer, s: &Settings, ticks: u64) -> FanoutRun {
    let url = server.url();
    let n = s.fanout_subscribers;
    let keys: Arc<Vec<String>> = Arc::new((0..FANOUT_KEYS).map(|j| format!("fan:{j}")).collect());
    fill_freshd(&url, &keys).await;
    let counters = Counters::new(n);
    let ending = Ending::new();
    let sinks = (0..n)
        .map(|index| CountSink {
            counters: counters.clone(),
            index,
        })
        .collect();
    let tasks =
        freshd_subscribers(&url, s.streams_per_connection, keys.clone(), &ending, sinks).await;

    let calls = Arc::new(AtomicU64::new(0));
    let halt = Arc::new(AtomicBool::new(false));
    let writer = {
        let (url, keys, calls, halt) = (url.clone(), keys.clone(), calls.clone(), halt.clone());
        writer_thread(move || async move {
            let mut client = CoordinatorClient::new(connect(&url).await);
            let mut next = 0usize;
            while !halt.load(Ordering::Relaxed) {
                let changes = (0..FANOUT_BATCH)
                    .map(|k| Change {
                        key: keys[(next + k) % keys.len()].clone(),
                        ..Default::default()
                    })
                    .collect();
                next = (next + FANOUT_BATCH) % keys.len();
                client
                    .publish(PublishRequest {
                        changes,
                        ..Default::default()
                    })
                    .await
                    .expect("publish");
                calls.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let window = fanout_window(&counters, &calls, Server::Freshd, ticks, s.secs).await;
    halt.store(true, Ordering::Relaxed);
    join_writer(writer).await;
    let total_changes = calls.load(Ordering::Relaxed) * FANOUT_BATCH as u64;
    let received = drain(&counters, total_changes * n as u64).await;
    let stats = server.store.hub().subscriber_stats();
    let overflows: u64 = stats.iter().map(|s| s.overflows).sum();
    ending.stop();
    gather(tasks, ending).await;
    window.finish(
        "freshd Watch",
        FANOUT_BATCH,
        received as f64 / (total_changes * n as u64) as f64,
        format!("{overflows} queue overflows"),
    )
}

/// Counts over the fan-out's measured window.
struct FanoutWindow {
    calls: u64,
    delivered: u64,
    cpu: (CpuMark, CpuMark),
}

impl FanoutWindow {
    fn finish(self, system: &'static str, batch: usize, coverage: f64, note: String) -> FanoutRun {
        let secs = (self.cpu.1.at - self.cpu.0.at).as_secs_f64();
        let (server_busy, client_busy) = self.cpu.0.busy(&self.cpu.1);
        FanoutRun {
            system,
            calls_per_sec: self.calls as f64 / secs,
            changes_per_sec: (self.calls * batch as u64) as f64 / secs,
            delivered_per_sec: self.delivered as f64 / secs,
            coverage,
            server_busy,
            client_busy,
            note,
        }
    }
}

/// Waits out the warm-up, then counts calls and deliveries for `secs`.
async fn fanout_window(
    counters: &Counters,
    calls: &AtomicU64,
    server: Server,
    ticks: u64,
    secs: u64,
) -> FanoutWindow {
    tokio::time::sleep(WARM_UP).await;
    let (calls0, delivered0) = (calls.load(Ordering::Relaxed), counters.sum());
    let cpu0 = CpuMark::now(server, ticks);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (calls1, delivered1) = (calls.load(Ordering::Relaxed), counters.sum());
    let cpu1 = CpuMark::now(server, ticks);
    FanoutWindow {
        calls: calls1 - calls0,
        delivered: delivered1 - delivered0,
        cpu: (cpu0, cpu1),
    }
}

// ----------------------------------------------------------------- Redis

/// Which Redis mechanism stands in for the Watch stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RedisMode {
    /// RESP3 client-side caching, default mode: keys read with MGET.
    Tracking,
    /// RESP3 client-side caching, broadcast mode on a prefix.
    Bcast,
    /// Pub/sub on one channel.
    PubSub,
}

impl RedisMode {
    fn name(self) -> &'static str {
        match self {
            RedisMode::Tracking => "Redis tracking",
            RedisMode::Bcast => "Redis tracking BCAST",
            RedisMode::PubSub => "Redis pub/sub",
        }
    }

    /// What a subscriber sends before it is ready. `name` is the key prefix
    /// (tracking) or the channel (pub/sub); `keys` what tracking reads.
    fn setup(self, name: &str, keys: &[String]) -> Vec<Vec<Vec<u8>>> {
        let args = |a: &[&str]| a.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
        match self {
            RedisMode::Tracking => {
                let mut mget = vec![b"MGET".to_vec()];
                mget.extend(keys.iter().map(|k| k.as_bytes().to_vec()));
                vec![
                    args(&["HELLO", "3"]),
                    args(&["CLIENT", "TRACKING", "on"]),
                    mget,
                ]
            }
            RedisMode::Bcast => vec![
                args(&["HELLO", "3"]),
                args(&["CLIENT", "TRACKING", "on", "BCAST", "PREFIX", name]),
            ],
            RedisMode::PubSub => vec![args(&["SUBSCRIBE", name])],
        }
    }

    /// The command that changes key or message `i`.
    fn change(self, name: &str, i: u64) -> Vec<Vec<u8>> {
        let i = i.to_string();
        match self {
            RedisMode::Tracking | RedisMode::Bcast => {
                vec![
                    b"SET".to_vec(),
                    format!("{name}{i}").into_bytes(),
                    i.into_bytes(),
                ]
            }
            RedisMode::PubSub => vec![
                b"PUBLISH".to_vec(),
                name.as_bytes().to_vec(),
                i.into_bytes(),
            ],
        }
    }
}

/// Calls `f` with each key an `invalidate` push names, or with the payload
/// of a pub/sub `message`.
fn redis_notices(reply: &Reply, mut f: impl FnMut(&[u8])) {
    let items = match reply {
        Reply::Push(items) => items,
        Reply::Array(Some(items)) => items,
        _ => return,
    };
    match items.as_slice() {
        [Reply::Bulk(Some(kind)), Reply::Array(Some(keys))] if kind == b"invalidate" => {
            for key in keys {
                if let Reply::Bulk(Some(key)) = key {
                    f(key);
                }
            }
        }
        [Reply::Bulk(Some(kind)), _, Reply::Bulk(Some(payload))] if kind == b"message" => {
            f(payload)
        }
        _ => {}
    }
}

/// Starts one task per sink, each on its own connection that sent `setup`,
/// and returns once every one is ready. Tasks end as in
/// [`freshd_subscribers`].
async fn redis_subscribers<S: Sink>(
    port: u16,
    setup: Arc<Vec<Vec<Vec<u8>>>>,
    ending: &Ending,
    sinks: Vec<S>,
) -> Vec<tokio::task::JoinHandle<S>> {
    let n = sinks.len();
    let limit = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let (ready_tx, ready_rx) = mpsc::channel::<()>(n.max(1));
    let tasks = sinks
        .into_iter()
        .map(|mut sink| {
            let (setup, limit, ready) = (setup.clone(), limit.clone(), ready_tx.clone());
            let (mut stop, finished) = (ending.stop.subscribe(), ending.finished.clone());
            tokio::spawn(async move {
                let mut conn = {
                    let _permit = limit.acquire().await.expect("semaphore");
                    let mut conn = AsyncConn::connect(redis::local(port))
                        .await
                        .expect("connect to redis");
                    for command in setup.iter() {
                        let args: Vec<&[u8]> = command.iter().map(Vec::as_slice).collect();
                        let reply = conn.command(&args).await.expect("redis setup");
                        assert!(!matches!(reply, Reply::Error(_)), "redis: {reply:?}");
                    }
                    conn
                };
                ready.send(()).await.expect("ready");
                drop(ready);
                loop {
                    tokio::select! {
                        biased;
                        _ = stop.changed() => break,
                        reply = conn.read_reply() => {
                            let Ok(reply) = reply else { break };
                            let now = Instant::now();
                            let mut done = false;
                            redis_notices(&reply, |key| done |= sink.note(key, now));
                            if done {
                                finished.fetch_add(1, Ordering::Relaxed);
                                let _ = stop.changed().await;
                                break;
                            }
                        }
                    }
                }
                sink
            })
        })
        .collect();
    drop(ready_tx);
    all_ready(ready_rx, n).await;
    tasks
}

/// `SET`s every key to 0 on one pipelined connection.
fn set_keys(port: u16, keys: &[String]) {
    let mut conn = SyncConn::connect(redis::local(port)).expect("connect to redis");
    let mut pipeline = Pipeline::new(&mut conn, 1000);
    for key in keys {
        pipeline.push(&[b"SET", key.as_bytes(), b"0"]).expect("SET");
    }
    pipeline.flush().expect("SET");
}

async fn redis_latency(
    port: u16,
    pid: u32,
    mode: RedisMode,
    case: Case,
    s: &Settings,
    keys: Arc<Vec<String>>,
    ticks: u64,
) -> LatencyRun {
    let n = case.subscribers;
    let (name, prefix): (&'static str, &'static [u8]) = match mode {
        RedisMode::PubSub => ("hot", b""),
        _ => ("hot:", b"hot:"),
    };
    let schedule = new_schedule(case, s);
    let ending = Ending::new();
    let setup = Arc::new(mode.setup(name, &keys));
    let sinks = (0..n)
        .map(|_| LatencySink::new(&schedule, prefix))
        .collect();
    let tasks = redis_subscribers(port, setup, &ending, sinks).await;

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let writer = {
        let (schedule, ready, go) = (schedule.clone(), ready_tx, go_rx);
        writer_thread(move || async move {
            use tokio::io::AsyncWriteExt;
            let conn = AsyncConn::connect(redis::local(port))
                .await
                .expect("connect to redis");
            let (mut replies, mut out) = conn.into_split();
            let total = schedule.total;
            let reader = tokio::spawn(async move {
                for _ in 0..total {
                    let reply = replies.read_reply().await.expect("redis reply");
                    assert!(!matches!(reply, Reply::Error(_)), "redis: {reply:?}");
                }
            });
            ready.send(()).expect("ready");
            go.recv().expect("go");
            let mut late = Vec::with_capacity(total as usize);
            let mut buf = Vec::new();
            for i in 0..total {
                let command = mode.change(name, i);
                let args: Vec<&[u8]> = command.iter().map(Vec::as_slice).collect();
                buf.clear();
                redis::encode(&args, &mut buf);
                let t = schedule.at(i);
                wait_until(t).await;
                late.push(t.elapsed().as_nanos() as u64);
                out.write_all(&buf).await.expect("write to redis");
            }
            reader.await.expect("reader");
            late
        })
    };
    ready_rx.await.expect("writer ready");
    start_schedule(&schedule, go_tx);
    let cpu = cpu_window(&schedule, Server::Redis(pid), ticks).await;
    let late = join_writer(writer).await;
    let seen = gather(tasks, ending).await;
    latency_run(
        mode.name(),
        case,
        &schedule,
        seen.into_iter().map(|s| s.seen).collect(),
        late,
        cpu,
    )
}

async fn redis_fanout(port: u16, pid: u32, mode: RedisMode, s: &Settings, ticks: u64) -> FanoutRun {
    let n = s.fanout_subscribers;
    let name = match mode {
        RedisMode::PubSub => "fan",
        _ => "fan:",
    };
    let counters = Counters::new(n);
    let ending = Ending::new();
    let sinks = (0..n)
        .map(|index| CountSink {
            counters: counters.clone(),
            index,
        })
        .collect();
    let tasks = redis_subscribers(port, Arc::new(mode.setup(name, &[])), &ending, sinks).await;

    let calls = Arc::new(AtomicU64::new(0));
    let halt = Arc::new(AtomicBool::new(false));
    let writer = {
        let (calls, halt) = (calls.clone(), halt.clone());
        spawn_writer(move || {
            let mut conn = SyncConn::connect(redis::local(port)).expect("connect to redis");
            let mut pipeline = Pipeline::new(&mut conn, FANOUT_BATCH);
            let mut next = 0u64;
            while !halt.load(Ordering::Relaxed) {
                // `push` sends the round and reads its replies at the last.
                for _ in 0..FANOUT_BATCH {
                    let command = mode.change(name, next % FANOUT_KEYS as u64);
                    let args: Vec<&[u8]> = command.iter().map(Vec::as_slice).collect();
                    pipeline.push(&args).expect("redis");
                    next += 1;
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let window = fanout_window(&counters, &calls, Server::Redis(pid), ticks, s.secs).await;
    halt.store(true, Ordering::Relaxed);
    join_writer(writer).await;
    let total_changes = calls.load(Ordering::Relaxed) * FANOUT_BATCH as u64;
    let received = drain(&counters, total_changes * n as u64).await;
    let mut conn = SyncConn::connect(redis::local(port)).expect("connect to redis");
    let peak = conn.info_field("memory", "used_memory_peak").unwrap_or(0);
    ending.stop();
    gather(tasks, ending).await;
    window.finish(
        mode.name(),
        FANOUT_BATCH,
        received as f64 / (total_changes * n as u64) as f64,
        format!("used_memory_peak {} MiB", peak >> 20),
    )
}

// ------------------------------------------------------------------ main

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}", a / b)
}

fn print_latency(runs: &[LatencyRun], s: &Settings) {
    println!(
        "Publish-to-notice latency, µs, from the scheduled send: open loop, \
         {} s counted after {} s warm-up\n",
        s.secs,
        WARM_UP.as_secs()
    );
    println!(
        "| subscribers | changes/s | system | notices counted | p50 | p99 | p99.9 | max | writer late p99 / max | from actual send p50 / p99 | server cores busy | client cores busy |"
    );
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in runs {
        let q = |p: f64| us(r.hist.value_at_quantile(p));
        println!(
            "| {} | {} | {} | {}{} | {} | {} | {} | {} | {} / {} | {} / {} | {:.2} | {:.2} |",
            r.subscribers,
            r.rate,
            r.system,
            r.counted,
            if r.counted == r.expected {
                String::new()
            } else {
                format!(" of {}", r.expected)
            },
            q(0.50),
            q(0.99),
            q(0.999),
            us(r.hist.max()),
            us(r.late.value_at_quantile(0.99)),
            us(r.late.max()),
            us(r.from_send.value_at_quantile(0.5)),
            us(r.from_send.value_at_quantile(0.99)),
            r.server_busy,
            r.client_busy,
        );
    }

    println!("\nRatios freshd / Redis (< 1: freshd is faster)\n");
    println!("| subscribers | changes/s | peer | p50 | p99 | p99.9 | max |");
    println!("|---:|---:|---|---:|---:|---:|---:|");
    for f in runs.iter().filter(|r| r.system.starts_with("freshd")) {
        for r in runs.iter().filter(|r| {
            r.subscribers == f.subscribers && r.rate == f.rate && !r.system.starts_with("freshd")
        }) {
            let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64;
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                f.subscribers,
                f.rate,
                r.system,
                ratio(q(&f.hist, 0.5), q(&r.hist, 0.5)),
                ratio(q(&f.hist, 0.99), q(&r.hist, 0.99)),
                ratio(q(&f.hist, 0.999), q(&r.hist, 0.999)),
                ratio(f.hist.max() as f64, r.hist.max() as f64),
            );
        }
    }
}

fn print_fanout(runs: &[FanoutRun], s: &Settings) {
    println!(
        "\nFan-out to {} subscribers: closed-loop writer, {} changes per call, {} s counted after {} s warm-up\n",
        s.fanout_subscribers,
        FANOUT_BATCH,
        s.secs,
        WARM_UP.as_secs()
    );
    println!(
        "| system | calls/s | changes/s | notices received/s | received / (changes x subscribers) | server CPU µs per 1k notices | server cores busy | client cores busy | note |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in runs {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.3} | {:.2} | {:.2} | {:.2} | {} |",
            r.system,
            r.calls_per_sec,
            r.changes_per_sec,
            r.delivered_per_sec,
            r.coverage,
            r.server_us_per_1k(),
            r.server_busy,
            r.client_busy,
            r.note
        );
    }
    if let Some(f) = runs.iter().find(|r| r.system.starts_with("freshd")) {
        println!("\n| ratio freshd / peer | notices received/s | server CPU per notice |");
        println!("|---|---:|---:|");
        for r in runs.iter().filter(|r| !r.system.starts_with("freshd")) {
            println!(
                "| {} | {} | {} |",
                r.system,
                ratio(f.delivered_per_sec, r.delivered_per_sec),
                ratio(f.server_us_per_1k(), r.server_us_per_1k())
            );
        }
    }
}

fn main() -> ExitCode {
    let s = Settings::from_env();
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
        "latency runs (subscribers@changes per second): {}; fan-out to {} subscribers; \
         {} Watch stream(s) per connection\n",
        s.cases
            .iter()
            .map(|c| format!("{}@{}", c.subscribers, c.rate))
            .collect::<Vec<_>>()
            .join(", "),
        s.fanout_subscribers,
        s.streams_per_connection
    );

    let most = s.cases.iter().map(|c| s.changes(c.rate)).max().unwrap_or(0);
    let all_keys: Vec<String> = (0..most).map(|i| format!("hot:{i}")).collect();
    let started = Instant::now();
    if !all_keys.is_empty() {
        client_rt.block_on(fill_freshd(&url, &all_keys));
        set_keys(redis.port, &all_keys);
    }

    let mut latency = Vec::new();
    for &case in &s.cases {
        let n = case.subscribers;
        let keys = Arc::new(all_keys[..s.changes(case.rate) as usize].to_vec());
        let runs = client_rt.block_on(async {
            let mut runs = vec![freshd_latency(&url, case, &s, keys.clone(), ticks).await];
            if s.redis {
                for mode in [RedisMode::Tracking, RedisMode::PubSub] {
                    runs.push(
                        redis_latency(redis.port, redis.pid(), mode, case, &s, keys.clone(), ticks)
                            .await,
                    );
                }
            }
            runs
        });
        for r in &runs {
            eprintln!(
                "{:>5} subscribers at {:>3}/s, {:>22}: p50 {:>8} µs, p99 {:>8} µs ({} of {} notices) [{:.0} s]",
                n,
                case.rate,
                r.system,
                us(r.hist.value_at_quantile(0.5)),
                us(r.hist.value_at_quantile(0.99)),
                r.counted,
                r.expected,
                started.elapsed().as_secs_f64()
            );
        }
        latency.extend(runs);
    }

    let fanout = if s.fanout_subscribers == 0 {
        Vec::new()
    } else {
        client_rt.block_on(async {
            let mut runs = vec![freshd_fanout(&server, &s, ticks).await];
            if s.redis {
                for mode in [RedisMode::PubSub, RedisMode::Bcast] {
                    runs.push(redis_fanout(redis.port, redis.pid(), mode, &s, ticks).await);
                }
            }
            runs
        })
    };
    for r in &fanout {
        eprintln!(
            "fan-out {:>22}: {:>10.0} notices/s [{:.0} s]",
            r.system,
            r.delivered_per_sec,
            started.elapsed().as_secs_f64()
        );
    }

    if !latency.is_empty() {
        print_latency(&latency, &s);
    }
    if !fanout.is_empty() {
        print_fanout(&fanout, &s);
    }

    drop(client_rt);
    if let Err(e) = server_rt.block_on(server.stop()) {
        eprintln!("freshd stopped with an error: {e}");
    }
    drop(redis);
    ExitCode::SUCCESS
}
