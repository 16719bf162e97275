//! Counters per VM and queue pair. Workers add a whole batch at once, so the per-packet path
//! touches no shared cache line.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use crate::datapath::PathCounts;

/// Counters of one queue pair.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Frames the guest sent (TX ring → tap).
    pub tx_packets: AtomicU64,
    /// Payload bytes the guest sent.
    pub tx_bytes: AtomicU64,
    /// Frames delivered to the guest (tap → RX ring).
    pub rx_packets: AtomicU64,
    /// Payload bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Malformed TX chains rejected.
    pub tx_bad_chains: AtomicU64,
    /// Malformed RX chains rejected.
    pub rx_bad_chains: AtomicU64,
    /// TX frames the tap refused.
    pub tx_dropped: AtomicU64,
    /// RX frames dropped (too large for a non-mergeable buffer, or abandoned at ring stop).
    pub rx_dropped: AtomicU64,
    /// Tap I/O errors.
    pub tap_errors: AtomicU64,
    /// Guest kicks on the TX queue.
    pub tx_kicks: AtomicU64,
    /// Guest kicks on the RX queue.
    pub rx_kicks: AtomicU64,
    /// Interrupts (call eventfd writes) for the TX queue.
    pub tx_interrupts: AtomicU64,
    /// Interrupts for the RX queue.
    pub rx_interrupts: AtomicU64,
    /// Worker wake-ups.
    pub wakeups: AtomicU64,
}

impl QueueStats {
    /// Folds one TX batch in.
    pub fn add_tx(&self, c: &PathCounts) {
        self.tx_packets.fetch_add(c.packets, Relaxed);
        self.tx_bytes.fetch_add(c.bytes, Relaxed);
        self.tx_bad_chains.fetch_add(c.bad_chains, Relaxed);
        self.tx_dropped.fetch_add(c.dropped, Relaxed);
        self.tap_errors.fetch_add(c.tap_errors, Relaxed);
    }

    /// Folds one RX batch in.
    pub fn add_rx(&self, c: &PathCounts) {
        self.rx_packets.fetch_add(c.packets, Relaxed);
        self.rx_bytes.fetch_add(c.bytes, Relaxed);
        self.rx_bad_chains.fetch_add(c.bad_chains, Relaxed);
        self.rx_dropped.fetch_add(c.dropped, Relaxed);
        self.tap_errors.fetch_add(c.tap_errors, Relaxed);
    }

    /// A plain copy of the counters.
    pub fn snapshot(&self) -> QueueSnapshot {
        QueueSnapshot {
            tx_packets: self.tx_packets.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            rx_packets: self.rx_packets.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_bad_chains: self.tx_bad_chains.load(Relaxed),
            rx_bad_chains: self.rx_bad_chains.load(Relaxed),
            tx_dropped: self.tx_dropped.load(Relaxed),
            rx_dropped: self.rx_dropped.load(Relaxed),
            tap_errors: self.tap_errors.load(Relaxed),
            tx_kicks: self.tx_kicks.load(Relaxed),
            rx_kicks: self.rx_kicks.load(Relaxed),
            tx_interrupts: self.tx_interrupts.load(Relaxed),
            rx_interrupts: self.rx_interrupts.load(Relaxed),
            wakeups: self.wakeups.load(Relaxed),
        }
    }
}

/// Plain counters of one queue pair, for reports.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct QueueSnapshot {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bad_chains: u64,
    pub rx_bad_chains: u64,
    pub tx_dropped: u64,
    pub rx_dropped: u64,
    pub tap_errors: u64,
    pub tx_kicks: u64,
    pub rx_kicks: u64,
    pub tx_interrupts: u64,
    pub rx_interrupts: u64,
    pub wakeups: u64,
}

/// Counters of one VM.
#[derive(Debug)]
pub struct VmMetrics {
    /// Per queue pair.
    pub queues: Vec<QueueStats>,
    /// Frontend connections accepted.
    pub connections: AtomicU64,
}

impl VmMetrics {
    /// Zeroed counters for `queue_pairs` queue pairs.
    pub fn new(queue_pairs: usize) -> Self {
        VmMetrics {
            queues: (0..queue_pairs).map(|_| QueueStats::default()).collect(),
            connections: AtomicU64::new(0),
        }
    }

    /// Sum over queue pairs.
    pub fn total(&self) -> QueueSnapshot {
        let mut t = QueueSnapshot::default();
        for q in &self.queues {
            let s = q.snapshot();
            t.tx_packets += s.tx_packets;
            t.tx_bytes += s.tx_bytes;
            t.rx_packets += s.rx_packets;
            t.rx_bytes += s.rx_bytes;
            t.tx_bad_chains += s.tx_bad_chains;
            t.rx_bad_chains += s.rx_bad_chains;
            t.tx_dropped += s.tx_dropped;
            t.rx_dropped += s.rx_dropped;
            t.tap_errors += s.tap_errors;
            t.tx_kicks += s.tx_kicks;
            t.rx_kicks += s.rx_kicks;
            t.tx_interrupts += s.tx_interrupts;
            t.rx_interrupts += s.rx_interrupts;
            t.wakeups += s.wakeups;
        }
        t
    }
}
