//! Relay buffer checkout and return: one `BufferPool::get` plus the drop
//! that gives the buffer back, after warm-up (no allocation in the loop).

mod common;

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use lb::pool::BufferPool;

fn checkout_and_return(c: &mut Criterion) {
    let pool = BufferPool::new(32 * 1024, 64);
    drop(pool.get().expect("pool has room"));
    c.bench_function("pool/get+return", |b| {
        b.iter(|| {
            let buf = pool.get();
            black_box(&buf);
        })
    });
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = checkout_and_return
}
criterion_main!(benches);
