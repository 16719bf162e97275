//! Counters per VM and queue pair. Workers add a whole batch at once, so the per-packet path
//! touches no shared cache line.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use crate::datapath::PathCounts;
use crate::policy::Valve;

/// Upper bounds of the batch-size histogram buckets (packets per flush); the last is +Inf.
pub const BATCH_BOUNDS: [u64; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/// A histogram of batch sizes (non-cumulative buckets, the last one for larger batches).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 10],
    sum: AtomicU64,
}

/// A plain copy of a [`Histogram`].
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Counts per bucket of [`BATCH_BOUNDS`] (non-cumulative), then the overflow bucket.
    pub buckets: [u64; 10],
    /// Sum of all observed values.
    pub sum: u64,
}

impl Histogram {
    /// Records one batch of `n` packets.
    pub fn observe(&self, n: u64) {
        let i = BATCH_BOUNDS
            .iter()
            .position(|&b| n <= b)
            .unwrap_or(BATCH_BOUNDS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(n, Relaxed);
    }

    /// A plain copy.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Relaxed)),
            sum: self.sum.load(Relaxed),
        }
    }
}

impl HistogramSnapshot {
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    fn add(&mut self, o: &HistogramSnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets) {
            *a += b;
        }
        self.sum += o.sum;
    }
}

macro_rules! queue_counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Counters of one queue pair.
        #[derive(Debug, Default)]
        pub struct QueueStats {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
            /// Packets per RX interrupt flush.
            pub rx_batches: Histogram,
            /// Packets per TX drain while kicks were held.
            pub tx_batches: Histogram,
        }

        /// Plain counters of one queue pair, for reports (counters a peer does not know read
        /// as zero).
        #[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
        #[serde(default)]
        pub struct QueueSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
            /// Packets per RX interrupt flush.
            pub rx_batches: HistogramSnapshot,
            /// Packets per TX drain while kicks were held.
            pub tx_batches: HistogramSnapshot,
        }

        impl QueueStats {
            /// A plain copy of the counters.
            pub fn snapshot(&self) -> QueueSnapshot {
                QueueSnapshot {
                    $($name: self.$name.load(Relaxed),)*
                    rx_batches: self.rx_batches.snapshot(),
                    tx_batches: self.tx_batches.snapshot(),
                }
            }
        }

        impl QueueSnapshot {
            /// Adds `o` to `self`.
            pub fn add(&mut self, o: &QueueSnapshot) {
                $(self.$name += o.$name;)*
                self.rx_batches.add(&o.rx_batches);
                self.tx_batches.add(&o.tx_batches);
            }

            /// `(name, value, help)` of every plain counter, for exporters.
            pub fn counters(&self) -> Vec<(&'static str, u64, &'static str)> {
                vec![$((stringify!($name), self.$name, concat!($($doc),*).trim()),)*]
            }
        }
    };
}

queue_counters! {
    /// Frames the guest sent (TX ring → tap).
    tx_packets,
    /// Payload bytes the guest sent.
    tx_bytes,
    /// Frames delivered to the guest (tap → RX ring).
    rx_packets,
    /// Payload bytes delivered to the guest.
    rx_bytes,
    /// Malformed TX chains rejected.
    tx_bad_chains,
    /// Malformed RX chains rejected.
    rx_bad_chains,
    /// TX frames the tap refused.
    tx_dropped,
    /// RX frames dropped (too large for a non-mergeable buffer, or abandoned at ring stop).
    rx_dropped,
    /// Tap I/O errors.
    tap_errors,
    /// Guest kicks on the TX queue.
    tx_kicks,
    /// Guest kicks on the RX queue.
    rx_kicks,
    /// Interrupts (call eventfd writes) for the TX queue.
    tx_interrupts,
    /// Interrupts for the RX queue.
    rx_interrupts,
    /// Worker wake-ups.
    wakeups,
    /// RX interrupt timer expiries.
    rx_timer_fires,
    /// TX drain timer expiries.
    tx_timer_fires,
    /// RX flushes forced by the frame cap.
    rx_flush_frame_cap,
    /// RX flushes forced by the guest running low on RX buffers.
    rx_flush_low_water,
    /// RX flushes the guest's EVENT_IDX used_event asked for (it batches by itself).
    flush_used_event,
    /// TX drains forced by the frame cap (a kick while kicks were held).
    tx_flush_frame_cap,
    /// Control frames the guest sent on this queue (consumed, never forwarded).
    control_frames,
    /// Times the guest's avail index was found more than a ring ahead (the ring read as empty).
    bad_avail_index,
}

impl QueueStats {
    /// Folds one TX batch in.
    pub fn add_tx(&self, c: &PathCounts) {
        self.tx_packets.fetch_add(c.packets, Relaxed);
        self.tx_bytes.fetch_add(c.bytes, Relaxed);
        self.tx_bad_chains.fetch_add(c.bad_chains, Relaxed);
        self.tx_dropped.fetch_add(c.dropped, Relaxed);
        self.tap_errors.fetch_add(c.tap_errors, Relaxed);
        self.bad_avail_index.fetch_add(c.bad_avail, Relaxed);
        if c.control > 0 {
            self.control_frames.fetch_add(c.control, Relaxed);
        }
    }

    /// Counts a flush a safety valve forced: the one place that maps valves to counters.
    pub fn count_valve(&self, v: Valve) {
        let c = match v {
            Valve::FrameCap => &self.rx_flush_frame_cap,
            Valve::LowWater => &self.rx_flush_low_water,
            Valve::UsedEvent => &self.flush_used_event,
            Valve::TxFrameCap => &self.tx_flush_frame_cap,
        };
        c.fetch_add(1, Relaxed);
    }

    /// Folds one RX batch in.
    pub fn add_rx(&self, c: &PathCounts) {
        self.rx_packets.fetch_add(c.packets, Relaxed);
        self.rx_bytes.fetch_add(c.bytes, Relaxed);
        self.rx_bad_chains.fetch_add(c.bad_chains, Relaxed);
        self.rx_dropped.fetch_add(c.dropped, Relaxed);
        self.tap_errors.fetch_add(c.tap_errors, Relaxed);
        self.bad_avail_index.fetch_add(c.bad_avail, Relaxed);
    }
}

/// Lines per second one VM may log about problems its guest or frontend causes; more are
/// counted and the next line logged says how many were suppressed.
pub const LOG_LINES_PER_SEC: u64 = 5;

/// A per-second budget, shared by threads: by default the per-VM budget of log lines
/// ([`LOG_LINES_PER_SEC`]), so that nothing a guest or frontend does can flood the host's log;
/// [`LogLimiter::per_second`] gives another budget (RARP announcements).
#[derive(Debug)]
pub struct LogLimiter {
    budget: u64,
    second: AtomicU64,
    lines: AtomicU64,
    since_last: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::per_second(LOG_LINES_PER_SEC)
    }
}

impl LogLimiter {
    /// A budget of `budget` events per second of the clock.
    pub fn per_second(budget: u64) -> Self {
        LogLimiter {
            budget,
            second: AtomicU64::new(0),
            lines: AtomicU64::new(0),
            since_last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged at `now_ns` (any monotonic clock): `Some(n)` if so, `n`
    /// being the lines suppressed since the last one logged; `None` (counted) if not.
    pub fn allow(&self, now_ns: u64) -> Option<u64> {
        let sec = now_ns / 1_000_000_000 + 1;
        if self.second.swap(sec, Relaxed) != sec {
            self.lines.store(0, Relaxed);
        }
        if self.lines.fetch_add(1, Relaxed) < self.budget {
            Some(self.since_last.swap(0, Relaxed))
        } else {
            self.since_last.fetch_add(1, Relaxed);
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }

    /// Lines suppressed so far.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Relaxed)
    }
}

/// Counters of one VM.
#[derive(Debug)]
pub struct VmMetrics {
    /// Per queue pair.
    pub queues: Vec<QueueStats>,
    /// Frontend connections accepted.
    pub connections: AtomicU64,
    /// Connections refused by the peer check (not root, not the daemon's user, not in the
    /// socket's group).
    pub refused_peers: AtomicU64,
    /// Connections ended because code serving the VM panicked (the slot goes on serving).
    pub panics: AtomicU64,
    /// Connections ended because the frontend's guest memory went away under the backend
    /// (a memfd truncated after SET_MEM_TABLE: SIGBUS caught).
    pub memory_faults: AtomicU64,
    /// RARP announcements sent for the guest after it migrated here (`SEND_RARP`).
    pub announcements: AtomicU64,
    /// `SEND_RARP` requests refused: another MAC than the VM's, or more than
    /// [`ANNOUNCE_PER_S`](crate::announce::ANNOUNCE_PER_S) a second.
    pub announcements_refused: AtomicU64,
    /// The VM's log-line budget.
    pub log: LogLimiter,
}

/// VM-wide counters, for reports.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmCounters {
    /// Frontend connections accepted.
    pub connections: u64,
    /// Connections refused by the peer check.
    pub refused_peers: u64,
    /// Connections ended by a panic.
    pub panics: u64,
    /// Connections ended by a guest memory fault.
    pub memory_faults: u64,
    /// RARP announcements sent after a migration.
    #[serde(default)]
    pub announcements: u64,
    /// `SEND_RARP` requests refused (another MAC, or over the rate limit).
    #[serde(default)]
    pub announcements_refused: u64,
    /// Log lines suppressed by the per-VM budget.
    #[serde(default)]
    pub log_suppressed: u64,
}

impl VmCounters {
    /// `(name, value, help)` of every counter, for exporters.
    pub fn counters(&self) -> [(&'static str, u64, &'static str); 7] {
        [
            ("connections", self.connections, "Frontend connections accepted"),
            (
                "refused_peers",
                self.refused_peers,
                "Connections refused by the peer check (not root, not the daemon's user, not in the socket's group)",
            ),
            ("panics", self.panics, "Connections ended because code serving the VM panicked"),
            (
                "memory_faults",
                self.memory_faults,
                "Connections ended because the frontend's guest memory went away (SIGBUS caught)",
            ),
            (
                "announcements",
                self.announcements,
                "RARP announcements sent for the guest after it migrated here (SEND_RARP)",
            ),
            (
                "announcements_refused",
                self.announcements_refused,
                "SEND_RARP requests refused: another MAC than the VM's, or over the rate limit",
            ),
            (
                "log_suppressed",
                self.log_suppressed,
                "Log lines about the VM suppressed by its budget of a few lines per second",
            ),
        ]
    }
}

impl VmMetrics {
    /// Zeroed counters for `queue_pairs` queue pairs.
    pub fn new(queue_pairs: usize) -> Self {
        VmMetrics {
            queues: (0..queue_pairs).map(|_| QueueStats::default()).collect(),
            connections: AtomicU64::new(0),
            refused_peers: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            memory_faults: AtomicU64::new(0),
            announcements: AtomicU64::new(0),
            announcements_refused: AtomicU64::new(0),
            log: LogLimiter::default(),
        }
    }

    /// The VM-wide counters.
    pub fn vm_counters(&self) -> VmCounters {
        VmCounters {
            connections: self.connections.load(Relaxed),
            refused_peers: self.refused_peers.load(Relaxed),
            panics: self.panics.load(Relaxed),
            memory_faults: self.memory_faults.load(Relaxed),
            announcements: self.announcements.load(Relaxed),
            announcements_refused: self.announcements_refused.load(Relaxed),
            log_suppressed: self.log.suppressed(),
        }
    }

    /// Sum over queue pairs.
    pub fn total(&self) -> QueueSnapshot {
        let mut t = QueueSnapshot::default();
        for q in &self.queues {
            t.add(&q.snapshot());
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_totals() {
        let h = Histogram::default();
        for n in [1, 2, 3, 64, 65, 1000] {
            h.observe(n);
        }
        let s = h.snapshot();
        assert_eq!(s.buckets, [1, 1, 1, 0, 0, 0, 1, 1, 0, 1]);
        assert_eq!(s.sum, 1135);
        assert_eq!(s.count(), 6);
        let m = VmMetrics::new(2);
        m.queues[0].tx_kicks.fetch_add(3, Relaxed);
        m.queues[1].tx_kicks.fetch_add(4, Relaxed);
        m.queues[1].rx_batches.observe(5);
        let t = m.total();
        assert_eq!(t.tx_kicks, 7);
        assert_eq!(t.rx_batches.count(), 1);
        assert!(t
            .counters()
            .iter()
            .any(|(n, v, h)| *n == "tx_kicks" && *v == 7 && h.contains("kicks")));
    }

    #[test]
    fn the_log_budget_allows_a_few_lines_per_second_and_reports_the_rest() {
        let l = LogLimiter::default();
        let s = 1_000_000_000u64;
        let allowed = (0..100)
            .filter(|i| l.allow(5 * s + i * 1000).is_some())
            .count();
        assert_eq!(allowed as u64, LOG_LINES_PER_SEC);
        assert_eq!(l.suppressed(), 100 - LOG_LINES_PER_SEC);
        // The next second's first line carries the count of the lines suppressed before it.
        assert_eq!(l.allow(6 * s), Some(100 - LOG_LINES_PER_SEC));
        assert_eq!(l.allow(6 * s + 1), Some(0));
        // A clock starting at zero is a second like any other.
        let z = LogLimiter::default();
        assert_eq!(z.allow(0), Some(0));
    }
}
