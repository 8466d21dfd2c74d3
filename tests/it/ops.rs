//! Operations: health, reflection, configuration errors, signals.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use freshd::config::Config;
use freshd::server::RunningServer;
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::harness::{channel, freshd_command, start, temp_dir};

#[tokio::test]
async fn health_serves_then_reports_not_serving_at_shutdown() {
    let server = RunningServer::start(Config::ephemeral()).await.unwrap();
    let mut health = HealthClient::new(channel(&server).await);
    for service in ["", "freshd.v1.Coordinator"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "freshd.v1.Coordinator".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let stopping = tokio::spawn(server.stop());
    let next = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a status update before the stream ends");
    assert_eq!(next.unwrap().unwrap().status(), ServingStatus::NotServing);
    drop(watch);
    stopping.await.unwrap().unwrap();
}

/// The services reflection `$version` lists (`v1`, or `v1alpha`, which
/// grpcurl and older tools still ask: the same messages in another package).
macro_rules! reflected_services {
    ($version:ident, $channel:expr) => {{
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::$version::ServerReflectionRequest;

        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = ServerReflectionClient::new($channel)
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("unexpected reflection answer {response:?}");
        };
        list.service
            .into_iter()
            .map(|s| s.name)
            .collect::<Vec<String>>()
    }};
}

#[tokio::test]
async fn reflection_lists_the_services_in_v1_and_v1alpha() {
    let t = start().await;
    let v1 = reflected_services!(v1, channel(&t.server).await);
    let v1alpha = reflected_services!(v1alpha, channel(&t.server).await);
    for (version, names) in [("v1", v1), ("v1alpha", v1alpha)] {
        for want in ["freshd.v1.Coordinator", "grpc.health.v1.Health"] {
            assert!(
                names.iter().any(|n| n == want),
                "{version}: {want} missing from {names:?}"
            );
        }
    }
}

#[test]
fn bad_configuration_exits_64_naming_the_setting() {
    // (flags, environment, what the message must name)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--shards", "3"], vec![], "`shards`"),
        (
            vec![],
            vec![("FRESHD_MAX_KEY_BYTES", "lots")],
            "`max_key_bytes`",
        ),
        (vec!["--default-ttl", "5 parsecs"], vec![], "`default_ttl`"),
        (vec!["--log-format", "xml"], vec![], "`log_format`"),
        (
            vec!["--max-concurrent-streams", "0"],
            vec![],
            "`max_concurrent_streams`",
        ),
        (
            vec![],
            vec![("FRESHD_CONNECTION_SEND_BUFFER_BYTES", "1000")],
            "`connection_send_buffer_bytes`",
        ),
        (vec!["--no-such-flag"], vec![], "--no-such-flag"),
    ];
    for (args, envs, needle) in cases {
        let out = freshd_command()
            .args(&args)
            .envs(envs.clone())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?} {envs:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let dir = temp_dir("config");
    let file = dir.join("freshd.toml");
    std::fs::write(&file, "shards = 64\nmax_keybytes = 10\n").unwrap();
    let out = freshd_command()
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("unknown setting `max_keybytes`"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sigterm_drains_and_exits_cleanly() {
    let mut child = freshd_command()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let serving = crate::harness::log_line(&mut lines, "freshd serving");
    assert!(serving.contains("\"addr\":\"127.0.0.1:"), "{serving}");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let code = child.wait().unwrap();
    assert!(code.success(), "exit {code:?}");
    assert!(
        rest.iter().any(|l| l.contains("SIGTERM received")),
        "{rest:?}"
    );
    assert!(
        rest.iter().any(|l| l.contains("freshd stopped")),
        "{rest:?}"
    );
}

#[test]
fn tcp_keepalive_is_read_and_checked() {
    let read = |value: &str| {
        Config::from_args(freshd::config::Args {
            tcp_keepalive: Some(value.into()),
            ..Default::default()
        })
    };
    assert_eq!(
        read("5m").unwrap().tcp_keepalive,
        Some(Duration::from_secs(300))
    );
    assert_eq!(read("0s").unwrap().tcp_keepalive, None, "0 turns it off");
    let e = read("500ms").unwrap_err();
    assert_eq!(e.setting, "tcp_keepalive", "{e}");
    assert!(e.to_string().contains("at least 1s"), "{e}");
    assert_eq!(
        Config::ephemeral().tcp_keepalive,
        Some(Duration::from_secs(300)),
        "the default"
    );
}
