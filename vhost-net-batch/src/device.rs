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

use crate::datapath::{should_notify, HdrLayout, RxPath, TapFd, TxPath, BATCH_BUDGET};
use crate::metrics::VmMetrics;
use crate::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};

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

/// Rounds of TX+RX budgets one wake-up may run before yielding to the event loop, so ring
/// stops, exit requests and other events are never starved by a frontend that keeps a ring full.
pub const MAX_ROUNDS: usize = 4;

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
}

/// The virtio-net device for one frontend connection.
pub struct NetDevice {
    vm: String,
    queue_pairs: u16,
    tap: Arc<Tap>,
    mem: GuestMem,
    metrics: Arc<VmMetrics>,
    workers: Vec<Mutex<Worker>>,
    acked: Mutex<(u64, HdrLayout)>,
    exit_fds: Mutex<Vec<RawFd>>,
}

impl NetDevice {
    /// A device for VM `vm` over `tap` (one tap queue per queue pair).
    pub fn new(
        vm: &str,
        tap: Arc<Tap>,
        mem: GuestMem,
        metrics: Arc<VmMetrics>,
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
                }))
            })
            .collect::<io::Result<_>>()?;
        Ok(NetDevice {
            vm: vm.to_string(),
            queue_pairs,
            tap,
            mem,
            metrics,
            workers,
            acked: Mutex::new((0, HdrLayout::default())),
            exit_fds: Mutex::new(Vec::new()),
        })
    }

    /// The reschedule eventfd of queue pair `qp`, for registration in its worker's epoll.
    pub fn resched_fd(&self, qp: usize) -> RawFd {
        self.workers[qp].lock().unwrap().resched.as_raw_fd()
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

    fn process(&self, w: &mut Worker, qp: usize, vrings: &[VringRwLock]) {
        let stats = &self.metrics.queues[qp];
        let (features, hdr) = *self.acked.lock().unwrap();
        let notify_on_empty = features & (1 << VIRTIO_F_NOTIFY_ON_EMPTY) != 0;
        let mem = self.mem.memory();
        let mut rx_ring = vrings[0].get_mut();
        let mut tx_ring = vrings[1].get_mut();
        let rx_ok = rx_ring.is_enabled() && rx_ring.get_queue().ready();
        let tx_ok = tx_ring.is_enabled() && tx_ring.get_queue().ready();
        tracing::trace!(qp, rx_ok, tx_ok, "worker wake-up");
        for round in 0.. {
            let mut again = false;
            if tx_ok && !w.tx_blocked {
                let r = w.tx.run(
                    tx_ring.get_queue_mut(),
                    &*mem,
                    &mut w.tap,
                    hdr,
                    BATCH_BUDGET,
                );
                w.tx_blocked = r.blocked;
                again |= r.more;
                stats.add_tx(&r.counts);
                if r.counts.used > 0
                    && should_notify(tx_ring.get_queue_mut(), &*mem, notify_on_empty)
                    && tx_ring.signal_used_queue().is_ok()
                {
                    stats.tx_interrupts.fetch_add(1, Relaxed);
                }
            }
            if rx_ok && (w.tap_readable || w.rx.has_pending()) {
                let r = w.rx.run(
                    rx_ring.get_queue_mut(),
                    &*mem,
                    &mut w.tap,
                    hdr,
                    BATCH_BUDGET,
                );
                if r.tap_empty {
                    w.tap_readable = false;
                }
                again |= r.more;
                stats.add_rx(&r.counts);
                if r.counts.used > 0
                    && should_notify(rx_ring.get_queue_mut(), &*mem, notify_on_empty)
                    && rx_ring.signal_used_queue().is_ok()
                {
                    stats.rx_interrupts.fetch_add(1, Relaxed);
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
        match device_event as u64 {
            0 => {
                stats.rx_kicks.fetch_add(1, Relaxed);
            }
            1 => {
                stats.tx_kicks.fetch_add(1, Relaxed);
            }
            id if id == resched_event_id(self.queue_pairs) => {
                let _ = w.resched.read();
            }
            id if id == tap_event_id(self.queue_pairs) => {
                if evset.contains(EventSet::IN) {
                    w.tap_readable = true;
                }
                if evset.contains(EventSet::OUT) {
                    w.tx_blocked = false;
                }
            }
            _ => return Ok(()),
        }
        self.process(&mut w, thread_id, vrings);
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
