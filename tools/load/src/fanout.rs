//! Notices delivered per second to N subscribers, with one writer in a
//! closed loop (send, wait for the answer, send again).
//!
//! - freshd: every subscriber is a `Watch` stream tracking the keys
//!   `fan:0..K`; each `Publish` carries `per_call` changes (`fan:j..`,
//!   cycling). A stream still holding a queued notice for a key gets only
//!   the newest (conflation), so fewer notices than changes x subscribers
//!   may arrive: the report says how many did.
//! - Redis: every subscriber `SUBSCRIBE fan`; the writer sends pipelined
//!   rounds of `per_call` `PUBLISH fan j` (one round trip per round, like
//!   one `Publish` of `per_call` changes).
//!
//! Counted: what subscribers receive between the end of the warm-up and the
//! end of the window, per second.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshd::pb::{Change, PublishRequest};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::notice::freshd_watch;
use crate::resp::{self, AsyncConn, Reply};
use crate::stats::Report;
use crate::watch::notice_keys;
use crate::{freshd_client, secs, socket_addr, Error, Target};

/// Settings of the fan-out workload.
#[derive(Clone, Debug)]
pub struct FanoutOpts {
    /// `freshd` or `redis`.
    pub target: Target,
    /// Its `host:port`.
    pub addr: String,
    /// Subscribers, each on a connection of its own.
    pub subscribers: usize,
    /// Keys every freshd subscriber tracks.
    pub keys: usize,
    /// Changes per call (Redis: `PUBLISH`es per pipelined round).
    pub per_call: usize,
    /// Warm-up seconds.
    pub warmup: f64,
    /// Measured seconds.
    pub secs: f64,
}

/// Counters the subscribers share.
#[derive(Default)]
struct Counts {
    /// Set while the window is open.
    counting: AtomicBool,
    in_window: AtomicU64,
    total: AtomicU64,
}

impl Counts {
    fn add(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
        if self.counting.load(Ordering::Relaxed) {
            self.in_window.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Runs the workload once.
pub async fn run(opts: &FanoutOpts) -> Result<Report, Error> {
    if !matches!(opts.target, Target::Freshd | Target::Redis) {
        return Err("the fan-out workload runs against freshd or redis".into());
    }
    if opts.subscribers == 0 || opts.keys == 0 || opts.per_call == 0 {
        return Err("subscribers, keys and per-call must be positive".into());
    }
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let keys: Arc<Vec<String>> = Arc::new((0..opts.keys).map(|i| format!("fan:{i}")).collect());
    let limit = Arc::new(Semaphore::new(64));
    let mut starting = Vec::new();
    for id in 0..opts.subscribers {
        let (addr, keys, limit, target) =
            (opts.addr.clone(), keys.clone(), limit.clone(), opts.target);
        starting.push(tokio::spawn(async move {
            let _permit = limit.acquire().await.expect("semaphore");
            match target {
                Target::Freshd => freshd_watch(&addr, format!("load-fan-{id}"), keys.to_vec())
                    .await
                    .map(|s| Sub::Freshd(Box::new(s))),
                _ => {
                    let mut conn = AsyncConn::connect(socket_addr(&addr)?)
                        .await
                        .map_err(|e| format!("cannot connect to redis: {e}"))?;
                    match conn.command(&[b"SUBSCRIBE", b"fan"]).await {
                        Ok(Reply::Array(Some(_))) | Ok(Reply::Push(_)) => Ok(Sub::Redis(conn)),
                        other => Err(format!("SUBSCRIBE answered {other:?}")),
                    }
                }
            }
        }));
    }
    let mut readers = Vec::new();
    for s in starting {
        let sub = s.await.map_err(|e| format!("subscriber: {e}"))??;
        let (counts, stop) = (counts.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            match sub {
                Sub::Freshd(mut responses) => {
                    // Notices counted off the messages' bytes, as they lie
                    // in what was read (`drain_raw`, `notice_keys`): the
                    // Redis side counts its messages without building them.
                    while !stop.load(Ordering::Relaxed) {
                        match tokio::time::timeout(
                            Duration::from_millis(200),
                            responses.read_more(),
                        )
                        .await
                        {
                            Ok(Ok(())) => {
                                let mut n = 0;
                                let drained = responses.drain_raw(|raw| {
                                    notice_keys(raw.bytes, |_| n += 1).map(|_| ())
                                });
                                counts.add(n);
                                if !matches!(drained, Ok(true)) {
                                    return;
                                }
                            }
                            Ok(Err(_)) => return,
                            Err(_) => {}
                        }
                    }
                }
                Sub::Redis(mut conn) => {
                    while !stop.load(Ordering::Relaxed) {
                        match tokio::time::timeout(Duration::from_millis(200), conn.read_message())
                            .await
                        {
                            Ok(Ok(None)) => counts.add(1),
                            Ok(Ok(Some(_))) => {}
                            Ok(Err(_)) => return,
                            Err(_) => {}
                        }
                    }
                }
            }
        }));
    }

    // The writer, closed loop.
    let start = Instant::now();
    let measure_from = start + secs(opts.warmup);
    let until = measure_from + secs(opts.secs);
    let cpu = crate::cpu::window(measure_from, until);
    let mut changes = 0u64;
    let mut changes_in_window = 0u64;
    let mut errors = 0u64;
    let mut j = 0usize;
    let window = |counts: &Counts, now: Instant| {
        counts
            .counting
            .store(now >= measure_from && now < until, Ordering::Relaxed)
    };
    match opts.target {
        Target::Freshd => {
            let mut client = freshd_client(&opts.addr).await?;
            loop {
                let now = Instant::now();
                window(&counts, now);
                if now >= until {
                    break;
                }
                let batch: Vec<Change> = (0..opts.per_call)
                    .map(|k| Change {
                        key: keys[(j + k) % keys.len()].clone(),
                        ..Default::default()
                    })
                    .collect();
                j = (j + opts.per_call) % keys.len();
                match client
                    .publish(PublishRequest {
                        changes: batch,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(_) => {
                        changes += opts.per_call as u64;
                        if now >= measure_from {
                            changes_in_window += opts.per_call as u64;
                        }
                    }
                    Err(_) => errors += 1,
                }
            }
        }
        _ => {
            let mut conn = AsyncConn::connect(socket_addr(&opts.addr)?)
                .await
                .map_err(|e| format!("cannot connect to redis: {e}"))?;
            let mut out = Vec::new();
            loop {
                let now = Instant::now();
                window(&counts, now);
                if now >= until {
                    break;
                }
                out.clear();
                for k in 0..opts.per_call {
                    let payload = ((j + k) % keys.len()).to_string();
                    resp::encode(&[b"PUBLISH", b"fan", payload.as_bytes()], &mut out);
                }
                j = (j + opts.per_call) % keys.len();
                conn.write_raw(&out)
                    .await
                    .map_err(|e| format!("redis: {e}"))?;
                let mut ok = true;
                for _ in 0..opts.per_call {
                    ok &= matches!(conn.read_reply().await, Ok(Reply::Int(_)));
                }
                if ok {
                    changes += opts.per_call as u64;
                    if now >= measure_from {
                        changes_in_window += opts.per_call as u64;
                    }
                } else {
                    errors += 1;
                }
            }
        }
    }
    counts.counting.store(false, Ordering::Relaxed);
    // Let the last notices arrive (at most 5 s), for the delivered share.
    let expected = changes * opts.subscribers as u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = u64::MAX;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = counts.total.load(Ordering::Relaxed);
        if now >= expected || now == last {
            break;
        }
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.await;
    }
    let received = counts.in_window.load(Ordering::Relaxed);
    let total = counts.total.load(Ordering::Relaxed);
    let used = cpu.await.unwrap_or_default();
    Ok(Report {
        workload: "fanout".into(),
        target: opts.target.name().into(),
        variant: match opts.target {
            Target::Freshd => "Publish -> Watch",
            _ => "PUBLISH -> SUBSCRIBE",
        }
        .into(),
        mode: "closed".into(),
        params: json!({
            "subscribers": opts.subscribers, "keys": opts.keys,
            "per_call": opts.per_call, "warmup_s": opts.warmup,
        }),
        secs: opts.secs,
        ops: received,
        ops_per_sec: changes_in_window as f64 / opts.secs,
        keys_per_sec: received as f64 / opts.secs,
        errors,
        latency: None,
        server_cpu_s: used.server_s,
        load_cpu_s: used.load_s,
        extra: json!({
            "changes": changes, "notices_expected": expected, "notices_received": total,
            "delivered_share": if expected > 0 { total as f64 / expected as f64 } else { 0.0 },
        }),
    })
}

/// A started subscriber.
enum Sub {
    Freshd(Box<crate::watch::WatchStream>),
    Redis(AsyncConn),
}
