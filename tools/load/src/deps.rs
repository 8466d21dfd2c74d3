//! Dependency fan-out: one write that invalidates D dependents, and the time
//! until the last of their notices arrives.
//!
//! The D keys `dep:0..D` are split evenly among S subscribers (each on a
//! connection of its own); a round is one write, timed from just before it
//! is sent to the arrival of the D-th notice at any subscriber. Rounds run
//! one after another.
//!
//! - freshd: each `dep:i` is registered with `Fill` depending on `root`;
//!   subscribers are `Watch` streams tracking their keys; the write is
//!   `Publish {changes: [root]}`, and freshd walks the reverse edges.
//! - Redis: the same edges as a set, `SADD deps:root dep:0 ..`; subscribers
//!   are RESP3 connections with `CLIENT TRACKING on` that read their keys
//!   with `MGET` (again before every round, since default tracking forgets a
//!   key once it has sent its invalidation); the write is one `EVAL` of a
//!   script that `INCR`s every member of `deps:root`, so Redis too does the
//!   walk in one call and pushes `invalidate` for every dependent.

use std::time::{Duration, Instant};

use freshd::pb::watch_response::Response as WatchOut;
use freshd::pb::{Change, FillRequest, PublishRequest};
use serde_json::json;
use tokio::sync::mpsc;

use crate::notice::{freshd_watch, invalidated, redis_read, redis_tracking};
use crate::resp::{self, AsyncConn, Reply};
use crate::stats::{Latencies, Report};
use crate::{freshd_client, parallel, socket_addr, Error, Target};

/// Settings of the dependency fan-out workload.
#[derive(Clone, Debug)]
pub struct DepsOpts {
    /// `freshd` or `redis`.
    pub target: Target,
    /// Its `host:port`.
    pub addr: String,
    /// Dependents of the one key written.
    pub dependents: usize,
    /// Subscribers the dependents are split among.
    pub subscribers: usize,
    /// Rounds measured (one more runs first, as warm-up).
    pub rounds: usize,
}

/// How long one round may take before it counts as failed.
const ROUND_LIMIT: Duration = Duration::from_secs(30);

const SCRIPT: &str = "local m = redis.call('SMEMBERS', KEYS[1]) \
     for _, k in ipairs(m) do redis.call('INCR', k) end return #m";

/// What a subscriber tells the coordinator.
enum Event {
    /// `n` notices arrived at this instant.
    Got(usize, Instant),
    /// Ready for the next round (Redis: keys read again).
    Armed,
}

/// Runs the workload.
pub async fn run(opts: &DepsOpts) -> Result<Report, Error> {
    if !matches!(opts.target, Target::Freshd | Target::Redis) {
        return Err("the deps workload runs against freshd or redis".into());
    }
    if opts.dependents == 0 || opts.subscribers == 0 || opts.rounds == 0 {
        return Err("dependents, subscribers and rounds must be positive".into());
    }
    let d = opts.dependents;
    let keys: Vec<String> = (0..d).map(|i| format!("dep:{i}")).collect();
    let per_sub = d.div_ceil(opts.subscribers);
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let mut arm = Vec::new();
    let mut subs = Vec::new();

    match opts.target {
        Target::Freshd => {
            let client = freshd_client(&opts.addr).await?;
            parallel(d, 32, move |_, i| {
                let mut client = client.clone();
                async move {
                    client
                        .fill(FillRequest {
                            key: format!("dep:{i}"),
                            dependencies: vec!["root".into()],
                            ttl_ms: 3_600_000,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("fill: {e}"))
                }
            })
            .await?;
            for (id, chunk) in keys.chunks(per_sub).enumerate() {
                let mut responses =
                    freshd_watch(&opts.addr, format!("load-deps-{id}"), chunk.to_vec()).await?;
                let tx = events_tx.clone();
                subs.push(tokio::spawn(async move {
                    while let Ok(Some(m)) = responses.message().await {
                        if let Some(WatchOut::Notices(b)) = m.response {
                            let n = b
                                .notices
                                .iter()
                                .filter(|n| n.key.starts_with("dep:"))
                                .count();
                            if tx.send(Event::Got(n, Instant::now())).is_err() {
                                return;
                            }
                        }
                    }
                }));
            }
        }
        _ => {
            let addr = socket_addr(&opts.addr)?;
            let mut conn = resp::SyncConn::connect(addr).map_err(|e| format!("redis: {e}"))?;
            let mut pipe = resp::Pipeline::new(&mut conn, 1000);
            for k in &keys {
                pipe.push(&[b"SET", k.as_bytes(), b"0"])
                    .map_err(|e| e.to_string())?;
                pipe.push(&[b"SADD", b"deps:root", k.as_bytes()])
                    .map_err(|e| e.to_string())?;
            }
            pipe.flush().map_err(|e| e.to_string())?;
            for chunk in keys.chunks(per_sub) {
                let chunk = chunk.to_vec();
                let mut conn = redis_tracking(&opts.addr, &chunk).await?;
                let (arm_tx, mut arm_rx) = mpsc::unbounded_channel::<()>();
                arm.push(arm_tx);
                let tx = events_tx.clone();
                subs.push(tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            a = arm_rx.recv() => {
                                if a.is_none() || redis_read(&mut conn, &chunk).await.is_err() {
                                    return;
                                }
                                let _ = tx.send(Event::Armed);
                            }
                            reply = conn.read_reply() => {
                                let Ok(reply) = reply else { return };
                                let n = invalidated(&reply).len();
                                if n > 0 && tx.send(Event::Got(n, Instant::now())).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }));
            }
        }
    }
    drop(events_tx);

    let mut writer_freshd = match opts.target {
        Target::Freshd => Some(freshd_client(&opts.addr).await?),
        _ => None,
    };
    let mut writer_redis = match opts.target {
        Target::Redis => Some(
            AsyncConn::connect(socket_addr(&opts.addr)?)
                .await
                .map_err(|e| format!("redis: {e}"))?,
        ),
        _ => None,
    };
    let mut last_notice = Latencies::default();
    let mut write_answered = Latencies::default();
    let mut errors = 0u64;
    let mut invalidated_per_write = 0u64;
    for round in 0..=opts.rounds {
        // Arm the Redis subscribers again (not timed).
        if !arm.is_empty() {
            for a in &arm {
                let _ = a.send(());
            }
            let mut armed = 0;
            while armed < arm.len() {
                match events.recv().await {
                    Some(Event::Armed) => armed += 1,
                    Some(Event::Got(..)) => {}
                    None => return Err("a subscriber ended".into()),
                }
            }
        }
        // A pause between rounds, so that one round's writes and notices
        // are done with before the next is timed (not a wait for a state:
        // every subscriber has already reported itself armed).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t0 = Instant::now();
        let answered = if let Some(client) = writer_freshd.as_mut() {
            let r = client
                .publish(PublishRequest {
                    changes: vec![Change {
                        key: "root".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("publish: {e}"))?;
            invalidated_per_write = r.get_ref().results.first().map_or(0, |r| r.invalidated);
            Instant::now()
        } else {
            let conn = writer_redis.as_mut().expect("a writer");
            match conn
                .command(&[b"EVAL", SCRIPT.as_bytes(), b"1", b"deps:root"])
                .await
            {
                Ok(Reply::Int(n)) => invalidated_per_write = n as u64,
                other => return Err(format!("EVAL answered {other:?}")),
            }
            Instant::now()
        };
        let mut got = 0usize;
        let mut last = t0;
        let deadline = tokio::time::Instant::now() + ROUND_LIMIT;
        while got < d {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(Event::Got(n, at))) => {
                    got += n;
                    last = last.max(at);
                }
                Ok(Some(Event::Armed)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        if round == 0 {
            continue;
        }
        if got < d {
            errors += 1;
        } else {
            last_notice.record(last - t0);
            write_answered.record(answered - t0);
        }
    }
    for s in subs {
        s.abort();
    }
    let n = last_notice.count();
    let total_secs = last_notice.summary().mean_us * n as f64 / 1e6;
    let answered = write_answered.summary();
    Ok(Report {
        workload: "deps".into(),
        target: opts.target.name().into(),
        variant: match opts.target {
            Target::Freshd => "Publish root -> Watch",
            _ => "EVAL INCR deps -> tracking push",
        }
        .into(),
        mode: "closed".into(),
        params: json!({
            "dependents": d, "subscribers": opts.subscribers, "rounds": opts.rounds,
        }),
        secs: total_secs,
        ops: n,
        ops_per_sec: if total_secs > 0.0 {
            n as f64 / total_secs
        } else {
            0.0
        },
        keys_per_sec: if total_secs > 0.0 {
            (n * d as u64) as f64 / total_secs
        } else {
            0.0
        },
        errors,
        latency: Some(last_notice.summary()),
        server_cpu_s: None,
        load_cpu_s: None,
        extra: json!({
            "invalidated_per_write": invalidated_per_write,
            "write_answered_p50_us": answered.p50_us,
            "write_answered_max_us": answered.max_us,
        }),
    })
}
