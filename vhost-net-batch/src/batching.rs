//! Per-VM batching state shared by the VM's queue workers, the control plane and the operator
//! interfaces: the [`Policy`] behind a lock that is taken only when the policy has work to do
//! (an interval ended, a control frame arrived, the operator changed something), and the
//! current delays in atomics that workers read on every wake-up.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use control_msg::{ENERGY_UNKNOWN, MAX_FRAME_LEN};

use crate::control::{ControlCounts, ControlPlane, Outcome};
use crate::metrics::VmMetrics;
use crate::policy::{Delays, ModeKind, Policy, PolicyConfig, PolicyView, Totals, Valves};

/// Gives a VM's apportioned energy since attach, in µJ.
pub type EnergySource = Box<dyn Fn() -> Option<u64> + Send + Sync>;

struct Inner {
    policy: Policy,
    control: ControlPlane,
}

/// The batching state of one VM.
pub struct VmBatching {
    inner: Mutex<Inner>,
    /// The valves never change while the VM runs: readable without the lock.
    valves: Valves,
    rx_ns: AtomicU64,
    tx_ns: AtomicU64,
    t_ns: AtomicU64,
    next_tick_ns: AtomicU64,
    energy: Mutex<Option<EnergySource>>,
    energy_kind: Mutex<Option<String>>,
}

impl std::fmt::Debug for VmBatching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBatching")
            .field("view", &self.view())
            .finish()
    }
}

/// The VM's packets each way and its notifications (interrupts and kicks, all queues).
fn totals(m: &VmMetrics) -> Totals {
    m.queues.iter().fold(Totals::default(), |t, q| Totals {
        sent: t.sent + q.tx_packets.load(Relaxed),
        recv: t.recv + q.rx_packets.load(Relaxed),
        notifications: t.notifications
            + q.tx_interrupts.load(Relaxed)
            + q.rx_interrupts.load(Relaxed)
            + q.tx_kicks.load(Relaxed)
            + q.rx_kicks.load(Relaxed),
    })
}

impl VmBatching {
    /// Batching for a VM with counters `m`, starting at `now_ns`.
    pub fn new(cfg: PolicyConfig, now_ns: u64, m: &VmMetrics) -> Self {
        let policy = Policy::new(cfg, now_ns, totals(m));
        let b = VmBatching {
            next_tick_ns: AtomicU64::new(policy.next_tick_ns()),
            inner: Mutex::new(Inner {
                policy,
                control: ControlPlane::new(now_ns),
            }),
            valves: cfg.valves,
            rx_ns: AtomicU64::new(0),
            tx_ns: AtomicU64::new(0),
            t_ns: AtomicU64::new(0),
            energy: Mutex::new(None),
            energy_kind: Mutex::new(None),
        };
        b.publish(&b.inner.lock().unwrap_or_else(|e| e.into_inner()).policy);
        b
    }

    fn publish(&self, p: &Policy) {
        let d = p.delays();
        self.rx_ns.store(d.rx_ns, Relaxed);
        self.tx_ns.store(d.tx_ns, Relaxed);
        self.t_ns.store(d.t_ns, Relaxed);
        self.next_tick_ns.store(p.next_tick_ns(), Relaxed);
    }

    /// The valve settings (frame cap, low water), fixed for the VM's life.
    pub fn valves(&self) -> Valves {
        self.valves
    }

    /// The delays to apply at `now_ns`; advances the policy when an interval or rate window
    /// ended (one worker does it; the others keep the previous delays meanwhile).
    pub fn delays(&self, now_ns: u64, m: &VmMetrics) -> Delays {
        if now_ns >= self.next_tick_ns.load(Relaxed) {
            if let Ok(mut g) = self.inner.try_lock() {
                g.policy.tick(now_ns, totals(m));
                self.publish(&g.policy);
            }
        }
        Delays {
            rx_ns: self.rx_ns.load(Relaxed),
            tx_ns: self.tx_ns.load(Relaxed),
            t_ns: self.t_ns.load(Relaxed),
        }
    }

    /// The operator changes mode and budget; effective at the workers' next wake-up.
    pub fn set_operator(&self, mode: ModeKind, budget_us: u32) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.policy.set_operator(mode, budget_us);
        self.publish(&g.policy);
    }

    /// A new frontend connected: forget what the previous guest asked for.
    pub fn reset_guest(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.policy.reset_guest();
        self.publish(&g.policy);
    }

    /// The policy's state.
    pub fn view(&self) -> PolicyView {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .policy
            .view()
    }

    /// Control-frame counters.
    pub fn control_counts(&self) -> ControlCounts {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .control
            .counts
    }

    /// Counts control frames from the tap (dropped) and replies lost for want of RX buffers.
    pub fn count_control(&self, from_tap: u64, replies_lost: u64) {
        if from_tap | replies_lost != 0 {
            let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            g.control.counts.from_tap += from_tap;
            g.control.counts.replies_lost += replies_lost;
        }
    }

    /// Installs the source of the VM's energy figure (power sampling on); `kind` says whether
    /// it is a `measurement` or an `estimate`, and goes wherever the figure goes.
    pub fn set_energy_source(&self, f: EnergySource, kind: &str) {
        *self.energy.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
        *self.energy_kind.lock().unwrap_or_else(|e| e.into_inner()) = Some(kind.to_string());
    }

    /// `measurement` or `estimate` when power sampling is on.
    pub fn energy_kind(&self) -> Option<String> {
        self.energy_kind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The VM's energy since attach in µJ, if sampling is on.
    pub fn energy_uj(&self) -> Option<u64> {
        self.energy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|f| f())
    }

    /// Handles a control frame from the guest; the reply (if any) is written to `out`.
    pub fn handle_control(
        &self,
        frame: &[u8],
        now_ns: u64,
        out: &mut [u8; MAX_FRAME_LEN],
    ) -> (Outcome, Option<usize>) {
        let energy = self.energy_uj().unwrap_or(ENERGY_UNKNOWN);
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Inner { policy, control } = &mut *g;
        let r = control.handle(policy, frame, now_ns, energy, out);
        self.publish(policy);
        r
    }
}
