//! The load tool's own `Watch` reader ([`freshd_load::watch`]) against a
//! real freshd on a loopback port: it must keep reading past its receive
//! windows (so it returns them), keep streams that share a connection
//! apart, hand over messages in place (`drain_raw`) as it does one by one,
//! and end with the server's status.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use freshd::pb::watch_response::Response as WatchOut;
use freshd::pb::{Change, PublishRequest, WatchResponse};
use freshd_load::watch::WatchStream;
use prost::Message;

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

/// One connection with a stream per list in `tracked`, each tracking its
/// list, started (client ids `<name>-0`, `<name>-1`...).
async fn start_tracking(addr: &str, name: &str, tracked: &[Vec<String>]) -> WatchStream {
    let starts = tracked
        .iter()
        .enumerate()
        .map(|(s, k)| (format!("{name}-{s}"), k.clone()))
        .collect();
    WatchStream::start_many(addr, starts)
        .await
        .expect("the streams start")
}

/// The read finished in time and each stream saw a notice for every key
/// it tracks.
fn assert_every_notice(in_time: bool, seen: &[HashSet<String>], tracked: &[Vec<String>]) {
    assert!(
        in_time,
        "stalled at {:?}",
        seen.iter().map(HashSet::len).collect::<Vec<_>>()
    );
    for (s, got) in seen.iter().enumerate() {
        assert_eq!(got.len(), tracked[s].len(), "stream {s}");
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
    let mut conn = start_tracking(&addr, "shared", &keys).await;

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
    assert_every_notice(read.is_ok(), &seen, &keys);
}

/// Three streams on one connection, each tracking short keys, published a
/// few at a time (a lone notice to a stream: a message in a frame of its
/// own, which `drain_raw` hands over from the bytes read), and long ones,
/// published 100 to a call (batches of about 200 KiB, split across DATA
/// frames, which wait in the stream's body until whole). Every notice must
/// come out under its own stream, once, each stream's in seq order, past
/// the receive windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_hands_over_every_message_once_in_order() {
    let (_server, addr) = common::server().await;
    let short: Vec<Vec<String>> = (0..3)
        .map(|s| (0..300).map(|i| format!("small:{s}:{i}")).collect())
        .collect();
    let long: Vec<Vec<String>> = (0..3)
        .map(|s| (0..1500).map(|i| key(s * 10_000 + i)).collect())
        .collect();
    let tracked: Vec<Vec<String>> = (0..3)
        .map(|s| [&short[s][..], &long[s][..]].concat())
        .collect();
    let mut conn = start_tracking(&addr, "drain", &tracked).await;

    let publisher = {
        let addr = addr.clone();
        let (short, long) = (short.clone(), long.concat());
        tokio::spawn(async move {
            for i in 0..300 {
                let keys: Vec<String> = short.iter().map(|k| k[i].clone()).collect();
                publish_all(&addr, &keys).await;
            }
            publish_all(&addr, &long).await;
        })
    };

    let expected = tracked.iter().map(Vec::len).sum::<usize>();
    let mut seen: Vec<HashSet<String>> = vec![HashSet::new(); 3];
    let mut last_seq = [0u64; 3];
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        while seen.iter().map(HashSet::len).sum::<usize>() < expected {
            conn.read_more().await.expect("reads");
            let open = conn
                .drain_raw(|raw| {
                    assert!(raw.read_at.is_some(), "a read was timed");
                    let message = WatchResponse::decode(raw.bytes).map_err(|e| e.to_string())?;
                    let s = raw.stream;
                    if let Some(WatchOut::Notices(batch)) = message.response {
                        for n in batch.notices {
                            assert!(
                                tracked[s].contains(&n.key),
                                "stream {s} got {}",
                                &n.key[..12]
                            );
                            assert!(
                                n.seq >= last_seq[s],
                                "stream {s}: seq {} after {}",
                                n.seq,
                                last_seq[s]
                            );
                            last_seq[s] = n.seq;
                            assert!(seen[s].insert(n.key), "a notice came twice");
                        }
                    }
                    Ok(())
                })
                .expect("parses");
            assert!(open, "a stream ended");
        }
    })
    .await;
    assert_every_notice(read.is_ok(), &seen, &tracked);
    publisher.await.expect("publishes");
}

/// An error from what `drain_raw` hands messages to ends the call with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_ends_with_its_readers_error() {
    let (_server, addr) = common::server().await;
    let mut conn = WatchStream::start(&addr, "drain-error".into(), vec!["k".into()])
        .await
        .expect("the stream starts");
    publish_all(&addr, &["k".to_string()]).await;
    let error = loop {
        conn.read_more().await.expect("reads");
        match conn.drain_raw(|_| Err("no thanks".to_string())) {
            Ok(open) => assert!(open, "the stream ended"),
            Err(e) => break e,
        }
    };
    assert_eq!(error, "no thanks");
}
