//! The queue-pair worker: the mechanism that runs one RX/TX ring pair on its own thread.
//!
//! Each wake-up runs named steps in rounds ([`MAX_ROUNDS`] at most, then it yields to the event
//! loop): a **TX round** (guest → tap), **TX signalling** (kicks held or not, completions
//! signalled), the **control frames** the TX round took off the ring, and an **RX round** (tap →
//! guest, control replies first) with its interrupt decision. Every decision comes from the
//! pure [`policy`](crate::policy) functions; this module arms timers, touches rings and counts.
//!
//! The worker owns its event sources besides the vring kicks (the tap queue, a reschedule
//! eventfd, the RX interrupt timer and the TX drain timer) and registers them itself in the
//! event loop of its thread ([`Worker::register`]), with ids from [`WorkerEvent`].

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::{Acquire, Relaxed};

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_user_backend::{VringEpollHandler, VringState, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_NOTIFY_ON_EMPTY;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::batching::VmBatching;
use crate::datapath::{
    free_buffers, interrupts_off, release_kicks, should_notify, used_event, DeliverError,
    HdrLayout, PathCounts, RxPath, TxPath, TxRun, BATCH_BUDGET,
};
use crate::device::{GuestMem, Vring};
use crate::dirty_log::DirtyLog;
use crate::metrics::{QueueStats, VmMetrics};
use crate::policy::{
    rx_signal, tx_signal_due, Delays, RxBatch, RxSignal, Valve, Valves, MIN_DELAY_US,
};
use crate::tap_io::{TapIoKind, TapQueue};
use crate::timer::{now_ns, Timer};

/// TX timer periods the ring must stay empty before kicks are re-enabled: short gaps between
/// packets keep kicks off (each kick is a VM exit); a ring idle this long goes back to kicks.
pub const TX_IDLE_PERIODS: u8 = 4;

/// Control replies waiting for an RX buffer, per queue pair; more are dropped and counted.
pub const OUTBOX: usize = 4;

/// Rounds of TX+RX budgets one wake-up may run before yielding to the event loop, so ring
/// stops, exit requests and other events are never starved by a frontend that keeps a ring full.
pub const MAX_ROUNDS: usize = 4;

/// The TX drain timer armed when kicks are held but the policy's TX delay dropped to zero in
/// the meantime: held kicks always have a timer behind them.
const HELD_KICKS_FALLBACK_NS: u64 = MIN_DELAY_US as u64 * 1000;

/// A worker's own event sources in its thread's epoll. vhost-user-backend reserves the ids up
/// to the device's number of vrings (the kicks, then its exit event); ours follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEvent {
    /// The pair's tap queue (readable: frames for the guest; writable: room again).
    Tap,
    /// Work was left after [`MAX_ROUNDS`]: come back through the event loop.
    Resched,
    /// Deferred RX completions must be signalled.
    RxTimer,
    /// The TX ring must be drained while kicks are held.
    TxTimer,
}

impl WorkerEvent {
    const ALL: [WorkerEvent; 4] = [
        WorkerEvent::Tap,
        WorkerEvent::Resched,
        WorkerEvent::RxTimer,
        WorkerEvent::TxTimer,
    ];

    /// The event's id in the epoll of a device with `num_vrings` vrings.
    pub fn id(self, num_vrings: usize) -> u64 {
        num_vrings as u64 + 1 + self as u64
    }

    /// The event an id stands for.
    pub fn from_id(id: u64, num_vrings: usize) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.id(num_vrings) == id)
    }
}

/// What woke a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    RxKick,
    TxKick,
    Event(WorkerEvent),
}

/// What a worker reads from its device on a wake-up.
pub struct Ctx<'a> {
    /// VM name, for logs.
    pub vm: &'a str,
    /// Guest memory.
    pub mem: &'a GuestMem,
    /// Negotiated virtio features.
    pub features: u64,
    /// The virtio-net header layout they give.
    pub hdr: HdrLayout,
    /// The VM's counters.
    pub metrics: &'a VmMetrics,
    /// The pair's counters (one of `metrics.queues`).
    pub stats: &'a QueueStats,
    /// The VM's batching state.
    pub batching: &'a VmBatching,
}

/// Per wake-up facts every step reads.
struct Step<'a> {
    ctx: &'a Ctx<'a>,
    mem: &'a GuestMemoryMmap<DirtyLog>,
    notify_on_empty: bool,
    now: u64,
    delays: Delays,
    valves: Valves,
}

/// Per-queue-pair worker state, owned by that pair's thread.
pub struct Worker {
    tap: TapQueue,
    /// The tap queue's descriptor (for the event loop).
    tap_fd: RawFd,
    rx: RxPath,
    tx: TxPath,
    tap_readable: bool,
    tx_blocked: bool,
    /// Written when work is left after `MAX_ROUNDS`; wakes the worker again through epoll.
    resched: EventFd,
    /// The pair's vrings, remembered so a ring stop can give back held RX chains.
    vrings: Option<[Vring; 2]>,
    /// Fires when deferred RX completions must be signalled.
    rx_timer: Timer,
    /// Fires when the TX ring must be drained while kicks are held.
    tx_timer: Timer,
    /// RX packets completed but not yet signalled.
    rx_unsignalled: u32,
    /// Guest kicks are held off (TX buffering); `tx_timer` is armed whenever this is set.
    tx_held: bool,
    /// Consecutive TX timer drains that found the ring empty.
    tx_idle: u8,
    /// TX completions not yet signalled.
    tx_unsignalled: u32,
    /// When TX completions were last signalled.
    tx_last_signal_ns: u64,
    /// Control replies waiting for an RX buffer.
    outbox: Vec<([u8; control_msg::MAX_FRAME_LEN], usize)>,
    /// The worker's thread has been seen (reported once, for energy accounting).
    thread_seen: bool,
    /// The RX and TX rings have had their first interrupt on this connection.
    told: [bool; 2],
}

impl Worker {
    /// A worker for the tap queue `tap`, written with `io` (an `io_uring` that cannot be set up
    /// falls back to system calls; the second value says why, for the caller to log).
    pub fn new(tap: RawFd, io: TapIoKind) -> io::Result<(Self, Option<io::Error>)> {
        let (queue, fallback) = TapQueue::new(tap, io);
        let w = Worker {
            tap: queue,
            tap_fd: tap,
            rx: RxPath::new(),
            tx: TxPath::new(),
            tap_readable: true,
            tx_blocked: false,
            resched: EventFd::new(EFD_NONBLOCK)?,
            vrings: None,
            rx_timer: Timer::new()?,
            tx_timer: Timer::new()?,
            rx_unsignalled: 0,
            tx_held: false,
            tx_idle: 0,
            tx_unsignalled: 0,
            tx_last_signal_ns: 0,
            outbox: Vec::with_capacity(OUTBOX),
            thread_seen: false,
            told: [false; 2],
        };
        Ok((w, fallback))
    }

    /// How this worker writes to its tap.
    pub fn tap_io(&self) -> TapIoKind {
        self.tap.kind()
    }

    /// True on the first call from the worker's thread, false afterwards.
    pub fn first_event(&mut self) -> bool {
        !std::mem::replace(&mut self.thread_seen, true)
    }

    /// Registers the worker's event sources in its thread's event loop (a device with
    /// `num_vrings` vrings).
    pub fn register<B>(&self, handler: &VringEpollHandler<B>, num_vrings: usize) -> io::Result<()>
    where
        B: vhost_user_backend::VhostUserBackend,
    {
        let sources: [(RawFd, EventSet, WorkerEvent); 4] = [
            (
                self.tap_fd,
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                WorkerEvent::Tap,
            ),
            (self.resched.as_raw_fd(), EventSet::IN, WorkerEvent::Resched),
            (
                self.rx_timer.as_raw_fd(),
                EventSet::IN,
                WorkerEvent::RxTimer,
            ),
            (
                self.tx_timer.as_raw_fd(),
                EventSet::IN,
                WorkerEvent::TxTimer,
            ),
        ];
        for (fd, set, ev) in sources {
            handler.register_listener(fd, set, ev.id(num_vrings))?;
        }
        Ok(())
    }

    /// Frames read from the tap that wait for guest buffers (one half placed, or read ahead).
    pub fn held_rx(&self) -> u64 {
        self.rx.held()
    }

    /// Control replies still waiting for an RX buffer (lost if the connection ends now).
    pub fn queued_replies(&self) -> usize {
        self.outbox.len()
    }

    /// The RX ring is being stopped: give back the chains a half-placed frame holds and drop
    /// the frames read ahead. Returns how many frames were dropped.
    pub fn stop_rx(&mut self) -> u64 {
        let Some(vrings) = self.vrings.clone() else {
            return 0;
        };
        let mut ring = vrings[0].get_mut();
        self.rx.abandon_pending(ring.get_queue_mut())
    }

    /// Handles one event of the worker's thread: `device_event` is the vring index within the
    /// pair (0 RX, 1 TX) or a [`WorkerEvent`] id.
    pub fn on_event(
        &mut self,
        ctx: &Ctx<'_>,
        vrings: &[Vring],
        device_event: u16,
        evset: EventSet,
        num_vrings: usize,
    ) {
        if vrings.len() < 2 {
            return;
        }
        ctx.stats.wakeups.fetch_add(1, Relaxed);
        if self.vrings.is_none() {
            self.vrings = Some([vrings[0].clone(), vrings[1].clone()]);
        }
        let wake = match device_event {
            0 => {
                ctx.stats.rx_kicks.fetch_add(1, Relaxed);
                Wake::RxKick
            }
            1 => {
                ctx.stats.tx_kicks.fetch_add(1, Relaxed);
                if self.tx_held {
                    // With kicks held, only the frame-cap avail_event makes the guest kick.
                    ctx.stats.count_valve(Valve::TxFrameCap);
                }
                Wake::TxKick
            }
            id => match WorkerEvent::from_id(u64::from(id), num_vrings) {
                Some(WorkerEvent::Resched) => {
                    let _ = self.resched.read();
                    Wake::Event(WorkerEvent::Resched)
                }
                Some(WorkerEvent::Tap) => {
                    if evset.contains(EventSet::IN) {
                        self.tap_readable = true;
                    }
                    if evset.contains(EventSet::OUT) {
                        self.tx_blocked = false;
                    }
                    Wake::Event(WorkerEvent::Tap)
                }
                Some(WorkerEvent::RxTimer) => {
                    if !self.rx_timer.ack() {
                        return;
                    }
                    Wake::Event(WorkerEvent::RxTimer)
                }
                Some(WorkerEvent::TxTimer) => {
                    if !self.tx_timer.ack() {
                        return;
                    }
                    ctx.stats.tx_timer_fires.fetch_add(1, Relaxed);
                    Wake::Event(WorkerEvent::TxTimer)
                }
                None => return,
            },
        };
        self.wake(ctx, vrings, wake);
    }

    fn wake(&mut self, ctx: &Ctx<'_>, vrings: &[Vring], wake: Wake) {
        let now = now_ns();
        let mem = ctx.mem.memory();
        let s = Step {
            ctx,
            mem: &mem,
            notify_on_empty: ctx.features & (1 << VIRTIO_F_NOTIFY_ON_EMPTY) != 0,
            now,
            delays: ctx.batching.delays(now, ctx.metrics),
            valves: ctx.batching.valves(),
        };
        let mut rx_ring = vrings[0].get_mut();
        let mut tx_ring = vrings[1].get_mut();
        let rx_ok = rx_ring.is_enabled() && rx_ring.get_queue().ready();
        let tx_ok = tx_ring.is_enabled() && tx_ring.get_queue().ready();
        for (i, (ring, ok)) in [(&rx_ring, rx_ok), (&tx_ring, tx_ok)]
            .into_iter()
            .enumerate()
        {
            if ok && !self.told[i] {
                // Once per ring and connection, as soon as the ring runs: one interrupt, and the
                // ring's start logged for operators following a restart or a migration. With
                // QEMU this first wake-up may come before the real call eventfd is in place (it
                // then goes to the masked notifier): `vring.rs` signals every new call eventfd
                // too.
                self.told[i] = true;
                if let Some(call) = ring.get_call() {
                    let _ = call.notify();
                }
                if ctx.metrics.log.allow(now).is_none() {
                    continue;
                }
                let q = ring.get_queue();
                tracing::info!(
                    vm = %ctx.vm,
                    ring = if i == 0 { "RX" } else { "TX" },
                    next_avail = q.next_avail(),
                    next_used = q.next_used(),
                    avail_idx = ?q.avail_idx(s.mem, Acquire).map(|w| w.0).ok(),
                    used_idx = ?q.used_idx(s.mem, Acquire).map(|w| w.0).ok(),
                    event_idx = q.event_idx_enabled(),
                    "ring started"
                );
            }
        }
        tracing::trace!(rx_ok, tx_ok, ?wake, delays = ?s.delays, "worker wake-up");
        if !tx_ok && self.tx_held {
            // A disabled or stopped TX ring has nothing to drain.
            self.tx_held = false;
            self.tx_timer.disarm();
        }
        for round in 0..MAX_ROUNDS {
            let mut again = false;
            if tx_ok && !self.tx_blocked {
                let r = self.tx_round(&s, &mut tx_ring, wake, round);
                again |= r.more;
                self.tx_signal(&s, &mut tx_ring, r.counts.used as u32);
                self.control_frames(&s);
            }
            if rx_ok && (self.tap_readable || self.rx.held() > 0 || !self.outbox.is_empty()) {
                again |= self.rx_round(&s, &mut rx_ring);
            }
            if !again {
                break;
            }
            if round + 1 == MAX_ROUNDS {
                // Work is left: yield to the event loop and come back through the eventfd.
                let _ = self.resched.write(1);
            }
        }
        if wake == Wake::Event(WorkerEvent::RxTimer) && rx_ok {
            ctx.stats.rx_timer_fires.fetch_add(1, Relaxed);
            self.flush_rx(&s, &mut rx_ring);
        }
        if self.tx_held && !self.tx_timer.is_armed() {
            // Held kicks always have a timer behind them.
            let ns = if s.delays.tx_ns > 0 {
                s.delays.tx_ns
            } else {
                HELD_KICKS_FALLBACK_NS
            };
            if self.tx_timer.arm(ns).is_err() {
                let _ = tx_ring.get_queue_mut().enable_notification(s.mem);
                self.tx_held = false;
            }
        }
    }

    /// TX round: moves up to a budget of frames from the ring to the tap and keeps guest kicks
    /// held or releases them, following the TX delay.
    fn tx_round(
        &mut self,
        s: &Step<'_>,
        ring: &mut VringState<GuestMem>,
        wake: Wake,
        round: usize,
    ) -> TxRun {
        let hold = (s.delays.tx_ns > 0).then_some(s.valves.frame_cap);
        let r = self.tx.run(
            ring.get_queue_mut(),
            s.mem,
            &mut self.tap,
            s.ctx.hdr,
            BATCH_BUDGET,
            hold,
        );
        self.tx_blocked = r.blocked;
        if let Some(e) = self.tap.take_failure() {
            tracing::warn!(vm = %s.ctx.vm, %e, "io_uring failed: one system call per frame from now on");
        }
        s.ctx.stats.add_tx(&r.counts);
        report(s, "TX", &r.counts);
        let moved = r.moved();
        if moved > 0 {
            self.tx_idle = 0;
            if hold.is_some() {
                s.ctx.stats.tx_batches.observe(moved);
            }
        } else if wake == Wake::Event(WorkerEvent::TxTimer) && round == 0 && !r.blocked {
            self.tx_idle = self.tx_idle.saturating_add(1);
        }
        let mut r = r;
        if hold.is_some() {
            // Kicks stay off; the timer drains what the guest queues meanwhile.
            self.tx_held = true;
            if self.tx_idle >= TX_IDLE_PERIODS {
                self.tx_idle = 0;
                if release_kicks(ring.get_queue_mut(), s.mem) {
                    r.more = true;
                } else {
                    self.tx_held = false;
                    self.tx_timer.disarm();
                }
            }
            if self.tx_held {
                if let Err(e) = self.tx_timer.arm(s.delays.tx_ns) {
                    if s.ctx.metrics.log.allow(s.now).is_some() {
                        tracing::warn!(vm = %s.ctx.vm, %e, "cannot arm the TX timer");
                    }
                }
            }
        } else if self.tx_held && !r.blocked && !r.more {
            // Buffering is off now: this run emptied the ring and re-enabled kicks.
            self.tx_held = false;
            self.tx_idle = 0;
            self.tx_timer.disarm();
        }
        r
    }

    /// TX signalling: completions of the round are signalled at once, or at most once per T
    /// while kicks are held ([`tx_signal_due`]).
    fn tx_signal(&mut self, s: &Step<'_>, ring: &mut VringState<GuestMem>, used: u32) {
        self.tx_unsignalled += used;
        if tx_signal_due(
            &s.valves,
            self.tx_held,
            self.tx_unsignalled,
            s.now,
            self.tx_last_signal_ns,
            s.delays.t_ns,
        ) {
            self.tx_unsignalled = 0;
            self.tx_last_signal_ns = s.now;
            if should_notify(ring.get_queue_mut(), s.mem, s.notify_on_empty)
                && ring.signal_used_queue().is_ok()
            {
                s.ctx.stats.tx_interrupts.fetch_add(1, Relaxed);
            }
        }
    }

    /// Control frames the TX round took off the ring: handled by the control plane, replies
    /// queued for the RX ring.
    fn control_frames(&mut self, s: &Step<'_>) {
        let mut replies_lost = 0;
        for f in &self.tx.control {
            let mut out = [0u8; control_msg::MAX_FRAME_LEN];
            let (outcome, len) = s.ctx.batching.handle_control(f.bytes(), s.now, &mut out);
            if tracing::enabled!(tracing::Level::DEBUG) && s.ctx.metrics.log.allow(s.now).is_some()
            {
                tracing::debug!(vm = %s.ctx.vm, ?outcome, "control frame");
            }
            if let Some(n) = len {
                if self.outbox.len() < OUTBOX {
                    self.outbox.push((out, n));
                } else {
                    replies_lost += 1;
                }
            }
        }
        s.ctx.batching.count_control(0, replies_lost);
    }

    /// RX round: control replies first, then frames from the tap; then the interrupt decision.
    /// Returns true when work is left.
    fn rx_round(&mut self, s: &Step<'_>, ring: &mut VringState<GuestMem>) -> bool {
        let q = ring.get_queue_mut();
        let old_used = q.next_used();
        let mut counts = PathCounts::default();
        let mut replies_lost = 0;
        // A malformed chain in front of a reply: try again next round (bounded by MAX_ROUNDS).
        let mut retry = false;
        while let Some((f, n)) = self.outbox.first().copied() {
            match self.rx.deliver(q, s.mem, s.ctx.hdr, &f[..n], &mut counts) {
                Ok(()) => {
                    self.outbox.remove(0);
                    self.rx_unsignalled += 1;
                }
                Err(DeliverError::TooSmall) => {
                    self.outbox.remove(0);
                    replies_lost += 1;
                }
                Err(DeliverError::BadChain) => {
                    retry = true;
                    break;
                }
                Err(DeliverError::Busy | DeliverError::NoBuffer) => break,
            }
        }
        // While migrating, the frontend asks for every page we write to be logged.
        let log = s.ctx.features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if log != self.rx.log_writes {
            // Twice per migration: no log budget needed.
            tracing::info!(
                vm = %s.ctx.vm,
                "dirty-page logging {}",
                if log { "on (migrating)" } else { "off" }
            );
            self.rx.log_writes = log;
        }
        let mut r = if self.tap_readable || self.rx.held() > 0 {
            self.rx
                .run(q, s.mem, &mut self.tap, s.ctx.hdr, BATCH_BUDGET)
        } else {
            Default::default()
        };
        if r.tap_empty {
            self.tap_readable = false;
        }
        r.counts.add(&counts);
        s.ctx.stats.add_rx(&r.counts);
        report(s, "RX", &r.counts);
        s.ctx.batching.count_control(r.counts.control, replies_lost);
        self.rx_unsignalled += (r.counts.packets + r.counts.bad_chains) as u32;
        if r.counts.used > 0 {
            let q = ring.get_queue_mut();
            let batch = RxBatch {
                delay_ns: s.delays.rx_ns,
                no_buffers: r.no_buffers,
                used_event: if s.delays.rx_ns > 0 && q.event_idx_enabled() {
                    used_event(q, s.mem).map(|ev| (ev, old_used, q.next_used()))
                } else {
                    None
                },
                pending: self.rx_unsignalled,
                free: free_buffers(q, s.mem),
                size: q.size(),
                interrupts_off: interrupts_off(q, s.mem),
            };
            match rx_signal(&s.valves, &batch) {
                RxSignal::Now => self.flush_rx(s, ring),
                RxSignal::Valve(v) => {
                    s.ctx.stats.count_valve(v);
                    self.flush_rx(s, ring);
                }
                RxSignal::Defer => {
                    if let Err(e) = self.rx_timer.arm(s.delays.rx_ns) {
                        if s.ctx.metrics.log.allow(s.now).is_some() {
                            tracing::warn!(vm = %s.ctx.vm, %e, "cannot arm the RX timer");
                        }
                    }
                    if !self.rx_timer.is_armed() {
                        // The timer could not be armed: never leave completions unsignalled.
                        self.flush_rx(s, ring);
                    }
                }
            }
        }
        r.more || retry
    }

    /// Signals deferred RX completions if the guest wants an interrupt; records the batch.
    fn flush_rx(&mut self, s: &Step<'_>, ring: &mut VringState<GuestMem>) {
        self.rx_timer.disarm();
        if self.rx_unsignalled > 0 {
            s.ctx
                .stats
                .rx_batches
                .observe(u64::from(self.rx_unsignalled));
            self.rx_unsignalled = 0;
        }
        if self
            .rx
            .should_notify(ring.get_queue_mut(), s.mem, s.notify_on_empty)
            && ring.signal_used_queue().is_ok()
        {
            s.ctx.stats.rx_interrupts.fetch_add(1, Relaxed);
        }
    }
}

/// Logs the problems one run met (malformed chains, corrupt avail indices, tap errors), within
/// the VM's log budget: they are counted in any case, and a guest cannot flood the log.
fn report(s: &Step<'_>, dir: &str, c: &PathCounts) {
    if c.problems() == 0 {
        return;
    }
    if let Some(suppressed) = s.ctx.metrics.log.allow(s.now) {
        tracing::warn!(
            vm = %s.ctx.vm,
            bad_chains = c.bad_chains,
            bad_avail_index = c.bad_avail,
            tap_errors = c.tap_errors,
            last = ?c.last_error,
            suppressed,
            "{dir}: the guest's ring or the tap failed (counted; lines suppressed since the last one: {suppressed})"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_follow_the_reserved_ones_and_round_trip() {
        for n in [2, 4, 32] {
            for e in WorkerEvent::ALL {
                // vhost-user-backend refuses ids up to the number of vrings.
                assert!(e.id(n) > n as u64);
                assert_eq!(WorkerEvent::from_id(e.id(n), n), Some(e));
            }
            assert_eq!(WorkerEvent::from_id(n as u64, n), None);
            assert_eq!(WorkerEvent::from_id(0, n), None);
        }
    }
}
