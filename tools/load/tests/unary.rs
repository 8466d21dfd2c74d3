//! The load tool's own unary caller ([`freshd_load::unary`]) against a real
//! freshd on a loopback port: many calls in flight past the server's
//! connection window and its own receive window, each answer handed back
//! with its call, and an error answer kept to its call.

mod common;

use std::collections::VecDeque;
use std::task::Poll;

use freshd::pb::{
    Change, CheckBatchRequest, CheckBatchResponse, CheckItem, PublishRequest, PublishResponse,
};
use freshd_load::unary::UnaryConn;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_pass_both_windows_and_keep_to_their_calls() {
    let (_server, addr) = common::server().await;
    let mut conn = UnaryConn::connect(&addr).await.expect("connects");

    // 300 publishes of 10 changes with long keys, all ready at once: about
    // 3 MB of requests, past the server's first connection window, so the
    // caller goes on only with the server's window updates (a stall fails
    // at the deadline).
    let key = |call: usize, i: usize| format!("k:{call:04}:{i}:{}", "x".repeat(900));
    let mut items: VecDeque<usize> = (0..300).collect();
    let mut answers = Vec::new();
    let calls = conn.calls(
        "/freshd.v1.Coordinator/Publish",
        |_, _| Poll::Ready(items.pop_front()),
        |&call| PublishRequest {
            changes: (0..10)
                .map(|i| Change {
                    key: key(call, i),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        },
        |call, answer: Result<PublishResponse, _>| answers.push((call, answer)),
    );
    within_deadline(calls).await;
    assert_eq!(answers.len(), 300);
    let mut seqs: Vec<(usize, u64)> = answers
        .into_iter()
        .map(|(call, answer)| {
            let answer = answer.expect("published");
            assert_eq!(answer.results.len(), 10, "call {call}");
            (call, answer.seq)
        })
        .collect();
    // Each call got its own answer: sent in order on one connection, they
    // were applied in order.
    seqs.sort();
    assert!(seqs.windows(2).all(|w| w[0].1 < w[1].1), "{seqs:?}");

    // 40 batches of 10,000 checks: about 6 MB of answers, past half of the
    // caller's 4 MiB receive window, which it must return to read on.
    let mut items: VecDeque<usize> = (0..40).collect();
    let mut checked = 0;
    let calls = conn.calls(
        "/freshd.v1.Coordinator/CheckBatch",
        |_, _| Poll::Ready(items.pop_front()),
        |_| CheckBatchRequest {
            items: (0..10_000)
                .map(|i| CheckItem {
                    key: format!("c:{i}"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        },
        |_, answer: Result<CheckBatchResponse, _>| {
            assert_eq!(answer.expect("checked").results.len(), 10_000);
            checked += 1;
        },
    );
    within_deadline(calls).await;
    assert_eq!(checked, 40);
}

/// Runs `calls`, which must finish without a connection error well within
/// a generous deadline (a stall is a failure, not a hang).
async fn within_deadline(calls: impl std::future::Future<Output = Result<(), String>>) {
    const GENEROUS: std::time::Duration = std::time::Duration::from_secs(60);
    tokio::time::timeout(GENEROUS, calls)
        .await
        .expect("the calls finish")
        .expect("the calls run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_answer_belongs_to_its_call_alone() {
    let (_server, addr) = common::server().await;
    let mut conn = UnaryConn::connect(&addr).await.expect("connects");
    let mut items: VecDeque<&str> = ["a:1", "", "a:2"].into();
    let mut answers = Vec::new();
    let calls = conn.calls(
        "/freshd.v1.Coordinator/Publish",
        |_, _| Poll::Ready(items.pop_front()),
        |key| PublishRequest {
            changes: vec![Change {
                key: key.to_string(),
                ..Default::default()
            }],
            ..Default::default()
        },
        |key, answer: Result<PublishResponse, _>| answers.push((key, answer)),
    );
    within_deadline(calls).await;
    answers.sort_by_key(|(key, _)| *key);
    let keys: Vec<&str> = answers.iter().map(|(key, _)| *key).collect();
    assert_eq!(keys, ["", "a:1", "a:2"]);
    let error = answers[0].1.as_ref().expect_err("an empty key is refused");
    assert!(error.contains("grpc-status 3"), "{error}");
    assert!(answers[1].1.is_ok() && answers[2].1.is_ok());
}
