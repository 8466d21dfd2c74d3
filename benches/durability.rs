//! What durability costs: publish throughput per fsync policy against the
//! memory-only default in the same run, recovery time for 1M keys and 4M
//! edges (from the log alone, and from a snapshot), and snapshot bytes per
//! key.
//!
//! ```sh
//! cargo bench --bench durability
//! ```
//! Environment: `DURABILITY_SECS` per publish measurement (default 3),
//! `DURABILITY_TASKS` concurrent publishers (16), `DURABILITY_KEYS` for the
//! recovery measurement (1000000; edges are 4 per key), `DURABILITY_DIR`
//! where to write (default: the system's temporary directory).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshd::log::{Log, MemoryLog};
use freshd::store::{FillSpec, PublishChange, Store, StoreConfig};
use freshd::wal::{FileLog, FsyncPolicy, WalConfig};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn base_dir() -> PathBuf {
    std::env::var("DURABILITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir())
        .join(format!("freshd-durability-bench-{}", std::process::id()))
}

fn wal(dir: PathBuf, fsync: FsyncPolicy) -> WalConfig {
    WalConfig {
        dir,
        fsync,
        segment_bytes: 64 << 20,
        repair: false,
        snapshot_bytes: u64::MAX,
    }
}

/// Publishes per second from `tasks` concurrent publishers, each waiting for
/// its write to be acknowledged (durable under fsync=always).
async fn publish_rate(store: Arc<Store>, tasks: u64, secs: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (store, done) = (store.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let change = PublishChange {
                    key: format!("posts:author:{t}:{}", n % 1000),
                    external_version: None,
                    critical: false,
                    event_time_ms: 0,
                };
                let seq = store.publish(&[change]).expect("publish").seq;
                store.wait_durable(seq).await;
                done.fetch_add(1, Ordering::Relaxed);
                n += 1;
                if n % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / secs as f64
}

fn fill_graph(store: &Store, keys: u64) {
    for i in 0..keys {
        let mut dependencies: Vec<String> = (0..4)
            .map(|j| format!("posts:author:{}", (i * 4 + j) % (keys / 4).max(1)))
            .collect();
        dependencies.sort();
        dependencies.dedup();
        store
            .fill(&FillSpec {
                key: format!("feed:user:{i}"),
                dependencies,
                ttl_ms: 3_600_000,
                observed_seq: store.seq(),
            })
            .expect("fill");
    }
}

fn main() {
    let secs = env("DURABILITY_SECS", 3);
    let tasks = env("DURABILITY_TASKS", 16);
    let keys = env("DURABILITY_KEYS", 1_000_000);
    let base = base_dir();
    let _ = std::fs::remove_dir_all(&base);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    println!("## Publish throughput by fsync policy ({tasks} publishers, {secs} s each)\n");
    println!("| log | publishes/s | ratio to memory-only |");
    println!("| --- | ---: | ---: |");
    let memory = runtime.block_on(publish_rate(
        Arc::new(Store::new(
            StoreConfig::default(),
            Box::new(MemoryLog::new()),
        )),
        tasks,
        secs,
    ));
    println!("| memory only | {memory:.0} | 1.00 |");
    for (name, policy) in [
        ("fsync=never", FsyncPolicy::Never),
        (
            "fsync=interval (100 ms)",
            FsyncPolicy::Interval(Duration::from_millis(100)),
        ),
        ("fsync=always (group commit)", FsyncPolicy::Always),
    ] {
        let dir = base.join(name.split(' ').next().unwrap().replace('=', "-"));
        let log = FileLog::open(wal(dir.clone(), policy)).unwrap().log;
        let store = Arc::new(Store::new(StoreConfig::default(), Box::new(log)));
        let rate = runtime.block_on(publish_rate(store, tasks, secs));
        println!("| {name} | {rate:.0} | {:.2} |", rate / memory);
        let _ = std::fs::remove_dir_all(&dir);
    }

    println!("\n## Recovery of {keys} keys and {} edges\n", keys * 4);
    let dir = base.join("recovery");
    let epoch = {
        let log = FileLog::open(wal(dir.clone(), FsyncPolicy::Never))
            .unwrap()
            .log;
        let epoch = log.epoch();
        let store = Store::new(StoreConfig::default(), Box::new(log));
        let started = Instant::now();
        fill_graph(&store, keys);
        let stats = store.stats();
        println!(
            "loaded {} keys and {} edges through the log in {:.1} s",
            stats.keys,
            stats.edges,
            started.elapsed().as_secs_f64()
        );
        epoch
    };
    let log_bytes: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let recover = |label: &str| {
        let started = Instant::now();
        let opened = FileLog::open(wal(dir.clone(), FsyncPolicy::Never)).unwrap();
        let snapshot = opened.snapshot.clone();
        let records = opened.records.len();
        let store = Store::new(StoreConfig::default(), Box::new(opened.log));
        if let Some(path) = &snapshot {
            freshd::snapshot::load(&store, path).unwrap();
        }
        store.recover(opened.records);
        let took = started.elapsed();
        let stats = store.stats();
        assert_eq!(stats.edges, keys * 4);
        println!("| {label} | {records} | {:.2} s |", took.as_secs_f64());
    };
    println!("| recovery from | log records replayed | time |");
    println!("| --- | ---: | ---: |");
    recover("the log alone");
    // Compact the whole log into a snapshot: every segment counts as closed
    // below the next seq.
    let next = FileLog::open(wal(dir.clone(), FsyncPolicy::Never))
        .unwrap()
        .log
        .last_seq()
        + 1;
    let started = Instant::now();
    let snapshot = freshd::snapshot::compact(&StoreConfig::default(), &dir, epoch, next).unwrap();
    let snapshot_took = started.elapsed();
    let snapshot_bytes = std::fs::metadata(&snapshot).unwrap().len();
    recover("a snapshot");
    println!(
        "\nlog: {:.1} MiB ({:.0} bytes per key with its 4 edges); snapshot: {:.1} MiB ({:.0} bytes per key), written in {:.2} s",
        log_bytes as f64 / (1 << 20) as f64,
        log_bytes as f64 / keys as f64,
        snapshot_bytes as f64 / (1 << 20) as f64,
        snapshot_bytes as f64 / (keys + keys / 4) as f64,
        snapshot_took.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&base);
}
