//! Where log lines go: stderr, written by a thread of its own. A stderr
//! nobody reads (a stuck pipe, a wedged log shipper) then blocks only that
//! thread; workers hand their lines over without waiting and, while it is
//! stuck, lines are dropped and counted instead of stalling the relay.
//! Also the `Throttle` that keeps a warning which could repeat for every
//! client or every probe from flooding that log.

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread;
use std::time::{Duration, Instant};

/// Lines waiting for stderr before new ones are dropped.
const QUEUE: usize = 1024;

enum Message {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written.
    Flush(SyncSender<()>),
}

/// The `env_logger` target: queues each formatted record for the writer
/// thread.
struct Queue {
    tx: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl Write for Queue {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.tx.try_send(Message::Line(buf.to_vec())) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The writer thread flushes; waiting here is what must not happen.
        Ok(())
    }
}

/// A warning that can repeat for every client or probe (a shortage on our
/// side, an accept that keeps failing) is logged at most this often by one
/// `Throttle`.
pub const WARN_INTERVAL: Duration = Duration::from_secs(1);

/// Lets a repeating warning through at most once per `WARN_INTERVAL`, and
/// says how many were held back meanwhile.
#[derive(Debug, Default)]
pub struct Throttle {
    quiet_until: Option<Instant>,
    held_back: u64,
}

/// What a `Throttle` held back before the occurrence it lets through;
/// displays as a suffix for that warning ("" when nothing was).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldBack(pub u64);

impl std::fmt::Display for HeldBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(f, " ({n} more like it not logged)"),
        }
    }
}

impl Throttle {
    /// `Some` when this occurrence may be logged, with the count of those
    /// held back since the last one logged.
    pub fn allow(&mut self, now: Instant) -> Option<HeldBack> {
        if self.quiet_until.is_some_and(|t| now < t) {
            self.held_back += 1;
            return None;
        }
        self.quiet_until = Some(now + WARN_INTERVAL);
        Some(HeldBack(std::mem::take(&mut self.held_back)))
    }
}

/// Lets `main` wait, boundedly, for queued lines before the process exits.
#[derive(Debug)]
pub struct Flusher {
    tx: SyncSender<Message>,
}

impl Flusher {
    /// Waits up to `limit` for the lines queued so far to reach stderr.
    pub fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        let mut marker = Message::Flush(ack_tx);
        loop {
            match self.tx.try_send(marker) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    marker = m;
                    thread::sleep(Duration::from_millis(5));
                }
                Err(TrySendError::Full(_)) => return,
            }
        }
        let _ = ack_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// Installs the logger (`RUST_LOG`, default `info`) with its writer thread.
pub fn init() -> io::Result<Flusher> {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&dropped);
    thread::Builder::new().name("lb-log".into()).spawn(move || write_lines(&rx, &counted))?;
    let raw = std::env::var("RUST_LOG").ok();
    let spec = requested(raw.as_deref());
    let why = rejected(spec);
    let mut builder = env_logger::Builder::new();
    // RUST_LOG_STYLE still picks colours.
    if let Ok(style) = std::env::var("RUST_LOG_STYLE") {
        builder.parse_write_style(&style);
    }
    let logger = builder
        .parse_filters(if why.is_some() { DEFAULT_SPEC } else { spec })
        .format_timestamp_millis()
        .target(env_logger::Target::Pipe(Box::new(Queue { tx: tx.clone(), dropped })))
        .build();
    log::set_max_level(logger.filter());
    // Fails only if a logger is installed already, which then logs.
    let _ = log::set_boxed_logger(Box::new(logger));
    if let Some(why) = why {
        log::warn!("{why}");
    }
    Ok(Flusher { tx })
}

/// What lb logs when `RUST_LOG` does not say.
const DEFAULT_SPEC: &str = "info";

/// The filter `RUST_LOG` asks for: the default when it is unset or blank.
fn requested(raw: Option<&str>) -> &str {
    raw.filter(|r| !r.trim().is_empty()).unwrap_or(DEFAULT_SPEC)
}

/// Why `spec` is not kept, when none of its directives (before any
/// `/filter`) is for lb: a level alone, or `lb` or one of its modules
/// (`lb::health`) with a valid level or none. A typo such as `warning`
/// reads as a module name, and every line, warnings included, would be
/// lost. `off` for lb is kept: that silence is asked for.
fn rejected(spec: &str) -> Option<String> {
    let is_level =
        |l: &str| ["off", "error", "warn", "info", "debug", "trace"].iter().any(|v| l.eq_ignore_ascii_case(v));
    let directives = spec.split('/').next().unwrap_or(spec);
    let for_lb = directives.split(',').map(str::trim).filter(|d| !d.is_empty()).any(|d| {
        let (name, level) = match d.split_once('=') {
            Some((name, level)) => (Some(name.trim()), Some(level.trim())),
            None if is_level(d) => (None, Some(d)),
            None => (Some(d), None),
        };
        name.is_none_or(|n| n == "lb" || n.starts_with("lb::")) && level.is_none_or(is_level)
    });
    if for_lb {
        return None;
    }
    Some(format!(
        "RUST_LOG='{}' lets no line of lb's through (a level is error, warn, info, debug, trace or off, \
         alone or as lb=LEVEL or lb::MODULE=LEVEL); logging at {DEFAULT_SPEC}",
        spec.escape_debug()
    ))
}

fn write_lines(rx: &Receiver<Message>, dropped: &AtomicU64) {
    let stderr = io::stderr();
    for message in rx {
        let mut out = stderr.lock();
        match message {
            Message::Line(line) => {
                let _ = out.write_all(&line);
                note_dropped(&mut out, dropped);
            }
            Message::Flush(ack) => {
                note_dropped(&mut out, dropped);
                let _ = out.flush();
                let _ = ack.try_send(());
            }
        }
    }
}

/// Says how many lines were dropped since the last such note. The lines
/// were dropped after some of those already written, so the note comes a
/// little late, never early.
fn note_dropped(out: &mut impl Write, dropped: &AtomicU64) {
    let lost = dropped.swap(0, Ordering::Relaxed);
    if lost > 0 {
        let _ = writeln!(out, "[lb] {lost} log lines were dropped: stderr was not taking them fast enough");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeating_warning_is_let_through_once_per_interval_with_a_count_of_the_rest() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        assert_eq!(t.allow(t0), Some(HeldBack(0)));
        assert_eq!(t.allow(t0 + Duration::from_millis(10)), None);
        assert_eq!(t.allow(t0 + WARN_INTERVAL - Duration::from_millis(1)), None);
        assert_eq!(t.allow(t0 + WARN_INTERVAL), Some(HeldBack(2)));
        assert_eq!(t.allow(t0 + 3 * WARN_INTERVAL), Some(HeldBack(0)), "nothing held back since");
    }

    /// The spec `init` installs for `raw`, and the warning it logs.
    fn chosen(raw: Option<&str>) -> (String, Option<String>) {
        let spec = requested(raw);
        match rejected(spec) {
            Some(why) => (DEFAULT_SPEC.to_string(), Some(why)),
            None => (spec.to_string(), None),
        }
    }

    #[test]
    fn a_rust_log_that_lets_no_line_of_lbs_through_falls_back_to_info_with_the_reason() {
        for typo in ["warning", "garbage", "[", "lbx=info", "warning,mio=off", ",", "lb=verbose", "mio=debug"] {
            let (spec, why) = chosen(Some(typo));
            assert_eq!(spec, "info", "{typo}");
            let why = why.expect("a reason");
            assert!(why.starts_with(&format!("RUST_LOG='{typo}' lets no line of lb's through")), "{why}");
        }
        let (_, why) = chosen(Some("bad\nline"));
        assert!(!why.expect("a reason").contains('\n'), "one line");
    }

    #[test]
    fn a_rust_log_that_names_a_level_or_says_off_is_kept() {
        for spec in [
            "warn",
            "debug",
            "lb=trace",
            "lb::worker=debug,info",
            "lb::health=debug",
            "lb::worker=trace",
            "off",
            "lb=off",
            "error,lb=OFF",
            "info/listening",
            "lb",
        ] {
            assert_eq!(chosen(Some(spec)), (spec.to_string(), None), "{spec}");
        }
    }

    #[test]
    fn an_unset_or_blank_rust_log_means_info() {
        for raw in [None, Some(""), Some("  ")] {
            assert_eq!(chosen(raw), ("info".to_string(), None), "{raw:?}");
        }
    }

    #[test]
    fn held_back_warnings_are_named_only_when_there_were_some() {
        assert_eq!(HeldBack(0).to_string(), "");
        assert_eq!(HeldBack(3).to_string(), " (3 more like it not logged)");
    }

    #[test]
    fn a_full_queue_drops_and_counts_lines_instead_of_waiting() {
        let (tx, rx) = mpsc::sync_channel(1);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut q = Queue { tx, dropped: Arc::clone(&dropped) };
        assert_eq!(q.write(b"one\n").expect("queued"), 4);
        // Nobody drains the queue: these return at once.
        assert_eq!(q.write(b"two\n").expect("dropped"), 4);
        assert_eq!(q.write(b"three\n").expect("dropped"), 6);
        assert_eq!(dropped.load(Ordering::Relaxed), 2);
        match rx.try_recv() {
            Ok(Message::Line(l)) => assert_eq!(l, b"one\n"),
            _ => panic!("the first line was queued"),
        }
    }

    #[test]
    fn dropped_lines_are_reported_once() {
        let dropped = AtomicU64::new(3);
        let mut out = Vec::new();
        note_dropped(&mut out, &dropped);
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.starts_with("[lb] 3 log lines were dropped"), "{text}");
        let mut again = Vec::new();
        note_dropped(&mut again, &dropped);
        assert!(again.is_empty(), "the count was reset");
    }
}
