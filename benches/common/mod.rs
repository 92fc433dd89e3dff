//! Criterion settings shared by every bench target.

use std::time::Duration;

use criterion::Criterion;

/// Bounded so the whole `cargo bench` run takes about two minutes on 2 cores.
pub fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3)).sample_size(50)
}
