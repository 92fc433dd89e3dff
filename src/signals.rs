//! Turns process signals into [`Signal`] events on a channel the
//! supervisor waits on, so the supervisor can also keep its own timers.
//! SIGTERM/SIGINT start a graceful drain (a second one stops at once) and
//! SIGUSR1 asks for the stats report. So does SIGHUP: lb has no
//! configuration file to reload, and like HAProxy (which dumps its servers'
//! states on SIGHUP) it reports and carries on, rather than dropping every
//! connection because the terminal it started from was closed.

use std::io;
use std::sync::mpsc::Sender;
use std::thread;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT.
    Terminate,
    /// SIGUSR1 or SIGHUP.
    ReportStats,
}

/// Readies the process for the handlers [`forward`] installs later, and
/// must run first in `main`, while it is the only thread (threads inherit
/// the signal mask). Until the handlers exist, SIGHUP and SIGUSR1, which
/// only ask for a report, are ignored instead of killing lb by their
/// default action: a pending one sent early (during start-up or name
/// resolution) is discarded. And every signal lb acts on is unblocked, so a
/// parent that left SIGTERM blocked cannot make lb impossible to stop.
pub fn prepare() {
    // SAFETY: plain libc calls on a sigset_t we own; single-threaded here.
    unsafe {
        libc::signal(SIGHUP, libc::SIG_IGN);
        libc::signal(SIGUSR1, libc::SIG_IGN);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        for sig in [SIGHUP, SIGUSR1, SIGTERM, SIGINT] {
            libc::sigaddset(&raw mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &raw const set, std::ptr::null_mut());
    }
}

/// Installs the handlers and forwards each signal to `tx` from a small
/// thread of its own. Handlers are installed before this returns, so a
/// signal sent right after start-up is never lost to the default action.
pub fn forward<T: From<Signal> + Send + 'static>(tx: Sender<T>) -> io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGHUP])?;
    thread::Builder::new().name("lb-signals".into()).spawn(move || {
        for sig in signals.forever() {
            let event = match sig {
                SIGUSR1 | SIGHUP => Signal::ReportStats,
                _ => Signal::Terminate,
            };
            if tx.send(T::from(event)).is_err() {
                break; // The supervisor is gone; so is the process.
            }
        }
    })?;
    Ok(())
}
