//! Every status code a client can get, with messages that name the field and
//! the limit; and bad input never changes state.

use std::sync::Arc;

use freshd::config::Config;
use freshd::log::{Log, LogError, Record};
use freshd::pb;
use freshd::server::RunningServer;
use freshd::store::Store;
use tonic::Code;

use crate::harness::{change, connect, fill_req, publish_req, start, start_with};

fn small_limits() -> Config {
    let mut config = Config::ephemeral();
    config.limits.max_key_bytes = 16;
    config.limits.max_dependencies = 2;
    config.limits.max_batch_items = 3;
    config.max_message_bytes = 4096;
    config
}

#[tokio::test]
async fn invalid_argument_names_the_field_and_the_limit() {
    let mut t = start_with(small_limits()).await;
    let c = &mut t.client;
    let cases: Vec<(tonic::Status, &str)> = vec![
        (
            c.publish(pb::PublishRequest {
                changes: vec![],
                ..Default::default()
            })
            .await
            .unwrap_err(),
            "changes must not be empty",
        ),
        (
            c.publish(publish_req(&["a", "b", "c", "d"]))
                .await
                .unwrap_err(),
            "changes has 4 items; the limit is 3 (max_batch_items)",
        ),
        (
            c.publish(publish_req(&["a", ""])).await.unwrap_err(),
            "changes[1].key must not be empty",
        ),
        (
            c.fill(fill_req("a-key-that-is-too-long", &[], 0))
                .await
                .unwrap_err(),
            "key is 22 bytes; the limit is 16 (max_key_bytes)",
        ),
        (
            c.fill(fill_req("k", &["a", "b", "c"], 0))
                .await
                .unwrap_err(),
            "dependencies has 3 items; the limit is 2 (max_dependencies)",
        ),
        (
            c.fill(fill_req("k", &["a", ""], 0)).await.unwrap_err(),
            "dependencies[1] must not be empty",
        ),
        (
            c.check(pb::CheckRequest::default()).await.unwrap_err(),
            "key must not be empty",
        ),
        (
            c.check_batch(pb::CheckBatchRequest {
                items: (0..4)
                    .map(|i| pb::CheckItem {
                        key: format!("k{i}"),
                        ..Default::default()
                    })
                    .collect(),
                epoch: 0,
                ..Default::default()
            })
            .await
            .unwrap_err(),
            "items has 4 items; the limit is 3 (max_batch_items)",
        ),
        (
            c.check_batch(pb::CheckBatchRequest {
                items: vec![pb::CheckItem {
                    key: "x".repeat(17),
                    ..Default::default()
                }],
                epoch: 0,
                ..Default::default()
            })
            .await
            .unwrap_err(),
            "items[0].key is 17 bytes; the limit is 16 (max_key_bytes)",
        ),
        (
            c.inspect(pb::InspectRequest { key: String::new() })
                .await
                .unwrap_err(),
            "key must not be empty",
        ),
    ];
    for (status, message) in cases {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(message),
            "{:?} vs {message:?}",
            status.message()
        );
    }
    // Nothing was changed by any of them.
    let stats = c.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!((stats.keys, stats.edges, stats.seq), (0, 0, 0));
}

/// A message with the Check request's field numbers, but bytes for the key.
#[derive(Clone, PartialEq, prost::Message)]
struct RawCheck {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(uint64, tag = "2")]
    version: u64,
}

#[tokio::test]
async fn malformed_utf8_is_invalid_argument() {
    let t = start().await;
    let channel = tonic::transport::Channel::from_shared(t.server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec: tonic_prost::ProstCodec<RawCheck, pb::CheckResponse> = Default::default();
    let status = grpc
        .unary(
            tonic::Request::new(RawCheck {
                key: vec![0x66, 0xff, 0xfe],
                version: 1,
            }),
            "/freshd.v1.Coordinator/Check".parse().unwrap(),
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("CheckRequest.key"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn aborted_when_a_fill_raced_a_change_or_another_epoch() {
    let mut t = start().await;
    let c = &mut t.client;
    let before = c
        .check(pb::CheckRequest {
            key: "feed".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    c.publish(publish_req(&["posts"])).await.unwrap();
    let status = c
        .fill(fill_req("feed", &["posts"], before.seq))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert!(
        status
            .message()
            .contains("posts changed at seq 1, after observed_seq 0"),
        "{}",
        status.message()
    );
    assert!(status.message().contains("refetch"));

    let mut other = fill_req("feed", &[], before.seq);
    other.epoch = before.epoch ^ 1;
    let status = c.fill(other).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert!(status.message().contains("epoch"), "{}", status.message());
    assert!(c
        .inspect(pb::InspectRequest { key: "feed".into() })
        .await
        .is_err());
}

#[tokio::test]
async fn not_found_for_an_unknown_key() {
    let mut t = start().await;
    let status = t
        .client
        .inspect(pb::InspectRequest { key: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("\"nope\""));
}

#[tokio::test]
async fn out_of_range_for_an_oversized_message() {
    let mut t = start_with(small_limits()).await;
    let status = t
        .client
        .fill(pb::FillRequest {
            key: "k".into(),
            dependencies: vec!["d".repeat(5000)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
}

#[tokio::test]
async fn unavailable_once_the_server_stopped() {
    let mut t = start().await;
    t.client.stats(pb::StatsRequest {}).await.unwrap();
    let server = std::mem::replace(
        &mut t.server,
        RunningServer::start(Config::ephemeral()).await.unwrap(),
    );
    server.stop().await.unwrap();
    let status = t.client.stats(pb::StatsRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

/// A log whose appends fail, as a full disk would make them.
struct FailingLog;

impl Log for FailingLog {
    fn epoch(&self) -> u64 {
        1
    }
    fn last_seq(&self) -> u64 {
        0
    }
    fn append(&mut self, _: &Record<'_>) -> Result<u64, LogError> {
        Err(LogError("disk full".into()))
    }
}

#[tokio::test]
async fn internal_when_the_log_fails_and_nothing_is_applied() {
    let config = Config::ephemeral();
    let store = Arc::new(Store::new(config.store.clone(), Box::new(FailingLog)));
    let server = RunningServer::start_with_store(config, store)
        .await
        .unwrap();
    let mut c = connect(&server).await;
    let status = c
        .publish(pb::PublishRequest {
            changes: vec![change("k")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert!(status.message().contains("disk full"));
    let status = c.fill(fill_req("k", &["d"], 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    let stats = c.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!((stats.keys, stats.edges, stats.seq), (0, 0, 0));
}
