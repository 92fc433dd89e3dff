//! Backend selection: weighted least connections over the shared table.
//! Pure and allocation-free, so it runs on the accept path of every worker
//! without locks; ties rotate from a caller-owned cursor.

use crate::backend::Backend;

/// Picks the healthy backend with the lowest `active / weight`, skipping the
/// indices in `exclude` (backends already tried for this client). Among equal
/// loads the first one at or after `start` wins, so a cursor that advances on
/// every pick spreads sequential short connections evenly. A `start` below
/// `backends.len()` saves a division.
#[inline]
pub fn pick(backends: &[Backend], start: usize, exclude: &[u32]) -> Option<usize> {
    if !exclude.is_empty() {
        return pick_excluding(backends, start, exclude);
    }
    least_loaded(backends, start, |_| false)
}

/// Retries after a failed connect: kept out of line so the first attempt's
/// loop, the one every connection runs, stays small and in registers.
#[inline(never)]
fn pick_excluding(backends: &[Backend], start: usize, exclude: &[u32]) -> Option<usize> {
    least_loaded(backends, start, |i| exclude.contains(&(i as u32)))
}

#[inline(always)]
fn least_loaded(backends: &[Backend], start: usize, skip: impl Fn(usize) -> bool + Copy) -> Option<usize> {
    let n = backends.len();
    let start = if start < n { start } else { start.checked_rem(n)? };
    // [start, n) then [0, start): the first-at-or-after-start tie rule
    // without an index wrap per step.
    let best = scan(&backends[start..], start, skip, (usize::MAX, u64::MAX));
    let (best, _) = scan(&backends[..start], 0, skip, best);
    (best != usize::MAX).then_some(best)
}

/// Folds `part` (whose first index in the table is `base`) into the lowest
/// (index, key) so far. Keys are computed independently, two backends at a
/// time: the pair is settled first, so the dependency carried from step to
/// step is one compare and move per two backends.
#[inline(always)]
fn scan(part: &[Backend], base: usize, skip: impl Fn(usize) -> bool, mut best: (usize, u64)) -> (usize, u64) {
    // Any real key is below u64::MAX, so an ineligible backend never wins
    // and the first eligible one always does.
    let key = |i: usize, b: &Backend| {
        if b.is_healthy() && !skip(i) { b.load_key() } else { u64::MAX }
    };
    let mut pairs = part.chunks_exact(2);
    let mut i = base;
    for pair in pairs.by_ref() {
        let (k0, k1) = (key(i, &pair[0]), key(i + 1, &pair[1]));
        // Ties go to the earlier one, here and against the best so far.
        let (j, k) = if k1 < k0 { (i + 1, k1) } else { (i, k0) };
        if k < best.1 {
            best = (j, k);
        }
        i += 2;
    }
    if let [b] = pairs.remainder() {
        let k = key(i, b);
        if k < best.1 {
            best = (i, k);
        }
    }
    best
}

/// True when at least one backend is marked up.
pub fn any_healthy(backends: &[Backend]) -> bool {
    backends.iter().any(Backend::is_healthy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendSpec;
    use std::sync::atomic::Ordering;

    fn table(weights: &[u32]) -> Vec<Backend> {
        let specs: Vec<BackendSpec> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| BackendSpec {
                name: format!("b{i}"),
                addr: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                weight: *w,
            })
            .collect();
        crate::backend::table(&specs)
    }

    #[test]
    fn picks_the_backend_with_fewest_active_connections() {
        let t = table(&[1, 1, 1]);
        t[0].active.store(5, Ordering::Relaxed);
        t[1].active.store(2, Ordering::Relaxed);
        t[2].active.store(3, Ordering::Relaxed);
        assert_eq!(pick(&t, 0, &[]), Some(1));
    }

    #[test]
    fn ties_rotate_with_the_cursor() {
        let t = table(&[1, 1, 1]);
        let picks: Vec<_> = (0..6).map(|c| pick(&t, c, &[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weights_scale_the_load() {
        let t = table(&[1, 3]);
        t[0].active.store(2, Ordering::Relaxed);
        t[1].active.store(5, Ordering::Relaxed);
        // 2/1 = 2 against 5/3 ≈ 1.67: the heavier backend still has room.
        assert_eq!(pick(&t, 0, &[]), Some(1));
        t[1].active.store(7, Ordering::Relaxed);
        assert_eq!(pick(&t, 0, &[]), Some(0));
    }

    #[test]
    fn skips_unhealthy_and_excluded_backends() {
        let t = table(&[1, 1, 1]);
        t[0].set_healthy(false);
        assert_eq!(pick(&t, 0, &[1]), Some(2));
        assert_eq!(pick(&t, 0, &[1, 2]), None);
    }

    #[test]
    fn returns_none_when_nothing_is_up() {
        let t = table(&[1, 1]);
        t[0].set_healthy(false);
        t[1].set_healthy(false);
        assert!(!any_healthy(&t));
        assert_eq!(pick(&t, 0, &[]), None);
        assert_eq!(pick(&[], 0, &[]), None);
    }
}
