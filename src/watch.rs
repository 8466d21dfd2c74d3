//! One Watch stream: the task that reads the client's requests, catches the
//! stream up after a resume or an overflow, and writes notice batches,
//! progress and resets at the client's pace.
//!
//! The task is generic over the inbound stream, so tests can drive it with a
//! channel as well as with a network stream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use bytes::BufMut;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::auth::{Principal, Scope};
use crate::fanout::{Behind, ExpressWriter, Notice, Subscriber};
use crate::pb::{self, watch_request::Request as In, watch_response::Response as Out};
use crate::store::Store;
use crate::validate::Limits;

/// Most notices per batch written to the stream.
pub(crate) const BATCH: usize = 512;

/// Where a stream's messages go: the HTTP/2 stream itself when served
/// (`crate::conn::GrpcOutbox`), or a channel (tonic's generated handler, and
/// tests).
pub trait Outbox: Send + 'static {
    /// Sends one message, waiting while the client is behind; `Gone` when
    /// the client is. After an error the stream ends.
    fn send(
        &mut self,
        message: Result<pb::WatchResponse, Status>,
    ) -> impl std::future::Future<Output = Result<(), Gone>> + Send;

    /// A writer that fan-outs may write the stream's live notices through
    /// while its task is parked ([`crate::fanout::Express`]); `None`, the
    /// default, leaves every message to the task.
    fn express(&self) -> Option<ExpressWriter> {
        None
    }
}

/// The client is gone: the stream cannot send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

impl Outbox for mpsc::Sender<Result<pb::WatchResponse, Status>> {
    async fn send(&mut self, message: Result<pb::WatchResponse, Status>) -> Result<(), Gone> {
        mpsc::Sender::send(self, message).await.map_err(|_| Gone)
    }
}

/// A notice as `sub` may see it (its cause hidden when out of scope).
fn notice(n: &Notice, sub: &Subscriber) -> pb::Notice {
    pb::Notice {
        seq: n.seq,
        key: n.key.to_string(),
        version: n.version,
        cause: sub.visible_cause(&n.cause).to_owned(),
        critical: n.critical,
        event_time_unix_ms: n.event_time_ms,
        repair: false,
    }
}

/// Splits notices in seq order into batches of about [`BATCH`], never
/// splitting one seq: the last seq of a batch is a valid resume token.
fn batches(notices: Vec<pb::Notice>, out: &mut Vec<pb::WatchResponse>) {
    let mut current: Vec<pb::Notice> = Vec::new();
    for n in notices {
        if current.len() >= BATCH && current.last().is_some_and(|l| l.seq != n.seq) {
            out.push(batch(std::mem::take(&mut current)));
        }
        current.push(n);
    }
    if !current.is_empty() {
        out.push(batch(current));
    }
}

fn batch(notices: Vec<pb::Notice>) -> pb::WatchResponse {
    pb::WatchResponse {
        response: Some(Out::Notices(pb::NoticeBatch::new(notices))),
    }
}

/// Live notices as `sub` may see them, as one batch: each notice's shared
/// encoding, or, when the cause is hidden from `sub`, its own.
pub(crate) fn live_batch(notices: &[Arc<Notice>], sub: &Subscriber) -> pb::WatchResponse {
    let mut out = Vec::with_capacity(
        notices
            .iter()
            .map(|n| n.key.len() + n.cause.len() + 40)
            .sum(),
    );
    put_entries(notices, sub, &mut out);
    pb::WatchResponse {
        response: Some(Out::Notices(pb::NoticeBatch::from_encoded(out.into()))),
    }
}

/// Appends [`live_batch`]'s encoding to `out`, building no message: a
/// fan-out writes it straight to the stream.
pub(crate) fn encode_live_batch(notices: &[Arc<Notice>], sub: &Subscriber, out: &mut impl BufMut) {
    // `WatchResponse.notices` (field 2): its length, then the entries.
    fn head(len: usize, out: &mut impl BufMut) {
        prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, out);
        prost::encoding::encode_varint(len as u64, out);
    }
    let mut len = 0;
    for n in notices {
        if sub.visible_cause(&n.cause).len() != n.cause.len() {
            // A cause the stream may not see: the entries are encoded
            // afresh, into a buffer of their own (a rare case: an edge
            // across namespaces, a stream scoped to one of them).
            let mut entries = Vec::new();
            put_entries(notices, sub, &mut entries);
            head(entries.len(), out);
            out.put_slice(&entries);
            return;
        }
        len += n.entry().len();
    }
    head(len, out);
    for n in notices {
        out.put_slice(n.entry());
    }
}

/// Appends `notices` as `NoticeBatch.notices` entries, each cause as `sub`
/// may see it.
fn put_entries(notices: &[Arc<Notice>], sub: &Subscriber, out: &mut Vec<u8>) {
    for n in notices {
        let cause = sub.visible_cause(&n.cause);
        if cause.len() == n.cause.len() {
            out.extend_from_slice(n.entry());
        } else {
            crate::wire::encode_entry(&n.fields(cause), out);
        }
    }
}

fn progress(store: &Store, seq: u64) -> pb::WatchResponse {
    pb::WatchResponse {
        response: Some(Out::Progress(pb::Progress {
            epoch: store.epoch(),
            seq,
        })),
    }
}

/// Checks every key or prefix of a request against the limits, and against
/// the watch scope of the stream's principal.
pub(crate) fn check_keys(
    limits: &Limits,
    owner: Option<&Arc<Principal>>,
    field: &str,
    keys: &[String],
    prefixes: bool,
) -> Result<(), Status> {
    for (i, key) in keys.iter().enumerate() {
        // The empty prefix watches everything.
        if !(prefixes && key.is_empty()) {
            limits.key(|| format!("{field}[{i}]"), key)?;
        }
        if let Some(owner) = owner {
            if prefixes {
                owner.require_prefix(Scope::Watch, key)?;
            } else {
                owner.require_key(Scope::Watch, key)?;
            }
        }
    }
    Ok(())
}

/// A Watch stream validated and registered with the hub, not yet running.
pub struct Registered {
    store: Arc<Store>,
    limits: Limits,
    sub: Arc<Subscriber>,
    from: u64,
    resumed: bool,
    refusals_in_band: bool,
}

/// Validates a stream's first message and registers the stream. `owner` is
/// the authenticated principal, if any: its watch scope bounds what the
/// stream may track and see, and its quotas count the stream. Its name
/// prefixes the stream's client id (`principal/client_id`), so one principal
/// cannot pass for another's client.
pub fn register(
    store: Arc<Store>,
    limits: Limits,
    owner: Option<Arc<Principal>>,
    first: Option<pb::WatchRequest>,
) -> Result<Registered, Status> {
    let Some(pb::WatchRequest {
        request: Some(In::Start(start)),
    }) = first
    else {
        return Err(Status::invalid_argument(
            "the first message of a Watch stream must be `start`",
        ));
    };
    check_keys(&limits, owner.as_ref(), "start.track", &start.track, false)?;
    check_keys(
        &limits,
        owner.as_ref(),
        "start.subscribe",
        &start.subscribe,
        true,
    )?;
    let resume = start.resume.map(|t| (t.epoch == store.epoch(), t.seq));
    let client_id = crate::auth::client_id(owner.as_ref(), start.client_id);
    let (sub, from) = store
        .subscribe(
            &client_id,
            start.no_loop,
            resume,
            &start.track,
            &start.subscribe,
            owner,
        )
        .map_err(Status::resource_exhausted)?;
    Ok(Registered {
        store,
        limits,
        sub,
        from,
        resumed: resume.is_some(),
        refusals_in_band: start.refusals_in_band,
    })
}

impl Registered {
    /// Takes the stream out of the hub without running it (its client left
    /// before the stream started).
    pub fn cancel(self) {
        self.store.hub().unsubscribe(&self.sub);
    }

    /// Runs the stream in a task of its own: it reads the client's requests
    /// from `inbound` and writes to `out`, and leaves the hub when it ends.
    pub fn spawn<S, O>(self, inbound: S, out: O)
    where
        S: Stream<Item = Result<pb::WatchRequest, Status>> + Unpin + Send + 'static,
        O: Outbox,
    {
        tokio::spawn(async move {
            let (store, sub) = (self.store.clone(), self.sub.clone());
            let inbound = Requests::new(inbound, sub.clone());
            run(self, inbound, out).await;
            sub.clear_express();
            store.hub().unsubscribe(&sub);
        });
    }
}

/// Validates a stream's first message and registers it ([`register`]). On
/// success the stream's task is running and its responses flow into the
/// returned receiver.
pub fn start<S>(
    store: Arc<Store>,
    limits: Limits,
    owner: Option<Arc<Principal>>,
    first: Option<pb::WatchRequest>,
    inbound: S,
) -> Result<mpsc::Receiver<Result<pb::WatchResponse, Status>>, Status>
where
    S: Stream<Item = Result<pb::WatchRequest, Status>> + Unpin + Send + 'static,
{
    let registered = register(store, limits, owner, first)?;
    let (tx, rx) = mpsc::channel(16);
    registered.spawn(inbound, tx);
    Ok(rx)
}

/// The catch-up a stream owes: exact notices from the history when it covers
/// the gap, else a repair. Its size is bounded by the history and the
/// stream's filters.
fn catch_up(store: &Store, sub: &Subscriber) -> (Vec<pb::WatchResponse>, pb::ResumeOutcome) {
    let mut outcome = pb::ResumeOutcome::FromHistory;
    let mut messages = Vec::new();
    while let Some((since, through, why)) = sub.behind() {
        let exact = match why {
            Behind::NewEpoch => None,
            Behind::Resume | Behind::SlowConsumer => store.hub().replay(sub, since, through),
        };
        match exact {
            Some(notices) => {
                batches(
                    notices.iter().map(|n| notice(n, sub)).collect(),
                    &mut messages,
                );
            }
            None => {
                outcome = pb::ResumeOutcome::Repaired;
                let reason = match why {
                    Behind::NewEpoch => pb::ResetReason::NewEpoch,
                    Behind::Resume => pb::ResetReason::HistoryCompacted,
                    Behind::SlowConsumer => pb::ResetReason::SlowConsumer,
                };
                let (tracked, prefixes): (Vec<Arc<str>>, Vec<String>) = {
                    let filters = sub.filters.lock();
                    (
                        filters.tracked.iter().cloned().collect(),
                        filters.prefixes.iter().cloned().collect(),
                    )
                };
                let metrics = store.metrics();
                let reason_label = match why {
                    Behind::NewEpoch => "new_epoch",
                    Behind::Resume => "history_compacted",
                    Behind::SlowConsumer => "slow_consumer",
                };
                if why == Behind::NewEpoch {
                    // Versions from another history mean nothing: drop all.
                    metrics.reset(reason_label);
                    messages.push(reset(String::new(), 0, reason));
                } else {
                    let mut repaired: Vec<pb::Notice> = tracked
                        .iter()
                        .filter_map(|key| {
                            let (seq, version, critical) = store.last_change(key);
                            (seq > since && seq <= through).then(|| pb::Notice {
                                seq,
                                key: key.to_string(),
                                version,
                                cause: String::new(),
                                critical,
                                event_time_unix_ms: 0,
                                repair: true,
                            })
                        })
                        .collect();
                    repaired.sort_by_key(|n| n.seq);
                    // Each repaired key missed a notice; its ack repairs it.
                    let detected_by = if why == Behind::Resume {
                        "resume"
                    } else {
                        "overflow"
                    };
                    for n in &repaired {
                        metrics.missed(&n.key, detected_by);
                    }
                    sub.await_ack_for_repairs(
                        repaired
                            .iter()
                            .map(|n| (n.seq, metrics.namespace_label(&n.key))),
                    );
                    batches(repaired, &mut messages);
                    for prefix in prefixes {
                        metrics.reset(reason_label);
                        messages.push(reset(prefix, since, reason));
                    }
                }
            }
        }
        if sub.finish_catch_up(through) {
            break;
        }
    }
    (messages, outcome)
}

/// Catches a stream up and sends what that takes; `None` when the client
/// went away.
async fn send_catch_up(
    store: &Store,
    sub: &Subscriber,
    out: &mut impl Outbox,
) -> Option<pb::ResumeOutcome> {
    let (messages, outcome) = catch_up(store, sub);
    for message in messages {
        out.send(Ok(message)).await.ok()?;
    }
    Some(outcome)
}

fn reset(prefix: String, since: u64, reason: pb::ResetReason) -> pb::WatchResponse {
    pb::WatchResponse {
        response: Some(Out::Reset(pb::Reset {
            prefix,
            since,
            reason: reason.into(),
        })),
    }
}

/// Drains the queue completely (catching up as needed), then sends progress
/// at `seq`, a seq read before the drain.
async fn flush_with_progress(
    store: &Store,
    sub: &Subscriber,
    out: &mut impl Outbox,
    seq: u64,
) -> Option<()> {
    let mut buf = Vec::new();
    loop {
        if sub.behind().is_some() {
            send_catch_up(store, sub, out).await?;
        }
        buf.clear();
        sub.drain(BATCH, &mut buf);
        if buf.is_empty() {
            break;
        }
        sub.sent(&buf);
        out.send(Ok(live_batch(&buf, sub))).await.ok()?;
    }
    out.send(Ok(progress(store, seq))).await.ok()
}

async fn run<S>(stream: Registered, mut inbound: S, mut out: impl Outbox)
where
    S: Stream<Item = Result<pb::WatchRequest, Status>> + Unpin + Send + 'static,
{
    let Registered {
        store,
        limits,
        sub,
        from,
        resumed,
        refusals_in_band,
    } = stream;
    let hub = store.hub();
    let outcome = if resumed {
        // Catch up before saying so, so that `started` names what happened.
        let (early, outcome) = catch_up(&store, &sub);
        let started = pb::WatchResponse {
            response: Some(Out::Started(pb::WatchStarted {
                epoch: store.epoch(),
                seq: from,
                outcome: outcome.into(),
            })),
        };
        if out.send(Ok(started)).await.is_err() {
            return;
        }
        for m in early {
            if out.send(Ok(m)).await.is_err() {
                return;
            }
        }
        outcome
    } else {
        pb::ResumeOutcome::New
    };
    store.metrics().resume(match outcome {
        pb::ResumeOutcome::FromHistory => "from_history",
        pb::ResumeOutcome::Repaired => "repaired",
        _ => "new",
    });
    if outcome == pb::ResumeOutcome::New {
        let started = pb::WatchResponse {
            response: Some(Out::Started(pb::WatchStarted {
                epoch: store.epoch(),
                seq: from,
                outcome: outcome.into(),
            })),
        };
        if out.send(Ok(started)).await.is_err() {
            return;
        }
    }

    // A stream lives no longer than its token: at the token's expiry, or
    // when a reload removes or changes its principal, it ends
    // UNAUTHENTICATED, and the client resumes on a new stream with a valid
    // token (the history covers the gap).
    let owner = sub.owner().cloned();
    let expired = async move {
        let Some(owner) = owner else {
            return std::future::pending().await;
        };
        let expiry = owner.expires().and_then(|at| {
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            // Too far off to represent: never, in practice.
            tokio::time::Instant::now().checked_add(left)
        });
        let expires = async move {
            match expiry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = expires => (owner.expired_status(), "expired"),
            () = owner.revoked() => (owner.revoked_status(), "revoked"),
        }
    };
    tokio::pin!(expired);
    // From here on, fan-outs write live notices themselves while this task
    // waits with nothing queued; it holds the stream's `busy` whenever it
    // is not waiting (see `Subscriber::park`).
    if let Some(express) = out.express() {
        sub.set_express(express);
    }
    let mut buf: Vec<Arc<Notice>> = Vec::new();
    // The client's requests read so far, `start` being the first.
    let mut requests: u64 = 1;
    loop {
        if hub.stopping() {
            // Drain: a final watermark, so the client resumes elsewhere
            // without loss.
            let seq = hub.fanned();
            let _ = flush_with_progress(&store, &sub, &mut out, seq).await;
            let _ = out
                .send(Err(Status::unavailable(format!(
                    "freshd is shutting down; resume elsewhere with token (epoch {}, seq {seq})",
                    store.epoch()
                ))))
                .await;
            return;
        }
        if sub.behind().is_some() && send_catch_up(&store, &sub, &mut out).await.is_none() {
            return;
        }
        buf.clear();
        sub.drain(BATCH, &mut buf);
        if !buf.is_empty() {
            sub.sent(&buf);
            let message = live_batch(&buf, &sub);
            if out.send(Ok(message)).await.is_err() {
                return;
            }
            continue;
        }
        if !sub.park() {
            // Notices came since the drain.
            continue;
        }
        let woke = tokio::select! {
            () = sub.wake.notified() => Woke::News,
            ended = &mut expired => Woke::Expired(ended),
            request = inbound.next() => Woke::Request(request),
        };
        sub.unpark().await;
        match woke {
            Woke::News => {}
            Woke::Expired((status, reason)) => {
                store.metrics().auth_refused(reason);
                let _ = out.send(Err(status)).await;
                return;
            }
            Woke::Request(request) => {
                let request = match request {
                    Some(Ok(r)) => r,
                    // The client closed its side or went away.
                    Some(Err(_)) | None => return,
                };
                requests += 1;
                match handle(&store, &limits, &sub, &mut out, request).await {
                    Ok(()) => {}
                    Err(Failed::Refused(status)) if refusals_in_band => {
                        let refused = pb::WatchResponse {
                            response: Some(Out::Refused(pb::Refused {
                                request: requests,
                                code: status.code() as i32,
                                message: status.message().to_string(),
                            })),
                        };
                        if out.send(Ok(refused)).await.is_err() {
                            return;
                        }
                    }
                    Err(Failed::Refused(status) | Failed::Protocol(status)) => {
                        let _ = out.send(Err(status)).await;
                        return;
                    }
                }
            }
        }
    }
}

/// Why a parked stream's task woke.
enum Woke<R> {
    /// Its queue has work, or shutdown began.
    News,
    /// Its token expired, or a reload revoked its principal: the stream's
    /// end, and the reason counted.
    Expired((Status, &'static str)),
    /// The client sent a request, or its side ended (`None`).
    Request(Option<R>),
}

/// The client's side of a stream, polled only when it has news.
///
/// The stream's task wakes for every notice batch, and its `select!` polls
/// every branch each time; the client's requests (acks, tracking changes)
/// are far rarer. Polling the request stream reaches through tonic's decoder
/// and the request body to the connection's state, behind the lock its
/// task shares, all of it memory no other step of a delivery touches. So
/// the inner stream is given a waker of its own, which notes the news on the
/// subscriber ([`Subscriber::client_news`]) and wakes the task through
/// [`Subscriber::wake`]; after the inner stream answers `Pending`, this
/// answers `Pending` at once until that news comes.
///
/// Its `Pending` therefore registers no waker: it is only correct polled
/// beside a wait on `sub.wake`, as the stream's loop does.
struct Requests<S> {
    inner: S,
    sub: Arc<Subscriber>,
    /// Notes news on `sub`; the inner stream holds a clone.
    waker: Waker,
    /// The inner stream's last answer was `Pending`.
    idle: bool,
}

/// The waker a stream's request stream is given.
struct ClientNews(Arc<Subscriber>);

impl Wake for ClientNews {
    fn wake(self: Arc<Self>) {
        self.0.client_news();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.client_news();
    }
}

impl<S> Requests<S> {
    fn new(inner: S, sub: Arc<Subscriber>) -> Self {
        Requests {
            inner,
            waker: Waker::from(Arc::new(ClientNews(sub.clone()))),
            sub,
            idle: false,
        }
    }
}

impl<S: Stream + Unpin> Stream for Requests<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = &mut *self;
        // Taken before the poll, so news during it is not lost.
        let news = this.sub.take_client_news();
        if this.idle && !news {
            return Poll::Pending;
        }
        let answer = Pin::new(&mut this.inner).poll_next(&mut Context::from_waker(&this.waker));
        this.idle = answer.is_pending();
        answer
    }
}

/// Why a client request failed.
enum Failed {
    /// The stream is used wrongly (a request with no field set, `start`
    /// again): it ends.
    Protocol(Status),
    /// A key or prefix, the watch scope, a per-stream limit or a quota
    /// refused a request, which changed nothing: answered in the stream when
    /// the client asked for that (`refusals_in_band`), else it ends.
    Refused(Status),
}

/// Applies one client request.
async fn handle(
    store: &Store,
    limits: &Limits,
    sub: &Arc<Subscriber>,
    out: &mut impl Outbox,
    request: pb::WatchRequest,
) -> Result<(), Failed> {
    let hub = store.hub();
    match request.request {
        None => Err(Failed::Protocol(Status::invalid_argument(
            "a Watch request must set one field",
        ))),
        Some(In::Start(_)) => Err(Failed::Protocol(Status::invalid_argument(
            "`start` may only be the first message of a Watch stream",
        ))),
        Some(In::Track(list)) => {
            check_keys(limits, sub.owner(), "track.keys", &list.keys, false)
                .map_err(Failed::Refused)?;
            hub.add(sub, &list.keys, &[])
                .map_err(|e| Failed::Refused(Status::resource_exhausted(e)))
        }
        Some(In::Untrack(list)) => {
            hub.untrack(sub, &list.keys);
            Ok(())
        }
        Some(In::Subscribe(list)) => {
            check_keys(limits, sub.owner(), "subscribe.keys", &list.keys, true)
                .map_err(Failed::Refused)?;
            hub.add(sub, &[], &list.keys)
                .map_err(|e| Failed::Refused(Status::resource_exhausted(e)))
        }
        Some(In::Unsubscribe(list)) => {
            hub.unwatch_prefixes(sub, &list.keys);
            Ok(())
        }
        Some(In::Ack(ack)) => {
            sub.ack(ack.seq);
            Ok(())
        }
        Some(In::Progress(_)) => {
            let seq = hub.fanned();
            // A closed client ends the stream on the next read.
            let _ = flush_with_progress(store, sub, out, seq).await;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::{Hub, HubConfig};
    use crate::metrics::Metrics;
    use std::time::Duration;

    /// A stream that counts its polls and holds the waker of the last one.
    #[derive(Default)]
    struct Probe {
        polls: usize,
        ready: Option<u32>,
        waker: Option<Waker>,
    }

    impl Stream for Probe {
        type Item = u32;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<u32>> {
            self.polls += 1;
            match self.ready.take() {
                Some(n) => Poll::Ready(Some(n)),
                None => {
                    self.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }
    }

    fn subscriber() -> (Hub, Arc<Subscriber>) {
        let hub = Hub::new(HubConfig::default(), 0, Arc::new(Metrics::disabled()));
        let (sub, _) = hub.subscribe("c", false, None, &[], &[], None).unwrap();
        (hub, sub)
    }

    #[tokio::test]
    async fn an_idle_request_stream_is_polled_again_only_after_it_wakes() {
        let (_hub, sub) = subscriber();
        let mut requests = Requests::new(Probe::default(), sub.clone());
        let mut cx = Context::from_waker(Waker::noop());

        for _ in 0..3 {
            assert!(Pin::new(&mut requests).poll_next(&mut cx).is_pending());
        }
        assert_eq!(requests.inner.polls, 1, "polled once, then held back");

        // News: the inner stream wakes its waker, which wakes the stream's
        // task through the subscriber, and the next poll reaches it.
        requests.inner.ready = Some(7);
        requests.inner.waker.take().unwrap().wake();
        tokio::time::timeout(Duration::from_secs(5), sub.wake.notified())
            .await
            .expect("the task is woken");
        assert_eq!(
            Pin::new(&mut requests).poll_next(&mut cx),
            Poll::Ready(Some(7))
        );
        assert_eq!(requests.inner.polls, 2);

        // After an item it is polled straight away again.
        assert!(Pin::new(&mut requests).poll_next(&mut cx).is_pending());
        assert_eq!(requests.inner.polls, 3);
    }

    #[tokio::test]
    async fn requests_sent_while_the_task_waits_on_notices_arrive() {
        let (_hub, sub) = subscriber();
        let (tx, rx) = mpsc::channel::<u32>(4);
        let mut requests =
            Requests::new(tokio_stream::wrappers::ReceiverStream::new(rx), sub.clone());
        // The stream's loop: wait for notices or requests, whichever comes.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                tokio::select! {
                    () = sub.wake.notified() => {}
                    request = requests.next() => match request {
                        Some(n) => got.push(n),
                        None => return got,
                    },
                }
            }
        });
        for n in 0..100 {
            tx.send(n).await.unwrap();
            if n % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
        drop(tx);
        let got = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the loop sees every request and the end")
            .unwrap();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }

    /// The batch a fan-out encodes straight to the stream is byte for byte
    /// the message the stream's task sends, at every length of the head
    /// (one, two and three varint bytes), appended after what the buffer
    /// held; for a stream that may not see the cause too (it is left out).
    #[test]
    fn a_batch_encoded_in_place_is_the_message() {
        use crate::auth::{PrincipalConfig, Scopes};
        use prost::Message;
        let (hub, open) = subscriber();
        let mut watch = Scopes::default();
        watch.insert(Scope::Watch);
        let feeds_only = Arc::new(Principal::new(&PrincipalConfig {
            name: "feeds".into(),
            token_sha256: [0; 32],
            expires: None,
            scopes: vec![("feed".into(), watch)],
            quotas: Default::default(),
        }));
        let (scoped, _) = hub
            .subscribe("s", false, None, &[], &[], Some(feeds_only))
            .unwrap();
        assert_eq!(scoped.visible_cause("posts:9"), "", "the cause is hidden");
        for (sub, count) in [
            (&open, 1),
            (&open, 3),
            (&open, 200),
            (&open, 1000),
            (&scoped, 3),
        ] {
            let notices: Vec<Arc<Notice>> = (0..count)
                .map(|i| {
                    Arc::new(Notice {
                        seq: 10 + i,
                        key: format!("feed:{i}").into(),
                        version: 2,
                        cause: "posts:9".into(),
                        critical: i % 2 == 0,
                        event_time_ms: 1_700_000_000_000,
                        origin: None,
                        cache: Default::default(),
                    })
                })
                .collect();
            let expected = live_batch(&notices, sub).encode_to_vec();
            let mut out = b"before".to_vec();
            encode_live_batch(&notices, sub, &mut out);
            assert_eq!(&out[..6], b"before");
            assert_eq!(out[6..], expected[..], "{count} notices");
        }
    }
}
