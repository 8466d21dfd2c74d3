//! [`NearCache`]: an in-process cache kept right by freshd.
//!
//! On a miss it takes the key's fill lease, reads the origin through the
//! caller's loader, and fills the key with its dependencies. On a hit it
//! checks the copy as the namespace's policy says and acts on the decision.
//! One Watch stream, run by a background task, tracks every cached key and
//! drops copies as their notices arrive.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::client::{Client, WatchEvent};
use crate::error::{BoxError, Error, Result};
use crate::pb::{self, Decision, Freshness, ResetReason};

/// How long a fill waits for its key's track to take effect on the Watch
/// stream; past it the copy is cached as not covered by the stream (every
/// hit of it is checked).
const TRACK_CONFIRM_WAIT: Duration = Duration::from_secs(1);

/// The namespace of a key: the part before its first `:` (the whole key
/// when it has none), as the server's policies see it.
pub fn namespace(key: &str) -> &str {
    key.split(':').next().unwrap_or(key)
}

/// Settings of a [`NearCache`], from [`NearCache::builder`].
pub struct NearCacheBuilder<V> {
    client: Client,
    settings: Settings,
    _values: std::marker::PhantomData<fn() -> V>,
}

impl<V> std::fmt::Debug for NearCacheBuilder<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCacheBuilder")
            .field("client", &self.client)
            .field("settings", &self.settings)
            .finish()
    }
}

#[derive(Debug, Clone)]
struct Settings {
    capacity: usize,
    ttl: Duration,
    endpoint: String,
    lease_wait: Duration,
    fill_attempts: u32,
    max_batch: usize,
    checks_in_flight: usize,
    policy_refresh: Duration,
    progress_interval: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            ttl: Duration::from_secs(300),
            endpoint: String::new(),
            lease_wait: Duration::from_secs(2),
            fill_attempts: 3,
            max_batch: 256,
            checks_in_flight: 4,
            policy_refresh: Duration::from_secs(30),
            progress_interval: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

impl<V: Clone + Send + Sync + 'static> NearCacheBuilder<V> {
    /// Most entries held; the least recently used go first (default 10,000).
    /// Keep it under the server's `max_tracked_keys`.
    pub fn capacity(mut self, entries: usize) -> Self {
        self.settings.capacity = entries.max(1);
        self
    }

    /// The TTL asked for with every fill (default 5 min). An entry lives
    /// locally as long as the TTL the server granted, counted from the
    /// origin read.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.settings.ttl = ttl;
        self
    }

    /// The endpoint name sent with checks, for the server's hit-age metrics.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.settings.endpoint = endpoint.into();
        self
    }

    /// How long a miss waits for another filler's lease before it reads the
    /// origin without one (default 2 s).
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.settings.lease_wait = wait;
        self
    }

    /// How many times a miss reads the origin when its fill keeps racing
    /// changes (default 3); after the last, the value is returned uncached.
    pub fn fill_attempts(mut self, attempts: u32) -> Self {
        self.settings.fill_attempts = attempts.max(1);
        self
    }

    /// Most hits checked in one CheckBatch (default 256).
    pub fn max_batch(mut self, items: usize) -> Self {
        self.settings.max_batch = items.max(1);
        self
    }

    /// Check calls in flight at once (default 4); hits arriving while they
    /// run are batched into the next call.
    pub fn checks_in_flight(mut self, calls: usize) -> Self {
        self.settings.checks_in_flight = calls.max(1);
        self
    }

    /// How often a namespace's policy (its `check_sample_rate`) is read
    /// again (default 30 s).
    pub fn policy_refresh(mut self, every: Duration) -> Self {
        self.settings.policy_refresh = every;
        self
    }

    /// How often the Watch stream asks for a progress watermark, which
    /// becomes its resume token (default 5 s).
    pub fn progress_interval(mut self, every: Duration) -> Self {
        self.settings.progress_interval = every.max(Duration::from_millis(1));
        self
    }

    /// The Watch stream's reconnect backoff: from `min`, doubling up to `max`,
    /// each wait drawn at random between half and all of it (defaults 100 ms
    /// and 5 s).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.settings.reconnect_min = min.max(Duration::from_millis(1));
        self.settings.reconnect_max = max.max(self.settings.reconnect_min);
        self
    }

    /// Builds the cache and starts its Watch stream and check batcher in the
    /// background (it must be called inside a Tokio runtime). The stream
    /// connects on its own; see [`NearCache::wait_until_watching`].
    pub fn build(self) -> NearCache<V> {
        let client = if self.client.client_id().is_empty() {
            let id = format!("near-{:016x}", rand::random::<u64>());
            self.client.with_client_id(id)
        } else {
            self.client
        };
        let (track_tx, track_rx) = mpsc::unbounded_channel();
        let (check_tx, check_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            client: client.clone(),
            settings: self.settings.clone(),
            state: Mutex::new(State {
                entries: HashMap::new(),
                lru: BTreeMap::new(),
                tick: 0,
                epoch: 0,
                loads: HashMap::new(),
                tracked: HashSet::new(),
                commands: track_tx,
            }),
            counters: Counters::default(),
            checks: check_tx,
            policies: Mutex::new(HashMap::new()),
            watching: AtomicBool::new(false),
            watching_changed: Notify::new(),
        });
        let watcher = tokio::spawn(watch_forever(shared.clone(), track_rx)).abort_handle();
        let batcher = tokio::spawn(check_forever(
            client,
            self.settings.endpoint,
            self.settings.max_batch,
            self.settings.checks_in_flight,
            check_rx,
        ))
        .abort_handle();
        NearCache {
            inner: Arc::new(Inner {
                shared,
                tasks: vec![watcher, batcher],
            }),
        }
    }
}

/// Counters of a [`NearCache`], from [`NearCache::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NearCacheStats {
    /// Gets served from the cache.
    pub hits: u64,
    /// Gets that found no usable entry and loaded (or joined a load).
    pub misses: u64,
    /// Copies served although they were stale: under REVALIDATE, while
    /// another filler held the lease, or found stale by a check after the fact.
    pub stale_serves: u64,
    /// Hits answered REVALIDATE: served, refreshed in the background.
    pub revalidations: u64,
    /// Hits answered REFETCH or UNKNOWN: reloaded from the origin.
    pub refetches: u64,
    /// Notices received on the Watch stream and applied.
    pub notices_applied: u64,
    /// Resets received on the Watch stream (a new epoch included), and new
    /// epochs met by a stream that started afresh.
    pub resets: u64,
    /// Repair notices applied (a subset of `notices_applied`): notices for
    /// keys whose change the stream could not replay exactly after a gap.
    pub repairs: u64,
    /// Origin reads (loader calls).
    pub loads: u64,
    /// Fills refused because the key or a dependency changed meanwhile.
    pub fill_races: u64,
    /// Entries evicted for capacity.
    pub evictions: u64,
    /// Loads served without caching because freshd could not be reached.
    pub bypasses: u64,
    /// Entries held now.
    pub entries: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    stale_serves: AtomicU64,
    revalidations: AtomicU64,
    refetches: AtomicU64,
    notices_applied: AtomicU64,
    resets: AtomicU64,
    repairs: AtomicU64,
    loads: AtomicU64,
    fill_races: AtomicU64,
    evictions: AtomicU64,
    bypasses: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A cached copy.
#[derive(Debug, Clone)]
struct Entry<V> {
    value: V,
    version: u64,
    epoch: u64,
    /// When the origin read that produced the value began.
    fetched_at: Instant,
    expires_at: Instant,
    /// Whether the Watch stream covers it: its track was in effect before
    /// its fill, so any later change sends a notice.
    covered: bool,
    /// Its place in the LRU order.
    tick: u64,
}

/// What a hit hands over, outside the lock.
#[derive(Debug, Clone)]
struct Hit<V> {
    value: V,
    version: u64,
    epoch: u64,
    fetched_at: Instant,
    covered: bool,
}

/// A load in flight for a key: its followers wait on `done`.
struct Load<V> {
    done: watch::Sender<Option<V>>,
    /// A reset or new epoch arrived meanwhile: do not cache the result.
    poisoned: bool,
    /// The highest version a notice announced meanwhile: a fill below it
    /// is already stale.
    noticed_version: u64,
}

enum TrackCommand {
    Track(String),
    Untrack(String),
    /// Answer once the tracks sent before are in effect on the server.
    Confirm(oneshot::Sender<()>),
}

struct State<V> {
    entries: HashMap<String, Entry<V>>,
    /// LRU order: tick -> key.
    lru: BTreeMap<u64, String>,
    tick: u64,
    /// The epoch the entries belong to (0: none yet).
    epoch: u64,
    loads: HashMap<String, Load<V>>,
    /// The keys the Watch stream is asked to track: entries and loads.
    tracked: HashSet<String>,
    commands: mpsc::UnboundedSender<TrackCommand>,
}

impl<V> State<V> {
    fn touch(&mut self, key: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(entry) = self.entries.get_mut(key) {
            self.lru.remove(&entry.tick);
            entry.tick = tick;
            self.lru.insert(tick, key.to_owned());
        }
    }

    /// Removes an entry; the caller untracks the key when it is idle.
    fn remove_entry(&mut self, key: &str) -> bool {
        match self.entries.remove(key) {
            Some(entry) => {
                self.lru.remove(&entry.tick);
                true
            }
            None => false,
        }
    }

    fn track(&mut self, key: &str) {
        if self.tracked.insert(key.to_owned()) {
            let _ = self.commands.send(TrackCommand::Track(key.to_owned()));
        }
    }

    /// Untracks a key that has neither an entry nor a load.
    fn untrack_if_idle(&mut self, key: &str) {
        if !self.entries.contains_key(key)
            && !self.loads.contains_key(key)
            && self.tracked.remove(key)
        {
            let _ = self.commands.send(TrackCommand::Untrack(key.to_owned()));
        }
    }

    /// Drops every entry under `prefix` ("" is all) and keeps loads under
    /// it from caching their result.
    fn drop_prefix(&mut self, prefix: &str) -> usize {
        let keys: Vec<String> = self
            .entries
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        for key in &keys {
            self.remove_entry(key);
            self.untrack_if_idle(key);
        }
        for (key, load) in self.loads.iter_mut() {
            if key.starts_with(prefix) {
                load.poisoned = true;
            }
        }
        keys.len()
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct PolicyInfo {
    rate: Option<f64>,
    updated: Option<Instant>,
    fetching: bool,
}

/// One check waiting for the batcher.
struct CheckJob {
    item: pb::CheckItem,
    epoch: u64,
    reply: tokio::sync::oneshot::Sender<Result<CheckOutcome>>,
}

#[derive(Debug, Clone, Copy)]
struct CheckOutcome {
    freshness: Freshness,
    decision: Decision,
    /// Present when the answer came from a single Check.
    sample_rate: Option<f64>,
}

/// The state the handle and the background tasks share.
struct Shared<V> {
    client: Client,
    settings: Settings,
    state: Mutex<State<V>>,
    counters: Counters,
    checks: mpsc::UnboundedSender<CheckJob>,
    policies: Mutex<HashMap<String, PolicyInfo>>,
    watching: AtomicBool,
    watching_changed: Notify,
}

struct Inner<V> {
    shared: Arc<Shared<V>>,
    tasks: Vec<AbortHandle>,
}

impl<V> Drop for Inner<V> {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// An in-process cache whose copies freshd keeps right.
///
/// * **Miss**: take the key's fill lease (when another filler holds it:
///   serve a copy no older than the current version if one is held, else
///   wait `retry_after_ms` and ask again, up to
///   [`NearCacheBuilder::lease_wait`]), track the key on the Watch stream,
///   read the origin with the loader, and once the track is in effect fill
///   the key with the loader's dependencies and the lease token. A fill that
///   raced a change is refused by the server; the read is repeated.
///   Concurrent misses of one key share one read.
/// * **Hit**: the namespace's policy decides. With `check_sample_rate` 1 (the
///   default) every hit is checked before it is served (concurrent hits share
///   one CheckBatch): FRESH serves, REVALIDATE serves and refreshes in the
///   background (one refresh per key at a time), REFETCH and UNKNOWN reload
///   now. With a lower rate, hits of copies the Watch stream covers (their
///   track was in effect before their fill) are served at once while the
///   stream is up, and that share of them is checked afterwards
///   (`served = true`), applying the decision for the next reader.
/// * **Watch**: one stream tracks every cached key. A notice drops the copy
///   it makes stale, a reset drops everything under its prefix, a new epoch
///   drops everything. Applied seqs are acknowledged; after a disconnect the
///   stream resumes with its token, with exponential backoff and jitter.
/// * **Unreachable freshd**: values are loaded from the origin and returned
///   without being cached, so the cache never serves what it cannot vouch for.
///
/// Checks carry the client id, the endpoint, `served` and the copy's age, so
/// the server's freshness metrics see this cache. Clones share one cache; the
/// background tasks stop when the last clone is dropped.
pub struct NearCache<V> {
    inner: Arc<Inner<V>>,
}

impl<V> Clone for NearCache<V> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<V> std::fmt::Debug for NearCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared = &self.inner.shared;
        f.debug_struct("NearCache")
            .field("client_id", &shared.client.client_id())
            .field("entries", &shared.state.lock().entries.len())
            .field("watching", &shared.watching.load(Ordering::Relaxed))
            .finish()
    }
}

/// The type-erased loader.
type LoadFuture<V> = Pin<Box<dyn Future<Output = Result<(V, Vec<String>), BoxError>> + Send>>;
type Loader<V> = Arc<dyn Fn() -> LoadFuture<V> + Send + Sync>;

/// What a lookup found.
enum Step<V> {
    Hit(Hit<V>),
    /// Another caller is loading the key: wait for its value.
    Follow(watch::Receiver<Option<V>>),
    /// This caller loads the key.
    Lead(LoadGuard<V>),
}

/// Marks a load in flight; dropping it (also when the caller's future is
/// dropped) ends the load and wakes its followers.
struct LoadGuard<V> {
    shared: Arc<Shared<V>>,
    key: String,
}

impl<V> LoadGuard<V> {
    fn finish(&self, value: &V)
    where
        V: Clone,
    {
        let state = self.shared.state.lock();
        if let Some(load) = state.loads.get(&self.key) {
            load.done.send_replace(Some(value.clone()));
        }
    }
}

impl<V> Drop for LoadGuard<V> {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock();
        state.loads.remove(&self.key);
        state.untrack_if_idle(&self.key);
    }
}

/// How a load was started.
enum Mode<V> {
    /// A caller waits for the value; a copy it held may be served while
    /// another filler holds the lease.
    Now { stale: Option<Hit<V>> },
    /// A refresh behind a served copy: give up when another filler is at it.
    Background,
}

impl<V: Clone + Send + Sync + 'static> NearCache<V> {
    /// Settings for a cache over `client`. Without a client id of its own,
    /// the cache names itself `near-<random>`.
    pub fn builder(client: Client) -> NearCacheBuilder<V> {
        NearCacheBuilder {
            client,
            settings: Settings::default(),
            _values: std::marker::PhantomData,
        }
    }

    /// A cache over `client` with the default settings.
    pub fn new(client: Client) -> Self {
        Self::builder(client).build()
    }

    /// The value of `key`: the cached copy when freshd says it may be served,
    /// else what `loader` reads from the origin, with the keys the value
    /// depends on (a change to any of them invalidates it).
    ///
    /// The loader may be called more than once (a fill that raced a change
    /// is read again) or later in the background (a REVALIDATE refresh).
    ///
    /// ```no_run
    /// # async fn demo(cache: freshd_client::NearCache<String>) -> freshd_client::Result<()> {
    /// let feed = cache
    ///     .get("feed:user:4821", || async {
    ///         // Read the origin here.
    ///         let deps = vec!["follows:4821".to_owned(), "posts:author:77".to_owned()];
    ///         Ok::<_, std::io::Error>(("the feed".to_owned(), deps))
    ///     })
    ///     .await?;
    /// # let _ = feed; Ok(()) }
    /// ```
    pub async fn get<F, Fut, E>(&self, key: &str, loader: F) -> Result<V>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(V, Vec<String>), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let loader: Loader<V> = Arc::new(move || {
            let load = loader();
            Box::pin(async move { load.await.map_err(Into::into) })
        });
        let shared = &self.inner.shared;
        // A copy a check found wrong: reloaded now, but it may still be
        // served while another filler holds the lease.
        let mut stale: Option<Hit<V>> = None;
        loop {
            match shared.begin(key, stale.as_ref().map(|h| h.version)) {
                Step::Hit(hit) => match shared.serve_hit(key, hit, &loader).await? {
                    Served::Value(v) => return Ok(v),
                    Served::Reload(copy) => stale = Some(copy),
                },
                Step::Follow(mut done) => {
                    if stale.is_none() {
                        bump(&shared.counters.misses);
                    }
                    let ready = done.borrow().clone();
                    if let Some(v) = ready {
                        return Ok(v);
                    }
                    // Err: the load ended without a value; look again.
                    if done.changed().await.is_ok() {
                        if let Some(v) = done.borrow().clone() {
                            return Ok(v);
                        }
                    }
                }
                Step::Lead(guard) => {
                    if stale.is_none() {
                        bump(&shared.counters.misses);
                        // Learn the namespace's policy before the first hit.
                        shared.sample_rate(key);
                    }
                    return shared.load(guard, loader, Mode::Now { stale }).await;
                }
            }
        }
    }

    /// The cached copy of `key`, without checking it or touching the LRU
    /// order. For inspection: serving it skips freshd's verdict.
    pub fn peek(&self, key: &str) -> Option<V> {
        let state = self.inner.shared.state.lock();
        state.entries.get(key).map(|e| e.value.clone())
    }
}

impl<V> NearCache<V> {
    /// Whether a copy of `key` is held (expired or not).
    pub fn contains(&self, key: &str) -> bool {
        self.inner.shared.state.lock().entries.contains_key(key)
    }

    /// Drops the copy of `key`; true if one was held.
    pub fn invalidate(&self, key: &str) -> bool {
        let mut state = self.inner.shared.state.lock();
        let removed = state.remove_entry(key);
        state.untrack_if_idle(key);
        removed
    }

    /// Drops every copy.
    pub fn clear(&self) {
        self.inner.shared.state.lock().drop_prefix("");
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.inner.shared.state.lock().entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The epoch the entries belong to (0 before the first fill or stream).
    pub fn epoch(&self) -> u64 {
        self.inner.shared.state.lock().epoch
    }

    /// The `check_sample_rate` last read for the namespace of `key`, if the
    /// cache has read it yet (until then every hit is checked).
    pub fn sample_rate(&self, key: &str) -> Option<f64> {
        let policies = self.inner.shared.policies.lock();
        policies.get(namespace(key)).and_then(|p| p.rate)
    }

    /// The client the cache calls freshd with (its client id included).
    pub fn client(&self) -> &Client {
        &self.inner.shared.client
    }

    /// The counters.
    pub fn stats(&self) -> NearCacheStats {
        let c = &self.inner.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NearCacheStats {
            hits: get(&c.hits),
            misses: get(&c.misses),
            stale_serves: get(&c.stale_serves),
            revalidations: get(&c.revalidations),
            refetches: get(&c.refetches),
            notices_applied: get(&c.notices_applied),
            resets: get(&c.resets),
            repairs: get(&c.repairs),
            loads: get(&c.loads),
            fill_races: get(&c.fill_races),
            evictions: get(&c.evictions),
            bypasses: get(&c.bypasses),
            entries: self.len() as u64,
        }
    }

    /// Whether the Watch stream is up.
    pub fn is_watching(&self) -> bool {
        self.inner.shared.watching.load(Ordering::Acquire)
    }

    /// Waits until the Watch stream is up, at most `timeout`; returns whether
    /// it is. Copies filled before the first stream starts are dropped when
    /// it does (nothing covered them), so wait before serving traffic.
    pub async fn wait_until_watching(&self, timeout: Duration) -> bool {
        let shared = &self.inner.shared;
        let deadline = Instant::now() + timeout;
        loop {
            let changed = shared.watching_changed.notified();
            if shared.watching.load(Ordering::Acquire) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return shared.watching.load(Ordering::Acquire);
            }
        }
    }
}

/// What a hit comes to.
enum Served<V> {
    Value(V),
    /// Reload now; the copy may still be served while another filler holds
    /// the lease.
    Reload(Hit<V>),
}

impl<V: Clone + Send + Sync + 'static> Shared<V> {
    /// Looks `key` up: a usable entry, a load to follow, or a new load this
    /// caller leads. `drop_version` first removes an entry still at that
    /// version (a copy found wrong; a newer one is a hit).
    fn begin(self: &Arc<Self>, key: &str, drop_version: Option<u64>) -> Step<V> {
        let now = Instant::now();
        let mut state = self.state.lock();
        if let Some(version) = drop_version {
            if state.entries.get(key).is_some_and(|e| e.version == version) {
                state.remove_entry(key);
            }
        }
        if let Some(entry) = state.entries.get(key) {
            if entry.expires_at <= now || entry.epoch != state.epoch {
                state.remove_entry(key);
            } else {
                let hit = Hit {
                    value: entry.value.clone(),
                    version: entry.version,
                    epoch: entry.epoch,
                    fetched_at: entry.fetched_at,
                    covered: entry.covered,
                };
                state.touch(key);
                return Step::Hit(hit);
            }
        }
        if let Some(load) = state.loads.get(key) {
            let done = load.done.subscribe();
            state.untrack_if_idle(key);
            return Step::Follow(done);
        }
        let (done, _) = watch::channel(None);
        state.loads.insert(
            key.to_owned(),
            Load {
                done,
                poisoned: false,
                noticed_version: 0,
            },
        );
        Step::Lead(LoadGuard {
            shared: self.clone(),
            key: key.to_owned(),
        })
    }

    /// The sample rate of a namespace's policy; reads the policy in the
    /// background when it is unknown or old. Unknown: 1 (check every hit).
    fn sample_rate(self: &Arc<Self>, key: &str) -> f64 {
        let ns = namespace(key);
        let mut policies = self.policies.lock();
        if policies.len() > 4096 && !policies.contains_key(ns) {
            policies.clear();
        }
        let info = policies.entry(ns.to_owned()).or_default();
        let due = info
            .updated
            .is_none_or(|t| t.elapsed() >= self.settings.policy_refresh);
        if due && !info.fetching {
            info.fetching = true;
            let shared = self.clone();
            let ns = ns.to_owned();
            tokio::spawn(async move {
                let rate = match shared.client.get_policy(ns.clone()).await {
                    Ok(p) => Some(p.policy.and_then(|p| p.check_sample_rate).unwrap_or(1.0)),
                    Err(e) => {
                        tracing::debug!(namespace = %ns, error = %e, "cannot read the policy");
                        None
                    }
                };
                let mut policies = shared.policies.lock();
                let info = policies.entry(ns).or_default();
                info.fetching = false;
                info.updated = Some(Instant::now());
                if rate.is_some() {
                    info.rate = rate;
                }
            });
        }
        info.rate.unwrap_or(1.0).clamp(0.0, 1.0)
    }

    fn note_sample_rate(&self, key: &str, rate: f64) {
        let mut policies = self.policies.lock();
        let info = policies.entry(namespace(key).to_owned()).or_default();
        info.rate = Some(rate);
        info.updated = Some(Instant::now());
    }

    /// Checks one copy through the batcher.
    async fn check(&self, key: &str, hit: &Hit<V>, served: bool) -> Result<CheckOutcome> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let age = hit.fetched_at.elapsed();
        let job = CheckJob {
            item: pb::CheckItem::new(key, hit.version)
                .with_age(age)
                .with_served(served),
            epoch: hit.epoch,
            reply,
        };
        self.checks
            .send(job)
            .map_err(|_| Error::Closed("the cache's check batcher has stopped".into()))?;
        let outcome = answer
            .await
            .map_err(|_| Error::Closed("the cache's check batcher has stopped".into()))??;
        if let Some(rate) = outcome.sample_rate {
            self.note_sample_rate(key, rate);
        }
        Ok(outcome)
    }

    async fn serve_hit(
        self: &Arc<Self>,
        key: &str,
        hit: Hit<V>,
        loader: &Loader<V>,
    ) -> Result<Served<V>> {
        let rate = self.sample_rate(key);
        if rate < 1.0 && hit.covered && self.watching.load(Ordering::Acquire) {
            // Serve now; a share of hits is checked after the fact.
            bump(&self.counters.hits);
            if rand::random::<f64>() < rate {
                let shared = self.clone();
                let key = key.to_owned();
                let loader = loader.clone();
                let copy = hit.clone();
                tokio::spawn(async move { shared.check_after(key, copy, loader).await });
            }
            return Ok(Served::Value(hit.value));
        }
        let outcome = match self.check(key, &hit, false).await {
            Ok(o) => o,
            Err(e) if e.is_unreachable() => {
                tracing::debug!(key, error = %e, "cannot check a copy: loading without caching");
                return self.bypass(loader).await.map(Served::Value);
            }
            Err(e) => return Err(e),
        };
        match outcome.decision {
            Decision::Fresh => {
                bump(&self.counters.hits);
                Ok(Served::Value(hit.value))
            }
            Decision::Revalidate => {
                bump(&self.counters.hits);
                bump(&self.counters.revalidations);
                if outcome.freshness == Freshness::Stale {
                    bump(&self.counters.stale_serves);
                }
                self.refresh_in_background(key, loader);
                Ok(Served::Value(hit.value))
            }
            Decision::Refetch | Decision::Unknown | Decision::Unspecified => {
                bump(&self.counters.refetches);
                Ok(Served::Reload(hit))
            }
        }
    }

    /// A check after the copy was served; its decision is for later readers.
    async fn check_after(self: Arc<Self>, key: String, hit: Hit<V>, loader: Loader<V>) {
        let outcome = match self.check(&key, &hit, true).await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(key, error = %e, "a check after serving failed");
                return;
            }
        };
        if outcome.freshness == Freshness::Stale {
            bump(&self.counters.stale_serves);
        }
        match outcome.decision {
            Decision::Fresh => {}
            Decision::Revalidate => {
                bump(&self.counters.revalidations);
                self.refresh_in_background(&key, &loader);
            }
            Decision::Refetch | Decision::Unknown | Decision::Unspecified => {
                bump(&self.counters.refetches);
                let mut state = self.state.lock();
                if state
                    .entries
                    .get(&key)
                    .is_some_and(|e| e.version == hit.version)
                {
                    state.remove_entry(&key);
                    state.untrack_if_idle(&key);
                }
            }
        }
    }

    /// Starts a background refresh of `key` unless a load of it is in flight.
    fn refresh_in_background(self: &Arc<Self>, key: &str, loader: &Loader<V>) {
        let guard = {
            let mut state = self.state.lock();
            if state.loads.contains_key(key) {
                return;
            }
            let (done, _) = watch::channel(None);
            state.loads.insert(
                key.to_owned(),
                Load {
                    done,
                    poisoned: false,
                    noticed_version: 0,
                },
            );
            LoadGuard {
                shared: self.clone(),
                key: key.to_owned(),
            }
        };
        let shared = self.clone();
        let loader = loader.clone();
        tokio::spawn(async move {
            let key = guard.key.clone();
            if let Err(e) = shared.load(guard, loader, Mode::Background).await {
                tracing::debug!(key, error = %e, "no background refresh");
            }
        });
    }

    /// Reads the origin without caching: freshd cannot vouch for the value.
    async fn bypass(&self, loader: &Loader<V>) -> Result<V> {
        bump(&self.counters.bypasses);
        bump(&self.counters.loads);
        let (value, _) = loader().await.map_err(Error::Load)?;
        Ok(value)
    }

    /// Leases, reads the origin, fills and caches; see [`NearCache`].
    async fn load(
        self: &Arc<Self>,
        guard: LoadGuard<V>,
        loader: Loader<V>,
        mode: Mode<V>,
    ) -> Result<V> {
        let key = guard.key.clone();
        let deadline = Instant::now() + self.settings.lease_wait;
        let mut attempts = 0;
        loop {
            // 1. The lease, or an observed seq when waiting took too long.
            let (token, observed_seq, epoch) = match self.client.lease(key.as_str()).await {
                Ok(lease) if lease.granted => (lease.token, 0, lease.epoch),
                Ok(lease) => {
                    let stale = match &mode {
                        Mode::Background => {
                            return Err(Error::Closed(format!(
                                "another filler holds the lease of {key:?}"
                            )))
                        }
                        Mode::Now { stale } => stale,
                    };
                    if let Some(copy) = stale {
                        if copy.epoch == lease.epoch
                            && lease.version != 0
                            && copy.version >= lease.version
                        {
                            bump(&self.counters.stale_serves);
                            guard.finish(&copy.value);
                            return Ok(copy.value.clone());
                        }
                    }
                    let wait = Duration::from_millis(lease.retry_after_ms.max(1));
                    if Instant::now() + wait <= deadline {
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    match self.client.check(key.as_str()).await {
                        Ok(c) => (0, c.seq, c.epoch),
                        Err(e) if e.is_unreachable() => return self.bypass(&loader).await,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if e.is_unreachable() => {
                    tracing::debug!(key, error = %e, "cannot lease: loading without caching");
                    let value = self.bypass(&loader).await?;
                    guard.finish(&value);
                    return Ok(value);
                }
                Err(e) => return Err(e),
            };

            // Track before reading the origin: changes before the track
            // takes effect are not sent, so the fill waits until it has
            // (changes between the lease and the fill refuse the fill). After
            // the lease, which has validated the key: a bad key would end the
            // stream.
            let confirmed = {
                let mut state = self.state.lock();
                state.track(&key);
                self.watching.load(Ordering::Acquire).then(|| {
                    let (confirm, confirmed) = oneshot::channel();
                    let _ = state.commands.send(TrackCommand::Confirm(confirm));
                    confirmed
                })
            };

            // 2. The origin.
            let fetched_at = Instant::now();
            bump(&self.counters.loads);
            let (value, dependencies) = loader().await.map_err(Error::Load)?;
            let covered = match confirmed {
                Some(confirmed) => matches!(
                    tokio::time::timeout(TRACK_CONFIRM_WAIT, confirmed).await,
                    Ok(Ok(()))
                ),
                None => false,
            };

            // 3. The fill.
            let fill = pb::FillRequest::new(key.as_str(), dependencies)
                .with_ttl(self.settings.ttl)
                .with_observed(observed_seq, epoch)
                .with_lease_token(token);
            match self.client.fill(fill).await {
                Ok(filled) => {
                    self.insert(&key, value.clone(), &filled, fetched_at, covered);
                    guard.finish(&value);
                    return Ok(value);
                }
                // A change raced the read, or the lease ran out meanwhile:
                // the value may be stale, read it again.
                Err(Error::FillRaced(_) | Error::FailedPrecondition(_)) => {
                    bump(&self.counters.fill_races);
                    attempts += 1;
                    if attempts >= self.settings.fill_attempts {
                        // Fresh from the origin, but racing writes: serve it
                        // without caching it.
                        guard.finish(&value);
                        return Ok(value);
                    }
                }
                Err(e) if e.is_unreachable() => {
                    bump(&self.counters.bypasses);
                    guard.finish(&value);
                    return Ok(value);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Caches a filled value unless a notice, a reset or a new epoch made it
    /// stale while it was loading.
    fn insert(
        &self,
        key: &str,
        value: V,
        filled: &pb::FillResponse,
        fetched_at: Instant,
        covered: bool,
    ) {
        let mut state = self.state.lock();
        if let Some(load) = state.loads.get(key) {
            if load.poisoned || load.noticed_version > filled.version {
                return;
            }
        }
        if state.epoch != filled.epoch {
            if state.epoch != 0 {
                // The server lost its history: every copy is from another.
                // (The stream's NEW_EPOCH reset, which counts, follows.)
                state.drop_prefix("");
                // This load is of the new epoch: it stays cacheable.
                if let Some(load) = state.loads.get_mut(key) {
                    load.poisoned = false;
                }
            }
            state.epoch = filled.epoch;
        }
        let ttl = Duration::from_millis(filled.ttl_ms.max(1));
        state.remove_entry(key);
        state.tick += 1;
        let tick = state.tick;
        state.entries.insert(
            key.to_owned(),
            Entry {
                value,
                version: filled.version,
                epoch: filled.epoch,
                fetched_at,
                expires_at: fetched_at + ttl,
                covered,
                tick,
            },
        );
        state.lru.insert(tick, key.to_owned());
        state.track(key);
        while state.entries.len() > self.settings.capacity {
            let Some((_, oldest)) = state.lru.pop_first() else {
                break;
            };
            state.entries.remove(&oldest);
            state.untrack_if_idle(&oldest);
            bump(&self.counters.evictions);
        }
    }

    fn set_watching(&self, on: bool) {
        self.watching.store(on, Ordering::Release);
        self.watching_changed.notify_waiters();
    }

    /// A stream started. Copies from another epoch, or held before any
    /// stream covered them, are dropped.
    fn on_started(&self, started: &pb::WatchStarted, resumed: bool) {
        let mut state = self.state.lock();
        let other_epoch = state.epoch != 0 && state.epoch != started.epoch;
        if other_epoch || (!resumed && (!state.entries.is_empty() || !state.loads.is_empty())) {
            // A resumed stream from another epoch gets a NEW_EPOCH reset,
            // which counts; a new one does not.
            if other_epoch && !resumed {
                bump(&self.counters.resets);
            }
            state.drop_prefix("");
        }
        state.epoch = started.epoch;
    }

    fn on_notices(&self, notices: &[pb::Notice]) {
        let mut state = self.state.lock();
        for n in notices {
            if state
                .entries
                .get(&n.key)
                .is_some_and(|e| e.version < n.version)
            {
                state.remove_entry(&n.key);
                state.untrack_if_idle(&n.key);
            }
            if let Some(load) = state.loads.get_mut(&n.key) {
                load.noticed_version = load.noticed_version.max(n.version);
            }
            bump(&self.counters.notices_applied);
            if n.repair {
                bump(&self.counters.repairs);
            }
        }
    }

    fn on_reset(&self, reset: &pb::Reset) {
        bump(&self.counters.resets);
        let mut state = self.state.lock();
        if reset.reason() == ResetReason::NewEpoch {
            state.drop_prefix("");
        } else {
            state.drop_prefix(&reset.prefix);
        }
    }
}

/// A wait drawn at random between half and all of `base`.
fn jittered(base: Duration) -> Duration {
    let ms = base.as_millis().max(2) as u64;
    Duration::from_millis(rand::random_range(ms / 2..=ms))
}

/// Confirmations owed to loads whose track must be in effect before they
/// fill: each waits for the answer to a progress request sent after its
/// track (a stream answers progress requests in order).
#[derive(Default)]
struct Confirmations {
    /// Progress requests sent on this stream, and answers received.
    requested: u64,
    answered: u64,
    /// By the number of the progress request that confirms them.
    pending: VecDeque<(u64, Vec<oneshot::Sender<()>>)>,
    /// Owed to the next stream's start, which tracks every key at once.
    at_start: Vec<oneshot::Sender<()>>,
}

impl Confirmations {
    /// Sends a progress request; `confirms` are answered with it.
    fn request(&mut self, stream: &crate::client::Watch, confirms: Vec<oneshot::Sender<()>>) {
        if stream.progress().is_ok() {
            self.requested += 1;
            if !confirms.is_empty() {
                self.pending.push_back((self.requested, confirms));
            }
        } else {
            self.at_start.extend(confirms);
        }
    }

    fn answered(&mut self) {
        self.answered += 1;
        while self
            .pending
            .front()
            .is_some_and(|(n, _)| *n <= self.answered)
        {
            let (_, confirms) = self.pending.pop_front().expect("a front");
            for c in confirms {
                let _ = c.send(());
            }
        }
    }

    /// The stream ended: what it owed goes to the next start.
    fn ended(&mut self) {
        for (_, confirms) in self.pending.drain(..) {
            self.at_start.extend(confirms);
        }
        self.requested = 0;
        self.answered = 0;
    }

    /// A stream started with every tracked key.
    fn started(&mut self) {
        for c in self.at_start.drain(..) {
            let _ = c.send(());
        }
    }
}

/// Forwards track commands, coalesced, then one progress request for the
/// confirmations among them.
fn forward(
    stream: &crate::client::Watch,
    first: TrackCommand,
    commands: &mut mpsc::UnboundedReceiver<TrackCommand>,
    confirmations: &mut Confirmations,
) {
    let mut ops: HashMap<String, bool> = HashMap::new();
    let mut confirms = Vec::new();
    let mut apply = |c: TrackCommand| match c {
        TrackCommand::Track(k) => {
            ops.insert(k, true);
        }
        TrackCommand::Untrack(k) => {
            ops.insert(k, false);
        }
        TrackCommand::Confirm(c) => confirms.push(c),
    };
    apply(first);
    while let Ok(c) = commands.try_recv() {
        apply(c);
    }
    let (track, untrack): (Vec<_>, Vec<_>) = ops.into_iter().partition(|(_, t)| *t);
    if !untrack.is_empty() {
        let _ = stream.untrack(untrack.into_iter().map(|(k, _)| k));
    }
    if !track.is_empty() {
        let _ = stream.track(track.into_iter().map(|(k, _)| k));
    }
    if !confirms.is_empty() {
        confirmations.request(stream, confirms);
    }
}

/// The cache's Watch stream: connect, apply, acknowledge, resume.
async fn watch_forever<V: Clone + Send + Sync + 'static>(
    shared: Arc<Shared<V>>,
    mut commands: mpsc::UnboundedReceiver<TrackCommand>,
) {
    let settings = shared.settings.clone();
    let mut token: Option<pb::ResumeToken> = None;
    let mut backoff = settings.reconnect_min;
    let mut confirmations = Confirmations::default();
    loop {
        let track: Vec<String> = {
            let state = shared.state.lock();
            // The start carries the whole tracked set: older track commands
            // are moot, and their confirmations come with the start.
            while let Ok(command) = commands.try_recv() {
                if let TrackCommand::Confirm(c) = command {
                    confirmations.at_start.push(c);
                }
            }
            state.tracked.iter().cloned().collect()
        };
        let start = pb::WatchStart {
            track,
            resume: token,
            ..Default::default()
        };
        let opened = Instant::now();
        let mut stream = match shared.client.watch(start).await {
            Ok(stream) => stream,
            Err(e) => {
                if e.is_unreachable() {
                    tracing::debug!(error = %e, "the cache's Watch stream cannot start");
                } else {
                    // A refused start (a limit, a bad key) does not fix itself.
                    tracing::warn!(error = %e, "freshd refused the cache's Watch stream");
                }
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(settings.reconnect_max);
                continue;
            }
        };
        let started = stream.started;
        shared.on_started(&started, token.is_some());
        if token.is_none() {
            token = Some(pb::ResumeToken {
                epoch: started.epoch,
                seq: started.seq,
            });
        }
        confirmations.started();
        shared.set_watching(true);
        confirmations.request(&stream, Vec::new());
        let mut acked = 0u64;
        let mut tick = tokio::time::interval(settings.progress_interval);
        tick.reset();
        let end = loop {
            tokio::select! {
                event = stream.next() => match event {
                    Some(Ok(event)) => {
                        match &event {
                            WatchEvent::Notices(notices) => shared.on_notices(notices),
                            WatchEvent::Reset(reset) => shared.on_reset(reset),
                            WatchEvent::Progress(_) => confirmations.answered(),
                            // The cache's stream does not ask for refusals
                            // in band: a refused track ends it instead.
                            WatchEvent::Refused(r) => {
                                tracing::warn!(request = r.request, message = %r.message, "freshd refused a request of the cache's Watch stream");
                            }
                        }
                        let applied = match event {
                            WatchEvent::Notices(notices) => notices.last().map(|n| (started.epoch, n.seq)),
                            WatchEvent::Progress(p) => Some((p.epoch, p.seq)),
                            // After a new epoch's reset the stream is live
                            // from its start.
                            WatchEvent::Reset(r) if r.reason() == ResetReason::NewEpoch => {
                                token = Some(pb::ResumeToken { epoch: started.epoch, seq: started.seq });
                                None
                            }
                            WatchEvent::Reset(_) | WatchEvent::Refused(_) => None,
                        };
                        if let Some((epoch, seq)) = applied {
                            if seq > acked {
                                let _ = stream.ack(seq);
                                acked = seq;
                            }
                            token = Some(pb::ResumeToken { epoch, seq });
                        }
                    }
                    Some(Err(e)) => break Some(e),
                    None => break None,
                },
                command = commands.recv() => match command {
                    Some(first) => forward(&stream, first, &mut commands, &mut confirmations),
                    None => return,
                },
                _ = tick.tick() => confirmations.request(&stream, Vec::new()),
            }
        };
        shared.set_watching(false);
        confirmations.ended();
        match end {
            Some(e) => tracing::debug!(error = %e, "the cache's Watch stream ended"),
            None => tracing::debug!("the server ended the cache's Watch stream"),
        }
        // A stream that ran for a while starts the backoff over.
        if opened.elapsed() >= Duration::from_secs(1) {
            backoff = settings.reconnect_min;
        }
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(settings.reconnect_max);
    }
}

/// Batches concurrent checks: each call takes every check waiting when it
/// starts, up to `max_batch`; one check alone goes as a Check (which also
/// returns the sample rate).
async fn check_forever(
    client: Client,
    endpoint: String,
    max_batch: usize,
    in_flight: usize,
    mut jobs: mpsc::UnboundedReceiver<CheckJob>,
) {
    let calls = Arc::new(Semaphore::new(in_flight));
    loop {
        let Ok(permit) = calls.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = jobs.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let client = client.clone();
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let mut by_epoch: BTreeMap<u64, Vec<CheckJob>> = BTreeMap::new();
            for job in batch {
                by_epoch.entry(job.epoch).or_default().push(job);
            }
            for (epoch, jobs) in by_epoch {
                run_checks(&client, &endpoint, epoch, jobs).await;
            }
            drop(permit);
        });
    }
}

async fn run_checks(client: &Client, endpoint: &str, epoch: u64, mut jobs: Vec<CheckJob>) {
    if jobs.len() == 1 {
        let job = jobs.pop().expect("one job");
        let request = pb::CheckRequest {
            key: job.item.key,
            version: job.item.version,
            age_ms: job.item.age_ms,
            epoch,
            served: job.item.served,
            endpoint: endpoint.to_owned(),
            ..Default::default()
        };
        let result = client.check(request).await.map(|r| CheckOutcome {
            freshness: r.freshness(),
            decision: r.decision(),
            sample_rate: Some(r.check_sample_rate),
        });
        let _ = job.reply.send(result);
        return;
    }
    let (items, replies): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| (j.item, j.reply)).unzip();
    let count = items.len();
    let request = pb::CheckBatchRequest::new(items)
        .with_epoch(epoch)
        .with_endpoint(endpoint);
    match client.check_batch(request).await {
        Ok(response) if response.results.len() == count => {
            for (result, reply) in response.results.iter().zip(replies) {
                let _ = reply.send(Ok(CheckOutcome {
                    freshness: result.freshness(),
                    decision: result.decision(),
                    sample_rate: None,
                }));
            }
        }
        Ok(response) => {
            let message = format!(
                "CheckBatch answered {} results for {count} items",
                response.results.len()
            );
            for reply in replies {
                let _ = reply.send(Err(Error::Protocol(message.clone())));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.duplicate()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_the_part_before_the_first_colon() {
        assert_eq!(namespace("feed:user:1"), "feed");
        assert_eq!(namespace("plain"), "plain");
        assert_eq!(namespace(":x"), "");
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_wait() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_millis(100));
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_millis(100),
                "{d:?}"
            );
        }
    }
}
