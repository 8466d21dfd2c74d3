//! One Watch stream: reads the client's requests, catches the stream up
//! after a resume or an overflow, and yields notice batches, progress and
//! resets at the client's pace.
//!
//! The response stream is polled by the connection's task itself, so a
//! publish that queues a notice wakes the task that writes it: no task or
//! channel stands in between. It is generic over the inbound stream, so it
//! can be driven by a channel as well as by a network stream.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::auth::{Principal, Scope};
use crate::fanout::{Behind, Notice, Subscriber};
use crate::pb::{self, watch_request::Request as In, watch_response::Response as Out};
use crate::store::Store;
use crate::validate::Limits;

/// Most notices per batch written to the stream.
const BATCH: usize = 512;

/// A notice as `sub` may see it (its cause hidden when out of scope).
fn notice(n: &Notice, sub: &Subscriber) -> pb::Notice {
    pb::Notice {
        seq: n.seq,
        key: n.key.to_string(),
        version: n.version,
        cause: sub.visible_cause(&n.cause).to_owned(),
        critical: n.critical,
        event_time_unix_ms: n.event_time_ms,
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
        response: Some(Out::Notices(pb::NoticeBatch { notices })),
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
fn check_keys(
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

/// Validates a stream's first message and registers it. On success the
/// returned stream yields its responses; dropping it unregisters the stream. `owner` is the authenticated principal, if any: its watch scope
/// bounds what the stream may track and see, and its quotas count the stream.
/// Its name prefixes the stream's client id (`principal/client_id`), so one
/// principal cannot pass for another's client.
pub fn start<S>(
    store: Arc<Store>,
    limits: Limits,
    owner: Option<Arc<Principal>>,
    first: Option<pb::WatchRequest>,
    inbound: S,
) -> Result<Responses, Status>
where
    S: Stream<Item = Result<pb::WatchRequest, Status>> + Unpin + Send + 'static,
{
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
    let store_shutdown = store.hub().shutdown_signal();
    let state = Watch {
        _registration: Registered {
            store: store.clone(),
            sub: sub.clone(),
        },
        store,
        limits,
        sub,
        from,
        resumed: resume.is_some(),
        inbound,
        shutdown: store_shutdown,
        pending: VecDeque::new(),
        started: false,
        done: false,
        buf: Vec::new(),
    };
    Ok(Box::pin(futures_util::stream::unfold(
        state,
        |mut state| async move { state.next().await.map(|m| (m, state)) },
    )))
}

/// The response stream of one Watch.
pub type Responses = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

type Message = Result<pb::WatchResponse, Status>;

/// Unregisters the stream when its response stream is dropped: the client
/// went away, the stream ended, or the server stopped.
struct Registered {
    store: Arc<Store>,
    sub: Arc<Subscriber>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.store.hub().unsubscribe(&self.sub);
    }
}

/// One stream's state. The response stream polls it directly, from the
/// connection's own task: a publish wakes that task, which drains the queue
/// and writes, with no task or channel in between.
struct Watch<S> {
    /// Held for its `Drop`.
    _registration: Registered,
    store: Arc<Store>,
    limits: Limits,
    sub: Arc<Subscriber>,
    from: u64,
    resumed: bool,
    inbound: S,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Messages decided and not yet taken by the response stream.
    pending: VecDeque<Message>,
    started: bool,
    done: bool,
    buf: Vec<Arc<Notice>>,
}

impl<S> Watch<S>
where
    S: Stream<Item = Result<pb::WatchRequest, Status>> + Unpin + Send + 'static,
{
    /// The next message, or `None` when the stream ends.
    async fn next(&mut self) -> Option<Message> {
        loop {
            if let Some(m) = self.pending.pop_front() {
                return Some(m);
            }
            if self.done {
                return None;
            }
            if !self.started {
                self.started = true;
                self.begin();
                continue;
            }
            self.step().await;
        }
    }

    fn push(&mut self, message: pb::WatchResponse) {
        self.pending.push_back(Ok(message));
    }

    fn started_message(&self, outcome: pb::ResumeOutcome) -> pb::WatchResponse {
        pb::WatchResponse {
            response: Some(Out::Started(pb::WatchStarted {
                epoch: self.store.epoch(),
                seq: self.from,
                outcome: outcome.into(),
            })),
        }
    }

    /// `started`, after the catch-up a resume owes, so that it names what
    /// happened.
    fn begin(&mut self) {
        let outcome = if self.resumed {
            let (early, outcome) = catch_up(&self.store, &self.sub);
            self.push(self.started_message(outcome));
            self.pending.extend(early.into_iter().map(Ok));
            outcome
        } else {
            self.push(self.started_message(pb::ResumeOutcome::New));
            pb::ResumeOutcome::New
        };
        self.store.metrics().resume(match outcome {
            pb::ResumeOutcome::FromHistory => "from_history",
            pb::ResumeOutcome::Repaired => "repaired",
            _ => "new",
        });
    }

    /// The catch-up owed, if the stream is behind.
    fn catch_up_if_behind(&mut self) {
        if self.sub.behind().is_some() {
            let (messages, _) = catch_up(&self.store, &self.sub);
            self.pending.extend(messages.into_iter().map(Ok));
        }
    }

    /// Takes one batch from the queue; false when it was empty.
    fn drain_batch(&mut self) -> bool {
        self.buf.clear();
        self.sub.drain(BATCH, &mut self.buf);
        if self.buf.is_empty() {
            return false;
        }
        self.sub.sent(&self.buf);
        let message = batch(self.buf.iter().map(|n| notice(n, &self.sub)).collect());
        self.push(message);
        true
    }

    /// Everything queued (catching up as needed), then progress at `seq`, a
    /// seq read before the drain.
    fn flush_with_progress(&mut self, seq: u64) {
        loop {
            self.catch_up_if_behind();
            if !self.drain_batch() {
                break;
            }
        }
        self.push(progress(&self.store, seq));
    }

    /// Decides the next messages, waiting for work when there is none.
    async fn step(&mut self) {
        let hub = self.store.hub();
        if *self.shutdown.borrow() {
            // Drain: a final watermark, so the client resumes elsewhere
            // without loss.
            let seq = hub.fanned();
            self.flush_with_progress(seq);
            self.pending.push_back(Err(Status::unavailable(format!(
                "freshd is shutting down; resume elsewhere with token (epoch {}, seq {seq})",
                self.store.epoch()
            ))));
            self.done = true;
            return;
        }
        self.catch_up_if_behind();
        if !self.pending.is_empty() || self.drain_batch() {
            return;
        }
        let request = tokio::select! {
            _ = self.shutdown.changed() => return,
            () = self.sub.wake.notified() => return,
            request = self.inbound.next() => request,
        };
        match request {
            Some(Ok(request)) => {
                if let Err(status) = self.handle(request) {
                    self.pending.push_back(Err(status));
                    self.done = true;
                }
            }
            // The client closed its side or went away.
            Some(Err(_)) | None => self.done = true,
        }
    }

    /// Applies one client request.
    fn handle(&mut self, request: pb::WatchRequest) -> Result<(), Status> {
        let hub = self.store.hub();
        let sub = &self.sub;
        match request.request {
            None => Err(Status::invalid_argument(
                "a Watch request must set one field",
            )),
            Some(In::Start(_)) => Err(Status::invalid_argument(
                "`start` may only be the first message of a Watch stream",
            )),
            Some(In::Track(list)) => {
                check_keys(&self.limits, sub.owner(), "track.keys", &list.keys, false)?;
                hub.add(sub, &list.keys, &[])
                    .map_err(Status::resource_exhausted)
            }
            Some(In::Untrack(list)) => {
                hub.untrack(sub, &list.keys);
                Ok(())
            }
            Some(In::Subscribe(list)) => {
                check_keys(
                    &self.limits,
                    sub.owner(),
                    "subscribe.keys",
                    &list.keys,
                    true,
                )?;
                hub.add(sub, &[], &list.keys)
                    .map_err(Status::resource_exhausted)
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
                self.flush_with_progress(seq);
                Ok(())
            }
        }
    }
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

fn reset(prefix: String, since: u64, reason: pb::ResetReason) -> pb::WatchResponse {
    pb::WatchResponse {
        response: Some(Out::Reset(pb::Reset {
            prefix,
            since,
            reason: reason.into(),
        })),
    }
}
