//! The Watch stream against a real server: filtering, no-loop, resume inside
//! and past the history, new epochs, slow consumers, shutdown.

use std::collections::HashMap;
use std::time::Duration;

use freshd::config::Config;
use freshd::pb::coordinator_client::CoordinatorClient;
use freshd::pb::{self, watch_request::Request as In, watch_response::Response as Out};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

use crate::harness::{connect, eventually, fill_req, publish_req, start, start_with, TestServer};

/// A test-side Watch stream.
struct Watcher {
    tx: mpsc::Sender<pb::WatchRequest>,
    rx: Streaming<pb::WatchResponse>,
}

fn request(r: In) -> pb::WatchRequest {
    pb::WatchRequest { request: Some(r) }
}

impl Watcher {
    async fn open(t: &TestServer, start: pb::WatchStart) -> (Self, pb::WatchStarted) {
        Self::open_on(&mut connect(&t.server).await, start).await
    }

    /// Opens the stream on `client`'s connection, which other streams may
    /// share.
    async fn open_on(
        client: &mut CoordinatorClient<Channel>,
        start: pb::WatchStart,
    ) -> (Self, pb::WatchStarted) {
        let (tx, rx) = mpsc::channel(64);
        tx.send(request(In::Start(start))).await.unwrap();
        let mut rx = client
            .watch(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let first = rx.message().await.unwrap().unwrap();
        let Some(Out::Started(started)) = first.response else {
            panic!("expected started, got {first:?}");
        };
        (Self { tx, rx }, started)
    }

    async fn send(&self, r: In) {
        self.tx.send(request(r)).await.unwrap();
    }

    /// Reads until `count` notices have come, asking for nothing: what
    /// the server sends on its own.
    async fn notices(&mut self, count: usize) -> Vec<pb::Notice> {
        let mut notices = Vec::new();
        while notices.len() < count {
            let m = tokio::time::timeout(Duration::from_secs(20), self.rx.message())
                .await
                .expect("the notices in time, unasked")
                .unwrap()
                .unwrap();
            match m.response.unwrap() {
                Out::Notices(b) => notices.extend(b.notices),
                other => panic!("unexpected {other:?}"),
            }
        }
        notices
    }

    /// Asks for progress and collects everything before it.
    async fn until_progress(&mut self) -> (Vec<pb::Notice>, Vec<pb::Reset>, u64) {
        self.send(In::Progress(pb::ProgressRequest {})).await;
        let (mut notices, mut resets) = (Vec::new(), Vec::new());
        loop {
            let m = tokio::time::timeout(Duration::from_secs(20), self.rx.message())
                .await
                .expect("progress in time")
                .unwrap()
                .unwrap();
            match m.response.unwrap() {
                Out::Notices(b) => notices.extend(b.notices),
                Out::Reset(r) => resets.push(r),
                Out::Progress(p) => return (notices, resets, p.seq),
                Out::Started(s) => panic!("unexpected {s:?}"),
                Out::Refused(r) => panic!("unexpected {r:?}"),
            }
        }
    }
}

fn start_msg(client_id: &str, track: &[&str], prefixes: &[&str]) -> pb::WatchStart {
    pb::WatchStart {
        client_id: client_id.into(),
        no_loop: false,
        resume: None,
        track: track.iter().map(|k| k.to_string()).collect(),
        subscribe: prefixes.iter().map(|k| k.to_string()).collect(),
        refusals_in_band: false,
    }
}

fn keys(notices: &[pb::Notice]) -> Vec<(String, u64)> {
    notices.iter().map(|n| (n.key.clone(), n.seq)).collect()
}

#[tokio::test]
async fn tracked_keys_and_prefixes_get_only_what_matches() {
    let mut t = start().await;
    t.client
        .fill(fill_req("feed:1", &["posts:1"], 0))
        .await
        .unwrap();
    let (mut tracker, started) = Watcher::open(&t, start_msg("a", &["feed:1"], &[])).await;
    assert_eq!(started.outcome(), pb::ResumeOutcome::New);
    let (mut broadcast, _) = Watcher::open(&t, start_msg("b", &[], &["posts:"])).await;
    let (mut other, _) = Watcher::open(&t, start_msg("c", &["feed:2"], &["users:"])).await;

    let p = t
        .client
        .publish(publish_req(&["posts:1"]))
        .await
        .unwrap()
        .into_inner();
    let (n, _, seq) = tracker.until_progress().await;
    assert_eq!(keys(&n), vec![("feed:1".to_owned(), p.seq)]);
    assert_eq!(n[0].cause, "posts:1");
    assert_eq!(n[0].version, p.seq);
    assert!(seq >= p.seq);
    let (n, _, _) = broadcast.until_progress().await;
    assert_eq!(keys(&n), vec![("posts:1".to_owned(), p.seq)]);
    let (n, resets, _) = other.until_progress().await;
    assert!(
        n.is_empty() && resets.is_empty(),
        "nothing for non-matching streams: {n:?}"
    );

    // Untrack: no more notices.
    tracker
        .send(In::Untrack(pb::KeyList {
            keys: vec!["feed:1".into()],
        }))
        .await;
    tracker.until_progress().await;
    t.client.publish(publish_req(&["posts:1"])).await.unwrap();
    let (n, _, _) = tracker.until_progress().await;
    assert!(n.is_empty(), "{n:?}");
}

/// Streams that share one connection (one gRPC channel) each get every
/// notice once, in order, unasked: a publish writes their notices together
/// and sends the connection once. (`watch_coalesce` 0: every publish
/// writes the parked streams itself, none leaves them to the driver.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_sharing_a_connection_each_get_every_notice() {
    let mut config = Config::ephemeral();
    config.store.hub.coalesce = Duration::ZERO;
    let mut t = start_with(config).await;
    let mut shared = connect(&t.server).await;
    let mut watchers = Vec::new();
    for i in 0..5 {
        let (w, _) = Watcher::open_on(&mut shared, start_msg(&format!("s{i}"), &[], &["s:"])).await;
        watchers.push(w);
    }
    let mut seqs = Vec::new();
    for round in 0..50 {
        let key = format!("s:{round}");
        let p = t.client.publish(publish_req(&[&key])).await.unwrap();
        seqs.push((key, p.into_inner().seq));
    }
    // Sent by the publishes, not on the readers' asking.
    for w in &mut watchers {
        assert_eq!(keys(&w.notices(seqs.len()).await), seqs);
    }
    for w in &mut watchers {
        let (n, resets, _) = w.until_progress().await;
        assert!(
            n.is_empty() && resets.is_empty(),
            "nothing more: {n:?} {resets:?}"
        );
    }
}

/// Four publishers at full speed, every key published once, to 30 streams
/// that watch them all: 10 on each of two shared connections and 10 on
/// connections of their own, read as the notices come (or, `late`, only
/// once the publishers are done, with 16 KiB stream windows and 4 KiB
/// allowed to wait for them: the windows fill, then what may wait, then
/// the queues). Whichever path
/// writes a notice (the publish itself, a connection's driver when
/// publishes come back to back, a stream's own task when its window or its
/// connection's is full, or a catch-up from the history after its queue of
/// `queue_notices` overflowed), every stream gets every notice exactly
/// once, in seq order, and nothing after. Returns the overflows the
/// streams had.
async fn every_stream_gets_every_notice_once_in_seq_order(queue_notices: usize, late: bool) -> u64 {
    const PUBLISHERS: usize = 4;
    const EACH: usize = 500;
    let mut config = Config::ephemeral();
    config.store.hub.queue_notices = queue_notices;
    if late {
        config.connections.stream_buffer = 4 * 1024;
    }
    let t = start_with(config).await;
    // (A tonic client ends a connection holding more than about 12,000
    // small DATA frames its application has not read: h2's guard against
    // floods, sized by the connection's window. Small stream windows keep
    // the late readers' connections under it.)
    let connection = || async {
        let endpoint = Channel::from_shared(t.server.url()).unwrap();
        let endpoint = if late {
            endpoint.initial_stream_window_size(16 * 1024)
        } else {
            endpoint
        };
        CoordinatorClient::new(endpoint.connect().await.expect("client connects"))
    };
    let mut watchers = Vec::new();
    for c in 0..2 {
        let mut shared = connection().await;
        for i in 0..10 {
            let start = start_msg(&format!("c{c}-s{i}"), &[], &["u:"]);
            watchers.push(Watcher::open_on(&mut shared, start).await.0);
        }
    }
    for i in 0..10 {
        let start = start_msg(&format!("own-{i}"), &[], &["u:"]);
        watchers.push(Watcher::open_on(&mut connection().await, start).await.0);
    }
    let (go, ready) = tokio::sync::watch::channel(!late);
    let readers: Vec<_> = watchers
        .into_iter()
        .map(|mut w| {
            let mut ready = ready.clone();
            tokio::spawn(async move {
                ready.wait_for(|go| *go).await.unwrap();
                let got = keys(&w.notices(PUBLISHERS * EACH).await);
                let (more, resets, _) = w.until_progress().await;
                assert!(
                    more.is_empty() && resets.is_empty(),
                    "nothing more: {more:?} {resets:?}"
                );
                (w, got)
            })
        })
        .collect();
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let mut client = connect(&t.server).await;
        publishers.push(tokio::spawn(async move {
            let mut published = Vec::with_capacity(EACH);
            for n in 0..EACH {
                let key = format!("u:{p}:{n}");
                let reply = client.publish(publish_req(&[&key])).await.unwrap();
                published.push((key, reply.into_inner().seq));
            }
            published
        }));
    }
    let mut all = Vec::new();
    for p in publishers {
        all.extend(p.await.unwrap());
    }
    all.sort_by_key(|(_, seq)| *seq);
    go.send(true).unwrap();
    // The streams stay open until the stats are read.
    let mut open = Vec::new();
    for reader in readers {
        let (w, got) = reader.await.unwrap();
        assert_eq!(got, all);
        open.push(w);
    }
    let mut client = connect(&t.server).await;
    let stats = client
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.subscribers.len(), open.len());
    stats.subscribers.iter().map(|s| s.overflows).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_reach_every_stream_once_in_seq_order() {
    every_stream_gets_every_notice_once_in_seq_order(10_000, false).await;
}

/// The same with queues of 20 notices, read once the publishers are done:
/// streams overflow and catch up from the history, and still get every
/// notice once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_overflow_still_get_every_notice_once_in_seq_order() {
    let overflows = every_stream_gets_every_notice_once_in_seq_order(20, true).await;
    assert!(overflows > 0, "some queue overflowed");
}

#[tokio::test]
async fn no_loop_skips_my_own_publishes() {
    let mut t = start().await;
    let mut start = start_msg("svc-a", &["k"], &[]);
    start.no_loop = true;
    let (mut w, _) = Watcher::open(&t, start).await;
    let mut own = publish_req(&["k"]);
    own.client_id = "svc-a".into();
    t.client.publish(own).await.unwrap();
    let mut foreign = publish_req(&["k"]);
    foreign.client_id = "svc-b".into();
    let p = t.client.publish(foreign).await.unwrap().into_inner();
    let (n, _, _) = w.until_progress().await;
    assert_eq!(keys(&n), vec![("k".to_owned(), p.seq)]);
}

#[tokio::test]
async fn resume_inside_the_history_loses_and_duplicates_nothing() {
    let mut t = start().await;
    let (mut w, started) = Watcher::open(&t, start_msg("a", &["k1", "k2"], &["p:"])).await;
    t.client.publish(publish_req(&["k1"])).await.unwrap();
    let (n, _, token) = w.until_progress().await;
    assert_eq!(n.len(), 1);
    drop(w);
    let mut missed = Vec::new();
    for k in ["k2", "zz", "p:x", "k1"] {
        let p = t
            .client
            .publish(publish_req(&[k]))
            .await
            .unwrap()
            .into_inner();
        if k != "zz" {
            missed.push((k.to_owned(), p.seq));
        }
    }
    let mut resume = start_msg("a", &["k1", "k2"], &["p:"]);
    resume.resume = Some(pb::ResumeToken {
        epoch: started.epoch,
        seq: token,
    });
    let (mut w, started) = Watcher::open(&t, resume).await;
    assert_eq!(started.outcome(), pb::ResumeOutcome::FromHistory);
    let p = t
        .client
        .publish(publish_req(&["k2"]))
        .await
        .unwrap()
        .into_inner();
    missed.push(("k2".to_owned(), p.seq));
    let (n, resets, _) = w.until_progress().await;
    assert_eq!(keys(&n), missed);
    assert!(resets.is_empty());
}

#[tokio::test]
async fn resume_past_the_history_repairs_exactly_the_changed_tracked_keys() {
    let mut config = Config::ephemeral();
    config.store.hub.history_notices = 4;
    let mut t = start_with(config).await;
    let (mut w, started) = Watcher::open(&t, start_msg("a", &["k1", "k2", "k3"], &["p:"])).await;
    let (_, _, token) = w.until_progress().await;
    drop(w);
    let p1 = t
        .client
        .publish(publish_req(&["k1"]))
        .await
        .unwrap()
        .into_inner();
    let p3 = t
        .client
        .publish(publish_req(&["k3"]))
        .await
        .unwrap()
        .into_inner();
    for i in 0..10 {
        t.client
            .publish(publish_req(&[&format!("other:{i}")]))
            .await
            .unwrap();
    }
    let mut resume = start_msg("a", &["k1", "k2", "k3"], &["p:"]);
    resume.resume = Some(pb::ResumeToken {
        epoch: started.epoch,
        seq: token,
    });
    let (mut w, started) = Watcher::open(&t, resume).await;
    assert_eq!(started.outcome(), pb::ResumeOutcome::Repaired);
    let (n, resets, _) = w.until_progress().await;
    assert_eq!(
        keys(&n),
        vec![("k1".to_owned(), p1.seq), ("k3".to_owned(), p3.seq)]
    );
    assert_eq!(resets.len(), 1);
    assert_eq!(resets[0].prefix, "p:");
    assert_eq!(resets[0].since, token);
    assert_eq!(resets[0].reason(), pb::ResetReason::HistoryCompacted);
}

#[tokio::test]
async fn a_token_from_another_epoch_resets_everything() {
    let t = start().await;
    let mut resume = start_msg("a", &["k1"], &[]);
    resume.resume = Some(pb::ResumeToken { epoch: 1, seq: 5 });
    let (mut w, started) = Watcher::open(&t, resume).await;
    assert_eq!(started.outcome(), pb::ResumeOutcome::Repaired);
    let (n, resets, _) = w.until_progress().await;
    assert!(n.is_empty());
    assert_eq!(resets.len(), 1);
    assert_eq!(resets[0].prefix, "");
    assert_eq!(resets[0].reason(), pb::ResetReason::NewEpoch);
}

#[tokio::test]
async fn a_stalled_subscriber_stays_bounded_and_converges() {
    let mut config = Config::ephemeral();
    config.store.hub.queue_notices = 64;
    config.store.hub.history_notices = 256;
    let mut t = start_with(config).await;
    let tracked: Vec<String> = (0..2_000).map(|i| format!("k{i}")).collect();
    let refs: Vec<&str> = tracked.iter().map(|s| s.as_str()).collect();
    let (mut slow, _) = Watcher::open(&t, start_msg("slow", &refs, &[])).await;
    let (mut fast, _) = Watcher::open(&t, start_msg("fast", &refs, &[])).await;
    let mut truth = HashMap::new();
    // 100,000 notices: far more than the queue, the history and the
    // transport's buffers hold.
    for round in 0..200 {
        let batch: Vec<&str> = (0..500)
            .map(|j| refs[(round * 7 + j * 3) % refs.len()])
            .collect();
        let p = t
            .client
            .publish(publish_req(&batch))
            .await
            .unwrap()
            .into_inner();
        for k in batch {
            truth.insert(k.to_owned(), p.seq);
        }
        if round % 20 == 0 {
            // The fast one keeps up meanwhile.
            fast.until_progress().await;
        }
    }
    let stats = t
        .client
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    let slow_stats = stats
        .subscribers
        .iter()
        .find(|s| s.client_id == "slow")
        .unwrap();
    assert!(slow_stats.queued <= 64, "queue bound held: {slow_stats:?}");
    assert!(slow_stats.overflows >= 1, "it fell behind: {slow_stats:?}");
    // Now it reads: applying everything yields the server's versions.
    let mut held = HashMap::new();
    loop {
        let (n, resets, _) = slow.until_progress().await;
        assert!(resets.is_empty(), "tracked keys are repaired key by key");
        if n.is_empty() {
            break;
        }
        let mut last = 0;
        for notice in n {
            assert!(notice.seq >= last, "seq order");
            last = notice.seq;
            held.insert(notice.key, notice.version);
        }
    }
    assert_eq!(held, truth);
}

#[tokio::test]
async fn shutdown_sends_a_final_watermark_then_unavailable() {
    let mut t = start().await;
    let (mut w, _) = Watcher::open(&t, start_msg("a", &["k"], &[])).await;
    let p = t
        .client
        .publish(publish_req(&["k"]))
        .await
        .unwrap()
        .into_inner();
    let server = std::mem::replace(
        &mut t.server,
        freshd::server::RunningServer::start(Config::ephemeral())
            .await
            .unwrap(),
    );
    let stopping = tokio::spawn(server.stop());
    let mut saw_notice = false;
    let mut watermark = None;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), w.rx.message())
            .await
            .expect("the stream ends in time")
        {
            Ok(Some(m)) => match m.response.unwrap() {
                Out::Notices(b) => saw_notice |= b.notices.iter().any(|n| n.seq == p.seq),
                Out::Progress(pr) => watermark = Some(pr.seq),
                other => panic!("unexpected {other:?}"),
            },
            Ok(None) => panic!("the stream must end with UNAVAILABLE"),
            Err(status) => break status,
        }
    };
    assert!(saw_notice);
    assert_eq!(watermark, Some(p.seq));
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("resume elsewhere"));
    stopping.await.unwrap().unwrap();
}

/// One chaos subscriber: tracks `keys`, applies notices, and now and then
/// drops its stream and resumes with its token.
async fn chaos_subscriber(
    server: std::sync::Arc<freshd::server::RunningServer>,
    id: usize,
    keys: Vec<String>,
    done: tokio::sync::watch::Receiver<bool>,
) -> (HashMap<String, u64>, usize) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(id as u64);
    let mut held: HashMap<String, u64> = HashMap::new();
    let mut token: Option<pb::ResumeToken> = None;
    let mut reconnects = 0;
    loop {
        let mut client = freshd::pb::coordinator_client::CoordinatorClient::connect(server.url())
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(8);
        let start = pb::WatchStart {
            client_id: format!("chaos-{id}"),
            no_loop: false,
            resume: token,
            track: keys.clone(),
            subscribe: vec![],
            refusals_in_band: false,
        };
        tx.send(request(In::Start(start))).await.unwrap();
        let mut stream = client
            .watch(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let finishing = *done.borrow();
        if finishing {
            tx.send(request(In::Progress(pb::ProgressRequest {})))
                .await
                .unwrap();
        }
        let mut drop_after = if finishing {
            usize::MAX
        } else {
            rng.random_range(1..40)
        };
        let mut done_now = done.clone();
        loop {
            let m = tokio::select! {
                m = stream.message() => match m.unwrap() {
                    Some(m) => m,
                    None => break,
                },
                _ = done_now.wait_for(|d| *d), if !finishing => break,
            };
            match m.response.unwrap() {
                Out::Started(s) => {
                    token.get_or_insert(pb::ResumeToken {
                        epoch: s.epoch,
                        seq: s.seq,
                    });
                }
                Out::Notices(b) => {
                    for n in b.notices {
                        let v = held.entry(n.key).or_default();
                        assert!(n.version >= *v, "versions never go back");
                        *v = n.version;
                        token.as_mut().unwrap().seq = n.seq;
                    }
                }
                Out::Reset(r) => panic!("tracked keys are repaired, not reset: {r:?}"),
                Out::Refused(r) => panic!("nothing is refused: {r:?}"),
                Out::Progress(p) => {
                    token.as_mut().unwrap().seq = p.seq;
                    if finishing {
                        return (held, reconnects);
                    }
                }
            }
            drop_after = drop_after.saturating_sub(1);
            if drop_after == 0 {
                break;
            }
        }
        reconnects += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_subscribers_drop_and_resume_and_end_with_the_servers_versions() {
    let mut config = Config::ephemeral();
    // Small enough that some resumes fall out of the history and are repaired.
    config.store.hub.history_notices = 3_000;
    // The keys are published, never filled: their changes are remembered for
    // `change_retention`. On a loaded machine the run outlasts the default
    // 60 s, and a key changed early would be forgotten before the final
    // comparison reads it.
    config.store.change_retention = Duration::from_secs(3_600);
    let server = std::sync::Arc::new(freshd::server::RunningServer::start(config).await.unwrap());
    let all: Vec<String> = (0..200).map(|i| format!("item:{i}")).collect();
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let mut subscribers = Vec::new();
    for id in 0..50 {
        let keys: Vec<String> = (0..20)
            .map(|j| all[(id * 13 + j * 7) % all.len()].clone())
            .collect();
        subscribers.push((
            keys.clone(),
            tokio::spawn(chaos_subscriber(server.clone(), id, keys, done_rx.clone())),
        ));
    }
    let mut publishers = Vec::new();
    for p in 0..4 {
        let server = server.clone();
        let all = all.clone();
        publishers.push(tokio::spawn(async move {
            let mut client = connect(&server).await;
            for n in 0..5_000 {
                let key = &all[(p * 31 + n * 17) % all.len()];
                client.publish(publish_req(&[key])).await.unwrap();
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    done_tx.send(true).unwrap();
    let mut client = connect(&server).await;
    let mut total_reconnects = 0;
    for (keys, task) in subscribers {
        let (held, reconnects) = task.await.unwrap();
        total_reconnects += reconnects;
        for key in keys {
            let server_version = client
                .inspect(pb::InspectRequest { key: key.clone() })
                .await
                .map(|r| r.into_inner().version)
                .unwrap_or(0);
            assert_eq!(
                held.get(&key).copied().unwrap_or(0),
                server_version,
                "{key}"
            );
        }
    }
    assert!(
        total_reconnects >= 50,
        "the subscribers did drop: {total_reconnects}"
    );
}

async fn subscriber_ids(
    client: &mut pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
) -> Vec<String> {
    let stats = client.stats(pb::StatsRequest {}).await.unwrap();
    let mut ids: Vec<String> = stats
        .into_inner()
        .subscribers
        .into_iter()
        .map(|s| s.client_id)
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_stream_whose_client_leaves_or_closes_unsubscribes() {
    let mut t = start().await;
    // Each watcher has a connection of its own.
    let (gone, _) = Watcher::open(&t, start_msg("gone", &["k"], &[])).await;
    let (mut closed, _) = Watcher::open(&t, start_msg("closed", &["k"], &[])).await;
    let (mut kept, _) = Watcher::open(&t, start_msg("kept", &["k"], &[])).await;
    assert_eq!(
        subscriber_ids(&mut t.client).await,
        ["closed", "gone", "kept"]
    );

    // The client goes away: its connection closes.
    drop(gone);
    // Ending the request side ends the stream.
    drop(closed.tx);
    let end = tokio::time::timeout(Duration::from_secs(10), closed.rx.message())
        .await
        .expect("the closed stream ends");
    assert!(matches!(end, Ok(None)), "{end:?}");

    let client = t.client.clone();
    let gone = eventually(Duration::from_secs(10), || {
        let mut client = client.clone();
        async move { subscriber_ids(&mut client).await == ["kept"] }
    })
    .await;
    assert!(
        gone,
        "subscribers left: {:?}",
        subscriber_ids(&mut t.client).await
    );

    // The remaining stream still gets its notices.
    t.client.publish(publish_req(&["k"])).await.unwrap();
    let (n, _, _) = kept.until_progress().await;
    assert_eq!(n.len(), 1, "{n:?}");
}

#[tokio::test]
async fn acks_show_in_stats_with_the_event_to_ack_delay() {
    let mut t = start().await;
    let (mut w, _) = Watcher::open(&t, start_msg("acker", &["k"], &[])).await;
    let event_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        - 1_500;
    let mut req = publish_req(&["k"]);
    req.changes[0].event_time_unix_ms = event_time;
    let p = t.client.publish(req).await.unwrap().into_inner();
    let (n, _, _) = w.until_progress().await;
    assert_eq!(n[0].event_time_unix_ms, event_time);
    w.send(In::Ack(pb::Ack { seq: p.seq })).await;
    w.until_progress().await; // the ack is applied before the progress
    let stats = t
        .client
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    let s = &stats.subscribers[0];
    assert_eq!(
        (s.client_id.as_str(), s.acked_seq, s.lag),
        ("acker", p.seq, 0)
    );
    assert!(s.ack_delay_ms >= 1_500, "{s:?}");
    assert_eq!(s.tracked_keys, 1);
}

#[tokio::test]
async fn bad_watch_requests_get_clear_errors() {
    let mut config = Config::ephemeral();
    config.store.hub.max_tracked_keys = 2;
    let t = start_with(config).await;
    let mut client = connect(&t.server).await;

    // The first message must be start.
    let (tx, rx) = mpsc::channel(4);
    tx.send(request(In::Ack(pb::Ack { seq: 1 }))).await.unwrap();
    let status = client.watch(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("must be `start`"));

    // Too many tracked keys at start.
    let (tx, rx) = mpsc::channel(4);
    tx.send(request(In::Start(start_msg("x", &["a", "b", "c"], &[]))))
        .await
        .unwrap();
    let status = client.watch(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().contains("max_tracked_keys"),
        "{}",
        status.message()
    );

    // Too many later, and an empty key.
    let (mut w, _) = Watcher::open(&t, start_msg("y", &["a", "b"], &[])).await;
    w.send(In::Track(pb::KeyList {
        keys: vec!["c".into()],
    }))
    .await;
    let status = w.rx.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let (mut w, _) = Watcher::open(&t, start_msg("z", &[], &[])).await;
    w.send(In::Track(pb::KeyList {
        keys: vec![String::new()],
    }))
    .await;
    let status = w.rx.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("track.keys[0] must not be empty"));
    // A stream that ended is gone from Stats.
    assert!(
        crate::harness::eventually(Duration::from_secs(5), || {
            let mut c = client.clone();
            async move {
                let stats = c.stats(pb::StatsRequest {}).await.unwrap().into_inner();
                stats.subscribers.is_empty()
            }
        })
        .await
    );
}

/// With `refusals_in_band`, a refused `track` or `subscribe` is answered
/// with `refused` (naming the request, the code and the field) and applies
/// nothing of itself; the stream goes on, and a `start` sent again still
/// ends it.
#[tokio::test]
async fn refusals_in_band_answer_a_bad_request_and_the_stream_goes_on() {
    let mut config = Config::ephemeral();
    config.store.hub.max_tracked_keys = 3;
    let t = start_with(config).await;
    let mut c = connect(&t.server).await;
    let (mut w, _) = Watcher::open(
        &t,
        pb::WatchStart {
            refusals_in_band: true,
            ..start_msg("inband", &["a"], &[])
        },
    )
    .await;
    let refused = |m: pb::WatchResponse| match m.response {
        Some(Out::Refused(r)) => r,
        other => panic!("expected refused, got {other:?}"),
    };
    // Request 2: one good key and an empty one. Nothing of it applies.
    w.send(In::Track(pb::KeyList {
        keys: vec!["b".into(), String::new()],
    }))
    .await;
    let r = refused(w.rx.message().await.unwrap().unwrap());
    assert_eq!(r.request, 2);
    assert_eq!(r.code, tonic::Code::InvalidArgument as i32);
    assert!(
        r.message.contains("track.keys[1] must not be empty"),
        "{r:?}"
    );
    // Request 3 passes the per-stream limit: refused too, naming it.
    w.send(In::Track(pb::KeyList {
        keys: vec!["b".into(), "c".into(), "d".into()],
    }))
    .await;
    let r = refused(w.rx.message().await.unwrap().unwrap());
    assert_eq!(r.request, 3);
    assert_eq!(r.code, tonic::Code::ResourceExhausted as i32);
    assert!(r.message.contains("max_tracked_keys"), "{r:?}");
    // Request 4: an empty prefix is allowed, a bad one is not.
    w.send(In::Subscribe(pb::KeyList {
        keys: vec!["x".repeat(100_000)],
    }))
    .await;
    let r = refused(w.rx.message().await.unwrap().unwrap());
    assert_eq!(
        (r.request, r.code),
        (4, tonic::Code::InvalidArgument as i32)
    );
    assert!(r.message.contains("subscribe.keys[0]"), "{r:?}");
    // The stream goes on: "b" is not tracked, "a" is; request 5 tracks "c".
    w.send(In::Track(pb::KeyList {
        keys: vec!["c".into()],
    }))
    .await;
    // Answered after the track: applied by then.
    let (notices, _, _) = w.until_progress().await;
    assert!(notices.is_empty());
    let seq = c
        .publish(publish_req(&["b", "a", "c"]))
        .await
        .unwrap()
        .into_inner()
        .seq;
    let (notices, resets, through) = w.until_progress().await;
    assert!(through >= seq);
    assert!(resets.is_empty());
    let mut keys: Vec<&str> = notices.iter().map(|n| n.key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["a", "c"]);
    // Using the stream wrongly still ends it.
    w.send(In::Start(start_msg("again", &[], &[]))).await;
    let status = w.rx.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("`start` may only be the first"));
}

/// A client that goes away leaves no stream behind: the server unsubscribes
/// it, and the client's other stream still gets its notices.
#[tokio::test]
async fn a_stream_dropped_by_its_client_is_unsubscribed() {
    let mut t = start().await;
    let store = t.server.store.clone();
    let (gone, _) = Watcher::open(&t, start_msg("svc", &["feed:1"], &[])).await;
    let (mut stays, _) = Watcher::open(&t, start_msg("svc", &["feed:1"], &[])).await;
    assert_eq!(store.hub().streams_of("svc").len(), 2);

    drop(gone);
    assert!(
        eventually(Duration::from_secs(10), || {
            let store = store.clone();
            async move { store.hub().streams_of("svc").len() == 1 }
        })
        .await,
        "the dropped stream is unsubscribed"
    );

    t.client.fill(fill_req("feed:1", &[], 0)).await.unwrap();
    t.client.publish(publish_req(&["feed:1"])).await.unwrap();
    let (notices, _, _) = stays.until_progress().await;
    assert_eq!(keys(&notices).len(), 1, "{notices:?}");
    assert_eq!(notices[0].key, "feed:1");
}

/// `watch_coalesce` is a duration, zero allowed; nonsense is refused naming
/// the setting.
#[test]
fn watch_coalesce_is_read_and_checked() {
    use std::time::Duration;
    let read = |value: &str| {
        Config::from_args(freshd::config::Args {
            watch_coalesce: Some(value.into()),
            ..Default::default()
        })
    };
    assert_eq!(
        read("5ms").unwrap().store.hub.coalesce,
        Duration::from_millis(5)
    );
    assert_eq!(read("0s").unwrap().store.hub.coalesce, Duration::ZERO);
    let e = read("soon").unwrap_err();
    assert_eq!(e.setting, "watch_coalesce", "{e}");
    assert_eq!(
        Config::ephemeral().store.hub.coalesce,
        Duration::from_millis(2),
        "the default"
    );
}
