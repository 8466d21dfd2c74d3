//! A histogram that takes many observations under one lock.
//!
//! prometheus-client's `Histogram` takes its lock once per observation. The
//! hot paths observe in bulk: a `CheckBatch` of 1,000 keys records 1,000
//! hit ages (one lock each was a tenth of such a batch's server time), and a
//! fan-out records one enqueue delay per stream a notice reaches, all the
//! same value. [`BatchHistogram::observe_n`] records one value seen `n`
//! times, and a [`Tally`] gathers a run of values on the caller's stack for
//! [`BatchHistogram::add`] to record at once. Both are exposed exactly as
//! prometheus-client's classic histogram would expose the same
//! observations.

use std::sync::Arc;

use parking_lot::Mutex;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Most finite bucket bounds a [`BatchHistogram`] has.
pub const MAX_BOUNDS: usize = 15;

/// A classic Prometheus histogram with fixed bounds, recorded in bulk.
#[derive(Clone, Debug)]
pub struct BatchHistogram {
    bounds: &'static [f64],
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    sum: f64,
    count: u64,
    /// One count per bound, then the `+Inf` bucket's; not cumulative.
    counts: [u64; MAX_BOUNDS + 1],
}

/// Observations gathered for one [`BatchHistogram`] (or any with the same
/// bounds), recorded by [`BatchHistogram::add`].
#[derive(Clone, Debug, Default)]
pub struct Tally {
    sum: f64,
    count: u64,
    counts: [u64; MAX_BOUNDS + 1],
    /// The last value tallied (its bits) and its bucket: a run of writes
    /// mostly tallies one delay over and over, found once.
    last: Option<(u64, usize)>,
}

/// The bucket of `v` among `bounds` (ascending): the first bound at or above
/// it, else `+Inf` (as NaN goes, like prometheus-client's). Counting the
/// bounds below `v` compiles to a few vector compares with no branch to
/// mispredict, which a search over a dozen bounds does not.
fn bucket(bounds: &[f64], v: f64) -> usize {
    if v.is_nan() {
        return bounds.len();
    }
    bounds.iter().filter(|&&upper| upper < v).count()
}

impl BatchHistogram {
    /// A histogram with the finite, ascending upper `bounds` (at most
    /// `MAX_BOUNDS`) and `+Inf`.
    pub fn new(bounds: &'static [f64]) -> Self {
        assert!(bounds.len() <= MAX_BOUNDS, "too many histogram bounds");
        assert!(
            bounds.windows(2).all(|w| w[0] < w[1]) && bounds.iter().all(|b| b.is_finite()),
            "histogram bounds must be finite and ascending"
        );
        BatchHistogram {
            bounds,
            state: Arc::new(Mutex::new(State {
                sum: 0.0,
                count: 0,
                counts: [0; MAX_BOUNDS + 1],
            })),
        }
    }

    /// Whether `other` is this histogram (a clone of it), not just one with
    /// the same bounds.
    pub fn same(&self, other: &BatchHistogram) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }

    /// Records `v` once.
    pub fn observe(&self, v: f64) {
        self.observe_n(v, 1);
    }

    /// Records `v` seen `n` times.
    pub fn observe_n(&self, v: f64, n: u64) {
        if n == 0 {
            return;
        }
        let i = bucket(self.bounds, v);
        let mut state = self.state.lock();
        state.sum += v * n as f64;
        state.count += n;
        state.counts[i] += n;
    }

    /// Adds `v` to `tally`, to be recorded later with [`Self::add`].
    pub fn tally(&self, tally: &mut Tally, v: f64) {
        let bits = v.to_bits();
        let i = match tally.last {
            Some((last, i)) if last == bits => i,
            _ => {
                let i = bucket(self.bounds, v);
                tally.last = Some((bits, i));
                i
            }
        };
        tally.sum += v;
        tally.count += 1;
        tally.counts[i] += 1;
    }

    /// Records what `tally` gathered, and empties it.
    pub fn add(&self, tally: &mut Tally) {
        if tally.count == 0 {
            return;
        }
        {
            let mut state = self.state.lock();
            state.sum += tally.sum;
            state.count += tally.count;
            for (total, n) in state.counts.iter_mut().zip(tally.counts) {
                *total += n;
            }
        }
        *tally = Tally::default();
    }
}

impl TypedMetric for BatchHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for BatchHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, counts) = {
            let state = self.state.lock();
            (state.sum, state.count, state.counts)
        };
        let mut buckets = [(0.0, 0); MAX_BOUNDS + 1];
        for (i, upper) in self.bounds.iter().chain([&f64::INFINITY]).enumerate() {
            buckets[i] = (*upper, counts[i]);
        }
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets[..=self.bounds.len()], None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    const BOUNDS: &[f64] = &[0.001, 0.01, 0.1, 1.0, 10.0];

    fn text(
        metric: impl EncodeMetric + TypedMetric + Send + Sync + std::fmt::Debug + 'static,
    ) -> String {
        let mut registry = Registry::default();
        registry.register("h", "help", metric);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        out
    }

    /// The exposition's lines, with `h_sum` apart (summing `v` n times and
    /// multiplying it by n may round differently).
    fn lines(text: &str) -> (Vec<&str>, f64) {
        let mut sum = f64::NAN;
        let mut rest = Vec::new();
        for line in text.lines() {
            match line.strip_prefix("h_sum ") {
                Some(v) => sum = v.parse().unwrap(),
                None => rest.push(line),
            }
        }
        (rest, sum)
    }

    /// Every way of recording exposes what prometheus-client's histogram
    /// exposes for the same observations, bucket edges and `+Inf`
    /// included.
    #[test]
    fn exposes_what_the_stock_histogram_does() {
        let values = [
            0.0005, 0.001, 0.002, 0.01, 0.1, 0.5, 1.0, 9.99, 10.0, 10.5, 1e9,
        ];
        let stock = Histogram::new(BOUNDS.iter().copied());
        let one_by_one = BatchHistogram::new(BOUNDS);
        let in_bulk = BatchHistogram::new(BOUNDS);
        let tallied = BatchHistogram::new(BOUNDS);
        let mut tally = Tally::default();
        for (i, &v) in values.iter().enumerate() {
            let n = i as u64 % 3 + 1;
            for _ in 0..n {
                stock.observe(v);
                one_by_one.observe(v);
                tallied.tally(&mut tally, v);
            }
            in_bulk.observe_n(v, n);
        }
        in_bulk.observe_n(0.5, 0);
        tallied.add(&mut tally);
        // An emptied tally adds nothing.
        tallied.add(&mut tally);
        let expected = text(stock);
        let (want, want_sum) = lines(&expected);
        assert!(want.contains(&"h_count 21"), "{expected}");
        assert!(want.contains(&"h_bucket{le=\"0.001\"} 3"), "{expected}");
        assert!(want.contains(&"h_bucket{le=\"+Inf\"} 21"), "{expected}");
        for ours in [one_by_one, in_bulk, tallied] {
            let got = text(ours);
            let (got, got_sum) = lines(&got);
            assert_eq!(got, want);
            assert!(
                (got_sum - want_sum).abs() <= want_sum * 1e-12,
                "{got_sum} {want_sum}"
            );
        }
    }

    #[test]
    fn infinity_and_nan_count_in_the_last_bucket() {
        for v in [f64::INFINITY, f64::NAN] {
            let stock = Histogram::new(BOUNDS.iter().copied());
            let ours = BatchHistogram::new(BOUNDS);
            stock.observe(v);
            ours.observe(v);
            let (ours, stock) = (text(ours), text(stock));
            assert!(stock.contains("h_bucket{le=\"+Inf\"} 1"), "{stock}");
            assert_eq!(ours, stock);
        }
    }

    #[test]
    #[should_panic(expected = "ascending")]
    fn bounds_must_ascend() {
        BatchHistogram::new(&[1.0, 0.5]);
    }
}
