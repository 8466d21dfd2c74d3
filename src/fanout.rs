//! Fan-out: routing notices to Watch streams through bounded, conflating
//! queues, the resume history, and catch-up after a resume or an overflow.
//!
//! # Flow
//! A publish, still holding the store's sequencer (so fan-outs run in seq
//! order), calls [`Hub::fanout`]: the notices go into the history, then into
//! the queue of every subscriber that tracks the key or watches a prefix of
//! it, then `fanned` moves to the publish's seq. Each stream's task drains its
//! queue and writes batches to the network at the client's pace; a stream
//! whose task is parked with nothing queued is written by the publish
//! instead, through its [`Express`] writer: the fan-out claims it and
//! returns a [`Delivery`], which writes it once the publish has let go of
//! the sequencer (or, on a connection's driver, once the driver has
//! answered the calls of its read: [`DeliverLater`]).
//!
//! # Slow consumers
//! A queue holds at most `queue_notices` live notices and `queue_bytes`
//! bytes of them; a newer notice for a
//! key already queued replaces it (conflation: the latest version wins, and
//! it moves to the tail so seq order holds). A queue that is still full goes
//! *behind*: it is emptied, publishers only note the highest seq it missed,
//! and the stream's task catches it up from the history when the history
//! still covers the gap, or else by repair (a notice for each tracked key that
//! changed, a reset for each prefix). Publishers never wait for a stream.
//!
//! # Locks
//! Order: store sequencer -> `routes` -> `history` -> one subscriber's
//! `queue` or `filters`. The stream task takes a queue lock alone, or
//! `history` alone, or the store's shard locks alone. A delivery takes a
//! stream's connection lock, then its queue lock, and holds no lock of the
//! hub's. No lock is held across an `.await`.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::BytesMut;
use hashbrown::{HashMap, HashSet};
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use crate::auth::{Principal, QuotaExceeded, Scope};
use crate::metrics::{unix_ms, BatchHistogram, Label, Metrics, Tally};
use crate::store::{Key, KeyHash};

/// One key changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The seq of the change.
    pub seq: u64,
    /// The key.
    pub key: Key,
    /// Its version after the change.
    pub version: u64,
    /// The published key that caused it; empty in a repair.
    pub cause: Key,
    /// The critical bit.
    pub critical: bool,
    /// The producer's event time, Unix ms.
    pub event_time_ms: u64,
    /// The publishing client's id, for no-loop.
    pub origin: Option<Arc<str>>,
    /// What the first stream that writes the notice works out and the
    /// rest share: its encoding, its namespace's label and histogram.
    pub cache: NoticeCache,
}

impl Notice {
    /// Rough heap and inline size, for the history's byte bound (the
    /// encoded copy included).
    fn bytes(&self) -> usize {
        std::mem::size_of::<Notice>()
            + 2 * (self.key.len() + self.cause.len())
            + self.origin.as_ref().map_or(0, |o| o.len())
            + 64
    }

    /// The notice as `NoticeBatch.notices` entry bytes, for a stream that
    /// may see its cause; encoded on the first call.
    pub fn entry(&self) -> &[u8] {
        self.cache.wire.get_or_init(|| {
            let mut out = Vec::with_capacity(self.key.len() + self.cause.len() + 40);
            crate::wire::encode_entry(&self.fields(&self.cause), &mut out);
            out.into_boxed_slice()
        })
    }

    /// The key's namespace label and its histogram of delays to `written`,
    /// resolved on the first call: a thousand streams that write the
    /// notice resolve it once.
    fn namespace(&self, metrics: &Metrics) -> &(Label, Option<BatchHistogram>) {
        self.cache.namespace.get_or_init(|| {
            let label = metrics.namespace_label(&self.key);
            let written = metrics.delay_histogram(&label, "written");
            (label, written)
        })
    }

    /// The fields to encode, with the cause a stream may see.
    pub fn fields<'a>(&'a self, cause: &'a str) -> crate::wire::NoticeFields<'a> {
        crate::wire::NoticeFields {
            seq: self.seq,
            key: &self.key,
            version: self.version,
            cause,
            critical: self.critical,
            event_time_unix_ms: self.event_time_ms,
        }
    }
}

/// What is worked out from a notice once, by the first stream that needs
/// it, and shared by the rest. It takes no part in comparisons: two notices
/// are equal when their fields are.
#[derive(Debug, Clone, Default)]
pub struct NoticeCache {
    /// The notice encoded for the wire, cause included.
    wire: OnceLock<Box<[u8]>>,
    /// The key's namespace label, and its histogram of delays to `written`
    /// when metrics are on.
    namespace: OnceLock<(Label, Option<BatchHistogram>)>,
}

impl PartialEq for NoticeCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for NoticeCache {}

/// Limits of the fan-out. Each is a setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// Most notices kept for resumes.
    pub history_notices: usize,
    /// Most bytes of notices kept for resumes.
    pub history_bytes: usize,
    /// Most notices queued for one stream before it is caught up instead.
    pub queue_notices: usize,
    /// Most bytes of notices queued for one stream.
    pub queue_bytes: usize,
    /// Most keys one stream may track.
    pub max_tracked_keys: usize,
    /// Most prefixes one stream may watch.
    pub max_prefixes: usize,
    /// A fan-out that begins sooner than this after the last delivery's
    /// writes finished leaves its messages to the connections' drivers, to
    /// go out with what follows in fewer writes, and so do the fan-outs
    /// that follow it within four times this of each other; zero writes
    /// every fan-out's messages with it.
    pub coalesce: std::time::Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            history_notices: 100_000,
            history_bytes: 64 << 20,
            queue_notices: 10_000,
            queue_bytes: 16 << 20,
            max_tracked_keys: 100_000,
            max_prefixes: 1_000,
            coalesce: std::time::Duration::from_millis(2),
        }
    }
}

/// Why a stream must be caught up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behind {
    /// A resume from this seq of the current epoch.
    Resume,
    /// A resume from another epoch.
    NewEpoch,
    /// The queue overflowed.
    SlowConsumer,
}

/// What pushing a notice did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pushed {
    Queued,
    Conflated,
    Overflowed,
    /// The stream is behind: the notice will come with its catch-up.
    Missed,
}

/// What a stream's queue is doing. Boxed when behind, which is rare, so
/// that the state takes one word of the queue's first line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Live,
    Behind(Box<Gap>),
}

/// Everything in `(since, through]` that matches must be caught up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gap {
    since: u64,
    through: u64,
    why: Behind,
}

impl State {
    fn behind(since: u64, through: u64, why: Behind) -> Self {
        State::Behind(Box::new(Gap {
            since,
            through,
            why,
        }))
    }
}

/// A stream's queue. In declaration order (`repr(C)`): what a fan-out
/// and its delivery read and write for a stream they reach with one
/// notice comes first, so that with the [`Subscriber`]'s own first fields
/// it spans two cache lines, not one line per field scattered over the
/// struct; with a thousand streams per publish, each line is a cache miss
/// per stream. The first line (the lock, the state) the fan-out reads ahead
/// for every stream before it takes any lock; the second (the writer and
/// the sent record) is the one miss it waits for under the lock.
#[repr(C)]
struct Queue {
    /// Someone is writing the stream's messages: its task, from its start
    /// until it parks with nothing queued ([`Subscriber::park`]), or a
    /// fan-out writing through [`Queue::express`] meanwhile. Whoever holds
    /// it is the only writer, so messages leave in seq order and a progress
    /// mark follows every notice it covers.
    busy: bool,
    /// The client's side of the stream has news (see
    /// [`Subscriber::client_news`]). Kept here, beside what the stream's task
    /// reads on every wake, so checking it touches no other memory.
    client_news: bool,
    indexed: bool,
    /// Notices queued (at most `queue_notices`, and never past `u32::MAX`:
    /// four bytes that keep `drained_through` in the first line).
    live: u32,
    state: State,
    /// The highest seq handed to the stream's writer.
    drained_through: u64,
    /// The stream's writer, when a fan-out may write through it
    /// ([`Subscriber::set_express`]).
    express: Option<ExpressWriter>,
    /// The newest batch written and not yet acknowledged: kept under the
    /// lock a writer holds anyway when it takes the batch, in the line a
    /// fan-out's claim reads for `express`, where the delivery's write
    /// costs no cache miss.
    sent: Sent,
    bytes: usize,
    items: VecDeque<Option<Arc<Notice>>>,
    /// Absolute position of `items[0]`.
    base: u64,
    /// Key -> absolute position of its queued notice, kept only while the
    /// queue is `indexed`; a short queue is searched instead, which spares
    /// the common case (a notice queued and drained before the next) three
    /// hash operations per delivery.
    latest: HashMap<Key, u64, KeyHash>,
    overflows: u64,
    conflations: u64,
    /// The unacknowledged batches before `sent`'s, oldest first, at most
    /// [`SENT_BATCHES`]` - 1`: out of the lines a fan-out touches, since
    /// only a client whose acks lag a batch or more behind has any.
    sent_before: VecDeque<Batch>,
}

impl Queue {
    /// Takes `busy` for a fan-out that writes through the stream's express
    /// writer: only while the stream's task is parked with nothing behind.
    fn claim_express(&mut self) -> Option<&ExpressWriter> {
        if self.busy || self.state != State::Live {
            return None;
        }
        let express = self.express.as_ref()?;
        self.busy = true;
        Some(express)
    }

    /// Whether `notice` would be queued alone, neither conflating nor
    /// overflowing: nothing is queued and it fits the bounds by itself.
    fn takes_alone(&self, notice: &Notice, config: &HubConfig) -> bool {
        self.live == 0 && config.queue_notices > 0 && notice.bytes() <= config.queue_bytes
    }

    /// Puts back, ahead of everything queued since, a notice a fan-out took
    /// without queueing and could not write. A newer notice of its key
    /// queued meanwhile conflates it; a stream gone behind meanwhile
    /// catches up from before it.
    fn requeue(&mut self, notice: &Arc<Notice>) {
        let newer: Vec<Arc<Notice>> = self.items.drain(..).flatten().collect();
        let (live, bytes) = (self.live as usize, self.bytes);
        self.clear();
        // The same bounds as a fan-out's push: the notices were queued
        // behind one that only now counts.
        let cap = newer.len() + 1;
        let cap_bytes = bytes + notice.bytes();
        debug_assert_eq!(live, newer.len());
        for n in std::iter::once(notice).chain(&newer) {
            self.push(n, cap, cap_bytes);
        }
    }

    fn clear(&mut self) {
        self.base += self.items.len() as u64;
        self.items.clear();
        self.latest.clear();
        self.indexed = false;
        self.live = 0;
        self.bytes = 0;
    }

    /// Queues a notice; says whether it was queued, conflated an older
    /// one, or overflowed the queue.
    fn push(&mut self, notice: &Arc<Notice>, cap: usize, cap_bytes: usize) -> Pushed {
        if let State::Behind(gap) = &mut self.state {
            gap.through = gap.through.max(notice.seq);
            return Pushed::Missed;
        }
        let mut pushed = Pushed::Queued;
        if let Some(pos) = self.find(&notice.key) {
            if let Some(old) = self.items[(pos - self.base) as usize].take() {
                self.bytes -= old.bytes();
            }
            self.live -= 1;
            self.conflations += 1;
            pushed = Pushed::Conflated;
        }
        if self.live as usize >= cap.min(u32::MAX as usize)
            || self.bytes + notice.bytes() > cap_bytes
        {
            self.overflows += 1;
            self.state = State::behind(self.drained_through, notice.seq, Behind::SlowConsumer);
            self.clear();
            return Pushed::Overflowed;
        }
        if self.items.len() >= cap.saturating_mul(2).max(16) {
            self.compact();
        }
        if self.indexed {
            self.latest
                .insert(notice.key.clone(), self.base + self.items.len() as u64);
        }
        self.items.push_back(Some(notice.clone()));
        if !self.indexed && self.items.len() > SEARCHED {
            self.index();
        }
        self.live += 1;
        self.bytes += notice.bytes();
        pushed
    }

    /// The absolute position of the queued notice for `key`, if any.
    fn find(&self, key: &Key) -> Option<u64> {
        if self.indexed {
            return self.latest.get(key).copied();
        }
        self.items
            .iter()
            .rposition(|item| {
                item.as_ref()
                    .is_some_and(|n| Arc::ptr_eq(&n.key, key) || n.key == *key)
            })
            .map(|i| self.base + i as u64)
    }

    /// Builds the key index, for a queue grown past [`SEARCHED`].
    fn index(&mut self) {
        self.latest.clear();
        for (i, item) in self.items.iter().enumerate() {
            if let Some(n) = item {
                self.latest.insert(n.key.clone(), self.base + i as u64);
            }
        }
        self.indexed = true;
    }

    /// Drops the holes left by conflation.
    fn compact(&mut self) {
        let items: Vec<Arc<Notice>> = self.items.drain(..).flatten().collect();
        self.items.extend(items.into_iter().map(Some));
        if self.indexed {
            self.index();
        }
    }

    /// Takes up to `max` notices, more only to finish the last seq taken, so
    /// that a batch never splits a seq.
    fn drain(&mut self, max: usize, out: &mut Vec<Arc<Notice>>) {
        while let Some(front) = self.items.front() {
            if out.len() >= max {
                match (front, out.last()) {
                    (Some(next), Some(last)) if next.seq == last.seq => {}
                    (None, _) => {}
                    _ => break,
                }
            }
            let item = self.items.pop_front().expect("front exists");
            let pos = self.base;
            self.base += 1;
            if let Some(n) = item {
                if self.indexed && self.latest.get(&n.key) == Some(&pos) {
                    self.latest.remove(&n.key);
                }
                self.live -= 1;
                self.bytes -= n.bytes();
                self.drained_through = self.drained_through.max(n.seq);
                out.push(n);
            }
        }
        if self.items.is_empty() && self.indexed {
            self.latest.clear();
            self.indexed = false;
        }
    }
}

/// The streams a fan-out claimed to write itself: parked streams with an
/// [`Express`] writer, whose `busy` it holds. Dropping it writes their
/// notices (and wakes the task of each stream it could not write all of),
/// or, within a [`DeliverLater`] on this thread, leaves that to it. Drop
/// it after the locks its fan-out ran under: a notice costs a socket write
/// here, and other publishes need not wait for those.
#[derive(Default)]
#[must_use = "dropping it writes the notices"]
pub struct Delivery {
    claimed: Vec<Claim>,
    /// The fan-out's notices, which claims name by index: none is cloned
    /// per stream.
    notices: Vec<Arc<Notice>>,
    /// The hub's note of when its last writes finished, and its metrics
    /// (passed to each stream's write, not read from each stream: that
    /// field lies lines away from what else a write touches, a cache miss
    /// per stream).
    hub: Option<(Arc<AtomicU64>, Arc<Metrics>)>,
}

/// Most entries a spare buffer keeps for the next fan-out ([`SPARE`]):
/// about 1.1 MiB of room per thread at most; a larger fan-out allocates
/// its own.
const SPARE_ENTRIES: usize = 1 << 14;

/// A fan-out's buffers, kept on its thread for the next: with 1,000 streams
/// to a publish its targets (24 KiB) and claims (48 KiB) are large
/// allocations, each a trip to the allocator's arena and back per publish.
#[derive(Default)]
struct Spare {
    /// Targets' room, as the fan-out's type without its borrow.
    targets: Vec<(usize, usize, usize)>,
    claims: Vec<Claim>,
}

/// `buffer`'s allocation, emptied, as a vector of another type of the same
/// size and alignment (the standard library's collect in place keeps it).
fn recycle<T, U>(mut buffer: Vec<T>) -> Vec<U> {
    buffer.clear();
    buffer.into_iter().map(|_| unreachable!("empty")).collect()
}

/// Puts room back in this thread's [`SPARE`] (not once the thread's
/// locals are being torn down: a delivery dropped then frees its own).
fn give_back(put: impl FnOnce(&mut Spare)) {
    let _ = SPARE.try_with(|spare| put(&mut spare.borrow_mut()));
}

thread_local! {
    /// This thread's spare fan-out buffers.
    static SPARE: std::cell::RefCell<Spare> = std::cell::RefCell::default();

    /// The deliveries dropped within a [`DeliverLater`].
    static LATER: std::cell::RefCell<Option<Vec<Delivery>>> =
        const { std::cell::RefCell::new(None) };
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if self.claimed.is_empty() {
            return;
        }
        let mut held = Some(Delivery {
            claimed: std::mem::take(&mut self.claimed),
            notices: std::mem::take(&mut self.notices),
            hub: self.hub.take(),
        });
        LATER.with_borrow_mut(|later| {
            if let Some(later) = later {
                later.extend(held.take());
            }
        });
        if let Some(mut delivery) = held {
            // Named by every fan-out before it claims a stream.
            let Some((written, metrics)) = delivery.hub.take() else {
                return;
            };
            let mut batch = Vec::new();
            let mut recording = Recording::default();
            // Streams that share a connection are written together and
            // sent with one write; a stream alone on its connection is
            // sent as soon as it is framed.
            let claimed = &mut delivery.claimed;
            claimed.sort_unstable_by_key(|claim| claim.connection_id);
            let notices = &delivery.notices;
            for group in claimed.chunk_by(|a, b| a.connection_id == b.connection_id) {
                let connection = group
                    .iter()
                    .find_map(|claim| claim.connection.as_ref())
                    .expect("a claim of each connection holds it");
                let holds = group.chunks(WRITES_PER_HOLD);
                let last = holds.len() - 1;
                for (i, hold) in holds.enumerate() {
                    let flush = if i == last {
                        Flush::Through
                    } else {
                        Flush::Hold
                    };
                    connection.locked(flush, &mut |writes| {
                        // Every stream's state on the connection first, in
                        // a pass that takes no lock: its cache misses
                        // overlap one another instead of each waiting
                        // behind a stream's write (a lock is a full fence).
                        let mut bytes = 0;
                        for claim in hold {
                            writes.look_ahead(claim.stream);
                            bytes += claim
                                .notice
                                .map_or(0, |i| notices[i as usize].entry().len());
                        }
                        writes.warm_output(bytes + hold.len() * FRAMING);
                        for claim in hold {
                            claim.sub.express(
                                &metrics,
                                writes,
                                claim.stream,
                                claim.max_message as usize,
                                claim.notice.map(|i| &notices[i as usize]),
                                &mut batch,
                                &mut recording,
                            );
                        }
                    });
                }
            }
            claimed.clear();
            if claimed.capacity() <= SPARE_ENTRIES {
                let claims = std::mem::take(claimed);
                give_back(|spare| spare.claims = claims);
            }
            written.store(micros(), Ordering::Relaxed);
        }
    }
}

/// What a run of writes records: the wall clock, in Unix ms, read afresh
/// every [`CLOCK_READS`] writes (which at a few microseconds a write keeps
/// it well within the millisecond it reports, at a fraction of the reads),
/// and the delays to `written`, gathered in one tally per run of a
/// namespace and recorded when the run ends (or the recording is dropped),
/// not once per stream.
#[derive(Default)]
struct Recording {
    ms: u64,
    left: u32,
    run: Option<BatchHistogram>,
    tally: Tally,
}

/// Writes one read of [`Clock`] serves.
const CLOCK_READS: u32 = 16;

impl Recording {
    fn now(&mut self) -> u64 {
        if self.left == 0 {
            self.ms = unix_ms();
            self.left = CLOCK_READS;
        }
        self.left -= 1;
        self.ms
    }

    /// Notes a delay of `delay` seconds to `histogram`.
    fn observe(&mut self, histogram: &BatchHistogram, delay: f64) {
        if !self.run.as_ref().is_some_and(|run| run.same(histogram)) {
            if let Some(done) = self.run.replace(histogram.clone()) {
                done.add(&mut self.tally);
            }
        }
        histogram.tally(&mut self.tally, delay);
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(done) = self.run.take() {
            done.add(&mut self.tally);
        }
    }
}

/// Microseconds since the first call, plus one (0 means never).
fn micros() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64 + 1
}

/// Holds the [`Delivery`]s dropped on this thread from its making until it
/// is dropped, and runs them then: a connection's driver answers the calls
/// of one read (a publisher hears back) before their notices are written.
/// Dropped by a panic too, so no claim is left held.
pub struct DeliverLater {
    /// What was held before (`None` but in nested use).
    previous: Option<Vec<Delivery>>,
}

impl DeliverLater {
    /// Starts holding this thread's deliveries.
    pub fn start() -> Self {
        DeliverLater {
            previous: LATER.replace(Some(Vec::new())),
        }
    }
}

impl Drop for DeliverLater {
    fn drop(&mut self) {
        // Restored first: dropped now, each delivery writes.
        drop(LATER.replace(self.previous.take()));
    }
}

/// What an [`Express`] writer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrote {
    /// The message went to the stream.
    Written,
    /// There was nothing to write.
    Nothing,
    /// The stream has no room: its task writes once it has.
    NoRoom,
    /// The stream is gone.
    Gone,
}

/// Where what an [`Express`] connection's writes framed goes once its lock
/// is let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// On to the network now, as far as the socket takes it without
    /// waiting (the connection's writer takes the rest).
    Through,
    /// To whoever writes the connection, to go out with what else gathers
    /// meanwhile.
    Driver,
    /// Nowhere yet: the fan-out writes more of the connection's streams
    /// next, and sends them all at once.
    Hold,
}

/// A connection whose streams a fan-out may write itself, while their
/// tasks are parked: a notice then costs no wake-up of a task and no trip
/// through the scheduler. An HTTP/2 connection served by `crate::conn` is
/// one; a stream served through a channel has none, and its task writes
/// everything.
pub trait Express: Send + Sync {
    /// Runs `writes` under the connection's lock (one hold for any number
    /// of its streams), then sends what they framed as `flush` says.
    fn locked(&self, flush: Flush, writes: &mut dyn FnMut(&mut dyn StreamWrites));
}

/// The streams of an [`Express`] connection, while its lock is held.
pub trait StreamWrites {
    /// If `stream` is there and has room, writes the message `next` makes.
    /// `next` is given `max_message`, the largest message allowed, and a
    /// buffer; it appends to the buffer one `WatchResponse`'s encoding
    /// within that size, and answers false when it has nothing that fits.
    /// `next` takes the stream's queue's lock.
    fn write(
        &mut self,
        stream: u32,
        max_message: usize,
        next: &mut dyn FnMut(usize, &mut BytesMut) -> bool,
    ) -> Wrote;

    /// A write to `stream` follows soon: reading its state now, in a pass
    /// over the writes to come that takes no lock, overlaps its cache
    /// misses with theirs instead of waiting for each one behind the write
    /// before it. Does nothing by default.
    fn look_ahead(&mut self, _stream: u32) {}

    /// About `bytes` are written next: the output they go to is made
    /// ready for them now, in a run of stores that takes no lock, so that
    /// the writes find its lines at hand instead of each lock waiting for
    /// the last write's lines to be fetched. Does nothing by default.
    fn warm_output(&mut self, _bytes: usize) {}
}

/// A stream's express writer: its connection and the stream there. Held in
/// the stream's queue, so a fan-out reaches it without touching memory of
/// its own: the connection, shared by its streams, is warm after the first.
#[derive(Clone)]
pub struct ExpressWriter {
    /// The connection.
    pub connection: Arc<dyn Express>,
    /// The stream's identifier on it.
    pub stream: u32,
    /// Most bytes one message to the stream may take (`max_message_bytes`
    /// is at most 1 GiB; a `u32` keeps the writer in three words).
    pub max_message: u32,
}

impl ExpressWriter {
    /// The connection, as a number: writers of streams that share one
    /// answer the same, writers on different ones differ.
    fn connection_id(&self) -> usize {
        Arc::as_ptr(&self.connection) as *const () as usize
    }
}

/// A parked stream a fan-out claimed (it holds the stream's `busy`), to be
/// written by its [`Delivery`].
struct Claim {
    /// [`ExpressWriter::connection_id`].
    connection_id: usize,
    sub: Arc<Subscriber>,
    stream: u32,
    /// [`ExpressWriter::max_message`].
    max_message: u32,
    /// The stream's one notice from this fan-out (its index among the
    /// delivery's notices), when its queue was empty: written ahead of the
    /// queue, which it never entered (see [`Subscriber::express`]).
    notice: Option<u32>,
    /// The connection, held by the first claim on it (in the fan-out's
    /// order; again after [`HELD`] other connections), so that every
    /// connection a delivery writes is held at least once, without a
    /// reference count taken per stream.
    connection: Option<Arc<dyn Express>>,
}

/// What a stream's message adds to its notices' entries, about: the
/// HTTP/2 frame head (9 bytes), the gRPC prefix (5) and the message's own
/// field heads.
const FRAMING: usize = 24;

/// Connections a fan-out remembers holding (see [`Claim::connection`]).
const HELD: usize = 16;

/// Streams of one connection written per hold of its lock: a connection
/// with thousands of streams does not keep its driver out for all of them.
const WRITES_PER_HOLD: usize = 128;

/// What a stream asked to receive.
#[derive(Default)]
pub struct Filters {
    /// Exact keys (tracking mode).
    pub tracked: HashSet<Key, KeyHash>,
    /// Prefixes (broadcast mode).
    pub prefixes: BTreeSet<String>,
}

impl Filters {
    /// Whether a notice for `key` matches.
    pub fn matches(&self, key: &str) -> bool {
        self.tracked.contains(key) || self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }
}

/// One Watch stream, as the hub sees it. In declaration order
/// (`repr(C)`): what a fan-out reads of every stream it reaches first,
/// beside the reference counts, then the queue (see `Queue`), then the
/// rest.
#[repr(C)]
pub struct Subscriber {
    /// The principal whose watch scope bounds what the stream may see;
    /// `None` when authentication is off.
    owner: Option<Arc<Principal>>,
    no_loop: bool,
    queue: Mutex<Queue>,
    /// Read by route changes and stats, never by a fan-out (which tells
    /// streams apart by address), so kept out of the lines it touches.
    id: u64,
    /// The client's id, for no-loop and stats: read only for a notice
    /// whose publisher named a client id, so kept out of the first line.
    pub client_id: Arc<str>,
    /// Woken when the queue gets work.
    pub wake: Notify,
    /// What the stream wants.
    pub filters: Mutex<Filters>,
    acked: AtomicU64,
    /// Event-to-acknowledgement delay of the last acknowledged batch, ms.
    ack_delay_ms: AtomicU64,
    /// Repair notices sent after a missed invalidation, awaiting an ack:
    /// `(seq, namespace)`, bounded.
    repairs_awaiting_ack: Mutex<VecDeque<(u64, Label)>>,
    /// Keys found behind by a check, awaiting the fill that repairs them;
    /// bounded.
    repairs_awaiting_fill: Mutex<HashMap<Key, Label, KeyHash>>,
    metrics: Arc<Metrics>,
}

/// A batch written to a stream, for its acknowledgement delay: `(last seq,
/// oldest event time in Unix ms, that notice's namespace)`.
type Batch = (u64, u64, Label);

/// The newest batch a stream has written and not yet had acknowledged (the
/// ones before it are [`Queue::sent_before`]).
#[derive(Default)]
struct Sent {
    newest: Option<Batch>,
    /// `newest` stands for every batch written since the record filled: a
    /// client this far behind on its acknowledgements costs no more memory,
    /// and every later ack still measures from the oldest event time it
    /// covers. A client that acks each batch before the next, or never
    /// acks, touches nothing of the record but this.
    merged: bool,
}

impl Queue {
    /// Notes a batch written to the stream: its delays to `written`, and
    /// what its acknowledgement will be measured from.
    fn record_sent(
        &mut self,
        metrics: &Metrics,
        notices: &[Arc<Notice>],
        recording: &mut Recording,
    ) {
        let (Some(last), Some(oldest)) = (
            notices.last().map(|n| n.seq),
            notices.iter().min_by_key(|n| n.event_time_ms),
        ) else {
            return;
        };
        if metrics.enabled() {
            let now = recording.now();
            for n in notices {
                if let Some(histogram) = &n.namespace(metrics).1 {
                    let delay = now.saturating_sub(n.event_time_ms) as f64 / 1000.0;
                    recording.observe(histogram, delay);
                }
            }
        }
        match &mut self.sent.newest {
            Some(newest) if self.sent.merged => {
                newest.0 = last;
                newest.1 = newest.1.min(oldest.event_time_ms);
            }
            Some(newest) => {
                let batch = (
                    last,
                    oldest.event_time_ms,
                    oldest.namespace(metrics).0.clone(),
                );
                self.sent_before.push_back(std::mem::replace(newest, batch));
                self.sent.merged = self.sent_before.len() + 1 >= SENT_BATCHES;
            }
            None => {
                let label = oldest.namespace(metrics).0.clone();
                self.sent.newest = Some((last, oldest.event_time_ms, label));
            }
        }
    }

    /// Takes the batches an acknowledgement of `seq` covers: the older
    /// ones, oldest first, then the newest if it is covered. An ack that
    /// keeps up takes the newest alone, without allocating.
    fn take_acked(&mut self, seq: u64) -> (Vec<Batch>, Option<Batch>) {
        let n = self
            .sent_before
            .iter()
            .take_while(|(s, _, _)| *s <= seq)
            .count();
        let older: Vec<Batch> = self.sent_before.drain(..n).collect();
        // The newest follows every batch before it.
        let newest = match &self.sent.newest {
            Some(b) if b.0 <= seq => self.sent.newest.take(),
            _ => None,
        };
        // With room again, a merged newest is kept as one batch and the
        // next is remembered on its own.
        self.sent.merged &= older.is_empty() && newest.is_none();
        (older, newest)
    }

    /// Batches remembered.
    #[cfg(test)]
    fn sent_len(&self) -> usize {
        self.sent_before.len() + usize::from(self.sent.newest.is_some())
    }
}

/// Longest queue (holes included) searched for conflation instead of
/// indexed.
const SEARCHED: usize = 16;

/// Repairs remembered per stream while they await their ack or fill.
const PENDING_REPAIRS: usize = 4096;

/// Unacknowledged batches remembered one by one per stream, for
/// acknowledgement delays; the last of them and every batch after it are
/// remembered as one until an ack covers them.
const SENT_BATCHES: usize = 16;

impl Subscriber {
    /// Whether this stream wants a notice, before filters.
    fn wants_origin(&self, notice: &Notice) -> bool {
        !(self.no_loop
            && notice
                .origin
                .as_deref()
                .is_some_and(|o| !o.is_empty() && o == &*self.client_id))
    }

    /// Whether the stream's principal may see a notice for `key`. Routes
    /// only reach keys in scope; this holds the line if one did not.
    fn may_see(&self, key: &str) -> bool {
        self.owner
            .as_ref()
            .is_none_or(|p| p.allows_key(Scope::Watch, key))
    }

    /// The cause key a notice may show this stream: empty when the cause
    /// lies in a namespace outside its watch scope (a dependency edge across
    /// namespaces must not leak the name of the key that changed).
    pub fn visible_cause<'a>(&self, cause: &'a str) -> &'a str {
        if self.may_see(cause) {
            cause
        } else {
            ""
        }
    }

    /// The principal that owns the stream.
    pub fn owner(&self) -> Option<&Arc<Principal>> {
        self.owner.as_ref()
    }

    /// Records an acknowledgement, and the delay from the producer's event
    /// time of the oldest notice it covers.
    pub fn ack(&self, seq: u64) {
        self.acked.fetch_max(seq, Ordering::Relaxed);
        let (older, newest) = self.queue.lock().take_acked(seq);
        // Recorded with the queue let go: publishes queue notices under it.
        let mut oldest = None;
        let now = if older.is_empty() && newest.is_none() {
            0
        } else {
            unix_ms()
        };
        for (_, event, namespace) in older.iter().chain(&newest) {
            self.metrics
                .invalidation_delay(namespace, "acked", *event, now);
            oldest = Some(oldest.map_or(*event, |o: u64| o.min(*event)));
        }
        if let Some(event) = oldest {
            self.ack_delay_ms
                .store(now.saturating_sub(event), Ordering::Relaxed);
        }
        let mut awaiting = self.repairs_awaiting_ack.lock();
        while awaiting.front().is_some_and(|(s, _)| *s <= seq) {
            let (_, namespace) = awaiting.pop_front().expect("checked");
            self.metrics.repaired(&namespace, "ack", 1);
        }
    }

    /// The highest acknowledged seq.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Notes repair notices sent after missed invalidations.
    pub fn await_ack_for_repairs(&self, repairs: impl IntoIterator<Item = (u64, Label)>) {
        let mut awaiting = self.repairs_awaiting_ack.lock();
        for r in repairs {
            if awaiting.len() == PENDING_REPAIRS {
                awaiting.pop_front();
            }
            awaiting.push_back(r);
        }
    }

    /// Notes a key a check found behind, to count the fill that repairs it.
    pub fn await_fill_for_repair(&self, key: &str, namespace: Label) {
        let mut awaiting = self.repairs_awaiting_fill.lock();
        if awaiting.len() < PENDING_REPAIRS {
            awaiting.insert(Key::from(key), namespace);
        }
    }

    /// Counts a fill of `key` that repairs a missed invalidation.
    pub fn filled(&self, key: &str) {
        if let Some(namespace) = self.repairs_awaiting_fill.lock().remove(key) {
            self.metrics.repaired(&namespace, "fill", 1);
        }
    }

    /// Whether the stream tracks `key`.
    pub fn tracks(&self, key: &str) -> bool {
        self.filters.lock().tracked.contains(key)
    }

    /// Notes a batch written to the stream, for acknowledgement delays.
    pub fn sent(&self, notices: &[Arc<Notice>]) {
        let mut recording = Recording::default();
        self.queue
            .lock()
            .record_sent(&self.metrics, notices, &mut recording);
    }

    /// Lets fan-outs write this stream's live notices through `express`
    /// while its task is parked.
    pub fn set_express(&self, express: ExpressWriter) {
        self.queue.lock().express = Some(express);
    }

    /// Ends writing through the express writer: the stream's task is
    /// ending. (It also drops the writer's hold on the connection.)
    pub fn clear_express(&self) {
        self.queue.lock().express = None;
    }

    /// The stream's task is about to wait: it gives up `busy` if nothing is
    /// queued and the stream is live, and says so; otherwise it has work
    /// and keeps writing.
    pub fn park(&self) -> bool {
        let mut queue = self.queue.lock();
        if queue.live > 0 || queue.state != State::Live {
            return false;
        }
        queue.busy = false;
        true
    }

    /// The stream's task woke: it takes `busy` back, waiting out a fan-out
    /// that is writing through the express writer on another thread.
    pub async fn unpark(&self) {
        loop {
            {
                let mut queue = self.queue.lock();
                if !queue.busy {
                    queue.busy = true;
                    return;
                }
            }
            tokio::task::yield_now().await;
        }
    }

    /// Writes `notice` (a fan-out's notice that never entered the queue)
    /// and the queue to `stream` of a connection whose lock is held (this
    /// fan-out holds `busy`), then gives `busy` back, and wakes the
    /// stream's task unless that was all the stream needed (nothing left
    /// queued, nothing failed). A `notice` that could not be written goes
    /// to the front of the queue, for the task.
    #[allow(clippy::too_many_arguments)]
    fn express(
        &self,
        metrics: &Metrics,
        writes: &mut dyn StreamWrites,
        stream: u32,
        max_message: usize,
        notice: Option<&Arc<Notice>>,
        batch: &mut Vec<Arc<Notice>>,
        recording: &mut Recording,
    ) {
        batch.clear();
        let mut released = false;
        let mut taken = false;
        let wrote = writes.write(stream, max_message, &mut |max_message, out| {
            let mut queue = self.queue.lock();
            // `bytes` counts more than a notice's encoding takes, so a
            // queue within the limit makes a message within it.
            // (`bytes` is read only with something queued: it lies beyond
            // the two lines a lone notice's write touches.)
            let (live, bytes) = match notice {
                Some(n) if queue.live == 0 => (1, n.bytes()),
                Some(n) => (queue.live as usize + 1, queue.bytes + n.bytes()),
                None => (queue.live as usize, queue.bytes),
            };
            if live > crate::watch::BATCH || bytes + 64 > max_message || queue.state != State::Live
            {
                return false;
            }
            if let Some(n) = notice {
                queue.drained_through = queue.drained_through.max(n.seq);
                taken = true;
            }
            // The common case, a lone notice and nothing queued, is
            // written from the delivery's own.
            let notices = match notice {
                Some(n) if queue.live == 0 => std::slice::from_ref(n),
                _ => {
                    batch.extend(notice.cloned());
                    queue.drain(usize::MAX, batch);
                    &batch[..]
                }
            };
            if notices.is_empty() {
                return false;
            }
            // `next` is asked for a message only when the stream has room
            // for it: the batch is written.
            queue.record_sent(metrics, notices, recording);
            // With all of the queue taken, `busy` goes back now rather than
            // under one more hold of the queue's lock: the batch is framed
            // under the connection's lock, which any other writer of the
            // stream (its task, another fan-out) needs first, so nothing
            // overtakes it.
            if queue.live == 0 {
                queue.busy = false;
                released = true;
            }
            drop(queue);
            crate::watch::encode_live_batch(notices, self, out);
            true
        });
        if released {
            if wrote != Wrote::Written {
                self.wake.notify_one();
            }
            return;
        }
        let done = {
            let mut queue = self.queue.lock();
            if let Some(n) = notice.filter(|_| !taken) {
                queue.requeue(n);
            }
            queue.busy = false;
            matches!(wrote, Wrote::Written | Wrote::Nothing)
                && queue.live == 0
                && queue.state == State::Live
        };
        if !done {
            self.wake.notify_one();
        }
    }

    /// Notes that the client's side of the stream has news (a request, or
    /// its end) and wakes the stream's task, which polls for it then.
    pub fn client_news(&self) {
        self.queue.lock().client_news = true;
        self.wake.notify_one();
    }

    /// Whether the client's side had news since the last call.
    pub fn take_client_news(&self) -> bool {
        std::mem::take(&mut self.queue.lock().client_news)
    }

    /// Takes up to `max` queued notices, in seq order.
    pub fn drain(&self, max: usize, out: &mut Vec<Arc<Notice>>) {
        self.queue.lock().drain(max, out);
    }

    /// The catch-up owed, if the stream is behind: `(since, through, why)`.
    pub fn behind(&self) -> Option<(u64, u64, Behind)> {
        match &self.queue.lock().state {
            State::Live => None,
            State::Behind(gap) => Some((gap.since, gap.through, gap.why)),
        }
    }

    /// Ends a catch-up that covered everything up to `through`. Returns
    /// false, and moves `since` to `through`, if publishers noted newer
    /// misses meanwhile: catch up again from there.
    pub fn finish_catch_up(&self, covered: u64) -> bool {
        let mut queue = self.queue.lock();
        if let State::Behind(gap) = &mut queue.state {
            if gap.through > covered {
                gap.since = covered;
                return false;
            }
        }
        queue.state = State::Live;
        queue.drained_through = queue.drained_through.max(covered);
        true
    }

    /// Queued notices right now.
    pub fn queued(&self) -> usize {
        self.queue.lock().live as usize
    }
}

/// Per-stream figures for Stats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberStats {
    /// The client's id.
    pub client_id: String,
    /// The highest acknowledged seq.
    pub acked_seq: u64,
    /// Fanned-out seq minus acknowledged seq.
    pub lag: u64,
    /// Notices queued.
    pub queued: u64,
    /// Keys tracked.
    pub tracked_keys: u64,
    /// Prefixes watched.
    pub prefixes: u64,
    /// Times the queue overflowed.
    pub overflows: u64,
    /// Event-to-acknowledgement delay of the last acknowledged batch, ms.
    pub ack_delay_ms: u64,
}

/// The streams on one route, by id: adding and removing one is O(1), so
/// closing a stream costs its own routes, not everyone's.
type Streams = HashMap<u64, Arc<Subscriber>>;

#[derive(Default)]
struct Routes {
    subscribers: HashMap<u64, Arc<Subscriber>>,
    /// Streams by client id (ids given), for repair accounting.
    by_client: HashMap<Arc<str>, Vec<Arc<Subscriber>>>,
    by_key: HashMap<Key, Streams, KeyHash>,
    by_prefix: HashMap<Box<str>, Streams>,
    /// Distinct prefix lengths in `by_prefix`, with how many prefixes have it.
    prefix_lens: std::collections::BTreeMap<usize, usize>,
}

impl Routes {
    /// Every subscriber that wants a notice for `key`, possibly repeated
    /// (a stream appears once per route); returns how many routes matched.
    fn targets<'a>(&'a self, key: &str, out: &mut Vec<&'a Arc<Subscriber>>) -> usize {
        let mut matched = 0;
        if let Some(subs) = self.by_key.get(key) {
            out.extend(subs.values());
            matched += 1;
        }
        for &len in self.prefix_lens.keys() {
            if len > key.len() {
                break;
            }
            if !key.is_char_boundary(len) {
                continue;
            }
            if let Some(subs) = self.by_prefix.get(&key[..len]) {
                out.extend(subs.values());
                matched += 1;
            }
        }
        matched
    }
}

#[derive(Default)]
struct History {
    notices: VecDeque<Arc<Notice>>,
    bytes: usize,
    /// Every notice with a seq above this is held.
    floor: u64,
}

/// Routes notices from publishes to Watch streams.
pub struct Hub {
    routes: RwLock<Routes>,
    history: Mutex<History>,
    /// The last seq whose notices were all queued.
    fanned: AtomicU64,
    /// When the last delivery's writes finished ([`micros`]; 0: never).
    written: Arc<AtomicU64>,
    /// When the last fan-out to streams began ([`micros`]).
    last_start: AtomicU64,
    /// The last fan-out left its messages to the drivers.
    was_busy: AtomicBool,
    coalesce_micros: u64,
    next_id: AtomicU64,
    /// Whether a stream ever subscribed: until then no notice is built or
    /// kept. Set under the store's sequencer (see `Store::subscribe`).
    recording: AtomicBool,
    /// Shutdown has begun: streams send their final progress and end.
    stopping: AtomicBool,
    config: HubConfig,
    metrics: Arc<Metrics>,
    conflations: AtomicU64,
    overflows: AtomicU64,
}

impl Hub {
    /// An empty hub whose history starts after `seq`.
    pub fn new(config: HubConfig, seq: u64, metrics: Arc<Metrics>) -> Self {
        Self {
            routes: RwLock::new(Routes::default()),
            history: Mutex::new(History {
                floor: seq,
                ..History::default()
            }),
            fanned: AtomicU64::new(seq),
            written: Arc::new(AtomicU64::new(0)),
            last_start: AtomicU64::new(0),
            was_busy: AtomicBool::new(false),
            coalesce_micros: config.coalesce.as_micros() as u64,
            next_id: AtomicU64::new(1),
            recording: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            config,
            metrics,
            conflations: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
        }
    }

    /// Conflations and overflows since start.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.conflations.load(Ordering::Relaxed),
            self.overflows.load(Ordering::Relaxed),
        )
    }

    /// The hub's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The streams of client `client_id`.
    pub fn streams_of(&self, client_id: &str) -> Vec<Arc<Subscriber>> {
        if client_id.is_empty() {
            return Vec::new();
        }
        self.routes
            .read()
            .by_client
            .get(client_id)
            .cloned()
            .unwrap_or_default()
    }

    /// The hub's limits.
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// Starts recording notices for a log replay whose first seq follows
    /// `seq`: the history is rebuilt from there.
    pub fn replay_from(&self, seq: u64) {
        let _routes = self.routes.write();
        self.recording.store(true, Ordering::Release);
        self.fanned.store(seq, Ordering::Release);
        let mut history = self.history.lock();
        history.floor = seq;
        history.notices.clear();
        history.bytes = 0;
    }

    /// The resume history: its floor and its notices, oldest first.
    pub fn history(&self) -> (u64, Vec<Arc<Notice>>) {
        let history = self.history.lock();
        (history.floor, history.notices.iter().cloned().collect())
    }

    /// Restores a resume history (from a snapshot) and starts recording.
    pub fn restore_history(&self, floor: u64, notices: Vec<Notice>, fanned: u64) {
        let _routes = self.routes.write();
        self.recording.store(true, Ordering::Release);
        self.fanned.store(fanned, Ordering::Release);
        let mut history = self.history.lock();
        history.floor = floor;
        history.bytes = notices.iter().map(Notice::bytes).sum();
        history.notices = notices.into_iter().map(Arc::new).collect();
    }

    /// Whether publishes must build notices.
    pub fn recording(&self) -> bool {
        self.recording.load(Ordering::Acquire)
    }

    /// The last seq whose notices were all queued.
    pub fn fanned(&self) -> u64 {
        self.fanned.load(Ordering::Acquire)
    }

    /// Records the notices of one mutation (all with the same seq) and queues
    /// them for every stream that wants them. Called in seq order. The
    /// parked streams among them are written by the [`Delivery`] returned,
    /// once it is dropped: after the caller has let go of its locks.
    pub fn fanout(&self, seq: u64, notices: Vec<Notice>) -> Delivery {
        let mut delivery = Delivery::default();
        if notices.is_empty() {
            self.fanned.store(seq, Ordering::Release);
            return delivery;
        }
        let notices: Vec<Arc<Notice>> = notices.into_iter().map(Arc::new).collect();
        {
            let mut history = self.history.lock();
            for n in &notices {
                history.bytes += n.bytes();
                history.notices.push_back(n.clone());
            }
            while history.notices.len() > self.config.history_notices
                || history.bytes > self.config.history_bytes
            {
                let Some(old) = history.notices.pop_front() else {
                    break;
                };
                history.bytes -= old.bytes();
                history.floor = history.floor.max(old.seq);
            }
        }
        let routes = self.routes.read();
        if !routes.subscribers.is_empty() {
            // Each target by its stream's address, which tells streams
            // apart as well as their ids do without reading them.
            let (spare_targets, claims) = SPARE
                .try_with(|spare| {
                    let mut spare = spare.borrow_mut();
                    (
                        std::mem::take(&mut spare.targets),
                        std::mem::take(&mut spare.claims),
                    )
                })
                .unwrap_or_default();
            let mut targets: Vec<(usize, usize, &Arc<Subscriber>)> = recycle(spare_targets);
            let mut scratch = Vec::new();
            let mut matched = 0;
            for (i, n) in notices.iter().enumerate() {
                scratch.clear();
                matched += routes.targets(&n.key, &mut scratch);
                targets.reserve(scratch.len());
                for sub in scratch.drain(..) {
                    if sub.wants_origin(n) && sub.may_see(&n.key) {
                        targets.push((Arc::as_ptr(sub) as usize, i, sub));
                    }
                }
            }
            // Group by subscriber, keep seq order within, drop repeats. One
            // notice through one route has neither groups nor repeats.
            if notices.len() > 1 || matched > 1 {
                targets.sort_by_key(|(id, i, _)| (*id, *i));
                targets.dedup_by_key(|(id, i, _)| (*id, *i));
            }
            // Each delivery records its delay; look each notice's histogram
            // up, read the clock and record, once per fan-out, not per
            // delivery (the deliveries of one notice share the delay).
            let now = unix_ms();
            let mut delays: Vec<Option<(BatchHistogram, f64, u64)>> = notices
                .iter()
                .map(|n| {
                    let label = self
                        .metrics
                        .enabled()
                        .then(|| self.metrics.namespace_label(&n.key))?;
                    let histogram = self.metrics.delay_histogram(&label, "enqueued")?;
                    Some((
                        histogram,
                        now.saturating_sub(n.event_time_ms) as f64 / 1000.0,
                        0,
                    ))
                })
                .collect();
            let (mut conflations, mut overflows) = (0, 0);
            // A fan-out that comes close behind the last one's writes (a
            // publisher at full speed) adds the parked streams' messages
            // here and leaves them to their connections' drivers, which
            // write what gathers meanwhile at once: one socket write per
            // message and subscriber would cost more than the latency it
            // saves. Otherwise each goes to the network with the
            // delivery, after the locks.
            let now = micros();
            let written = self.written.load(Ordering::Relaxed);
            let last_start = self.last_start.swap(now, Ordering::Relaxed);
            // Busy from the first fan-out that comes close behind the last
            // delivery's writes, for as long as fan-outs keep starting
            // within four times that of each other (the drivers' writes
            // of the one before are still going on meanwhile).
            let busy = self.coalesce_micros > 0
                && ((written > 0 && now.saturating_sub(written) < self.coalesce_micros)
                    || (self.was_busy.load(Ordering::Relaxed)
                        && now.saturating_sub(last_start) < 4 * self.coalesce_micros));
            self.was_busy.store(busy, Ordering::Relaxed);
            let mut batch = Vec::new();
            let mut recording = Recording::default();
            // The connections some claim of this delivery holds (the last
            // HELD of them): streams come in id order, not by connection,
            // and a clone per stream would be a locked instruction more
            // per stream, which waits for the stream's cache misses.
            let mut held = [0usize; HELD];
            let mut claims_holding = 0;
            delivery.hub = Some((self.written.clone(), self.metrics.clone()));
            delivery.claimed = claims;
            delivery.claimed.reserve(targets.len());
            for group in targets.chunk_by(|a, b| a.0 == b.0) {
                let sub = group[0].2;
                let (express, notice) = {
                    let mut queue = sub.queue.lock();
                    let claim = |express: &ExpressWriter| {
                        let id = express.connection_id();
                        let connection =
                            (busy || !held.contains(&id)).then(|| express.connection.clone());
                        (id, express.stream, express.max_message, connection)
                    };
                    // A parked stream with nothing queued takes a lone
                    // notice to its delivery without queueing it: the
                    // queue's buffer, a cache line of its own per stream,
                    // is not touched.
                    let alone = match *group {
                        [(_, i, _)] if queue.takes_alone(&notices[i], &self.config) => queue
                            .claim_express()
                            .map(|express| (claim(express), i as u32)),
                        _ => None,
                    };
                    for &(_, i, _) in group {
                        if let Some((_, _, delivered)) = &mut delays[i] {
                            *delivered += 1;
                        }
                    }
                    match alone {
                        Some((express, notice)) => (Some(express), Some(notice)),
                        None => {
                            for &(_, i, _) in group {
                                let n = &notices[i];
                                let (cap, cap_bytes) =
                                    (self.config.queue_notices, self.config.queue_bytes);
                                match queue.push(n, cap, cap_bytes) {
                                    Pushed::Conflated => conflations += 1,
                                    Pushed::Overflowed => overflows += 1,
                                    Pushed::Queued | Pushed::Missed => {}
                                }
                            }
                            (queue.claim_express().map(claim), None)
                        }
                    }
                };
                // A parked stream's notices are written by the delivery,
                // without a trip through its task; the task is woken for
                // anything else.
                match express {
                    Some((_, stream, max_message, Some(connection))) if busy => {
                        connection.locked(Flush::Driver, &mut |writes| {
                            sub.express(
                                &self.metrics,
                                writes,
                                stream,
                                max_message as usize,
                                notice.map(|i| &notices[i as usize]),
                                &mut batch,
                                &mut recording,
                            )
                        })
                    }
                    Some((connection_id, stream, max_message, connection)) => {
                        if connection.is_some() {
                            held[claims_holding % HELD] = connection_id;
                            claims_holding += 1;
                        }
                        delivery.claimed.push(Claim {
                            connection_id,
                            sub: sub.clone(),
                            stream,
                            max_message,
                            notice,
                            connection,
                        })
                    }
                    None => sub.wake.notify_one(),
                }
            }
            for (histogram, delay, delivered) in delays.into_iter().flatten() {
                histogram.observe_n(delay, delivered);
            }
            self.conflations.fetch_add(conflations, Ordering::Relaxed);
            self.overflows.fetch_add(overflows, Ordering::Relaxed);
            let targets = (targets.capacity() <= SPARE_ENTRIES).then(|| recycle(targets));
            // A fan-out that claimed nothing hands its claims' room back
            // now; a delivery does after its writes.
            let claims = (delivery.claimed.is_empty()
                && delivery.claimed.capacity() <= SPARE_ENTRIES)
                .then(|| std::mem::take(&mut delivery.claimed));
            give_back(|spare| {
                spare.targets = targets.unwrap_or_default();
                if let Some(claims) = claims {
                    spare.claims = claims;
                }
            });
        }
        if !delivery.claimed.is_empty() {
            delivery.notices = notices;
        }
        self.fanned.store(seq, Ordering::Release);
        delivery
    }

    /// Registers a stream with its first filters, atomically with respect to
    /// fan-out. Call it through `Store::subscribe`, which holds the
    /// sequencer so that no publish decides whether to record notices while
    /// the first stream arrives. `resume` is `(epoch matches, seq)`; the stream starts behind
    /// when it resumes, and live from now otherwise. `owner` is the
    /// principal whose quotas it counts against and whose watch scope bounds
    /// what it sees. Returns the subscriber and the seq it starts from;
    /// fails, registering nothing, past a limit or a quota.
    pub fn subscribe(
        &self,
        client_id: &str,
        no_loop: bool,
        resume: Option<(bool, u64)>,
        track: &[String],
        prefixes: &[String],
        owner: Option<Arc<Principal>>,
    ) -> Result<(Arc<Subscriber>, u64), String> {
        if let Some(owner) = &owner {
            owner.open_stream().map_err(|e| self.refused(e))?;
        }
        let mut routes = self.routes.write();
        let now = self.fanned();
        if !self.recording.swap(true, Ordering::AcqRel) {
            // History starts now: older tokens are repaired.
            self.history.lock().floor = now;
        }
        let state = match resume {
            None => State::Live,
            Some((true, seq)) if seq >= now => State::Live,
            Some((true, seq)) => State::behind(seq, now, Behind::Resume),
            Some((false, _)) => State::behind(0, now, Behind::NewEpoch),
        };
        let sub = Arc::new(Subscriber {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            client_id: Arc::from(client_id),
            no_loop,
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                base: 0,
                latest: HashMap::with_hasher(KeyHash),
                indexed: false,
                live: 0,
                bytes: 0,
                state,
                drained_through: now,
                overflows: 0,
                conflations: 0,
                client_news: false,
                busy: true,
                express: None,
                sent: Sent::default(),
                sent_before: VecDeque::new(),
            }),
            wake: Notify::new(),
            filters: Mutex::new(Filters::default()),
            acked: AtomicU64::new(resume.map_or(now, |(_, s)| s)),
            ack_delay_ms: AtomicU64::new(0),
            repairs_awaiting_ack: Mutex::new(VecDeque::new()),
            repairs_awaiting_fill: Mutex::new(HashMap::with_hasher(KeyHash)),
            owner,
            metrics: self.metrics.clone(),
        });
        if let Err(e) = self.add_filters(&mut routes, &sub, track, prefixes) {
            if let Some(owner) = &sub.owner {
                owner.close_stream();
            }
            return Err(e);
        }
        routes.subscribers.insert(sub.id, sub.clone());
        if !client_id.is_empty() {
            routes
                .by_client
                .entry(sub.client_id.clone())
                .or_default()
                .push(sub.clone());
        }
        Ok((sub, now))
    }

    /// Adds tracked keys and prefixes to a stream, all or nothing.
    fn add_filters(
        &self,
        routes: &mut Routes,
        sub: &Arc<Subscriber>,
        keys: &[String],
        prefixes: &[String],
    ) -> Result<(), String> {
        let mut filters = sub.filters.lock();
        let new_keys = keys
            .iter()
            .filter(|k| !filters.tracked.contains(k.as_str()))
            .collect::<HashSet<_>>()
            .len();
        if filters.tracked.len() + new_keys > self.config.max_tracked_keys {
            return Err(format!(
                "tracking {} more keys would make {}; the limit is {} (max_tracked_keys)",
                new_keys,
                filters.tracked.len() + new_keys,
                self.config.max_tracked_keys
            ));
        }
        let new_prefixes = prefixes
            .iter()
            .filter(|p| !filters.prefixes.contains(*p))
            .collect::<HashSet<_>>()
            .len();
        if filters.prefixes.len() + new_prefixes > self.config.max_prefixes {
            return Err(format!(
                "watching {} more prefixes would make {}; the limit is {} (max_prefixes)",
                new_prefixes,
                filters.prefixes.len() + new_prefixes,
                self.config.max_prefixes
            ));
        }
        if let Some(owner) = &sub.owner {
            owner
                .track((new_keys + new_prefixes) as u64)
                .map_err(|e| self.refused(e))?;
        }
        for key in keys {
            if filters.tracked.contains(key.as_str()) {
                continue;
            }
            let key: Key = Key::from(key.as_str());
            filters.tracked.insert(key.clone());
            routes
                .by_key
                .entry(key)
                .or_default()
                .insert(sub.id, sub.clone());
        }
        for prefix in prefixes {
            if filters.prefixes.insert(prefix.clone()) {
                let subs = routes.by_prefix.entry(prefix.as_str().into()).or_default();
                subs.insert(sub.id, sub.clone());
                if subs.len() == 1 {
                    *routes.prefix_lens.entry(prefix.len()).or_default() += 1;
                }
            }
        }
        Ok(())
    }

    /// Adds tracked keys and prefixes to a live stream, all or nothing.
    pub fn add(
        &self,
        sub: &Arc<Subscriber>,
        keys: &[String],
        prefixes: &[String],
    ) -> Result<(), String> {
        let mut routes = self.routes.write();
        self.add_filters(&mut routes, sub, keys, prefixes)
    }

    /// Counts a quota refusal and turns it into the error message.
    fn refused(&self, e: QuotaExceeded) -> String {
        self.metrics.quota_refused(e.quota);
        e.message
    }

    /// Removes a stream and its routes.
    pub fn unsubscribe(&self, sub: &Arc<Subscriber>) {
        let mut routes = self.routes.write();
        routes.subscribers.remove(&sub.id);
        if let Some(streams) = routes.by_client.get_mut(&*sub.client_id) {
            streams.retain(|s| s.id != sub.id);
            if streams.is_empty() {
                routes.by_client.remove(&*sub.client_id);
            }
        }
        let filters = std::mem::take(&mut *sub.filters.lock());
        if let Some(owner) = &sub.owner {
            owner.untrack((filters.tracked.len() + filters.prefixes.len()) as u64);
            owner.close_stream();
        }
        for key in &filters.tracked {
            remove_route(&mut routes.by_key, key, sub.id);
        }
        for prefix in &filters.prefixes {
            if remove_route(&mut routes.by_prefix, prefix.as_str(), sub.id) {
                dec_len(&mut routes.prefix_lens, prefix.len());
            }
        }
    }

    /// Stops tracking `keys`.
    pub fn untrack(&self, sub: &Arc<Subscriber>, keys: &[String]) {
        let mut routes = self.routes.write();
        let mut filters = sub.filters.lock();
        let mut removed = 0;
        for key in keys {
            if filters.tracked.remove(key.as_str()) {
                remove_route(&mut routes.by_key, key.as_str(), sub.id);
                removed += 1;
            }
        }
        if let Some(owner) = &sub.owner {
            owner.untrack(removed);
        }
    }

    /// Stops watching `prefixes`.
    pub fn unwatch_prefixes(&self, sub: &Arc<Subscriber>, prefixes: &[String]) {
        let mut routes = self.routes.write();
        let mut filters = sub.filters.lock();
        let mut removed = 0;
        for prefix in prefixes {
            if filters.prefixes.remove(prefix) {
                removed += 1;
                if remove_route(&mut routes.by_prefix, prefix.as_str(), sub.id) {
                    dec_len(&mut routes.prefix_lens, prefix.len());
                }
            }
        }
        if let Some(owner) = &sub.owner {
            owner.untrack(removed);
        }
    }

    /// The notices in `(since, through]` that `sub` wants, if the history
    /// still holds all of them.
    pub fn replay(&self, sub: &Subscriber, since: u64, through: u64) -> Option<Vec<Arc<Notice>>> {
        let history = self.history.lock();
        if since < history.floor {
            return None;
        }
        let filters = sub.filters.lock();
        let start = history.notices.partition_point(|n| n.seq <= since);
        Some(
            history
                .notices
                .range(start..)
                .take_while(|n| n.seq <= through)
                .filter(|n| sub.wants_origin(n) && sub.may_see(&n.key) && filters.matches(&n.key))
                .cloned()
                .collect(),
        )
    }

    /// How many streams, and how many deliveries, notices for `keys` would
    /// reach now.
    pub fn reach(&self, keys: &[Key]) -> (u64, u64) {
        let routes = self.routes.read();
        if routes.subscribers.is_empty() {
            return (0, 0);
        }
        let mut reached: HashSet<u64> = HashSet::new();
        let mut deliveries = 0u64;
        let mut scratch = Vec::new();
        for key in keys {
            scratch.clear();
            routes.targets(key, &mut scratch);
            let mut ids: Vec<u64> = scratch.iter().map(|s| s.id).collect();
            ids.sort_unstable();
            ids.dedup();
            deliveries += ids.len() as u64;
            reached.extend(ids);
        }
        (reached.len() as u64, deliveries)
    }

    /// Begins shutdown: every stream is woken, sends its final progress
    /// and ends.
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // A stream that subscribes after this sees the flag when it starts:
        // its registration takes the routes' lock after this read.
        for sub in self.routes.read().subscribers.values() {
            sub.wake.notify_one();
        }
    }

    /// Whether shutdown has begun. A stream checks it whenever its
    /// [`Subscriber::wake`] fires.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// History size and floor.
    pub fn history_stats(&self) -> (u64, u64) {
        let history = self.history.lock();
        (history.notices.len() as u64, history.floor)
    }

    /// Per-stream figures.
    pub fn subscriber_stats(&self) -> Vec<SubscriberStats> {
        let fanned = self.fanned();
        let routes = self.routes.read();
        let mut stats: Vec<SubscriberStats> = routes
            .subscribers
            .values()
            .map(|s| {
                let acked = s.acked.load(Ordering::Relaxed);
                let (queued, overflows) = {
                    let q = s.queue.lock();
                    (q.live as u64, q.overflows)
                };
                let filters = s.filters.lock();
                SubscriberStats {
                    client_id: s.client_id.to_string(),
                    acked_seq: acked,
                    lag: fanned.saturating_sub(acked),
                    queued,
                    tracked_keys: filters.tracked.len() as u64,
                    prefixes: filters.prefixes.len() as u64,
                    overflows,
                    ack_delay_ms: s.ack_delay_ms.load(Ordering::Relaxed),
                }
            })
            .collect();
        stats.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        stats
    }
}

/// Removes `id` from the route of `key`; true when the route is gone.
fn remove_route<K, S>(map: &mut HashMap<K, Streams, S>, key: &str, id: u64) -> bool
where
    K: std::borrow::Borrow<str> + std::hash::Hash + Eq,
    S: std::hash::BuildHasher,
{
    let Some(subs) = map.get_mut(key) else {
        return false;
    };
    subs.remove(&id);
    if subs.is_empty() {
        map.remove(key);
        true
    } else {
        false
    }
}

fn dec_len(lens: &mut std::collections::BTreeMap<usize, usize>, len: usize) {
    if let Some(n) = lens.get_mut(&len) {
        *n -= 1;
        if *n == 0 {
            lens.remove(&len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use prost::Message;

    fn n(seq: u64, key: &str) -> Arc<Notice> {
        Arc::new(Notice {
            seq,
            key: Key::from(key),
            version: seq,
            cause: Key::from(key),
            critical: false,
            event_time_ms: 0,
            origin: None,
            cache: NoticeCache::default(),
        })
    }

    fn queue() -> Queue {
        Queue {
            items: VecDeque::new(),
            base: 0,
            latest: HashMap::with_hasher(KeyHash),
            indexed: false,
            live: 0,
            bytes: 0,
            state: State::Live,
            drained_through: 0,
            overflows: 0,
            conflations: 0,
            client_news: false,
            busy: true,
            express: None,
            sent: Sent::default(),
            sent_before: VecDeque::new(),
        }
    }

    fn drained(q: &mut Queue, max: usize) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        q.drain(max, &mut out);
        out.iter().map(|n| (n.seq, n.key.to_string())).collect()
    }

    #[test]
    fn conflation_keeps_the_latest_at_the_tail_in_seq_order() {
        let mut q = queue();
        for (seq, key) in [(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "a")] {
            q.push(&n(seq, key), 10, usize::MAX);
        }
        assert_eq!(q.live, 3);
        assert_eq!(q.conflations, 2);
        let got = drained(&mut q, 10);
        assert_eq!(got, vec![(2, "b".into()), (4, "c".into()), (5, "a".into())]);
        assert_eq!(q.bytes, 0);
    }

    #[test]
    fn conflation_works_searched_and_indexed_alike() {
        let mut q = queue();
        // Past SEARCHED distinct keys the queue indexes them.
        for seq in 1..=40u64 {
            q.push(&n(seq, &format!("k{seq}")), 1000, usize::MAX);
        }
        assert!(q.indexed);
        q.push(&n(41, "k7"), 1000, usize::MAX);
        q.push(&n(42, "k40"), 1000, usize::MAX);
        assert_eq!((q.live, q.conflations), (40, 2));
        let got = drained(&mut q, 1000);
        assert_eq!(got.len(), 40);
        assert_eq!(&got[38..], &[(41, "k7".into()), (42, "k40".into())]);
        assert!(
            !q.indexed && q.latest.is_empty(),
            "an empty queue searches again"
        );
        // Short again: conflation by search.
        q.push(&n(43, "a"), 1000, usize::MAX);
        q.push(&n(44, "b"), 1000, usize::MAX);
        q.push(&n(45, "a"), 1000, usize::MAX);
        assert!(!q.indexed);
        assert_eq!(
            drained(&mut q, 10),
            vec![(44, "b".into()), (45, "a".into())]
        );
    }

    #[test]
    fn repeated_conflation_stays_bounded() {
        let mut q = queue();
        for seq in 1..=10_000 {
            q.push(&n(seq, if seq % 2 == 0 { "a" } else { "b" }), 4, usize::MAX);
        }
        assert!(
            q.items.len() <= 16,
            "holes are compacted: {}",
            q.items.len()
        );
        assert_eq!(
            drained(&mut q, 10),
            vec![(9_999, "b".into()), (10_000, "a".into())]
        );
    }

    #[test]
    fn a_full_queue_goes_behind_and_notes_what_it_missed() {
        let mut q = queue();
        q.push(&n(1, "a"), 2, usize::MAX);
        assert_eq!(drained(&mut q, 10).len(), 1);
        q.push(&n(2, "b"), 2, usize::MAX);
        q.push(&n(3, "c"), 2, usize::MAX);
        q.push(&n(4, "d"), 2, usize::MAX);
        q.push(&n(7, "e"), 2, usize::MAX);
        assert_eq!(q.state, State::behind(1, 7, Behind::SlowConsumer));
        assert_eq!((q.live, q.bytes, q.overflows), (0, 0, 1));
    }

    #[test]
    fn the_byte_bound_also_overflows() {
        let mut q = queue();
        let one = n(1, "a").bytes();
        q.push(&n(1, "a"), 100, one * 2);
        q.push(&n(2, "b"), 100, one * 2);
        assert_eq!(q.state, State::Live);
        q.push(&n(3, "c"), 100, one * 2);
        assert!(matches!(q.state, State::Behind { .. }));
    }

    #[test]
    fn a_batch_never_splits_a_seq() {
        let mut q = queue();
        for key in ["a", "b", "c"] {
            q.push(&n(1, key), 100, usize::MAX);
        }
        q.push(&n(2, "d"), 100, usize::MAX);
        assert_eq!(drained(&mut q, 2).len(), 3, "all of seq 1");
        assert_eq!(drained(&mut q, 2), vec![(2, "d".into())]);
    }

    /// An [`Express`] connection that records what a fan-out asks of it,
    /// in one log all connections share: each stream written, by its
    /// identifier, and each release of the lock, with its flush.
    struct Recorder {
        connection: usize,
        log: Arc<parking_lot::Mutex<Vec<String>>>,
    }

    impl Express for Recorder {
        fn locked(&self, flush: Flush, writes: &mut dyn FnMut(&mut dyn StreamWrites)) {
            writes(&mut Held { recorder: self });
            self.log
                .lock()
                .push(format!("{flush:?} {}", self.connection));
        }
    }

    /// A [`Recorder`]'s lock, held.
    struct Held<'a> {
        recorder: &'a Recorder,
    }

    impl StreamWrites for Held<'_> {
        fn write(
            &mut self,
            stream: u32,
            max_message: usize,
            next: &mut dyn FnMut(usize, &mut BytesMut) -> bool,
        ) -> Wrote {
            let mut out = BytesMut::new();
            if !next(max_message, &mut out) {
                return Wrote::Nothing;
            }
            let message = pb::WatchResponse::decode(&out[..]).expect("a WatchResponse");
            assert!(
                matches!(
                    message.response,
                    Some(pb::watch_response::Response::Notices(_))
                ),
                "a notice batch, not {message:?}"
            );
            self.recorder.log.lock().push(stream.to_string());
            Wrote::Written
        }
    }

    /// A connection whose streams have no room, or are gone: nothing is
    /// written.
    struct Closed(Wrote);

    impl Express for Closed {
        fn locked(&self, _: Flush, writes: &mut dyn FnMut(&mut dyn StreamWrites)) {
            writes(&mut Refusing(self.0));
        }
    }

    struct Refusing(Wrote);

    impl StreamWrites for Refusing {
        fn write(
            &mut self,
            _: u32,
            _: usize,
            _: &mut dyn FnMut(usize, &mut BytesMut) -> bool,
        ) -> Wrote {
            self.0
        }
    }

    /// Whether the stream's task was woken (and takes the wake).
    fn woken(sub: &Subscriber) -> bool {
        let notified = std::pin::pin!(sub.wake.notified());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        std::future::Future::poll(notified, &mut cx).is_ready()
    }

    /// A parked stream tracking `keys`, written through `connection`.
    fn parked(hub: &Hub, keys: &[&str], connection: Arc<dyn Express>) -> Arc<Subscriber> {
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let (sub, _) = hub.subscribe("c", false, None, &keys, &[], None).unwrap();
        sub.set_express(ExpressWriter {
            connection,
            stream: 1,
            max_message: 1 << 20,
        });
        assert!(sub.park());
        sub
    }

    fn publish(hub: &Hub, seq: u64, key: &str) -> Delivery {
        hub.fanout(seq, vec![(*n(seq, key)).clone()])
    }

    /// The common case: a notice for a parked stream with nothing queued
    /// goes from the fan-out to the socket without entering the queue.
    #[test]
    fn a_lone_notice_to_a_parked_stream_skips_its_queue() {
        let hub = Hub::new(HubConfig::default(), 0, Arc::new(Metrics::disabled()));
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let connection = Arc::new(Recorder {
            connection: 1,
            log: log.clone(),
        });
        let sub = parked(&hub, &["a"], connection);
        for seq in 1..=3 {
            drop(publish(&hub, seq, "a"));
        }
        assert_eq!(log.lock().iter().filter(|l| *l == "1").count(), 3);
        let queue = sub.queue.lock();
        assert_eq!(
            queue.items.capacity(),
            0,
            "the queue's buffer was never used"
        );
        assert_eq!((queue.live, queue.drained_through), (0, 3));
        assert_eq!(queue.sent.newest.as_ref().map(|b| b.0), Some(3));
        assert!(!queue.busy, "parked again");
    }

    /// A notice the fan-out could not write waits in the queue for the
    /// stream's task, ahead of the notices queued since, and the task is
    /// woken.
    #[test]
    fn a_lone_notice_without_room_waits_ahead_of_newer_ones() {
        for wrote in [Wrote::NoRoom, Wrote::Gone] {
            let hub = Hub::new(HubConfig::default(), 0, Arc::new(Metrics::disabled()));
            let sub = parked(&hub, &["a", "b", "c"], Arc::new(Closed(wrote)));
            let first = publish(&hub, 1, "a");
            // Publishes while the first one's delivery is pending find the
            // stream claimed and queue their notices.
            drop(publish(&hub, 2, "b"));
            drop(publish(&hub, 3, "c"));
            drop(first);
            let mut queue = sub.queue.lock();
            assert!(!queue.busy);
            let keys: Vec<(u64, String)> = drained(&mut queue, 10);
            assert_eq!(
                keys,
                [(1, "a".into()), (2, "b".into()), (3, "c".into())],
                "{wrote:?}"
            );
            drop(queue);
            assert!(woken(&sub), "the task is woken to write them ({wrote:?})");
        }
    }

    /// Put back, the notice is conflated by a newer one of its key, and a
    /// stream that went behind meanwhile catches up from before it.
    #[test]
    fn a_lone_notice_put_back_conflates_or_is_covered_by_the_catch_up() {
        let hub = Hub::new(HubConfig::default(), 0, Arc::new(Metrics::disabled()));
        let sub = parked(&hub, &["a", "b"], Arc::new(Closed(Wrote::NoRoom)));
        let first = publish(&hub, 1, "a");
        drop(publish(&hub, 2, "b"));
        drop(publish(&hub, 3, "a"));
        drop(first);
        let mut queue = sub.queue.lock();
        assert_eq!(drained(&mut queue, 10), [(2, "b".into()), (3, "a".into())]);
        assert_eq!(queue.conflations, 1);
        drop(queue);

        let config = HubConfig {
            queue_notices: 1,
            ..HubConfig::default()
        };
        let hub = Hub::new(config, 0, Arc::new(Metrics::disabled()));
        let sub = parked(&hub, &["a", "b", "c"], Arc::new(Closed(Wrote::NoRoom)));
        let first = publish(&hub, 1, "a");
        drop(publish(&hub, 2, "b"));
        drop(publish(&hub, 3, "c"));
        drop(first);
        let queue = sub.queue.lock();
        assert_eq!(queue.state, State::behind(0, 3, Behind::SlowConsumer));
        assert_eq!(queue.live, 0, "the catch-up covers all three");
    }

    /// A connection with more streams than [`WRITES_PER_HOLD`] is written
    /// under several holds of its lock, and its output sent once, after
    /// the last.
    #[test]
    fn a_connection_with_many_streams_is_written_in_runs_and_sent_once() {
        let hub = Hub::new(HubConfig::default(), 0, Arc::new(Metrics::disabled()));
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let connection: Arc<dyn Express> = Arc::new(Recorder {
            connection: 1,
            log: log.clone(),
        });
        let streams = WRITES_PER_HOLD + 2;
        let mut subs = Vec::new();
        for stream in 0..streams {
            let (sub, _) = hub
                .subscribe("c", false, None, &["k".into()], &[], None)
                .unwrap();
            sub.set_express(ExpressWriter {
                connection: connection.clone(),
                stream: stream as u32,
                max_message: 1 << 20,
            });
            assert!(sub.park());
            subs.push(sub);
        }
        drop(hub.fanout(
            1,
            vec![Notice {
                seq: 1,
                ..(*n(1, "k")).clone()
            }],
        ));
        let log = log.lock().clone();
        let releases: Vec<(usize, &str)> = log
            .iter()
            .enumerate()
            .filter(|(_, l)| l.starts_with("Hold") || l.starts_with("Through"))
            .map(|(i, l)| (i, l.as_str()))
            .collect();
        assert_eq!(
            releases,
            [(WRITES_PER_HOLD, "Hold 1"), (streams + 1, "Through 1")],
            "{log:?}"
        );
        let mut written: Vec<u32> = log.iter().filter_map(|l| l.parse().ok()).collect();
        written.sort_unstable();
        assert_eq!(written, (0..streams as u32).collect::<Vec<_>>());
    }

    /// What a fan-out and its delivery read and write of a stream they
    /// reach with one notice (the reference counts, the routing fields,
    /// the queue's lock and its fields through the sent record) lies
    /// within the first two cache lines of the stream's allocation, and
    /// what the fan-out reads before its claim's lock (through
    /// `drained_through`) within the first: fields moved out of that run
    /// cost a cache miss per stream per publish.
    #[test]
    fn what_a_fan_out_touches_of_a_stream_leads_its_memory() {
        let hub = Hub::new(HubConfig::default(), 0, Arc::new(Metrics::disabled()));
        let (sub, _) = hub.subscribe("c", false, None, &[], &[], None).unwrap();
        let start = Arc::as_ptr(&sub) as usize - 2 * std::mem::size_of::<usize>();
        let queue = &*sub.queue.lock() as *const Queue as usize;
        let at = |offset: usize| queue - start + offset;
        let end = at(std::mem::offset_of!(Queue, sent) + std::mem::size_of::<Sent>());
        assert!(end <= 2 * 64, "the hot fields end at byte {end}");
        let first = at(std::mem::offset_of!(Queue, drained_through) + std::mem::size_of::<u64>());
        assert!(first <= 64, "the first line ends at byte {first}");
        assert_eq!(std::mem::offset_of!(Subscriber, owner), 0);
    }

    /// A stream tracking `k`, written through `connection` as `stream`,
    /// parked with nothing queued.
    fn parked_on_k(hub: &Hub, connection: &Arc<dyn Express>, stream: u32) -> Arc<Subscriber> {
        let (sub, _) = hub
            .subscribe("c", false, None, &["k".into()], &[], None)
            .unwrap();
        sub.set_express(ExpressWriter {
            connection: connection.clone(),
            stream,
            max_message: 1 << 20,
        });
        assert!(sub.park(), "parked with nothing queued");
        sub
    }

    /// A publish's parked streams that share a connection are written one
    /// after another and sent with one flush of that connection; a stream
    /// alone on its connection is sent as it is written.
    #[test]
    fn streams_sharing_a_connection_are_sent_with_one_flush() {
        let hub = Hub::new(HubConfig::default(), 0, Arc::new(Metrics::disabled()));
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        // Streams 1 and 3 share connection 1; stream 2 is alone on
        // connection 2.
        let connection = |connection| -> Arc<dyn Express> {
            Arc::new(Recorder {
                connection,
                log: log.clone(),
            })
        };
        let (one, two) = (connection(1), connection(2));
        let mut subs = Vec::new();
        for (connection, stream) in [(&one, 1), (&two, 2), (&one, 3)] {
            subs.push(parked_on_k(&hub, connection, stream));
        }
        let delivery = hub.fanout(
            1,
            vec![Notice {
                seq: 1,
                ..(*n(1, "k")).clone()
            }],
        );
        assert!(log.lock().is_empty(), "written when the delivery drops");
        drop(delivery);
        let mut log = log.lock().clone();
        // Connection 1's two streams (in either order) under one hold of
        // its lock, sent when it is let go; connection 2's stream, the
        // same, before or after them.
        let two = log.iter().position(|l| l == "2");
        let two = two.unwrap_or_else(|| panic!("stream 2 written: {log:?}"));
        assert_eq!(
            log.drain(two..two + 2).collect::<Vec<_>>(),
            ["2", "Through 2"]
        );
        assert!(
            log == ["1", "3", "Through 1"] || log == ["3", "1", "Through 1"],
            "{log:?}"
        );
        // Each stream is free again for its own task.
        for sub in &subs {
            assert!(sub.park(), "nothing left queued, busy given back");
        }
    }

    /// A fan-out's targets and claims take the room the last fan-out on
    /// the thread used, given back empty once its delivery wrote: no
    /// allocation per publish, and no stream held past its delivery.
    #[test]
    fn a_fan_outs_buffers_serve_the_next_on_its_thread() {
        // Every fan-out leaves its writes to its delivery, however close
        // behind the last one it comes.
        let config = HubConfig {
            coalesce: std::time::Duration::ZERO,
            ..HubConfig::default()
        };
        let hub = Hub::new(config, 0, Arc::new(Metrics::disabled()));
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let connection: Arc<dyn Express> = Arc::new(Recorder {
            connection: 1,
            log: log.clone(),
        });
        let subs: Vec<_> = (1..=3)
            .map(|stream| parked_on_k(&hub, &connection, stream))
            .collect();
        let spare = || {
            SPARE.with_borrow(|spare| {
                assert!(spare.claims.is_empty() && spare.targets.is_empty());
                (
                    spare.targets.capacity(),
                    spare.targets.as_ptr() as usize,
                    spare.claims.capacity(),
                    spare.claims.as_ptr() as usize,
                )
            })
        };
        let held = Arc::strong_count(&subs[0]);
        let mut kept = Vec::new();
        for seq in 1..=2 {
            let delivery = hub.fanout(seq, vec![(*n(seq, "k")).clone()]);
            assert_eq!(spare().2, 0, "the claims' room is the delivery's");
            drop(delivery);
            kept.push(spare());
            for sub in &subs {
                assert_eq!(Arc::strong_count(sub), held, "no claim left holding it");
                assert!(sub.park(), "written and given back");
            }
        }
        assert_eq!(log.lock().len(), 2 * 4, "three streams and a flush, twice");
        assert!(kept[0].0 >= 3 && kept[0].2 >= 3, "{kept:?}");
        assert_eq!(kept[0], kept[1], "the same room both times");
    }

    /// `recycle` hands the same allocation back, emptied: the spare
    /// buffers rely on it.
    #[test]
    fn recycling_keeps_a_buffers_room() {
        let mut buffer: Vec<(usize, usize, usize)> = Vec::with_capacity(100);
        buffer.extend([(1, 2, 3), (4, 5, 6)]);
        let at = buffer.as_ptr() as usize;
        let recycled: Vec<(usize, usize, &u64)> = recycle(buffer);
        assert!(recycled.is_empty());
        assert_eq!(recycled.capacity(), 100);
        assert_eq!(recycled.as_ptr() as usize, at);
    }

    #[test]
    fn prefix_routes_match_by_length_and_char_boundary() {
        let hub = Hub::new(HubConfig::default(), 0, Arc::new(Metrics::disabled()));
        let (sub, _) = hub
            .subscribe(
                "c",
                false,
                None,
                &["exact".into()],
                &["fé".into(), "posts:".into()],
                None,
            )
            .unwrap();
        // No express writer: nothing is claimed, all is queued.
        let _delivery = hub.fanout(
            1,
            vec![
                Notice {
                    seq: 1,
                    ..(*n(1, "posts:1")).clone()
                },
                Notice {
                    seq: 1,
                    ..(*n(1, "féed")).clone()
                },
                Notice {
                    seq: 1,
                    ..(*n(1, "f")).clone()
                },
                Notice {
                    seq: 1,
                    ..(*n(1, "exact")).clone()
                },
                Notice {
                    seq: 1,
                    ..(*n(1, "exactly")).clone()
                },
            ],
        );
        let mut out = Vec::new();
        sub.drain(10, &mut out);
        let keys: Vec<&str> = out.iter().map(|n| &*n.key).collect();
        assert_eq!(keys, vec!["posts:1", "féed", "exact"]);
        hub.unsubscribe(&sub);
        assert!(hub.routes.read().by_prefix.is_empty());
        assert!(hub.routes.read().prefix_lens.is_empty());
        assert!(hub.routes.read().by_key.is_empty());
    }

    #[test]
    fn written_delays_count_each_notice_under_its_own_namespace() {
        let metrics = Arc::new(Metrics::new(Default::default()));
        let hub = Hub::new(HubConfig::default(), 0, metrics.clone());
        let (sub, _) = hub.subscribe("c", false, None, &[], &[], None).unwrap();
        let at = |seq, key: &str| {
            Arc::new(Notice {
                event_time_ms: unix_ms() - 2000,
                ..(*n(seq, key)).clone()
            })
        };
        // Namespaces change within a batch and between batches.
        sub.sent(&[
            at(1, "feed:1"),
            at(2, "feed:2"),
            at(3, "posts:3"),
            at(4, "feed:4"),
        ]);
        sub.sent(&[at(5, "posts:5")]);
        sub.ack(5);
        let scrape = metrics.encode();
        let count = |namespace: &str, stage: &str| -> f64 {
            let labels = format!("namespace=\"{namespace}\",stage=\"{stage}\"");
            scrape
                .lines()
                .find(|l| {
                    l.starts_with("freshd_invalidation_delay_seconds_count") && l.contains(&labels)
                })
                .and_then(|l| l.rsplit(' ').next())
                .map_or(0.0, |v| v.parse().unwrap())
        };
        assert_eq!(count("feed", "written"), 3.0, "{scrape}");
        assert_eq!(count("posts", "written"), 2.0, "{scrape}");
        // One acknowledgement per batch, under its oldest notice's namespace.
        assert_eq!(count("feed", "acked"), 1.0, "{scrape}");
        assert_eq!(count("posts", "acked"), 1.0, "{scrape}");
    }

    /// A stream of a hub that records metrics.
    fn measured_stream() -> Arc<Subscriber> {
        let metrics = Arc::new(Metrics::new(Default::default()));
        let hub = Hub::new(HubConfig::default(), 0, metrics);
        hub.subscribe("c", false, None, &[], &[], None).unwrap().0
    }

    /// A notice of `feed:1` at `seq` whose event was `ago` ms ago.
    fn at(seq: u64, ago: u64) -> Arc<Notice> {
        Arc::new(Notice {
            event_time_ms: unix_ms() - ago,
            ..(*n(seq, "feed:1")).clone()
        })
    }

    #[test]
    fn a_stream_far_behind_on_acks_keeps_its_oldest_event_times() {
        let sub = measured_stream();
        // More batches than are remembered: the first stays, and a late
        // batch with an old event time is remembered in the newest, which
        // stands for every batch since the record filled.
        let batches = SENT_BATCHES as u64 * 8;
        for seq in 1..=batches {
            let ago = match seq {
                1 => 5_000,
                s if s == batches - 10 => 60_000,
                _ => 1_000,
            };
            sub.sent(&[at(seq, ago)]);
        }
        assert_eq!(sub.queue.lock().sent_len(), SENT_BATCHES);
        sub.ack(1);
        let first = sub.ack_delay_ms.load(Ordering::Relaxed);
        assert!((5_000..60_000).contains(&first), "{first}");
        // An ack inside the newest's batches leaves it for a later one.
        sub.ack(batches - 1);
        assert_eq!(sub.queue.lock().sent_len(), 1);
        assert!(sub.queue.lock().sent_before.is_empty());
        // With room again, the next batch is remembered on its own.
        sub.sent(&[at(batches + 1, 1_000)]);
        assert_eq!(sub.queue.lock().sent_len(), 2);
        sub.ack(batches);
        let last = sub.ack_delay_ms.load(Ordering::Relaxed);
        assert!(last >= 60_000, "{last}");
        assert_eq!(sub.queue.lock().sent_len(), 1);
        sub.ack(batches + 1);
        let last = sub.ack_delay_ms.load(Ordering::Relaxed);
        assert!((1_000..60_000).contains(&last), "{last}");
        assert_eq!(sub.queue.lock().sent_len(), 0);
    }

    #[test]
    fn acks_that_keep_up_leave_only_the_newest_batch() {
        let sub = measured_stream();
        sub.sent(&[at(1, 1_000)]);
        sub.ack(1);
        sub.sent(&[at(2, 2_000), at(3, 1_000)]);
        assert!(sub.queue.lock().sent_before.is_empty());
        // One batch behind: the older one waits beside the newest, in order.
        sub.sent(&[at(4, 7_000)]);
        assert_eq!(sub.queue.lock().sent_len(), 2);
        sub.ack(3);
        let delay = sub.ack_delay_ms.load(Ordering::Relaxed);
        assert!((2_000..7_000).contains(&delay), "{delay}");
        assert!(sub.queue.lock().sent_before.is_empty());
        sub.ack(4);
        let delay = sub.ack_delay_ms.load(Ordering::Relaxed);
        assert!(delay >= 7_000, "{delay}");
        assert_eq!(sub.queue.lock().sent_len(), 0);
        // An ack of what was never written takes nothing.
        sub.ack(9);
        assert_eq!(sub.queue.lock().sent_len(), 0);
    }
}
