//! Every RPC of the Coordinator service, end to end.

use freshd::pb::{self, Freshness};

use crate::harness::{change, check_batch_req, fill_req, publish_req, start};

#[tokio::test]
async fn fill_publish_check_turns_stale() {
    let mut t = start().await;
    let c = &mut t.client;

    let seq0 = c
        .check(pb::CheckRequest {
            key: "feed:user:4821".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seq0.freshness(), Freshness::Unknown);

    let fill = c
        .fill(fill_req(
            "feed:user:4821",
            &["follows:4821", "posts:author:77", "mutes:4821"],
            seq0.seq,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(fill.version > 0);
    assert_eq!(fill.ttl_ms, 60_000);
    assert_eq!(fill.epoch, seq0.epoch);

    let fresh = c
        .check(pb::CheckRequest {
            key: "feed:user:4821".into(),
            version: fill.version,
            age_ms: 10,
            epoch: fill.epoch,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fresh.freshness(), Freshness::Fresh);
    assert_eq!(fresh.version, fill.version);

    let mut critical = change("posts:author:77");
    critical.critical = true;
    critical.event_time_unix_ms = 1_700_000_000_000;
    let published = c
        .publish(pb::PublishRequest {
            changes: vec![critical],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(published.seq > fill.seq);
    assert_eq!(published.results.len(), 1);
    assert_eq!(published.results[0].invalidated, 2, "the post and the feed");

    let stale = c
        .check(pb::CheckRequest {
            key: "feed:user:4821".into(),
            version: fill.version,
            age_ms: 10,
            epoch: fill.epoch,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stale.freshness(), Freshness::Stale);
    assert_eq!(stale.version, published.seq);
    assert!(stale.critical);
    assert_eq!(stale.seq, published.seq);

    let info = c
        .inspect(pb::InspectRequest {
            key: "feed:user:4821".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.version, published.seq);
    assert_eq!(info.last_change_seq, published.seq);
    assert_eq!(info.event_time_unix_ms, 1_700_000_000_000);
    assert!(info.critical && info.registered);
    assert_eq!(
        info.dependencies,
        vec!["follows:4821", "mutes:4821", "posts:author:77"]
    );
    assert!(info.ttl_left_ms > 0 && info.ttl_left_ms <= 60_000);

    let stats = c.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.keys, 4);
    assert_eq!(stats.edges, 3);
    assert_eq!(stats.shards, 64);
    assert_eq!(stats.seq, published.seq);
    assert_eq!(stats.epoch, fill.epoch);
}

#[tokio::test]
async fn check_batch_answers_in_order_with_duplicates() {
    let mut t = start().await;
    let c = &mut t.client;
    let a = c.fill(fill_req("a", &["x"], 0)).await.unwrap().into_inner();
    let b = c
        .fill(fill_req("b", &[], a.seq))
        .await
        .unwrap()
        .into_inner();
    c.publish(publish_req(&["x"])).await.unwrap();
    let item = |k: &str, v| pb::CheckItem {
        key: k.into(),
        version: v,
        age_ms: 0,
        served: false,
    };
    let out = c
        .check_batch(pb::CheckBatchRequest {
            items: vec![
                item("a", a.version),
                item("b", b.version),
                item("zz", 1),
                item("b", b.version),
            ],
            epoch: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<Freshness> = out.results.iter().map(|r| r.freshness()).collect();
    assert_eq!(
        got,
        vec![
            Freshness::Stale,
            Freshness::Fresh,
            Freshness::Unknown,
            Freshness::Fresh
        ]
    );
    let empty = c
        .check_batch(pb::CheckBatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(empty.results.is_empty());
}

#[tokio::test]
async fn publish_reports_per_change_counts_and_duplicates() {
    let mut t = start().await;
    let c = &mut t.client;
    c.fill(fill_req("feed:1", &["posts:1", "follows:1"], 0))
        .await
        .unwrap();
    c.fill(fill_req("feed:2", &["posts:1"], 0)).await.unwrap();
    let mut lsn = change("posts:1");
    lsn.external_version = Some(42);
    let out = c
        .publish(pb::PublishRequest {
            changes: vec![lsn.clone(), change("follows:1")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let counts: Vec<u64> = out.results.iter().map(|r| r.invalidated).collect();
    assert_eq!(counts, vec![3, 1]);
    let replay = c
        .publish(pb::PublishRequest {
            changes: vec![lsn],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(replay.results[0].duplicate);
    assert_eq!(replay.seq, out.seq, "a replayed change logs nothing");
    let info = c
        .inspect(pb::InspectRequest {
            key: "posts:1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.external_version, Some(42));
    assert_eq!(info.dependents, 2);
}

#[tokio::test]
async fn two_cachers_of_one_key_do_not_invalidate_each_other() {
    let mut t = start().await;
    let mut other = crate::harness::connect(&t.server).await;
    let first = t
        .client
        .fill(fill_req("profile:9", &["user:9"], 0))
        .await
        .unwrap()
        .into_inner();
    let second = other
        .fill(fill_req("profile:9", &["user:9"], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.version, second.version);
    let check = t
        .client
        .check(pb::CheckRequest {
            key: "profile:9".into(),
            version: first.version,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(check.freshness(), Freshness::Fresh);
}

#[tokio::test]
async fn a_check_from_another_epoch_is_unknown() {
    let mut t = start().await;
    let c = &mut t.client;
    let f = c.fill(fill_req("k", &[], 0)).await.unwrap().into_inner();
    let other_epoch = f.epoch ^ 1;
    let check = c
        .check(pb::CheckRequest {
            key: "k".into(),
            version: f.version,
            age_ms: 0,
            epoch: other_epoch,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(check.freshness(), Freshness::Unknown);
    let batch = c
        .check_batch(pb::CheckBatchRequest {
            items: vec![pb::CheckItem {
                key: "k".into(),
                version: f.version,
                age_ms: 0,
                served: false,
            }],
            epoch: other_epoch,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.results[0].freshness(), Freshness::Unknown);
}

/// A batch whose request and answer each take several frames and more than
/// the client's first window (64 KiB): the answer waits for the client's
/// window updates and arrives whole, in order.
#[tokio::test]
async fn a_batch_larger_than_the_windows_is_answered_whole() {
    let mut t = start().await;
    let keys: Vec<String> = (0..10_000).map(|i| format!("big:{i:06}")).collect();
    let published = t
        .client
        .publish(pb::PublishRequest {
            changes: keys.iter().step_by(7).map(|k| change(k)).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let out = t
        .client
        .check_batch(check_batch_req(&keys))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.results.len(), keys.len());
    for (i, r) in out.results.iter().enumerate() {
        let expected = if i % 7 == 0 { published.seq } else { 0 };
        assert_eq!(r.version, expected, "key {}", keys[i]);
    }
}
