//! Counters and distributions that outlive a single connection: the global
//! counters shared by all workers and the fixed-bucket, allocation-free
//! histogram used for backend connect times.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Number of log2 buckets over microseconds: bucket i holds samples in
/// [2^i, 2^(i+1)) µs, bucket 0 also holds 0 µs; the last is open-ended.
pub const BUCKETS: usize = 32;

/// Lock-free histogram of durations; recording is one relaxed add.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(us, Ordering::Relaxed);
    }

    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_micros: self.sum_micros.load(Ordering::Relaxed),
        }
    }
}

fn bucket_of(us: u64) -> usize {
    if us == 0 {
        return 0;
    }
    (63 - us.leading_zeros() as usize).min(BUCKETS - 1)
}

/// Upper bound of bucket `i`, in microseconds.
pub fn bucket_upper_micros(i: usize) -> u64 {
    1u64 << (i + 1)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub counts: [u64; BUCKETS],
    pub sum_micros: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1), or `None`
    /// with no samples. Bucketed, so it over-reports by at most 2x.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_micros(bucket_upper_micros(i)));
            }
        }
        Some(Duration::from_micros(bucket_upper_micros(BUCKETS - 1)))
    }
}

/// Process-wide counters, shared by all workers.
#[derive(Debug, Default)]
pub struct Counters {
    /// Client connections accepted.
    pub accepted: AtomicU64,
    /// Times a worker paused accepting because the cap was reached.
    pub cap_reached: AtomicU64,
    /// Clients closed at once because no backend was up.
    pub no_backend: AtomicU64,
    /// Clients closed because every connect attempt failed.
    pub connect_gave_up: AtomicU64,
    /// Relay buffer requests refused by an exhausted pool.
    pub pool_exhausted: AtomicU64,
    /// accept() failures for lack of file descriptors or memory.
    pub accept_errors: AtomicU64,
    /// Pairs closed by the idle timeout.
    pub idle_closed: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_land_in_log2_buckets() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(2), 1);
        assert_eq!(bucket_of(3), 1);
        assert_eq!(bucket_of(1024), 10);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_come_from_the_bucket_bounds() {
        let h = Histogram::new();
        for _ in 0..98 {
            h.record(Duration::from_micros(100));
        }
        h.record(Duration::from_millis(10));
        h.record(Duration::from_millis(10));
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        assert_eq!(s.quantile(0.5), Some(Duration::from_micros(128)));
        assert_eq!(s.quantile(0.99), Some(Duration::from_micros(16384)));
        assert_eq!(s.sum_micros, 98 * 100 + 2 * 10_000);
    }

    #[test]
    fn an_empty_histogram_has_no_quantiles() {
        assert_eq!(Histogram::new().snapshot().quantile(0.5), None);
    }
}
