//! What a publish's fan-out costs per stream, in-process and without the
//! network: `Hub::fanout` to N parked `Watch` streams, each written by the
//! delivery through its connection's express writer, against a floor that
//! copies one pre-encoded message into each stream's connection buffer, in
//! the same run.
//!
//! The loopback suite (`scripts/bench.sh`) measures the whole path, and on a
//! shared host its noise hides a change of a tenth in the fan-out's cost;
//! this bench isolates that part. The connections here frame into memory
//! (a 9-byte frame head and the 5-byte gRPC prefix before each message, as
//! freshd's HTTP/2 connection does) and "send" by clearing the buffer, so
//! what is measured is the hub's work per stream: routing, the queue's
//! lock and push, the claim, the delivery's drain, its records and the
//! message's encoding (the streams are never acknowledged, as in the
//! suite's notice workload). The floor keeps no state per stream beyond its
//! connection and identifier.
//!
//! Cases: 1,000 streams tracking one key, on 10 connections (100 streams
//! each, as `Watch` streams sharing gRPC channels) and on 1,000; each
//! warm (the same publish over and over, everything in cache) and cold
//! (64 MiB written between publishes, as when a publish comes tens of
//! milliseconds after the last and other work ran meanwhile). Each
//! iteration is one publish; divide by 1,000 for the time per stream.
//!
//! ```sh
//! cargo bench --bench fanout
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use freshd::fanout::{Express, ExpressWriter, Flush, Hub, HubConfig, Notice, StreamWrites, Wrote};
use freshd::metrics::{Metrics, MetricsConfig};
use freshd::store::Key;
use parking_lot::Mutex;

const STREAMS: usize = 1000;
const KEY: &str = "feed:hot";
/// Written between cold publishes: more than the caches hold.
const EVICT: usize = 64 << 20;

/// A connection that frames into memory and "sends" by clearing it.
#[derive(Default)]
struct Memory {
    out: Mutex<BytesMut>,
}

impl Express for Memory {
    fn locked(&self, flush: Flush, writes: &mut dyn FnMut(&mut dyn StreamWrites)) {
        let mut out = self.out.lock();
        writes(&mut Framer { out: &mut out });
        if flush != Flush::Hold {
            std::hint::black_box(out.len());
            out.clear();
        }
    }
}

/// A [`Memory`] connection, locked.
struct Framer<'a> {
    out: &'a mut BytesMut,
}

/// HTTP/2 frame head and gRPC prefix.
const HEADS: usize = 9 + 5;

/// Writes the frame head and gRPC prefix of a `len`-byte message at `at`.
fn put_heads(out: &mut [u8], stream: u32, len: usize) {
    let frame = (len + 5) as u32;
    out[..3].copy_from_slice(&frame.to_be_bytes()[1..]);
    out[3] = 0; // DATA
    out[4] = 0;
    out[5..9].copy_from_slice(&stream.to_be_bytes());
    out[9] = 0;
    out[10..14].copy_from_slice(&(len as u32).to_be_bytes());
}

impl StreamWrites for Framer<'_> {
    fn write(
        &mut self,
        stream: u32,
        max_message: usize,
        next: &mut dyn FnMut(usize, &mut BytesMut) -> bool,
    ) -> Wrote {
        let start = self.out.len();
        self.out.resize(start + HEADS, 0);
        if !next(max_message, self.out) {
            self.out.truncate(start);
            return Wrote::Nothing;
        }
        let len = self.out.len() - start - HEADS;
        put_heads(&mut self.out[start..], stream, len);
        Wrote::Written
    }

    fn warm_output(&mut self, bytes: usize) {
        // As freshd's HTTP/2 connection does.
        let len = self.out.len();
        self.out.resize(len + bytes, 0);
        self.out.truncate(len);
    }
}

/// A hub with `STREAMS` parked streams tracking [`KEY`] on `connections`
/// connections, in the order of their ids round the connections (as
/// streams opened on several channels at once come).
fn hub(connections: usize) -> Hub {
    let metrics = Arc::new(Metrics::new(MetricsConfig::default()));
    // Every fan-out writes its streams with its delivery, as at tens or
    // hundreds of publishes a second (back to back, they would be left to
    // the connections' drivers).
    let config = HubConfig {
        coalesce: Duration::ZERO,
        ..HubConfig::default()
    };
    let hub = Hub::new(config, 0, metrics);
    let conns: Vec<Arc<dyn Express>> = (0..connections)
        .map(|_| Arc::new(Memory::default()) as Arc<dyn Express>)
        .collect();
    for i in 0..STREAMS {
        let (sub, _) = hub
            .subscribe("bench", false, None, &[KEY.to_string()], &[], None)
            .expect("subscribed");
        sub.set_express(ExpressWriter {
            connection: conns[i % connections].clone(),
            stream: 2 * (i / connections) as u32 + 1,
            max_message: 4 << 20,
        });
        assert!(sub.park(), "a new stream parks");
    }
    hub
}

/// One publish of [`KEY`] at `seq`.
fn publish(hub: &Hub, key: &Key, seq: u64) {
    let notice = Notice {
        seq,
        key: key.clone(),
        version: seq,
        cause: key.clone(),
        critical: false,
        event_time_ms: freshd::metrics::unix_ms(),
        origin: None,
        cache: Default::default(),
    };
    // Dropped, the delivery writes every claimed stream.
    drop(hub.fanout(seq, vec![notice]));
}

/// The floor: each stream's connection and identifier, and the message.
struct Floor {
    conns: Vec<Mutex<Vec<u8>>>,
    streams: Vec<(usize, u32)>,
    message: Vec<u8>,
}

impl Floor {
    fn new(connections: usize) -> Self {
        Floor {
            conns: (0..connections).map(|_| Mutex::new(Vec::new())).collect(),
            streams: (0..STREAMS)
                .map(|i| (i % connections, 2 * (i / connections) as u32 + 1))
                .collect(),
            // About a notice's encoding: a batch of one notice of KEY.
            message: vec![7u8; 40],
        }
    }

    /// Copies the message to every stream's connection, a connection's
    /// streams together, then "sends" each connection's buffer.
    fn publish(&self, order: &[usize]) {
        for &i in order {
            let (conn, stream) = self.streams[i];
            let mut out = self.conns[conn].lock();
            let start = out.len();
            out.resize(start + HEADS, 0);
            out.extend_from_slice(&self.message);
            put_heads(&mut out[start..], stream, self.message.len());
        }
        for conn in &self.conns {
            let mut out = conn.lock();
            std::hint::black_box(out.len());
            out.clear();
        }
    }
}

/// Writes every line of `junk`, pushing what a publish touches out of the
/// caches.
fn evict(junk: &mut [u8]) {
    for i in (0..junk.len()).step_by(64) {
        junk[i] = junk[i].wrapping_add(1);
    }
    std::hint::black_box(&junk[..]);
}

/// Times `iters` runs of `run`, evicting the caches before each when
/// `cold`.
fn timed(iters: u64, cold: bool, junk: &mut [u8], mut run: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        if cold {
            evict(junk);
        }
        let start = Instant::now();
        run();
        total += start.elapsed();
    }
    total
}

fn bench(c: &mut Criterion) {
    let mut junk = vec![0u8; EVICT];
    let key = Key::from(KEY);
    for connections in [10, STREAMS] {
        let mut group = c.benchmark_group(format!(
            "publish to {STREAMS} parked streams on {connections} connections"
        ));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        let hub = hub(connections);
        let floor = Floor::new(connections);
        // The floor takes a connection's streams together, as the
        // delivery does after its sort.
        let mut order: Vec<usize> = (0..STREAMS).collect();
        order.sort_by_key(|&i| floor.streams[i].0);
        let mut seq = 0;
        for cold in [false, true] {
            let state = if cold { "cold" } else { "warm" };
            group.bench_function(BenchmarkId::new("freshd Hub::fanout", state), |b| {
                b.iter_custom(|iters| {
                    timed(iters, cold, &mut junk, || {
                        seq += 1;
                        publish(&hub, &key, seq);
                    })
                })
            });
            group.bench_function(BenchmarkId::new("floor (copy a message)", state), |b| {
                b.iter_custom(|iters| timed(iters, cold, &mut junk, || floor.publish(&order)))
            });
        }
        group.finish();
    }
}

/// A stream's record of what it wrote, for acknowledgement delays: a
/// batch written and acknowledged before the next, as a near cache that
/// acks each batch does.
fn ack(c: &mut Criterion) {
    let metrics = Arc::new(Metrics::new(MetricsConfig::default()));
    let hub = Hub::new(HubConfig::default(), 0, metrics);
    let (sub, _) = hub
        .subscribe("bench", false, None, &[KEY.to_string()], &[], None)
        .expect("subscribed");
    let key = Key::from(KEY);
    let notice = Arc::new(Notice {
        seq: 1,
        key: key.clone(),
        version: 1,
        cause: key,
        critical: false,
        event_time_ms: freshd::metrics::unix_ms(),
        origin: None,
        cache: Default::default(),
    });
    let batch = [notice];
    c.bench_function("a stream's batch written, then acknowledged", |b| {
        b.iter(|| {
            sub.sent(&batch);
            sub.ack(1);
        })
    });
}

criterion_group!(benches, bench, ack);
criterion_main!(benches);
