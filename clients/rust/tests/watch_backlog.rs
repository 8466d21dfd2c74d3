//! Watch streams through the client: a refused request answered in band
//! (at the end), and a stream read late: its notices wait on the connection unread,
//! one small HTTP/2 frame each. h2 (0.4.20 and later) ends a connection
//! that holds more unread small frames than half its receive window
//! allows; the client's connection window keeps a backlog of 15,000
//! notices under that.

mod common;

use freshd_client::{pb, Client, Error, WatchEvent};

const NOTICES: usize = 15_000;

/// Opens a Watch stream on `client`, publishes [`NOTICES`] keys one call
/// each through it without reading the stream, then reads them all.
async fn read_late(client: &Client) -> Result<usize, Error> {
    let mut watch = client
        .watch(pb::WatchStart {
            subscribe: vec!["b:".into()],
            ..Default::default()
        })
        .await?;
    for i in 0..NOTICES {
        client.publish_keys([format!("b:{i}")]).await?;
    }
    let mut got = 0;
    while got < NOTICES {
        match watch.next().await {
            Some(Ok(WatchEvent::Notices(notices))) => got += notices.len(),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => break,
        }
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_read_late_keeps_its_connection() {
    let server = common::start().await;
    let client = Client::connect(server.url()).await.unwrap();
    assert_eq!(read_late(&client).await.unwrap(), NOTICES);
}

/// With hyper's own 5 MiB window (h2's budget: about 12,700 small frames)
/// the same backlog ends the connection: what the default guards against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_hypers_default_window_h2_ends_the_connection() {
    let server = common::start().await;
    let client = Client::builder(server.url())
        .connection_window(5 << 20)
        .connect()
        .await
        .unwrap();
    let result = read_late(&client).await;
    // h2's GOAWAY ENHANCE_YOUR_CALM reaches gRPC as RESOURCE_EXHAUSTED,
    // and the error says what happened and what to do.
    match result {
        Err(Error::ResourceExhausted(message)) => {
            assert!(message.contains("connection_window"), "{message}")
        }
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }
}

/// A refused `track` on a stream that asked for refusals in band is an
/// event, and the stream goes on; without the flag it ends the stream.
#[tokio::test]
async fn a_refused_track_is_an_event_with_refusals_in_band() {
    let server = common::start().await;
    let client = Client::connect(server.url()).await.unwrap();
    let mut watch = client
        .watch(
            pb::WatchStart::new()
                .with_track(["r:a"])
                .with_refusals_in_band(true),
        )
        .await
        .unwrap();
    let sent = watch.track(["r:b", ""]).unwrap();
    assert_eq!(sent, 2, "start was 1");
    match watch.next().await {
        Some(Ok(WatchEvent::Refused(r))) => {
            assert_eq!(r.request, sent);
            assert_eq!(r.code, tonic::Code::InvalidArgument as i32);
            assert!(r.message.contains("track.keys[1]"), "{r:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    client.publish_keys(["r:b", "r:a"]).await.unwrap();
    match watch.next().await {
        Some(Ok(WatchEvent::Notices(notices))) => {
            let keys: Vec<&str> = notices.iter().map(|n| n.key.as_str()).collect();
            assert_eq!(keys, ["r:a"]);
        }
        other => panic!("expected the notice of r:a, got {other:?}"),
    }

    let mut strict = client
        .watch(pb::WatchStart::new().with_track(["r:a"]))
        .await
        .unwrap();
    strict.track([""]).unwrap();
    match strict.next().await {
        Some(Err(Error::InvalidArgument(m))) => assert!(m.contains("track.keys[0]"), "{m}"),
        other => panic!("expected the stream to end, got {other:?}"),
    }
}
