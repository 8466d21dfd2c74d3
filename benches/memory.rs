//! Memory per key and per dependency edge: freshd's store against Redis, in
//! the same run. Prints markdown tables.
//!
//! # Shape
//! [`FEED`] = 1M cached keys `feed:user:N` and [`ENTITIES`] = 250k entity
//! keys `posts:author:M`. In the graph phases every feed key depends on
//! [`DEPS`] = 4 distinct entities picked by a fixed hash of N (splitmix64),
//! so there are 4M edges and an entity has about 16 dependents (Poisson).
//! Keys are counted as nodes: 1.25M in every phase.
//!
//! # freshd
//! A counting global allocator (wrapping `System`) tracks live bytes; a
//! phase's figure is live bytes with the store built minus live bytes before
//! it (fill specs are dropped as they go, so only the store is left). It
//! reports the bytes asked for, and an estimate of what glibc malloc takes
//! for them (16-byte-aligned chunks with an 8-byte header, 32 at least;
//! page-rounded mmap for 128 KiB and up), comparable to Redis's
//! `used_memory`, which counts jemalloc's size classes.
//! - A, keys only: the 250k entity keys, then the 1M feed keys, all
//!   registered with `Store::fill` and no dependencies. Per key = A / 1.25M.
//! - B, keys and edges: the same, with each feed key's 4 dependencies.
//!   Per edge = (B - A) / 4M. freshd keeps every edge both ways (sorted
//!   forward slice on the dependent, reverse sorted vector on the
//!   dependency, a hash set past 64 dependents).
//! - C, natural: only the 1M feed keys are filled, with their dependencies;
//!   the entities exist as dependency-only nodes. Reported per feed key.
//!
//! # Redis
//! One `redis-server` (`--save '' --appendonly no`), emptied with `FLUSHALL`
//! between phases, loaded over one pipelined connection; figures are
//! `used_memory` of `INFO memory` after the load minus before it, once
//! the keyspace dictionaries have finished rehashing (see
//! `settled_used_memory`).
//! - `SET key version` for the 1.25M keys, then `SET key version EX 86400`
//!   (freshd's registrations all have a TTL, as these do).
//! - Reverse edges, on top of the `SET ... EX` keys: one set per entity,
//!   `SADD dependents:posts:author:M feed:user:N ...`, the natural Redis
//!   dependency index. Per edge = delta / 4M.
//! - Forward edges too, on top of that: `RPUSH deps:feed:user:N <4 entities>`
//!   (a listpack), which a design needs to drop old edges on a re-fill, as
//!   freshd does. Per edge = delta of both / 4M.
//! - Natural: `SET ... EX` for the 1M feed keys and the reverse sets only.
//!
//! Run: `cargo bench --bench memory` (about a minute once built; needs
//! about 2 GB of memory). Exits non-zero when `redis-server` is not
//! installed.

#[path = "support/redis.rs"]
mod redis;

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use freshd::log::MemoryLog;
use freshd::store::{FillSpec, Store, StoreConfig};
use redis::{Pipeline, RedisServer, SyncConn};

/// Cached keys.
const FEED: usize = 1_000_000;
/// Entity keys the cached keys depend on.
const ENTITIES: usize = 250_000;
/// Dependencies per cached key.
const DEPS: usize = 4;
/// Every node, in every phase.
const NODES: usize = FEED + ENTITIES;
/// Edges of the graph phases.
const EDGES: usize = FEED * DEPS;
/// TTL of every registration.
const TTL_MS: u64 = 86_400_000;
/// Commands per pipelined round to Redis.
const PIPELINE_DEPTH: usize = 10_000;

/// Counts live heap bytes: as asked for, and as glibc malloc is estimated to
/// take them.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static LIVE_CHUNKS: AtomicUsize = AtomicUsize::new(0);

/// What glibc malloc takes for `size` bytes (x86_64 and aarch64): chunks of
/// `size` + 8 rounded up to 16, at least 32; from the default mmap threshold
/// of 128 KiB on, a page-rounded mapping with a 16-byte header.
fn glibc_chunk(size: usize) -> usize {
    if size >= 128 << 10 {
        (size + 16 + 4095) & !4095
    } else {
        ((size + 8 + 15) & !15).max(32)
    }
}

fn count_alloc(size: usize) {
    LIVE.fetch_add(size, Ordering::Relaxed);
    LIVE_CHUNKS.fetch_add(glibc_chunk(size), Ordering::Relaxed);
}

fn count_free(size: usize) {
    LIVE.fetch_sub(size, Ordering::Relaxed);
    LIVE_CHUNKS.fetch_sub(glibc_chunk(size), Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; the counters only
// observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count_free(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count_free(layout.size());
            count_alloc(new_size);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Live heap bytes: asked for, and estimated glibc chunks.
fn live() -> (usize, usize) {
    (
        LIVE.load(Ordering::Relaxed),
        LIVE_CHUNKS.load(Ordering::Relaxed),
    )
}

fn feed_key(i: usize) -> String {
    format!("feed:user:{i}")
}

fn entity_key(e: u32) -> String {
    format!("posts:author:{e}")
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The [`DEPS`] distinct entities feed key `i` depends on.
fn deps_of(i: usize) -> [u32; DEPS] {
    let mut out = [0u32; DEPS];
    let mut n = 0;
    let mut x = (i * DEPS) as u64;
    while n < DEPS {
        let e = (splitmix64(x) % ENTITIES as u64) as u32;
        x += 1 << 40; // a different stream on collision
        if !out[..n].contains(&e) {
            out[n] = e;
            n += 1;
        }
    }
    out
}

/// What to put in a store.
#[derive(Clone, Copy)]
struct Shape {
    /// Register the entity keys themselves (else they exist only as
    /// dependency-only nodes, when `edges`).
    entities: bool,
    /// Give every feed key its dependencies.
    edges: bool,
}

/// One freshd phase.
struct Footprint {
    bytes: usize,
    chunks: usize,
    keys: u64,
    edges: u64,
    fills_per_sec: f64,
}

fn measure_freshd(shape: Shape) -> Footprint {
    let before = live();
    let store = Store::new(StoreConfig::default(), Box::new(MemoryLog::new()));
    let fill = |key: String, dependencies: Vec<String>| {
        let spec = FillSpec {
            key,
            dependencies,
            ttl_ms: TTL_MS,
            observed_seq: store.seq(),
        };
        store.fill(&spec).expect("fill");
    };
    let start = Instant::now();
    let mut fills = 0;
    if shape.entities {
        for e in 0..ENTITIES as u32 {
            fill(entity_key(e), Vec::new());
            fills += 1;
        }
    }
    for i in 0..FEED {
        let dependencies = if shape.edges {
            let mut deps: Vec<String> = deps_of(i).into_iter().map(entity_key).collect();
            deps.sort_unstable();
            deps
        } else {
            Vec::new()
        };
        fill(feed_key(i), dependencies);
        fills += 1;
    }
    let elapsed = start.elapsed();
    let after = live();
    let stats = store.stats();
    drop(store);
    Footprint {
        bytes: after.0 - before.0,
        chunks: after.1 - before.1,
        keys: stats.keys,
        edges: stats.edges,
        fills_per_sec: fills as f64 / elapsed.as_secs_f64(),
    }
}

/// `used_memory` once the keyspace dictionaries have finished rehashing.
///
/// Redis grows a dictionary by allocating the bigger table and moving
/// buckets over incrementally; until the move ends both tables are held.
/// Idle, it moves buckets for 1 ms every 100 ms (about a minute for a
/// table of 2M buckets on this machine); every command that looks up a key
/// also moves one. So, as ordinary traffic would, this sends pipelined
/// `EXISTS feed:user:0` until `DEBUG HTSTATS 0` lists no "rehashing target".
fn settled_used_memory(conn: &mut SyncConn) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rehashing = match conn.command(&[b"DEBUG", b"HTSTATS", b"0"]) {
            Ok(redis::Reply::Bulk(Some(text))) => {
                String::from_utf8_lossy(&text).contains("rehashing target")
            }
            _ => false,
        };
        if !rehashing {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "redis still rehashing after 120 s"
        );
        let mut p = Pipeline::new(conn, PIPELINE_DEPTH);
        for _ in 0..100_000 {
            p.push(&[b"EXISTS", b"feed:user:0"]).expect("EXISTS");
        }
        p.flush().expect("EXISTS");
    }
    conn.info_field("memory", "used_memory")
        .expect("INFO memory")
}

fn flushall(conn: &mut SyncConn) -> u64 {
    conn.command(&[b"FLUSHALL", b"SYNC"]).expect("FLUSHALL");
    settled_used_memory(conn)
}

/// `SET key version [EX 86400]` for `keys`.
fn load_strings(conn: &mut SyncConn, keys: impl Iterator<Item = String>, ttl: bool) {
    let mut p = Pipeline::new(conn, PIPELINE_DEPTH);
    for (n, key) in keys.enumerate() {
        let version = (n + 1).to_string();
        if ttl {
            p.push(&[b"SET", key.as_bytes(), version.as_bytes(), b"EX", b"86400"])
        } else {
            p.push(&[b"SET", key.as_bytes(), version.as_bytes()])
        }
        .expect("SET");
    }
    p.flush().expect("SET");
}

fn all_keys() -> impl Iterator<Item = String> {
    (0..ENTITIES as u32)
        .map(entity_key)
        .chain((0..FEED).map(feed_key))
}

/// Feed keys by entity: the reverse edges.
fn dependents() -> Vec<Vec<u32>> {
    let mut by_entity = vec![Vec::new(); ENTITIES];
    for i in 0..FEED {
        for e in deps_of(i) {
            by_entity[e as usize].push(i as u32);
        }
    }
    by_entity
}

/// `SADD dependents:<entity> <feed keys>` for every entity.
fn load_reverse(conn: &mut SyncConn, dependents: &[Vec<u32>]) {
    let mut p = Pipeline::new(conn, PIPELINE_DEPTH / 10);
    for (e, feed) in dependents.iter().enumerate() {
        if feed.is_empty() {
            continue;
        }
        let set = format!("dependents:{}", entity_key(e as u32));
        let members: Vec<String> = feed.iter().map(|&i| feed_key(i as usize)).collect();
        let mut args: Vec<&[u8]> = vec![b"SADD", set.as_bytes()];
        args.extend(members.iter().map(|m| m.as_bytes()));
        p.push(&args).expect("SADD");
    }
    p.flush().expect("SADD");
}

/// `RPUSH deps:<feed key> <entities>` for every feed key.
fn load_forward(conn: &mut SyncConn) {
    let mut p = Pipeline::new(conn, PIPELINE_DEPTH);
    for i in 0..FEED {
        let list = format!("deps:{}", feed_key(i));
        let deps: Vec<String> = deps_of(i).into_iter().map(entity_key).collect();
        let mut args: Vec<&[u8]> = vec![b"RPUSH", list.as_bytes()];
        args.extend(deps.iter().map(|d| d.as_bytes()));
        p.push(&args).expect("RPUSH");
    }
    p.flush().expect("RPUSH");
}

/// The Redis phases' `used_memory` deltas, bytes.
struct RedisFootprint {
    keys: u64,
    keys_ex: u64,
    reverse: u64,
    forward: u64,
    natural: u64,
    keys_loaded_per_sec: f64,
}

fn measure_redis(port: u16) -> RedisFootprint {
    let mut conn = SyncConn::connect(redis::local(port)).expect("connect to redis");
    let dependents = dependents();

    let base = flushall(&mut conn);
    let start = Instant::now();
    load_strings(&mut conn, all_keys(), false);
    let keys_loaded_per_sec = NODES as f64 / start.elapsed().as_secs_f64();
    let keys = settled_used_memory(&mut conn) - base;

    let base = flushall(&mut conn);
    load_strings(&mut conn, all_keys(), true);
    let with_keys = settled_used_memory(&mut conn);
    load_reverse(&mut conn, &dependents);
    let with_reverse = settled_used_memory(&mut conn);
    load_forward(&mut conn);
    let with_forward = settled_used_memory(&mut conn);

    let natural_base = flushall(&mut conn);
    load_strings(&mut conn, (0..FEED).map(feed_key), true);
    load_reverse(&mut conn, &dependents);
    let natural = settled_used_memory(&mut conn) - natural_base;
    flushall(&mut conn);

    RedisFootprint {
        keys,
        keys_ex: with_keys - base,
        reverse: with_reverse - with_keys,
        forward: with_forward - with_reverse,
        natural,
        keys_loaded_per_sec,
    }
}

fn per(bytes: impl TryInto<u64>, n: usize) -> f64 {
    bytes.try_into().unwrap_or(0) as f64 / n as f64
}

fn mib(bytes: impl TryInto<u64>) -> f64 {
    bytes.try_into().unwrap_or(0) as f64 / (1 << 20) as f64
}

fn main() -> ExitCode {
    let redis = match RedisServer::start_with(&["--enable-debug-command", "local"]) {
        Ok(r) => r,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{} cached keys + {} entity keys = {} nodes; {} edges ({} per cached key); {}\n",
        FEED,
        ENTITIES,
        NODES,
        EDGES,
        DEPS,
        RedisServer::version()
    );

    let a = measure_freshd(Shape {
        entities: true,
        edges: false,
    });
    eprintln!(
        "freshd A: {} keys, {} edges, {:.1} MiB",
        a.keys,
        a.edges,
        mib(a.bytes)
    );
    let b = measure_freshd(Shape {
        entities: true,
        edges: true,
    });
    eprintln!(
        "freshd B: {} keys, {} edges, {:.1} MiB",
        b.keys,
        b.edges,
        mib(b.bytes)
    );
    let c = measure_freshd(Shape {
        entities: false,
        edges: true,
    });
    eprintln!(
        "freshd C: {} keys, {} edges, {:.1} MiB",
        c.keys,
        c.edges,
        mib(c.bytes)
    );
    assert_eq!((a.keys, a.edges), (NODES as u64, 0));
    assert_eq!((b.keys, b.edges), (NODES as u64, EDGES as u64));
    assert_eq!((c.keys, c.edges), (NODES as u64, EDGES as u64));

    let r = measure_redis(redis.port);
    eprintln!(
        "redis: keys {:.1} MiB, keys EX {:.1} MiB, reverse {:.1} MiB, forward {:.1} MiB, natural {:.1} MiB",
        mib(r.keys),
        mib(r.keys_ex),
        mib(r.reverse),
        mib(r.forward),
        mib(r.natural)
    );

    let key_bytes = per(a.bytes, NODES);
    let key_chunks = per(a.chunks, NODES);
    let edge_bytes = per(b.bytes - a.bytes, EDGES);
    let edge_chunks = per(b.chunks - a.chunks, EDGES);
    let redis_key = per(r.keys, NODES);
    let redis_key_ex = per(r.keys_ex, NODES);
    let redis_reverse = per(r.reverse, EDGES);
    let redis_both = per(r.reverse + r.forward, EDGES);

    println!("Bytes per key (1.25M nodes, no edges)\n");
    println!("| | freshd (asked) | freshd (est. malloc) | redis SET | redis SET EX | ratio est./SET EX |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| per key | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
        key_bytes,
        key_chunks,
        redis_key,
        redis_key_ex,
        key_chunks / redis_key_ex
    );
    println!("\nBytes per edge (4M edges; freshd keeps both directions)\n");
    println!(
        "| | freshd (asked) | freshd (est. malloc) | redis reverse SADD | redis reverse SADD + forward RPUSH | ratio est./reverse | ratio est./both |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| per edge | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
        edge_bytes,
        edge_chunks,
        redis_reverse,
        redis_both,
        edge_chunks / redis_reverse,
        edge_chunks / redis_both
    );
    println!(
        "\nNatural shape: 1M cached keys with 4 dependencies each, entities only as dependencies\n"
    );
    println!("| | freshd (asked) | freshd (est. malloc) | redis SET EX + reverse SADD | ratio est./redis |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| total MiB | {:.1} | {:.1} | {:.1} | {:.2} |",
        mib(c.bytes),
        mib(c.chunks),
        mib(r.natural),
        c.chunks as f64 / r.natural as f64
    );
    println!(
        "| bytes per cached key | {:.1} | {:.1} | {:.1} | {:.2} |",
        per(c.bytes, FEED),
        per(c.chunks, FEED),
        per(r.natural, FEED),
        c.chunks as f64 / r.natural as f64
    );
    println!("\nTotals, MiB\n");
    println!("| phase | freshd (asked) | freshd (est. malloc) | redis |");
    println!("|---|---:|---:|---:|");
    println!(
        "| keys only (redis: SET EX) | {:.1} | {:.1} | {:.1} |",
        mib(a.bytes),
        mib(a.chunks),
        mib(r.keys_ex)
    );
    println!(
        "| keys + edges (redis: SET EX + reverse SADD + forward RPUSH) | {:.1} | {:.1} | {:.1} |",
        mib(b.bytes),
        mib(b.chunks),
        mib(r.keys_ex + r.reverse + r.forward)
    );
    println!(
        "\nLoad rate (not comparable: in-process single-thread fills vs one pipelined connection): \
         freshd {:.0} fills/s (A), {:.0} fills/s (B); redis {:.0} SET/s",
        a.fills_per_sec, b.fills_per_sec, r.keys_loaded_per_sec
    );
    drop(redis);
    ExitCode::SUCCESS
}
