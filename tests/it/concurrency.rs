//! Many clients publish, fill and check at once. Afterwards: no check said
//! FRESH for a version older than a publish that had completed before the
//! check started, and every fill with a stale observed seq was refused.

use std::sync::Arc;
use std::time::Instant;

use freshd::pb::{self, Freshness};
use parking_lot::Mutex;
use tonic::Code;

use crate::harness::{connect, fill_req, publish_req, start};

const FEEDS: usize = 32;
const POSTS: usize = 4;

fn feed(i: usize) -> String {
    format!("feed:{i}")
}

fn posts(i: usize) -> String {
    format!("posts:{}", i % POSTS)
}

/// A publish of `posts:{dep}` with its seq, completed at `done`.
struct Published {
    dep: usize,
    seq: u64,
    done: Instant,
}

/// A check of `feed:{feed}` with `version`, started at `start`, answered FRESH.
struct FreshAnswer {
    feed: usize,
    version: u64,
    start: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fresh_answer_misses_a_completed_publish() {
    let t = start().await;
    let mut c = connect(&t.server).await;
    let mut versions = Vec::new();
    for i in 0..FEEDS {
        let f = c
            .fill(fill_req(&feed(i), &[&posts(i)], 0))
            .await
            .unwrap()
            .into_inner();
        versions.push(f.version);
    }
    let published = Arc::new(Mutex::new(Vec::<Published>::new()));
    let fresh = Arc::new(Mutex::new(Vec::<FreshAnswer>::new()));

    let mut tasks = Vec::new();
    for w in 0..4 {
        let mut c = connect(&t.server).await;
        let published = published.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..150 {
                let dep = (w + n) % POSTS;
                let out = c
                    .publish(publish_req(&[&format!("posts:{dep}")]))
                    .await
                    .unwrap()
                    .into_inner();
                published.lock().push(Published {
                    dep,
                    seq: out.seq,
                    done: Instant::now(),
                });
            }
        }));
    }
    for r in 0..4 {
        let mut c = connect(&t.server).await;
        let fresh = fresh.clone();
        let mut held = versions.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..300 {
                let i = (r * 7 + n) % FEEDS;
                let start = Instant::now();
                let out = c
                    .check(pb::CheckRequest {
                        key: feed(i),
                        version: held[i],
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                match out.freshness() {
                    Freshness::Fresh => fresh.lock().push(FreshAnswer {
                        feed: i,
                        version: held[i],
                        start,
                    }),
                    Freshness::Stale => {
                        // Refetch, then fill with the seq the check gave.
                        match c.fill(fill_req(&feed(i), &[&posts(i)], out.seq)).await {
                            Ok(f) => held[i] = f.into_inner().version,
                            Err(s) => assert_eq!(s.code(), Code::Aborted, "{s:?}"),
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }));
    }
    // Fills with a seq from before a completed publish of their dependency.
    for s in 0..2 {
        let mut c = connect(&t.server).await;
        tasks.push(tokio::spawn(async move {
            for n in 0..100 {
                let i = (s * 13 + n) % FEEDS;
                let observed = c
                    .check(pb::CheckRequest {
                        key: feed(i),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .seq;
                c.publish(publish_req(&[&posts(i)])).await.unwrap();
                let status = c
                    .fill(fill_req(&feed(i), &[&posts(i)], observed))
                    .await
                    .expect_err("a fill with a stale observed seq must be refused");
                assert_eq!(status.code(), Code::Aborted);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    let published = published.lock();
    let fresh = fresh.lock();
    assert!(
        !fresh.is_empty(),
        "the workload must produce fresh answers to judge"
    );
    let mut violations = 0;
    for answer in fresh.iter() {
        let dep = answer.feed % POSTS;
        if published
            .iter()
            .any(|p| p.dep == dep && p.seq > answer.version && p.done < answer.start)
        {
            violations += 1;
        }
    }
    assert_eq!(
        violations,
        0,
        "{violations} of {} FRESH answers missed a completed publish",
        fresh.len()
    );
}
