//! The metrics endpoint after a scripted workload: every figure matches what
//! the workload did; promtool accepts the scrape and the alert rules; every
//! metric the dashboard and the rules use exists.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use freshd::config::Config;
use freshd::pb::{self, watch_request::Request as In, watch_response::Response as Out};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::harness::{connect, fill_all, fill_req, http_get, publish_req, start_with};

/// The value of the sample `name` whose labels include all of `labels`.
fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse().unwrap())
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}\n{scrape}");
    found[0]
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn the_scrape_matches_the_workload() {
    let mut config = Config::ephemeral();
    config.metrics.max_endpoints = 2;
    let mut t = start_with(config).await;
    let admin = t.server.admin_addr.unwrap();
    let c = &mut t.client;

    let f1 = c
        .fill(fill_req("feed:1", &["posts:1"], 0))
        .await
        .unwrap()
        .into_inner();
    let f2 = c
        .fill(fill_req("feed:2", &["posts:1"], 0))
        .await
        .unwrap()
        .into_inner();

    // A subscriber that tracks feed:1.
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::WatchRequest {
        request: Some(In::Start(pb::WatchStart {
            client_id: "svc".into(),
            track: vec!["feed:1".into()],
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut watch = connect(&t.server)
        .await
        .watch(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().unwrap(); // started

    // Three checks of served copies on three endpoints; "c" folds into other.
    for (endpoint, age) in [("a", 1_500), ("b", 250), ("c", 4_000)] {
        c.check(pb::CheckRequest {
            key: "feed:1".into(),
            version: f1.version,
            age_ms: age,
            endpoint: endpoint.into(),
            served: true,
            ..Default::default()
        })
        .await
        .unwrap();
    }

    // A critical change, produced 1 s ago: one notice for the subscriber.
    let mut change = publish_req(&["posts:1"]);
    change.changes[0].critical = true;
    change.changes[0].event_time_unix_ms = now_ms() - 1_000;
    let p = c.publish(change).await.unwrap().into_inner();
    let m = watch.message().await.unwrap().unwrap();
    assert!(matches!(m.response, Some(Out::Notices(_))));
    tx.send(pb::WatchRequest {
        request: Some(In::Ack(pb::Ack { seq: p.seq })),
    })
    .await
    .unwrap();
    tx.send(pb::WatchRequest {
        request: Some(In::Progress(pb::ProgressRequest {})),
    })
    .await
    .unwrap();
    watch.message().await.unwrap().unwrap(); // the ack is applied before this

    // A served copy of feed:2 that missed the critical change.
    c.check(pb::CheckRequest {
        key: "feed:2".into(),
        version: f2.version,
        endpoint: "a".into(),
        served: true,
        ..Default::default()
    })
    .await
    .unwrap();
    // The subscriber acknowledged the change but still checks its old copy of
    // feed:1: a missed invalidation; its fill repairs it.
    c.check(pb::CheckRequest {
        key: "feed:1".into(),
        version: f1.version,
        client_id: "svc".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut fill = fill_req("feed:1", &["posts:1"], p.seq);
    fill.client_id = "svc".into();
    c.fill(fill).await.unwrap();
    // A stream resuming with a token from another history: reset.
    let (tx2, rx2) = mpsc::channel(8);
    tx2.send(pb::WatchRequest {
        request: Some(In::Start(pb::WatchStart {
            resume: Some(pb::ResumeToken { epoch: 1, seq: 9 }),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut other = connect(&t.server)
        .await
        .watch(ReceiverStream::new(rx2))
        .await
        .unwrap()
        .into_inner();
    other.message().await.unwrap().unwrap(); // started
    let m = other.message().await.unwrap().unwrap();
    assert!(matches!(m.response, Some(Out::Reset(_))));
    // An error, for the RPC counts.
    c.inspect(pb::InspectRequest { key: "nope".into() })
        .await
        .unwrap_err();

    let (status, scrape) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);

    // Hit age: one observation per endpoint, in seconds.
    let age = |endpoint, suffix| {
        sample(
            &scrape,
            &format!("freshd_hit_age_seconds_{suffix}"),
            &[("namespace", "feed"), ("endpoint", endpoint)],
        )
    };
    assert_eq!(age("a", "count"), 2.0);
    assert_eq!(age("a", "sum"), 1.5);
    assert_eq!(age("b", "count"), 1.0);
    // "c" and the unnamed endpoint of the last check fold into "other".
    assert_eq!(age("other", "count"), 2.0);
    assert_eq!(age("other", "sum"), 4.0);
    // Stale serves: 4 served checks, 1 stale after a critical change.
    assert_eq!(
        sample(
            &scrape,
            "freshd_served_checks_total",
            &[("namespace", "feed")]
        ),
        4.0
    );
    assert_eq!(
        sample(
            &scrape,
            "freshd_stale_serves_total",
            &[("namespace", "feed"), ("critical", "true")]
        ),
        1.0
    );
    // Event-to-invalidation: one notice, enqueued, written, acknowledged, each
    // about a second after the event.
    for stage in ["enqueued", "written", "acked"] {
        let labels = [("namespace", "feed"), ("stage", stage)];
        assert_eq!(
            sample(&scrape, "freshd_invalidation_delay_seconds_count", &labels),
            1.0
        );
        let sum = sample(&scrape, "freshd_invalidation_delay_seconds_sum", &labels);
        assert!((1.0..10.0).contains(&sum), "{stage}: {sum}");
    }
    // Repair: one missed invalidation found by a check, repaired by a fill.
    assert_eq!(
        sample(
            &scrape,
            "freshd_missed_invalidations_total",
            &[("namespace", "feed"), ("detected_by", "check")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &scrape,
            "freshd_repairs_total",
            &[("namespace", "feed"), ("repaired_by", "fill")]
        ),
        1.0
    );
    // Operations.
    assert_eq!(
        sample(
            &scrape,
            "freshd_rpc_requests_total",
            &[("method", "Check"), ("code", "OK")]
        ),
        5.0
    );
    assert_eq!(
        sample(
            &scrape,
            "freshd_rpc_requests_total",
            &[("method", "Fill"), ("code", "OK")]
        ),
        3.0
    );
    assert_eq!(
        sample(
            &scrape,
            "freshd_rpc_requests_total",
            &[("method", "Inspect"), ("code", "NOT_FOUND")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &scrape,
            "freshd_rpc_duration_seconds_count",
            &[("method", "Check")]
        ),
        5.0
    );
    assert_eq!(sample(&scrape, "freshd_tracked_keys", &[]), 1.0);
    assert_eq!(sample(&scrape, "freshd_keys", &[]), 3.0);
    assert_eq!(sample(&scrape, "freshd_edges", &[]), 2.0);
    assert_eq!(sample(&scrape, "freshd_seq", &[]), p.seq as f64 + 1.0);
    assert_eq!(
        sample(&scrape, "freshd_watch_resumes_total", &[("outcome", "new")]),
        1.0
    );
    assert_eq!(
        sample(
            &scrape,
            "freshd_watch_resumes_total",
            &[("outcome", "repaired")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &scrape,
            "freshd_watch_resets_total",
            &[("reason", "new_epoch")]
        ),
        1.0
    );
    assert_eq!(sample(&scrape, "freshd_subscribers", &[]), 2.0);
    assert_eq!(
        sample(&scrape, "freshd_publish_invalidated_keys_count", &[]),
        1.0
    );
    assert_eq!(
        sample(&scrape, "freshd_publish_invalidated_keys_sum", &[]),
        3.0
    );
    assert_eq!(sample(&scrape, "freshd_log_append_seconds_count", &[]), 4.0);

    promtool_accepts(&scrape);
    every_referenced_metric_exists(&scrape);
}

/// A batch records each item under its own key's namespace, whatever the
/// order of the namespaces in the batch.
#[tokio::test]
async fn a_batch_records_each_item_under_its_namespace() {
    let mut t = start_with(Config::ephemeral()).await;
    let admin = t.server.admin_addr.unwrap();
    let c = &mut t.client;
    let versions = fill_all(c, &["a:1", "b:1", "a:2"]).await;
    let mut critical = publish_req(&["a:2"]);
    critical.changes[0].critical = true;
    c.publish(critical).await.unwrap();
    let item = |key: &str, version, age_ms| pb::CheckItem {
        key: key.into(),
        version,
        age_ms,
        served: true,
    };
    let answer = c
        .check_batch(pb::CheckBatchRequest {
            items: vec![
                item("a:1", versions[0], 1_000),
                item("b:1", versions[1], 2_000),
                item("a:2", versions[2], 3_000),
                // No copy: nothing to record.
                item("b:2", 0, 0),
            ],
            endpoint: "home".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let freshness: Vec<i32> = answer.results.iter().map(|r| r.freshness).collect();
    assert_eq!(
        freshness,
        [
            pb::Freshness::Fresh as i32,
            pb::Freshness::Fresh as i32,
            pb::Freshness::Stale as i32,
            pb::Freshness::Unknown as i32
        ]
    );

    let (_, scrape) = http_get(admin, "/metrics").await;
    let age = |namespace, suffix| {
        sample(
            &scrape,
            &format!("freshd_hit_age_seconds_{suffix}"),
            &[("namespace", namespace), ("endpoint", "home")],
        )
    };
    assert_eq!(age("a", "count"), 2.0);
    assert_eq!(age("a", "sum"), 4.0);
    assert_eq!(age("b", "count"), 1.0);
    assert_eq!(age("b", "sum"), 2.0);
    let served = |namespace| {
        sample(
            &scrape,
            "freshd_served_checks_total",
            &[("namespace", namespace)],
        )
    };
    assert_eq!(served("a"), 2.0);
    assert_eq!(served("b"), 1.0);
    assert_eq!(
        sample(
            &scrape,
            "freshd_stale_serves_total",
            &[("namespace", "a"), ("critical", "true")]
        ),
        1.0
    );
}

fn promtool() -> Command {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "promtool is needed (Debian: apt-get install prometheus); .ci/run installs it"
    );
    Command::new("promtool")
}

fn promtool_accepts(scrape: &str) {
    use std::io::Write;
    let mut child = promtool()
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check metrics: {report}");

    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
    let out = promtool().args(["check", "rules", rules]).output().unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Every `freshd_*` name in the dashboard and the rules is a sample name
/// (or histogram series) of the scrape.
fn every_referenced_metric_exists(scrape: &str) {
    // Described series count even before their first sample (a family whose
    // labels have not occurred yet).
    let mut exposed: BTreeSet<String> = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exposed.insert(format!("{name}{suffix}"));
                }
            } else {
                exposed.insert(name.to_owned());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            exposed.insert(line.split(['{', ' ']).next().unwrap().to_owned());
        }
    }
    let root = env!("CARGO_MANIFEST_DIR");
    for file in ["deploy/grafana/freshd.json", "deploy/prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let mut referenced = BTreeSet::new();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("freshd_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            referenced.insert(name);
        }
        assert!(!referenced.is_empty(), "{file} references no metric");
        for name in referenced {
            assert!(
                exposed.contains(&name),
                "{file} uses {name}, not in the scrape"
            );
        }
    }
}

#[tokio::test]
async fn health_endpoints_mirror_readiness() {
    let mut config = Config::ephemeral();
    config.admin_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let t = start_with(config).await;
    let admin = t.server.admin_addr.unwrap();
    for path in ["/healthz", "/readyz"] {
        let (status, body) = http_get(admin, path).await;
        assert_eq!((status, body.as_str()), (200, "SERVING\n"), "{path}");
    }

    // Not ready: 503, as while starting or draining.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ready = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(freshd::admin::serve(
        listener,
        Arc::new(freshd::metrics::Metrics::disabled()),
        ready,
    ));
    for path in ["/healthz", "/readyz"] {
        let (status, body) = http_get(addr, path).await;
        assert_eq!((status, body.as_str()), (503, "NOT_SERVING\n"), "{path}");
    }
    task.abort();
    let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
}
