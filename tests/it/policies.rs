//! Freshness policies and decisions, leases, read-your-writes and purges,
//! against a real server.

use std::sync::Arc;
use std::time::Duration;

use freshd::config::Config;
use freshd::pb::{self, Decision, Freshness};
use tonic::Code;

use crate::harness::{connect, eventually, fill_all, fill_req, publish_req, start, start_with};

/// The article's example as one policy: serve if age < 5s, revalidate async
/// if age > 2s, force an origin read if the critical bit changed.
fn article() -> pb::FreshnessPolicy {
    pb::FreshnessPolicy {
        max_age_ms: 5_000,
        revalidate_after_ms: 2_000,
        stale_while_revalidate_ms: 5_000,
        allow_stale_on_critical: false,
        check_sample_rate: Some(0.25),
    }
}

fn check(key: &str, version: u64, age_ms: u64) -> pb::CheckRequest {
    pb::CheckRequest {
        key: key.into(),
        version,
        age_ms,
        ..Default::default()
    }
}

#[tokio::test]
async fn decisions_follow_the_namespace_policy() {
    let mut t = start().await;
    let c = &mut t.client;
    c.set_policy(pb::SetPolicyRequest {
        namespace: "feed".into(),
        policy: Some(article()),
    })
    .await
    .unwrap();
    let f = c
        .fill(fill_req("feed:1", &["posts:1"], 0))
        .await
        .unwrap()
        .into_inner();
    let g = c
        .fill(fill_req("feed:2", &["posts:2"], f.seq))
        .await
        .unwrap()
        .into_inner();
    let other = c
        .fill(fill_req("other:1", &["posts:1"], g.seq))
        .await
        .unwrap()
        .into_inner();

    // Current copies, by age.
    for (age, want) in [
        (0, Decision::Fresh),
        (2_000, Decision::Fresh),
        (2_001, Decision::Revalidate),
        (5_000, Decision::Revalidate),
        (5_001, Decision::Refetch),
    ] {
        let r = c
            .check(check("feed:1", f.version, age))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.freshness(), r.decision()),
            (Freshness::Fresh, want),
            "age {age}"
        );
        assert_eq!(r.check_sample_rate, 0.25);
    }
    // A namespace without a policy uses the default: fresh at any age.
    let r = c
        .check(check("other:1", other.version, 999_999))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision(), Decision::Fresh);
    assert_eq!(r.check_sample_rate, 1.0);

    // A non-critical change: serve stale while young, refetch when old.
    c.publish(publish_req(&["posts:1"])).await.unwrap();
    for (age, want) in [
        (0, Decision::Revalidate),
        (5_000, Decision::Revalidate),
        (5_001, Decision::Refetch),
    ] {
        let r = c
            .check(check("feed:1", f.version, age))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.freshness(), r.decision()),
            (Freshness::Stale, want),
            "age {age}"
        );
    }
    let r = c
        .check(check("other:1", other.version, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.decision(),
        Decision::Refetch,
        "the default never serves stale"
    );

    // A critical change forces the origin, even if a later change was not
    // critical.
    let mut critical = publish_req(&["posts:2"]);
    critical.changes[0].critical = true;
    c.publish(critical).await.unwrap();
    c.publish(publish_req(&["posts:2"])).await.unwrap();
    let r = c
        .check(check("feed:2", g.version, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.freshness(), r.decision()),
        (Freshness::Stale, Decision::Refetch)
    );

    let r = c
        .check(check("feed:none", 1, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision(), Decision::Unknown);

    let batch = c
        .check_batch(pb::CheckBatchRequest {
            items: vec![
                pb::CheckItem {
                    key: "feed:1".into(),
                    version: f.version,
                    age_ms: 10,
                    served: false,
                },
                pb::CheckItem {
                    key: "feed:2".into(),
                    version: g.version,
                    age_ms: 10,
                    served: false,
                },
                pb::CheckItem {
                    key: "other:1".into(),
                    version: other.version,
                    age_ms: 10,
                    served: false,
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<Decision> = batch.results.iter().map(|r| r.decision()).collect();
    assert_eq!(
        got,
        vec![Decision::Revalidate, Decision::Refetch, Decision::Refetch]
    );
}

#[tokio::test]
async fn policies_are_managed_at_runtime_and_checked() {
    let mut t = start().await;
    let c = &mut t.client;
    let got = c
        .get_policy(pb::GetPolicyRequest {
            namespace: "feed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.is_default);
    assert_eq!(got.policy.unwrap().max_age_ms, 0);

    let set = c
        .set_policy(pb::SetPolicyRequest {
            namespace: "feed".into(),
            policy: Some(article()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!set.is_default);
    assert_eq!(set.policy, Some(article()));
    let default = pb::FreshnessPolicy {
        max_age_ms: 60_000,
        check_sample_rate: None,
        ..Default::default()
    };
    c.set_policy(pb::SetPolicyRequest {
        namespace: String::new(),
        policy: Some(default),
    })
    .await
    .unwrap();
    let list = c
        .list_policies(pb::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<(&str, bool)> = list
        .policies
        .iter()
        .map(|p| (p.namespace.as_str(), p.is_default))
        .collect();
    assert_eq!(names, vec![("", true), ("feed", false)]);
    assert_eq!(list.policies[0].policy.as_ref().unwrap().max_age_ms, 60_000);
    assert_eq!(
        list.policies[0].policy.as_ref().unwrap().check_sample_rate,
        Some(1.0)
    );

    c.delete_policy(pb::DeletePolicyRequest {
        namespace: "feed".into(),
    })
    .await
    .unwrap();
    let got = c
        .get_policy(pb::GetPolicyRequest {
            namespace: "feed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.is_default);
    assert_eq!(got.policy.unwrap().max_age_ms, 60_000);

    let errors = [
        c.delete_policy(pb::DeletePolicyRequest {
            namespace: "feed".into(),
        })
        .await
        .unwrap_err(),
        c.delete_policy(pb::DeletePolicyRequest {
            namespace: String::new(),
        })
        .await
        .unwrap_err(),
        c.set_policy(pb::SetPolicyRequest {
            namespace: "feed".into(),
            policy: Some(pb::FreshnessPolicy {
                max_age_ms: 1_000,
                revalidate_after_ms: 2_000,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err(),
        c.set_policy(pb::SetPolicyRequest {
            namespace: "feed".into(),
            policy: Some(pb::FreshnessPolicy {
                check_sample_rate: Some(2.0),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err(),
        c.set_policy(pb::SetPolicyRequest {
            namespace: "a:b".into(),
            policy: Some(article()),
        })
        .await
        .unwrap_err(),
        c.set_policy(pb::SetPolicyRequest {
            namespace: "feed".into(),
            policy: None,
        })
        .await
        .unwrap_err(),
    ];
    let codes: Vec<Code> = errors.iter().map(|s| s.code()).collect();
    assert_eq!(
        codes,
        vec![
            Code::NotFound,
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::InvalidArgument
        ]
    );
    assert!(
        errors[2].message().contains("policy.revalidate_after"),
        "{}",
        errors[2].message()
    );
    assert!(errors[3].message().contains("policy.check_sample_rate"));
}

#[tokio::test]
async fn policies_come_from_the_configuration_file() {
    let dir = crate::harness::temp_dir("policy");
    let file = dir.join("freshd.toml");
    std::fs::write(
        &file,
        r#"
listen = "127.0.0.1:0"

[default_policy]
max_age = "1m"

[policies.portfolio]
max_age = "500ms"

[policies.feed]
max_age = "5s"
revalidate_after = "2s"
stale_while_revalidate = "5s"
check_sample_rate = 0.25
"#,
    )
    .unwrap();
    let config = Config::from_args(freshd::config::Args {
        config: Some(file.clone()),
        // Free ports: the defaults may be taken on this machine.
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        ..Default::default()
    })
    .unwrap();
    let mut t = start_with(config).await;
    let feed = t
        .client
        .get_policy(pb::GetPolicyRequest {
            namespace: "feed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(feed.policy, Some(article()));
    let list = t
        .client
        .list_policies(pb::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.policies.len(), 3);
    assert_eq!(list.policies[0].policy.as_ref().unwrap().max_age_ms, 60_000);

    std::fs::write(&file, "[policies.feed]\nmax_age = \"soon\"\n").unwrap();
    let e = Config::from_args(freshd::config::Args {
        config: Some(file),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.setting, "policies.feed.max_age", "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_a_hundred_callers_gets_the_lease() {
    let t = start().await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let mut c = connect(&t.server).await;
        tasks.push(tokio::spawn(async move {
            c.lease(pb::LeaseRequest {
                key: "feed:9".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }));
    }
    let mut granted = Vec::new();
    for task in tasks {
        let r = task.await.unwrap();
        if r.granted {
            granted.push(r);
        } else {
            assert!(r.retry_after_ms > 0 && r.ttl_ms > 0, "{r:?}");
            assert_eq!(r.token, 0);
        }
    }
    assert_eq!(granted.len(), 1, "exactly one filler");
    let lease = granted.pop().unwrap();

    // The filler fills with its token; the lease is released.
    let mut c = connect(&t.server).await;
    let mut fill = fill_req("feed:9", &["posts:9"], 0);
    fill.lease_token = lease.token;
    let filled = c.fill(fill.clone()).await.unwrap().into_inner();
    assert!(filled.version > 0);
    let again = c.fill(fill).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "a token works once");
    assert!(again.message().contains("lease again"));
    let next = c
        .lease(pb::LeaseRequest {
            key: "feed:9".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(next.granted);
    let stats = c.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!((stats.leases_granted, stats.leases_contended), (2, 99));
}

#[tokio::test]
async fn a_publish_between_lease_and_fill_refuses_the_fill() {
    let mut t = start().await;
    let c = &mut t.client;
    let lease = c
        .lease(pb::LeaseRequest {
            key: "feed:1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(lease.granted);
    c.publish(publish_req(&["posts:1"])).await.unwrap();
    let mut fill = fill_req("feed:1", &["posts:1"], 0);
    fill.lease_token = lease.token;
    let status = c.fill(fill).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert!(
        status.message().contains("posts:1 changed"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn leases_expire_on_their_own() {
    let mut config = Config::ephemeral();
    config.store.lease_ttl = Duration::from_millis(100);
    let t = start_with(config).await;
    let mut c = connect(&t.server).await;
    let first = c
        .lease(pb::LeaseRequest {
            key: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(first.granted);
    assert_eq!(first.ttl_ms, 100);
    let granted_again = eventually(Duration::from_secs(5), || {
        let mut c = c.clone();
        async move {
            c.lease(pb::LeaseRequest {
                key: "k".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .granted
        }
    })
    .await;
    assert!(granted_again);
    let mut late = fill_req("k", &[], 0);
    late.lease_token = first.token;
    assert_eq!(
        c.fill(late).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn read_your_writes_waits_for_min_seq_and_gives_up_clearly() {
    let mut config = Config::ephemeral();
    config.limits.max_wait_for_seq = Duration::from_millis(100);
    let mut t = start_with(config).await;
    let f = t
        .client
        .fill(fill_req("k", &[], 0))
        .await
        .unwrap()
        .into_inner();
    let p = t
        .client
        .publish(publish_req(&["k"]))
        .await
        .unwrap()
        .into_inner();
    let mut req = check("k", f.version, 0);
    req.min_seq = p.seq;
    let r = t.client.check(req).await.unwrap().into_inner();
    assert_eq!(r.freshness(), Freshness::Stale);
    assert!(r.seq >= p.seq);

    let mut ahead = check("k", f.version, 0);
    ahead.min_seq = p.seq + 1_000;
    let status = t.client.check(ahead).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("min_seq"), "{}", status.message());
    let status = t
        .client
        .lease(pb::LeaseRequest {
            key: "k".into(),
            min_seq: p.seq + 1_000,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    // A waiter is woken by the write it waits for.
    let server = Arc::new(t);
    let mut waiter = connect(&server.server).await;
    let next = p.seq + 1;
    let waiting = tokio::spawn(async move {
        let mut req = check("k", 0, 0);
        req.min_seq = next;
        waiter.check(req).await
    });
    let mut writer = connect(&server.server).await;
    writer.publish(publish_req(&["k"])).await.unwrap();
    let r = waiting.await.unwrap().unwrap().into_inner();
    assert!(r.seq >= next);
}

fn purge(prefix: &str) -> pb::PurgeRequest {
    pb::PurgeRequest {
        prefix: prefix.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn purges_dry_run_soft_and_hard() {
    let mut config = Config::ephemeral();
    config.limits.max_purge_keys = 3;
    config.limits.purges_per_minute = 3;
    let mut t = start_with(config).await;
    let c = &mut t.client;
    let versions = fill_all(c, &["feed:1", "feed:2"]).await;
    let home = c
        .fill(fill_req("home:1", &["feed:1"], 0))
        .await
        .unwrap()
        .into_inner();
    let keep = c
        .fill(fill_req("posts:1", &[], 0))
        .await
        .unwrap()
        .into_inner();

    // A watcher on the feed namespace.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::WatchRequest {
        request: Some(pb::watch_request::Request::Start(pb::WatchStart {
            client_id: "w".into(),
            subscribe: vec!["feed:".into()],
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut watch = connect(&t.server)
        .await
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().unwrap(); // started

    let mut dry = purge("feed:");
    dry.dry_run = true;
    dry.hard = true;
    let report = c.purge(dry).await.unwrap().into_inner();
    assert_eq!(
        (report.matched, report.affected),
        (2, 3),
        "two feeds and the home that depends on one"
    );
    assert_eq!((report.subscribers, report.notices), (1, 2));
    assert!(!report.applied);

    // Soft: copies older than the purge revalidate; newer ones are fresh.
    let mut soft = purge("feed:");
    soft.jitter_ms = 1;
    let done = c.purge(soft).await.unwrap().into_inner();
    assert!(done.applied);
    let r = c
        .check(check("feed:1", versions[0], 60_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.freshness(), r.decision()),
        (Freshness::Fresh, Decision::Revalidate)
    );
    let r = c
        .check(check("home:1", home.version, 60_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision(), Decision::Revalidate, "dependents too");
    let r = c
        .check(check("posts:1", keep.version, 60_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision(), Decision::Fresh, "other namespaces untouched");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = c
        .check(check("feed:1", versions[0], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.decision(),
        Decision::Fresh,
        "a copy fetched after the purge"
    );

    // Hard: copies must refetch, and the watcher hears of it.
    let mut hard = purge("feed:");
    hard.hard = true;
    let done = c.purge(hard).await.unwrap().into_inner();
    assert!(done.applied);
    let r = c
        .check(check("feed:2", versions[1], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.freshness(), r.decision()),
        (Freshness::Stale, Decision::Refetch)
    );
    let m = watch.message().await.unwrap().unwrap();
    let Some(pb::watch_response::Response::Notices(batch)) = m.response else {
        panic!("expected notices, got {m:?}");
    };
    let mut keys: Vec<String> = batch.notices.iter().map(|n| n.key.clone()).collect();
    keys.sort();
    assert_eq!(keys, vec!["feed:1", "feed:2"]);
    assert!(batch.notices.iter().all(|n| n.critical));

    // The blast radius: everything is 4 keys, above 3, unless confirmed.
    let status = c.purge(purge("")).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("max_purge_keys"),
        "{}",
        status.message()
    );
    let mut confirmed = purge("");
    confirmed.confirm = true;
    assert!(c.purge(confirmed).await.unwrap().into_inner().applied);

    // The rate: three purges this minute already ran.
    let status = c.purge(purge("posts:")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("purges_per_minute"));
    let stats = c.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.purges, 3);
    assert_eq!(stats.purged_keys, 3 + 3 + 4);
}
