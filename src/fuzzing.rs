//! Entry points for fuzzing: each takes arbitrary bytes, runs them through
//! the code that handles untrusted input, and panics only when an invariant
//! breaks. The cargo-fuzz targets under `fuzz/` call them, and a bounded
//! smoke run in the tests feeds them the checked-in corpus and a fixed-seed
//! stream of generated inputs on stable Rust.
//!
//! - [`request`]: a sequence of Coordinator requests, decoded with prost as
//!   the server's codec does, validated and converted as the handlers do
//!   (against default [`Limits`]), then applied to a small in-memory store
//!   whose invariants are checked after every request.
//! - [`log_segment`]: the bytes after a log segment's header, read as
//!   recovery reads them (framing, checksum, decoding, seq order), replayed
//!   into a store and written out as a compaction's snapshot would be.
//! - [`snapshot`]: the bytes after a snapshot's header, decoded and loaded as
//!   recovery loads a snapshot.
//! - [`hpack`]: HTTP/2 header blocks, decoded in turn by one HPACK decoder
//!   ([`crate::http2::hpack`]) whose table must stay within its limit, and whose
//!   fields, written out again by the encoder, must decode to themselves.
//! - [`http2`]: the bytes a client sends after its preface and SETTINGS,
//!   read by a server connection ([`crate::http2::connection`]) that
//!   releases every body's bytes and answers every request; it keeps its
//!   concurrency limit, and an error leaves a GOAWAY as its last frame.
//!
//! Not part of the API: nothing here is stable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::Error;
use crate::fanout::Subscriber;
use crate::lease::LeaseOutcome;
use crate::log::MemoryLog;
use crate::pb;
use crate::pb::watch_request::Request as In;
use crate::policy;
use crate::store::{Freshness, Store, StoreConfig};
use crate::validate::{self, Limits};
use crate::wal::{self, Body, WalRecord};

/// An entry point: takes any bytes, panics only on a broken invariant.
pub type Entry = fn(&[u8]);

/// The fuzz targets: name (as under `fuzz/fuzz_targets/`) and entry point.
pub const TARGETS: &[(&str, Entry)] = &[
    ("request", request),
    ("log_segment", log_segment),
    ("snapshot", snapshot),
    ("hpack", hpack),
    ("http2", http2),
];

/// The request messages of the Coordinator service, in the order the kind
/// byte of [`request`] chooses them (modulo their number).
pub const REQUEST_KINDS: &[&str] = &[
    "Publish",
    "Fill",
    "Check",
    "CheckBatch",
    "Inspect",
    "Stats",
    "Watch",
    "Lease",
    "Purge",
    "GetPolicy",
    "SetPolicy",
    "ListPolicies",
    "DeletePolicy",
];

/// Most requests one [`request`] input applies.
const MAX_REQUESTS: usize = 32;

/// The store the request target applies to: few shards, so that setting it
/// up per input is cheap, and otherwise the defaults.
fn small_store() -> Store {
    let config = StoreConfig {
        shards: 4,
        ..StoreConfig::default()
    };
    Store::new(config, Box::new(MemoryLog::with_epoch(7)))
}

/// Runs a sequence of Coordinator requests. The input is a series of frames
/// `[kind: u8][length: u16 LE][message]`: the kind picks the message from
/// [`REQUEST_KINDS`], a length past the end of the input takes the rest.
/// The store starts with a small dependency graph, so that a single request
/// meets state.
pub fn request(data: &[u8]) {
    let mut run = Run::new();
    let mut rest = data;
    for _ in 0..MAX_REQUESTS {
        let Some((&kind, tail)) = rest.split_first() else {
            break;
        };
        let (len, tail) = match tail {
            [a, b, tail @ ..] => (u16::from_le_bytes([*a, *b]) as usize, tail),
            _ => (tail.len(), &[][..]),
        };
        let (message, tail) = tail.split_at(len.min(tail.len()));
        run.apply(kind as usize % REQUEST_KINDS.len(), message);
        run.check_invariants();
        rest = tail;
    }
    run.finish();
}

/// Frames one request for [`request`].
pub fn frame_request(kind: usize, message: &[u8], out: &mut Vec<u8>) {
    out.push(kind as u8);
    out.extend_from_slice(&(message.len().min(u16::MAX as usize) as u16).to_le_bytes());
    out.extend_from_slice(&message[..message.len().min(u16::MAX as usize)]);
}

/// One [`request`] input being applied, with a model of what must hold.
struct Run {
    store: Store,
    limits: Limits,
    /// The last seq seen.
    seq: u64,
    /// Every key seen and its last version.
    versions: BTreeMap<String, u64>,
    /// The dependencies of every key filled, as the last fill set them.
    deps: HashMap<String, Vec<String>>,
    /// Leases granted: key and token.
    leases: Vec<(String, u64)>,
    /// The Watch stream, once a `start` registered it.
    stream: Option<Arc<Subscriber>>,
}

impl Run {
    fn new() -> Self {
        let mut run = Self {
            store: small_store(),
            limits: Limits::default(),
            seq: 0,
            versions: BTreeMap::new(),
            deps: HashMap::new(),
            leases: Vec::new(),
            stream: None,
        };
        for (key, deps) in [
            ("feed:1", &["post:1", "user:1"][..]),
            ("page:1", &["feed:1"][..]),
            ("post:1", &[][..]),
        ] {
            let request = pb::FillRequest {
                key: key.into(),
                dependencies: deps.iter().map(|d| d.to_string()).collect(),
                observed_seq: run.store.seq(),
                ..Default::default()
            };
            run.apply(1, &request.encode_to_vec());
        }
        run.check_invariants();
        assert_eq!(run.store.seq(), 3, "the starting fills were refused");
        run
    }

    /// Decodes and handles one request of kind `kind`.
    fn apply(&mut self, kind: usize, message: &[u8]) {
        let outcome = match kind {
            0 => decode(message).map(|r| self.publish(r)),
            1 => decode(message).map(|r| self.fill(r)),
            2 => decode(message).map(|r| self.check(r)),
            3 => decode(message).map(|r| self.check_batch(r)),
            4 => decode(message).map(|r| self.inspect(r)),
            5 => decode::<pb::StatsRequest>(message).map(|_| {
                let stats = self.store.stats();
                assert_eq!(stats.seq, self.store.seq());
                Ok(())
            }),
            6 => decode(message).map(|r| self.watch(r)),
            7 => decode(message).map(|r| self.lease(r)),
            8 => decode(message).map(|r| self.purge(r)),
            9 => decode(message).map(|r| self.get_policy(r)),
            10 => decode(message).map(|r| self.set_policy(r)),
            11 => decode::<pb::ListPoliciesRequest>(message).map(|_| {
                let policies = self.store.policies();
                for p in std::iter::once(&policies.default).chain(policies.namespaces.values()) {
                    assert_eq!(validate::policy(&validate::policy_to_pb(p)).ok(), Some(*p));
                }
                Ok(())
            }),
            12 => decode(message).map(|r| self.delete_policy(r)),
            _ => unreachable!("kind is taken modulo the number of kinds"),
        };
        // A decoded request either succeeds or is refused with the error the
        // API names; a memory-only store has no internal failure.
        if let Ok(Err(e)) = outcome {
            let status = tonic::Status::from(e);
            assert_ne!(status.code(), tonic::Code::Internal, "{status:?}");
            assert_ne!(status.code(), tonic::Code::Unknown, "{status:?}");
        }
    }

    /// Notes a key's version, checking that it never went back.
    fn saw(&mut self, key: &str, version: u64) {
        let last = self.versions.entry(key.to_owned()).or_insert(0);
        assert!(
            version >= *last,
            "{key:?} went back from version {last} to {version}"
        );
        *last = version;
    }

    fn version(&self, key: &str) -> Option<u64> {
        self.store.inspect(key).map(|i| i.version)
    }

    fn check_invariants(&mut self) {
        let seq = self.store.seq();
        assert!(seq >= self.seq, "seq went back from {} to {seq}", self.seq);
        self.seq = seq;
        let keys: Vec<String> = self.versions.keys().cloned().collect();
        for key in keys {
            if let Some(info) = self.store.inspect(&key) {
                assert!(
                    info.version <= seq,
                    "{key:?} is at {} past seq {seq}",
                    info.version
                );
                if let Some(deps) = self.deps.get(&key) {
                    assert_eq!(&info.dependencies, deps, "dependencies of {key:?}");
                }
                self.saw(&key, info.version);
            }
        }
        let stats = self.store.stats();
        assert_eq!(
            stats.edges,
            self.deps.values().map(|d| d.len() as u64).sum::<u64>(),
            "edge count"
        );
    }

    /// Ends the run: the state survives a snapshot, as a restart reads it.
    fn finish(self) {
        if let Some(stream) = &self.stream {
            self.store.hub().unsubscribe(stream);
        }
        let seq = self.store.seq();
        let (meta, nodes) = self.store.snapshot(seq, seq);
        let mut bytes = wal::header(crate::snapshot::MAGIC, self.store.epoch());
        bytes.extend(wal::frame(&meta.encode_to_vec()));
        for node in &nodes {
            bytes.extend(wal::frame(&node.encode_to_vec()));
        }
        let (_, meta, nodes) =
            crate::snapshot::decode(&bytes, true).expect("a snapshot reads back");
        let loaded = small_store();
        loaded.load_snapshot(meta, nodes);
        assert_eq!(loaded.seq(), seq);
        assert_eq!(loaded.stats().edges, self.store.stats().edges);
        assert_eq!(loaded.policies(), self.store.policies());
        let digest = |s: &Store| {
            let (_, mut nodes) = s.snapshot(seq, seq);
            nodes.sort_by(|a, b| a.key.cmp(&b.key));
            nodes
                .into_iter()
                .map(|n| {
                    let times = (n.expires_unix_ms != 0, n.soft_purge_unix_ms != 0);
                    (
                        n.key,
                        n.version,
                        n.last_change_seq,
                        n.external_version,
                        n.critical,
                        n.last_critical_seq,
                        n.dependencies,
                        times,
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            digest(&loaded),
            digest(&self.store),
            "the state after a snapshot"
        );
        sweep(&self.store);
        sweep(&loaded);
    }

    /// Keys a publish of `keys` must reach: those and their transitive
    /// dependents through the dependencies fills registered.
    fn reached(&self, keys: &[&str]) -> BTreeSet<String> {
        let mut reached: BTreeSet<String> = keys.iter().map(|k| k.to_string()).collect();
        loop {
            let more: Vec<String> = self
                .deps
                .iter()
                .filter(|(k, d)| !reached.contains(*k) && d.iter().any(|d| reached.contains(d)))
                .map(|(k, _)| k.clone())
                .collect();
            if more.is_empty() {
                return reached;
            }
            reached.extend(more);
        }
    }

    fn publish(&mut self, request: pb::PublishRequest) -> Result<(), Error> {
        let client_id = request.client_id.clone();
        let changes = self.limits.publish(request)?;
        let before = self.store.seq();
        let outcome = self.store.publish_from(&changes, &client_id)?;
        assert_eq!(outcome.results.len(), changes.len());
        let applied: Vec<&str> = changes
            .iter()
            .zip(&outcome.results)
            .filter(|(_, r)| !r.duplicate)
            .map(|(c, _)| c.key.as_str())
            .collect();
        if applied.is_empty() {
            assert_eq!(outcome.seq, before, "a publish of duplicates took a seq");
            return Ok(());
        }
        assert_eq!(outcome.seq, before + 1);
        let reached = self.reached(&applied);
        let invalidated: u64 = outcome.results.iter().map(|r| r.invalidated).sum();
        assert_eq!(
            invalidated,
            reached.len() as u64,
            "each reached key is invalidated exactly once: {reached:?}"
        );
        for key in &reached {
            assert_eq!(self.version(key), Some(outcome.seq), "{key:?} not bumped");
        }
        // Keys the publish did not reach keep their version.
        for (key, &last) in &self.versions {
            if !reached.contains(key) {
                assert_eq!(self.version(key).unwrap_or(last), last, "{key:?} bumped");
            }
        }
        for change in &changes {
            if let Some(ext) = change.external_version {
                let info = self.store.inspect(&change.key).expect("published");
                assert!(info.external_version >= Some(ext));
            }
            let v = self.version(&change.key).expect("published");
            self.saw(&change.key.clone(), v);
        }
        Ok(())
    }

    fn fill(&mut self, mut request: pb::FillRequest) -> Result<(), Error> {
        if request.epoch != 0 && request.epoch != self.store.epoch() {
            return Err(Error::EpochMismatch {
                got: request.epoch,
                current: self.store.epoch(),
            });
        }
        // Real tokens are random: a small one names the lease granted that
        // many grants ago in this input, so that the lease path is reached.
        let token = match request.lease_token {
            t @ 1..=8 if (t as usize) <= self.leases.len() => {
                self.leases[self.leases.len() - t as usize].1
            }
            t => t,
        };
        let _client_id = std::mem::take(&mut request.client_id);
        let mut spec = self.limits.fill(request, self.store.config())?;
        assert!(spec.dependencies.windows(2).all(|w| w[0] < w[1]));
        assert!(!spec.dependencies.contains(&spec.key));
        assert!(spec.ttl_ms <= self.store.config().max_ttl.as_millis() as u64);
        if token != 0 {
            let Some(lease_seq) = self.store.release_lease(&spec.key, token) else {
                return Err(Error::LeaseNotHeld {
                    key: spec.key,
                    token,
                });
            };
            spec.observed_seq = if spec.observed_seq == 0 {
                lease_seq
            } else {
                spec.observed_seq.min(lease_seq)
            };
        }
        let old = self.store.inspect(&spec.key);
        let before = self.store.seq();
        let outcome = self.store.fill(&spec)?;
        assert_eq!(outcome.seq, before + 1);
        assert_eq!(outcome.ttl_ms, spec.ttl_ms);
        let changed = old
            .as_ref()
            .is_none_or(|o| o.dependencies != spec.dependencies);
        let expected = match &old {
            Some(o) if !changed => o.version,
            _ => outcome.seq,
        };
        assert_eq!(outcome.version, expected, "fill version of {:?}", spec.key);
        let info = self.store.inspect(&spec.key).expect("filled");
        assert_eq!(info.version, outcome.version);
        assert_eq!(info.dependencies, spec.dependencies);
        assert!(info.last_change_seq <= spec.observed_seq);
        self.saw(&spec.key, outcome.version);
        for dep in &spec.dependencies {
            let v = self.version(dep).expect("a dependency has a node");
            self.saw(dep, v);
        }
        self.deps.insert(spec.key, spec.dependencies);
        Ok(())
    }

    fn check(&mut self, request: pb::CheckRequest) -> Result<(), Error> {
        self.limits.key(|| "key".to_owned(), &request.key)?;
        let policy = self.store.policy_for(&request.key);
        if request.epoch != 0 && request.epoch != self.store.epoch() {
            return Ok(());
        }
        let (answer, seq) = self
            .store
            .check(&request.key, request.version, request.age_ms);
        assert!(seq <= self.store.seq());
        match answer.freshness {
            Freshness::Fresh => assert_eq!(answer.version, request.version),
            Freshness::Stale => assert_ne!(answer.version, request.version),
            Freshness::Unknown => assert_eq!(answer.version, 0),
        }
        assert!(answer.version <= seq);
        let decision = policy::decide(&policy, &answer, request.age_ms);
        assert_eq!(
            decision == policy::Decision::Unknown,
            answer.freshness == Freshness::Unknown
        );
        Ok(())
    }

    fn check_batch(&mut self, request: pb::CheckBatchRequest) -> Result<(), Error> {
        self.limits.batch("items", request.items.len())?;
        for (i, item) in request.items.iter().enumerate() {
            self.limits.key(|| format!("items[{i}].key"), &item.key)?;
        }
        let (answers, seq) = self
            .store
            .check_batch(&request.items, |i| (i.key.as_str(), i.version, i.age_ms));
        assert_eq!(answers.len(), request.items.len());
        let policies = self.store.policies();
        for (a, item) in answers.iter().zip(&request.items) {
            assert!(a.version <= seq);
            let (single, _) = self.store.check(&item.key, item.version, item.age_ms);
            // Equal unless the registration ran out between the two reads.
            if single.freshness != Freshness::Unknown && a.freshness != Freshness::Unknown {
                assert_eq!(single.version, a.version, "{:?}", item.key);
            }
            policy::decide(policies.for_key(&item.key), a, item.age_ms);
        }
        Ok(())
    }

    fn inspect(&mut self, request: pb::InspectRequest) -> Result<(), Error> {
        self.limits.key(|| "key".to_owned(), &request.key)?;
        let info = self
            .store
            .inspect(&request.key)
            .ok_or(Error::NotFound(request.key))?;
        assert!(info.dependencies.windows(2).all(|w| w[0] < w[1]));
        assert!(info.registered || info.ttl_left_ms == 0);
        Ok(())
    }

    fn watch(&mut self, request: pb::WatchRequest) -> Result<(), Error> {
        // The checks the Watch handler runs, without a principal.
        let keys = |field: &str, keys: &[String], prefixes: bool| -> Result<(), Error> {
            crate::watch::check_keys(&self.limits, None, field, keys, prefixes)
                .map_err(|status| Error::invalid(status.message()))
        };
        let hub = self.store.hub();
        let Some(stream) = &self.stream else {
            let Some(In::Start(start)) = request.request else {
                return Err(Error::invalid("the first message must be `start`"));
            };
            keys("start.track", &start.track, false)?;
            keys("start.subscribe", &start.subscribe, true)?;
            let resume = start.resume.map(|t| (t.epoch == self.store.epoch(), t.seq));
            if let Ok((stream, from)) = self.store.subscribe(
                &start.client_id,
                start.no_loop,
                resume,
                &start.track,
                &start.subscribe,
                None,
            ) {
                assert!(from <= self.store.seq() || resume.is_some());
                for key in &start.track {
                    assert!(stream.tracks(key));
                }
                self.stream = Some(stream);
            }
            return Ok(());
        };
        match request.request {
            None | Some(In::Start(_)) => return Err(Error::invalid("not a follow-up")),
            Some(In::Track(list)) => {
                keys("track.keys", &list.keys, false)?;
                if hub.add(stream, &list.keys, &[]).is_ok() {
                    for key in &list.keys {
                        assert!(stream.tracks(key));
                    }
                }
            }
            Some(In::Untrack(list)) => hub.untrack(stream, &list.keys),
            Some(In::Subscribe(list)) => {
                keys("subscribe.keys", &list.keys, true)?;
                let _ = hub.add(stream, &[], &list.keys);
            }
            Some(In::Unsubscribe(list)) => hub.unwatch_prefixes(stream, &list.keys),
            Some(In::Ack(ack)) => stream.ack(ack.seq),
            Some(In::Progress(_)) => {
                let mut out = Vec::new();
                stream.drain(usize::MAX, &mut out);
                assert!(out.iter().all(|n| n.seq <= self.store.seq()));
            }
        }
        Ok(())
    }

    fn lease(&mut self, request: pb::LeaseRequest) -> Result<(), Error> {
        self.limits.key(|| "key".to_owned(), &request.key)?;
        match self.store.lease(&request.key) {
            LeaseOutcome::Granted { token, seq, .. } => {
                assert_ne!(token, 0);
                assert!(seq <= self.store.seq());
                self.leases.push((request.key, token));
            }
            LeaseOutcome::InFlight { expires_in_ms } => assert!(expires_in_ms > 0),
        }
        Ok(())
    }

    fn purge(&mut self, request: pb::PurgeRequest) -> Result<(), Error> {
        let spec = self.limits.purge(&request)?;
        assert_eq!(spec.max_keys, self.limits.max_purge_keys);
        let before = self.store.seq();
        let outcome = self.store.purge(&spec, &request.client_id)?;
        assert!(outcome.matched <= outcome.affected);
        if outcome.applied {
            assert_eq!(outcome.seq, before + 1);
            if spec.hard {
                for key in self.versions.keys() {
                    if key.starts_with(&spec.prefix) {
                        assert_eq!(self.version(key), Some(outcome.seq), "{key:?}");
                    }
                }
            }
        } else {
            assert_eq!(self.store.seq(), before, "a purge not applied took a seq");
        }
        Ok(())
    }

    fn get_policy(&mut self, request: pb::GetPolicyRequest) -> Result<(), Error> {
        self.limits.namespace("namespace", &request.namespace)?;
        let p = self.store.policy_for(&request.namespace);
        p.validate("policy")
    }

    fn set_policy(&mut self, request: pb::SetPolicyRequest) -> Result<(), Error> {
        self.limits.namespace("namespace", &request.namespace)?;
        let policy = validate::policy(
            request
                .policy
                .as_ref()
                .ok_or_else(|| Error::invalid("policy must be set"))?,
        )?;
        // What GetPolicy answers converts back to the same policy.
        assert_eq!(
            validate::policy(&validate::policy_to_pb(&policy)).ok(),
            Some(policy)
        );
        let namespace = (!request.namespace.is_empty()).then_some(request.namespace.as_str());
        self.store.set_policy(namespace, policy)?;
        let policies = self.store.policies();
        let set = match namespace {
            Some(ns) => policies.namespaces.get(ns).copied(),
            None => Some(policies.default),
        };
        assert_eq!(set, Some(policy));
        Ok(())
    }

    fn delete_policy(&mut self, request: pb::DeletePolicyRequest) -> Result<(), Error> {
        if request.namespace.is_empty() {
            return Err(Error::invalid("namespace must not be empty"));
        }
        self.limits.namespace("namespace", &request.namespace)?;
        let had = self
            .store
            .policies()
            .namespaces
            .contains_key(&request.namespace);
        let seq = self.store.delete_policy(&request.namespace)?;
        assert_eq!(seq.is_some(), had);
        assert!(!self
            .store
            .policies()
            .namespaces
            .contains_key(&request.namespace));
        Ok(())
    }
}

/// Runs the expiry sweep as the server's background task does, until it
/// has nothing left that is due (bounded), checking the edge count on the
/// way.
fn sweep(store: &Store) {
    edges_add_up(store);
    for _ in 0..1_000 {
        let processed = store.expire(64);
        edges_add_up(store);
        if processed < 64 {
            break;
        }
    }
}

/// The store's edge count is the number of dependencies its keys hold.
fn edges_add_up(store: &Store) {
    let seq = store.seq();
    let (_, nodes) = store.snapshot(seq, seq);
    let edges: u64 = nodes.iter().map(|n| n.dependencies.len() as u64).sum();
    assert_eq!(store.stats().edges, edges, "edge count");
}

/// Decodes a request as the server's codec does.
fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, prost::DecodeError> {
    M::decode(bytes)
}

/// Reads `data` as the records of a log segment after its header, exactly
/// as recovery does, then replays them into a store (recovery) and takes a
/// snapshot of it (compaction).
pub fn log_segment(data: &[u8]) {
    let mut bytes = wal::header(wal::MAGIC, 7);
    bytes.extend_from_slice(data);
    // The header check on the raw bytes too: it must refuse, not panic.
    let _ = wal::read_header(data, wal::MAGIC);
    assert_eq!(wal::read_header(&bytes, wal::MAGIC), Ok(7));
    let mut last_seq = 0;
    let Ok(parsed) = wal::parse_segment(&bytes, &mut last_seq) else {
        return;
    };
    assert!(parsed.end <= bytes.len());
    assert_eq!(parsed.failure.is_none(), parsed.end == bytes.len());
    let mut previous = 0;
    for record in &parsed.records {
        assert!(!matches!(record.body, None | Some(Body::Reserve(_))));
        if record.seq != 0 {
            assert!(record.seq > previous, "seq {} after {previous}", record.seq);
            previous = record.seq;
        }
    }
    // What FileLog::open keeps (no snapshot: floor 0), and how the server
    // applies it.
    let records: Vec<WalRecord> = parsed.records.into_iter().filter(|r| r.seq > 0).collect();
    let last = records.last().map_or(0, |r| r.seq);
    let store = small_store();
    store.recover(records);
    assert!(store.seq() >= last);
    let (meta, nodes) = store.snapshot(store.seq(), parsed.reserved);
    assert_eq!(meta.nodes, nodes.len() as u64);
    // Then the server serves: the expiry sweep runs over what was replayed.
    sweep(&store);
}

/// Decodes `data` as a snapshot after its header, as recovery does, loads
/// it into an empty store and takes a snapshot of that.
pub fn snapshot(data: &[u8]) {
    let mut bytes = wal::header(crate::snapshot::MAGIC, 7);
    bytes.extend_from_slice(data);
    let meta_only = crate::snapshot::decode(&bytes, false);
    let Ok((epoch, meta, nodes)) = crate::snapshot::decode(&bytes, true) else {
        return;
    };
    assert_eq!(epoch, 7);
    assert_eq!(meta_only.ok().map(|(_, m, _)| m), Some(meta.clone()));
    assert_eq!(meta.nodes, nodes.len() as u64);
    let store = small_store();
    store.load_snapshot(meta, nodes);
    let _ = store.snapshot(store.seq(), 0);
    sweep(&store);
}

/// Decodes `data` as HPACK header blocks, in turn on one decoder:
/// `[table limit: u16 LE][list limit: u16 LE]`, then blocks of
/// `[length: u16 LE][block]`. The table stays within the limit, no more
/// than the list limit is handed over, and the fields of a block that
/// decoded, encoded again, decode to themselves.
pub fn hpack(data: &[u8]) {
    use crate::http2::hpack::{encode_field, DecodeError, Decoder};
    let Some((head, mut rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let max = usize::from(u16::from_le_bytes([head[0], head[1]]));
    let list = usize::from(u16::from_le_bytes([head[2], head[3]]));
    let mut decoder = Decoder::new(max);
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_le_bytes(*len)).min(tail.len());
        let (block, tail) = tail.split_at(len);
        rest = tail;
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut listed = 0;
        let result = decoder.decode(block, list, |name, value| {
            listed += name.len() + value.len() + crate::http2::hpack::ENTRY_OVERHEAD;
            fields.push((name.to_vec(), value.to_vec()));
        });
        assert!(decoder.table_size() <= decoder.table_limit());
        assert!(decoder.table_limit() <= max);
        assert!(listed <= list, "{listed} bytes handed over, above {list}");
        if matches!(result, Ok(()) | Err(DecodeError::ListTooLarge { .. })) {
            let mut again = Vec::new();
            for (name, value) in &fields {
                encode_field(name, value, &mut again);
            }
            let mut back = Vec::new();
            Decoder::new(0)
                .decode(&again, usize::MAX, |n, v| {
                    back.push((n.to_vec(), v.to_vec()))
                })
                .expect("the encoder's block decodes");
            assert_eq!(back, fields);
        }
    }
}

/// Reads `data` as what a client sends after its preface and SETTINGS,
/// in pieces whose sizes the first byte sets, through a server connection
/// that answers each request with its body and OK trailers.
pub fn http2(data: &[u8]) {
    use crate::http2::connection::{Config, Connection, Event};
    use crate::http2::frame::{self, Head, HEAD_LEN, PREFACE};
    let Some((&piece, data)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece).max(1);
    let config = Config {
        max_concurrent_streams: 4,
        ..Config::default()
    };
    let mut conn = Connection::new(config);
    let mut input = bytes::BytesMut::from(&PREFACE[..]);
    frame::put_settings(&mut input, &[], false);
    let mut events = Vec::new();
    let mut failed = false;
    for chunk in std::iter::once(&[][..]).chain(data.chunks(piece)) {
        input.extend_from_slice(chunk);
        loop {
            let before = input.len();
            events.clear();
            if conn.receive(&mut input, &mut events).is_err() {
                failed = true;
                break;
            }
            for event in &events {
                if let Event::Data { stream, data, .. } = event {
                    conn.release(*stream, data.len());
                }
                if let Event::Data {
                    stream,
                    data,
                    end_stream: true,
                } = event
                {
                    conn.respond(
                        *stream,
                        200,
                        &[(b"content-type", b"application/grpc")],
                        false,
                    );
                    conn.send_data(*stream, data.clone());
                    conn.send_trailers(*stream, &[(b"grpc-status", b"0")]);
                }
            }
            assert!(
                conn.open_streams() <= 4,
                "{} streams open",
                conn.open_streams()
            );
            if input.len() == before && events.is_empty() {
                break;
            }
        }
        if failed {
            break;
        }
    }
    if failed {
        // The output is whole frames, the last a GOAWAY.
        let out = conn.output();
        let mut rest = &out[..];
        let mut last = None;
        while let Some(head) = Head::parse(rest) {
            rest = &rest[HEAD_LEN + head.len..];
            last = Some(head.kind);
        }
        assert!(rest.is_empty());
        assert_eq!(last, Some(frame::kind::GOAWAY));
    }
}

/// Generates inputs for the targets: valid encodings of random messages, and
/// mutations of them.
pub mod generate {
    use super::*;

    /// Short keys from a small alphabet, so that generated requests meet
    /// each other's keys; sometimes empty or over the key limit.
    pub fn key(rng: &mut StdRng) -> String {
        match rng.random_range(0..40) {
            0 => String::new(),
            1 => "k".repeat(1025),
            2 => "ns:".to_owned(),
            _ => {
                let ns = ["feed", "post", "user", "page", "x"][rng.random_range(0..5)];
                format!("{ns}:{}", rng.random_range(0..4))
            }
        }
    }

    fn keys(rng: &mut StdRng, max: usize) -> Vec<String> {
        let n = rng.random_range(0..=max);
        (0..n).map(|_| key(rng)).collect()
    }

    fn small(rng: &mut StdRng) -> u64 {
        match rng.random_range(0..6) {
            0 => 0,
            1 => u64::MAX,
            2 => rng.random(),
            _ => rng.random_range(0..20),
        }
    }

    fn policy(rng: &mut StdRng) -> pb::FreshnessPolicy {
        pb::FreshnessPolicy {
            max_age_ms: small(rng),
            revalidate_after_ms: small(rng),
            stale_while_revalidate_ms: small(rng),
            allow_stale_on_critical: rng.random(),
            check_sample_rate: match rng.random_range(0..5) {
                0 => None,
                1 => Some(f64::NAN),
                2 => Some(rng.random_range(-1.0..2.0)),
                _ => Some(rng.random()),
            },
        }
    }

    /// A valid encoding of a random request of kind `kind` (see
    /// [`REQUEST_KINDS`]).
    pub fn request_message(rng: &mut StdRng, kind: usize) -> Vec<u8> {
        match kind {
            0 => pb::PublishRequest {
                changes: (0..rng.random_range(0..4))
                    .map(|_| pb::Change {
                        key: key(rng),
                        external_version: rng.random_bool(0.3).then(|| small(rng)),
                        critical: rng.random(),
                        event_time_unix_ms: small(rng),
                    })
                    .collect(),
                client_id: key(rng),
            }
            .encode_to_vec(),
            1 => pb::FillRequest {
                key: key(rng),
                dependencies: keys(rng, 4),
                ttl_ms: small(rng),
                observed_seq: small(rng).max(rng.random_range(0..40)),
                epoch: if rng.random_bool(0.9) { 0 } else { 7 },
                lease_token: if rng.random_bool(0.9) { 0 } else { small(rng) },
                client_id: String::new(),
            }
            .encode_to_vec(),
            2 => pb::CheckRequest {
                key: key(rng),
                version: small(rng),
                age_ms: small(rng),
                ..Default::default()
            }
            .encode_to_vec(),
            3 => pb::CheckBatchRequest {
                items: (0..rng.random_range(0..4))
                    .map(|_| pb::CheckItem {
                        key: key(rng),
                        version: small(rng),
                        age_ms: small(rng),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }
            .encode_to_vec(),
            4 => pb::InspectRequest { key: key(rng) }.encode_to_vec(),
            5 => pb::StatsRequest {}.encode_to_vec(),
            6 => pb::WatchRequest {
                request: Some(match rng.random_range(0..7) {
                    0 | 1 => In::Start(pb::WatchStart {
                        client_id: key(rng),
                        no_loop: rng.random(),
                        resume: rng.random_bool(0.3).then(|| pb::ResumeToken {
                            epoch: if rng.random() { 7 } else { small(rng) },
                            seq: small(rng),
                        }),
                        track: keys(rng, 3),
                        subscribe: keys(rng, 2),
                        refusals_in_band: rng.random(),
                    }),
                    2 => In::Track(pb::KeyList { keys: keys(rng, 3) }),
                    3 => In::Untrack(pb::KeyList { keys: keys(rng, 3) }),
                    4 => In::Subscribe(pb::KeyList { keys: keys(rng, 2) }),
                    5 => In::Ack(pb::Ack { seq: small(rng) }),
                    _ => In::Progress(pb::ProgressRequest {}),
                }),
            }
            .encode_to_vec(),
            7 => pb::LeaseRequest {
                key: key(rng),
                ..Default::default()
            }
            .encode_to_vec(),
            8 => pb::PurgeRequest {
                prefix: {
                    let k = key(rng);
                    let n = rng.random_range(0..=k.len().min(6));
                    k[..n].to_owned()
                },
                hard: rng.random(),
                jitter_ms: small(rng),
                dry_run: rng.random(),
                confirm: rng.random(),
                ..Default::default()
            }
            .encode_to_vec(),
            9 => pb::GetPolicyRequest {
                namespace: key(rng).split(':').next().unwrap_or("").to_owned(),
            }
            .encode_to_vec(),
            10 => pb::SetPolicyRequest {
                namespace: key(rng).split(':').next().unwrap_or("").to_owned(),
                policy: rng.random_bool(0.95).then(|| policy(rng)),
            }
            .encode_to_vec(),
            11 => pb::ListPoliciesRequest {}.encode_to_vec(),
            _ => pb::DeletePolicyRequest {
                namespace: key(rng).split(':').next().unwrap_or("").to_owned(),
            }
            .encode_to_vec(),
        }
    }

    /// A [`request`] input: a few valid random requests.
    pub fn requests(rng: &mut StdRng) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..rng.random_range(1..8) {
            let kind = rng.random_range(0..REQUEST_KINDS.len());
            frame_request(kind, &request_message(rng, kind), &mut out);
        }
        out
    }

    /// A random log record, as the log writes them.
    pub fn wal_record(rng: &mut StdRng, seq: u64) -> WalRecord {
        use crate::wal::{WalChange, WalFill, WalPolicy, WalPublish, WalPurge, WalReserve};
        let body = match rng.random_range(0..6) {
            0 | 1 => Body::Publish(WalPublish {
                changes: (0..rng.random_range(1..4))
                    .map(|_| WalChange {
                        key: key(rng),
                        external_version: rng.random_bool(0.3).then(|| small(rng)),
                        critical: rng.random(),
                        event_time_ms: small(rng),
                        duplicate: rng.random_bool(0.1),
                    })
                    .collect(),
                origin: key(rng),
            }),
            2 => {
                let mut dependencies = keys(rng, 4);
                dependencies.sort();
                dependencies.dedup();
                Body::Fill(WalFill {
                    key: key(rng),
                    dependencies,
                    ttl_ms: small(rng),
                    observed_seq: small(rng),
                })
            }
            3 => Body::Policy(WalPolicy {
                namespace: rng.random_bool(0.5).then(|| key(rng)),
                set: rng.random(),
                max_age_ms: small(rng),
                revalidate_after_ms: small(rng),
                stale_while_revalidate_ms: small(rng),
                allow_stale_on_critical: rng.random(),
                check_sample_rate: rng.random(),
            }),
            4 => Body::Purge(WalPurge {
                prefix: key(rng),
                jitter_ms: small(rng),
            }),
            _ => Body::Reserve(WalReserve {
                up_to: seq.saturating_add(small(rng)),
            }),
        };
        let reserve = matches!(body, Body::Reserve(_));
        WalRecord {
            seq: if reserve { 0 } else { seq },
            unix_ms: if rng.random_bool(0.8) {
                1_700_000_000_000 + rng.random_range(0..1_000_000)
            } else {
                small(rng)
            },
            body: Some(body),
        }
    }

    /// A [`log_segment`] input: a few framed records in seq order.
    pub fn log_segment(rng: &mut StdRng) -> Vec<u8> {
        let mut out = Vec::new();
        let mut seq = rng.random_range(0..3);
        for _ in 0..rng.random_range(0..8) {
            seq += rng.random_range(1..3);
            out.extend(wal::frame(&wal_record(rng, seq).encode_to_vec()));
        }
        out
    }

    /// A [`snapshot`] input: a snapshot of a store built from a random log.
    pub fn snapshot(rng: &mut StdRng) -> Vec<u8> {
        let store = small_store();
        let records: Vec<WalRecord> = (1..rng.random_range(1..10))
            .map(|seq| wal_record(rng, seq))
            .filter(|r| r.seq > 0)
            .collect();
        store.recover(records);
        let (mut meta, nodes) = store.snapshot(store.seq(), store.seq() + 10);
        if rng.random_bool(0.1) {
            meta.nodes = small(rng);
        }
        let mut out = wal::frame(&meta.encode_to_vec());
        for node in nodes {
            out.extend(wal::frame(&node.encode_to_vec()));
        }
        out
    }

    /// A mutation of `input`: bit flips, truncation, splicing with `other`,
    /// byte insertions, or an edited frame length.
    pub fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..rng.random_range(1..4) {
            match rng.random_range(0..7) {
                0 if !out.is_empty() => {
                    let i = rng.random_range(0..out.len());
                    out[i] ^= 1 << rng.random_range(0..8);
                }
                1 if !out.is_empty() => {
                    let i = rng.random_range(0..out.len());
                    out.truncate(i);
                }
                2 => {
                    let at = rng.random_range(0..=out.len());
                    let from = rng.random_range(0..=other.len());
                    let mut spliced = out[..at].to_vec();
                    spliced.extend_from_slice(&other[from..]);
                    out = spliced;
                }
                3 => {
                    let at = rng.random_range(0..=out.len());
                    let n = rng.random_range(1..8);
                    let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                    out.splice(at..at, bytes);
                }
                4 if out.len() >= 4 => {
                    // A length field (frame or request) set to something
                    // large, small or near the truth.
                    let at = rng.random_range(0..out.len() - 3);
                    let old = u32::from_le_bytes(out[at..at + 4].try_into().expect("4"));
                    let new = match rng.random_range(0..4) {
                        0 => u32::MAX,
                        1 => 256 << 20,
                        2 => old.wrapping_add(rng.random_range(0..3)).wrapping_sub(1),
                        _ => rng.random(),
                    };
                    out[at..at + 4].copy_from_slice(&new.to_le_bytes());
                }
                5 if !out.is_empty() => {
                    let i = rng.random_range(0..out.len());
                    out[i] = [0, 0xff, 0x7f, 0x80][rng.random_range(0..4)];
                }
                _ => {
                    let at = rng.random_range(0..=out.len());
                    let len = rng.random_range(0..=out.len() - at);
                    let copy = out[at..at + len].to_vec();
                    out.splice(at..at, copy);
                }
            }
        }
        out
    }

    /// Random bytes, up to `max` of them.
    pub fn bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
        let n = rng.random_range(0..=max);
        (0..n).map(|_| rng.random()).collect()
    }

    /// Header blocks for [`super::hpack`]: indexed fields (static, and the
    /// entries earlier blocks added), literals with and without indexing,
    /// plain and Huffman-coded, and table size updates.
    pub fn header_blocks(rng: &mut StdRng) -> Vec<u8> {
        use crate::http2::hpack::{huffman_encode, put_integer, STATIC};
        let max: u16 = if rng.random_bool(0.5) {
            4096
        } else {
            rng.random_range(0..600)
        };
        let list: u16 = if rng.random_bool(0.8) {
            8192
        } else {
            rng.random_range(0..200)
        };
        let mut out = Vec::new();
        out.extend_from_slice(&max.to_le_bytes());
        out.extend_from_slice(&list.to_le_bytes());
        let mut added = 0usize;
        for _ in 0..rng.random_range(1..5) {
            let mut block = Vec::new();
            if rng.random_bool(0.2) {
                put_integer(rng.random_range(0..=usize::from(max)), 5, 0x20, &mut block);
            }
            for _ in 0..rng.random_range(1..9) {
                let string = |rng: &mut StdRng, block: &mut Vec<u8>| {
                    let text: Vec<u8> = (0..rng.random_range(0..24))
                        .map(|_| {
                            if rng.random_bool(0.9) {
                                rng.random_range(b'a'..=b'z')
                            } else {
                                rng.random()
                            }
                        })
                        .collect();
                    if rng.random_bool(0.5) {
                        let mut coded = Vec::new();
                        huffman_encode(&text, &mut coded);
                        put_integer(coded.len(), 7, 0x80, block);
                        block.extend_from_slice(&coded);
                    } else {
                        put_integer(text.len(), 7, 0x00, block);
                        block.extend_from_slice(&text);
                    }
                };
                match rng.random_range(0..4) {
                    0 => put_integer(
                        rng.random_range(1..=STATIC.len() + added),
                        7,
                        0x80,
                        &mut block,
                    ),
                    1 => {
                        // With incremental indexing, a new name.
                        block.push(0x40);
                        string(rng, &mut block);
                        string(rng, &mut block);
                        added += 1;
                    }
                    2 => {
                        // With incremental indexing, a static name.
                        put_integer(rng.random_range(1..=STATIC.len()), 6, 0x40, &mut block);
                        string(rng, &mut block);
                        added += 1;
                    }
                    _ => {
                        // Without indexing or never indexed, a static name.
                        let high = if rng.random_bool(0.5) { 0x00 } else { 0x10 };
                        put_integer(rng.random_range(1..=STATIC.len()), 4, high, &mut block);
                        string(rng, &mut block);
                    }
                }
            }
            out.extend_from_slice(&(block.len() as u16).to_le_bytes());
            out.extend_from_slice(&block);
        }
        out
    }

    /// Frames a client sends for [`super::http2`]: requests (some over
    /// CONTINUATION), their bodies over DATA frames, window updates,
    /// pings, resets and settings, after a piece size.
    pub fn client_frames(rng: &mut StdRng) -> Vec<u8> {
        use crate::http2::frame::{self, code, flag, kind, setting};
        use crate::http2::hpack::encode_field;
        let mut out = vec![rng.random_range(1..=255u8)];
        let mut stream = 1u32;
        for _ in 0..rng.random_range(1..8) {
            match rng.random_range(0..6) {
                0 | 1 => {
                    let mut block = Vec::new();
                    for (n, v) in [
                        (&b":method"[..], &b"POST"[..]),
                        (b":scheme", b"http"),
                        (b":path", b"/freshd.v1.Coordinator/Check"),
                        (b"content-type", b"application/grpc"),
                        (b"te", b"trailers"),
                    ] {
                        encode_field(n, v, &mut block);
                    }
                    if rng.random_bool(0.3) && block.len() > 4 {
                        let (a, b) = block.split_at(block.len() / 2);
                        frame::put_head(&mut out, a.len(), kind::HEADERS, 0, stream);
                        out.extend_from_slice(a);
                        frame::put_head(
                            &mut out,
                            b.len(),
                            kind::CONTINUATION,
                            flag::END_HEADERS,
                            stream,
                        );
                        out.extend_from_slice(b);
                    } else {
                        frame::put_headers(&mut out, stream, &block, false, 16_384);
                    }
                    for _ in 0..rng.random_range(0..3) {
                        let body = bytes(rng, 40);
                        frame::put_data(&mut out, stream, &body, false);
                    }
                    frame::put_data(&mut out, stream, b"", rng.random_bool(0.9));
                    stream += 2;
                }
                2 => frame::put_window_update(
                    &mut out,
                    rng.random_range(0..stream),
                    rng.random_range(1..70_000),
                ),
                3 => frame::put_ping(&mut out, rng.random(), false),
                4 => frame::put_rst_stream(&mut out, stream.saturating_sub(2).max(1), code::CANCEL),
                _ => frame::put_settings(
                    &mut out,
                    &[(setting::INITIAL_WINDOW_SIZE, rng.random_range(0..100_000))],
                    false,
                ),
            }
        }
        out
    }

    /// A generated valid input for the target `name`.
    pub fn valid(rng: &mut StdRng, name: &str) -> Vec<u8> {
        match name {
            "request" => requests(rng),
            "log_segment" => log_segment(rng),
            "snapshot" => snapshot(rng),
            "hpack" => header_blocks(rng),
            "http2" => client_frames(rng),
            other => panic!("no target {other:?}"),
        }
    }

    /// The checked-in seed corpus of the target `name`: a handful of small
    /// valid inputs from a fixed seed.
    pub fn seeds(name: &str) -> Vec<Vec<u8>> {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let mut seeds: Vec<Vec<u8>> = (0..6).map(|_| valid(&mut rng, name)).collect();
        if name == "request" {
            // One request of every kind, too.
            for kind in 0..REQUEST_KINDS.len() {
                let mut input = Vec::new();
                frame_request(kind, &request_message(&mut rng, kind), &mut input);
                seeds.push(input);
            }
        }
        seeds
    }
}
