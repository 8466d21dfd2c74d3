//! The load tool's own `Watch` reader ([`freshd_load::watch`]) against a
//! real freshd on a loopback port: it must keep reading past its receive
//! windows (so it returns them), keep streams that share a connection
//! apart, and end with the server's status.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use freshd::pb::watch_response::Response as WatchOut;
use freshd::pb::{Change, PublishRequest};
use freshd_load::watch::WatchStream;

/// Long keys, so that a few thousand notices pass the 2 MiB stream window.
fn key(i: usize) -> String {
    format!("big:{i:05}:{}", "x".repeat(1000))
}

/// Publishes `keys`, 100 to a call.
async fn publish_all(addr: &str, keys: &[String]) {
    let mut client = freshd_load::freshd_client(addr).await.expect("connects");
    for chunk in keys.chunks(100) {
        client
            .publish(PublishRequest {
                changes: chunk
                    .iter()
                    .map(|k| Change {
                        key: k.clone(),
                        ..Default::default()
                    })
                    .collect(),
                client_id: "publisher".into(),
            })
            .await
            .expect("publishes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_past_its_receive_windows() {
    let (_server, addr) = common::server().await;
    let keys: Vec<String> = (0..3000).map(key).collect();
    let mut stream = WatchStream::start(&addr, "window-test".into(), keys.clone())
        .await
        .expect("the stream starts");

    publish_all(&addr, &keys).await;

    // 3,000 notices of about 1 KiB: past the stream's 2 MiB window, which
    // the server stops at unless the reader returns it.
    let mut seen = HashSet::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        while seen.len() < keys.len() {
            match stream.message().await.expect("reads") {
                Some(message) => {
                    if let Some(WatchOut::Notices(batch)) = message.response {
                        for n in batch.notices {
                            assert!(n.version > 0, "{n:?}");
                            seen.insert(n.key);
                        }
                    }
                }
                None => panic!("the stream ended"),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "only {} of {} keys noticed: the window was not returned",
        seen.len(),
        keys.len()
    );
    assert_eq!(seen, keys.into_iter().collect(), "every key noticed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ends_with_the_servers_status() {
    let (server, addr) = common::server().await;
    let mut stream = WatchStream::start(&addr, "end-test".into(), vec!["k".into()])
        .await
        .expect("the stream starts");
    let stopped = tokio::spawn(server.stop());
    // A shutting-down server sends a last progress mark, then UNAVAILABLE.
    let error = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended with OK"),
            Err(e) => break e,
        }
    };
    assert!(error.contains("grpc-status 14"), "{error}");
    assert!(error.contains("shutting down"), "{error}");
    stopped.await.expect("joins").expect("stops");
}

/// Three streams on one connection, each tracking its own 2,100 long keys:
/// each stream's notices pass its 2 MiB window and all of them the 5 MiB
/// connection window, so both must be returned, and each notice must come
/// out under the stream it was sent on, once, whether `next` reads it or
/// `buffered` takes it from what a read brought.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_one_connection_keep_to_their_own_notices() {
    let (_server, addr) = common::server().await;
    let keys: Vec<Vec<String>> = (0..3)
        .map(|s| (0..2100).map(|i| key(s * 10_000 + i)).collect())
        .collect();
    let starts = keys
        .iter()
        .enumerate()
        .map(|(s, k)| (format!("shared-{s}"), k.clone()))
        .collect();
    let mut conn = WatchStream::start_many(&addr, starts)
        .await
        .expect("the streams start");

    publish_all(&addr, &keys.concat()).await;

    let mut seen: Vec<HashSet<String>> = vec![HashSet::new(); 3];
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        while seen.iter().map(HashSet::len).sum::<usize>() < 3 * 2100 {
            let mut message = conn.next().await.expect("reads");
            assert!(conn.read_at().is_some(), "a read was timed");
            while let Some((s, got)) = message {
                if let Some(WatchOut::Notices(batch)) = got.response {
                    for n in batch.notices {
                        assert!(keys[s].contains(&n.key), "stream {s} got {}", &n.key[..12]);
                        assert!(seen[s].insert(n.key), "a notice came twice");
                    }
                }
                message = conn.buffered().expect("parses");
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "stalled at {:?}",
        seen.iter().map(HashSet::len).collect::<Vec<_>>()
    );
    for (s, got) in seen.iter().enumerate() {
        assert_eq!(got.len(), 2100, "stream {s}");
    }
}
