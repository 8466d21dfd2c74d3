//! Latency histograms (HdrHistogram, microseconds, 3 significant digits) and
//! the report every run prints: a human-readable line and a JSON object.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency a histogram records: 60 s; longer values are clamped.
const MAX_US: u64 = 60_000_000;

/// A latency histogram in microseconds.
#[derive(Clone)]
pub struct Latencies {
    hist: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, MAX_US, 3).expect("histogram bounds"),
        }
    }
}

impl Latencies {
    /// Records one latency (clamped to 1 µs .. 60 s).
    pub fn record(&mut self, latency: Duration) {
        self.record_n(latency, 1);
    }

    /// Records `count` equal latencies (clamped to 1 µs .. 60 s).
    pub fn record_n(&mut self, latency: Duration, count: u64) {
        let us = (latency.as_micros() as u64).clamp(1, MAX_US);
        self.hist.record_n(us, count).expect("clamped into bounds");
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Latencies) {
        self.hist.add(&other.hist).expect("same bounds");
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The summary and the CDF series of what was recorded.
    pub fn summary(&self) -> LatencySummary {
        let h = &self.hist;
        let at = |q: f64| h.value_at_quantile(q);
        LatencySummary {
            count: h.len(),
            mean_us: h.mean(),
            min_us: h.min(),
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: h.max(),
            cdf: cdf_quantiles().into_iter().map(|q| (q, at(q))).collect(),
        }
    }
}

/// Quantiles of the CDF series: every 1% to 99%, then every 0.1% to 99.9%,
/// every 0.01% to 99.99%, and 100%.
fn cdf_quantiles() -> Vec<f64> {
    let mut qs: Vec<f64> = (0..100).map(|i| i as f64 / 100.0).collect();
    qs.extend((1..10).map(|i| 0.99 + i as f64 / 1000.0));
    qs.extend((1..10).map(|i| 0.999 + i as f64 / 10_000.0));
    qs.push(1.0);
    qs
}

/// Percentiles of one latency histogram, in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct LatencySummary {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Smallest value.
    pub min_us: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest value.
    pub max_us: u64,
    /// `(quantile, value)` pairs for a CDF plot.
    pub cdf: Vec<(f64, u64)>,
}

/// What one run of one workload against one target measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The workload (`check`, `notice`, `fanout`, `deps`, `memory`).
    pub workload: String,
    /// `freshd`, `redis` or `etcd`.
    pub target: String,
    /// What exactly ran, e.g. `Check`, `MGET 64`, `pipelined GET 64`,
    /// `tracking`, `pubsub`.
    pub variant: String,
    /// `open` (fixed rate, latency from the intended send time) or `closed`
    /// (send, wait, send again; latency from the actual send).
    pub mode: String,
    /// The settings of the run (connections, rate, batch, subscribers...).
    pub params: serde_json::Value,
    /// Seconds measured (after the warm-up).
    pub secs: f64,
    /// Operations completed in the measured window (requests, changes,
    /// notices or rounds, as the workload says).
    pub ops: u64,
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Keys per second (checks: keys checked; notices: notices received).
    pub keys_per_sec: f64,
    /// Failed operations (error answers, wrong answers, lost notices,
    /// requests still unanswered at the end).
    pub errors: u64,
    /// Latency percentiles, when the workload measures latency.
    pub latency: Option<LatencySummary>,
    /// CPU seconds the server process used in the measured window (notice:
    /// from the first counted write until the last notice arrived, with the
    /// window's length in `extra.cpu_window_s`), when its process id was
    /// given.
    pub server_cpu_s: Option<f64>,
    /// CPU seconds this load tool used in the same window, all threads.
    /// Near one core busy (the suite pins it to one), the figures measure
    /// the load generator as much as the server.
    pub load_cpu_s: Option<f64>,
    /// Workload-specific figures (bytes per key, notices expected...).
    pub extra: serde_json::Value,
}

impl Report {
    /// One line for people.
    pub fn human(&self) -> String {
        let mut line = format!(
            "{:<7} {:<7} {:<22} {:<6} ops/s {:>12.1}  keys/s {:>12.1}  errors {}",
            self.workload,
            self.target,
            self.variant,
            self.mode,
            self.ops_per_sec,
            self.keys_per_sec,
            self.errors
        );
        if let Some(l) = &self.latency {
            line.push_str(&format!(
                "  n {}  p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs",
                l.count, l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
            ));
        }
        if let Some(cpu) = self.server_cpu_s {
            line.push_str(&format!(
                "  server cores busy {:.2}, {:.2} µs CPU/op",
                cpu / self.window_s().max(1e-9),
                cpu * 1e6 / self.ops.max(1) as f64
            ));
        }
        if let Some(cpu) = self.load_cpu_s {
            line.push_str(&format!(
                "  load tool cores busy {:.2}",
                cpu / self.window_s().max(1e-9)
            ));
        }
        if !self.extra.is_null() {
            line.push_str(&format!("  {}", self.extra));
        }
        line
    }

    /// The length of the window CPU time was read over.
    fn window_s(&self) -> f64 {
        self.extra["cpu_window_s"].as_f64().unwrap_or(self.secs)
    }

    /// One JSON object, on one line.
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("a report serializes")
    }
}
