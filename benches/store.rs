//! In-process benchmarks of [`freshd::store::Store`], the state behind every
//! RPC, with no gRPC, network or async runtime in the way.
//!
//! Every store is `Store::new(StoreConfig::default(), MemoryLog)`: 64 shards
//! and the memory-only log, as the embedded default serves. Keys are
//! registered with `Store::fill` (TTL one hour, `observed_seq` = the store's
//! current seq).
//!
//! - `check/*`: one `Store::check` that answers FRESH, in a store of 100k
//!   registered keys (`feed:user:N`, each depending on two
//!   `posts:author:M` of 10k). `hit_one_key` asks for the same key every
//!   time (hot in cache); `hit_random_key` cycles through 4,096 random keys.
//! - `check_batch/{64,1000}`: one `Store::check_batch` of 64 or 1,000 random
//!   distinct keys of the same store, all FRESH; throughput in keys.
//! - `publish/*`: one `Store::publish` of one change (not critical, no
//!   external version) in a store of the same 100k keys plus:
//!   `no_dependents` publishes a registered key nothing depends on (1 key
//!   bumped); `10_dependents` a key with 10 dependents (11 bumped);
//!   `fanout_10000` a key with 10,000 dependents (10,001 bumped, throughput
//!   in keys bumped). No Watch stream has subscribed yet, so no notice is
//!   built.
//! - `publish_watched/*`: the same three publishes once one Watch stream
//!   (`Store::subscribe`) tracks the three published keys: each publish now
//!   also builds a notice per bumped key, appends them to the resume history
//!   (full after a few fan-outs: 100k notices, so each publish also evicts
//!   as many old ones) and queues the published key's notice for the stream.
//! - `fill/*`: one `Store::fill` of a key with 4 dependencies on existing
//!   `posts:author:M` nodes: `new_key_4_deps` registers a key not seen
//!   before (each sample starts from a fresh store of the 10k author keys);
//!   `refresh_4_deps` fills the same key with the same dependencies again
//!   (the TTL-refresh path: the version does not change);
//!   `change_4_deps` fills the same key alternately with two disjoint sets
//!   of 4 dependencies (drops 4 reverse edges, adds 4, bumps the version).
//!
//! - `auth/*`: what a server with tokens adds to each request, in-process:
//!   `authenticate` reads `authorization: Bearer <token>` from the metadata,
//!   hashes the token (SHA-256) and finds its principal among 100;
//!   `scope_check` is one `Principal::require_key` against scopes in 10
//!   namespaces.
//!
//! Run: `cargo bench --bench store` (about one minute once built);
//! `-- --quick` for a faster, rougher pass.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use freshd::log::MemoryLog;
use freshd::store::{FillSpec, Freshness, PublishChange, Store, StoreConfig};
use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::SeedableRng;

/// Registered feed keys of the check and publish stores.
const KEYS: usize = 100_000;
/// `posts:author:M` keys the feed keys depend on.
const AUTHORS: usize = 10_000;
/// TTL of every fill: far longer than any bench.
const TTL_MS: u64 = 3_600_000;

fn new_store() -> Store {
    Store::new(StoreConfig::default(), Box::new(MemoryLog::new()))
}

fn feed_key(i: usize) -> String {
    format!("feed:user:{i}")
}

fn author_key(i: usize) -> String {
    format!("posts:author:{i}")
}

/// Registers `key` with `deps` (any order); returns its version.
fn fill(store: &Store, key: String, mut deps: Vec<String>) -> u64 {
    deps.sort_unstable();
    deps.dedup();
    let spec = FillSpec {
        key,
        dependencies: deps,
        ttl_ms: TTL_MS,
        observed_seq: store.seq(),
    };
    store.fill(&spec).expect("fill").version
}

/// A store of [`KEYS`] feed keys, each depending on two authors; returns it
/// with every feed key and its version.
fn feed_store() -> (Store, Vec<(String, u64)>) {
    let store = new_store();
    let keys = (0..KEYS)
        .map(|i| {
            let key = feed_key(i);
            let deps = vec![author_key(i % AUTHORS), author_key((i * 7 + 1) % AUTHORS)];
            let version = fill(&store, key.clone(), deps);
            (key, version)
        })
        .collect();
    (store, keys)
}

fn random_items(keys: &[(String, u64)], n: usize, seed: u64) -> Vec<(String, u64)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    sample(&mut rng, keys.len(), n)
        .into_iter()
        .map(|i| keys[i].clone())
        .collect()
}

fn check(c: &mut Criterion) {
    let (store, keys) = feed_store();
    let mut group = c.benchmark_group("check");

    let (key, version) = keys[KEYS / 2].clone();
    assert_eq!(store.check(&key, version, 0).0.freshness, Freshness::Fresh);
    group.bench_function("hit_one_key", |b| {
        b.iter(|| store.check(black_box(&key), black_box(version), 0))
    });

    let items = random_items(&keys, 4096, 1);
    let mut next = 0usize;
    group.bench_function("hit_random_key", |b| {
        b.iter(|| {
            let (key, version) = &items[next & 4095];
            next = next.wrapping_add(1);
            store.check(black_box(key), black_box(*version), 0)
        })
    });
    group.finish();
}

fn check_batch(c: &mut Criterion) {
    let (store, keys) = feed_store();
    let mut group = c.benchmark_group("check_batch");
    for n in [64usize, 1000] {
        let items = random_items(&keys, n, n as u64);
        let (answers, _) = store.check_batch(&items, |(k, v)| (k.as_str(), *v, 0));
        assert!(answers.iter().all(|a| a.freshness == Freshness::Fresh));
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &items, |b, items| {
            b.iter(|| store.check_batch(black_box(items), |(k, v)| (k.as_str(), *v, 0)))
        });
    }
    // The same batch again and again stays in the CPU caches; a server's
    // batches don't. Rotate through batches that cover every key.
    let batches: Vec<Vec<(String, u64)>> = (0..KEYS / 1000)
        .map(|i| random_items(&keys, 1000, 7 + i as u64))
        .collect();
    let mut next = 0usize;
    group.throughput(Throughput::Elements(1000));
    group.bench_function("1000_uncached", |b| {
        b.iter(|| {
            let items = &batches[next % batches.len()];
            next = next.wrapping_add(1);
            store.check_batch(black_box(items), |(k, v)| (k.as_str(), *v, 0))
        })
    });
    group.finish();
}

fn change(key: &str) -> Vec<PublishChange> {
    vec![PublishChange {
        key: key.to_owned(),
        external_version: None,
        critical: false,
        event_time_ms: 0,
    }]
}

fn publish(c: &mut Criterion) {
    let (store, _) = feed_store();
    fill(&store, "posts:author:lonely".into(), vec![]);
    for j in 0..10 {
        fill(
            &store,
            format!("feed:hot:{j}"),
            vec!["posts:author:hot".into()],
        );
    }
    for j in 0..10_000 {
        fill(
            &store,
            format!("feed:viral:{j}"),
            vec!["posts:author:viral".into()],
        );
    }
    let cases = [
        ("no_dependents", "posts:author:lonely", 1u64),
        ("10_dependents", "posts:author:hot", 11),
        ("fanout_10000", "posts:author:viral", 10_001),
    ];

    // No Watch stream has ever subscribed: publishes build no notices.
    publish_cases(c, "publish", &store, &cases);

    // One Watch stream that tracks the three published keys (not their
    // dependents): from now on every publish builds a notice per bumped key,
    // keeps it in the history and routes it; one notice per publish reaches
    // the stream's queue, where it replaces the previous one for the same
    // key (conflation), so the queue never fills although nobody drains it.
    let tracked: Vec<String> = cases.iter().map(|(_, key, _)| key.to_string()).collect();
    let (_subscriber, _) = store
        .subscribe("c", false, None, &tracked, &[], None)
        .expect("subscribe");
    publish_cases(c, "publish_watched", &store, &cases);
}

/// One bench per case: a publish of its key, which bumps `bumped` keys.
fn publish_cases(c: &mut Criterion, group_name: &str, store: &Store, cases: &[(&str, &str, u64)]) {
    let mut group = c.benchmark_group(group_name);
    for &(name, key, bumped) in cases {
        let changes = change(key);
        let outcome = store.publish(&changes).expect("publish");
        assert_eq!(outcome.results[0].invalidated, bumped, "{name}");
        if bumped > 1000 {
            group.sample_size(10);
            group.throughput(Throughput::Elements(bumped));
        }
        group.bench_function(name, |b| {
            b.iter(|| store.publish(black_box(&changes)).expect("publish"))
        });
    }
    group.finish();
}

fn four_authors(i: usize) -> Vec<String> {
    (0..4)
        .map(|k| author_key((i * 4 + k * 2_503) % AUTHORS))
        .collect()
}

fn fill_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("fill");

    // A fresh store per sample, holding only the author keys, so every
    // timed fill registers a key the store has not seen.
    group.bench_function("new_key_4_deps", |b| {
        b.iter_custom(|iters| {
            let store = new_store();
            for a in 0..AUTHORS {
                fill(&store, author_key(a), vec![]);
            }
            let specs: Vec<FillSpec> = (0..iters as usize)
                .map(|i| {
                    let mut dependencies = four_authors(i);
                    dependencies.sort_unstable();
                    FillSpec {
                        key: feed_key(i),
                        dependencies,
                        ttl_ms: TTL_MS,
                        observed_seq: store.seq(),
                    }
                })
                .collect();
            let start = Instant::now();
            for spec in &specs {
                black_box(store.fill(spec).expect("fill"));
            }
            let elapsed = start.elapsed();
            drop((specs, store));
            elapsed
        })
    });

    let (store, _) = feed_store();
    let mut dependencies = four_authors(1);
    dependencies.sort_unstable();
    let spec = FillSpec {
        key: "feed:user:refresh".into(),
        dependencies,
        ttl_ms: TTL_MS,
        observed_seq: store.seq(),
    };
    let version = store.fill(&spec).expect("fill").version;
    assert_eq!(store.fill(&spec).expect("fill").version, version);
    group.bench_function("refresh_4_deps", |b| {
        b.iter(|| store.fill(black_box(&spec)).expect("fill"))
    });

    // Two disjoint dependency sets for one key, used in turn.
    let specs: Vec<FillSpec> = [2usize, 3]
        .into_iter()
        .map(|i| {
            let mut dependencies = four_authors(i);
            dependencies.sort_unstable();
            FillSpec {
                key: "feed:user:change".into(),
                dependencies,
                ttl_ms: TTL_MS,
                observed_seq: store.seq(),
            }
        })
        .collect();
    let mut turn = 0usize;
    group.bench_function("change_4_deps", |b| {
        b.iter(|| {
            turn += 1;
            store.fill(black_box(&specs[turn & 1])).expect("fill")
        })
    });
    group.finish();
}

fn auth(c: &mut Criterion) {
    use freshd::auth::{hash_token, parse_sha256, Auth, AuthConfig, Principal, PrincipalConfig};
    use freshd::auth::{Quotas, Scope, Scopes};
    let mut scopes = Scopes::default();
    scopes.insert(Scope::Check);
    let principals: Vec<PrincipalConfig> = (0..100)
        .map(|i| PrincipalConfig {
            name: format!("service-{i}"),
            token_sha256: parse_sha256(&hash_token(&format!(
                "fd_token_of_service_{i:04}_padded_to_length"
            )))
            .expect("hex"),
            expires: None,
            scopes: (0..10).map(|n| (format!("ns{n}"), scopes)).collect(),
            quotas: Quotas::default(),
        })
        .collect();
    let auth = Auth::new(&AuthConfig {
        principals: principals.clone(),
        ..AuthConfig::default()
    });
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(
        "authorization",
        "Bearer fd_token_of_service_0042_padded_to_length"
            .parse()
            .expect("ascii"),
    );
    let principal = Principal::new(&principals[42]);
    let mut group = c.benchmark_group("auth");
    group.bench_function("authenticate", |b| {
        b.iter(|| black_box(auth.authenticate(black_box(&metadata)).is_ok()))
    });
    group.bench_function("scope_check", |b| {
        b.iter(|| {
            black_box(
                principal
                    .require_key(Scope::Check, black_box("ns7:user:4821"))
                    .is_ok(),
            )
        })
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = check, check_batch, publish, fill_benches, auth
}
criterion_main!(benches);
