//! The state: a version, a last change and the dependency edges of every key,
//! in shards.
//!
//! # Shape
//! One node per key, whether the key is a cached entry, a changing entity or
//! both. A node holds its forward edges (its dependencies) and its reverse
//! edges (its dependents), and lives in the shard chosen by its key's hash.
//!
//! # Locking
//! - `sequencer` (a mutex) serialises every mutation: log append, then apply,
//!   in seq order. There is one writer at a time, so a writer may read shards
//!   and rely on what it read until it lets go of the sequencer.
//! - Each shard is a `parking_lot::RwLock`. A mutation write-locks every shard
//!   it will touch, always in ascending shard order, before changing anything,
//!   and releases them all after it has published its seq (two-phase locking).
//!   Readers lock one shard (`check`) or several in ascending order
//!   (`check_batch`), so a reader sees all of a mutation or none of it, and
//!   the ordered acquisition cannot deadlock.
//! - No lock is held across an `.await`: nothing here is async.
//!
//! # Invariants
//! - A node's `version` is the seq of the mutation that last changed it: a
//!   publish that reached it, the fill that created it, or a fill that
//!   changed its dependency set. Seqs are never reused within an epoch, so a
//!   cached copy whose version matches is the current one.
//! - For a key without a node, every change it ever had is at or below its
//!   shard's `forgotten_seq`; a new node starts with that bound as its
//!   `last_change_seq`. This is what lets a fill with an old `observed_seq` be
//!   refused even for keys freshd has since forgotten.
//! - A node with dependents is never removed, so reverse edges are never lost.
//!   A node whose registration ended and that nobody depends on has an entry
//!   in its shard's expiry index and is removed by [`Store::expire`].

use std::collections::{BTreeSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hashbrown::{HashMap, HashSet, HashTable};
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};
use crate::fanout::{Delivery, Hub, HubConfig, Notice, NoticeCache};
use crate::lease::{LeaseOutcome, Leases};
use crate::log::{Log, Record};
use crate::metrics::Metrics;
use crate::policy::{Policies, Policy};
use crate::wal::{Body, Durability, WalRecord};

/// A key as the store holds it: shared between the map and every edge.
pub type Key = Arc<str>;

static SEED: LazyLock<u64> = LazyLock::new(rand::random);

/// The hasher for keys: foldhash with a per-process random seed, so that key
/// names chosen by a client cannot be made to collide on purpose across runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeyHash;

impl BuildHasher for KeyHash {
    type Hasher = foldhash::fast::FoldHasher<'static>;

    fn build_hasher(&self) -> Self::Hasher {
        foldhash::fast::FixedState::with_seed(*SEED).build_hasher()
    }
}

fn hash_key(key: &str) -> u64 {
    KeyHash.hash_one(key)
}

/// Settings of the store, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Number of shards; a power of two.
    pub shards: usize,
    /// TTL of a fill that asks for none.
    pub default_ttl: Duration,
    /// The longest TTL a fill is granted.
    pub max_ttl: Duration,
    /// How long the change of a key that nobody registered is remembered.
    pub change_retention: Duration,
    /// Transitive invalidations per publish above which the publish is logged
    /// and counted (it still completes).
    pub max_invalidations_per_publish: u64,
    /// Fan-out limits: history, queues, per-stream filters.
    pub hub: HubConfig,
    /// How long a fill lease lasts.
    pub lease_ttl: Duration,
    /// The freshness policies to start with.
    pub policies: Policies,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            shards: 64,
            default_ttl: Duration::from_secs(300),
            max_ttl: Duration::from_secs(86_400),
            change_retention: Duration::from_secs(60),
            max_invalidations_per_publish: 100_000,
            hub: HubConfig::default(),
            lease_ttl: Duration::from_secs(10),
            policies: Policies::default(),
        }
    }
}

/// One change of a publish, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishChange {
    /// The key that changed.
    pub key: String,
    /// A monotonic number from the source; see the proto.
    pub external_version: Option<u64>,
    /// Whether the change is critical.
    pub critical: bool,
    /// Producer event time in Unix ms; 0 when unknown.
    pub event_time_ms: u64,
}

/// What a publish did with one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeOutcome {
    /// Keys this change bumped that no earlier change of the call had bumped.
    pub invalidated: u64,
    /// The change was a duplicate by external version and had no effect.
    pub duplicate: bool,
    /// The key's version after the call.
    pub version: u64,
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOutcome {
    /// The publish's seq, or the current seq when every change was a duplicate.
    pub seq: u64,
    /// One outcome per change, in order.
    pub results: Vec<ChangeOutcome>,
}

/// A fill, validated: dependencies sorted, without duplicates or the key
/// itself, and the TTL resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillSpec {
    /// The key the caller cached.
    pub key: String,
    /// Its dependencies, sorted and unique.
    pub dependencies: Vec<String>,
    /// The TTL to grant, in ms, already defaulted and capped.
    pub ttl_ms: u64,
    /// The seq the caller observed before reading the origin.
    pub observed_seq: u64,
}

/// A purge, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeSpec {
    /// Keys starting with it are purged, with their dependents.
    pub prefix: String,
    /// Hard (refetch now) or soft (revalidate, spread out).
    pub hard: bool,
    /// A soft purge's spread, ms.
    pub jitter_ms: u64,
    /// Only count.
    pub dry_run: bool,
    /// Go ahead above `max_keys`.
    pub confirm: bool,
    /// The blast radius above which confirmation is needed.
    pub max_keys: u64,
}

/// What a purge did, or would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeOutcome {
    /// Keys under the prefix.
    pub matched: u64,
    /// Those and their transitive dependents.
    pub affected: u64,
    /// Watch streams that get at least one notice.
    pub subscribers: u64,
    /// Notices sent (deliveries).
    pub notices: u64,
    /// The purge's seq (the current seq for a dry run).
    pub seq: u64,
    /// Whether anything was changed.
    pub applied: bool,
}

/// What a fill did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillOutcome {
    /// The version to store beside the cached value.
    pub version: u64,
    /// The fill's seq.
    pub seq: u64,
    /// The TTL granted, in ms.
    pub ttl_ms: u64,
}

/// Whether a cached copy is still right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// The cached version is the current one.
    Fresh,
    /// The key changed since the cached version.
    Stale,
    /// No live registration for the key.
    Unknown,
}

/// The answer to one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckAnswer {
    /// Fresh, stale or unknown.
    pub freshness: Freshness,
    /// The current version (0 when unknown).
    pub version: u64,
    /// The critical bit of the key's last change.
    pub critical: bool,
    /// A critical change happened after the cached version.
    pub critical_since: bool,
    /// A soft purge covers the cached copy: it is older than the key's purge
    /// time.
    pub soft_purged: bool,
    /// The seq of the last publish that reached the key.
    pub last_change_seq: u64,
}

const UNKNOWN: CheckAnswer = CheckAnswer {
    freshness: Freshness::Unknown,
    version: 0,
    critical: false,
    critical_since: false,
    soft_purged: false,
    last_change_seq: 0,
};

/// Everything the store holds for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key.
    pub key: String,
    /// Its version.
    pub version: u64,
    /// The seq of the last publish that reached it (an upper bound when it
    /// was forgotten and registered again); 0 when none.
    pub last_change_seq: u64,
    /// When that change was applied, Unix ms; 0 when none.
    pub last_change_unix_ms: u64,
    /// The producer's event time of that change, Unix ms; 0 when none.
    pub event_time_unix_ms: u64,
    /// The critical bit of that change.
    pub critical: bool,
    /// Its dependencies, sorted.
    pub dependencies: Vec<String>,
    /// How many keys depend on it.
    pub dependents: u64,
    /// Whether a live registration answers checks.
    pub registered: bool,
    /// ms until the registration ends; 0 when not registered.
    pub ttl_left_ms: u64,
    /// The last external version seen.
    pub external_version: Option<u64>,
}

/// Store-wide counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Nodes held.
    pub keys: u64,
    /// Dependency edges.
    pub edges: u64,
    /// Shard count.
    pub shards: u32,
    /// Last applied seq.
    pub seq: u64,
    /// The epoch.
    pub epoch: u64,
    /// Keys removed by expiry since start.
    pub expired: u64,
    /// Publishes over `max_invalidations_per_publish` since start.
    pub oversized_publishes: u64,
    /// Leases granted since start.
    pub leases_granted: u64,
    /// Lease requests that found a fill in flight, since start.
    pub leases_contended: u64,
    /// Leases held now.
    pub leases_held: u64,
    /// Purges applied since start.
    pub purges: u64,
    /// Keys those purges affected.
    pub purged_keys: u64,
}

const CRITICAL: u8 = 1;
const HAS_EXTERNAL: u8 = 2;

/// One key. Nodes live boxed in their shard's table: a table keeps up to
/// half of its buckets empty after it doubles, and an empty bucket costs a
/// pointer instead of a whole node. What only a key that was ever changed,
/// critically changed, externally versioned or soft-purged needs lives in a
/// second box, [`Change`], so a key that was only filled carries 72 bytes.
struct Node {
    key: Key,
    version: u64,
    last_change_seq: u64,
    /// Clock ms until which the key answers checks; 0 when it does not and has
    /// no expiry entry. A non-zero value has an expiry entry (shared with any
    /// other key of the same hash and expiry).
    expires_at: u64,
    /// Forward edges, sorted by key.
    deps: Box<[Key]>,
    /// Reverse edges.
    dependents: Dependents,
    /// `None` reads as a `Change` of zeros: the key was never changed.
    change: Option<Box<Change>>,
}

/// The rest of a node, which only keys that were changed or purged have.
/// It is boxed once, on the key's first change; later changes overwrite it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Change {
    /// Unix ms at which the last change was applied; 0 when none.
    changed_at_ms: u64,
    /// The producer's event time of the last change, Unix ms; 0 when none.
    event_time_ms: u64,
    /// The last external version seen (meaningful with `HAS_EXTERNAL`).
    external_version: u64,
    /// Seq of the last critical change that reached the key; 0 if none.
    last_critical_seq: u64,
    /// Clock ms from which copies older than it must revalidate (a soft
    /// purge); 0 if none.
    soft_purge_at: u64,
    /// `CRITICAL`, `HAS_EXTERNAL`.
    flags: u8,
}

/// What a node without a [`Change`] box reads as.
static UNCHANGED: Change = Change {
    changed_at_ms: 0,
    event_time_ms: 0,
    external_version: 0,
    last_critical_seq: 0,
    soft_purge_at: 0,
    flags: 0,
};

impl Node {
    fn new(key: Key, version: u64, last_change_seq: u64) -> Self {
        Self {
            key,
            version,
            last_change_seq,
            expires_at: 0,
            deps: Box::new([]),
            dependents: Dependents::default(),
            change: None,
        }
    }

    /// The change fields, zeros for a key never changed.
    fn change(&self) -> &Change {
        self.change.as_deref().unwrap_or(&UNCHANGED)
    }

    /// The change fields to write, boxed on first use.
    fn change_mut(&mut self) -> &mut Change {
        self.change.get_or_insert_with(Box::default)
    }

    fn critical(&self) -> bool {
        self.change().flags & CRITICAL != 0
    }

    fn external_version(&self) -> Option<u64> {
        let change = self.change();
        (change.flags & HAS_EXTERNAL != 0).then_some(change.external_version)
    }

    fn live(&self, now: u64) -> bool {
        now < self.expires_at
    }

    /// The answer for a copy at `version`, `age_ms` old, at clock `now`.
    fn answer(&self, version: u64, age_ms: u64, now: u64) -> CheckAnswer {
        let current = self.version == version;
        let change = self.change();
        CheckAnswer {
            freshness: if current {
                Freshness::Fresh
            } else {
                Freshness::Stale
            },
            version: self.version,
            critical: change.flags & CRITICAL != 0,
            critical_since: !current && change.last_critical_seq > version,
            soft_purged: current
                && change.soft_purge_at != 0
                && now >= change.soft_purge_at
                && now.saturating_sub(age_ms) < change.soft_purge_at,
            last_change_seq: self.last_change_seq,
        }
    }
}

/// Reverse edges up to this many are kept in a sorted vector (16 bytes
/// each, searched by halving); past it, in a hash set (about 35 bytes each),
/// whose inserts and removals do not shift the other entries.
const SMALL_DEPENDENTS: usize = 64;

/// A node's reverse edges. Most keys have none (a cached entry that nothing
/// depends on), so the set lives behind a pointer: 8 bytes per node instead
/// of an inline set's 24 or 32.
#[derive(Default)]
struct Dependents(Option<Box<DependentSet>>);

/// A non-empty set of reverse edges.
enum DependentSet {
    /// Sorted by key, at most [`SMALL_DEPENDENTS`] entries.
    Small(Vec<Key>),
    /// More than [`SMALL_DEPENDENTS`] / 2 entries. Boxed so that the enum
    /// is no larger than the vector (one 32-byte chunk for the box).
    Large(Box<HashSet<Key, KeyHash>>),
}

impl Dependents {
    fn iter(&self) -> impl Iterator<Item = &Key> {
        let (small, large) = match self.0.as_deref() {
            None => (None, None),
            Some(DependentSet::Small(keys)) => (Some(keys.iter()), None),
            Some(DependentSet::Large(set)) => (None, Some(set.iter())),
        };
        small
            .into_iter()
            .flatten()
            .chain(large.into_iter().flatten())
    }

    fn insert(&mut self, key: Key) -> bool {
        let set = self
            .0
            .get_or_insert_with(|| Box::new(DependentSet::Small(Vec::new())));
        match &mut **set {
            DependentSet::Small(keys) => {
                let Err(pos) = keys.binary_search_by(|k| (**k).cmp(&*key)) else {
                    return false;
                };
                if keys.len() == SMALL_DEPENDENTS {
                    let mut large = HashSet::with_capacity_and_hasher(keys.len() + 1, KeyHash);
                    large.extend(keys.drain(..));
                    large.insert(key);
                    **set = DependentSet::Large(Box::new(large));
                    return true;
                }
                if keys.len() == keys.capacity() {
                    // Grow by a quarter, not the doubling of `push`: most
                    // sets stop growing at a few dozen entries, and the
                    // spare half of a doubled buffer would be kept for good.
                    keys.reserve_exact((keys.len() / 4).max(2));
                }
                keys.insert(pos, key);
                true
            }
            DependentSet::Large(large) => large.insert(key),
        }
    }

    fn remove(&mut self, key: &str) -> bool {
        let Some(set) = &mut self.0 else {
            return false;
        };
        let (removed, left) = match &mut **set {
            DependentSet::Small(keys) => match keys.binary_search_by(|k| (**k).cmp(key)) {
                Ok(pos) => {
                    keys.remove(pos);
                    if keys.capacity() > 2 * keys.len() + 4 {
                        // Give back what a set that shrank no longer needs.
                        keys.shrink_to(keys.len() + keys.len() / 4);
                    }
                    (true, keys.len())
                }
                Err(_) => (false, keys.len()),
            },
            DependentSet::Large(large) => {
                let removed = large.remove(key);
                let left = large.len();
                if left <= SMALL_DEPENDENTS / 2 {
                    // Back to the compact form at half the limit, so that a
                    // set hovering at the limit does not switch on every edge.
                    let mut keys: Vec<Key> = large.drain().collect();
                    keys.sort_unstable();
                    **set = DependentSet::Small(keys);
                }
                (removed, left)
            }
        };
        if left == 0 {
            self.0 = None;
        }
        removed
    }

    fn len(&self) -> usize {
        match self.0.as_deref() {
            None => 0,
            Some(DependentSet::Small(keys)) => keys.len(),
            Some(DependentSet::Large(set)) => set.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

/// What visiting a node during a publish did.
#[derive(PartialEq, Eq)]
enum Bump {
    /// First reached in this publish.
    New,
    /// Reached before by a non-critical change, now by a critical one.
    Upgraded,
    /// Nothing to do.
    Seen,
}

/// One shard of nodes, with its expiry index.
#[derive(Default)]
struct Shard {
    nodes: HashTable<Box<Node>>,
    /// `(expires_at, key hash)` for every node with a non-zero `expires_at`:
    /// 16 bytes an entry, and the key is found again by its hash. Two keys
    /// with one hash and one expiry share an entry, which stands for both.
    expiry: BTreeSet<(u64, u64)>,
    /// Upper bound of the last change of every key not held here.
    forgotten_seq: u64,
    /// Forward edges of the nodes held here.
    edges: u64,
}

impl Shard {
    fn get(&self, hash: u64, key: &str) -> Option<&Node> {
        self.nodes.find(hash, |n| &*n.key == key).map(|n| &**n)
    }

    fn get_mut(&mut self, hash: u64, key: &str) -> Option<&mut Node> {
        self.nodes
            .find_mut(hash, |n| &*n.key == key)
            .map(|n| &mut **n)
    }

    fn insert(&mut self, hash: u64, node: Node) {
        if node.expires_at != 0 {
            self.expiry.insert((node.expires_at, hash));
        }
        self.edges += node.deps.len() as u64;
        self.nodes
            .insert_unique(hash, Box::new(node), |n| hash_key(&n.key));
    }

    fn remove(&mut self, hash: u64, key: &str) -> Option<Node> {
        let entry = self.nodes.find_entry(hash, |n| &*n.key == key).ok()?;
        let (node, _) = entry.remove();
        self.edges -= node.deps.len() as u64;
        self.forgotten_seq = self.forgotten_seq.max(node.last_change_seq);
        Some(*node)
    }

    /// The node for `key`, created as a dependency-only node if absent.
    fn get_or_placeholder(&mut self, hash: u64, key: &str, seq: u64) -> &mut Node {
        if self.get(hash, key).is_none() {
            let node = Node::new(Key::from(key), seq, self.forgotten_seq);
            self.insert(hash, node);
        }
        self.get_mut(hash, key).expect("inserted above")
    }

    /// Moves a node's expiry to `expires_at` (0: none).
    fn set_expiry(&mut self, hash: u64, key: &str, expires_at: u64) {
        let Some(node) = self.get_mut(hash, key) else {
            return;
        };
        let old = std::mem::replace(&mut node.expires_at, expires_at);
        if old == expires_at {
            return;
        }
        if old != 0 && self.expiring(hash, old).next().is_none() {
            self.expiry.remove(&(old, hash));
        }
        if expires_at != 0 {
            self.expiry.insert((expires_at, hash));
        }
    }

    /// The keys with hash `hash` whose registration ends at `at`.
    fn expiring(&self, hash: u64, at: u64) -> impl Iterator<Item = &Key> {
        // The table's candidates for a hash share only its tag.
        self.nodes
            .iter_hash(hash)
            .filter(move |n| n.expires_at == at && hash_key(&n.key) == hash)
            .map(|n| &n.key)
    }

    /// Removes the reverse edge `dependent -> key`; a key left with no
    /// dependents and no registration is scheduled for removal.
    fn drop_dependent(&mut self, hash: u64, key: &str, dependent: &str, now: u64) {
        let Some(node) = self.get_mut(hash, key) else {
            return;
        };
        node.dependents.remove(dependent);
        if node.dependents.is_empty() && node.expires_at == 0 {
            self.set_expiry(hash, key, now);
        }
    }

    /// The last change of `key` as far as this shard can tell.
    fn last_change(&self, hash: u64, key: &str) -> u64 {
        self.get(hash, key)
            .map_or(self.forgotten_seq, |n| n.last_change_seq)
    }
}

/// The shards one mutation holds, write-locked in ascending order.
struct WriteSet<'a> {
    store: &'a Store,
    guards: Vec<(usize, RwLockWriteGuard<'a, Shard>)>,
}

impl<'a> WriteSet<'a> {
    /// Locks the shards marked in `needed`, in ascending order.
    fn lock(store: &'a Store, needed: &[bool]) -> Self {
        let guards = needed
            .iter()
            .enumerate()
            .filter(|(_, &n)| n)
            .map(|(i, _)| (i, store.shards[i].write()))
            .collect();
        Self { store, guards }
    }

    fn shard(&mut self, index: usize) -> &mut Shard {
        match self.guards.binary_search_by_key(&index, |(i, _)| *i) {
            Ok(pos) => &mut self.guards[pos].1,
            Err(pos) => {
                // The read phase of the mutation names every shard it will
                // touch; reaching here is a bug, but taking the lock late is
                // still correct for single-shard readers.
                debug_assert!(false, "shard {index} was not locked up front");
                self.guards
                    .insert(pos, (index, self.store.shards[index].write()));
                &mut self.guards[pos].1
            }
        }
    }
}

/// The single writer's state, behind the sequencer mutex.
struct Sequencer {
    log: Box<dyn Log>,
    /// Scratch for the read phase of a publish: keys seen.
    visited: HashSet<Key, KeyHash>,
    /// Scratch for the breadth-first walks.
    queue: VecDeque<(Key, bool)>,
    /// Scratch: which shards the current mutation touches.
    needed: Vec<bool>,
    /// Where the next expiry pass starts.
    expiry_cursor: usize,
}

impl Sequencer {
    fn reset_needed(&mut self) {
        self.needed.iter_mut().for_each(|n| *n = false);
    }
}

/// Milliseconds since the store started, from tokio's clock (so tests can
/// pause time); never 0, which means "no expiry".
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: tokio::time::Instant,
    /// Unix ms at `start`, to place times read back from the log.
    start_unix: u64,
}

impl Clock {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }

    /// The clock time of a Unix time (1 for anything before the start).
    fn at_unix(&self, unix_ms: u64) -> u64 {
        unix_ms.saturating_sub(self.start_unix) + 1
    }

    /// The Unix time of a clock time (0 stays 0: "none"). Saturates: a
    /// time read back from the log may lie at the end of time.
    fn unix_at(&self, at: u64) -> u64 {
        if at == 0 {
            0
        } else {
            self.start_unix.saturating_add(at - 1)
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The versioned keys and dependency graph. Cheap to share behind an `Arc`.
pub struct Store {
    shards: Box<[RwLock<Shard>]>,
    mask: usize,
    /// The last applied seq: every mutation up to it is fully visible.
    applied: AtomicU64,
    epoch: u64,
    sequencer: Mutex<Sequencer>,
    clock: Clock,
    config: StoreConfig,
    expired: AtomicU64,
    oversized: AtomicU64,
    hub: Hub,
    metrics: Arc<Metrics>,
    durability: Option<Durability>,
    leases: Leases,
    policies: RwLock<Policies>,
    /// Woken after every applied mutation, for read-your-writes waits.
    applied_notify: tokio::sync::Notify,
    counters: Counters,
}

/// Counters of leases and purges.
#[derive(Default)]
struct Counters {
    leases_granted: AtomicU64,
    leases_contended: AtomicU64,
    purges: AtomicU64,
    purged_keys: AtomicU64,
}

impl Store {
    /// A store over `log`, recording metrics with default settings.
    /// `config.shards` must be a power of two.
    pub fn new(config: StoreConfig, log: Box<dyn Log>) -> Self {
        Self::with_metrics(config, log, Arc::new(Metrics::new(Default::default())))
    }

    /// A store over `log` that records into `metrics`.
    pub fn with_metrics(config: StoreConfig, log: Box<dyn Log>, metrics: Arc<Metrics>) -> Self {
        assert!(
            config.shards.is_power_of_two(),
            "shard count must be a power of two"
        );
        let shards = (0..config.shards)
            .map(|_| RwLock::new(Shard::default()))
            .collect();
        let last_seq = log.last_seq();
        let durability = log.durability();
        let applied = AtomicU64::new(last_seq);
        let epoch = log.epoch();
        Self {
            shards,
            mask: config.shards - 1,
            applied,
            epoch,
            sequencer: Mutex::new(Sequencer {
                log,
                visited: HashSet::with_hasher(KeyHash),
                queue: VecDeque::new(),
                needed: vec![false; config.shards],
                expiry_cursor: 0,
            }),
            clock: Clock {
                start: tokio::time::Instant::now(),
                start_unix: unix_ms(),
            },
            hub: Hub::new(config.hub.clone(), last_seq, metrics.clone()),
            metrics,
            durability,
            leases: Leases::new(config.shards),
            policies: RwLock::new(config.policies.clone()),
            applied_notify: tokio::sync::Notify::new(),
            counters: Counters::default(),
            config,
            expired: AtomicU64::new(0),
            oversized: AtomicU64::new(0),
        }
    }

    /// The fan-out hub that Watch streams subscribe to.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Waits until mutation `seq` is durable, as the log's fsync policy
    /// says (at once for the memory-only log).
    pub async fn wait_durable(&self, seq: u64) {
        if let Some(durability) = &self.durability {
            durability.wait(seq).await;
        }
    }

    /// Applies the records of a log being recovered, in order. Call it once,
    /// before serving; the hub records the notices again, so that Watch
    /// streams resume from the replayed history.
    pub fn recover(&self, records: Vec<WalRecord>) {
        match records.first() {
            // A snapshot restored the history: the replay continues it.
            Some(_) if self.hub.recording() => {}
            Some(first) => self.hub.replay_from(first.seq - 1),
            None => {}
        }
        self.replay_quietly(records);
    }

    /// Applies log records in order, building notices only if the hub
    /// records them (a compaction's store does not).
    pub fn replay_quietly(&self, records: Vec<WalRecord>) {
        let mut sequencer = self.sequencer.lock();
        let sequencer = &mut *sequencer;
        let end = sequencer
            .log
            .last_seq()
            .max(records.last().map_or(0, |r| r.seq));
        for record in records {
            self.replay(sequencer, record);
        }
        // Seqs continue past the log's reservation: nothing names them.
        self.applied.store(end, Ordering::Release);
        let _nothing_to_deliver = self.hub.fanout(end, Vec::new());
    }

    /// The whole state as a snapshot of seq `seq`: its meta and one entry
    /// per key. Call it on a store nothing else writes to.
    pub fn snapshot(
        &self,
        seq: u64,
        reserved: u64,
    ) -> (crate::snapshot::SnapMeta, Vec<crate::snapshot::SnapNode>) {
        let mut nodes = Vec::new();
        let mut forgotten_seq = 0;
        for shard in self.shards.iter() {
            let shard = shard.read();
            forgotten_seq = forgotten_seq.max(shard.forgotten_seq);
            nodes.extend(shard.nodes.iter().map(|n| crate::snapshot::SnapNode {
                key: n.key.to_string(),
                version: n.version,
                last_change_seq: n.last_change_seq,
                changed_at_ms: n.change().changed_at_ms,
                event_time_ms: n.change().event_time_ms,
                external_version: n.external_version(),
                critical: n.critical(),
                expires_unix_ms: self.clock.unix_at(n.expires_at),
                last_critical_seq: n.change().last_critical_seq,
                soft_purge_unix_ms: self.clock.unix_at(n.change().soft_purge_at),
                dependencies: n.deps.iter().map(|d| d.to_string()).collect(),
            }));
        }
        let policies = self.policies.read();
        let to_wal = |namespace: Option<&str>, p: &Policy| {
            let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis() as u64);
            crate::wal::WalPolicy {
                namespace: namespace.map(str::to_owned),
                set: true,
                max_age_ms: ms(p.max_age),
                revalidate_after_ms: ms(p.revalidate_after),
                stale_while_revalidate_ms: p.stale_while_revalidate.as_millis() as u64,
                allow_stale_on_critical: p.allow_stale_on_critical,
                check_sample_rate: p.check_sample_rate,
            }
        };
        let mut list = vec![to_wal(None, &policies.default)];
        list.extend(
            policies
                .namespaces
                .iter()
                .map(|(ns, p)| to_wal(Some(ns), p)),
        );
        let (history_floor, notices) = self.hub.history();
        let history = notices
            .iter()
            .filter(|n| n.seq <= seq)
            .map(|n| crate::snapshot::SnapNotice {
                seq: n.seq,
                key: n.key.to_string(),
                version: n.version,
                cause: n.cause.to_string(),
                critical: n.critical,
                event_time_ms: n.event_time_ms,
                origin: n.origin.as_deref().unwrap_or("").to_owned(),
            })
            .collect();
        let meta = crate::snapshot::SnapMeta {
            seq,
            reserved,
            forgotten_seq,
            nodes: nodes.len() as u64,
            policies: list,
            history_floor,
            history,
        };
        (meta, nodes)
    }

    /// Loads a snapshot into this empty store.
    pub fn load_snapshot(
        &self,
        meta: crate::snapshot::SnapMeta,
        nodes: Vec<crate::snapshot::SnapNode>,
    ) {
        let _sequencer = self.sequencer.lock();
        // First every key, then the edges between them.
        for n in &nodes {
            let hash = hash_key(&n.key);
            let mut shard = self.shards[self.shard_index(hash)].write();
            let mut node = Node::new(Key::from(n.key.as_str()), n.version, n.last_change_seq);
            let mut change = Change {
                changed_at_ms: n.changed_at_ms,
                event_time_ms: n.event_time_ms,
                external_version: n.external_version.unwrap_or(0),
                last_critical_seq: n.last_critical_seq,
                soft_purge_at: if n.soft_purge_unix_ms == 0 {
                    0
                } else {
                    self.clock.at_unix(n.soft_purge_unix_ms)
                },
                flags: 0,
            };
            if n.external_version.is_some() {
                change.flags |= HAS_EXTERNAL;
            }
            if n.critical {
                change.flags |= CRITICAL;
            }
            // A key that was never changed stays without the box.
            if change != UNCHANGED {
                node.change = Some(Box::new(change));
            }
            node.expires_at = if n.expires_unix_ms == 0 {
                0
            } else {
                self.clock.at_unix(n.expires_unix_ms)
            };
            shard.forgotten_seq = meta.forgotten_seq;
            shard.insert(hash, node);
        }
        for shard in self.shards.iter() {
            shard.write().forgotten_seq = meta.forgotten_seq;
        }
        for n in nodes {
            if n.dependencies.is_empty() {
                continue;
            }
            let hash = hash_key(&n.key);
            let key = self
                .read(hash)
                .get(hash, &n.key)
                .expect("loaded")
                .key
                .clone();
            let mut deps = Vec::with_capacity(n.dependencies.len());
            for dep in &n.dependencies {
                let h = hash_key(dep);
                let mut shard = self.shards[self.shard_index(h)].write();
                let node = shard.get_or_placeholder(h, dep, n.version);
                node.dependents.insert(key.clone());
                deps.push(node.key.clone());
            }
            let mut shard = self.shards[self.shard_index(hash)].write();
            shard.edges += deps.len() as u64;
            shard.get_mut(hash, &n.key).expect("loaded").deps = deps.into_boxed_slice();
        }
        {
            let mut policies = self.policies.write();
            for p in meta.policies {
                match (p.namespace.clone(), p.policy()) {
                    (None, Some(policy)) => policies.default = policy,
                    (Some(ns), Some(policy)) => {
                        policies.namespaces.insert(ns, policy);
                    }
                    _ => {}
                }
            }
        }
        self.applied.store(meta.seq, Ordering::Release);
        if self.hub.recording() || !meta.history.is_empty() || meta.history_floor > 0 {
            let notices = meta
                .history
                .into_iter()
                .map(|n| Notice {
                    seq: n.seq,
                    key: Key::from(n.key.as_str()),
                    version: n.version,
                    cause: Key::from(n.cause.as_str()),
                    critical: n.critical,
                    event_time_ms: n.event_time_ms,
                    origin: (!n.origin.is_empty()).then(|| Arc::from(n.origin.as_str())),
                    cache: NoticeCache::default(),
                })
                .collect();
            self.hub
                .restore_history(meta.history_floor, notices, meta.seq);
        } else {
            let _nothing_to_deliver = self.hub.fanout(meta.seq, Vec::new());
        }
    }

    fn replay(&self, sequencer: &mut Sequencer, record: WalRecord) {
        let seq = record.seq;
        let now_unix = record.unix_ms;
        let now = self.clock.at_unix(now_unix);
        match record.body {
            Some(Body::Publish(p)) => {
                let duplicate: Vec<bool> = p.changes.iter().map(|c| c.duplicate).collect();
                let changes: Vec<PublishChange> = p
                    .changes
                    .into_iter()
                    .map(|c| PublishChange {
                        key: c.key,
                        external_version: c.external_version,
                        critical: c.critical,
                        event_time_ms: c.event_time_ms,
                    })
                    .collect();
                let hashes: Vec<u64> = changes.iter().map(|c| hash_key(&c.key)).collect();
                // Replayed notices are delivered here, under the sequencer.
                let (_, _, delivery) = self.apply_publish(
                    sequencer, seq, &changes, &hashes, &duplicate, &p.origin, now, now_unix,
                );
                drop(delivery);
            }
            Some(Body::Fill(f)) => {
                let spec = FillSpec {
                    key: f.key,
                    dependencies: f.dependencies,
                    ttl_ms: f.ttl_ms,
                    observed_seq: f.observed_seq,
                };
                let hash = hash_key(&spec.key);
                let dep_hashes: Vec<u64> = spec.dependencies.iter().map(|d| hash_key(d)).collect();
                let (mut shards, old_deps) =
                    self.lock_for_fill(sequencer, &spec, hash, &dep_hashes);
                let expires_at = self.clock.at_unix(now_unix.saturating_add(spec.ttl_ms));
                self.apply_fill(
                    &mut shards,
                    &spec,
                    seq,
                    hash,
                    &dep_hashes,
                    old_deps,
                    now,
                    expires_at,
                );
                self.applied.store(seq, Ordering::Release);
            }
            Some(Body::Policy(p)) => {
                self.apply_policy(seq, p.namespace.as_deref(), p.policy());
            }
            Some(Body::Purge(p)) => {
                let (_, affected) = self.purge_scope(&p.prefix);
                self.apply_soft_purge(sequencer, seq, &affected, p.jitter_ms, now);
            }
            Some(Body::Reserve(_)) | None => {}
        }
    }

    /// The metrics this store records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Appends to the log, timing it.
    fn append(&self, sequencer: &mut Sequencer, record: &Record<'_>) -> Result<u64> {
        let start = std::time::Instant::now();
        let seq = sequencer
            .log
            .append(record)
            .map_err(|e| Error::Log(e.to_string()))?;
        self.metrics.log_append(start.elapsed());
        Ok(seq)
    }

    /// Registers a Watch stream (see [`Hub::subscribe`]) under the
    /// sequencer, so that publishes start recording notices atomically with
    /// the first stream.
    pub fn subscribe(
        &self,
        client_id: &str,
        no_loop: bool,
        resume: Option<(bool, u64)>,
        track: &[String],
        prefixes: &[String],
        owner: Option<Arc<crate::auth::Principal>>,
    ) -> std::result::Result<(Arc<crate::fanout::Subscriber>, u64), String> {
        let _sequencer = self.sequencer.lock();
        self.hub
            .subscribe(client_id, no_loop, resume, track, prefixes, owner)
    }

    /// The epoch of this store's history.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The last applied seq.
    pub fn seq(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// The store's settings.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    fn shard_index(&self, hash: u64) -> usize {
        // hashbrown uses the low bits for the bucket and the top seven for the
        // tag; the middle bits pick the shard without weakening either.
        (hash >> 32) as usize & self.mask
    }

    fn read(&self, hash: u64) -> RwLockReadGuard<'_, Shard> {
        self.shards[self.shard_index(hash)].read()
    }

    /// Publishes changes: bumps every changed key and every transitive
    /// dependent once, atomically with respect to checks.
    pub fn publish(&self, changes: &[PublishChange]) -> Result<PublishOutcome> {
        self.publish_from(changes, "")
    }

    /// [`Store::publish`] on behalf of `origin`, a client id: Watch streams of
    /// that client with no-loop get no notices of it.
    pub fn publish_from(&self, changes: &[PublishChange], origin: &str) -> Result<PublishOutcome> {
        let mut guard = self.sequencer.lock();
        let sequencer = &mut *guard;
        let hashes: Vec<u64> = changes.iter().map(|c| hash_key(&c.key)).collect();

        // Duplicates by external version, taking the changes in order.
        let mut duplicate = vec![false; changes.len()];
        if changes.iter().any(|c| c.external_version.is_some()) {
            let mut seen: HashMap<&str, u64> = HashMap::new();
            for (i, change) in changes.iter().enumerate() {
                let Some(ext) = change.external_version else {
                    continue;
                };
                let last = match seen.get(change.key.as_str()) {
                    Some(&v) => Some(v),
                    None => self
                        .read(hashes[i])
                        .get(hashes[i], &change.key)
                        .and_then(|n| n.external_version()),
                };
                if last.is_some_and(|last| ext <= last) {
                    duplicate[i] = true;
                } else {
                    seen.insert(&change.key, ext);
                }
            }
        }
        if duplicate.iter().all(|&d| d) {
            let seq = self.seq();
            let results = changes
                .iter()
                .zip(&hashes)
                .map(|(c, &h)| ChangeOutcome {
                    invalidated: 0,
                    duplicate: true,
                    version: self.read(h).get(h, &c.key).map_or(0, |n| n.version),
                })
                .collect();
            return Ok(PublishOutcome { seq, results });
        }

        let now_unix = unix_ms();
        let seq = self.append(
            sequencer,
            &Record::Publish {
                changes,
                duplicate: &duplicate,
                origin,
                unix_ms: now_unix,
            },
        )?;
        let now = self.clock.now();
        let (mut results, total, delivery) = self.apply_publish(
            sequencer, seq, changes, &hashes, &duplicate, origin, now, now_unix,
        );

        for (i, result) in results.iter_mut().enumerate() {
            if duplicate[i] {
                let h = hashes[i];
                result.version = self
                    .read(h)
                    .get(h, &changes[i].key)
                    .map_or(0, |n| n.version);
            }
        }
        // The parked streams' notices are written with the sequencer let
        // go: the next publish need not wait for those writes.
        drop(guard);
        drop(delivery);
        if total > self.config.max_invalidations_per_publish {
            self.oversized.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                seq,
                invalidated = total,
                limit = self.config.max_invalidations_per_publish,
                first_key = %changes[0].key,
                "publish invalidated more keys than max_invalidations_per_publish"
            );
        }
        Ok(PublishOutcome { seq, results })
    }

    /// Applies a logged publish: bumps the changed keys and their
    /// transitive dependents, then fans the notices out. Returns the
    /// per-change outcomes and the number of keys bumped.
    #[allow(clippy::too_many_arguments)]
    fn apply_publish(
        &self,
        sequencer: &mut Sequencer,
        seq: u64,
        changes: &[PublishChange],
        hashes: &[u64],
        duplicate: &[bool],
        origin: &str,
        now: u64,
        now_unix: u64,
    ) -> (Vec<ChangeOutcome>, u64, Delivery) {
        // Read phase: which shards the walk will touch. The state cannot
        // change under us: we are the only writer.
        self.mark_publish_shards(sequencer, changes, hashes, duplicate);
        let mut shards = WriteSet::lock(self, &sequencer.needed);
        let retention = now + self.config.change_retention.as_millis() as u64;
        let mut results = Vec::with_capacity(changes.len());
        let mut total = 0u64;
        // Notices are only built once a Watch stream has ever subscribed;
        // until then nobody can resume, and publishes skip the work.
        let record = self.hub.recording();
        let origin: Option<Arc<str>> = (record && !origin.is_empty()).then(|| Arc::from(origin));
        let mut notices: Vec<Notice> = Vec::new();
        // Keys whose critical bit was raised after their notice was built.
        let mut upgraded: Vec<Key> = Vec::new();
        for (i, change) in changes.iter().enumerate() {
            if duplicate[i] {
                results.push(ChangeOutcome {
                    invalidated: 0,
                    duplicate: true,
                    version: 0,
                });
                continue;
            }
            let hash = hashes[i];
            let event_time = if change.event_time_ms == 0 {
                now_unix
            } else {
                change.event_time_ms
            };
            let shard = shards.shard(self.shard_index(hash));
            if shard.get(hash, &change.key).is_none() {
                // Remember the change of a key nobody registered, so that a
                // fill that raced it is refused.
                let mut node = Node::new(Key::from(change.key.as_str()), 0, 0);
                node.expires_at = retention;
                shard.insert(hash, node);
            }
            let node = shard.get_mut(hash, &change.key).expect("present");
            if let Some(ext) = change.external_version {
                let fields = node.change_mut();
                fields.external_version = ext;
                fields.flags |= HAS_EXTERNAL;
            }
            let mut invalidated = 0;
            let queue = &mut sequencer.queue;
            let cause = node.key.clone();
            let mut note = |node: &Node, visit: &Bump, critical: bool| match visit {
                Bump::New if record => notices.push(Notice {
                    seq,
                    key: node.key.clone(),
                    version: seq,
                    cause: cause.clone(),
                    critical,
                    event_time_ms: event_time,
                    origin: origin.clone(),
                    cache: NoticeCache::default(),
                }),
                Bump::Upgraded if record => upgraded.push(node.key.clone()),
                _ => {}
            };
            let visit = bump(node, seq, change.critical, now_unix, event_time);
            note(node, &visit, change.critical);
            if visit == Bump::New {
                invalidated += 1;
            }
            if visit != Bump::Seen {
                queue.extend(node.dependents.iter().map(|k| (k.clone(), change.critical)));
            }
            while let Some((key, critical)) = queue.pop_front() {
                let hash = hash_key(&key);
                let shard = shards.shard(self.shard_index(hash));
                let Some(node) = shard.get_mut(hash, &key) else {
                    continue;
                };
                let visit = bump(node, seq, critical, now_unix, event_time);
                note(node, &visit, critical);
                if visit == Bump::New {
                    invalidated += 1;
                }
                if visit != Bump::Seen {
                    queue.extend(node.dependents.iter().map(|k| (k.clone(), critical)));
                }
            }
            total += invalidated;
            self.metrics.publish_amplification(invalidated);
            results.push(ChangeOutcome {
                invalidated,
                duplicate: false,
                version: seq,
            });
        }
        if !upgraded.is_empty() {
            // Notices carry each key's final critical bit of this publish.
            let upgraded: HashSet<Key, KeyHash> = upgraded.into_iter().collect();
            for n in &mut notices {
                n.critical |= upgraded.contains(&n.key);
            }
        }
        self.applied.store(seq, Ordering::Release);
        drop(shards);
        self.applied_notify.notify_waiters();
        // Still under the sequencer: fan-outs run in seq order.
        let delivery = self.hub.fanout(seq, notices);
        (results, total, delivery)
    }

    /// Marks in `sequencer.needed` every shard a publish of the accepted
    /// changes will touch.
    fn mark_publish_shards(
        &self,
        sequencer: &mut Sequencer,
        changes: &[PublishChange],
        hashes: &[u64],
        duplicate: &[bool],
    ) {
        sequencer.reset_needed();
        let needed = &mut sequencer.needed;
        let mut marked = 0;
        let mut mark = |needed: &mut Vec<bool>, index: usize| {
            if !needed[index] {
                needed[index] = true;
                marked += 1;
            }
            marked == needed.len()
        };
        let visited = &mut sequencer.visited;
        let queue = &mut sequencer.queue;
        visited.clear();
        queue.clear();
        'walk: for (i, change) in changes.iter().enumerate() {
            if duplicate[i] {
                continue;
            }
            let index = self.shard_index(hashes[i]);
            if mark(needed, index) {
                break;
            }
            let shard = self.shards[index].read();
            let Some(node) = shard.get(hashes[i], &change.key) else {
                continue;
            };
            if !visited.insert(node.key.clone()) {
                continue;
            }
            for dependent in node.dependents.iter() {
                if visited.insert(dependent.clone()) {
                    queue.push_back((dependent.clone(), false));
                }
            }
            drop(shard);
            while let Some((key, _)) = queue.pop_front() {
                let hash = hash_key(&key);
                let index = self.shard_index(hash);
                if mark(needed, index) {
                    break 'walk;
                }
                let shard = self.shards[index].read();
                if let Some(node) = shard.get(hash, &key) {
                    for dependent in node.dependents.iter() {
                        if visited.insert(dependent.clone()) {
                            queue.push_back((dependent.clone(), false));
                        }
                    }
                }
            }
        }
        visited.clear();
        queue.clear();
    }

    /// Registers a cached key with its dependencies and TTL, unless the key or
    /// a dependency changed after `spec.observed_seq`.
    pub fn fill(&self, spec: &FillSpec) -> Result<FillOutcome> {
        let mut sequencer = self.sequencer.lock();
        let sequencer = &mut *sequencer;
        let hash = hash_key(&spec.key);
        let key_index = self.shard_index(hash);
        let dep_hashes: Vec<u64> = spec.dependencies.iter().map(|d| hash_key(d)).collect();
        let (mut shards, old_deps) = self.lock_for_fill(sequencer, spec, hash, &dep_hashes);

        // Refuse a fill that raced a change.
        let raced = |key: &str, changed: u64| Error::FillRaced {
            key: key.to_owned(),
            changed_seq: changed,
            observed_seq: spec.observed_seq,
        };
        let changed = shards.shard(key_index).last_change(hash, &spec.key);
        if changed > spec.observed_seq {
            return Err(raced(&spec.key, changed));
        }
        for (dep, &h) in spec.dependencies.iter().zip(&dep_hashes) {
            let changed = shards.shard(self.shard_index(h)).last_change(h, dep);
            if changed > spec.observed_seq {
                return Err(raced(dep, changed));
            }
        }

        let now_unix = unix_ms();
        let seq = self.append(
            sequencer,
            &Record::Fill {
                spec,
                unix_ms: now_unix,
            },
        )?;
        let now = self.clock.now();
        let version = self.apply_fill(
            &mut shards,
            spec,
            seq,
            hash,
            &dep_hashes,
            old_deps,
            now,
            now + spec.ttl_ms,
        );
        self.applied.store(seq, Ordering::Release);
        drop(shards);
        self.applied_notify.notify_waiters();
        Ok(FillOutcome {
            version,
            seq,
            ttl_ms: spec.ttl_ms,
        })
    }

    /// Write-locks every shard a fill touches (the key's, its new and old
    /// dependencies'); returns the locks and the old dependency set.
    fn lock_for_fill(
        &self,
        sequencer: &mut Sequencer,
        spec: &FillSpec,
        hash: u64,
        dep_hashes: &[u64],
    ) -> (WriteSet<'_>, Option<Vec<Key>>) {
        let key_index = self.shard_index(hash);
        let old_deps: Option<Vec<Key>> = self.shards[key_index]
            .read()
            .get(hash, &spec.key)
            .map(|n| n.deps.to_vec());
        sequencer.reset_needed();
        sequencer.needed[key_index] = true;
        for &h in dep_hashes {
            sequencer.needed[self.shard_index(h)] = true;
        }
        for dep in old_deps.iter().flatten() {
            sequencer.needed[self.shard_index(hash_key(dep))] = true;
        }
        (WriteSet::lock(self, &sequencer.needed), old_deps)
    }

    /// Applies a logged fill under its locks; returns the key's version.
    #[allow(clippy::too_many_arguments)]
    fn apply_fill(
        &self,
        shards: &mut WriteSet<'_>,
        spec: &FillSpec,
        seq: u64,
        hash: u64,
        dep_hashes: &[u64],
        old_deps: Option<Vec<Key>>,
        now: u64,
        expires_at: u64,
    ) -> u64 {
        let key_index = self.shard_index(hash);
        let deps_changed = match &old_deps {
            None => true,
            Some(old) => {
                old.len() != spec.dependencies.len()
                    || old.iter().zip(&spec.dependencies).any(|(a, b)| **a != **b)
            }
        };

        let key: Key = match shards.shard(key_index).get(hash, &spec.key) {
            Some(node) => node.key.clone(),
            None => {
                let shard = shards.shard(key_index);
                let node = Node::new(Key::from(spec.key.as_str()), seq, shard.forgotten_seq);
                shard.insert(hash, node);
                shard.get(hash, &spec.key).expect("inserted").key.clone()
            }
        };

        if deps_changed {
            // Reverse edges: drop the ones no longer wanted, add the new ones.
            for old in old_deps.iter().flatten() {
                if spec
                    .dependencies
                    .binary_search_by(|d| d.as_str().cmp(&**old))
                    .is_err()
                {
                    let h = hash_key(old);
                    shards
                        .shard(self.shard_index(h))
                        .drop_dependent(h, old, &key, now);
                }
            }
            let mut new_deps = Vec::with_capacity(spec.dependencies.len());
            for (dep, &h) in spec.dependencies.iter().zip(dep_hashes) {
                let node = shards
                    .shard(self.shard_index(h))
                    .get_or_placeholder(h, dep, seq);
                node.dependents.insert(key.clone());
                new_deps.push(node.key.clone());
            }
            let shard = shards.shard(key_index);
            let node = shard.get_mut(hash, &spec.key).expect("present");
            let (old_len, new_len) = (node.deps.len() as u64, new_deps.len() as u64);
            node.deps = new_deps.into_boxed_slice();
            node.version = seq;
            shard.edges = shard.edges - old_len + new_len;
        }
        let shard = shards.shard(key_index);
        shard.set_expiry(hash, &spec.key, expires_at);
        shard.get(hash, &spec.key).expect("present").version
    }

    /// Checks one cached copy, `age_ms` old. Returns the answer and the seq
    /// it reflects.
    pub fn check(&self, key: &str, version: u64, age_ms: u64) -> (CheckAnswer, u64) {
        let hash = hash_key(key);
        let now = self.clock.now();
        let shard = self.read(hash);
        let answer = match shard.get(hash, key) {
            Some(node) if node.live(now) => node.answer(version, age_ms, now),
            _ => UNKNOWN,
        };
        // Loaded under the shard lock: every mutation up to this seq that
        // touched the shard is visible, and none after it is.
        (answer, self.seq())
    }

    /// Checks many cached copies against one consistent state. `item` gives
    /// the key, cached version and age of each element. Returns the answers
    /// in order and the seq they reflect.
    pub fn check_batch<T>(
        &self,
        items: &[T],
        item: impl Fn(&T) -> (&str, u64, u64),
    ) -> (Vec<CheckAnswer>, u64) {
        let hashes: Vec<u64> = items.iter().map(|t| hash_key(item(t).0)).collect();
        let mut needed = vec![false; self.shards.len()];
        for &h in &hashes {
            needed[self.shard_index(h)] = true;
        }
        // Ascending order, like writers: no deadlock, and a consistent cut.
        let guards: Vec<(usize, RwLockReadGuard<'_, Shard>)> = needed
            .iter()
            .enumerate()
            .filter(|(_, &n)| n)
            .map(|(i, _)| (i, self.shards[i].read()))
            .collect();
        let now = self.clock.now();
        // Three passes, so that the cache misses of different keys overlap
        // instead of queueing: the first finds each key's slot from the
        // table alone, the first entry whose tag matches the hash (misses on
        // the table, none on a node), the second touches each candidate's
        // node and key bytes in a tight loop of independent loads (a short
        // loop keeps many keys' misses in flight at once), and the third
        // confirms the key and answers from cache. One pass would wait for
        // all the misses of each key in turn.
        let slot = |h: u64| {
            let pos = guards
                .binary_search_by_key(&self.shard_index(h), |(i, _)| *i)
                .expect("locked above");
            &guards[pos].1
        };
        let candidates: Vec<Option<&Node>> = hashes
            .iter()
            .map(|&h| slot(h).nodes.find(h, |_| true).map(|n| &**n))
            .collect();
        let touched = candidates.iter().flatten().fold(0u8, |acc, n| {
            acc ^ n.key.as_bytes().first().copied().unwrap_or(0)
        });
        std::hint::black_box(touched);
        let answers = items
            .iter()
            .zip(&hashes)
            .zip(candidates)
            .map(|((t, &h), candidate)| {
                let (key, version, age_ms) = item(t);
                let node = match candidate {
                    Some(n) if &*n.key == key => Some(n),
                    // Another key's entry shares the hash's tag and came
                    // first: look again, comparing keys.
                    Some(_) => slot(h).get(h, key),
                    None => None,
                };
                match node {
                    Some(node) if node.live(now) => node.answer(version, age_ms, now),
                    _ => UNKNOWN,
                }
            })
            .collect();
        let seq = self.seq();
        drop(guards);
        (answers, seq)
    }

    /// Everything held for `key`, or `None`.
    pub fn inspect(&self, key: &str) -> Option<KeyInfo> {
        let hash = hash_key(key);
        let now = self.clock.now();
        let shard = self.read(hash);
        let node = shard.get(hash, key)?;
        let registered = node.live(now);
        Some(KeyInfo {
            key: key.to_owned(),
            version: node.version,
            last_change_seq: node.last_change_seq,
            last_change_unix_ms: node.change().changed_at_ms,
            event_time_unix_ms: node.change().event_time_ms,
            critical: node.critical(),
            dependencies: node.deps.iter().map(|d| d.to_string()).collect(),
            dependents: node.dependents.len() as u64,
            registered,
            ttl_left_ms: if registered { node.expires_at - now } else { 0 },
            external_version: node.external_version(),
        })
    }

    /// Waits until the store has applied `min_seq`, for at most `limit`.
    /// Returns whether it has.
    pub async fn wait_applied(&self, min_seq: u64, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.applied_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.seq() >= min_seq {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.seq() >= min_seq;
            }
        }
    }

    /// Asks for the fill lease of `key`, bound to the current seq.
    pub fn lease(&self, key: &str) -> LeaseOutcome {
        let ttl = self.config.lease_ttl.as_millis() as u64;
        let outcome = self.leases.acquire(key, self.clock.now(), self.seq(), ttl);
        let counter = match outcome {
            LeaseOutcome::Granted { .. } => &self.counters.leases_granted,
            LeaseOutcome::InFlight { .. } => &self.counters.leases_contended,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        outcome
    }

    /// Releases the lease `token` on `key`; returns the seq it observed, or
    /// `None` when the caller does not hold it.
    pub fn release_lease(&self, key: &str, token: u64) -> Option<u64> {
        self.leases.release(key, token, self.clock.now())
    }

    /// The policy for `key`'s namespace.
    pub fn policy_for(&self, key: &str) -> Policy {
        *self.policies.read().for_key(key)
    }

    /// All policies.
    pub fn policies(&self) -> Policies {
        self.policies.read().clone()
    }

    /// Sets the policy of `namespace` (`None`: the default). Logged like any
    /// mutation; returns its seq.
    pub fn set_policy(&self, namespace: Option<&str>, policy: Policy) -> Result<u64> {
        let mut sequencer = self.sequencer.lock();
        let seq = self.append(
            &mut sequencer,
            &Record::Policy {
                namespace,
                policy: Some(&policy),
            },
        )?;
        self.apply_policy(seq, namespace, Some(policy));
        Ok(seq)
    }

    /// Applies a logged policy change (`None`: removal).
    fn apply_policy(&self, seq: u64, namespace: Option<&str>, policy: Option<Policy>) {
        {
            let mut policies = self.policies.write();
            match (namespace, policy) {
                (None, Some(p)) => policies.default = p,
                (None, None) => policies.default = Policy::default(),
                (Some(ns), Some(p)) => {
                    policies.namespaces.insert(ns.to_owned(), p);
                }
                (Some(ns), None) => {
                    policies.namespaces.remove(ns);
                }
            }
        }
        self.applied.store(seq, Ordering::Release);
        self.applied_notify.notify_waiters();
    }

    /// Removes the policy of `namespace`, which falls back to the default.
    /// Returns the removal's seq, or `None` when it had none.
    pub fn delete_policy(&self, namespace: &str) -> Result<Option<u64>> {
        let mut sequencer = self.sequencer.lock();
        if !self.policies.read().namespaces.contains_key(namespace) {
            return Ok(None);
        }
        let seq = self.append(
            &mut sequencer,
            &Record::Policy {
                namespace: Some(namespace),
                policy: None,
            },
        )?;
        self.apply_policy(seq, Some(namespace), None);
        Ok(Some(seq))
    }

    /// Every key starting with `prefix` and every key that transitively
    /// depends on one: `(matched, affected)`. Reads shard by shard; callers
    /// hold the sequencer so that nothing changes meanwhile.
    fn purge_scope(&self, prefix: &str) -> (Vec<Key>, Vec<Key>) {
        let mut matched = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.read();
            matched.extend(
                shard
                    .nodes
                    .iter()
                    .filter(|n| n.key.starts_with(prefix))
                    .map(|n| n.key.clone()),
            );
        }
        let mut seen: HashSet<Key, KeyHash> = matched.iter().cloned().collect();
        let mut affected = matched.clone();
        let mut next = 0;
        while next < affected.len() {
            let key = affected[next].clone();
            next += 1;
            let hash = hash_key(&key);
            let shard = self.read(hash);
            if let Some(node) = shard.get(hash, &key) {
                for d in node.dependents.iter() {
                    if seen.insert(d.clone()) {
                        affected.push(d.clone());
                    }
                }
            }
        }
        (matched, affected)
    }

    /// Purges every key under a prefix and its dependents: hard (a critical
    /// change: copies answer REFETCH, and notices go out) or soft (copies
    /// older than the purge answer REVALIDATE, spread over `jitter_ms`, and
    /// no notices go out). A dry run only counts.
    pub fn purge(&self, spec: &PurgeSpec, origin: &str) -> Result<PurgeOutcome> {
        let mut sequencer = self.sequencer.lock();
        let (matched, affected) = self.purge_scope(&spec.prefix);
        let (subscribers, notices) = if spec.hard {
            self.hub.reach(&affected)
        } else {
            (0, 0)
        };
        let mut outcome = PurgeOutcome {
            matched: matched.len() as u64,
            affected: affected.len() as u64,
            subscribers,
            notices,
            seq: self.seq(),
            applied: false,
        };
        if spec.dry_run {
            return Ok(outcome);
        }
        if outcome.affected > spec.max_keys && !spec.confirm {
            return Err(Error::PurgeTooBroad {
                prefix: spec.prefix.clone(),
                affected: outcome.affected,
                limit: spec.max_keys,
            });
        }
        if matched.is_empty() {
            return Ok(outcome);
        }
        self.counters.purges.fetch_add(1, Ordering::Relaxed);
        self.counters
            .purged_keys
            .fetch_add(outcome.affected, Ordering::Relaxed);
        if spec.hard {
            drop(sequencer);
            let changes: Vec<PublishChange> = matched
                .iter()
                .map(|k| PublishChange {
                    key: k.to_string(),
                    external_version: None,
                    critical: true,
                    event_time_ms: 0,
                })
                .collect();
            outcome.seq = self.publish_from(&changes, origin)?.seq;
            outcome.applied = true;
            return Ok(outcome);
        }
        let now_unix = unix_ms();
        let seq = self.append(
            &mut sequencer,
            &Record::Purge {
                prefix: &spec.prefix,
                jitter_ms: spec.jitter_ms,
                unix_ms: now_unix,
            },
        )?;
        self.apply_soft_purge(
            &mut sequencer,
            seq,
            &affected,
            spec.jitter_ms,
            self.clock.now(),
        );
        outcome.seq = seq;
        outcome.applied = true;
        Ok(outcome)
    }

    /// Applies a logged soft purge to the keys it affects.
    fn apply_soft_purge(
        &self,
        sequencer: &mut Sequencer,
        seq: u64,
        affected: &[Key],
        jitter_ms: u64,
        now: u64,
    ) {
        sequencer.reset_needed();
        for key in affected {
            sequencer.needed[self.shard_index(hash_key(key))] = true;
        }
        let mut shards = WriteSet::lock(self, &sequencer.needed);
        for key in affected {
            let hash = hash_key(key);
            let jitter = if jitter_ms == 0 { 0 } else { hash % jitter_ms };
            if let Some(node) = shards.shard(self.shard_index(hash)).get_mut(hash, key) {
                node.change_mut().soft_purge_at = now.saturating_add(jitter);
            }
        }
        self.applied.store(seq, Ordering::Release);
        drop(shards);
        self.applied_notify.notify_waiters();
    }

    /// The last change of `key` for a repair: `(last_change_seq, version,
    /// critical)`. For a key not held, the shard's bound of forgotten changes
    /// and version 0.
    pub fn last_change(&self, key: &str) -> (u64, u64, bool) {
        let hash = hash_key(key);
        let shard = self.read(hash);
        match shard.get(hash, key) {
            Some(node) => (node.last_change_seq, node.version, node.critical()),
            None => (shard.forgotten_seq, 0, false),
        }
    }

    /// Store-wide counters (each shard read in turn, not one snapshot).
    pub fn stats(&self) -> StoreStats {
        let (mut keys, mut edges) = (0, 0);
        for shard in self.shards.iter() {
            let shard = shard.read();
            keys += shard.nodes.len() as u64;
            edges += shard.edges;
        }
        StoreStats {
            keys,
            edges,
            shards: self.shards.len() as u32,
            seq: self.seq(),
            epoch: self.epoch,
            expired: self.expired.load(Ordering::Relaxed),
            oversized_publishes: self.oversized.load(Ordering::Relaxed),
            leases_granted: self.counters.leases_granted.load(Ordering::Relaxed),
            leases_contended: self.counters.leases_contended.load(Ordering::Relaxed),
            leases_held: self.leases.len() as u64,
            purges: self.counters.purges.load(Ordering::Relaxed),
            purged_keys: self.counters.purged_keys.load(Ordering::Relaxed),
        }
    }

    /// Removes at most `budget` expired registrations; returns how many
    /// expiry entries it processed. Work is bounded per call and per lock
    /// hold, so no call pauses the server; call again while it returns
    /// `budget`.
    pub fn expire(&self, budget: usize) -> usize {
        let mut sequencer = self.sequencer.lock();
        let now = self.clock.now();
        self.leases.sweep(now);
        let mut processed = 0;
        let mut released: Vec<(Key, Key)> = Vec::new();
        for _ in 0..self.shards.len() {
            let index = sequencer.expiry_cursor;
            {
                let mut shard = self.shards[index].write();
                while processed < budget {
                    match shard.expiry.first() {
                        Some((at, _)) if *at <= now => {}
                        _ => break,
                    }
                    let (at, hash) = shard.expiry.pop_first().expect("checked");
                    processed += 1;
                    // Nearly always one key.
                    let keys: Vec<Key> = shard.expiring(hash, at).cloned().collect();
                    for key in keys {
                        let Some(node) = shard.get_mut(hash, &key) else {
                            continue;
                        };
                        node.expires_at = 0;
                        if node.dependents.is_empty() {
                            let node = shard.remove(hash, &key).expect("present");
                            self.expired.fetch_add(1, Ordering::Relaxed);
                            released.extend(node.deps.iter().map(|d| (d.clone(), key.clone())));
                        }
                    }
                }
            }
            // Reverse edges of removed keys, one shard lock at a time: no
            // reader looks at reverse edges, and no writer runs meanwhile.
            for (dep, removed) in released.drain(..) {
                let h = hash_key(&dep);
                self.shards[self.shard_index(h)]
                    .write()
                    .drop_dependent(h, &dep, &removed, now);
            }
            if processed >= budget {
                break;
            }
            sequencer.expiry_cursor = (index + 1) & self.mask;
        }
        processed
    }
}

/// Marks `node` as changed by `seq`.
fn bump(node: &mut Node, seq: u64, critical: bool, now_unix: u64, event_time: u64) -> Bump {
    if node.last_change_seq != seq {
        node.version = seq;
        node.last_change_seq = seq;
        // A key's first change boxes its change fields; later ones reuse them.
        let change = node.change_mut();
        change.changed_at_ms = now_unix;
        change.event_time_ms = event_time;
        change.flags = (change.flags & !CRITICAL) | if critical { CRITICAL } else { 0 };
        if critical {
            change.last_critical_seq = seq;
        }
        Bump::New
    } else if critical && !node.critical() {
        let change = node.change_mut();
        change.flags |= CRITICAL;
        change.last_critical_seq = seq;
        Bump::Upgraded
    } else {
        Bump::Seen
    }
}

#[cfg(test)]
impl Store {
    /// Everything that must survive a replay, one line per key, sorted
    /// (times that are relative to the process are left out).
    fn digest(&self, with_history: bool) -> Vec<String> {
        let now = self.clock.now();
        let mut lines = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.read();
            for n in shard.nodes.iter() {
                let mut dependents: Vec<&str> = n.dependents.iter().map(|d| &**d).collect();
                dependents.sort();
                lines.push(format!(
                    "{} v{} c{} at{} ev{} x{} f{} crit{} live{} soft{} deps{:?} of{:?}",
                    n.key,
                    n.version,
                    n.last_change_seq,
                    n.change().changed_at_ms,
                    n.change().event_time_ms,
                    n.change().external_version,
                    n.change().flags,
                    n.change().last_critical_seq,
                    n.live(now),
                    n.change().soft_purge_at != 0,
                    n.deps,
                    dependents,
                ));
            }
        }
        lines.sort();
        lines.push(format!("{:?}", self.policies.read()));
        if with_history {
            // Within one seq, notices come in the order of a hash set.
            let (_, mut history) = self.hub.history();
            history.sort_by(|a, b| (a.seq, &a.key).cmp(&(b.seq, &b.key)));
            lines.extend(history.iter().map(|n| format!("notice {n:?}")));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::MemoryLog;

    fn store() -> Store {
        Store::new(StoreConfig::default(), Box::new(MemoryLog::with_epoch(7)))
    }

    fn change(key: &str) -> PublishChange {
        PublishChange {
            key: key.into(),
            external_version: None,
            critical: false,
            event_time_ms: 0,
        }
    }

    fn fill(s: &Store, key: &str, deps: &[&str]) -> FillOutcome {
        let mut dependencies: Vec<String> = deps.iter().map(|d| d.to_string()).collect();
        dependencies.sort();
        dependencies.dedup();
        s.fill(&FillSpec {
            key: key.into(),
            dependencies,
            ttl_ms: 60_000,
            observed_seq: s.seq(),
        })
        .expect("fill")
    }

    #[test]
    fn batched_checks_tell_keys_of_one_length_apart() {
        // One shard, thousands of keys of one length: many share a hash
        // tag, which the batch's first pass cannot tell apart.
        let s = Store::new(
            StoreConfig {
                shards: 1,
                ..StoreConfig::default()
            },
            Box::new(MemoryLog::with_epoch(7)),
        );
        let keys: Vec<String> = (0..4000).map(|i| format!("k:{i:05}")).collect();
        let versions: Vec<u64> = keys.iter().map(|k| fill(&s, k, &[]).version).collect();
        s.publish(
            &(0..4000)
                .step_by(3)
                .map(|i| change(&keys[i]))
                .collect::<Vec<_>>(),
        )
        .expect("publish");
        // Every key, at its fill's version, plus absent keys of the same
        // length.
        let mut items: Vec<(String, u64)> = keys.iter().cloned().zip(versions).collect();
        items.extend((4000..5000).map(|i| (format!("k:{i:05}"), 1)));
        let (answers, _) = s.check_batch(&items, |(k, v)| (k.as_str(), *v, 0));
        for (i, ((key, version), answer)) in items.iter().zip(&answers).enumerate() {
            let (single, _) = s.check(key, *version, 0);
            assert_eq!(*answer, single, "{key}");
            let expected = if i >= 4000 {
                Freshness::Unknown
            } else if i % 3 == 0 {
                Freshness::Stale
            } else {
                Freshness::Fresh
            };
            assert_eq!(answer.freshness, expected, "{key}");
        }
    }

    fn version(s: &Store, key: &str) -> u64 {
        s.inspect(key).map_or(0, |i| i.version)
    }

    #[test]
    fn a_node_that_was_only_filled_fits_an_80_byte_chunk() {
        // glibc serves 72 bytes from an 80-byte chunk; one word more takes
        // 96. The per-key figures in docs/benchmarks.md rest on this.
        assert!(std::mem::size_of::<Node>() <= 72);
    }

    #[test]
    fn dependents_stay_a_set_across_both_forms() {
        let keys: Vec<Key> = (0..3 * SMALL_DEPENDENTS)
            .map(|i| Key::from(format!("k{:03}", (i * 37) % (3 * SMALL_DEPENDENTS)).as_str()))
            .collect();
        let mut d = Dependents::default();
        let mut model = std::collections::BTreeSet::new();
        let agree = |d: &Dependents, model: &std::collections::BTreeSet<Key>| {
            let mut held: Vec<Key> = d.iter().cloned().collect();
            held.sort();
            assert_eq!(held, model.iter().cloned().collect::<Vec<_>>());
            assert_eq!(d.len(), model.len());
            assert_eq!(d.is_empty(), model.is_empty());
            match d.0.as_deref() {
                None => assert!(model.is_empty()),
                Some(DependentSet::Small(keys)) => {
                    assert!(!keys.is_empty() && keys.len() <= SMALL_DEPENDENTS);
                    assert!(keys.windows(2).all(|w| w[0] < w[1]), "sorted");
                }
                Some(DependentSet::Large(set)) => assert!(set.len() > SMALL_DEPENDENTS / 2),
            }
        };
        // Up past the limit (every key twice: the second is a no-op), then
        // down to nothing, then up and down around the limit.
        for k in keys.iter().chain(&keys) {
            assert_eq!(d.insert(k.clone()), model.insert(k.clone()));
            agree(&d, &model);
        }
        assert!(matches!(d.0.as_deref(), Some(DependentSet::Large(_))));
        for k in keys.iter().rev() {
            assert_eq!(d.remove(k), model.remove(k));
            assert!(!d.remove(k));
            agree(&d, &model);
        }
        assert!(d.0.is_none());
        for round in 0..4 {
            for k in &keys[..SMALL_DEPENDENTS + 1 + round] {
                assert_eq!(d.insert(k.clone()), model.insert(k.clone()));
                agree(&d, &model);
            }
            for k in &keys[round..SMALL_DEPENDENTS] {
                assert_eq!(d.remove(k), model.remove(k));
                agree(&d, &model);
            }
        }
    }

    #[test]
    fn change_fields_survive_a_snapshot_and_a_key_never_changed_has_none() {
        let s = store();
        fill(&s, "a", &["e"]);
        s.publish(&[PublishChange {
            key: "e".into(),
            external_version: Some(9),
            critical: true,
            event_time_ms: 5,
        }])
        .expect("publish");
        fill(&s, "b", &[]);
        let (meta, nodes) = s.snapshot(s.seq(), s.seq());
        let t = store();
        t.load_snapshot(meta, nodes);
        assert_eq!(s.digest(false), t.digest(false));
        let hash = hash_key("b");
        assert!(t.read(hash).get(hash, "b").expect("b").change.is_none());
        let e = t.inspect("e").expect("e");
        assert_eq!(e.external_version, Some(9));
        assert_eq!(e.event_time_unix_ms, 5);
        assert!(e.critical);
    }

    #[test]
    fn chain_bumps_every_transitive_dependent_once() {
        let s = store();
        fill(&s, "b", &["a"]);
        fill(&s, "c", &["b"]);
        let out = s.publish(&[change("a")]).unwrap();
        assert_eq!(out.results[0].invalidated, 3);
        for k in ["a", "b", "c"] {
            assert_eq!(version(&s, k), out.seq, "{k}");
        }
    }

    #[test]
    fn diamond_bumps_the_shared_dependent_once() {
        let s = store();
        fill(&s, "b", &["a"]);
        fill(&s, "c", &["a"]);
        fill(&s, "d", &["b", "c"]);
        let out = s.publish(&[change("a")]).unwrap();
        assert_eq!(out.results[0].invalidated, 4);
        assert_eq!(version(&s, "d"), out.seq);
    }

    #[test]
    fn cycles_terminate_and_bump_each_member_once() {
        let s = store();
        fill(&s, "a", &["c"]);
        fill(&s, "b", &["a"]);
        fill(&s, "c", &["b"]);
        let out = s.publish(&[change("b")]).unwrap();
        assert_eq!(out.results[0].invalidated, 3);
        for k in ["a", "b", "c"] {
            assert_eq!(version(&s, k), out.seq);
        }
    }

    #[test]
    fn deep_chain_and_wide_fan_out() {
        let s = store();
        let n = 5_000;
        for i in 1..=n {
            fill(&s, &format!("chain:{i}"), &[&format!("chain:{}", i - 1)]);
        }
        let out = s.publish(&[change("chain:0")]).unwrap();
        assert_eq!(out.results[0].invalidated, n + 1);
        assert_eq!(version(&s, &format!("chain:{n}")), out.seq);

        for i in 0..10_000 {
            fill(&s, &format!("feed:{i}"), &["posts:77"]);
        }
        let out = s.publish(&[change("posts:77")]).unwrap();
        assert_eq!(out.results[0].invalidated, 10_001);
        assert_eq!(s.inspect("posts:77").unwrap().dependents, 10_000);
    }

    #[test]
    fn one_call_bumps_each_key_once_and_attributes_counts_in_order() {
        let s = store();
        fill(&s, "feed", &["follows", "posts"]);
        let out = s
            .publish(&[change("follows"), change("posts"), change("follows")])
            .unwrap();
        let counts: Vec<u64> = out.results.iter().map(|r| r.invalidated).collect();
        // follows + feed, then posts alone, then nothing new.
        assert_eq!(counts, vec![2, 1, 0]);
        assert!(out
            .results
            .iter()
            .all(|r| r.version == out.seq && !r.duplicate));
    }

    #[test]
    fn critical_bit_propagates_and_upgrades_within_a_call() {
        let s = store();
        fill(&s, "feed", &["posts"]);
        let mut critical = change("posts");
        critical.critical = true;
        s.publish(&[change("posts"), critical]).unwrap();
        assert!(s.inspect("feed").unwrap().critical);
        s.publish(&[change("posts")]).unwrap();
        assert!(
            !s.inspect("feed").unwrap().critical,
            "the bit is the last change's"
        );
    }

    #[test]
    fn external_versions_drop_duplicates() {
        let s = store();
        let with = |v| PublishChange {
            external_version: Some(v),
            ..change("row:1")
        };
        let first = s.publish(&[with(10)]).unwrap();
        assert!(!first.results[0].duplicate);
        let again = s.publish(&[with(10)]).unwrap();
        assert!(again.results[0].duplicate);
        assert_eq!(again.seq, first.seq, "a duplicate logs nothing");
        assert_eq!(again.results[0].version, first.seq);
        let older = s.publish(&[with(9), with(11), with(11)]).unwrap();
        let dup: Vec<bool> = older.results.iter().map(|r| r.duplicate).collect();
        assert_eq!(dup, vec![true, false, true]);
        assert_eq!(s.inspect("row:1").unwrap().external_version, Some(11));
        assert!(older.results.iter().all(|r| r.version == older.seq));
    }

    #[test]
    fn check_answers_fresh_stale_and_unknown() {
        let s = store();
        let f = fill(&s, "feed", &["posts"]);
        assert_eq!(s.check("feed", f.version, 0).0.freshness, Freshness::Fresh);
        assert_eq!(s.check("nope", 1, 0).0.freshness, Freshness::Unknown);
        let p = s.publish(&[change("posts")]).unwrap();
        let (answer, seq) = s.check("feed", f.version, 0);
        assert_eq!(answer.freshness, Freshness::Stale);
        assert_eq!(answer.version, p.seq);
        assert_eq!(seq, p.seq);
        // A dependency-only key is not registered: it answers UNKNOWN.
        let (answer, _) = s.check("missing-dep", 0, 0);
        assert_eq!(answer.freshness, Freshness::Unknown);
    }

    #[test]
    fn refill_with_same_dependencies_keeps_the_version() {
        let s = store();
        let a = fill(&s, "feed", &["posts", "follows"]);
        let b = fill(&s, "feed", &["follows", "posts", "posts"]);
        assert_eq!(
            a.version, b.version,
            "two cachers do not invalidate each other"
        );
        assert!(b.seq > a.seq);
        let c = fill(&s, "feed", &["posts"]);
        assert_eq!(c.version, c.seq, "a new dependency set is a new version");
        let info = s.inspect("feed").unwrap();
        assert_eq!(info.dependencies, vec!["posts".to_owned()]);
        assert_eq!(s.inspect("follows").map(|i| i.dependents), Some(0));
        assert_eq!(s.stats().edges, 1);
    }

    #[test]
    fn fill_that_raced_a_change_is_refused() {
        let s = store();
        let observed = s.seq();
        fill(&s, "feed", &["posts"]);
        // Another filler with the same observed seq is fine: nothing changed.
        s.fill(&FillSpec {
            key: "feed".into(),
            dependencies: vec!["posts".into()],
            ttl_ms: 1000,
            observed_seq: observed,
        })
        .unwrap();
        let p = s.publish(&[change("posts")]).unwrap();
        let stale = FillSpec {
            key: "feed".into(),
            dependencies: vec!["posts".into()],
            ttl_ms: 1000,
            observed_seq: p.seq - 1,
        };
        match s.fill(&stale) {
            Err(Error::FillRaced {
                key, changed_seq, ..
            }) => {
                assert_eq!(key, "feed");
                assert_eq!(changed_seq, p.seq);
            }
            other => panic!("expected FillRaced, got {other:?}"),
        }
        // A change to a key nobody registered is remembered too.
        let before = s.seq();
        s.publish(&[change("user:9")]).unwrap();
        let e = s
            .fill(&FillSpec {
                key: "profile:9".into(),
                dependencies: vec!["user:9".into()],
                ttl_ms: 1000,
                observed_seq: before,
            })
            .unwrap_err();
        assert!(
            matches!(e, Error::FillRaced { ref key, .. } if key == "user:9"),
            "{e}"
        );
        // A refused fill changed nothing.
        assert!(s.inspect("profile:9").is_none());
        assert_eq!(s.seq(), before + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn registrations_expire_and_memory_returns() {
        let s = store();
        s.fill(&FillSpec {
            key: "feed".into(),
            dependencies: vec!["follows".into(), "posts".into()],
            ttl_ms: 1_000,
            observed_seq: 0,
        })
        .unwrap();
        let v = version(&s, "feed");
        assert_eq!(s.stats().keys, 3);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(s.check("feed", v, 0).0.freshness, Freshness::Fresh);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            s.check("feed", v, 0).0.freshness,
            Freshness::Unknown,
            "expired answers UNKNOWN before the sweep"
        );
        // The sweep removes the key; its dependency-only keys go next.
        while s.expire(10) > 0 {}
        let stats = s.stats();
        assert_eq!((stats.keys, stats.edges), (0, 0));
        assert_eq!(stats.expired, 3);
    }

    /// Entries in the shards' expiry indexes.
    fn expiry_entries(s: &Store) -> usize {
        s.shards.iter().map(|sh| sh.read().expiry.len()).sum()
    }

    #[tokio::test(start_paused = true)]
    async fn a_refill_moves_the_expiry_and_leaves_no_entry_behind() {
        let s = store();
        let fill = |key: &str, ttl_ms| {
            s.fill(&FillSpec {
                key: key.into(),
                dependencies: vec![],
                ttl_ms,
                observed_seq: s.seq(),
            })
            .unwrap()
            .version
        };
        let a = fill("a", 1_000);
        fill("b", 2_000);
        assert_eq!(expiry_entries(&s), 2);
        tokio::time::advance(Duration::from_millis(500)).await;
        // Later, then earlier than before: each move replaces the entry.
        fill("a", 1_000);
        fill("b", 100);
        assert_eq!(expiry_entries(&s), 2);
        tokio::time::advance(Duration::from_millis(100)).await;
        while s.expire(10) > 0 {}
        assert!(
            s.inspect("b").is_none(),
            "b expired at its new, earlier time"
        );
        assert_eq!(s.check("a", a, 0).0.freshness, Freshness::Fresh);
        assert_eq!(expiry_entries(&s), 1);
        // a's first expiry passes; a stays until its second.
        tokio::time::advance(Duration::from_millis(500)).await;
        while s.expire(10) > 0 {}
        assert_eq!(s.check("a", a, 0).0.freshness, Freshness::Fresh);
        tokio::time::advance(Duration::from_millis(400)).await;
        while s.expire(10) > 0 {}
        assert!(s.inspect("a").is_none());
        assert_eq!(expiry_entries(&s), 0);
        assert_eq!(s.stats().expired, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn forgotten_changes_still_refuse_old_fills() {
        let s = store();
        let before = s.seq();
        s.publish(&[change("user:1")]).unwrap();
        tokio::time::advance(s.config().change_retention + Duration::from_millis(1)).await;
        while s.expire(100) > 0 {}
        assert!(
            s.inspect("user:1").is_none(),
            "an unregistered change is forgotten"
        );
        let e = s.fill(&FillSpec {
            key: "user:1".into(),
            dependencies: vec![],
            ttl_ms: 1000,
            observed_seq: before,
        });
        assert!(matches!(e, Err(Error::FillRaced { .. })), "{e:?}");
        fill(&s, "user:1", &[]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_with_dependents_outlives_its_registration() {
        let s = store();
        s.fill(&FillSpec {
            key: "posts".into(),
            dependencies: vec!["author".into()],
            ttl_ms: 10,
            observed_seq: 0,
        })
        .unwrap();
        fill(&s, "feed", &["posts"]);
        tokio::time::advance(Duration::from_millis(20)).await;
        while s.expire(100) > 0 {}
        let posts = s.inspect("posts").expect("kept for its dependent");
        assert!(!posts.registered);
        assert_eq!(posts.dependencies, vec!["author".to_owned()]);
        // Transitivity still holds through the unregistered key.
        let out = s.publish(&[change("author")]).unwrap();
        assert_eq!(out.results[0].invalidated, 3);
        assert_eq!(version(&s, "feed"), out.seq);
    }

    #[test]
    fn check_batch_sees_whole_publishes() {
        let s = Arc::new(store());
        let keys: Vec<String> = (0..64).map(|i| format!("feed:{i}")).collect();
        for k in &keys {
            fill(&s, k, &["posts"]);
        }
        // From here on every feed key has the version of the last publish.
        s.publish(&[change("posts")]).unwrap();
        let writer = {
            let s = s.clone();
            std::thread::spawn(move || {
                for _ in 0..300 {
                    s.publish(&[change("posts")]).unwrap();
                }
            })
        };
        for _ in 0..300 {
            let (answers, seq) = s.check_batch(&keys, |k| (k.as_str(), 0, 0));
            let first = answers[0].version;
            assert!(answers.iter().all(|a| a.version == first), "torn batch");
            assert!(first <= seq);
        }
        writer.join().unwrap();
    }

    #[test]
    fn replaying_the_log_gives_the_same_state() {
        use crate::wal::{FileLog, FsyncPolicy, WalConfig};
        let dir = std::env::temp_dir().join(format!("freshd-replay-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let wal = WalConfig {
            dir: dir.clone(),
            fsync: FsyncPolicy::Never,
            segment_bytes: 4096,
            repair: false,
            snapshot_bytes: u64::MAX,
        };
        let before = {
            let s = Store::new(
                StoreConfig::default(),
                Box::new(FileLog::open(wal.clone()).unwrap().log),
            );
            fill(&s, "posts:1", &["author:1"]);
            fill(&s, "feed:1", &["posts:1", "follows:1"]);
            fill(&s, "feed:2", &["posts:1"]);
            let with = |v, critical| PublishChange {
                external_version: Some(v),
                critical,
                ..change("author:1")
            };
            s.publish(&[with(5, false), change("follows:1")]).unwrap();
            s.publish(&[with(5, true)]).unwrap(); // a duplicate
            s.publish_from(&[with(6, true), change("unregistered:9")], "svc")
                .unwrap();
            fill(&s, "feed:1", &["follows:1"]); // a new dependency set
            s.set_policy(Some("feed"), Policy::default()).unwrap();
            s.set_policy(Some("posts"), Policy::default()).unwrap();
            s.delete_policy("posts").unwrap();
            s.purge(
                &PurgeSpec {
                    prefix: "feed:".into(),
                    hard: false,
                    jitter_ms: 1,
                    dry_run: false,
                    confirm: false,
                    max_keys: 100,
                },
                "",
            )
            .unwrap();
            for i in 0..200 {
                s.publish(&[change(&format!("bulk:{i}"))]).unwrap();
            }
            s.digest(false)
        };
        let opened = FileLog::open(wal).unwrap();
        assert!(
            std::fs::read_dir(&dir).unwrap().count() > 1,
            "segments rotated"
        );
        let s = Store::new(StoreConfig::default(), Box::new(opened.log));
        s.recover(opened.records);
        assert_eq!(s.digest(false), before);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_snapshot_plus_replay_gives_the_state_of_replay_from_zero() {
        use crate::wal::{FileLog, FsyncPolicy, WalConfig};
        let base = std::env::temp_dir().join(format!("freshd-snap-{}", std::process::id()));
        let (full, compacted) = (base.join("full"), base.join("compacted"));
        let _ = std::fs::remove_dir_all(&base);
        let wal = |dir: &std::path::Path| WalConfig {
            dir: dir.to_owned(),
            fsync: FsyncPolicy::Never,
            segment_bytes: 1024,
            repair: false,
            snapshot_bytes: u64::MAX,
        };
        let epoch = {
            let log = FileLog::open(wal(&full)).unwrap().log;
            let epoch = log.epoch();
            let s = Store::new(StoreConfig::default(), Box::new(log));
            for i in 0..120 {
                fill(
                    &s,
                    &format!("feed:{i}"),
                    &[&format!("posts:{}", i % 7), "follows:1"],
                );
                let critical = PublishChange {
                    critical: i % 5 == 0,
                    external_version: Some(i),
                    ..change(&format!("posts:{}", i % 7))
                };
                s.publish(&[critical]).unwrap();
                if i % 10 == 0 {
                    fill(&s, &format!("feed:{i}"), &["follows:1"]);
                    s.set_policy(Some("feed"), Policy::default()).unwrap();
                }
            }
            epoch
        };
        std::fs::create_dir_all(&compacted).unwrap();
        for entry in std::fs::read_dir(&full).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, compacted.join(path.file_name().unwrap())).unwrap();
        }
        let segments = crate::wal::segments(&compacted).unwrap();
        assert!(segments.len() > 3, "the workload spans segments");
        let (next, _) = segments[segments.len() - 2];
        crate::snapshot::compact(&StoreConfig::default(), &compacted, epoch, next).unwrap();
        assert_eq!(
            crate::wal::segments(&compacted).unwrap().len(),
            2,
            "compacted segments are gone"
        );

        let digest = |dir: &std::path::Path| {
            let opened = FileLog::open(wal(dir)).unwrap();
            let snapshot = opened.snapshot.clone();
            let s = Store::new(StoreConfig::default(), Box::new(opened.log));
            if let Some(path) = snapshot {
                crate::snapshot::load(&s, &path).unwrap();
            }
            s.recover(opened.records);
            s.digest(true)
        };
        let from_zero = digest(&full);
        let from_snapshot = digest(&compacted);
        let differ: Vec<(&String, &String)> = from_zero
            .iter()
            .zip(&from_snapshot)
            .filter(|(a, b)| a != b)
            .take(3)
            .collect();
        assert!(differ.is_empty(), "first differences: {differ:#?}");
        assert_eq!(from_snapshot.len(), from_zero.len());
        std::fs::remove_dir_all(&base).ok();
    }

    #[test]
    fn a_snapshot_of_times_at_the_end_of_the_clock_saturates() {
        use crate::wal::{Body, WalFill, WalPurge, WalRecord};
        // A log record may carry any time; a snapshot of its state must not
        // overflow converting it back to Unix time.
        let s = store();
        s.recover(vec![
            WalRecord {
                seq: 1,
                unix_ms: u64::MAX - 1,
                body: Some(Body::Fill(WalFill {
                    key: "k".into(),
                    dependencies: vec!["d".into()],
                    ttl_ms: 60_000,
                    observed_seq: 0,
                })),
            },
            WalRecord {
                seq: 2,
                unix_ms: u64::MAX,
                body: Some(Body::Purge(WalPurge {
                    prefix: String::new(),
                    jitter_ms: u64::MAX,
                })),
            },
        ]);
        let (_, nodes) = s.snapshot(2, 2);
        let k = nodes.iter().find(|n| n.key == "k").unwrap();
        assert_eq!(k.expires_unix_ms, u64::MAX);
        assert!(k.soft_purge_unix_ms > 0);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const KEYS: usize = 12;

        #[derive(Debug, Clone)]
        enum Op {
            /// A fill that observed the seq `lag` mutations ago.
            Fill {
                key: usize,
                deps: Vec<usize>,
                lag: u64,
            },
            /// A publish of `(key, external version, critical)` changes.
            Publish {
                changes: Vec<(usize, Option<u64>, bool)>,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (
                    0..KEYS,
                    proptest::collection::vec(0..KEYS, 0..4),
                    prop_oneof![3 => Just(0u64), 1 => 1..4u64],
                )
                    .prop_map(|(key, deps, lag)| Op::Fill { key, deps, lag }),
                proptest::collection::vec(
                    (
                        0..KEYS,
                        proptest::option::weighted(0.3, 0..4u64),
                        any::<bool>()
                    ),
                    1..4
                )
                .prop_map(|changes| Op::Publish { changes }),
            ]
        }

        fn name(i: usize) -> String {
            format!("k{i}")
        }

        /// Every key that reaches `from` through registered dependencies,
        /// or is in it.
        fn reach(deps: &[Option<Vec<usize>>], from: &[usize]) -> [bool; KEYS] {
            let mut reached = [false; KEYS];
            for &k in from {
                reached[k] = true;
            }
            loop {
                let mut grew = false;
                for k in 0..KEYS {
                    if !reached[k]
                        && deps[k]
                            .as_ref()
                            .is_some_and(|d| d.iter().any(|&x| reached[x]))
                    {
                        reached[k] = true;
                        grew = true;
                    }
                }
                if !grew {
                    return reached;
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            /// Any sequence of fills (some of them racing a publish) and
            /// publishes (some of them duplicates by external version) keeps
            /// every version monotonic; a publish bumps each changed key and
            /// every transitive dependent (cycles included) to its seq,
            /// counting each exactly once, carries the critical bit of the
            /// changes that reached it, and leaves every other key alone; a
            /// fill is refused exactly when the key or a dependency changed
            /// after the seq it observed.
            #[test]
            fn versions_are_monotonic_and_dependents_invalidated(ops in proptest::collection::vec(op(), 1..40)) {
                let s = store();
                // The model: each registered key's dependency set, the seq
                // of the last publish that reached each key, and the last
                // external version of each key.
                let mut deps: Vec<Option<Vec<usize>>> = vec![None; KEYS];
                let mut changed: Vec<u64> = vec![0; KEYS];
                let mut external: Vec<Option<u64>> = vec![None; KEYS];
                let mut last: Vec<u64> = vec![0; KEYS];
                for op in ops {
                    let before: Vec<u64> = (0..KEYS).map(|k| version(&s, &name(k))).collect();
                    match op {
                        Op::Fill { key, deps: d, lag } => {
                            let mut d: Vec<usize> = d.into_iter().filter(|&x| x != key).collect();
                            d.sort_by_key(|&x| name(x));
                            d.dedup();
                            let seq_before = s.seq();
                            let observed = seq_before.saturating_sub(lag);
                            let result = s.fill(&FillSpec {
                                key: name(key),
                                dependencies: d.iter().map(|&x| name(x)).collect(),
                                ttl_ms: 3_600_000,
                                observed_seq: observed,
                            });
                            let raced = std::iter::once(key).chain(d.iter().copied()).any(|k| changed[k] > observed);
                            prop_assert_eq!(result.is_err(), raced, "fill of {} observing {}", name(key), observed);
                            if let Ok(outcome) = result {
                                // A new node, or a new dependency set, takes
                                // the fill's seq; otherwise the version stays.
                                let old: &[usize] = deps[key].as_deref().unwrap_or(&[]);
                                let expected = if before[key] == 0 || old != d.as_slice() {
                                    outcome.seq
                                } else {
                                    before[key]
                                };
                                prop_assert_eq!(outcome.version, expected, "version of {}", name(key));
                                deps[key] = Some(d);
                            } else {
                                prop_assert_eq!(s.seq(), seq_before, "a refused fill took a seq");
                            }
                            // A fill bumps no other key.
                            for k in (0..KEYS).filter(|&k| k != key) {
                                let v = version(&s, &name(k));
                                prop_assert!(v == before[k] || before[k] == 0, "{} changed by a fill", name(k));
                            }
                        }
                        Op::Publish { changes } => {
                            // Which changes are duplicates, in order.
                            let mut ext = external.clone();
                            let duplicate: Vec<bool> = changes
                                .iter()
                                .map(|&(k, e, _)| match e {
                                    Some(e) if ext[k].is_some_and(|l| e <= l) => true,
                                    Some(e) => {
                                        ext[k] = Some(e);
                                        false
                                    }
                                    None => false,
                                })
                                .collect();
                            let list: Vec<PublishChange> = changes
                                .iter()
                                .map(|&(k, e, critical)| PublishChange {
                                    external_version: e,
                                    critical,
                                    ..change(&name(k))
                                })
                                .collect();
                            let seq_before = s.seq();
                            let outcome = s.publish(&list).unwrap();
                            let applied: Vec<usize> = changes
                                .iter()
                                .zip(&duplicate)
                                .filter(|(_, d)| !**d)
                                .map(|(c, _)| c.0)
                                .collect();
                            for (r, d) in outcome.results.iter().zip(&duplicate) {
                                prop_assert_eq!(r.duplicate, *d);
                            }
                            let reached = reach(&deps, &applied);
                            if applied.is_empty() {
                                prop_assert_eq!(outcome.seq, seq_before);
                            } else {
                                prop_assert_eq!(outcome.seq, seq_before + 1);
                                external = ext;
                            }
                            let invalidated: u64 = outcome.results.iter().map(|r| r.invalidated).sum();
                            prop_assert_eq!(invalidated, reached.iter().filter(|r| **r).count() as u64, "each reached key counts once");
                            for k in 0..KEYS {
                                let v = version(&s, &name(k));
                                if reached[k] {
                                    prop_assert_eq!(v, outcome.seq, "{} not bumped", name(k));
                                    changed[k] = outcome.seq;
                                    let critical = changes
                                        .iter()
                                        .zip(&duplicate)
                                        .filter(|((c, _, _), d)| !**d && reach(&deps, &[*c])[k])
                                        .any(|((_, _, critical), _)| *critical);
                                    prop_assert_eq!(s.inspect(&name(k)).unwrap().critical, critical, "critical bit of {}", name(k));
                                } else {
                                    prop_assert_eq!(v, before[k], "{} bumped without being reached", name(k));
                                }
                            }
                        }
                    }
                    for (k, last) in last.iter_mut().enumerate() {
                        let v = version(&s, &name(k));
                        prop_assert!(v >= *last, "{} went back from {} to {}", name(k), last, v);
                        *last = v;
                    }
                }
            }
        }
    }
}
