//! Security: tokens and scopes per RPC, scope-filtered fan-out, quotas per
//! principal, TLS and mutual TLS with certificates made here, and reload.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use freshd::auth::{hash_token, parse_sha256, AuthConfig, PrincipalConfig, Quotas, Scope, Scopes};
use freshd::config::Config;
use freshd::pb::watch_response::Response as Out;
use freshd::pb::{self, coordinator_client::CoordinatorClient};
use freshd::server::RunningServer;
use freshd::tls::TlsConfig;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request, Status};

use crate::harness::{
    channel, eventually, fill_req, freshd_command, http_get, publish_req, temp_dir,
};

type Authed = CoordinatorClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization` metadata to every request.
#[derive(Clone)]
struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            let value: MetadataValue<_> = value.parse().expect("ascii");
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

fn scopes(list: &[(&str, &[Scope])]) -> Vec<(String, Scopes)> {
    list.iter()
        .map(|(ns, scopes)| {
            let mut set = Scopes::default();
            for s in *scopes {
                set.insert(*s);
            }
            (ns.to_string(), set)
        })
        .collect()
}

fn principal(name: &str, list: &[(&str, &[Scope])], quotas: Quotas) -> PrincipalConfig {
    PrincipalConfig {
        name: name.into(),
        token_sha256: parse_sha256(&hash_token(&token_of(name))).unwrap(),
        expires: None,
        scopes: scopes(list),
        quotas,
    }
}

/// Each test principal's token is derived from its name.
fn token_of(name: &str) -> String {
    format!("fd_test_token_of_{name}")
}

async fn as_principal(server: &RunningServer, name: &str) -> Authed {
    with_header(server, Some(format!("Bearer {}", token_of(name)))).await
}

async fn with_header(server: &RunningServer, header: Option<String>) -> Authed {
    CoordinatorClient::with_interceptor(channel(server).await, Bearer(header))
}

const ALL: &[Scope] = &Scope::ALL;

async fn start(principals: Vec<PrincipalConfig>) -> RunningServer {
    let mut config = Config::ephemeral();
    config.auth = AuthConfig {
        principals,
        ..AuthConfig::default()
    };
    RunningServer::start(config).await.expect("starts")
}

/// What one RPC needs, and a call of it that touches namespace `ns`.
#[derive(Debug, Clone, Copy)]
enum Call {
    Check,
    CheckBatch,
    Inspect,
    Lease,
    Fill,
    FillWithDependency,
    Publish,
    Purge,
    WatchTrack,
    WatchSubscribe,
    GetPolicy,
    SetPolicy,
    DeletePolicy,
    ListPolicies,
}

impl Call {
    const ALL: [Call; 14] = [
        Call::Check,
        Call::CheckBatch,
        Call::Inspect,
        Call::Lease,
        Call::Fill,
        Call::FillWithDependency,
        Call::Publish,
        Call::Purge,
        Call::WatchTrack,
        Call::WatchSubscribe,
        Call::GetPolicy,
        Call::SetPolicy,
        Call::DeletePolicy,
        Call::ListPolicies,
    ];

    /// The scopes (in namespace "ns") that allow the call: all are needed.
    fn needs(self) -> &'static [Scope] {
        match self {
            Call::Check | Call::CheckBatch | Call::Inspect => &[Scope::Check],
            Call::Lease | Call::Fill => &[Scope::Fill],
            // A dependency needs check in its namespace; here it is "ns" too.
            Call::FillWithDependency => &[Scope::Fill, Scope::Check],
            Call::Publish => &[Scope::Publish],
            Call::Purge => &[Scope::Purge],
            Call::WatchTrack | Call::WatchSubscribe => &[Scope::Watch],
            Call::GetPolicy | Call::SetPolicy | Call::DeletePolicy | Call::ListPolicies => {
                &[Scope::Admin]
            }
        }
    }

    async fn run(self, c: &mut Authed) -> Result<(), Status> {
        let key = "ns:k".to_string();
        match self {
            Call::Check => c
                .check(pb::CheckRequest {
                    key,
                    ..Default::default()
                })
                .await
                .map(drop),
            Call::CheckBatch => c
                .check_batch(pb::CheckBatchRequest {
                    items: vec![pb::CheckItem {
                        key,
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await
                .map(drop),
            Call::Inspect => match c.inspect(pb::InspectRequest { key }).await {
                // Allowed; nothing was filled or published under the key.
                Err(s) if s.code() == Code::NotFound => Ok(()),
                r => r.map(drop),
            },
            Call::Lease => c
                .lease(pb::LeaseRequest {
                    key,
                    ..Default::default()
                })
                .await
                .map(drop),
            Call::Fill => c.fill(fill_req("ns:filled", &[], 0)).await.map(drop),
            Call::FillWithDependency => c
                .fill(fill_req("ns:filled2", &["ns:dep"], 0))
                .await
                .map(drop),
            Call::Publish => c.publish(publish_req(&["ns:k"])).await.map(drop),
            Call::Purge => c
                .purge(pb::PurgeRequest {
                    prefix: "ns:".into(),
                    dry_run: true,
                    ..Default::default()
                })
                .await
                .map(drop),
            Call::WatchTrack | Call::WatchSubscribe => {
                let start = if matches!(self, Call::WatchTrack) {
                    pb::WatchStart {
                        track: vec![key],
                        ..Default::default()
                    }
                } else {
                    pb::WatchStart {
                        subscribe: vec!["ns:".into()],
                        ..Default::default()
                    }
                };
                watch(c, start).await.map(drop)
            }
            Call::GetPolicy => c
                .get_policy(pb::GetPolicyRequest {
                    namespace: "ns".into(),
                })
                .await
                .map(drop),
            Call::SetPolicy => c
                .set_policy(pb::SetPolicyRequest {
                    namespace: "ns".into(),
                    policy: Some(pb::FreshnessPolicy {
                        check_sample_rate: Some(1.0),
                        ..Default::default()
                    }),
                })
                .await
                .map(drop),
            Call::DeletePolicy => match c
                .delete_policy(pb::DeletePolicyRequest {
                    namespace: "ns".into(),
                })
                .await
            {
                // Allowed; there was no policy to delete.
                Err(s) if s.code() == Code::NotFound => Ok(()),
                r => r.map(drop),
            },
            Call::ListPolicies => c.list_policies(pb::ListPoliciesRequest {}).await.map(drop),
        }
    }
}

/// Starts a Watch stream; returns the response stream and the request
/// sender once the stream has started.
async fn watch(
    c: &mut Authed,
    start: pb::WatchStart,
) -> Result<
    (
        tonic::Streaming<pb::WatchResponse>,
        mpsc::Sender<pb::WatchRequest>,
    ),
    Status,
> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::WatchRequest {
        request: Some(pb::watch_request::Request::Start(start)),
    })
    .await
    .unwrap();
    let mut stream = c.watch(ReceiverStream::new(rx)).await?.into_inner();
    match stream.message().await? {
        Some(pb::WatchResponse {
            response: Some(pb::watch_response::Response::Started(_)),
        }) => Ok((stream, tx)),
        other => panic!("expected started, got {other:?}"),
    }
}

#[tokio::test]
async fn the_scope_matrix_allows_exactly_what_each_scope_grants() {
    // One principal per scope (in namespace "ns" only), one with them all,
    // and one with everything but in another namespace.
    let mut principals: Vec<PrincipalConfig> = Scope::ALL
        .iter()
        .map(|s| principal(s.name(), &[("ns", &[*s])], Quotas::default()))
        .collect();
    principals.push(principal(
        "fill-and-check",
        &[("ns", &[Scope::Fill, Scope::Check])],
        Quotas::default(),
    ));
    principals.push(principal("all", &[("ns", ALL)], Quotas::default()));
    principals.push(principal("elsewhere", &[("other", ALL)], Quotas::default()));
    let server = start(principals.clone()).await;

    let mut checked = 0;
    for p in &principals {
        let held: Vec<Scope> = Scope::ALL
            .into_iter()
            .filter(|s| {
                p.scopes
                    .iter()
                    .any(|(ns, set)| ns == "ns" && set.contains(*s))
            })
            .collect();
        let mut c = as_principal(&server, &p.name).await;
        for call in Call::ALL {
            let allowed = match call {
                // Lists what the principal administers, wherever that is.
                Call::ListPolicies => p.scopes.iter().any(|(_, set)| set.contains(Scope::Admin)),
                _ => call.needs().iter().all(|s| held.contains(s)),
            };
            let result = call.run(&mut c).await;
            match (&result, allowed) {
                (Ok(()), true) => {}
                (Err(s), false) if s.code() == Code::PermissionDenied => {
                    let missing = call.needs().iter().find(|s| !held.contains(s)).unwrap();
                    assert!(
                        s.message().contains(&format!("{:?}", missing.name()))
                            && (s.message().contains("\"ns\"")
                                || s.message().contains("in any namespace"))
                            && s.message().contains(&format!("{:?}", p.name)),
                        "{} {call:?}: the denial names principal, scope and namespace: {}",
                        p.name,
                        s.message()
                    );
                }
                _ => panic!(
                    "principal {} calling {call:?}: allowed={allowed}, got {result:?}",
                    p.name
                ),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, principals.len() * Call::ALL.len());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn server_wide_calls_need_the_star_namespace() {
    let server = start(vec![
        principal("ns-admin", &[("ns", ALL)], Quotas::default()),
        principal("root", &[("*", ALL)], Quotas::default()),
    ])
    .await;
    let mut ns_admin = as_principal(&server, "ns-admin").await;
    let mut root = as_principal(&server, "root").await;

    let denied = ns_admin.stats(pb::StatsRequest {}).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("\"*\""), "{}", denied.message());
    root.stats(pb::StatsRequest {}).await.unwrap();

    // The default policy is every namespace's.
    let denied = ns_admin
        .get_policy(pb::GetPolicyRequest {
            namespace: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    root.get_policy(pb::GetPolicyRequest {
        namespace: String::new(),
    })
    .await
    .unwrap();

    // A purge prefix or watch prefix that spans namespaces needs "*".
    for prefix in ["", "n", "ns"] {
        let denied = ns_admin
            .purge(pb::PurgeRequest {
                prefix: prefix.into(),
                dry_run: true,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "purge {prefix:?}");
        let denied = watch(
            &mut ns_admin,
            pb::WatchStart {
                subscribe: vec![prefix.into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "watch {prefix:?}");
        watch(
            &mut root,
            pb::WatchStart {
                subscribe: vec![prefix.into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }

    // ListPolicies shows a namespace admin only its own namespaces.
    root.set_policy(pb::SetPolicyRequest {
        namespace: "other".into(),
        policy: Some(pb::FreshnessPolicy {
            check_sample_rate: Some(1.0),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    ns_admin
        .set_policy(pb::SetPolicyRequest {
            namespace: "ns".into(),
            policy: Some(pb::FreshnessPolicy {
                check_sample_rate: Some(1.0),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let seen: Vec<String> = ns_admin
        .list_policies(pb::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner()
        .policies
        .into_iter()
        .map(|p| p.namespace)
        .collect();
    assert_eq!(seen, vec!["ns".to_string()]);
    let all = root
        .list_policies(pb::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner()
        .policies;
    assert_eq!(all.len(), 3, "the default, ns and other: {all:?}");
    server.stop().await.unwrap();
}

/// A Watch stream lives no longer than its token: it works until the token
/// expires, then ends UNAUTHENTICATED, and a stream with another token goes
/// on.
#[tokio::test]
async fn a_watch_stream_ends_when_its_token_expires() {
    let mut short = principal("short", &[("*", ALL)], Quotas::default());
    // Long enough for the streams to start and carry a notice first, even
    // on a slow machine.
    let expires = SystemTime::now() + Duration::from_secs(5);
    short.expires = Some(expires);
    let server = start(vec![
        principal("long", &[("*", ALL)], Quotas::default()),
        short,
    ])
    .await;
    let start_req = || pb::WatchStart {
        track: vec!["a:1".into()],
        ..Default::default()
    };
    let mut short_client = as_principal(&server, "short").await;
    let (mut short_stream, _short_tx) = watch(&mut short_client, start_req()).await.unwrap();
    let mut long_client = as_principal(&server, "long").await;
    let (mut long_stream, _long_tx) = watch(&mut long_client, start_req()).await.unwrap();
    // Before the expiry, notices flow.
    long_client.publish(publish_req(&["a:1"])).await.unwrap();
    for stream in [&mut short_stream, &mut long_stream] {
        let m = stream.message().await.unwrap().unwrap();
        assert!(matches!(m.response, Some(Out::Notices(_))), "{m:?}");
    }
    // At the expiry, the short stream ends, with the reason.
    let e = tokio::time::timeout(Duration::from_secs(30), short_stream.message())
        .await
        .expect("the stream ends at the expiry")
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("\"short\" expired"), "{}", e.message());
    assert!(SystemTime::now() >= expires, "not before the expiry");
    // The other stream goes on.
    long_client.publish(publish_req(&["a:1"])).await.unwrap();
    let m = long_stream.message().await.unwrap().unwrap();
    assert!(matches!(m.response, Some(Out::Notices(_))), "{m:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn missing_malformed_unknown_and_expired_tokens_are_unauthenticated() {
    let mut expired = principal("expired", &[("*", ALL)], Quotas::default());
    expired.expires = Some(SystemTime::now() - Duration::from_secs(60));
    let server = start(vec![
        principal("good", &[("*", ALL)], Quotas::default()),
        expired,
    ])
    .await;
    let cases = [
        (None, "requires a token"),
        (Some("Basic dXNlcjpwYXNz".to_string()), "malformed"),
        (Some("Bearer".to_string()), "malformed"),
        (
            Some(format!("Bearer {}x", token_of("good"))),
            "unknown token",
        ),
        (Some(format!("Bearer {}", token_of("expired"))), "expired"),
    ];
    for (header, says) in cases {
        let mut c = with_header(&server, header.clone()).await;
        let e = c
            .check(pb::CheckRequest {
                key: "a:b".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{header:?}: {e:?}");
        assert!(e.message().contains(says), "{header:?}: {}", e.message());
        if let Some(h) = &header {
            if let Some(token) = h.strip_prefix("Bearer ") {
                assert!(!e.message().contains(token), "the token is never echoed");
            }
        }
        // Watch streams are refused the same way.
        let e = watch(
            &mut c,
            pb::WatchStart {
                track: vec!["a:b".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    // Nothing changed, and the good token works.
    let mut good = as_principal(&server, "good").await;
    let stats = good.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.keys, 0);

    // Health and reflection stay open by default.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&server).await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status, 1, "SERVING");

    let scrape = http_get(server.admin_addr.unwrap(), "/metrics").await.1;
    for reason in ["missing", "malformed", "unknown", "expired"] {
        assert!(
            scrape.contains(&format!(
                "freshd_auth_refusals_total{{reason=\"{reason}\"}}"
            )),
            "{reason} is counted: {scrape}"
        );
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn health_and_reflection_can_require_a_token() {
    let mut config = Config::ephemeral();
    config.auth = AuthConfig {
        principals: vec![principal("p", &[("*", ALL)], Quotas::default())],
        health_requires_token: true,
        reflection_requires_token: true,
    };
    let server = RunningServer::start(config).await.unwrap();
    let request = || tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    let mut open = tonic_health::pb::health_client::HealthClient::new(channel(&server).await);
    let e = open.check(request()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut authed = tonic_health::pb::health_client::HealthClient::with_interceptor(
        channel(&server).await,
        Bearer(Some(format!("Bearer {}", token_of("p")))),
    );
    assert_eq!(
        authed.check(request()).await.unwrap().into_inner().status,
        1
    );
    server.stop().await.unwrap();
}

/// Every message a stream receives until a progress at or past `seq`.
async fn until_progress(
    stream: &mut tonic::Streaming<pb::WatchResponse>,
    tx: &mpsc::Sender<pb::WatchRequest>,
    seq: u64,
) -> Vec<pb::watch_response::Response> {
    let mut got = Vec::new();
    loop {
        tx.send(pb::WatchRequest {
            request: Some(pb::watch_request::Request::Progress(pb::ProgressRequest {})),
        })
        .await
        .unwrap();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("the stream answers")
                .unwrap()
                .unwrap()
                .response
                .unwrap();
            if let pb::watch_response::Response::Progress(p) = &message {
                let done = p.seq >= seq;
                got.push(message);
                if done {
                    return got;
                }
                break;
            }
            got.push(message);
        }
    }
}

#[tokio::test]
async fn a_narrow_subscriber_sees_nothing_of_a_broad_purge_elsewhere() {
    let server = start(vec![
        principal("root", &[("*", ALL)], Quotas::default()),
        principal(
            "feed-reader",
            &[("feed", &[Scope::Watch, Scope::Check])],
            Quotas::default(),
        ),
    ])
    .await;
    let mut root = as_principal(&server, "root").await;
    let mut reader = as_principal(&server, "feed-reader").await;

    // posts:0..200, and two feeds: feed:u1 depends on posts:1 (an edge
    // across namespaces), feed:u2 on nothing.
    for i in 0..200 {
        root.fill(fill_req(&format!("posts:{i}"), &[], 0))
            .await
            .unwrap();
    }
    root.fill(fill_req("feed:u1", &["posts:1"], 0))
        .await
        .unwrap();
    root.fill(fill_req("feed:u2", &[], 0)).await.unwrap();

    // The reader watches its whole namespace and tracks a key; root watches
    // everything, to show what there was to see.
    let (mut narrow, narrow_tx) = watch(
        &mut reader,
        pb::WatchStart {
            subscribe: vec!["feed:".into()],
            track: vec!["feed:u1".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (mut broad, broad_tx) = watch(
        &mut root,
        pb::WatchStart {
            subscribe: vec![String::new()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // A narrow stream may not widen itself either.
    let (mut widening, widening_tx) = watch(
        &mut reader,
        pb::WatchStart {
            track: vec!["feed:u2".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    widening_tx
        .send(pb::WatchRequest {
            request: Some(pb::watch_request::Request::Subscribe(pb::KeyList {
                keys: vec!["posts:".into()],
            })),
        })
        .await
        .unwrap();
    let e = loop {
        match widening.message().await {
            Err(e) => break e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
        }
    };
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // A hard purge of every post, and a publish of one.
    let purge = root
        .purge(pb::PurgeRequest {
            prefix: "posts:".into(),
            hard: true,
            confirm: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(purge.affected >= 201, "{purge:?}");
    let last = root
        .publish(publish_req(&["posts:1"]))
        .await
        .unwrap()
        .into_inner()
        .seq;

    let broad_got = until_progress(&mut broad, &broad_tx, last).await;
    let broad_posts = broad_got
        .iter()
        .filter_map(|m| match m {
            pb::watch_response::Response::Notices(b) => Some(b.notices.len()),
            _ => None,
        })
        .sum::<usize>();
    assert!(
        broad_posts >= 201,
        "the broad stream saw the purge: {broad_posts}"
    );
    let broad_cause = broad_got.iter().any(|m| match m {
        pb::watch_response::Response::Notices(b) => b
            .notices
            .iter()
            .any(|n| n.key == "feed:u1" && n.cause.starts_with("posts:")),
        _ => false,
    });
    assert!(broad_cause, "root sees the cross-namespace cause");

    let narrow_got = until_progress(&mut narrow, &narrow_tx, last).await;
    let mut feed_notices = 0;
    for message in &narrow_got {
        match message {
            pb::watch_response::Response::Notices(b) => {
                for n in &b.notices {
                    assert!(n.key.starts_with("feed:"), "out of scope: {n:?}");
                    assert!(
                        n.cause.is_empty() || n.cause.starts_with("feed:"),
                        "a cause out of scope: {n:?}"
                    );
                    feed_notices += 1;
                }
            }
            pb::watch_response::Response::Reset(r) => {
                assert!(r.prefix.starts_with("feed:"), "reset out of scope: {r:?}")
            }
            pb::watch_response::Response::Progress(_)
            | pb::watch_response::Response::Started(_) => {}
            pb::watch_response::Response::Refused(r) => panic!("refused: {r:?}"),
        }
    }
    // feed:u1 depends on posts:1: the purge and the publish reached it.
    assert!(
        feed_notices >= 2,
        "the narrow stream got its own keys: {narrow_got:?}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn quotas_refuse_with_resource_exhausted_naming_the_quota() {
    let quotas = Quotas {
        connections: Some(2),
        streams: Some(1),
        tracked_keys: Some(3),
        publishes_per_second: Some(1),
        fanout_per_second: Some(10),
    };
    let server = start(vec![
        principal("limited", &[("*", ALL)], quotas),
        principal("root", &[("*", ALL)], Quotas::default()),
    ])
    .await;
    let refused = |e: &Status, quota: &str| {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            e.message().contains(&format!("quota {quota}")),
            "names {quota}: {}",
            e.message()
        );
    };

    // Streams and tracked keys.
    let mut c = as_principal(&server, "limited").await;
    let (_stream, tx) = watch(
        &mut c,
        pb::WatchStart {
            track: vec!["a:1".into(), "a:2".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let e = watch(&mut c, pb::WatchStart::default()).await.unwrap_err();
    refused(&e, "streams");
    tx.send(pb::WatchRequest {
        request: Some(pb::watch_request::Request::Track(pb::KeyList {
            keys: vec!["a:3".into(), "a:4".into()],
        })),
    })
    .await
    .unwrap();
    let mut stream = _stream;
    let e = loop {
        match stream.message().await {
            Err(e) => break e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("ended without an error"),
        }
    };
    refused(&e, "tracked_keys");
    // The refused stream is gone, and its keys with it: a new one fits.
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut c = c.clone();
            async move {
                watch(
                    &mut c,
                    pb::WatchStart {
                        track: vec!["a:1".into(), "a:2".into(), "a:3".into()],
                        ..Default::default()
                    },
                )
                .await
                .is_ok()
            }
        })
        .await,
        "the stream and its tracked keys were released"
    );

    // Publish rate: one change per second; two at once never fit.
    c.publish(publish_req(&["a:x"])).await.unwrap();
    let e = c.publish(publish_req(&["a:y", "a:z"])).await.unwrap_err();
    refused(&e, "publishes_per_second");

    // Fan-out: a publish that invalidates 50 keys runs the 10/s budget
    // into debt, and the next publish waits.
    let mut root = as_principal(&server, "root").await;
    for i in 0..50 {
        root.fill(fill_req(&format!("dep:{i}"), &["root:r"], 0))
            .await
            .unwrap();
    }
    let fanout = as_principal(&server, "limited").await;
    let mut fanout = fanout;
    // Wait for a publish token, then spend the fan-out budget.
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut c = fanout.clone();
            async move { c.publish(publish_req(&["root:r"])).await.is_ok() }
        })
        .await
    );
    let e = fanout.publish(publish_req(&["a:w"])).await.unwrap_err();
    assert!(
        e.message().contains("quota fanout_per_second")
            || e.message().contains("quota publishes_per_second"),
        "{e:?}"
    );
    assert_eq!(e.code(), Code::ResourceExhausted);
    let e = fanout
        .purge(pb::PurgeRequest {
            prefix: "dep:".into(),
            hard: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&e, "fanout_per_second");

    // Connections: this principal already uses two; a third is refused
    // until one closes.
    let mut third = as_principal(&server, "limited").await;
    let e = third
        .check(pb::CheckRequest {
            key: "a:1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&e, "connections");
    drop(c);
    drop(fanout);
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut c = third.clone();
            async move {
                c.check(pb::CheckRequest {
                    key: "a:1".into(),
                    ..Default::default()
                })
                .await
                .is_ok()
            }
        })
        .await,
        "a closed connection frees its slot"
    );
    // Root is not limited by another principal's quotas.
    root.publish(publish_req(&["a:1", "a:2", "a:3"]))
        .await
        .unwrap();

    let scrape = http_get(server.admin_addr.unwrap(), "/metrics").await.1;
    for quota in [
        "streams",
        "tracked_keys",
        "publishes_per_second",
        "fanout_per_second",
        "connections",
    ] {
        assert!(
            scrape.contains(&format!("freshd_quota_refusals_total{{quota=\"{quota}\"}}")),
            "{quota} is counted"
        );
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn one_principal_cannot_silence_another_clients_notices() {
    let server = start(vec![
        principal("a", &[("*", ALL)], Quotas::default()),
        principal("b", &[("*", ALL)], Quotas::default()),
    ])
    .await;
    let mut a = as_principal(&server, "a").await;
    let mut b = as_principal(&server, "b").await;
    let (mut stream, tx) = watch(
        &mut a,
        pb::WatchStart {
            client_id: "svc".into(),
            no_loop: true,
            track: vec!["k:1".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // B publishes under A's client id: A must still hear of it.
    let mut req = publish_req(&["k:1"]);
    req.client_id = "svc".into();
    let seq = b.publish(req).await.unwrap().into_inner().seq;
    let got = until_progress(&mut stream, &tx, seq).await;
    assert!(
        got.iter().any(|m| matches!(m, pb::watch_response::Response::Notices(n) if n.notices.iter().any(|n| n.key == "k:1"))),
        "{got:?}"
    );
    // A's own publish under its id is still suppressed (no-loop works).
    let mut req = publish_req(&["k:1"]);
    req.client_id = "svc".into();
    let seq = a.publish(req).await.unwrap().into_inner().seq;
    let got = until_progress(&mut stream, &tx, seq).await;
    assert!(
        !got.iter()
            .any(|m| matches!(m, pb::watch_response::Response::Notices(_))),
        "{got:?}"
    );
    server.stop().await.unwrap();
}

/// A CA and certificates it signs, written as PEM files.
struct Pki {
    dir: PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("freshd test CA {name}"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem()).unwrap();
        Self {
            dir: dir.to_owned(),
            ca,
        }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A leaf certificate and key, PEM.
    fn leaf(&self, names: &[&str], client: bool) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a server certificate for localhost into `server.pem` and
    /// `server.key`.
    fn write_server(&self) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf(&["localhost", "127.0.0.1"], false);
        let (c, k) = (self.dir.join("server.pem"), self.dir.join("server.key"));
        // Write the key first, then the certificate: a reload that reads
        // between the two sees a mismatch, fails, and retries next tick.
        std::fs::write(&k, key).unwrap();
        std::fs::write(&c, cert).unwrap();
        (c, k)
    }
}

async fn tls_client(
    server: &RunningServer,
    ca_pem: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", server.addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(channel)
}

async fn works(channel: Result<Channel, tonic::transport::Error>) -> Result<(), String> {
    let mut client = CoordinatorClient::new(channel.map_err(|e| format!("connect: {e:?}"))?);
    client
        .check(pb::CheckRequest {
            key: "a:b".into(),
            ..Default::default()
        })
        .await
        .map(drop)
        .map_err(|e| format!("check: {e:?}"))
}

#[tokio::test]
async fn tls_serves_verified_clients_and_refuses_plaintext() {
    let dir = temp_dir("server");
    let pki = Pki::new(&dir, "one");
    let (cert, key) = pki.write_server();
    let mut config = Config::ephemeral();
    config.tls = Some(TlsConfig {
        cert,
        key,
        client_ca: None,
        reload_interval: Duration::from_millis(100),
    });
    let server = RunningServer::start(config).await.unwrap();
    assert!(server.url().starts_with("https://"));
    works(tls_client(&server, &pki.ca_pem(), None).await)
        .await
        .unwrap();

    // A client that trusts another CA refuses the server.
    let stranger = Pki::new(&dir.join("stranger"), "stranger");
    assert!(works(tls_client(&server, &stranger.ca_pem(), None).await)
        .await
        .is_err());

    // Plaintext gRPC gets nowhere.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{}", server.addr.port()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(channel) = plain {
        let e = CoordinatorClient::new(channel)
            .check(pb::CheckRequest {
                key: "a:b".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_ne!(e.code(), Code::Ok);
    }

    // Reload: a new CA's certificate replaces the old without a restart.
    let next = Pki::new(&dir, "two");
    next.write_server();
    assert!(
        eventually(Duration::from_secs(20), || {
            let server = &server;
            let ca = next.ca_pem();
            async move { works(tls_client(server, &ca, None).await).await.is_ok() }
        })
        .await,
        "the new certificate is served"
    );
    assert!(
        works(tls_client(&server, &pki.ca_pem(), None).await)
            .await
            .is_err(),
        "the old one is not"
    );
    let scrape = http_get(server.admin_addr.unwrap(), "/metrics").await.1;
    assert!(
        scrape.contains("freshd_tls_reloads_total{result=\"ok\"}"),
        "{scrape}"
    );
    server.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_client_ca() {
    let dir = temp_dir("mtls");
    let pki = Pki::new(&dir, "one");
    let (cert, key) = pki.write_server();
    let clients = Pki::new(&dir, "clients");
    let ca_path = dir.join("clients-ca.pem");
    let mut config = Config::ephemeral();
    config.tls = Some(TlsConfig {
        cert,
        key,
        client_ca: Some(ca_path),
        reload_interval: Duration::from_secs(10),
    });
    // Tokens still apply over mutual TLS.
    config.auth = AuthConfig {
        principals: vec![principal("p", &[("*", ALL)], Quotas::default())],
        ..AuthConfig::default()
    };
    let server = RunningServer::start(config).await.unwrap();

    let good = clients.leaf(&["client.example"], true);
    let stranger = Pki::new(&dir.join("s"), "stranger").leaf(&["client.example"], true);

    let no_cert = works(tls_client(&server, &pki.ca_pem(), None).await).await;
    assert!(no_cert.is_err(), "no client certificate: {no_cert:?}");
    let wrong = works(tls_client(&server, &pki.ca_pem(), Some(&stranger)).await).await;
    assert!(wrong.is_err(), "a certificate from another CA: {wrong:?}");

    // The right certificate but no token: the handshake passes, the
    // request is UNAUTHENTICATED.
    let e = works(tls_client(&server, &pki.ca_pem(), Some(&good)).await)
        .await
        .unwrap_err();
    assert!(e.contains("Unauthenticated"), "{e}");
    let channel = tls_client(&server, &pki.ca_pem(), Some(&good))
        .await
        .unwrap();
    let mut c = CoordinatorClient::with_interceptor(
        channel,
        Bearer(Some(format!("Bearer {}", token_of("p")))),
    );
    c.check(pb::CheckRequest {
        key: "a:b".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    server.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

fn config_from(text: &str, args: freshd::config::Args) -> Result<Config, String> {
    let dir = temp_dir("config");
    let file = dir.join("freshd.toml");
    std::fs::write(&file, text).unwrap();
    let result = Config::from_args(freshd::config::Args {
        config: Some(file),
        ..args
    })
    .map_err(|e| e.to_string());
    std::fs::remove_dir_all(&dir).ok();
    result
}

#[test]
fn the_auth_table_configures_principals_scopes_and_quotas() {
    let hash = hash_token("fd_secret");
    let text = format!(
        r#"
[auth]
health = "open"
reflection = "token"
[auth.default_quotas]
streams = 8
publishes_per_second = 100

[[auth.principals]]
name = "feed-api"
token_sha256 = "{hash}"
expires = "2099-01-31T00:00:00Z"
scopes = {{ feed = ["check", "watch", "fill"], "*" = ["check"] }}
quotas = {{ streams = 2, fanout_per_second = "unlimited" }}
"#
    );
    let config = config_from(&text, Default::default()).unwrap();
    let auth = &config.auth;
    assert!(!auth.health_requires_token && auth.reflection_requires_token);
    let p = &auth.principals[0];
    assert_eq!(p.name, "feed-api");
    assert_eq!(p.token_sha256, parse_sha256(&hash).unwrap());
    assert!(p.expires.unwrap() > SystemTime::now());
    assert_eq!(p.quotas.streams, Some(2), "its own quota wins");
    assert_eq!(
        p.quotas.publishes_per_second,
        Some(100),
        "the default applies"
    );
    assert_eq!(p.quotas.fanout_per_second, None);
    let principal = freshd::auth::Principal::new(p);
    assert!(principal.allows_key(Scope::Watch, "feed:u:1"));
    assert!(principal.allows_key(Scope::Check, "posts:1"));
    assert!(!principal.allows_key(Scope::Watch, "posts:1"));

    // Mistakes name the setting.
    let cases = [
        (
            text.replace(&hash, "abc"),
            "auth.principals[0].token_sha256",
        ),
        (
            text.replace("\"fill\"", "\"write\""),
            "auth.principals[0].scopes.feed",
        ),
        (
            text.replace("feed =", "\"feed:x\" ="),
            "auth.principals[0].scopes.feed:x",
        ),
        (
            text.replace("streams = 2", "streams = -1"),
            "auth.principals[0].quotas.streams",
        ),
        (
            text.replace("health = \"open\"", "health = \"closed\""),
            "auth.health",
        ),
        (
            text.replace("2099-01-31T00:00:00Z", "next tuesday"),
            "auth.principals[0].expires",
        ),
        (
            format!("{text}\n[[auth.principals]]\nname = \"twin\"\ntoken_sha256 = \"{hash}\"\n"),
            "same token",
        ),
        (
            text.replace("[auth.default_quotas]", "[auth.defaults]"),
            "auth.defaults",
        ),
    ];
    for (bad, needle) in cases {
        let e = config_from(&bad, Default::default()).unwrap_err();
        assert!(e.contains(needle), "{needle}: {e}");
    }
}

#[test]
fn plaintext_off_loopback_and_half_tls_settings_are_refused() {
    let args = || freshd::config::Args {
        listen: Some("0.0.0.0:0".into()),
        ..Default::default()
    };
    let e = config_from("", args()).unwrap_err();
    assert!(
        e.contains("`listen`") && e.contains("allow_plaintext"),
        "{e}"
    );
    config_from("allow_plaintext = true\n", args()).unwrap();
    Config::from_args(freshd::config::Args {
        allow_plaintext: true,
        ..args()
    })
    .unwrap();
    let e = config_from("tls_cert = \"c.pem\"\n", Default::default()).unwrap_err();
    assert!(e.contains("`tls_key`"), "{e}");
    let e = config_from("tls_client_ca = \"ca.pem\"\n", Default::default()).unwrap_err();
    assert!(e.contains("`tls_client_ca`"), "{e}");
    let config = config_from(
        "listen = \"0.0.0.0:0\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\ntls_reload_interval = \"2s\"\n",
        Default::default(),
    )
    .unwrap();
    let tls = config.tls.unwrap();
    assert_eq!(tls.reload_interval, Duration::from_secs(2));
    assert_eq!(tls.client_ca, None);
}

#[test]
fn the_binary_makes_and_hashes_tokens_and_refuses_bad_certificates() {
    let out = freshd_command().arg("--new-token").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    let token = field("token:");
    let hash = field("token_sha256:");
    assert_eq!(hash_token(&token), hash);

    use std::io::Write;
    let mut child = freshd_command()
        .arg("--hash-token")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{token}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), hash);

    let out = freshd_command()
        .args([
            "--tls-cert",
            "/nonexistent/c.pem",
            "--tls-key",
            "/nonexistent/k.pem",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("tls_cert") && stderr.contains("/nonexistent/c.pem"),
        "{stderr}"
    );
}

/// One `[[auth.principals]]` entry, its token derived from its name.
fn principal_entry(name: &str, scopes: &str) -> String {
    format!(
        "[[auth.principals]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\nscopes = {scopes}\n\n",
        hash_token(&token_of(name))
    )
}

/// Publishes `key` as `writer` and returns the seq.
async fn publish_as(writer: &mut Authed, key: &str) -> u64 {
    writer
        .publish(publish_req(&[key]))
        .await
        .expect("published")
        .into_inner()
        .seq
}

/// A principal kept as it was carries on; one removed, or whose scopes
/// changed, loses its streams (UNAUTHENTICATED, saying why) and its old
/// token or scopes; one added works; a file that does not parse changes
/// nothing. All without a restart, from the `--config` file.
#[tokio::test]
async fn a_changed_config_file_reloads_the_principals_without_a_restart() {
    let dir = temp_dir("auth-reload");
    let file = dir.join("freshd.toml");
    let write = |text: &str| {
        // As a configuration manager replaces a file: whole, at once.
        let next = dir.join("next.toml");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &file).unwrap();
    };
    let everything = r#"{ "*" = ["check", "watch", "fill", "publish", "purge", "admin"] }"#;
    let watch_a = r#"{ a = ["watch"] }"#;
    let watch_b = r#"{ b = ["watch"] }"#;
    write(&format!(
        "{}{}{}",
        principal_entry("stays", everything),
        principal_entry("leaves", watch_a),
        principal_entry("narrows", watch_a),
    ));
    let config = Config::from_args(freshd::config::Args {
        config: Some(file.clone()),
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        auth_reload_interval: Some("50ms".into()),
        ..Default::default()
    })
    .unwrap();
    let server = RunningServer::start(config).await.expect("starts");
    let track_a1 = || pb::WatchStart {
        track: vec!["a:1".into()],
        ..Default::default()
    };
    let mut stays = as_principal(&server, "stays").await;
    let (mut stays_stream, stays_tx) = watch(&mut stays, track_a1()).await.unwrap();
    let mut leaves = as_principal(&server, "leaves").await;
    let (mut leaves_stream, _leaves_tx) = watch(&mut leaves, track_a1()).await.unwrap();
    let mut narrows = as_principal(&server, "narrows").await;
    let (mut narrows_stream, _narrows_tx) = watch(&mut narrows, track_a1()).await.unwrap();
    let seq = publish_as(&mut stays, "a:1").await;
    for stream in [&mut stays_stream, &mut leaves_stream, &mut narrows_stream] {
        let m = stream.message().await.unwrap().unwrap();
        assert!(matches!(m.response, Some(Out::Notices(_))), "{m:?}");
    }

    write(&format!(
        "{}{}{}",
        principal_entry("stays", everything),
        principal_entry("narrows", watch_b),
        principal_entry("joins", everything),
    ));
    let mut joins = as_principal(&server, "joins").await;
    assert!(
        eventually(Duration::from_secs(20), || {
            let mut joins = joins.clone();
            async move { joins.stats(pb::StatsRequest {}).await.is_ok() }
        })
        .await,
        "the added principal's token works after the reload"
    );
    for stream in [&mut leaves_stream, &mut narrows_stream] {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the stream ends")
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(
            e.message().contains("configuration reload"),
            "{}",
            e.message()
        );
    }
    let e = leaves
        .check(pb::CheckRequest {
            key: "a:1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // The narrowed principal's new scopes apply to its new streams.
    let e = watch(&mut narrows, track_a1()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let (mut b_stream, _b_tx) = watch(
        &mut narrows,
        pb::WatchStart {
            track: vec!["b:1".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let seq_b = publish_as(&mut joins, "b:1").await;
    let m = b_stream.message().await.unwrap().unwrap();
    assert!(
        matches!(&m.response, Some(Out::Notices(n)) if n.notices[0].seq == seq_b),
        "{m:?}"
    );
    // The unchanged principal's stream went on, without a gap.
    let seq_2 = publish_as(&mut joins, "a:1").await;
    let got = until_progress(&mut stays_stream, &stays_tx, seq_2).await;
    let seqs: Vec<u64> = got
        .iter()
        .filter_map(|m| match m {
            Out::Notices(n) => Some(n.notices.iter().map(|n| n.seq)),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(seqs, vec![seq_2], "after {seq}");

    // A file that does not parse is refused and counted; the principals
    // stay as they are.
    write("[[auth.principals]]\nname = \"broken\"\n");
    let admin = server.admin_addr.unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async move {
            http_get(admin, "/metrics")
                .await
                .1
                .contains("freshd_auth_reloads_total{result=\"error\"} 1")
        })
        .await,
        "the refused reload is counted"
    );
    let scrape = http_get(admin, "/metrics").await.1;
    assert!(
        scrape.contains("freshd_auth_reloads_total{result=\"ok\"} 1"),
        "{scrape}"
    );
    assert!(
        scrape.contains("freshd_auth_refusals_total{reason=\"revoked\"} 2"),
        "{scrape}"
    );
    joins.stats(pb::StatsRequest {}).await.unwrap();
    stays.stats(pb::StatsRequest {}).await.unwrap();
    server.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// SIGHUP checks the `--config` file at once (here the interval is an
/// hour), and does not stop the server.
#[tokio::test]
async fn sighup_reloads_the_principals_at_once() {
    use std::io::BufRead;
    let dir = temp_dir("auth-sighup");
    let file = dir.join("freshd.toml");
    let everything = r#"{ "*" = ["check", "watch", "fill", "publish", "purge", "admin"] }"#;
    std::fs::write(&file, principal_entry("first", everything)).unwrap();
    let mut child = freshd_command()
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "off"])
        .args(["--log-format", "json", "--auth-reload-interval", "1h"])
        .arg("--config")
        .arg(&file)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // A server that never logs the reload is killed, which ends its log:
    // the test then fails instead of waiting for ever.
    let (done, watchdog) = std::sync::mpsc::channel::<()>();
    let pid = child.id().to_string();
    std::thread::spawn(move || {
        if watchdog.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .status();
        }
    });
    let serving = crate::harness::log_line(&mut lines, "freshd serving");
    let addr = serving
        .split("\"addr\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the address in the serving line")
        .to_owned();
    std::fs::write(
        &file,
        format!(
            "{}{}",
            principal_entry("first", everything),
            principal_entry("second", everything)
        ),
    )
    .unwrap();
    let hangup = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hangup.success());
    let reloaded = crate::harness::log_line(&mut lines, "reloaded the principals");
    assert!(reloaded.contains("\"added\":1"), "{reloaded}");
    // Still serving, and the new token works.
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut second = CoordinatorClient::with_interceptor(
        channel,
        Bearer(Some(format!("Bearer {}", token_of("second")))),
    );
    second.stats(pb::StatsRequest {}).await.unwrap();
    assert!(child.try_wait().unwrap().is_none(), "still running");
    done.send(()).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
