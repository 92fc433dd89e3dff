//! State every thread sees: the backend table, the global counters, the
//! connection cap and the control flags that pause, drain and stop workers.
//! Only atomics are touched after start-up; wakers are how one thread tells
//! a sleeping worker to look at the flags again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use log::warn;
use mio::Waker;

use crate::backend::Backend;
use crate::stats::Counters;

/// One worker's mailbox: its waker, and why it stopped accepting, so that
/// whatever lifts that reason elsewhere knows to wake it: at the cap (a
/// closing connection), or while a client waited for a descriptor (the
/// last such client served).
#[derive(Debug)]
pub struct WorkerControl {
    pub waker: Waker,
    pub paused_at_cap: AtomicBool,
    pub held_for_parked: AtomicBool,
}

#[derive(Debug)]
pub struct Shared {
    pub backends: Vec<Backend>,
    pub counters: Counters,
    pub workers: Vec<WorkerControl>,
    /// The table that steers new clients to the least-loaded worker, when
    /// the kernel let lb load the program.
    pub steering: Option<crate::steer::Steering>,
    max_connections: usize,
    active_clients: AtomicUsize,
    /// Clients waiting in any worker for a descriptor for their backend
    /// socket (see [`ParkedMark`]).
    parked_clients: AtomicUsize,
    draining: AtomicBool,
    stopping: AtomicBool,
}

impl Shared {
    pub fn new(backends: Vec<Backend>, max_connections: usize, wakers: Vec<Waker>) -> Shared {
        Shared {
            backends,
            counters: Counters::default(),
            workers: wakers
                .into_iter()
                .map(|waker| WorkerControl {
                    waker,
                    paused_at_cap: AtomicBool::new(false),
                    held_for_parked: AtomicBool::new(false),
                })
                .collect(),
            steering: None,
            max_connections,
            active_clients: AtomicUsize::new(0),
            parked_clients: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        }
    }

    pub fn steered_by(mut self, steering: Option<crate::steer::Steering>) -> Shared {
        self.steering = steering;
        self
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    pub fn active_clients(&self) -> usize {
        self.active_clients.load(Ordering::SeqCst)
    }

    /// Whether a client waits for a descriptor in any worker: the process
    /// is out of them, and a client accepted now would take the one it
    /// waits for. Read before each accept, without ordering: an accept
    /// racing the mark fails or parks its own client, and that worker
    /// stops accepting then.
    pub fn any_parked(&self) -> bool {
        // SeqCst for the handshake with a worker held for a parked client
        // (see ParkedMark's drop); a plain load on x86.
        self.parked_clients.load(Ordering::SeqCst) > 0
    }

    /// Counts a client waiting for a descriptor until the mark drops.
    pub fn mark_parked(&self) -> ParkedMark<'_> {
        self.parked_clients.fetch_add(1, Ordering::SeqCst);
        ParkedMark { shared: self }
    }

    /// Reserves room for one client under the global cap, or `None` at the
    /// cap. Reserved before accept() so the cap is never overshot.
    pub fn try_acquire_client(&self) -> Option<ClientSlot<'_>> {
        let mut cur = self.active_clients.load(Ordering::SeqCst);
        loop {
            if cur >= self.max_connections {
                return None;
            }
            match self.active_clients.compare_exchange_weak(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Some(ClientSlot { shared: self }),
                Err(now) => cur = now,
            }
        }
    }

    fn release_client(&self) {
        let before = self.active_clients.fetch_sub(1, Ordering::SeqCst);
        if before >= self.max_connections {
            // Room again: wake the workers that stopped accepting. A worker
            // re-checks the count after raising its flag, so one of the two
            // sides always sees the other (both are SeqCst).
            for w in &self.workers {
                if w.paused_at_cap.load(Ordering::SeqCst) {
                    self.wake(w);
                }
            }
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Stops accepting everywhere; open connections carry on.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.wake_all();
    }

    /// Ends every worker now, closing what is still open.
    pub fn stop_now(&self) {
        self.draining.store(true, Ordering::Release);
        self.stopping.store(true, Ordering::Release);
        self.wake_all();
    }

    pub fn wake_all(&self) {
        for w in &self.workers {
            self.wake(w);
        }
    }

    fn wake(&self, w: &WorkerControl) {
        if let Err(e) = w.waker.wake() {
            warn!("cannot wake a worker: {e}");
        }
    }
}

/// One client's place under the cap; dropping it frees the place.
#[derive(Debug)]
pub struct ClientSlot<'a> {
    shared: &'a Shared,
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        self.shared.release_client();
    }
}

/// One client waiting for a descriptor, counted while the mark lives.
#[derive(Debug)]
pub struct ParkedMark<'a> {
    shared: &'a Shared,
}

impl Drop for ParkedMark<'_> {
    fn drop(&mut self) {
        if self.shared.parked_clients.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The last one: workers that stopped accepting for it may go
            // on at once rather than at the end of their back-off. One
            // that raises its flag just after this look sees the count at
            // zero when it checks again (both sides are SeqCst).
            for w in &self.shared.workers {
                if w.held_for_parked.load(Ordering::SeqCst) {
                    self.shared.wake(w);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Poll, Token};

    fn shared(max: usize) -> (Poll, Shared) {
        let poll = Poll::new().expect("poll");
        let waker = Waker::new(poll.registry(), Token(0)).expect("waker");
        (poll, Shared::new(Vec::new(), max, vec![waker]))
    }

    #[test]
    fn a_parked_client_is_counted_until_its_mark_drops() {
        let (_poll, s) = shared(2);
        assert!(!s.any_parked());
        let a = s.mark_parked();
        let b = s.mark_parked();
        drop(a);
        assert!(s.any_parked());
        drop(b);
        assert!(!s.any_parked());
    }

    #[test]
    fn serving_the_last_parked_client_wakes_a_worker_held_for_it() {
        let (mut poll, s) = shared(2);
        s.workers[0].held_for_parked.store(true, Ordering::SeqCst);
        let a = s.mark_parked();
        let b = s.mark_parked();
        drop(a);
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(std::time::Duration::ZERO)).unwrap();
        assert!(events.is_empty(), "woken while a client still waits");
        drop(b);
        poll.poll(&mut events, Some(std::time::Duration::from_secs(2))).unwrap();
        assert_eq!(events.iter().next().map(|e| e.token()), Some(Token(0)));
    }

    #[test]
    fn the_cap_is_never_overshot_and_slots_free_on_drop() {
        let (_poll, s) = shared(2);
        let a = s.try_acquire_client().expect("first fits");
        let _b = s.try_acquire_client().expect("second fits");
        assert!(s.try_acquire_client().is_none());
        assert_eq!(s.active_clients(), 2);
        drop(a);
        assert_eq!(s.active_clients(), 1);
        assert!(s.try_acquire_client().is_some());
    }

    #[test]
    fn freeing_a_slot_at_the_cap_wakes_a_paused_worker() {
        let (mut poll, s) = shared(1);
        let slot = s.try_acquire_client().unwrap();
        s.workers[0].paused_at_cap.store(true, Ordering::SeqCst);
        drop(slot);
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(std::time::Duration::from_secs(2))).unwrap();
        assert_eq!(events.iter().next().map(|e| e.token()), Some(Token(0)));
    }
}
