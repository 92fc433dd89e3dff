//! The backend table shared by every worker: each backend's address, weight,
//! health flag and atomic counters. Workers only touch atomics here, never a
//! lock, and a [`Lease`] ties one client's use of a backend to its lifetime.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::config::BackendSpec;
use crate::stats::Histogram;

/// Builds the table every worker selects from. Each backend's weight is
/// turned into a per-connection cost (`unit`) so that `active * unit`
/// orders backends exactly like `active / weight`: with `L` the least common
/// multiple of the weights, `unit = L / weight` and
/// `active * unit = L * (active / weight)`, ties included. Selection then
/// compares one multiply per backend instead of cross-multiplying against
/// the best so far, which would chain every step to the one before.
pub fn table(specs: &[BackendSpec]) -> Vec<Backend> {
    let units = units(specs.iter().map(|s| s.weight));
    specs.iter().zip(units).map(|(spec, unit)| Backend::new(spec, unit)).collect()
}

/// `L / weight` while `L` fits in 32 bits, which covers any realistic set of
/// weights. Past that, `2^32 / weight` rounded down: `active / weight` is
/// then compared with an error below `active / 2^32` (2^-12 at a million
/// connections), so only near-ties between unequal weights may break the
/// other way. A unit
/// never exceeds 2^32 and `active` is bounded by the descriptor limit
/// (below 2^31), so `active * unit` cannot overflow.
fn units(weights: impl Iterator<Item = u32> + Clone) -> Vec<u64> {
    // Weights are 1..=65535 (validated by config); 0 counts as 1 rather
    // than dividing by zero.
    let weights = weights.map(|w| u64::from(w.max(1)));
    let lcm = weights.clone().try_fold(1u64, |l, w| {
        let next = l / gcd(l, w) * w;
        (next <= 1 << 32).then_some(next)
    });
    match lcm {
        Some(l) => weights.map(|w| l / w).collect(),
        None => weights.map(|w| (1u64 << 32) / w).collect(),
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// One upstream server. Aligned to its own cache lines so that two workers
/// updating two different backends never share a line. `repr(C)` keeps the
/// fields in this order: everything backend selection reads (`active`,
/// `unit`, the health flag) and the address a connect needs share the
/// first cache line, so a pick touches one line per backend, not two.
#[repr(C, align(128))]
#[derive(Debug)]
pub struct Backend {
    /// Client pairs currently connected or connecting to this backend.
    pub active: AtomicUsize,
    /// What one connection costs this backend relative to the others in its
    /// table; see [`table`].
    unit: u64,
    healthy: AtomicBool,
    pub weight: u32,
    pub addr: SocketAddr,
    /// Consecutive connect failures seen on real traffic (passive checks).
    consecutive_failures: AtomicU32,
    pub name: String,
    /// Connections successfully established.
    pub total: AtomicU64,
    /// Connect attempts that failed (refused, timed out, unreachable).
    pub failed: AtomicU64,
    /// Bytes relayed from clients to this backend.
    pub bytes_in: AtomicU64,
    /// Bytes relayed from this backend to clients.
    pub bytes_out: AtomicU64,
    /// Health probes that passed.
    pub checks_ok: AtomicU64,
    /// Health probes that failed (refused, timed out, bad status).
    pub checks_failed: AtomicU64,
    /// Time from connect() to an established connection.
    pub connect_time: Histogram,
}

impl Backend {
    /// Only [`table`] builds backends: a unit means something only next to
    /// the units of the same table.
    fn new(spec: &BackendSpec, unit: u64) -> Backend {
        Backend {
            name: spec.name.clone(),
            addr: spec.addr,
            weight: spec.weight,
            unit,
            active: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            checks_ok: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            // Backends start as up so traffic flows before the first probe round.
            healthy: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            connect_time: Histogram::new(),
        }
    }

    /// This backend's load on the table's common scale (see [`table`]):
    /// lower means less loaded relative to its weight.
    #[inline]
    pub fn load_key(&self) -> u64 {
        (self.active.load(Ordering::Relaxed) as u64).wrapping_mul(self.unit)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Sets the health flag and reports whether it changed, so the caller
    /// logs a flip exactly once.
    pub fn set_healthy(&self, up: bool) -> bool {
        let was = self.healthy.swap(up, Ordering::AcqRel);
        if up {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        was != up
    }

    pub fn connect_succeeded(&self, took: Duration) {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.connect_time.record(took);
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failed connect on real traffic. Returns true when this
    /// failure takes the backend down (`fall` consecutive failures), so the
    /// caller logs the flip once; `fall == 0` disables passive detection.
    pub fn connect_failed(&self, fall: u32) -> bool {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        fall != 0 && n >= fall && self.healthy.swap(false, Ordering::AcqRel)
    }

    pub fn lease(&self) -> Lease<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        Lease { backend: self, held: true }
    }
}

/// One client's claim on a backend: counted in `active` while it lives,
/// or until released. A released lease still names its backend, for the
/// byte counters.
#[derive(Debug)]
pub struct Lease<'a> {
    backend: &'a Backend,
    held: bool,
}

impl<'a> Lease<'a> {
    pub fn backend(&self) -> &'a Backend {
        self.backend
    }

    /// Stops counting the connection on the backend (once, however often
    /// called): it is gone, although its client is not yet.
    pub fn release(&mut self) {
        if self.held {
            self.held = false;
            self.backend.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(weight: u32) -> BackendSpec {
        BackendSpec { name: "b".into(), addr: "127.0.0.1:1".parse().unwrap(), weight }
    }

    fn backend() -> Backend {
        table(&[spec(1)]).pop().unwrap()
    }

    #[test]
    fn a_lease_counts_until_released_or_dropped_and_only_once() {
        let b = backend();
        let mut first = b.lease();
        let second = b.lease();
        assert_eq!(b.active.load(Ordering::Relaxed), 2);
        first.release();
        first.release();
        assert_eq!(b.active.load(Ordering::Relaxed), 1, "a release counts once");
        drop(first);
        assert_eq!(b.active.load(Ordering::Relaxed), 1, "a released lease is not uncounted again");
        drop(second);
        assert_eq!(b.active.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn load_keys_order_and_tie_exactly_like_the_fractions() {
        let weights = [1, 2, 3, 7, 10, 255, 256, 1000];
        let t = table(&weights.map(spec));
        let actives = [0, 1, 2, 3, 5, 6, 14, 21, 255, 1000, 65_536, 1 << 20, (1 << 30) - 1];
        for (i, wa) in weights.iter().enumerate() {
            for (j, wb) in weights.iter().enumerate().filter(|&(j, _)| j != i) {
                for a in actives {
                    for b in actives {
                        t[i].active.store(a, Ordering::Relaxed);
                        t[j].active.store(b, Ordering::Relaxed);
                        let want = (a as u64 * u64::from(*wb)).cmp(&(b as u64 * u64::from(*wa)));
                        assert_eq!(t[i].load_key().cmp(&t[j].load_key()), want, "{a}/{wa} against {b}/{wb}");
                    }
                }
            }
        }
    }

    #[test]
    fn weights_without_a_small_common_multiple_still_order_loads() {
        // Three primes near 2^16: their product is far past 2^32.
        let t = table(&[spec(65_521), spec(65_519), spec(65_519)]);
        // Equal weights still tie exactly.
        t[1].active.store(700, Ordering::Relaxed);
        t[2].active.store(700, Ordering::Relaxed);
        assert_eq!(t[1].load_key(), t[2].load_key());
        // A load lower by one connection in a thousand still wins.
        t[0].active.store(1000, Ordering::Relaxed);
        t[1].active.store(1001, Ordering::Relaxed);
        assert!(t[0].load_key() < t[1].load_key());
        t[0].active.store(1002, Ordering::Relaxed);
        assert!(t[0].load_key() > t[1].load_key());
    }

    #[test]
    fn a_zero_weight_counts_as_one() {
        let t = table(&[spec(0), spec(1)]);
        t[0].active.store(3, Ordering::Relaxed);
        t[1].active.store(3, Ordering::Relaxed);
        assert_eq!(t[0].load_key(), t[1].load_key());
    }

    #[test]
    fn a_lease_counts_as_active_until_dropped() {
        let b = backend();
        let l1 = b.lease();
        let l2 = b.lease();
        assert_eq!(b.active.load(Ordering::Relaxed), 2);
        drop(l1);
        assert_eq!(b.active.load(Ordering::Relaxed), 1);
        drop(l2);
        assert_eq!(b.active.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn consecutive_connect_failures_take_a_backend_down_once() {
        let b = backend();
        assert!(!b.connect_failed(3));
        assert!(!b.connect_failed(3));
        assert!(b.connect_failed(3), "third failure flips it");
        assert!(!b.connect_failed(3), "already down: no second flip");
        assert!(!b.is_healthy());
        assert_eq!(b.failed.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let b = backend();
        b.connect_failed(2);
        b.connect_succeeded(Duration::from_micros(10));
        assert!(!b.connect_failed(2));
        assert!(b.is_healthy());
    }

    #[test]
    fn fall_zero_disables_passive_detection() {
        let b = backend();
        for _ in 0..10 {
            assert!(!b.connect_failed(0));
        }
        assert!(b.is_healthy());
    }
}
