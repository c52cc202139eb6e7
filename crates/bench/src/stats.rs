//! Latency statistics of one benchmark phase: an HDR histogram (so memory
//! stays flat whatever `--total` is) plus exact count, sum, sum of squares,
//! fastest and slowest, and the errors by message. Printed the way etcd's
//! `tools/benchmark` prints its report, or as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Slowest latency the histogram tells apart (10 minutes, in µs); slower
/// samples are counted at this value.
const HIGHEST_MICROS: u64 = 600_000_000;
/// Three significant digits: percentiles are within 0.1% of the true value.
const SIGNIFICANT_DIGITS: u8 = 3;
/// etcd's report draws this many equal-width bars, plus one at the slowest.
const HISTOGRAM_BUCKETS: usize = 10;
const BAR_WIDTH: u64 = 40;

/// The percentiles etcd's report lists.
pub const PERCENTILES: [f64; 8] = [10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9];

/// Collects the outcome of requests. Mergeable, so workers can record into
/// a few shards and the shards are added up at the end.
#[derive(Clone, Debug)]
pub struct Recorder {
    histogram: Histogram<u64>,
    count: u64,
    sum: f64,
    sum_squares: f64,
    fastest: Duration,
    slowest: Duration,
    errors: BTreeMap<String, u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            histogram: Histogram::new_with_bounds(1, HIGHEST_MICROS, SIGNIFICANT_DIGITS)
                .expect("constant histogram bounds are valid"),
            count: 0,
            sum: 0.0,
            sum_squares: 0.0,
            fastest: Duration::MAX,
            slowest: Duration::ZERO,
            errors: BTreeMap::new(),
        }
    }

    /// A successful request and how long it took.
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, HIGHEST_MICROS);
        self.histogram.saturating_record(micros);
        let secs = latency.as_secs_f64();
        self.count += 1;
        self.sum += secs;
        self.sum_squares += secs * secs;
        self.fastest = self.fastest.min(latency);
        self.slowest = self.slowest.max(latency);
    }

    /// A failed request, counted by its message.
    pub fn record_error(&mut self, message: impl Into<String>) {
        *self.errors.entry(message.into()).or_default() += 1;
    }

    /// Counts the same error `times` times (events that never arrived).
    pub fn record_errors(&mut self, message: impl Into<String>, times: u64) {
        if times > 0 {
            *self.errors.entry(message.into()).or_default() += times;
        }
    }

    pub fn merge(&mut self, other: &Recorder) {
        self.histogram
            .add(&other.histogram)
            .expect("histograms of the same bounds add up");
        self.count += other.count;
        self.sum += other.sum;
        self.sum_squares += other.sum_squares;
        self.fastest = self.fastest.min(other.fastest);
        self.slowest = self.slowest.max(other.slowest);
        for (message, n) in &other.errors {
            *self.errors.entry(message.clone()).or_default() += n;
        }
    }

    pub fn successes(&self) -> u64 {
        self.count
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The figures of a phase that took `elapsed` from first request to
    /// last response.
    pub fn summarize(&self, elapsed: Duration) -> Summary {
        let seconds = elapsed.as_secs_f64();
        let errors = self.errors.clone();
        let error_count = errors.values().sum();
        if self.count == 0 {
            return Summary {
                seconds,
                count: 0,
                error_count,
                errors,
                ..Summary::default()
            };
        }
        let n = self.count as f64;
        let fastest = self.fastest.as_secs_f64();
        let slowest = self.slowest.as_secs_f64();
        let average = self.sum / n;
        let variance = (self.sum_squares / n - average * average).max(0.0);
        // The histogram's values are rounded to its precision; the exact
        // extremes bound them.
        let clamp = |micros: u64| (micros as f64 / 1e6).clamp(fastest, slowest);
        let percentiles = PERCENTILES
            .iter()
            .map(|&p| {
                let v = self.histogram.value_at_quantile(p / 100.0);
                (p, clamp(self.histogram.median_equivalent(v)))
            })
            .collect();
        let samples = self.histogram.iter_recorded().map(|v| {
            let lowest = self.histogram.lowest_equivalent(v.value_iterated_to());
            (clamp(lowest), v.count_at_value())
        });
        Summary {
            seconds,
            count: self.count,
            error_count,
            errors,
            fastest,
            slowest,
            average,
            stddev: variance.sqrt(),
            rps: if seconds > 0.0 { n / seconds } else { 0.0 },
            percentiles,
            histogram: bucketize(samples, fastest, slowest),
        }
    }
}

/// etcd's latency histogram: ten equal-width buckets from the fastest to
/// the slowest plus one at the slowest; each sample counts in the first
/// bucket whose bound is at least its latency.
pub fn bucketize(
    samples: impl Iterator<Item = (f64, u64)>,
    fastest: f64,
    slowest: f64,
) -> Vec<(f64, u64)> {
    let width = (slowest - fastest) / HISTOGRAM_BUCKETS as f64;
    let mut buckets: Vec<(f64, u64)> = (0..HISTOGRAM_BUCKETS)
        .map(|i| (fastest + width * i as f64, 0))
        .collect();
    buckets.push((slowest, 0));
    for (latency, count) in samples {
        let i = buckets
            .iter()
            .position(|&(bound, _)| latency <= bound)
            .unwrap_or(HISTOGRAM_BUCKETS);
        buckets[i].1 += count;
    }
    buckets
}

/// What a phase measured, in seconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub seconds: f64,
    /// Successful requests (or events received).
    pub count: u64,
    pub error_count: u64,
    pub errors: BTreeMap<String, u64>,
    pub fastest: f64,
    pub slowest: f64,
    pub average: f64,
    pub stddev: f64,
    /// Successes per second.
    pub rps: f64,
    /// (percentile, latency) for each of [`PERCENTILES`].
    pub percentiles: Vec<(f64, f64)>,
    /// (upper bound, count) as etcd's report draws them.
    pub histogram: Vec<(f64, u64)>,
}

impl Summary {
    /// The latency at percentile `p` (one of [`PERCENTILES`]).
    pub fn percentile(&self, p: f64) -> f64 {
        self.percentiles
            .iter()
            .find(|(q, _)| *q == p)
            .map_or(0.0, |&(_, v)| v)
    }

    /// etcd's text report: summary, response time histogram, latency
    /// distribution, error distribution. `precise` prints every digit.
    pub fn to_text(&self, precise: bool) -> String {
        let num = |x: f64| {
            if precise {
                format!("{x}")
            } else {
                format!("{x:4.4}")
            }
        };
        let mut s = String::new();
        if self.count > 0 {
            let _ = writeln!(s, "\nSummary:");
            let _ = writeln!(s, "  Total:\t{} secs.", num(self.seconds));
            let _ = writeln!(s, "  Slowest:\t{} secs.", num(self.slowest));
            let _ = writeln!(s, "  Fastest:\t{} secs.", num(self.fastest));
            let _ = writeln!(s, "  Average:\t{} secs.", num(self.average));
            let _ = writeln!(s, "  Stddev:\t{} secs.", num(self.stddev));
            let _ = writeln!(s, "  Requests/sec:\t{}", num(self.rps));
            let _ = writeln!(s, "\nResponse time histogram:");
            let most = self.histogram.iter().map(|b| b.1).max().unwrap_or(0);
            for &(bound, count) in &self.histogram {
                let bar = (count * BAR_WIDTH).checked_div(most).unwrap_or(0);
                let bar = "∎".repeat(usize::try_from(bar).unwrap_or(0));
                let _ = writeln!(s, "  {} [{count}]\t|{bar}", num(bound));
            }
            let _ = writeln!(s, "\nLatency distribution:");
            for &(p, v) in &self.percentiles {
                let _ = writeln!(s, "  {p}% in {} secs.", num(v));
            }
        }
        if !self.errors.is_empty() {
            let _ = writeln!(s, "\nError distribution:");
            for (message, n) in &self.errors {
                let _ = writeln!(s, "  [{n}]\t{message}");
            }
        }
        s
    }

    /// The figures as a JSON object (latencies in seconds).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "seconds": self.seconds,
            "count": self.count,
            "rps": self.rps,
            "min": self.fastest,
            "max": self.slowest,
            "mean": self.average,
            "stddev": self.stddev,
            "p50": self.percentile(50.0),
            "p90": self.percentile(90.0),
            "p99": self.percentile(99.0),
            "p999": self.percentile(99.9),
            "errors": self.error_count,
            "error_messages": self.errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= b.abs() * 0.001 + 1e-9
    }

    #[test]
    fn percentiles_of_a_uniform_sample() {
        let mut r = Recorder::new();
        for ms in 1..=1000 {
            r.record(millis(ms));
        }
        let s = r.summarize(Duration::from_secs(2));
        assert_eq!(s.count, 1000);
        assert!(close(s.percentile(10.0), 0.100), "{:?}", s.percentiles);
        assert!(close(s.percentile(50.0), 0.500), "{:?}", s.percentiles);
        assert!(close(s.percentile(90.0), 0.900), "{:?}", s.percentiles);
        assert!(close(s.percentile(99.0), 0.990), "{:?}", s.percentiles);
        // 99.9% of 1000 samples lands on the 999th or (float rounding) the
        // 1000th.
        let p999 = s.percentile(99.9);
        assert!((0.999..=1.0).contains(&p999), "{:?}", s.percentiles);
        assert_eq!(s.fastest, 0.001);
        assert_eq!(s.slowest, 1.0);
        assert!(close(s.average, 0.5005));
        assert!(close(s.rps, 500.0));
    }

    #[test]
    fn percentiles_never_leave_the_exact_extremes() {
        let mut r = Recorder::new();
        r.record(Duration::from_micros(123_456));
        let s = r.summarize(Duration::from_secs(1));
        for &(_, v) in &s.percentiles {
            assert_eq!(v, 0.123456);
        }
    }

    #[test]
    fn mean_and_population_stddev() {
        let mut r = Recorder::new();
        for ms in [1, 2, 3, 4] {
            r.record(millis(ms));
        }
        let s = r.summarize(Duration::from_secs(1));
        assert!(close(s.average, 0.0025));
        assert!(close(s.stddev, 1.25f64.sqrt() / 1000.0), "{}", s.stddev);
    }

    #[test]
    fn buckets_follow_etcds_layout() {
        let samples = (1..=100).map(|ms| (ms as f64 / 1000.0, 1));
        let b = bucketize(samples, 0.001, 0.100);
        assert_eq!(b.len(), 11);
        assert!(close(b[0].0, 0.001));
        assert!(close(b[1].0, 0.0109));
        assert_eq!(b[10].0, 0.100);
        // Only the fastest is at or below the first bound; 2..=10 ms are at
        // or below 10.9 ms; the slowest bucket holds what is past 90.1 ms.
        assert_eq!(b[0].1, 1);
        assert_eq!(b[1].1, 9);
        assert_eq!(b[10].1, 10);
        assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), 100);
    }

    #[test]
    fn histogram_counts_every_recorded_sample() {
        let mut r = Recorder::new();
        for us in [50, 60, 70, 5_000, 5_000, 250_000] {
            r.record(Duration::from_micros(us));
        }
        let s = r.summarize(Duration::from_secs(1));
        assert_eq!(s.histogram.iter().map(|b| b.1).sum::<u64>(), 6);
        assert_eq!(s.histogram[0].1, 1);
        assert_eq!(s.histogram[10].1, 1);
    }

    #[test]
    fn merging_adds_counts_extremes_and_errors() {
        let mut a = Recorder::new();
        let mut b = Recorder::new();
        a.record(millis(2));
        a.record_error("boom");
        b.record(millis(8));
        b.record_error("boom");
        b.record_errors("lost", 3);
        b.record_errors("never", 0);
        a.merge(&b);
        let s = a.summarize(Duration::from_secs(1));
        assert_eq!(s.count, 2);
        assert_eq!(s.fastest, 0.002);
        assert_eq!(s.slowest, 0.008);
        assert_eq!(s.error_count, 5);
        assert_eq!(s.errors.get("boom"), Some(&2));
        assert_eq!(s.errors.get("lost"), Some(&3));
        assert!(!s.errors.contains_key("never"));
        assert!(close(s.percentile(50.0), 0.002));
    }

    #[test]
    fn text_report_has_etcds_sections() {
        let mut r = Recorder::new();
        for ms in 1..=10 {
            r.record(millis(ms));
        }
        r.record_error("rpc error: code = Unavailable desc = gone");
        let text = r.summarize(Duration::from_secs(1)).to_text(false);
        for part in [
            "Summary:",
            "  Total:\t1.0000 secs.",
            "  Slowest:\t0.0100 secs.",
            "  Fastest:\t0.0010 secs.",
            "  Requests/sec:\t10.0000",
            "Response time histogram:",
            "  0.0010 [1]\t|∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎∎\n",
            "Latency distribution:",
            "  99.9% in 0.0100 secs.",
            "Error distribution:",
            "  [1]\trpc error: code = Unavailable desc = gone",
        ] {
            assert!(text.contains(part), "{part:?} missing from\n{text}");
        }
    }

    #[test]
    fn json_has_the_summary_fields() {
        let mut r = Recorder::new();
        r.record(millis(4));
        let j = r.summarize(Duration::from_secs(2)).to_json();
        assert_eq!(j["count"], 1);
        assert_eq!(j["errors"], 0);
        assert_eq!(j["rps"], 0.5);
        assert_eq!(j["p99"], 0.004);
        assert_eq!(j["min"], 0.004);
    }

    #[test]
    fn nothing_recorded_prints_only_errors() {
        let mut r = Recorder::new();
        r.record_error("x");
        let s = r.summarize(Duration::from_secs(1));
        assert_eq!(s.count, 0);
        assert_eq!(s.to_text(false), "\nError distribution:\n  [1]\tx\n");
    }
}
