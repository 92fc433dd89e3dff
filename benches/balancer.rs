//! Backend selection cost: `balancer::pick` over 2, 16 and 128 backends,
//! alone and while another thread keeps changing the `active` counters the
//! way other workers' leases do.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lb::backend::{self, Backend};
use lb::balancer;
use lb::config::BackendSpec;

const SIZES: [usize; 3] = [2, 16, 128];

fn table(n: usize) -> Vec<Backend> {
    let specs: Vec<BackendSpec> = (0..n)
        .map(|i| BackendSpec {
            name: format!("b{i}"),
            addr: format!("127.0.0.1:{}", 10_000 + i).parse().expect("literal address"),
            weight: 1 + (i % 3) as u32,
        })
        .collect();
    let t = backend::table(&specs);
    // Uneven loads so the comparison does real work.
    for (i, b) in t.iter().enumerate() {
        b.active.store((i * 7) % 11, Ordering::Relaxed);
    }
    t
}

/// The pick as one word: black-boxing the `Option` itself spills it as two
/// stores and reloads it as one 16-byte load, a store-forwarding stall that
/// cost more than the selection (about 9 ns of 27 at 16 backends).
fn picked(p: Option<usize>) -> usize {
    black_box(p.unwrap_or(usize::MAX))
}

/// No backend excluded, as on a first attempt, but unknown to the compiler
/// (a worker's list of tried backends is only known at run time). Only the
/// length goes through `black_box`: black-boxing the slice itself spills it
/// as one 16-byte store that the two 8-byte loads of pointer and length
/// cannot forward from, a stall real callers, which pass the slice in
/// registers, never pay (about 8 ns of 32 at 16 backends on one host).
fn none_excluded() -> &'static [u32] {
    &[][..black_box(0)]
}

/// Advances the tie-breaking cursor the way a worker does.
fn next(cursor: &mut usize, n: usize) -> usize {
    *cursor = if *cursor + 1 < n { *cursor + 1 } else { 0 };
    *cursor
}

fn single_threaded(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for n in SIZES {
        let t = table(n);
        let mut cursor = 0usize;
        g.bench_with_input(BenchmarkId::new("single", n), &t, |b, t| {
            b.iter(|| {
                let start = next(&mut cursor, n);
                picked(balancer::pick(black_box(t), start, none_excluded()))
            })
        });
    }
    g.finish();
}

fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for n in SIZES {
        let t = Arc::new(table(n));
        let stop = Arc::new(AtomicBool::new(false));
        // One writer: the box has two cores, one runs the measurement.
        let writer = {
            let t = Arc::clone(&t);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let b = &t[i % t.len()];
                    let lease = b.lease();
                    drop(lease);
                    i = i.wrapping_add(7);
                }
            })
        };
        let mut cursor = 0usize;
        g.bench_with_input(BenchmarkId::new("contended", n), &t, |b, t| {
            b.iter(|| {
                let start = next(&mut cursor, n);
                picked(balancer::pick(black_box(t), start, none_excluded()))
            })
        });
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("counter writer finished");
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = single_threaded, contended
}
criterion_main!(benches);
