//! Backend selection: weighted least connections over the shared table.
//! Pure and allocation-free, so it runs on the accept path of every worker
//! without locks; ties rotate from a caller-owned cursor.

use std::sync::atomic::Ordering;

use crate::backend::Backend;

/// Picks the healthy backend with the lowest `active / weight`, skipping the
/// indices in `exclude` (backends already tried for this client). Among equal
/// loads the first one at or after `start` wins, so a cursor that advances on
/// every pick spreads sequential short connections evenly.
pub fn pick(backends: &[Backend], start: usize, exclude: &[u32]) -> Option<usize> {
    let n = backends.len();
    if n == 0 {
        return None;
    }
    let start = start % n;
    let mut best: Option<(usize, u64, u64)> = None;
    for k in 0..n {
        let i = if start + k >= n { start + k - n } else { start + k };
        let b = &backends[i];
        if !b.is_healthy() || exclude.contains(&(i as u32)) {
            continue;
        }
        let active = b.active.load(Ordering::Relaxed) as u64;
        let weight = u64::from(b.weight);
        let better = match best {
            None => true,
            // a/wa < b/wb without division: a*wb < b*wa.
            Some((_, best_active, best_weight)) => active * best_weight < best_active * weight,
        };
        if better {
            best = Some((i, active, weight));
        }
    }
    best.map(|(i, _, _)| i)
}

/// True when at least one backend is marked up.
pub fn any_healthy(backends: &[Backend]) -> bool {
    backends.iter().any(Backend::is_healthy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendSpec;

    fn table(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Backend::new(&BackendSpec {
                    name: format!("b{i}"),
                    addr: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                    weight: *w,
                })
            })
            .collect()
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
