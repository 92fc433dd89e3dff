//! Recording one sample into the connect-time histogram.

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use lb::stats::Histogram;

fn record(c: &mut Criterion) {
    let h = Histogram::new();
    let mut us = 1u64;
    c.bench_function("histogram/record", |b| {
        b.iter(|| {
            // Spread samples over many buckets, as real connect times do.
            us = us.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            h.record(black_box(Duration::from_micros(us >> 44)));
        })
    });
    black_box(h.snapshot());
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = record
}
criterion_main!(benches);
