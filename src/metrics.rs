//! Metrics: the four freshness figures, and the operations figures, in the
//! Prometheus text format (served by `server::admin` on `/metrics`).
//!
//! The exact definition of every metric is in `docs/metrics.md`.
//!
//! Labels are bounded: at most `max_namespaces` namespaces and
//! `max_endpoints` endpoints get their own label value; the rest fold into
//! `other`. Each server has its own registry, so several servers in one
//! process (tests) keep separate figures.
//!
//! `prometheus-client` (the Prometheus project's Rust client) was chosen over
//! `metrics-exporter-prometheus` because it keeps a registry per server
//! instead of a process-global recorder, and its families are typed label
//! sets, so a metric's labels are checked at compile time.

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hashbrown::HashMap;
use parking_lot::{Mutex, RwLock};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

mod batch;
pub use batch::{BatchHistogram, Tally};

use crate::policy::namespace;
use crate::store::Store;

/// A bounded label value, shared.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Label(Arc<str>);

impl Label {
    /// Whether `other` is this very label (the interner hands out one per
    /// value).
    pub fn same(&self, other: &Label) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

/// Hands out at most `max` distinct label values; the rest are `other`.
struct Interner {
    max: usize,
    known: RwLock<HashMap<Box<str>, Label>>,
    other: Label,
}

impl Interner {
    fn new(max: usize) -> Self {
        Self {
            max,
            known: RwLock::new(HashMap::new()),
            other: Label(Arc::from("other")),
        }
    }

    fn get(&self, name: &str) -> Label {
        if let Some(label) = self.known.read().get(name) {
            return label.clone();
        }
        let mut known = self.known.write();
        if let Some(label) = known.get(name) {
            return label.clone();
        }
        if known.len() >= self.max {
            return self.other.clone();
        }
        let label = Label(Arc::from(name));
        known.insert(name.into(), label.clone());
        label
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HitAgeLabels {
    namespace: Label,
    endpoint: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    namespace: Label,
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabels {
    namespace: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CriticalLabels {
    namespace: Label,
    critical: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DetectedLabels {
    namespace: Label,
    detected_by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RepairedLabels {
    namespace: Label,
    repaired_by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuotaLabels {
    quota: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;
type BatchHistograms<L> = Family<L, BatchHistogram, fn() -> BatchHistogram>;

fn age_buckets() -> BatchHistogram {
    BatchHistogram::new(&[
        0.001, 0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
    ])
}

fn delay_buckets() -> BatchHistogram {
    BatchHistogram::new(&[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

fn latency_buckets() -> Histogram {
    Histogram::new([
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        5.0,
    ])
}

/// Limits on label cardinality.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Whether anything is recorded.
    pub enabled: bool,
    /// Namespaces with their own label value.
    pub max_namespaces: usize,
    /// Endpoints with their own label value.
    pub max_endpoints: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_namespaces: 100,
            max_endpoints: 100,
        }
    }
}

/// Every metric a server records.
pub struct Metrics {
    enabled: bool,
    namespaces: Interner,
    endpoints: Interner,
    registry: Mutex<Registry>,
    hit_age: BatchHistograms<HitAgeLabels>,
    invalidation_delay: BatchHistograms<StageLabels>,
    served_checks: Family<NamespaceLabels, Counter>,
    stale_serves: Family<CriticalLabels, Counter>,
    missed: Family<DetectedLabels, Counter>,
    repaired: Family<RepairedLabels, Counter>,
    rpcs: Family<RpcLabels, Counter>,
    rpc_duration: Histograms<MethodLabels>,
    resets: Family<ReasonLabels, Counter>,
    resumes: Family<OutcomeLabels, Counter>,
    publish_amplification: Histogram,
    log_append: Histogram,
    auth_refusals: Family<ReasonLabels, Counter>,
    quota_refusals: Family<QuotaLabels, Counter>,
    tls_reloads: Family<ResultLabels, Counter>,
    tls_handshake_failures: Counter,
    auth_reloads: Family<ResultLabels, Counter>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

/// Unix ms now.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Metrics {
    /// Metrics as configured.
    pub fn new(config: MetricsConfig) -> Self {
        let metrics = Self {
            enabled: config.enabled,
            namespaces: Interner::new(config.max_namespaces),
            endpoints: Interner::new(config.max_endpoints),
            registry: Mutex::new(Registry::default()),
            hit_age: Family::new_with_constructor(age_buckets),
            invalidation_delay: Family::new_with_constructor(delay_buckets),
            served_checks: Family::default(),
            stale_serves: Family::default(),
            missed: Family::default(),
            repaired: Family::default(),
            rpcs: Family::default(),
            rpc_duration: Family::new_with_constructor(latency_buckets),
            resets: Family::default(),
            resumes: Family::default(),
            publish_amplification: Histogram::new([
                1.0, 2.0, 5.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0,
            ]),
            log_append: latency_buckets(),
            auth_refusals: Family::default(),
            quota_refusals: Family::default(),
            tls_reloads: Family::default(),
            tls_handshake_failures: Counter::default(),
            auth_reloads: Family::default(),
        };
        {
            let mut r = metrics.registry.lock();
            r.register(
                "freshd_hit_age_seconds",
                "Age of the cached copy a client reports with each check of a copy it holds",
                metrics.hit_age.clone(),
            );
            r.register(
                "freshd_invalidation_delay_seconds",
                "Producer event time to notice enqueued, written to the stream, acknowledged",
                metrics.invalidation_delay.clone(),
            );
            r.register(
                "freshd_served_checks",
                "Checks of a copy the client says it already served",
                metrics.served_checks.clone(),
            );
            r.register(
                "freshd_stale_serves",
                "Checks of an already served copy that found it stale, by whether a critical change was missed",
                metrics.stale_serves.clone(),
            );
            r.register(
                "freshd_missed_invalidations",
                "Tracked keys found behind a notice their subscriber should already have applied",
                metrics.missed.clone(),
            );
            r.register(
                "freshd_repairs",
                "Missed invalidations repaired, by the fill or the acknowledgement that followed",
                metrics.repaired.clone(),
            );
            r.register(
                "freshd_rpc_requests",
                "gRPC requests by method and status code",
                metrics.rpcs.clone(),
            );
            r.register(
                "freshd_rpc_duration_seconds",
                "gRPC request handling time by method",
                metrics.rpc_duration.clone(),
            );
            r.register(
                "freshd_watch_resets",
                "Scoped resets sent to Watch streams, by reason",
                metrics.resets.clone(),
            );
            r.register(
                "freshd_watch_resumes",
                "Watch streams started, by resume outcome",
                metrics.resumes.clone(),
            );
            r.register(
                "freshd_publish_invalidated_keys",
                "Keys bumped per published change (fan-out amplification)",
                metrics.publish_amplification.clone(),
            );
            r.register(
                "freshd_log_append_seconds",
                "Time to append one mutation to the log",
                metrics.log_append.clone(),
            );
            r.register(
                "freshd_auth_refusals",
                "Requests refused UNAUTHENTICATED, by reason: missing, malformed, unknown or expired token",
                metrics.auth_refusals.clone(),
            );
            r.register(
                "freshd_quota_refusals",
                "Requests refused RESOURCE_EXHAUSTED by a principal's quota, by quota",
                metrics.quota_refusals.clone(),
            );
            r.register(
                "freshd_tls_reloads",
                "TLS certificate reloads after a file changed, by result: ok or error",
                metrics.tls_reloads.clone(),
            );
            r.register(
                "freshd_auth_reloads",
                "Reloads of the principals after the --config file changed, by result: ok or error",
                metrics.auth_reloads.clone(),
            );
            r.register(
                "freshd_tls_handshake_failures",
                "TLS handshakes that failed or timed out",
                metrics.tls_handshake_failures.clone(),
            );
        }
        metrics
    }

    /// Metrics that record nothing (for comparison benchmarks).
    pub fn disabled() -> Self {
        Self::new(MetricsConfig {
            enabled: false,
            ..MetricsConfig::default()
        })
    }

    /// Whether anything is recorded.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Adds the figures read from a store at each scrape.
    pub fn register_store(&self, store: &Arc<Store>) {
        self.registry
            .lock()
            .register_collector(Box::new(StoreCollector {
                store: Arc::downgrade(store),
            }));
    }

    /// The bounded namespace label of `key`.
    pub fn namespace_label(&self, key: &str) -> Label {
        self.namespaces.get(namespace(key))
    }

    /// A recorder for the checks of one request sent for `endpoint` (empty:
    /// `unnamed`). It resolves the endpoint's label once, and each
    /// namespace's metrics once per run of keys in that namespace: a batch's
    /// keys mostly share one, and each resolution costs two label-set hashes
    /// and lock reads.
    pub fn check_recorder(&self, endpoint: &str) -> CheckRecorder<'_> {
        CheckRecorder {
            metrics: self,
            endpoint: self.enabled.then(|| {
                self.endpoints.get(if endpoint.is_empty() {
                    "unnamed"
                } else {
                    endpoint
                })
            }),
            namespace: String::new(),
            current: None,
        }
    }

    /// The histogram of `namespace`'s invalidation delays at `stage`, to
    /// record many deliveries without a lookup each (fan-out records one
    /// observation per stream a notice reaches); `None` when disabled.
    pub fn delay_histogram(
        &self,
        namespace: &Label,
        stage: &'static str,
    ) -> Option<BatchHistogram> {
        self.enabled.then(|| {
            self.invalidation_delay
                .get_or_create(&StageLabels {
                    namespace: namespace.clone(),
                    stage,
                })
                .clone()
        })
    }

    /// Records the delay from a producer's event time to a stage
    /// (`enqueued`, `written` or `acked`) reached at `now_ms` (both Unix
    /// ms; the caller's one clock read serves several records).
    pub fn invalidation_delay(
        &self,
        namespace: &Label,
        stage: &'static str,
        event_time_ms: u64,
        now_ms: u64,
    ) {
        if !self.enabled {
            return;
        }
        let delay = now_ms.saturating_sub(event_time_ms);
        self.invalidation_delay
            .get_or_create(&StageLabels {
                namespace: namespace.clone(),
                stage,
            })
            .observe(delay as f64 / 1000.0);
    }

    /// Records a missed invalidation of `key`, detected by `check` or
    /// `resume`.
    pub fn missed(&self, key: &str, detected_by: &'static str) {
        if self.enabled {
            self.missed
                .get_or_create(&DetectedLabels {
                    namespace: self.namespace_label(key),
                    detected_by,
                })
                .inc();
        }
    }

    /// Records repairs of missed invalidations by `fill` or `ack`.
    pub fn repaired(&self, namespace: &Label, repaired_by: &'static str, count: u64) {
        if self.enabled {
            self.repaired
                .get_or_create(&RepairedLabels {
                    namespace: namespace.clone(),
                    repaired_by,
                })
                .inc_by(count);
        }
    }

    /// Records one RPC.
    pub fn rpc(&self, method: &'static str, code: tonic::Code, took: Duration) {
        if !self.enabled {
            return;
        }
        self.rpcs
            .get_or_create(&RpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
        self.rpc_duration
            .get_or_create(&MethodLabels { method })
            .observe(took.as_secs_f64());
    }

    /// `method`'s OK count and latency histogram, looked up once, for a
    /// method called on every cache hit: [`RpcRecorder::record`] then
    /// costs no label lookup. The OK series exist from then on, at zero.
    pub fn rpc_recorder(&self, method: &'static str) -> RpcRecorder {
        RpcRecorder {
            method,
            ok: self.enabled.then(|| {
                let count = self
                    .rpcs
                    .get_or_create(&RpcLabels {
                        method,
                        code: code_name(tonic::Code::Ok),
                    })
                    .clone();
                let duration = self
                    .rpc_duration
                    .get_or_create(&MethodLabels { method })
                    .clone();
                (count, duration)
            }),
        }
    }

    /// Records a reset sent to a stream.
    pub fn reset(&self, reason: &'static str) {
        if self.enabled {
            self.resets.get_or_create(&ReasonLabels { reason }).inc();
        }
    }

    /// Records a stream start by outcome: `new`, `from_history`, `repaired`.
    pub fn resume(&self, outcome: &'static str) {
        if self.enabled {
            self.resumes.get_or_create(&OutcomeLabels { outcome }).inc();
        }
    }

    /// Records the keys one published change bumped.
    pub fn publish_amplification(&self, invalidated: u64) {
        if self.enabled {
            self.publish_amplification.observe(invalidated as f64);
        }
    }

    /// Records a request refused UNAUTHENTICATED.
    pub fn auth_refused(&self, reason: &'static str) {
        if self.enabled {
            self.auth_refusals
                .get_or_create(&ReasonLabels { reason })
                .inc();
        }
    }

    /// Records a request refused by a quota.
    pub fn quota_refused(&self, quota: &'static str) {
        if self.enabled {
            self.quota_refusals
                .get_or_create(&QuotaLabels { quota })
                .inc();
        }
    }

    /// Counts a reload of the principals by result (`ok`, `error`).
    pub fn auth_reload(&self, result: &'static str) {
        if self.enabled {
            self.auth_reloads
                .get_or_create(&ResultLabels { result })
                .inc();
        }
    }

    /// Records a TLS reload attempt.
    pub fn tls_reload(&self, result: &'static str) {
        if self.enabled {
            self.tls_reloads
                .get_or_create(&ResultLabels { result })
                .inc();
        }
    }

    /// Records a failed TLS handshake.
    pub fn tls_handshake_failed(&self) {
        if self.enabled {
            self.tls_handshake_failures.inc();
        }
    }

    /// Records one log append.
    pub fn log_append(&self, took: Duration) {
        if self.enabled {
            self.log_append.observe(took.as_secs_f64());
        }
    }

    /// The whole scrape, in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut open_metrics = String::new();
        {
            let registry = self.registry.lock();
            // Writing to a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut open_metrics, &registry);
        }
        to_prometheus_text(&open_metrics)
    }
}

/// Rewrites prometheus-client's OpenMetrics text as the classic Prometheus
/// text format, which every scraper and `promtool check metrics` read: a
/// counter's `# HELP` and `# TYPE` name its `_total` series, and the
/// OpenMetrics-only `# UNIT` and `# EOF` lines go.
fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let name = rest.split(' ').next().unwrap_or("");
                if counters.contains(name) {
                    out.push_str(prefix);
                    out.push_str(name);
                    out.push_str("_total");
                    out.push_str(&rest[name.len()..]);
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The gRPC name of a status code, as Prometheus label values go.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The metrics of one namespace that every check records.
struct CheckHandles {
    namespace: Label,
    hit_age: BatchHistogram,
    /// Hit ages not yet added to `hit_age`: a batch's run of checks in one
    /// namespace takes its lock once.
    ages: Tally,
    served: Counter,
}

/// One method's RPC figures, with its OK series looked up once
/// ([`Metrics::rpc_recorder`]).
#[derive(Clone)]
pub struct RpcRecorder {
    method: &'static str,
    /// The OK count and the latency histogram; `None` when disabled.
    ok: Option<(Counter, Histogram)>,
}

impl RpcRecorder {
    /// Records one call of the method, answered with `code` after `took`.
    pub fn record(&self, metrics: &Metrics, code: tonic::Code, took: Duration) {
        match &self.ok {
            Some((count, duration)) if code == tonic::Code::Ok => {
                count.inc();
                duration.observe(took.as_secs_f64());
            }
            _ => metrics.rpc(self.method, code, took),
        }
    }
}

/// Records the checks of one request; see [`Metrics::check_recorder`].
pub struct CheckRecorder<'m> {
    metrics: &'m Metrics,
    /// `None` when metrics are disabled.
    endpoint: Option<Label>,
    /// The namespace `current` belongs to.
    namespace: String,
    current: Option<CheckHandles>,
}

impl CheckRecorder<'_> {
    /// Records one check of a copy of a key in `ns` (its namespace, as
    /// [`namespace`] gives it): its age, and whether it had been served and
    /// was stale (`critical`: after a critical change). A check at version 0
    /// (a miss, noting the seq) has no copy and records nothing.
    pub fn record(
        &mut self,
        ns: &str,
        version: u64,
        age_ms: u64,
        served: bool,
        stale: bool,
        critical: bool,
    ) {
        let Some(endpoint) = &self.endpoint else {
            return;
        };
        if version == 0 {
            return;
        }
        let metrics = self.metrics;
        if self.current.is_none() || self.namespace != ns {
            if let Some(old) = &mut self.current {
                old.flush();
            }
            let namespace = metrics.namespaces.get(ns);
            let hit_age = metrics
                .hit_age
                .get_or_create(&HitAgeLabels {
                    namespace: namespace.clone(),
                    endpoint: endpoint.clone(),
                })
                .clone();
            let served = metrics
                .served_checks
                .get_or_create(&NamespaceLabels {
                    namespace: namespace.clone(),
                })
                .clone();
            self.namespace.clear();
            self.namespace.push_str(ns);
            self.current = Some(CheckHandles {
                namespace,
                hit_age,
                ages: Tally::default(),
                served,
            });
        }
        let Some(handles) = &mut self.current else {
            return;
        };
        handles
            .hit_age
            .tally(&mut handles.ages, age_ms as f64 / 1000.0);
        if served {
            handles.served.inc();
            if stale {
                metrics
                    .stale_serves
                    .get_or_create(&CriticalLabels {
                        namespace: handles.namespace.clone(),
                        critical: if critical { "true" } else { "false" },
                    })
                    .inc();
            }
        }
    }
}

impl CheckHandles {
    /// Records the hit ages gathered so far.
    fn flush(&mut self) {
        self.hit_age.add(&mut self.ages);
    }
}

impl Drop for CheckRecorder<'_> {
    fn drop(&mut self) {
        if let Some(handles) = &mut self.current {
            handles.flush();
        }
    }
}

/// Figures read from the store at each scrape.
#[derive(Debug)]
struct StoreCollector {
    store: Weak<Store>,
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let g = ConstGauge::new(value as i64);
    let m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let c = ConstCounter::new(value);
    let m = encoder.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(store) = self.store.upgrade() else {
            return Ok(());
        };
        let stats = store.stats();
        let hub = store.hub();
        let subs = hub.subscriber_stats();
        let e = &mut encoder;
        gauge(e, "freshd_keys", "Keys held, registered or not", stats.keys)?;
        gauge(e, "freshd_edges", "Dependency edges", stats.edges)?;
        gauge(e, "freshd_seq", "The last applied seq", stats.seq)?;
        gauge(
            e,
            "freshd_subscribers",
            "Open Watch streams",
            subs.len() as u64,
        )?;
        gauge(
            e,
            "freshd_tracked_keys",
            "Keys tracked by all Watch streams",
            subs.iter().map(|s| s.tracked_keys).sum(),
        )?;
        gauge(
            e,
            "freshd_queued_notices",
            "Notices queued for Watch streams, not yet written",
            subs.iter().map(|s| s.queued).sum(),
        )?;
        gauge(
            e,
            "freshd_max_subscriber_lag",
            "The largest gap between the fanned-out seq and a stream's acknowledged seq",
            subs.iter().map(|s| s.lag).max().unwrap_or(0),
        )?;
        let (history, _) = hub.history_stats();
        gauge(
            e,
            "freshd_history_notices",
            "Notices held for resumes",
            history,
        )?;
        gauge(
            e,
            "freshd_leases_held",
            "Fill leases held",
            stats.leases_held,
        )?;
        let (conflations, overflows) = hub.totals();
        counter(
            e,
            "freshd_watch_conflations",
            "Queued notices replaced by a newer notice for the same key",
            conflations,
        )?;
        counter(
            e,
            "freshd_watch_overflows",
            "Times a Watch stream's queue overflowed and it was caught up instead",
            overflows,
        )?;
        counter(
            e,
            "freshd_expired_keys",
            "Keys removed by expiry",
            stats.expired,
        )?;
        counter(
            e,
            "freshd_oversized_publishes",
            "Publishes over max_invalidations_per_publish",
            stats.oversized_publishes,
        )?;
        counter(
            e,
            "freshd_leases_granted",
            "Fill leases granted",
            stats.leases_granted,
        )?;
        counter(
            e,
            "freshd_leases_contended",
            "Lease requests that found a fill in flight",
            stats.leases_contended,
        )?;
        counter(e, "freshd_purges", "Purges applied", stats.purges)?;
        counter(
            e,
            "freshd_purged_keys",
            "Keys affected by purges",
            stats.purged_keys,
        )?;
        Ok(())
    }
}
