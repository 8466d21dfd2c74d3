//! The load tool's own unary caller ([`freshd_load::unary`]) against a real
//! freshd on a loopback port: many calls in flight past the server's
//! connection window and its own receive window, each answer handed back
//! with its call, and an error answer kept to its call. A real freshd
//! returns its window as fast as it reads, so whether the caller keeps to
//! the window is checked against a scripted peer that withholds it.

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

/// A scripted HTTP/2 peer that never returns the connection's window until
/// told to: the caller must stop at the 65,535 bytes every connection
/// starts with, and go on, to the last byte, once the window is returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_keeps_within_the_connection_window_until_it_is_returned() {
    use freshd::http2::frame::{self, kind, Head, HEAD_LEN, PREFACE};
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    const CALLS: usize = 200;
    let request = |call: usize| PublishRequest {
        changes: vec![Change {
            key: format!("k:{call:04}:{}", "x".repeat(4000)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let want: usize = (0..CALLS)
        .map(|c| 5 + prost::Message::encoded_len(&request(c)))
        .sum();

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let peer = std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        let mut preface = [0u8; PREFACE.len()];
        tcp.read_exact(&mut preface).unwrap();
        assert_eq!(&preface, PREFACE);
        let mut out = Vec::new();
        frame::put_settings(&mut out, &[], false);
        tcp.write_all(&out).unwrap();
        // DATA bytes received, read frame by frame until `want` have come,
        // the deadline passes, or (with `quiet_ends`) the caller has sent
        // something and then nothing for a read timeout.
        let mut input = Vec::new();
        let mut data = 0usize;
        let mut read_until = |tcp: &mut std::net::TcpStream, quiet_ends: bool| {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut buf = [0u8; 64 << 10];
            while data < want && Instant::now() < deadline {
                let n = match tcp.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if quiet_ends && data > 0 {
                            break;
                        }
                        continue;
                    }
                    Err(e) => panic!("peer read: {e}"),
                };
                input.extend_from_slice(&buf[..n]);
                while let Some(head) = Head::parse(&input) {
                    if input.len() < HEAD_LEN + head.len {
                        break;
                    }
                    if head.kind == kind::DATA {
                        data += head.len;
                    }
                    input.drain(..HEAD_LEN + head.len);
                }
            }
            data
        };
        tcp.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        // What the caller sends before it goes quiet for half a second.
        let first = read_until(&mut tcp, true);
        // Then the window for everything, and every byte must come.
        let mut out = Vec::new();
        frame::put_window_update(&mut out, 0, 1 << 24);
        tcp.write_all(&out).unwrap();
        let all = read_until(&mut tcp, false);
        (first, all)
    });

    let calls = tokio::spawn(async move {
        let mut conn = UnaryConn::connect(&addr).await.expect("connects");
        let mut items: VecDeque<usize> = (0..CALLS).collect();
        // The peer never answers: this runs until it is aborted.
        let _ = conn
            .calls(
                "/freshd.v1.Coordinator/Publish",
                |_, _| Poll::Ready(items.pop_front()),
                |&call| request(call),
                |_, _: Result<PublishResponse, _>| {},
            )
            .await;
    });
    let (first, all) = tokio::task::spawn_blocking(move || peer.join().unwrap())
        .await
        .unwrap();
    calls.abort();
    assert!(first > 0, "the caller sent nothing within its first window");
    assert!(
        first <= 65_535,
        "{first} bytes of DATA sent before the window was returned"
    );
    assert_eq!(all, want, "every request's bytes after the window update");
}
