//! The virtio-net device model served to one frontend connection: feature negotiation, the
//! queue-pair workers and their event handling. One instance per connection, so nothing of a
//! previous frontend's state survives a reconnect; the tap and the counters outlive it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::batching::VmBatching;
use crate::datapath::{
    free_buffers, release_kicks, should_notify, used_event, DeliverError, HdrLayout, PathCounts,
    RxPath, TapFd, TxPath, BATCH_BUDGET,
};
use crate::metrics::{QueueStats, VmMetrics};
use crate::policy::{rx_valve, used_event_asks, Delays, Valve};
use crate::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};
use crate::timer::{now_ns, Timer};

/// Guest memory as the backend sees it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Largest virtqueue the device accepts.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Virtio features offered for `queue_pairs` queue pairs.
pub fn offered_features(queue_pairs: u16) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_F_NOTIFY_ON_EMPTY
        | 1 << VIRTIO_NET_F_MRG_RXBUF
        | 1 << VIRTIO_NET_F_CSUM
        | 1 << VIRTIO_NET_F_GUEST_CSUM
        | 1 << VIRTIO_NET_F_GUEST_TSO4
        | 1 << VIRTIO_NET_F_GUEST_TSO6
        | 1 << VIRTIO_NET_F_GUEST_ECN
        | 1 << VIRTIO_NET_F_HOST_TSO4
        | 1 << VIRTIO_NET_F_HOST_TSO6
        | 1 << VIRTIO_NET_F_HOST_ECN
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if queue_pairs > 1 {
        f |= 1 << VIRTIO_NET_F_MQ;
    }
    f
}

/// Tap offload flags matching what the guest accepts on RX.
pub fn tap_offloads(features: u64) -> u32 {
    let has = |bit: u32| features & (1u64 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= TUN_F_TSO6;
        }
        if flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 && has(VIRTIO_NET_F_GUEST_ECN) {
            flags |= TUN_F_TSO_ECN;
        }
    }
    flags
}

/// Event id of the tap descriptor in each worker's epoll (above the queue and exit ids).
pub fn tap_event_id(queue_pairs: u16) -> u64 {
    2 * queue_pairs as u64 + 1
}

/// Event id of a worker's reschedule eventfd.
pub fn resched_event_id(queue_pairs: u16) -> u64 {
    tap_event_id(queue_pairs) + 1
}

/// Event id of a worker's RX interrupt timer.
pub fn rx_timer_event_id(queue_pairs: u16) -> u64 {
    tap_event_id(queue_pairs) + 2
}

/// Event id of a worker's TX drain timer.
pub fn tx_timer_event_id(queue_pairs: u16) -> u64 {
    tap_event_id(queue_pairs) + 3
}

/// TX timer periods the ring must stay empty before kicks are re-enabled: short gaps between
/// packets keep kicks off (each kick is a VM exit); a ring idle this long goes back to kicks.
pub const TX_IDLE_PERIODS: u8 = 4;

/// Control replies waiting for an RX buffer, per queue pair; more are dropped and counted.
const OUTBOX: usize = 4;

/// Rounds of TX+RX budgets one wake-up may run before yielding to the event loop, so ring
/// stops, exit requests and other events are never starved by a frontend that keeps a ring full.
pub const MAX_ROUNDS: usize = 4;

/// Called once with the thread id of each worker thread (energy accounting).
pub type ThreadHook = Arc<dyn Fn(u32) + Send + Sync>;

/// Per-queue-pair worker state, owned by that pair's thread.
struct Worker {
    tap: TapFd,
    rx: RxPath,
    tx: TxPath,
    tap_readable: bool,
    tx_blocked: bool,
    /// Written when work is left after `MAX_ROUNDS`; wakes the worker again through epoll.
    resched: EventFd,
    /// The pair's vrings, remembered so a ring stop can give back held RX chains.
    vrings: Option<[VringRwLock; 2]>,
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
    /// The worker's thread was reported to the thread hook.
    thread_seen: bool,
    /// Control replies waiting for an RX buffer.
    outbox: Vec<([u8; control_msg::MAX_FRAME_LEN], usize)>,
}

/// What woke a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    RxKick,
    TxKick,
    Tap,
    Resched,
    RxTimer,
    TxTimer,
}

/// The virtio-net device for one frontend connection.
pub struct NetDevice {
    vm: String,
    queue_pairs: u16,
    tap: Arc<Tap>,
    mem: GuestMem,
    metrics: Arc<VmMetrics>,
    batching: Arc<VmBatching>,
    workers: Vec<Mutex<Worker>>,
    acked: Mutex<(u64, HdrLayout)>,
    exit_fds: Mutex<Vec<RawFd>>,
    thread_hook: Mutex<Option<ThreadHook>>,
}

impl NetDevice {
    /// A device for VM `vm` over `tap` (one tap queue per queue pair), batching by `batching`.
    pub fn new(
        vm: &str,
        tap: Arc<Tap>,
        mem: GuestMem,
        metrics: Arc<VmMetrics>,
        batching: Arc<VmBatching>,
    ) -> io::Result<Self> {
        let queue_pairs = tap.num_queues() as u16;
        let workers = (0..queue_pairs as usize)
            .map(|i| {
                Ok(Mutex::new(Worker {
                    tap: TapFd(tap.queue_fd(i)),
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
                    thread_seen: false,
                    outbox: Vec::with_capacity(OUTBOX),
                }))
            })
            .collect::<io::Result<_>>()?;
        Ok(NetDevice {
            vm: vm.to_string(),
            queue_pairs,
            tap,
            mem,
            metrics,
            batching,
            workers,
            acked: Mutex::new((0, HdrLayout::default())),
            exit_fds: Mutex::new(Vec::new()),
            thread_hook: Mutex::new(None),
        })
    }

    /// The reschedule eventfd and the two timers of queue pair `qp` with their event ids, for
    /// registration in its worker's epoll.
    pub fn worker_fds(&self, qp: usize) -> [(RawFd, u64); 3] {
        let w = self.workers[qp].lock().unwrap();
        [
            (w.resched.as_raw_fd(), resched_event_id(self.queue_pairs)),
            (w.rx_timer.as_raw_fd(), rx_timer_event_id(self.queue_pairs)),
            (w.tx_timer.as_raw_fd(), tx_timer_event_id(self.queue_pairs)),
        ]
    }

    /// Sets the hook told about each worker thread on its first event.
    pub fn set_thread_hook(&self, hook: Option<ThreadHook>) {
        *self.thread_hook.lock().unwrap() = hook;
    }

    /// Features the frontend acked (0 before SET_FEATURES).
    pub fn acked_features_value(&self) -> u64 {
        self.acked.lock().unwrap().0
    }

    /// Closes the exit-event consumers the vhost-user-backend event loops registered but never
    /// close. Call only after the daemon (and so every worker thread) is gone.
    pub fn close_exit_consumers(&self) {
        for fd in self.exit_fds.lock().unwrap().drain(..) {
            // SAFETY: each fd is an eventfd we created in `exit_event`, handed to an event loop
            // that is now dropped; nothing else refers to it.
            unsafe { libc::close(fd) };
        }
    }

    /// Signals deferred RX completions if the guest wants an interrupt; records the batch.
    fn flush_rx(
        w: &mut Worker,
        ring: &mut vhost_user_backend::VringState<GuestMem>,
        mem: &GuestMemoryMmap<()>,
        notify_on_empty: bool,
        stats: &QueueStats,
    ) {
        w.rx_timer.disarm();
        if w.rx_unsignalled > 0 {
            stats.rx_batches.observe(u64::from(w.rx_unsignalled));
            w.rx_unsignalled = 0;
        }
        if should_notify(ring.get_queue_mut(), mem, notify_on_empty)
            && ring.signal_used_queue().is_ok()
        {
            stats.rx_interrupts.fetch_add(1, Relaxed);
        }
    }

    fn process(&self, w: &mut Worker, qp: usize, vrings: &[VringRwLock], wake: Wake) {
        let stats = &self.metrics.queues[qp];
        let (features, hdr) = *self.acked.lock().unwrap();
        let notify_on_empty = features & (1 << VIRTIO_F_NOTIFY_ON_EMPTY) != 0;
        let now = now_ns();
        let d: Delays = self.batching.delays(now, &self.metrics);
        let valves = self.batching.valves();
        let mem = self.mem.memory();
        let mut rx_ring = vrings[0].get_mut();
        let mut tx_ring = vrings[1].get_mut();
        let rx_ok = rx_ring.is_enabled() && rx_ring.get_queue().ready();
        let tx_ok = tx_ring.is_enabled() && tx_ring.get_queue().ready();
        tracing::trace!(qp, rx_ok, tx_ok, ?wake, ?d, "worker wake-up");
        let hold = (d.tx_ns > 0).then_some(valves.frame_cap);
        for round in 0.. {
            let mut again = false;
            if tx_ok && !w.tx_blocked {
                let r = w.tx.run(
                    tx_ring.get_queue_mut(),
                    &*mem,
                    &mut w.tap,
                    hdr,
                    BATCH_BUDGET,
                    hold,
                );
                w.tx_blocked = r.blocked;
                again |= r.more;
                stats.add_tx(&r.counts);
                let moved = r.moved();
                if moved > 0 {
                    w.tx_idle = 0;
                    if hold.is_some() {
                        stats.tx_batches.observe(moved);
                    }
                } else if wake == Wake::TxTimer && round == 0 && !r.blocked {
                    w.tx_idle = w.tx_idle.saturating_add(1);
                }
                if hold.is_some() {
                    // Kicks stay off; the timer drains what the guest queues meanwhile.
                    w.tx_held = true;
                    if w.tx_idle >= TX_IDLE_PERIODS {
                        w.tx_idle = 0;
                        if release_kicks(tx_ring.get_queue_mut(), &*mem) {
                            again = true;
                        } else {
                            w.tx_held = false;
                            w.tx_timer.disarm();
                        }
                    }
                    if w.tx_held {
                        if let Err(e) = w.tx_timer.arm(d.tx_ns) {
                            tracing::warn!(vm = %self.vm, %e, "cannot arm the TX timer");
                        }
                    }
                } else if w.tx_held && !r.blocked && !r.more {
                    // Buffering is off now: this run emptied the ring and re-enabled kicks.
                    w.tx_held = false;
                    w.tx_idle = 0;
                    w.tx_timer.disarm();
                }
                w.tx_unsignalled += r.counts.used as u32;
                // While kicks are held, TX completions are signalled at most once per T (the
                // guest reclaims TX buffers on its next transmit and in its RX poll anyway),
                // or when a frame cap of them waits: a guest whose ring filled up waits for
                // exactly this interrupt. Otherwise at once.
                if w.tx_unsignalled > 0 {
                    let due = !w.tx_held
                        || w.tx_unsignalled >= u32::from(valves.frame_cap)
                        || now.saturating_sub(w.tx_last_signal_ns) >= d.rx_ns + d.tx_ns;
                    if due {
                        w.tx_unsignalled = 0;
                        w.tx_last_signal_ns = now;
                        if should_notify(tx_ring.get_queue_mut(), &*mem, notify_on_empty)
                            && tx_ring.signal_used_queue().is_ok()
                        {
                            stats.tx_interrupts.fetch_add(1, Relaxed);
                        }
                    }
                }
                let mut replies_lost = 0;
                for f in &w.tx.control {
                    let mut out = [0u8; control_msg::MAX_FRAME_LEN];
                    let (outcome, len) = self.batching.handle_control(f.bytes(), now, &mut out);
                    tracing::debug!(vm = %self.vm, ?outcome, "control frame");
                    if let Some(n) = len {
                        if w.outbox.len() < OUTBOX {
                            w.outbox.push((out, n));
                        } else {
                            replies_lost += 1;
                        }
                    }
                }
                self.batching.count_control(0, replies_lost);
            }
            if rx_ok && (w.tap_readable || w.rx.has_pending() || !w.outbox.is_empty()) {
                let q = rx_ring.get_queue_mut();
                let old_used = q.next_used();
                let mut counts = PathCounts::default();
                let mut replies_lost = 0;
                while let Some((f, n)) = w.outbox.first().copied() {
                    match w.rx.deliver(q, &*mem, hdr, &f[..n], &mut counts) {
                        Ok(()) => {
                            w.outbox.remove(0);
                            w.rx_unsignalled += 1;
                        }
                        Err(DeliverError::TooSmall) => {
                            w.outbox.remove(0);
                            replies_lost += 1;
                        }
                        Err(DeliverError::Busy | DeliverError::NoBuffer) => break,
                    }
                }
                let mut r = if w.tap_readable || w.rx.has_pending() {
                    w.rx.run(q, &*mem, &mut w.tap, hdr, BATCH_BUDGET)
                } else {
                    Default::default()
                };
                if r.tap_empty {
                    w.tap_readable = false;
                }
                again |= r.more;
                r.counts.add(&counts);
                stats.add_rx(&r.counts);
                self.batching.count_control(r.counts.control, replies_lost);
                w.rx_unsignalled += (r.counts.packets + r.counts.bad_chains) as u32;
                if r.counts.used > 0 {
                    let q = rx_ring.get_queue_mut();
                    let valve = if d.rx_ns == 0 {
                        None
                    } else if r.no_buffers {
                        Some(Valve::LowWater)
                    } else if q.event_idx_enabled()
                        && used_event(q, &*mem)
                            .is_some_and(|ev| used_event_asks(ev, old_used, q.next_used()))
                    {
                        Some(Valve::UsedEvent)
                    } else {
                        rx_valve(valves, w.rx_unsignalled, free_buffers(q, &*mem), q.size())
                    };
                    match valve {
                        Some(v) => {
                            let c = match v {
                                Valve::FrameCap => &stats.rx_flush_frame_cap,
                                Valve::LowWater => &stats.rx_flush_low_water,
                                Valve::UsedEvent => &stats.flush_used_event,
                            };
                            c.fetch_add(1, Relaxed);
                        }
                        None if d.rx_ns > 0 => {
                            if let Err(e) = w.rx_timer.arm(d.rx_ns) {
                                tracing::warn!(vm = %self.vm, %e, "cannot arm the RX timer");
                            }
                        }
                        None => {}
                    }
                    if d.rx_ns == 0 || valve.is_some() {
                        Self::flush_rx(w, &mut rx_ring, &mem, notify_on_empty, stats);
                    } else if !w.rx_timer.is_armed() {
                        // The timer could not be armed: never leave completions unsignalled.
                        Self::flush_rx(w, &mut rx_ring, &mem, notify_on_empty, stats);
                    }
                }
            }
            if !again {
                break;
            }
            if round + 1 == MAX_ROUNDS {
                // Work is left: yield to the event loop and come back through the eventfd.
                let _ = w.resched.write(1);
                break;
            }
        }
        if wake == Wake::RxTimer && rx_ok {
            stats.rx_timer_fires.fetch_add(1, Relaxed);
            Self::flush_rx(w, &mut rx_ring, &mem, notify_on_empty, stats);
        }
        if w.tx_held && !w.tx_timer.is_armed() {
            // Held kicks always have a timer behind them.
            if w.tx_timer.arm(d.tx_ns.max(50_000)).is_err() {
                let _ = tx_ring.get_queue_mut().enable_notification(&*mem);
                w.tx_held = false;
            }
        }
    }
}

impl Drop for NetDevice {
    /// A frontend that vanished without stopping its rings (QEMU killed) can leave a frame read
    /// from the tap but only partly placed in guest buffers: it is lost, and counted as dropped.
    fn drop(&mut self) {
        for (qp, w) in self.workers.iter().enumerate() {
            let w = w.lock().unwrap_or_else(|e| e.into_inner());
            if w.rx.has_pending() {
                self.metrics.queues[qp].rx_dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

impl VhostUserBackend for NetDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2 * self.queue_pairs as usize
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        offered_features(self.queue_pairs)
    }

    fn acked_features(&self, features: u64) {
        let hdr = HdrLayout::from_features(features);
        *self.acked.lock().unwrap() = (features, hdr);
        let offload = tap_offloads(features);
        if let Err(e) = self.tap.set_vnet_hdr_len(hdr.len as i32) {
            tracing::error!(vm = %self.vm, %e, "cannot set the tap's vnet header length");
        }
        if let Err(e) = self.tap.set_offload(offload) {
            tracing::error!(vm = %self.vm, %e, "cannot set tap offloads");
        }
        tracing::info!(
            vm = %self.vm,
            features = format_args!("{features:#x}"),
            hdr_len = hdr.len,
            mergeable = hdr.mergeable,
            tap_offload = format_args!("{offload:#x}"),
            "guest features negotiated"
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, _mem: GuestMem) -> io::Result<()> {
        // The handler updates the shared GuestMemoryAtomic we hold; nothing to do.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queue_pairs).map(|i| 0b11u64 << (2 * i)).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        self.exit_fds.lock().unwrap().push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let qp = queue_index as usize / 2;
        if queue_index.is_multiple_of(2) {
            if let Some(w) = self.workers.get(qp) {
                let mut w = w.lock().unwrap();
                if let Some(vrings) = w.vrings.clone() {
                    let mut ring = vrings[0].get_mut();
                    if w.rx.abandon_pending(ring.get_queue_mut()) {
                        self.metrics.queues[qp].rx_dropped.fetch_add(1, Relaxed);
                    }
                }
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(worker) = self.workers.get(thread_id) else {
            return Ok(());
        };
        if vrings.len() < 2 {
            return Ok(());
        }
        let stats = &self.metrics.queues[thread_id];
        stats.wakeups.fetch_add(1, Relaxed);
        let mut w = worker.lock().unwrap();
        if w.vrings.is_none() {
            w.vrings = Some([vrings[0].clone(), vrings[1].clone()]);
        }
        if !w.thread_seen {
            w.thread_seen = true;
            if let Some(h) = self.thread_hook.lock().unwrap().clone() {
                // SAFETY: gettid has no preconditions.
                h(unsafe { libc::gettid() } as u32);
            }
        }
        let qp = self.queue_pairs;
        let wake = match device_event as u64 {
            0 => {
                stats.rx_kicks.fetch_add(1, Relaxed);
                Wake::RxKick
            }
            1 => {
                stats.tx_kicks.fetch_add(1, Relaxed);
                if w.tx_held {
                    // With kicks held, only the frame-cap avail_event makes the guest kick.
                    stats.tx_flush_frame_cap.fetch_add(1, Relaxed);
                }
                Wake::TxKick
            }
            id if id == resched_event_id(qp) => {
                let _ = w.resched.read();
                Wake::Resched
            }
            id if id == tap_event_id(qp) => {
                if evset.contains(EventSet::IN) {
                    w.tap_readable = true;
                }
                if evset.contains(EventSet::OUT) {
                    w.tx_blocked = false;
                }
                Wake::Tap
            }
            id if id == rx_timer_event_id(qp) => {
                if !w.rx_timer.ack() {
                    return Ok(());
                }
                Wake::RxTimer
            }
            id if id == tx_timer_event_id(qp) => {
                if !w.tx_timer.ack() {
                    return Ok(());
                }
                stats.tx_timer_fires.fetch_add(1, Relaxed);
                Wake::TxTimer
            }
            _ => return Ok(()),
        };
        self.process(&mut w, thread_id, vrings, wake);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_guest_features() {
        assert_eq!(tap_offloads(0), 0);
        // TSO without GUEST_CSUM is not allowed by the spec; the tap must not get it either.
        assert_eq!(tap_offloads(1 << VIRTIO_NET_F_GUEST_TSO4), 0);
        let all = offered_features(1);
        assert_eq!(
            tap_offloads(all),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        );
        assert_eq!(
            tap_offloads(1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO6),
            TUN_F_CSUM | TUN_F_TSO6
        );
    }

    #[test]
    fn mq_offered_only_with_several_pairs() {
        assert_eq!(offered_features(1) & (1 << VIRTIO_NET_F_MQ), 0);
        assert_ne!(offered_features(4) & (1 << VIRTIO_NET_F_MQ), 0);
        assert_ne!(
            offered_features(1) & (1 << 30),
            0,
            "PROTOCOL_FEATURES offered"
        );
    }
}
