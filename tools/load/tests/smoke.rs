//! A short run of every freshd workload of the load tool against a real
//! freshd started in-process on a loopback port, and of the notice
//! workload's Redis side against a real `redis-server`: each must complete
//! operations without errors, and its histogram must hold one value per
//! counted operation. No timing is asserted.

mod common;
// A `redis-server` child on a free loopback port, as the benches start it.
#[path = "../../../benches/support/redis.rs"]
mod redis;

use freshd_load::check::{CheckOpts, RedisBatch, Run};
use freshd_load::deps::DepsOpts;
use freshd_load::fanout::FanoutOpts;
use freshd_load::memory::MemoryOpts;
use freshd_load::notice::NoticeOpts;
use freshd_load::stats::Report;
use freshd_load::Target;

fn assert_clean(report: &Report) {
    assert!(report.ops > 0, "no operation completed: {}", report.human());
    assert_eq!(report.errors, 0, "errors: {}", report.human());
    if let Some(latency) = &report.latency {
        assert_eq!(
            latency.count,
            report.ops,
            "histogram count: {}",
            report.human()
        );
    }
    // Timed workloads read the load tool's own CPU over their window.
    if ["check", "notice", "fanout"].contains(&report.workload.as_str()) {
        assert!(
            report.load_cpu_s.is_some_and(|s| s >= 0.0),
            "load tool CPU not read: {}",
            report.human()
        );
    }
    // The JSON form carries the CDF series.
    let json: serde_json::Value = serde_json::from_str(&report.json()).expect("valid JSON");
    assert_eq!(json["target"], "freshd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_closed_and_open_loop() {
    let (_server, addr) = common::server().await;
    let opts = CheckOpts {
        target: Target::Freshd,
        addr,
        conns: 2,
        streams: 2,
        keys: 200,
        runs: vec![
            Run::parse("1@0").unwrap(),
            Run::parse("1@200").unwrap(),
            Run::parse("16@0").unwrap(),
            Run::parse("16@100").unwrap(),
        ],
        redis_batch: vec![RedisBatch::Mget],
        warmup: 0.1,
        secs: 0.3,
    };
    let reports = freshd_load::check::run(&opts).await.expect("check runs");
    assert_eq!(reports.len(), 4);
    for r in &reports {
        assert_clean(r);
    }
    assert_eq!(reports[0].variant, "Check, 2 streams per conn");
    assert_eq!(reports[0].mode, "closed");
    assert_eq!(reports[1].mode, "open");
    assert_eq!(reports[2].variant, "CheckBatch 16, 2 streams per conn");
    assert_eq!(reports[2].keys_per_sec, reports[2].ops_per_sec * 16.0);
    // Open loop: one request per tick in the window, 200/s and 100/s for
    // 0.3 s (give or take the tick on the window's edge).
    assert!(
        (59..=61).contains(&reports[1].ops),
        "{}",
        reports[1].human()
    );
    assert!(
        (29..=31).contains(&reports[3].ops),
        "{}",
        reports[3].human()
    );
}

/// Runs the notice workload against `target` with 3 subscribers and 40
/// changes, and checks its counts.
async fn notice_counts(target: Target, addr: String, per_conn: usize) -> Report {
    let opts = NoticeOpts {
        target,
        addr,
        subscribers: 3,
        per_conn,
        rate: 100.0,
        warmup: 0.1,
        secs: 0.3,
    };
    let r = freshd_load::notice::run(&opts).await.expect("notice runs");
    assert_eq!(r.target, target.name());
    assert_eq!(r.errors, 0, "{}", r.human());
    // 30 counted changes (10 in the warm-up), each to 3 subscribers.
    assert_eq!(r.ops, 90);
    assert_eq!(r.latency.as_ref().map(|l| l.count), Some(90));
    assert_eq!(r.extra["notices_received"], 120);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notice_reaches_every_subscriber() {
    let (_server, addr) = common::server().await;
    assert_clean(&notice_counts(Target::Freshd, addr, 1).await);
}

/// Redis subscribers (`CLIENT TRACKING`, their `invalidate` pushes read in
/// place) count the same way, against a real `redis-server`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notice_runs_against_redis() {
    let server = redis::RedisServer::start().expect("redis-server starts");
    let r = notice_counts(Target::Redis, format!("127.0.0.1:{}", server.port), 1).await;
    assert_eq!(r.variant, "SET -> tracking push");
}

/// A real `redis-server`'s `invalidate` push is read in place (not left to
/// the reply parser), and hands over the key that was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_invalidate_push_is_read_in_place() {
    let server = redis::RedisServer::start().expect("redis-server starts");
    let addr = format!("127.0.0.1:{}", server.port);
    let keys = vec!["hot:7".to_string(), "hot:8".to_string()];
    let mut tracking = freshd_load::notice::redis_tracking(&addr, &keys)
        .await
        .expect("tracking");
    let mut writer = freshd_load::resp::AsyncConn::connect(addr.parse().unwrap())
        .await
        .unwrap();
    writer.command(&[b"SET", b"hot:8", b"1"]).await.unwrap();
    let mut got = Vec::new();
    let other = tracking
        .read_invalidation(|key| got.push(key.to_vec()))
        .await
        .unwrap();
    assert_eq!(other, None, "the push went to the parser");
    assert_eq!(got, [b"hot:8".to_vec()]);
}

/// Subscribers that share connections (2 and 1 streams on the two) count
/// the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notice_reaches_subscribers_that_share_a_connection() {
    let (_server, addr) = common::server().await;
    let r = notice_counts(Target::Freshd, addr, 2).await;
    assert_clean(&r);
    assert_eq!(r.params["per_conn"], 2);
}

/// The loopback floor, served by the load tool itself, runs through the
/// same workload and counts the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notice_runs_against_the_floor() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || freshd_load::floor::serve(listener));
    notice_counts(Target::Floor, addr, 1).await;
}

/// The floor's subscribers can share connections too (2 and 1 on the
/// two), as freshd's Watch streams do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notice_runs_against_the_floor_on_shared_connections() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || freshd_load::floor::serve(listener));
    let r = notice_counts(Target::Floor, addr, 2).await;
    assert_eq!(r.params["per_conn"], 2);
    assert_eq!(r.variant, "line -> N writes, shared conns");
}

/// A short fan-out run: 3 subscribers, 5 changes a call, 0.3 s counted.
async fn short_fanout(target: Target, addr: String) -> Report {
    let opts = FanoutOpts {
        target,
        addr,
        subscribers: 3,
        keys: 20,
        per_call: 5,
        warmup: 0.1,
        secs: 0.3,
    };
    freshd_load::fanout::run(&opts).await.expect("fanout runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers() {
    let (_server, addr) = common::server().await;
    let r = short_fanout(Target::Freshd, addr).await;
    assert_clean(&r);
    assert!(r.extra["changes"].as_u64().unwrap() > 0);
    // Counted off the messages' bytes: no more than were sent (a stream
    // behind on a key gets its newest notice only).
    let received = r.extra["notices_received"].as_u64().unwrap();
    assert!(received >= r.ops, "{}", r.human());
    assert!(
        received <= r.extra["notices_expected"].as_u64().unwrap(),
        "{}",
        r.human()
    );
}

/// Redis pub/sub subscribers count their messages read in place, against
/// a real `redis-server`: every message published reaches every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_runs_against_redis() {
    let server = redis::RedisServer::start().expect("redis-server starts");
    let r = short_fanout(Target::Redis, format!("127.0.0.1:{}", server.port)).await;
    assert!(r.ops > 0, "{}", r.human());
    assert_eq!(r.errors, 0, "{}", r.human());
    assert_eq!(r.variant, "PUBLISH -> SUBSCRIBE");
    assert_eq!(
        r.extra["notices_received"],
        r.extra["notices_expected"],
        "{}",
        r.human()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deps_fan_out_reaches_every_dependent() {
    let (_server, addr) = common::server().await;
    let opts = DepsOpts {
        target: Target::Freshd,
        addr,
        dependents: 200,
        subscribers: 2,
        rounds: 3,
    };
    let r = freshd_load::deps::run(&opts).await.expect("deps runs");
    assert_clean(&r);
    assert_eq!(r.ops, 3);
    // The root and its 200 dependents.
    assert_eq!(r.extra["invalidated_per_write"], 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_counts_keys() {
    let (_server, addr) = common::server().await;
    let opts = MemoryOpts {
        target: Target::Freshd,
        addr,
        pid: Some(std::process::id()),
        keys: 400,
        concurrency: 16,
    };
    let r = freshd_load::memory::run(&opts).await.expect("memory runs");
    assert_clean(&r);
    assert_eq!(r.ops, 400);
    // 400 cached keys and 100 entities; 4 edges per cached key.
    assert_eq!(r.extra["server_keys"], 500);
    assert_eq!(r.extra["server_edges"], 1600);
}
