//! What recording metrics costs: gRPC check throughput of a server that
//! records every figure against one that records nothing, in the same run.
//!
//! Both servers are real freshd servers on loopback ports, holding the same
//! keys; each round runs the same closed-loop client load against one, then
//! the other, and the rounds alternate so that drift on a noisy machine hits
//! both alike. Every check reports an endpoint, an age and `served`, so the
//! recording path is the full one (hit age, served checks, RPC counts and
//! latency). Then, in-process: what recording one check costs, one check
//! of a batch of 1,000, and prometheus-client's histogram side by side with
//! the batch histogram freshd records hit ages and notice delays in.
//!
//! ```sh
//! cargo bench --bench metrics_overhead
//! ```
//! Environment: `OVERHEAD_SECS` per round (default 3), `OVERHEAD_ROUNDS` (4),
//! `OVERHEAD_TASKS` concurrent clients (16).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshd::config::Config;
use freshd::log::MemoryLog;
use freshd::metrics::{BatchHistogram, Metrics, MetricsConfig, Tally};
use freshd::pb::{self, coordinator_client::CoordinatorClient};
use freshd::policy::namespace;
use freshd::server::RunningServer;
use freshd::store::Store;
use prometheus_client::metrics::histogram::Histogram;
use tonic::transport::Channel;

const KEYS: usize = 10_000;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn server(enabled: bool) -> (RunningServer, Vec<(String, u64)>) {
    let config = Config::ephemeral();
    let metrics = Arc::new(Metrics::new(MetricsConfig {
        enabled,
        ..MetricsConfig::default()
    }));
    let store = Arc::new(Store::with_metrics(
        config.store.clone(),
        Box::new(MemoryLog::new()),
        metrics,
    ));
    let server = RunningServer::start_with_store(config, store)
        .await
        .expect("server starts");
    let mut client = CoordinatorClient::connect(server.url()).await.unwrap();
    let mut keys = Vec::with_capacity(KEYS);
    for i in 0..KEYS {
        let key = format!("feed:user:{i}");
        let f = client
            .fill(pb::FillRequest {
                key: key.clone(),
                dependencies: vec![format!("posts:author:{}", i % 100)],
                ttl_ms: 3_600_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        keys.push((key, f.version));
    }
    (server, keys)
}

/// Checks per second over `secs` with `tasks` concurrent clients.
async fn run(url: &str, keys: &Arc<Vec<(String, u64)>>, tasks: u64, secs: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let channel = Channel::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = CoordinatorClient::new(channel);
        let keys = keys.clone();
        let done = done.clone();
        handles.push(tokio::spawn(async move {
            let mut i = (t as usize * 7919) % keys.len();
            while Instant::now() < deadline {
                let (key, version) = &keys[i];
                let r = client
                    .check(pb::CheckRequest {
                        key: key.clone(),
                        version: *version,
                        age_ms: 1_500,
                        endpoint: "home".into(),
                        served: true,
                        ..Default::default()
                    })
                    .await
                    .expect("check")
                    .into_inner();
                assert_eq!(r.freshness(), pb::Freshness::Fresh);
                done.fetch_add(1, Ordering::Relaxed);
                i = (i + 1) % keys.len();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / secs as f64
}

fn main() {
    let secs = env("OVERHEAD_SECS", 3);
    let rounds = env("OVERHEAD_ROUNDS", 4);
    let tasks = env("OVERHEAD_TASKS", 16);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (on, on_keys) = server(true).await;
        let (off, off_keys) = server(false).await;
        let (on_keys, off_keys) = (Arc::new(on_keys), Arc::new(off_keys));
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Alternate which goes first.
            if round % 2 == 0 {
                with.push(run(&on.url(), &on_keys, tasks, secs).await);
                without.push(run(&off.url(), &off_keys, tasks, secs).await);
            } else {
                without.push(run(&off.url(), &off_keys, tasks, secs).await);
                with.push(run(&on.url(), &on_keys, tasks, secs).await);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        println!("| round | checks/s with metrics | checks/s without | ratio |");
        println!("| --- | ---: | ---: | ---: |");
        for (i, (w, wo)) in with.iter().zip(&without).enumerate() {
            println!("| {} | {w:.0} | {wo:.0} | {:.3} |", i + 1, w / wo);
        }
        let (w, wo) = (mean(&with), mean(&without));
        println!("| mean | {w:.0} | {wo:.0} | {:.3} |", w / wo);
        println!(
            "\nrecording metrics costs {:.1}% of check throughput ({} tasks, {} s x {} rounds)",
            (1.0 - w / wo) * 100.0,
            tasks,
            secs,
            rounds
        );
        on.stop().await.unwrap();
        off.stop().await.unwrap();
    });

    // The recording itself, in-process: what one check adds on its server.
    let metrics = Metrics::new(MetricsConfig::default());
    let n = 1_000_000u64;
    let started = Instant::now();
    for i in 0..n {
        let key = if i % 2 == 0 {
            "feed:user:1"
        } else {
            "posts:author:2"
        };
        metrics
            .check_recorder("home")
            .record(namespace(key), 7, 1_500, true, i % 10 == 0, false);
        metrics.rpc("Check", tonic::Code::Ok, Duration::from_micros(40));
    }
    let per = started.elapsed().as_nanos() as f64 / n as f64;
    println!("recording one check's figures (hit age, served, RPC count and latency): {per:.0} ns in-process");

    // A batch's checks: 1,000 in one namespace through one recorder.
    let batches = 1_000u64;
    let started = Instant::now();
    for b in 0..batches {
        let mut recorder = metrics.check_recorder("home");
        for i in 0..1_000u64 {
            recorder.record("feed", 7, (b * 7 + i * 13) % 5_000, false, false, false);
        }
    }
    let per = started.elapsed().as_nanos() as f64 / (batches * 1_000) as f64;
    println!("recording a check in a batch of 1,000 (hit age): {per:.1} ns in-process");

    // The histograms alone, side by side in this run: prometheus-client's,
    // which locks per observation, against the batch histogram the hit ages
    // and notice delays use (a tally per run of values, one lock to add it;
    // one lock for a value seen n times).
    const BOUNDS: &[f64] = &[
        0.001, 0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
    ];
    let values: Vec<f64> = (0..1_000u64)
        .map(|i| (i * 13 % 5_000) as f64 / 1000.0)
        .collect();
    let stock = Histogram::new(BOUNDS.iter().copied());
    let batch = BatchHistogram::new(BOUNDS);
    let rounds = 2_000u32;
    let time = |f: &mut dyn FnMut()| {
        let started = Instant::now();
        for _ in 0..rounds {
            f();
        }
        started.elapsed().as_nanos() as f64 / (rounds as f64 * values.len() as f64)
    };
    let stock_each = time(&mut || values.iter().for_each(|&v| stock.observe(v)));
    let batch_tally = time(&mut || {
        let mut tally = Tally::default();
        values.iter().for_each(|&v| batch.tally(&mut tally, v));
        batch.add(&mut tally);
    });
    let stock_same = time(&mut || values.iter().for_each(|_| stock.observe(0.002)));
    let batch_same = time(&mut || batch.observe_n(0.002, values.len() as u64));
    println!("| observations | prometheus-client ns each | batch histogram ns each | ratio |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| 1,000 values, one run | {stock_each:.1} | {batch_tally:.1} | {:.2} |",
        batch_tally / stock_each
    );
    println!(
        "| one value 1,000 times | {stock_same:.1} | {batch_same:.2} | {:.3} |",
        batch_same / stock_same
    );
}
