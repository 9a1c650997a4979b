//! Latency samples and their summary (percentiles by the nearest-rank method).

use serde::Serialize;
use std::time::Duration;

/// Percentiles of a set of latency samples, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub samples: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Summary {
    /// Summarizes `samples` (sorted in place). An empty set summarizes to zeros.
    pub fn of(samples: &mut [Duration]) -> Summary {
        if samples.is_empty() {
            return Summary {
                samples: 0,
                p50_ms: 0.0,
                p90_ms: 0.0,
                p99_ms: 0.0,
                max_ms: 0.0,
                mean_ms: 0.0,
            };
        }
        samples.sort_unstable();
        let total: Duration = samples.iter().sum();
        Summary {
            samples: samples.len(),
            p50_ms: ms(percentile(samples, 50.0)),
            p90_ms: ms(percentile(samples, 90.0)),
            p99_ms: ms(percentile(samples, 99.0)),
            max_ms: ms(samples[samples.len() - 1]),
            mean_ms: ms(total) / samples.len() as f64,
        }
    }
}

/// Nearest-rank percentile of sorted, non-empty `samples`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A duration in (fractional) milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&u| Duration::from_micros(u)).collect()
    }

    #[test]
    fn nearest_rank_percentiles() {
        let mut s = us(&(1..=100).rev().collect::<Vec<_>>());
        let sum = Summary::of(&mut s);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert_eq!(sum.samples, 100);
        assert!(close(sum.p50_ms, 0.050), "{sum:?}");
        assert!(close(sum.p99_ms, 0.099), "{sum:?}");
        assert!(close(sum.max_ms, 0.100), "{sum:?}");
        assert!(close(sum.mean_ms, 0.0505), "{sum:?}");
    }

    #[test]
    fn small_and_empty_sets() {
        assert!((Summary::of(&mut us(&[7])).p99_ms - 0.007).abs() < 1e-9);
        assert_eq!(Summary::of(&mut []).samples, 0);
    }
}
