//! Write-to-notice latency at a fixed rate, to N subscribers.
//!
//! Every subscriber follows the same `rate x (warmup + secs)` keys `hot:0`,
//! `hot:1`, ... on a connection of its own; one writer changes them one at a
//! time, in order, open loop: change `i` is intended at `start + i / rate`
//! and sent then whether or not earlier writes were answered. For every
//! notice each subscriber receives, latency = arrival minus the *intended*
//! time of the change it reports. Each key changes once, so a notice names
//! its change and nothing is conflated. Changes in the warm-up are not
//! counted; a notice that never arrives (within 10 s of the last write)
//! counts as an error.
//!
//! - freshd: the keys are registered with `Fill`; each subscriber is a
//!   `Watch` stream tracking them (`start.track`); the writer sends
//!   `Publish {changes: [hot:i]}`.
//! - Redis: the keys are `SET`; each subscriber is a RESP3 connection with
//!   `CLIENT TRACKING on` that read them with `MGET`; the writer sends
//!   `SET hot:i`, and Redis pushes `invalidate [hot:i]`.
//! - etcd: each subscriber is a `Watch` stream on the prefix `hot:` (one
//!   gRPC connection each); the writer sends `Put hot:i`.
//! - floor ([`crate::floor`]): each subscriber is a plain TCP connection;
//!   the writer sends the line `hot:i`, which the floor server copies to
//!   every subscriber: the least any server can do per change.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use freshd::pb::{Change, FillRequest, PublishRequest, PublishResponse};
use serde_json::json;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

use crate::etcdpb;
use crate::pace::{self, Tick};
use crate::resp::{self, AsyncConn, Reply};
use crate::stats::{Latencies, Report};
use crate::unary::UnaryConn;
use crate::watch::{notice_keys, WatchStream};
use crate::{connect_nodelay, freshd_client, grpc_channel, parallel, socket_addr, Error, Target};

/// Settings of the write-to-notice workload.
#[derive(Clone, Debug)]
pub struct NoticeOpts {
    /// Which server.
    pub target: Target,
    /// Its `host:port`.
    pub addr: String,
    /// Subscribers.
    pub subscribers: usize,
    /// freshd and the floor only: subscribers per connection (1: a
    /// connection per subscriber, as Redis and etcd subscribers have).
    pub per_conn: usize,
    /// Changes per second.
    pub rate: f64,
    /// Seconds of changes not counted, first.
    pub warmup: f64,
    /// Seconds of changes counted.
    pub secs: f64,
}

/// Connections opened at once while subscribers start.
const CONNECT_CONCURRENCY: usize = 64;
/// How long notices may take to arrive after the last write.
const DRAIN: Duration = Duration::from_secs(10);

/// The index of `hot:i`.
fn index_of(key: &[u8]) -> Option<u64> {
    std::str::from_utf8(key.strip_prefix(b"hot:")?)
        .ok()?
        .parse()
        .ok()
}

/// What subscribers share: the schedule and the tallies.
struct Shared {
    start: OnceLock<Instant>,
    rate: f64,
    /// Changes before this index are warm-up.
    counted_from: u64,
    /// Notices every subscriber must get.
    expected: u64,
    finished: AtomicUsize,
    received: AtomicU64,
    /// Tells this run's histograms from an earlier run's.
    run: u64,
    /// The histogram of each thread that recorded a latency, merged when
    /// the run ends.
    latencies: Mutex<Vec<Arc<Mutex<Latencies>>>>,
}

thread_local! {
    /// This thread's histogram, and the run it is for.
    static RECORDER: std::cell::RefCell<Option<(u64, Arc<Mutex<Latencies>>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Numbers the runs of this process.
static RUNS: AtomicU64 = AtomicU64::new(0);

impl Shared {
    /// Records `count` notices of `latency` in this thread's histogram. A
    /// histogram per subscriber (1,000 of them, over 100 KiB apiece) would
    /// cost a cache miss per notice, and one shared by every thread would
    /// stall the others whenever the thread holding its lock is preempted:
    /// either would add the load tool's delays to every server's latency.
    fn record(&self, latency: Duration, count: u64) {
        RECORDER.with_borrow_mut(|slot| {
            let histogram = match slot {
                Some((run, histogram)) if *run == self.run => histogram,
                _ => {
                    let histogram = Arc::new(Mutex::new(Latencies::default()));
                    self.latencies.lock().push(histogram.clone());
                    &mut slot.insert((self.run, histogram)).1
                }
            };
            histogram.lock().record_n(latency, count);
        });
    }

    /// Every latency recorded, once the subscribers are done.
    fn latencies(&self) -> Latencies {
        let mut all = Latencies::default();
        for histogram in self.latencies.lock().iter() {
            all.merge(&histogram.lock());
        }
        all
    }
}

/// One subscriber's count of the notices it got.
struct Sub {
    shared: Arc<Shared>,
    got: u64,
}

impl Sub {
    fn new(shared: Arc<Shared>) -> Self {
        Self { shared, got: 0 }
    }
}

/// The subscribers one task reads for, and the latencies they noted that
/// are not yet recorded ([`Shared::record`]). A notice counts from the
/// read that brought it, so the notices of one change that one read
/// brings (one per subscriber on a shared connection) have one latency:
/// they are recorded as one run, and the change's key is parsed and its
/// intended time worked out once, not per notice. With 100 subscribers to
/// a connection, doing that per notice took about a tenth of the load
/// tool's time per notice, and that time sets when it gets to the last
/// connection's notices.
struct Group {
    subs: Vec<Sub>,
    shared: Arc<Shared>,
    /// Subscribers that got every expected notice.
    done: usize,
    /// The last key noted, and its change's index and intended time.
    key: Vec<u8>,
    change: Option<(u64, Instant)>,
    /// A latency noted `.1` times and not yet recorded.
    run: (Duration, u64),
}

impl Group {
    fn new(shared: Arc<Shared>, subs: Vec<Sub>) -> Self {
        Self {
            subs,
            shared,
            done: 0,
            key: Vec::new(),
            change: None,
            run: (Duration::ZERO, 0),
        }
    }

    /// Notes a notice for `key` to subscriber `i` that arrived at `now`.
    fn note(&mut self, i: usize, key: &[u8], now: Instant) {
        if self.change.is_none() || key != self.key.as_slice() {
            self.key.clear();
            self.key.extend_from_slice(key);
            self.change = index_of(key)
                .zip(self.shared.start.get())
                .map(|(index, &start)| (index, pace::intended(start, self.shared.rate, index)));
        }
        let Some((index, intended)) = self.change else {
            return;
        };
        let sub = &mut self.subs[i];
        sub.got += 1;
        if sub.got == self.shared.expected {
            self.done += 1;
            self.shared.finished.fetch_add(1, Ordering::Relaxed);
        }
        if index >= self.shared.counted_from {
            let latency = now.saturating_duration_since(intended);
            if latency != self.run.0 {
                self.flush();
                self.run.0 = latency;
            }
            self.run.1 += 1;
        }
    }

    /// Records the run noted.
    fn flush(&mut self) {
        if self.run.1 > 0 {
            self.shared.record(self.run.0, self.run.1);
            self.run.1 = 0;
        }
    }

    /// Whether every subscriber got every expected notice.
    fn finished(&self) -> bool {
        self.done == self.subs.len()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.flush();
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.shared.received.fetch_add(self.got, Ordering::Relaxed);
    }
}

/// Runs the workload once.
pub async fn run(opts: &NoticeOpts) -> Result<Report, Error> {
    if opts.rate <= 0.0 || opts.subscribers == 0 {
        return Err("rate and subscribers must be positive".into());
    }
    let counted_from = (opts.rate * opts.warmup).round() as u64;
    let changes = counted_from + (opts.rate * opts.secs).round() as u64;
    let keys: Arc<Vec<String>> = Arc::new((0..changes).map(|i| format!("hot:{i}")).collect());
    let shared = Arc::new(Shared {
        start: OnceLock::new(),
        rate: opts.rate,
        counted_from,
        expected: changes,
        finished: AtomicUsize::new(0),
        received: AtomicU64::new(0),
        run: RUNS.fetch_add(1, Ordering::Relaxed),
        latencies: Mutex::new(Vec::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    if opts.per_conn > 1 && !matches!(opts.target, Target::Freshd | Target::Floor) {
        return Err("only freshd's and the floor's subscribers can share connections".into());
    }
    // The keys, then the subscribers.
    prepare(opts, &keys).await?;
    let limit = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), Error>>(opts.subscribers);
    let mut subs = Vec::with_capacity(opts.subscribers);
    let per_conn = opts.per_conn.max(1);
    let grouped = matches!(opts.target, Target::Freshd | Target::Floor);
    if grouped {
        // A task per connection, for its one subscriber or the several
        // that share it.
        for first in (0..opts.subscribers).step_by(per_conn) {
            let ids = first..(first + per_conn).min(opts.subscribers);
            let members = ids.clone().map(|_| Sub::new(shared.clone())).collect();
            let group = Group::new(shared.clone(), members);
            let (addr, keys, limit, ready, stop) = (
                opts.addr.clone(),
                keys.clone(),
                limit.clone(),
                ready_tx.clone(),
                stop_rx.clone(),
            );
            let target = opts.target;
            subs.push(tokio::spawn(async move {
                let result = match target {
                    Target::Floor => floor_subs(&addr, limit, ready.clone(), stop, group).await,
                    _ => freshd_subs(&addr, ids, keys, limit, ready.clone(), stop, group).await,
                };
                if let Err(e) = result {
                    let _ = ready.send(Err(e)).await;
                }
            }));
        }
    }
    for _ in 0..opts.subscribers {
        if grouped {
            break;
        }
        let group = Group::new(shared.clone(), vec![Sub::new(shared.clone())]);
        let (opts, keys, limit, ready, stop) = (
            opts.clone(),
            keys.clone(),
            limit.clone(),
            ready_tx.clone(),
            stop_rx.clone(),
        );
        subs.push(tokio::spawn(async move {
            let result = match opts.target {
                Target::Freshd | Target::Floor => {
                    unreachable!("grouped subscribers are started above")
                }
                Target::Redis => {
                    redis_sub(&opts.addr, keys, limit, ready.clone(), stop, group).await
                }
                Target::Etcd => etcd_sub(&opts.addr, limit, ready.clone(), stop, group).await,
            };
            if let Err(e) = result {
                let _ = ready.send(Err(e)).await;
            }
        }));
    }
    drop(ready_tx);
    for _ in 0..opts.subscribers {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(format!("a subscriber failed to start: {e}")),
            None => return Err("subscribers ended before starting".into()),
        }
    }

    // The writer.
    let start = Instant::now() + Duration::from_millis(100);
    shared.start.set(start).expect("set once");
    let writes = Arc::new(Mutex::new(Latencies::default()));
    let write_errors = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::unbounded_channel::<Tick>();
    let writer = tokio::spawn(write(
        opts.clone(),
        rx,
        writes.clone(),
        write_errors.clone(),
    ));
    let end = pace::intended(start, opts.rate, changes);
    // Server CPU from the first counted write until every notice is in.
    let cpu_mark = crate::cpu::mark_at(pace::intended(start, opts.rate, counted_from));
    let pacer = pace::spawn(
        opts.rate,
        start,
        end + Duration::from_secs(1),
        Some(changes),
        vec![tx],
    );
    let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
    writer.await.map_err(|e| format!("writer: {e}"))??;

    // Wait for every notice, then close every subscriber at once.
    let deadline = Instant::now() + DRAIN;
    while shared.finished.load(Ordering::Relaxed) < opts.subscribers && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = cpu_mark.await.ok().map(|mark| crate::cpu::since(&mark));
    let _ = stop_tx.send(true);
    for s in subs {
        let _ = s.await;
    }

    let latencies = shared.latencies();
    let counted = latencies.count();
    let received = shared.received.load(Ordering::Relaxed);
    let expected = changes * opts.subscribers as u64;
    let writes = writes.lock().summary();
    Ok(Report {
        workload: "notice".into(),
        target: opts.target.name().into(),
        variant: match opts.target {
            Target::Freshd if per_conn > 1 => "Publish -> Watch, shared conns",
            Target::Freshd => "Publish -> Watch",
            Target::Redis => "SET -> tracking push",
            Target::Etcd => "Put -> Watch",
            Target::Floor if per_conn > 1 => "line -> N writes, shared conns",
            Target::Floor => "line -> N writes",
        }
        .into(),
        mode: "open".into(),
        params: json!({
            "subscribers": opts.subscribers, "rate": opts.rate,
            "warmup_s": opts.warmup, "keys": changes, "per_conn": per_conn,
        }),
        secs: opts.secs,
        ops: counted,
        ops_per_sec: counted as f64 / opts.secs,
        keys_per_sec: counted as f64 / opts.secs,
        errors: expected.saturating_sub(received) + write_errors.load(Ordering::Relaxed),
        latency: Some(latencies.summary()),
        server_cpu_s: cpu.and_then(|(used, _)| used.server_s),
        load_cpu_s: cpu.and_then(|(used, _)| used.load_s),
        extra: json!({
            "notices_expected": expected, "notices_received": received,
            "write_p50_us": writes.p50_us, "write_p99_us": writes.p99_us,
            "cpu_window_s": cpu.map(|(_, wall)| wall),
        }),
    })
}

/// Registers (freshd) or writes (Redis) the keys; etcd needs nothing.
async fn prepare(opts: &NoticeOpts, keys: &Arc<Vec<String>>) -> Result<(), Error> {
    match opts.target {
        Target::Freshd => {
            let client = freshd_client(&opts.addr).await?;
            let keys = keys.clone();
            parallel(keys.len(), 32, move |_, i| {
                let (mut client, key) = (client.clone(), keys[i].clone());
                async move {
                    client
                        .fill(FillRequest {
                            key,
                            ttl_ms: 3_600_000,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("fill: {e}"))
                }
            })
            .await
        }
        Target::Redis => {
            let mut conn = resp::SyncConn::connect(socket_addr(&opts.addr)?)
                .map_err(|e| format!("cannot connect to redis {}: {e}", opts.addr))?;
            let mut pipe = resp::Pipeline::new(&mut conn, 1000);
            for k in keys.iter() {
                pipe.push(&[b"SET", k.as_bytes(), b"0"])
                    .map_err(|e| e.to_string())?;
            }
            pipe.flush().map_err(|e| e.to_string())
        }
        Target::Etcd | Target::Floor => Ok(()),
    }
}

/// The writer: one connection, a write per tick, answers awaited on the
/// side (gRPC: a task per call; Redis: a reader task).
async fn write(
    opts: NoticeOpts,
    mut ticks: mpsc::UnboundedReceiver<Tick>,
    lat: Arc<Mutex<Latencies>>,
    errors: Arc<AtomicU64>,
) -> Result<(), Error> {
    let mut calls = tokio::task::JoinSet::new();
    match opts.target {
        Target::Freshd => {
            let mut conn = UnaryConn::connect(&opts.addr).await?;
            conn.calls(
                "/freshd.v1.Coordinator/Publish",
                |cx, _| ticks.poll_recv(cx),
                |tick| PublishRequest {
                    changes: vec![Change {
                        key: format!("hot:{}", tick.index),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                |tick, answer: Result<PublishResponse, Error>| match answer {
                    Ok(_) => lat.lock().record(tick.intended.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                },
            )
            .await?;
        }
        Target::Floor => {
            use tokio::io::AsyncWriteExt;
            let mut conn = connect_nodelay(&opts.addr).await?;
            conn.write_all(b"W\n")
                .await
                .map_err(|e| format!("floor write: {e}"))?;
            // No answer comes: `write_p50_us`/`write_p99_us` stay 0.
            while let Some(tick) = ticks.recv().await {
                conn.write_all(format!("hot:{}\n", tick.index).as_bytes())
                    .await
                    .map_err(|e| format!("floor write: {e}"))?;
            }
        }
        Target::Etcd => {
            let client = etcdpb::kv_client::KvClient::new(grpc_channel(&opts.addr).await?);
            while let Some(tick) = ticks.recv().await {
                let (mut client, lat, errors) = (client.clone(), lat.clone(), errors.clone());
                calls.spawn(async move {
                    let r = client
                        .put(etcdpb::PutRequest {
                            key: format!("hot:{}", tick.index).into_bytes(),
                            value: b"1".to_vec(),
                            ..Default::default()
                        })
                        .await;
                    match r {
                        Ok(_) => lat.lock().record(tick.intended.elapsed()),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                while calls.try_join_next().is_some() {}
            }
        }
        Target::Redis => {
            use tokio::io::AsyncWriteExt;
            let conn = AsyncConn::connect(socket_addr(&opts.addr)?)
                .await
                .map_err(|e| format!("cannot connect to redis: {e}"))?;
            let (mut reader, mut writer) = conn.into_split();
            let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<Tick>();
            let (lat2, errors2) = (lat.clone(), errors.clone());
            calls.spawn(async move {
                while let Some(tick) = sent_rx.recv().await {
                    match reader.read_reply().await {
                        Ok(Reply::Error(_)) | Err(_) => {
                            errors2.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => lat2.lock().record(tick.intended.elapsed()),
                    }
                }
            });
            let mut out = Vec::new();
            while let Some(tick) = ticks.recv().await {
                out.clear();
                let key = format!("hot:{}", tick.index);
                resp::encode(&[b"SET", key.as_bytes(), b"1"], &mut out);
                let _ = sent_tx.send(tick);
                writer
                    .write_all(&out)
                    .await
                    .map_err(|e| format!("redis write: {e}"))?;
            }
        }
    }
    while calls.join_next().await.is_some() {}
    Ok(())
}

/// Waits for `stop` (subscribers keep their streams open until all are
/// done: closing one costs the server work that would delay the others).
async fn wait_stop(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Subscribers `ids` as `Watch` streams on one connection (one stream, or
/// several sharing it), each tracking `keys`, read by one task.
async fn freshd_subs(
    addr: &str,
    ids: std::ops::Range<usize>,
    keys: Arc<Vec<String>>,
    limit: Arc<Semaphore>,
    ready: mpsc::Sender<Result<(), Error>>,
    stop: watch::Receiver<bool>,
    mut group: Group,
) -> Result<(), Error> {
    let mut conn = {
        let _permit = limit.acquire().await.expect("semaphore");
        let starts = ids
            .map(|id| (format!("load-sub-{id}"), keys.to_vec()))
            .collect();
        WatchStream::start_many(addr, starts).await?
    };
    for _ in 0..group.subs.len() {
        let _ = ready.send(Ok(())).await;
    }
    let mut stop2 = stop.clone();
    loop {
        let read = tokio::select! {
            biased;
            _ = stop2.changed() => return Ok(()),
            read = conn.read_more() => read,
        };
        if read.is_err() {
            // The notices this connection still owed count as missing.
            return Ok(());
        }
        // Each notice counts from when the read that brought it returned
        // (as the other servers' subscribers count theirs): the messages
        // of one read are taken one after another, and the time taking
        // the first ones costs is the load tool's, not the server's. Only
        // the notices' keys are read, off the message's bytes
        // (`notice_keys`), as they lie in what was read (`drain_raw`).
        let open = conn.drain_raw(|raw| {
            let at = raw.read_at.unwrap_or_else(Instant::now);
            notice_keys(raw.bytes, |key| group.note(raw.stream, key, at)).map(|_| ())
        })?;
        if group.finished() {
            wait_stop(stop).await;
            return Ok(());
        }
        if !open {
            return Ok(());
        }
    }
}

/// A freshd Watch stream tracking `track`, started, on a connection of its
/// own, read by the task that owns it ([`WatchStream`]).
pub async fn freshd_watch(
    addr: &str,
    client_id: String,
    track: Vec<String>,
) -> Result<WatchStream, Error> {
    WatchStream::start(addr, client_id, track).await
}

/// A RESP3 connection tracking `keys` (read once with `MGET`).
pub async fn redis_tracking(addr: &str, keys: &[String]) -> Result<AsyncConn, Error> {
    let mut conn = AsyncConn::connect(socket_addr(addr)?)
        .await
        .map_err(|e| format!("cannot connect to redis: {e}"))?;
    let fail = |e: std::io::Error| format!("redis: {e}");
    conn.command(&[b"HELLO", b"3"]).await.map_err(fail)?;
    if let Reply::Error(e) = conn
        .command(&[b"CLIENT", b"TRACKING", b"on"])
        .await
        .map_err(fail)?
    {
        return Err(format!("CLIENT TRACKING: {e}"));
    }
    redis_read(&mut conn, keys).await?;
    Ok(conn)
}

/// Reads `keys` with `MGET`, 1,000 at a time (which makes Redis track them).
pub async fn redis_read(conn: &mut AsyncConn, keys: &[String]) -> Result<(), Error> {
    for chunk in keys.chunks(1000) {
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(chunk.iter().map(|k| k.as_bytes()));
        match conn.command(&args).await {
            Ok(Reply::Array(Some(_))) => {}
            other => return Err(format!("MGET answered {other:?}")),
        }
    }
    Ok(())
}

/// The keys of a tracking `invalidate` push.
pub fn invalidated(reply: &Reply) -> Vec<&[u8]> {
    match reply {
        Reply::Push(items) if matches!(items.first(), Some(Reply::Bulk(Some(k))) if k == b"invalidate") => {
            match items.get(1) {
                Some(Reply::Array(Some(keys))) => keys
                    .iter()
                    .filter_map(|k| match k {
                        Reply::Bulk(Some(k)) => Some(k.as_slice()),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            }
        }
        _ => Vec::new(),
    }
}

/// A subscriber's connection to Redis, the floor or etcd, as
/// [`listen`] reads it.
trait Arrivals: Send {
    /// Waits for what the server sends next and hands each key it names to
    /// `note`; `false` once the connection has ended.
    fn next(
        &mut self,
        note: &mut (dyn FnMut(&[u8]) + Send),
    ) -> impl std::future::Future<Output = bool> + Send;
}

/// Reads `conn`, which carries `group`'s subscribers (one, or several that
/// share it and get each change once apiece, in turn), until every
/// expected notice has come (then waits for the stop), the connection
/// ends, or the run stops. Each notice counts from when the read that
/// brought it returned.
async fn listen(
    mut conn: impl Arrivals,
    stop: watch::Receiver<bool>,
    mut group: Group,
) -> Result<(), Error> {
    let mut stop2 = stop.clone();
    let mut next = 0;
    loop {
        let mut at = None;
        let mut note = |key: &[u8]| {
            let now = *at.get_or_insert_with(Instant::now);
            group.note(next, key, now);
            next = (next + 1) % group.subs.len();
        };
        let open = tokio::select! {
            biased;
            _ = stop2.changed() => return Ok(()),
            open = conn.next(&mut note) => open,
        };
        if group.finished() {
            wait_stop(stop).await;
            return Ok(());
        }
        if !open {
            return Ok(());
        }
    }
}

impl Arrivals for AsyncConn {
    async fn next(&mut self, note: &mut (dyn FnMut(&[u8]) + Send)) -> bool {
        // The keys of an `invalidate` push are read in place, as a freshd
        // subscriber's are (`watch::notice_keys`).
        match self.read_invalidation(&mut *note).await {
            Ok(None) => true,
            Ok(Some(reply)) => {
                for key in invalidated(&reply) {
                    note(key);
                }
                true
            }
            Err(_) => false,
        }
    }
}

/// A floor subscriber's socket and what it has read of the current line.
struct FloorLines {
    conn: tokio::net::TcpStream,
    buf: Vec<u8>,
    filled: usize,
}

impl Arrivals for FloorLines {
    async fn next(&mut self, note: &mut (dyn FnMut(&[u8]) + Send)) -> bool {
        use tokio::io::AsyncReadExt;
        let Ok(n @ 1..) = self.conn.read(&mut self.buf[self.filled..]).await else {
            return false;
        };
        self.filled += n;
        let mut used = 0;
        while let Some(end) = self.buf[used..self.filled].iter().position(|&b| b == b'\n') {
            note(&self.buf[used..used + end]);
            used += end + 1;
        }
        self.buf.copy_within(used..self.filled, 0);
        self.filled -= used;
        // A line longer than the buffer is not a floor's; the subscriber
        // stops, and its notices count as missing.
        self.filled < self.buf.len()
    }
}

impl Arrivals for tonic::Streaming<etcdpb::WatchResponse> {
    async fn next(&mut self, note: &mut (dyn FnMut(&[u8]) + Send)) -> bool {
        let Ok(Some(message)) = self.message().await else {
            return false;
        };
        for kv in message.events.iter().filter_map(|e| e.kv.as_ref()) {
            note(&kv.key);
        }
        true
    }
}

async fn redis_sub(
    addr: &str,
    keys: Arc<Vec<String>>,
    limit: Arc<Semaphore>,
    ready: mpsc::Sender<Result<(), Error>>,
    stop: watch::Receiver<bool>,
    group: Group,
) -> Result<(), Error> {
    let conn = {
        let _permit = limit.acquire().await.expect("semaphore");
        redis_tracking(addr, &keys).await?
    };
    let _ = ready.send(Ok(())).await;
    listen(conn, stop, group).await
}

/// Subscribers on one connection to the floor (`S<n>`), which writes each
/// change to it once per subscriber: the lines are theirs in turn.
async fn floor_subs(
    addr: &str,
    limit: Arc<Semaphore>,
    ready: mpsc::Sender<Result<(), Error>>,
    stop: watch::Receiver<bool>,
    group: Group,
) -> Result<(), Error> {
    use tokio::io::AsyncWriteExt;
    let conn = {
        let _permit = limit.acquire().await.expect("semaphore");
        let mut conn = connect_nodelay(addr).await?;
        conn.write_all(format!("S{}\n", group.subs.len()).as_bytes())
            .await
            .map_err(|e| format!("floor: {e}"))?;
        conn
    };
    for _ in 0..group.subs.len() {
        let _ = ready.send(Ok(())).await;
    }
    let lines = FloorLines {
        conn,
        buf: vec![0u8; 64 << 10],
        filled: 0,
    };
    listen(lines, stop, group).await
}

async fn etcd_sub(
    addr: &str,
    limit: Arc<Semaphore>,
    ready: mpsc::Sender<Result<(), Error>>,
    stop: watch::Receiver<bool>,
    group: Group,
) -> Result<(), Error> {
    let (_requests, responses) = {
        let _permit = limit.acquire().await.expect("semaphore");
        etcd_watch(addr, b"hot:").await?
    };
    let _ = ready.send(Ok(())).await;
    listen(responses, stop, group).await
}

/// An etcd Watch stream on every key starting with `prefix`, created.
pub async fn etcd_watch(
    addr: &str,
    prefix: &[u8],
) -> Result<
    (
        mpsc::Sender<etcdpb::WatchRequest>,
        tonic::Streaming<etcdpb::WatchResponse>,
    ),
    Error,
> {
    let mut client = etcdpb::watch_client::WatchClient::new(grpc_channel(addr).await?);
    let mut range_end = prefix.to_vec();
    *range_end.last_mut().expect("a prefix") += 1;
    let (tx, rx) = mpsc::channel(4);
    tx.send(etcdpb::WatchRequest {
        request_union: Some(etcdpb::watch_request::RequestUnion::CreateRequest(
            etcdpb::WatchCreateRequest {
                key: prefix.to_vec(),
                range_end,
                ..Default::default()
            },
        )),
    })
    .await
    .map_err(|_| "watch request queue closed")?;
    let mut responses = client
        .watch(ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("etcd watch: {e}"))?
        .into_inner();
    match responses.message().await {
        Ok(Some(r)) if r.created => Ok((tx, responses)),
        other => Err(format!("expected an etcd watch `created`, got {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every notice a group notes is counted to its subscriber and its
    /// latency recorded once, runs of equal ones as well as lone ones;
    /// warm-up changes are counted but not timed, other keys neither.
    #[test]
    fn a_group_records_each_timed_notice_once() {
        let start = Instant::now();
        let shared = Arc::new(Shared {
            start: OnceLock::from(start),
            rate: 1000.0,
            counted_from: 1,
            expected: 3,
            finished: AtomicUsize::new(0),
            received: AtomicU64::new(0),
            run: RUNS.fetch_add(1, Ordering::Relaxed),
            latencies: Mutex::new(Vec::new()),
        });
        let subs = (0..2).map(|_| Sub::new(shared.clone())).collect();
        let mut group = Group::new(shared.clone(), subs);
        let ms = Duration::from_millis;
        // Change i is intended at start + i ms.
        group.note(0, b"hot:0", start + ms(5));
        group.note(1, b"hot:0", start + ms(5));
        group.note(0, b"hot:1", start + ms(5));
        group.note(1, b"hot:1", start + ms(7));
        group.note(0, b"not-a-change", start + ms(7));
        assert!(!group.finished());
        group.note(0, b"hot:2", start + ms(6));
        group.note(1, b"hot:2", start + ms(6));
        assert!(group.finished());
        assert_eq!(shared.finished.load(Ordering::Relaxed), 2);
        drop(group);

        assert_eq!(shared.received.load(Ordering::Relaxed), 6);
        let latencies = shared.latencies().summary();
        // hot:1 at 4 and 6 ms, hot:2 at 4 and 4 ms.
        assert_eq!(latencies.count, 4);
        // (Within the histogram's three significant digits.)
        let about = |us: u64, want: u64| us.abs_diff(want) <= want / 500;
        assert!(about(latencies.min_us, 4000), "{latencies:?}");
        assert!(about(latencies.p50_us, 4000), "{latencies:?}");
        assert!(about(latencies.max_us, 6000), "{latencies:?}");
    }
}
