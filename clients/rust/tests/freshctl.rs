//! The built `freshctl` binary against a real server: JSON output, plain
//! output, exit codes, and a live watch.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const FRESHCTL: &str = env!("CARGO_BIN_EXE_freshctl");

/// Runs freshctl with `args` (off the async runtime's threads).
async fn freshctl(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(FRESHCTL)
            .args(&args)
            .env_remove("FRESHD_ADDR")
            .env_remove("FRESHD_TOKEN")
            .env("NO_COLOR", "1")
            .output()
            .expect("freshctl runs")
    })
    .await
    .unwrap()
}

/// Runs `freshctl --addr URL --json ARGS`, expects success and one JSON
/// object per line.
async fn json(url: &str, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--addr", url, "--json"];
    all.extend_from_slice(args);
    let out = freshctl(&all).await;
    assert!(
        out.status.success(),
        "freshctl {args:?}: {:?}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

async fn one(url: &str, args: &[&str]) -> Value {
    let mut lines = json(url, args).await;
    assert_eq!(lines.len(), 1, "one JSON object for {args:?}: {lines:?}");
    lines.pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_fill_check_inspect_and_stats_as_json() {
    let server = common::start().await;
    let url = server.url();

    let fill = one(
        &url,
        &[
            "fill",
            "feed:1",
            "--dep",
            "posts:1",
            "--dep",
            "follows:1",
            "--ttl",
            "60s",
        ],
    )
    .await;
    let version = fill["version"].as_u64().unwrap();
    assert!(version > 0);
    assert_eq!(fill["ttl_ms"], 60_000);
    assert_eq!(fill["epoch"], server.store.epoch());

    let check = one(
        &url,
        &[
            "check",
            "feed:1",
            "--version",
            &version.to_string(),
            "--age",
            "2s",
        ],
    )
    .await;
    assert_eq!(check["freshness"], "FRESH");
    assert_eq!(check["decision"], "FRESH");

    let published = one(&url, &["publish", "posts:1", "--critical"]).await;
    let seq = published["seq"].as_u64().unwrap();
    assert_eq!(published["results"][0]["invalidated"], 2);
    assert_eq!(published["results"][0]["duplicate"], false);

    let check = one(
        &url,
        &["check", "feed:1", "--version", &version.to_string()],
    )
    .await;
    assert_eq!(check["freshness"], "STALE");
    assert_eq!(check["decision"], "REFETCH");
    assert_eq!(check["critical"], true);
    assert_eq!(check["version"], seq);

    let inspect = one(&url, &["inspect", "feed:1"]).await;
    assert_eq!(inspect["key"], "feed:1");
    assert_eq!(inspect["version"], seq);
    assert_eq!(inspect["last_change_seq"], seq);
    assert_eq!(
        inspect["dependencies"],
        serde_json::json!(["follows:1", "posts:1"])
    );
    assert_eq!(inspect["registered"], true);
    assert_eq!(inspect["critical"], true);

    let dup = one(&url, &["publish", "orders:1", "--external-version", "5"]).await;
    assert_eq!(dup["results"][0]["duplicate"], false);
    let dup = one(&url, &["publish", "orders:1", "--external-version", "5"]).await;
    assert_eq!(dup["results"][0]["duplicate"], true);

    let stats = one(&url, &["stats"]).await;
    assert_eq!(stats["keys"], 4);
    assert_eq!(stats["edges"], 2);
    assert_eq!(stats["seq"], seq + 1);
    assert_eq!(stats["epoch"], server.store.epoch());

    // A purge without --yes is a dry run.
    let purge = one(&url, &["purge", "feed:", "--hard"]).await;
    assert_eq!(purge["matched"], 1);
    assert_eq!(purge["applied"], false);

    let set = one(
        &url,
        &[
            "policy",
            "set",
            "feed",
            "--max-age",
            "5s",
            "--revalidate-after",
            "2s",
        ],
    )
    .await;
    assert_eq!(set["namespace"], "feed");
    assert_eq!(set["policy"]["max_age_ms"], 5000);
    let list = json(&url, &["policy", "list"]).await;
    assert_eq!(list.len(), 2, "the default, then feed: {list:?}");
    assert_eq!(list[0]["is_default"], true);
    assert_eq!(list[1]["namespace"], "feed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_output_and_exit_codes() {
    let server = common::start().await;
    let url = server.url();

    let out = freshctl(&["--addr", &url, "check", "feed:1"]).await;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("UNKNOWN"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "no colour when stdout is not a terminal: {text:?}"
    );

    // The server refuses: exit 1, the server's message.
    let out = freshctl(&["--addr", &url, "inspect", "nothing"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("freshd holds nothing for key"));
    let out = freshctl(&["--addr", &url, "--json", "inspect", "nothing"]).await;
    assert_eq!(out.status.code(), Some(1));
    let error: Value = serde_json::from_slice(&out.stderr).expect("a JSON error");
    assert_eq!(error["error"]["code"], "NOT_FOUND");

    // Usage: exit 2.
    let out = freshctl(&["--addr", &url, "check"]).await;
    assert_eq!(out.status.code(), Some(2));
    let out = freshctl(&["--addr", &url, "watch", "--resume", "nonsense"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("EPOCH:SEQ"));

    // Nobody listening: exit 3, and what to do.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = freshctl(&["--addr", &format!("http://{closed}"), "stats"]).await;
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is freshd running?"), "{stderr}");
    assert!(
        stderr.contains("cargo run --release --bin freshd"),
        "{stderr}"
    );

    // The address also comes from FRESHD_ADDR, host:port is enough.
    let addr = server.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(FRESHCTL)
            .args(["--json", "stats"])
            .env("FRESHD_ADDR", addr)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_tails_notices_as_json_lines() {
    let server = common::start().await;
    let url = server.url();
    one(&url, &["fill", "feed:1", "--dep", "posts:1"]).await;

    let mut child = Command::new(FRESHCTL)
        .args([
            "--addr", &url, "--json", "watch", "--track", "feed:1", "--prefix", "users:",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("freshctl watch starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx
                .send(serde_json::from_str(&line).expect("JSON lines"))
                .is_err()
            {
                break;
            }
        }
    });
    let next = |lines: &mpsc::Receiver<Value>| {
        lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a line within 10 s")
    };
    let started = next(&lines);
    assert_eq!(started["started"]["outcome"], "NEW");

    let publish = one(&url, &["publish", "posts:1", "users:7", "other:1"]).await;
    let seq = publish["seq"].as_u64().unwrap();
    let mut keys = Vec::new();
    while keys.len() < 2 {
        let line = next(&lines);
        if let Some(notice) = line.get("notice") {
            assert_eq!(notice["seq"], seq);
            keys.push(notice["key"].as_str().unwrap().to_owned());
        }
    }
    keys.sort();
    assert_eq!(keys, ["feed:1", "users:7"]);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_the_environment_and_a_ca_reach_a_tls_server() {
    use common::security::{principals, start, temp_dir, token_of, Pki};

    let dir = temp_dir("freshctl");
    let pki = Pki::new("servers");
    let server = start(principals(), Some(pki.server_tls(&dir, None))).await;
    let ca = pki.write_ca(&dir, "ca.pem");
    let ca = ca.to_str().unwrap().to_owned();
    let url = server.url();
    let run = |token: Option<String>, args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let mut command = Command::new(FRESHCTL);
            command
                .args(&args)
                .env_remove("FRESHD_ADDR")
                .env_remove("FRESHD_TOKEN")
                .env("NO_COLOR", "1");
            if let Some(token) = token {
                command.env("FRESHD_TOKEN", token);
            }
            command.output().expect("freshctl runs")
        })
    };
    let args = |extra: &[&str]| {
        let mut all = vec![
            "--addr".to_owned(),
            url.clone(),
            "--tls-ca".into(),
            ca.clone(),
        ];
        all.extend(extra.iter().map(|a| a.to_string()));
        all
    };

    let out = run(
        Some(token_of("admin")),
        args(&["--json", "publish", "feed:1"]),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let published: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(published["seq"].as_u64().unwrap() > 0);

    // host:port with --tls-ca is TLS; --tls-domain names the certificate.
    let out = run(
        Some(token_of("admin")),
        vec![
            "--addr".into(),
            server.addr.to_string(),
            "--tls-ca".into(),
            ca.clone(),
            "--tls-domain".into(),
            "localhost".into(),
            "stats".into(),
        ],
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No token: exit 4, and where to put one.
    let out = run(None, args(&["check", "feed:1"])).await.unwrap();
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("FRESHD_TOKEN"), "{stderr}");
    // Out of scope: exit 4, the server's message, as JSON too.
    let out = run(
        Some(token_of("feed")),
        args(&["--json", "publish", "feed:1"]),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let error: Value = serde_json::from_slice(&out.stderr).expect("a JSON error");
    assert_eq!(error["error"]["code"], "PERMISSION_DENIED");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("publish"),
        "{error}"
    );
    // The token given on the command line works too.
    let out = run(
        None,
        args(&["--token", &token_of("feed"), "check", "feed:1"]),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A CA that does not sign the server's certificate: exit 3.
    let stranger = Pki::new("stranger").write_ca(&dir, "stranger.pem");
    let out = run(
        Some(token_of("admin")),
        vec![
            "--addr".into(),
            url.clone(),
            "--tls-ca".into(),
            stranger.to_str().unwrap().into(),
            "stats".into(),
        ],
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-ca"));
    // An unreadable CA file, or --tls-cert without --tls-key: exit 2.
    let out = run(
        Some(token_of("admin")),
        vec![
            "--addr".into(),
            url.clone(),
            "--tls-ca".into(),
            "/nonexistent/ca.pem".into(),
            "stats".into(),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ca.pem"));
    let out = run(None, args(&["--tls-cert", &ca, "stats"]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    server.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
