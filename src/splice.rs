//! When one relay direction should move its bytes by splice(2) through a
//! pipe and when by copying through a buffer: a pure policy fed with the
//! size of each read, free of I/O so it can be tested alone. The relay
//! asks [`SplicePolicy::wants_splice`] only when nothing is pending in the
//! current mechanism, so acting on the answer never reorders bytes.

use crate::config::SpliceMode;

/// Consecutive reads that filled the whole buffer before a copying
/// direction is treated as bulk. Four 32 KiB reads: a typical HTTP
/// response never gets there, a download does within its first 128 KiB.
pub const FULL_READS_TO_SPLICE: u8 = 4;
/// Bytes a copying direction may move while the other direction stays
/// silent before it is treated as bulk, counting reads of at least a
/// quarter of the buffer (smaller ones would splice small). A relay
/// that keeps up with its sender reads each segment as it lands, so reads
/// of a fast one-way flow need not fill the buffer for seconds; a
/// request/response exchange restarts this count with every request.
pub const ONE_WAY_BYTES_TO_SPLICE: u32 = 1 << 20;
/// Consecutive small splices before a direction goes back to copying,
/// where a small message costs fewer syscalls (no pipe round trip).
pub const SMALL_READS_TO_COPY: u8 = 8;
/// A splice is small below this fraction of the pipe's room.
const SMALL_FRACTION: usize = 4;

/// Whether `n` bytes are a small read or splice for `room` bytes of space:
/// under 1 / [`SMALL_FRACTION`] of it. One definition for both ways of
/// switching, so that neither switches into a state the other undoes.
#[inline]
fn is_small(n: usize, room: usize) -> bool {
    n.saturating_mul(SMALL_FRACTION) < room
}

/// What the direction should use next, and the evidence gathered so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Copy; `full_reads` consecutive reads filled the buffer, and
    /// `one_way` bytes were read since the other direction last read any.
    Copy { full_reads: u8, one_way: u32 },
    /// Splice; `small_reads` consecutive splices were small.
    Splice { small_reads: u8 },
    /// Copy for good: `--splice never`, or splice proved unsupported.
    CopyOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplicePolicy {
    mode: SpliceMode,
    want: Want,
}

impl SplicePolicy {
    pub fn new(mode: SpliceMode) -> SplicePolicy {
        let want = match mode {
            SpliceMode::Never => Want::CopyOnly,
            SpliceMode::Auto => Want::Copy { full_reads: 0, one_way: 0 },
            SpliceMode::Always => Want::Splice { small_reads: 0 },
        };
        SplicePolicy { mode, want }
    }

    pub fn wants_splice(&self) -> bool {
        matches!(self.want, Want::Splice { .. })
    }

    /// A copy read of `n` bytes into a buffer of `room` bytes.
    #[inline]
    pub fn copied(&mut self, n: usize, room: usize) {
        if let Want::Copy { full_reads, one_way } = &mut self.want {
            // Only reads a splice would not count as small: a flow of small
            // reads would splice small and go back to copying, over and over.
            if !is_small(n, room) {
                *one_way = one_way.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
            }
            if n < room {
                *full_reads = 0;
            } else {
                *full_reads += 1;
            }
            if *full_reads >= FULL_READS_TO_SPLICE || *one_way >= ONE_WAY_BYTES_TO_SPLICE {
                self.want = Want::Splice { small_reads: 0 };
            }
        }
    }

    /// The other direction of the pair read bytes: this one is not a
    /// one-way flow, for now.
    #[inline]
    pub fn other_way_moved(&mut self) {
        if let Want::Copy { one_way, .. } = &mut self.want {
            *one_way = 0;
        }
    }

    /// A splice of `n` bytes into a pipe with `room` bytes free.
    #[inline]
    pub fn spliced(&mut self, n: usize, room: usize) {
        if self.mode != SpliceMode::Auto {
            return;
        }
        if let Want::Splice { small_reads } = &mut self.want {
            if !is_small(n, room) {
                *small_reads = 0;
            } else if *small_reads + 1 >= SMALL_READS_TO_COPY {
                self.want = Want::Copy { full_reads: 0, one_way: 0 };
            } else {
                *small_reads += 1;
            }
        }
    }

    /// No pipe was available: copy, and try again only once the flow has
    /// proved itself bulk anew, so a busy pool is not asked on every read.
    pub fn exhausted(&mut self) {
        if self.want != Want::CopyOnly {
            self.want = Want::Copy { full_reads: 0, one_way: 0 };
        }
    }

    /// The direction left the kernel relay, whose passed bytes wait where
    /// splice cannot reach them: copy from now on (not a fallback to count).
    pub fn copy_only(&mut self) {
        self.want = Want::CopyOnly;
    }

    /// Splice failed as unsupported for these sockets: copy from now on.
    /// True the first time, so the fallback is counted once per direction
    /// whatever the policy wanted when it was found out.
    pub fn unsupported(&mut self) -> bool {
        let first = self.want != Want::CopyOnly;
        self.want = Want::CopyOnly;
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOM: usize = 32 * 1024;

    fn auto() -> SplicePolicy {
        SplicePolicy::new(SpliceMode::Auto)
    }

    #[test]
    fn auto_starts_on_copy_and_splices_after_consecutive_full_reads() {
        let mut p = auto();
        assert!(!p.wants_splice());
        for _ in 0..FULL_READS_TO_SPLICE - 1 {
            p.copied(ROOM, ROOM);
            assert!(!p.wants_splice());
        }
        p.copied(ROOM, ROOM);
        assert!(p.wants_splice());
    }

    #[test]
    fn a_short_read_restarts_the_count_towards_splicing() {
        let mut p = auto();
        for _ in 0..10 {
            for _ in 0..FULL_READS_TO_SPLICE - 1 {
                p.copied(ROOM, ROOM);
            }
            p.copied(ROOM - 1, ROOM);
            // The next request.
            p.other_way_moved();
        }
        assert!(!p.wants_splice(), "request/response traffic never fills the buffer long enough");
    }

    #[test]
    fn a_one_way_flow_in_short_reads_splices_after_a_mebibyte() {
        let mut p = auto();
        let read = 16 * 1024;
        for _ in 0..ONE_WAY_BYTES_TO_SPLICE as usize / read - 1 {
            p.copied(read, ROOM);
            assert!(!p.wants_splice());
        }
        p.copied(read, ROOM);
        assert!(p.wants_splice(), "a mebibyte one way, with no reply, is bulk");
    }

    #[test]
    fn a_one_way_flow_of_small_reads_stays_on_copy_instead_of_switching_back_and_forth() {
        let mut p = auto();
        let read = ROOM / SMALL_FRACTION - 1;
        for _ in 0..4 * ONE_WAY_BYTES_TO_SPLICE as usize / read {
            p.copied(read, ROOM);
            assert!(!p.wants_splice(), "reads a splice would count as small never switch it");
        }
    }

    #[test]
    fn bytes_the_other_way_restart_the_one_way_count() {
        let mut p = auto();
        let read = 16 * 1024;
        for _ in 0..10 {
            for _ in 0..ONE_WAY_BYTES_TO_SPLICE as usize / read - 1 {
                p.copied(read, ROOM);
            }
            p.other_way_moved();
        }
        assert!(!p.wants_splice(), "large responses to requests are not a one-way flow");
    }

    #[test]
    fn auto_goes_back_to_copy_after_consecutive_small_splices() {
        let mut p = auto();
        for _ in 0..FULL_READS_TO_SPLICE {
            p.copied(ROOM, ROOM);
        }
        for _ in 0..SMALL_READS_TO_COPY - 1 {
            p.spliced(100, ROOM);
            assert!(p.wants_splice());
        }
        p.spliced(100, ROOM);
        assert!(!p.wants_splice());
    }

    #[test]
    fn a_large_splice_restarts_the_count_towards_copying() {
        let mut p = auto();
        for _ in 0..FULL_READS_TO_SPLICE {
            p.copied(ROOM, ROOM);
        }
        for _ in 0..10 {
            for _ in 0..SMALL_READS_TO_COPY - 1 {
                p.spliced(1, ROOM);
            }
            p.spliced(ROOM / SMALL_FRACTION, ROOM);
        }
        assert!(p.wants_splice());
    }

    #[test]
    fn always_splices_from_the_start_and_whatever_the_read_size() {
        let mut p = SplicePolicy::new(SpliceMode::Always);
        assert!(p.wants_splice());
        for _ in 0..100 {
            p.spliced(1, ROOM);
        }
        assert!(p.wants_splice());
    }

    #[test]
    fn never_copies_whatever_the_traffic() {
        let mut p = SplicePolicy::new(SpliceMode::Never);
        for _ in 0..100 {
            p.copied(ROOM, ROOM);
        }
        assert!(!p.wants_splice());
    }

    #[test]
    fn exhaustion_falls_back_to_copy_until_the_flow_is_bulk_again() {
        for mode in [SpliceMode::Always, SpliceMode::Auto] {
            let mut p = SplicePolicy::new(mode);
            if mode == SpliceMode::Auto {
                for _ in 0..FULL_READS_TO_SPLICE {
                    p.copied(ROOM, ROOM);
                }
            }
            p.exhausted();
            assert!(!p.wants_splice(), "{mode:?}");
            for _ in 0..FULL_READS_TO_SPLICE {
                p.copied(ROOM, ROOM);
            }
            assert!(p.wants_splice(), "{mode:?} retries once bulk again");
        }
    }

    #[test]
    fn unsupported_is_reported_once_even_after_auto_went_back_to_copying() {
        let mut p = auto();
        for _ in 0..FULL_READS_TO_SPLICE {
            p.copied(ROOM, ROOM);
        }
        for _ in 0..SMALL_READS_TO_COPY {
            p.spliced(1, ROOM);
        }
        assert!(!p.wants_splice(), "small splices took auto back to copying");
        assert!(p.unsupported(), "the first report counts");
        assert!(!p.unsupported(), "a second report of the same direction does not");
        for _ in 0..100 {
            p.copied(ROOM, ROOM);
        }
        assert!(!p.wants_splice());
    }

    #[test]
    fn unsupported_splice_means_copy_for_good() {
        let mut p = SplicePolicy::new(SpliceMode::Always);
        assert!(p.unsupported());
        for _ in 0..100 {
            p.copied(ROOM, ROOM);
        }
        p.exhausted();
        assert!(!p.wants_splice());
    }
}
