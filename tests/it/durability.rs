//! Durability under --data-dir, with real server processes: a crash loop of
//! SIGKILLs during concurrent publishes loses nothing acknowledged under
//! fsync=always, versions never go back, and watchers resume without a
//! reset; a corrupt log stops startup with the file and offset, unless
//! --repair.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use freshd::pb::{self, coordinator_client::CoordinatorClient};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::harness::temp_dir;

/// Starts `freshd --data-dir dir` and returns it with its gRPC address.
fn spawn(dir: &Path, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_freshd"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--log-format",
            "json",
        ])
        .args(["--change-retention", "1h", "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut before = Vec::new();
    let line = lines.by_ref().map_while(Result::ok).find(|l| {
        before.push(l.clone());
        l.contains("freshd serving")
    });
    let Some(line) = line else {
        // Say why: the log so far, the exit status and standard error.
        let status = child.wait();
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        panic!(
            "no serving log line; exit {status:?}\nlog:\n{}\nstderr:\n{stderr}",
            before.join("\n")
        );
    };
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    let addr = line
        .split("\"addr\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned();
    (child, format!("http://{addr}"))
}

/// Starts `freshd --data-dir dir`, expects it to refuse, and returns what it
/// printed.
fn failed_start(dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_freshd"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--data-dir",
        ])
        .arg(dir)
        .output()
        .unwrap();
    assert!(!out.status.success(), "freshd started on a broken data dir");
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

fn kill9(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

async fn client(url: &str) -> CoordinatorClient<Channel> {
    CoordinatorClient::connect(url.to_owned()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_loses_nothing_acknowledged() {
    let dir = temp_dir("crash-loop");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Every publish acknowledged, with its seq.
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let mut epoch = None;
    let mut token: Option<pb::ResumeToken> = None;
    let mut hot_version = 0;
    for round in 0..20 {
        // Tiny segments and snapshots: compaction runs every round or two.
        let (mut child, url) = spawn(
            &dir,
            &[
                "--fsync",
                "always",
                "--wal-segment-bytes",
                "4096",
                "--snapshot-bytes",
                "16384",
            ],
        );
        let mut c = client(&url).await;

        // Everything acknowledged before the crash is there, with its seq.
        let known: Vec<(String, u64)> = acked.lock().iter().map(|(k, v)| (k.clone(), *v)).collect();
        for chunk in known.chunks(5_000) {
            let out = c
                .check_batch(pb::CheckBatchRequest {
                    items: chunk
                        .iter()
                        .map(|(k, _)| pb::CheckItem {
                            key: k.clone(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                *epoch.get_or_insert(out.epoch),
                out.epoch,
                "the epoch survives"
            );
            for ((key, seq), r) in chunk.iter().zip(&out.results) {
                assert_eq!(r.version, *seq, "round {round}: {key} lost or changed");
            }
        }
        // The watcher resumes with its token, without a reset.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::WatchRequest {
            request: Some(pb::watch_request::Request::Start(pb::WatchStart {
                client_id: "watcher".into(),
                track: vec!["hot".into()],
                resume: token,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut watch = c
            .clone()
            .watch(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        tx.send(pb::WatchRequest {
            request: Some(pb::watch_request::Request::Progress(pb::ProgressRequest {})),
        })
        .await
        .unwrap();
        loop {
            match watch.message().await.unwrap().unwrap().response.unwrap() {
                pb::watch_response::Response::Started(s) => {
                    assert_eq!(Some(s.epoch), epoch.or(Some(s.epoch)));
                }
                pb::watch_response::Response::Notices(b) => {
                    for n in b.notices {
                        assert!(n.version >= hot_version, "versions never go back");
                        hot_version = n.version;
                    }
                }
                pb::watch_response::Response::Reset(r) => panic!("round {round}: a reset {r:?}"),
                pb::watch_response::Response::Refused(r) => panic!("round {round}: {r:?}"),
                pb::watch_response::Response::Progress(p) => {
                    token = Some(pb::ResumeToken {
                        epoch: p.epoch,
                        seq: p.seq,
                    });
                    break;
                }
            }
        }
        drop(watch);

        // Publish from four clients until the process is killed.
        let mut tasks = Vec::new();
        for task in 0..4 {
            let mut c = client(&url).await;
            let acked = acked.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0.. {
                    let key = format!("k:{round}:{task}:{n}");
                    let keys = if n % 10 == 0 {
                        vec![key.clone(), "hot".into()]
                    } else {
                        vec![key.clone()]
                    };
                    let req = pb::PublishRequest {
                        changes: keys
                            .into_iter()
                            .map(|k| pb::Change {
                                key: k,
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    };
                    match c.publish(req).await {
                        Ok(r) => {
                            acked.lock().insert(key, r.into_inner().seq);
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        // Enough writes every round for compaction to have work, however
        // slow the machine, then a crash at a random moment.
        let before = acked.lock().len();
        while acked.lock().len() < before + 100 && tasks.iter().any(|t| !t.is_finished()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(30..200))).await;
        kill9(&mut child);
        for t in tasks {
            t.await.unwrap();
        }
    }
    assert!(
        acked.lock().len() > 100,
        "the loop published: {}",
        acked.lock().len()
    );
    // Disk use stays bounded: one snapshot or two, and a few segments.
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let snapshots = files.iter().filter(|f| f.starts_with("snapshot-")).count();
    let segments = files.iter().filter(|f| f.starts_with("wal-")).count();
    assert!((1..=2).contains(&snapshots), "{files:?}");
    assert!(segments < 20, "{segments} segments: {files:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_missing_snapshot_stops_startup() {
    let dir = temp_dir("missing-snapshot");
    let (mut child, url) = spawn(
        &dir,
        &["--wal-segment-bytes", "4096", "--snapshot-bytes", "4096"],
    );
    let mut c = client(&url).await;
    for i in 0..400 {
        c.publish(pb::PublishRequest {
            changes: vec![pb::Change {
                key: format!("key-with-a-longish-name:{i}"),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let snapshot = || {
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "snap"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while snapshot().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot was written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill9(&mut child);
    // A restart loads it; without it the log has a hole.
    let (mut child, url) = spawn(&dir, &[]);
    let stats = client(&url)
        .await
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.keys, 400);
    kill9(&mut child);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "snap") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let text = failed_start(&dir);
    assert!(text.contains("no snapshot covers"), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_corrupt_log_stops_startup_unless_repaired() {
    let dir = temp_dir("corrupt");
    {
        let (mut child, url) = spawn(&dir, &["--fsync", "always"]);
        let mut c = client(&url).await;
        for i in 0..20 {
            c.publish(pb::PublishRequest {
                changes: vec![pb::Change {
                    key: format!("k{i}"),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        }
        kill9(&mut child);
    }
    let segment = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .unwrap();

    // A torn tail (the last record cut short) is dropped: the server starts.
    let len = std::fs::metadata(&segment).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(len - 2)
        .unwrap();
    let (mut child, url) = spawn(&dir, &[]);
    let stats = client(&url)
        .await
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stats.keys, 19,
        "the torn last publish is gone, the rest is there"
    );
    kill9(&mut child);

    // A flipped byte in the middle: startup stops, naming the file and offset.
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&segment, &bytes).unwrap();
    let text = failed_start(&dir);
    let name = segment.file_name().unwrap().to_str().unwrap();
    assert!(text.contains(name) && text.contains("offset"), "{text}");
    assert!(text.contains("--repair"), "{text}");

    // --repair truncates there and starts.
    let (mut child, url) = spawn(&dir, &["--repair"]);
    let stats = client(&url)
        .await
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(stats.keys < 19 && stats.keys > 0, "{}", stats.keys);
    kill9(&mut child);
    std::fs::remove_dir_all(&dir).ok();
}

/// The history is saved in one snapshot record, which holds at most 256 MiB:
/// a history budget that could outgrow it is refused at start, not found at
/// the next restart.
#[test]
fn a_history_budget_a_snapshot_cannot_hold_is_refused() {
    let with = |bytes: u64| {
        freshd::config::Config::from_args(freshd::config::Args {
            history_bytes: Some(bytes.to_string()),
            ..Default::default()
        })
    };
    let max = freshd::config::MAX_HISTORY_BYTES;
    assert_eq!(with(max).unwrap().store.hub.history_bytes as u64, max);
    let e = with(max + 1).unwrap_err();
    assert_eq!(e.setting, "history_bytes", "{e}");
    assert!(e.to_string().contains(&max.to_string()), "{e}");
}
