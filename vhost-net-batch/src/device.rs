//! The virtio-net device model served to one frontend connection: the features and protocol
//! features it offers, the tap offloads that follow what the guest acked, and one
//! [`Worker`](crate::worker::Worker) per queue pair to which it hands its thread's events. One
//! instance per connection, so nothing of a previous frontend's state survives a reconnect;
//! the tap and the counters outlive it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::batching::VmBatching;
use crate::datapath::HdrLayout;
use crate::dirty_log::DirtyLog;
use crate::memguard::Regions;
use crate::metrics::VmMetrics;
use crate::tap::Tap;
use crate::tap_io::TapIoKind;
use crate::worker::{Ctx, Worker};

/// Guest memory as the backend sees it: each region carries the dirty-page log QEMU hands over
/// for live migration (`SET_LOG_BASE`, [`DirtyLog`]); writes through `vm-memory` mark it, the
/// data path marks what it writes directly (RX payloads read from the tap) while the guest
/// asked for logging.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<DirtyLog>>;

pub use crate::vring::Vring;

/// Largest virtqueue the device accepts.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// The longest a worker waits for frontend requests to get through before handling its event
/// (a request holding a lock longer only delays the event, as it would anyway).
pub const YIELD_MAX: std::time::Duration = std::time::Duration::from_millis(20);

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
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits();
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
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 && has(VIRTIO_NET_F_GUEST_ECN) {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

/// Called once with the thread id of each worker thread (energy accounting).
pub type ThreadHook = Arc<dyn Fn(u32) + Send + Sync>;

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
    /// The guest memory regions guarded against a frontend taking them away.
    regions: Mutex<Regions>,
    /// Written when the connection must end (a panic, a memory fault).
    stop: EventFd,
    /// Set once the connection is being ended.
    stopping: AtomicBool,
    /// Frontend requests waiting for a worker's lock (`stop_vring`).
    frontend_waiting: AtomicU32,
}

impl NetDevice {
    /// A device for VM `vm` over `tap` (one tap queue per queue pair), batching by `batching`,
    /// writing to the tap with `tap_io`.
    pub fn new(
        vm: &str,
        tap: Arc<Tap>,
        mem: GuestMem,
        metrics: Arc<VmMetrics>,
        batching: Arc<VmBatching>,
        tap_io: TapIoKind,
    ) -> io::Result<Self> {
        let queue_pairs = tap.num_queues() as u16;
        let mut workers = Vec::with_capacity(queue_pairs as usize);
        for i in 0..queue_pairs as usize {
            let (w, fallback) = Worker::new(tap.queue_fd(i), tap_io)?;
            if let Some(e) = fallback {
                if i == 0 {
                    tracing::warn!(vm, %e, "no io_uring for the tap: one system call per frame");
                }
            }
            workers.push(Mutex::new(w));
        }
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
            regions: Mutex::new(Regions::default()),
            stop: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            stopping: AtomicBool::new(false),
            frontend_waiting: AtomicU32::new(0),
        })
    }

    /// Registers each worker's own event sources in the event loop of its thread (the
    /// handlers of a `VhostUserDaemon`, one per queue pair, in order).
    pub fn register_events(
        &self,
        handlers: &[Arc<VringEpollHandler<Arc<NetDevice>>>],
    ) -> io::Result<()> {
        for (w, h) in self.workers.iter().zip(handlers) {
            lock(w).register(h, self.num_queues())?;
        }
        Ok(())
    }

    /// Sets the hook told about each worker thread on its first event.
    pub fn set_thread_hook(&self, hook: Option<ThreadHook>) {
        *lock(&self.thread_hook) = hook;
    }

    /// Closes the exit-event consumers the vhost-user-backend event loops registered but never
    /// close. Call only after the daemon (and so every worker thread) is gone.
    pub fn close_exit_consumers(&self) {
        for fd in lock(&self.exit_fds).drain(..) {
            // SAFETY: each fd is an eventfd we created in `exit_event`, handed to an event loop
            // that is now dropped; nothing else refers to it.
            unsafe { libc::close(fd) };
        }
    }
}

impl Drop for NetDevice {
    /// A frontend that vanished without stopping its rings (QEMU killed) can leave frames read
    /// from the tap and not yet in guest buffers (one partly placed, or read ahead): they are
    /// lost, and counted as dropped.
    /// Control replies still waiting for an RX buffer are lost too, and counted as such.
    fn drop(&mut self) {
        for (qp, w) in self.workers.iter().enumerate() {
            let w = lock(w);
            self.metrics.queues[qp]
                .rx_dropped
                .fetch_add(w.held_rx(), Relaxed);
            self.batching.count_control(0, w.queued_replies() as u64);
        }
    }
}

impl VhostUserBackend for NetDevice {
    type Bitmap = DirtyLog;
    type Vring = Vring;

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
        *lock(&self.acked) = (features, hdr);
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
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::RARP
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        // The handler updated the GuestMemoryAtomic we share. Guard the new regions against a
        // frontend that takes their pages away (memguard), and keep their files from child
        // processes: the crate received them without close-on-exec.
        let m = mem.memory();
        let mut ranges = Vec::new();
        for r in m.iter() {
            if let Some(f) = r.file_offset() {
                // SAFETY: F_SETFD on a descriptor the region owns and keeps open.
                unsafe { libc::fcntl(f.file().as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            }
            if let Ok(p) = r.get_host_address(MemoryRegionAddress(0)) {
                ranges.push((p as usize, r.len() as usize));
            }
        }
        if !lock(&self.regions).set(ranges) {
            tracing::warn!(vm = %self.vm, "too many guest memory regions in the process to guard them all");
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queue_pairs).map(|i| 0b11u64 << (2 * i)).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        lock(&self.exit_fds).push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let qp = queue_index as usize / 2;
        if queue_index.is_multiple_of(2) {
            if let Some(w) = self.workers.get(qp) {
                self.frontend_waiting.fetch_add(1, SeqCst);
                let dropped = lock(w).stop_rx();
                self.frontend_waiting.fetch_sub(1, SeqCst);
                self.metrics.queues[qp]
                    .rx_dropped
                    .fetch_add(dropped, Relaxed);
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(worker) = self.workers.get(thread_id) else {
            return Ok(());
        };
        if self.stopping.load(Relaxed) {
            // The connection is being ended: touch nothing of the guest's any more.
            return Ok(());
        }
        self.yield_to_frontend(vrings);
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut w = lock(worker);
            if w.first_event() {
                if let Some(h) = lock(&self.thread_hook).clone() {
                    // SAFETY: gettid has no preconditions.
                    h(unsafe { libc::gettid() } as u32);
                }
            }
            let (features, hdr) = *lock(&self.acked);
            let ctx = Ctx {
                vm: &self.vm,
                mem: &self.mem,
                features,
                hdr,
                metrics: &self.metrics,
                stats: &self.metrics.queues[thread_id],
                batching: &self.batching,
            };
            w.on_event(&ctx, vrings, device_event, evset, self.num_queues());
        }));
        if run.is_err() {
            self.metrics.panics.fetch_add(1, Relaxed);
            self.end_connection("a queue worker panicked");
        } else if lock(&self.regions).faulted() {
            self.metrics.memory_faults.fetch_add(1, Relaxed);
            self.end_connection("the frontend's guest memory went away (its file shrank)");
        }
        Ok(())
    }
}

impl NetDevice {
    /// Lets a frontend request waiting for this worker's locks (a vring's, or the worker's own
    /// in `stop_vring`) go first, for up to [`YIELD_MAX`]. `std`'s locks are not fair: a worker
    /// that takes them again as soon as a wake-up lets them go kept `GET_VRING_BASE` waiting for
    /// seconds while a guest flooded its rings (`hardening` test). Nothing is skipped: the
    /// event is handled once the request is through.
    fn yield_to_frontend(&self, vrings: &[Vring]) {
        let waiting =
            || self.frontend_waiting.load(SeqCst) > 0 || vrings.iter().any(Vring::frontend_waiting);
        if !waiting() {
            return;
        }
        let t0 = std::time::Instant::now();
        while waiting() && t0.elapsed() < YIELD_MAX {
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
    }

    /// Ends this device's connection (once): the relay sees `stop_fd` and closes both sides;
    /// the VM's slot goes back to listening.
    fn end_connection(&self, why: &str) {
        if !self.stopping.swap(true, Relaxed) {
            tracing::error!(vm = %self.vm, why, "ending the frontend connection");
            let _ = self.stop.write(1);
        }
    }

    /// Becomes readable when the device wants its connection ended.
    pub fn stop_fd(&self) -> &EventFd {
        &self.stop
    }
}

/// Locks `m`, also after a panic poisoned it: every user of these locks leaves the state
/// consistent between statements, so a panic in one never makes it unusable for the others.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
        assert_eq!(
            tap_offloads(1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO6),
            libc::TUN_F_CSUM | libc::TUN_F_TSO6
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
