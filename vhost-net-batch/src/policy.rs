//! The batching policy: pure arithmetic over packet counters and a clock (docs/design.md §1, §4).
//!
//! Nothing here reads a clock, touches a ring or arms a timer. The caller passes the time
//! (nanoseconds on any monotonic scale; tests use a fake one) and the VM's running packet
//! totals; the policy answers with the delays the mechanism should apply:
//!
//! - the send share `p*` follows one of two rules ([`EwmaRule`]): the paper's (every 5 s,
//!   `p_s = n_s / (n_s + n_r + 1)` over the packets of that interval and `p* ← α·p* + (1−α)·p_s`),
//!   or the default one, which reacts within a few hundred milliseconds: every 50 ms the send
//!   and receive counts feed two EWMAs of the same α, `S ← α·S + (1−α)·n_s`,
//!   `R ← α·R + (1−α)·n_r`, and `p* = S / (S + R)` (an idle interval leaves `p*` alone);
//! - `T = min(operator budget, guest's max_rtt_us)`;
//! - adaptive: TX delay `b_s = p*·T`, RX delay `b_r = (1−p*)·T`; fixed: both `T`.
//!
//! **Why a recursive EWMA.** The paper (Shea, Wang, Liu, INFOCOM 2014) prints the update as
//! `p* = α·p_s(t−1) + (1−α)·p_s(t)`, which mixes only the last two raw samples: it is a two-tap
//! filter that forgets everything older than one interval, so a single odd interval swings the
//! delays by up to `(1−α)` of their range and two odd ones replace the history completely. The
//! text around the formula describes a moving average that smooths bursts, which is the
//! recursive form used here (`p*` feeds back into itself); with α = 0.75 an interval's weight
//! decays as 0.75ᵏ instead of vanishing after one step.
//!
//! Every signalling decision of a queue worker is made here too ([`rx_signal`] for RX
//! interrupts with their safety valves, [`tx_signal_due`] for TX completions), so a test can
//! drive every branch with a fake clock; the mechanism only reports the ring state, acts and
//! counts the reasons.

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use vnb_common::mode::{ModeError, ModeKind, ModeSpec, MAX_BUDGET_US};

/// The published default smoothing factor.
pub const DEFAULT_ALPHA: f64 = 0.75;
/// The published default update interval, in milliseconds ([`EwmaRule::Paper`]).
pub const PAPER_UPDATE_MS: u32 = 5000;
/// The default rule's update interval, in milliseconds ([`EwmaRule::Fast`]).
pub const FAST_UPDATE_MS: u32 = 50;

/// How `p*`, the smoothed share of packets the guest sends, follows the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EwmaRule {
    /// Shea, Wang and Liu's: every interval (5 s) `p_s = n_s / (n_s + n_r + 1)` and
    /// `p* ← α·p* + (1−α)·p_s`. An idle interval counts as `p_s = 0`; over 5 s intervals `p*`
    /// needs about 15 s to follow a change of direction.
    Paper,
    /// The default: EWMAs of the packets sent and received per interval (50 ms), with the same
    /// α, and `p* = S / (S + R)`. It weighs each interval by its traffic, ignores idle ones, and
    /// follows a change of direction within a few hundred milliseconds (after k intervals the
    /// old traffic weighs αᵏ: 56 % after 100 ms, 24 % after 250 ms, 6 % after 500 ms).
    #[default]
    Fast,
}

impl EwmaRule {
    /// The name on the command line (`--policy`).
    pub fn name(self) -> &'static str {
        match self {
            EwmaRule::Paper => "paper",
            EwmaRule::Fast => "fast",
        }
    }

    /// The rule's default update interval, ms.
    pub fn default_update_ms(self) -> u32 {
        match self {
            EwmaRule::Paper => PAPER_UPDATE_MS,
            EwmaRule::Fast => FAST_UPDATE_MS,
        }
    }

    /// The rule's default payoff threshold ([`PolicyConfig::notify_per_period`]): the paper
    /// has no such check.
    pub fn default_notify_per_period(self) -> f64 {
        match self {
            EwmaRule::Paper => 0.0,
            EwmaRule::Fast => 1.0,
        }
    }
}
/// Budget used when neither the mode nor `--budget-us` gives one, in microseconds.
pub const DEFAULT_BUDGET_US: u32 = 500;
/// Delays shorter than this are not applied (0 instead): a timer wake-up every few
/// microseconds costs more than the notifications it saves.
pub const MIN_DELAY_US: u32 = 50;
/// A bad mode string or policy parameter.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PolicyError {
    /// A mode string that does not parse.
    #[error(transparent)]
    Mode(#[from] ModeError),
    /// `--budget-us` out of range.
    #[error("budget {0} µs out of range: give 1..={MAX_BUDGET_US}")]
    BadBudget(u32),
    /// The mode's `:US` and `--budget-us` disagree.
    #[error("mode says {mode_us} µs but --budget-us says {budget_us} µs; give one of them")]
    ConflictingBudget {
        /// From the mode string.
        mode_us: u32,
        /// From `--budget-us`.
        budget_us: u32,
    },
    /// α outside [0, 1).
    #[error("alpha {0} out of range: give a value in [0, 1)")]
    BadAlpha(f64),
    /// Update interval outside 10 ms ..= 60 s.
    #[error("update interval {0} ms out of range: give 10..=60000")]
    BadUpdate(u32),
    /// Frames per period outside [0, 64].
    #[error("period frames {0} out of range: give a number of frames in [0, 64]")]
    BadPeriodFrames(f64),
    /// Notifications per period outside [0, 64].
    #[error("notifications per period {0} out of range: give a number in [0, 64]")]
    BadNotifyPerPeriod(f64),
}

/// Resolves a mode and an optional `--budget-us` into the mode kind and the operator's budget.
pub fn resolve_budget(
    mode: ModeSpec,
    budget_us: Option<u32>,
) -> Result<(ModeKind, u32), PolicyError> {
    if let Some(b) = budget_us {
        if !(1..=MAX_BUDGET_US).contains(&b) {
            return Err(PolicyError::BadBudget(b));
        }
    }
    let budget = match (mode.budget_us, budget_us) {
        (Some(m), Some(b)) if m != b => {
            return Err(PolicyError::ConflictingBudget {
                mode_us: m,
                budget_us: b,
            })
        }
        (Some(m), _) => m,
        (None, Some(b)) => b,
        (None, None) => DEFAULT_BUDGET_US,
    };
    Ok((mode.kind, budget))
}

/// The safety valves' thresholds (docs/design.md §4): they never change while a VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Valves {
    /// Flush at once when this many completions wait for an interrupt (Linux's NAPI weight);
    /// with kicks held, the guest kicks once this many chains are queued.
    pub frame_cap: u16,
    /// Flush at once when fewer free RX buffers than this share of the ring remain, percent.
    pub rx_low_water_pct: u8,
}

impl Default for Valves {
    fn default() -> Self {
        Valves {
            frame_cap: 64,
            rx_low_water_pct: 25,
        }
    }
}

/// Tunables of the policy; the defaults are documented values, not magic.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PolicyConfig {
    /// Mode kind.
    pub mode: ModeKind,
    /// The operator's per-VM buffer budget (largest `T`), µs.
    pub budget_us: u32,
    /// How `p*` follows the traffic.
    pub rule: EwmaRule,
    /// EWMA smoothing factor α (weight of the old value).
    pub alpha: f64,
    /// EWMA update interval, ms.
    pub update_ms: u32,
    /// The safety valves (fixed for the VM's life).
    pub valves: Valves,
    /// Below this many packets per second (both directions) nothing is delayed; 0 turns the
    /// floor and the per-direction condition of `period_frames` off.
    pub rate_floor_pps: u32,
    /// A direction is delayed only if at least this many frames are expected per delay period
    /// at its current rate (1: one frame per period; a timer firing more often than frames
    /// arrive costs more wake-ups than it saves notifications).
    pub period_frames: f64,
    /// Window over which the packet rate is measured for the floor, ms.
    pub rate_window_ms: u32,
    /// The payoff check of `adaptive` ([`Policy`]): delays apply only while the VM, measured
    /// undelayed, sends at least this many notifications (interrupts + kicks, both directions)
    /// per period `T`. Below that the guest's own mitigation (NAPI, EVENT_IDX) already batches
    /// more than a timer of `T` could, and a delay only adds latency. 0 turns the check off
    /// (the paper's rule and peers that do not send the field).
    #[serde(default)]
    pub notify_per_period: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            mode: ModeKind::Adaptive,
            budget_us: DEFAULT_BUDGET_US,
            rule: EwmaRule::Fast,
            alpha: DEFAULT_ALPHA,
            update_ms: FAST_UPDATE_MS,
            valves: Valves::default(),
            rate_floor_pps: 1000,
            period_frames: 1.0,
            rate_window_ms: 100,
            notify_per_period: 1.0,
        }
    }
}

impl PolicyConfig {
    /// Checks the ranges of α and the update interval.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !(0.0..1.0).contains(&self.alpha) {
            return Err(PolicyError::BadAlpha(self.alpha));
        }
        if !(10..=60_000).contains(&self.update_ms) {
            return Err(PolicyError::BadUpdate(self.update_ms));
        }
        if !(1..=MAX_BUDGET_US).contains(&self.budget_us) {
            return Err(PolicyError::BadBudget(self.budget_us));
        }
        if !(0.0..=64.0).contains(&self.period_frames) {
            return Err(PolicyError::BadPeriodFrames(self.period_frames));
        }
        if !(0.0..=64.0).contains(&self.notify_per_period) {
            return Err(PolicyError::BadNotifyPerPeriod(self.notify_per_period));
        }
        Ok(())
    }
}

/// What the guest asked for in its last SET (docs/design.md §5). The guest may ask for less than the
/// operator's budget or turn buffering off, never for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestPrefs {
    /// RX interrupt buffering wanted.
    pub rx: bool,
    /// TX kick buffering wanted.
    pub tx: bool,
    /// Adaptive split wanted (otherwise both directions get `T`).
    pub adaptive: bool,
    /// Largest extra RTT the guest tolerates, µs; `u32::MAX` when it never said.
    pub max_rtt_us: u32,
}

impl Default for GuestPrefs {
    fn default() -> Self {
        GuestPrefs {
            rx: true,
            tx: true,
            adaptive: true,
            max_rtt_us: u32::MAX,
        }
    }
}

/// Delays the mechanism applies, in nanoseconds (0 = notify at once).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Delays {
    /// RX interrupt delay `b_r`.
    pub rx_ns: u64,
    /// TX kick delay `b_s`.
    pub tx_ns: u64,
    /// The effective `T` while any delay applies (0 otherwise): the longest a completion waits
    /// for its interrupt, whatever the direction.
    pub t_ns: u64,
}

/// Why completions were signalled before their timer fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Valve {
    /// Pending completions reached the frame cap.
    FrameCap,
    /// The guest is running out of RX buffers.
    LowWater,
    /// The guest's EVENT_IDX `used_event` asked for an interrupt inside this batch.
    UsedEvent,
    /// TX, kicks held: the guest queued a frame cap of chains and kicked at `avail_event`.
    TxFrameCap,
}

/// True when the guest's `used_event` lies strictly after the first new entry of a batch that
/// moved the used index from `old` to `new`, and the batch reached it.
///
/// `old` is the used index when the batch started, not the one at the last interrupt: a guest
/// that polls (NAPI) reads entries nobody signalled and then re-enables interrupts at its own
/// read point, past the last interrupt; that is the normal "interrupt me next" state, the one
/// batching defers (comparing with the last interrupt made every such re-enable a flush, which
/// an end-to-end run showed: 4238 valve flushes, batching gone). Only a point beyond everything
/// published so far is the guest's own batching. The one ambiguous case, a delayed point exactly
/// at the end of the previous batch, looks like the normal state and waits for the timer (at
/// most T).
///
/// A driver re-enabling interrupts normally sets `used_event` to the index it will read next
/// (the first new entry): that is the interrupt we defer. A `used_event` further ahead means the
/// driver is batching by itself (Linux's `virtqueue_enable_cb_delayed`, used when its TX ring
/// is full and it waits for 3/4 of the outstanding buffers): it has already waited, so delaying
/// again would only stall it.
pub fn used_event_asks(used_event: u16, old: u16, new: u16) -> bool {
    let ahead = used_event.wrapping_sub(old);
    let moved = new.wrapping_sub(old);
    ahead >= 1 && ahead < moved
}

/// What a queue worker knows about its RX ring after a batch of completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxBatch {
    /// The RX interrupt delay in effect (0: signal at once).
    pub delay_ns: u64,
    /// The run stopped because the guest had no RX buffer left.
    pub no_buffers: bool,
    /// With EVENT_IDX: the guest's `used_event`, and the used index before and after the
    /// batch.
    pub used_event: Option<(u16, u16, u16)>,
    /// Completions waiting for an interrupt, this batch included.
    pub pending: u32,
    /// RX buffers the guest has made available and the device has not taken yet.
    pub free: u16,
    /// The ring's size.
    pub size: u16,
    /// The guest has switched RX interrupts off (`VRING_AVAIL_F_NO_INTERRUPT`, without
    /// EVENT_IDX): it is polling and sees the frames as they land, so there is no interrupt to
    /// hold back and a timer would only cost a wake-up.
    pub interrupts_off: bool,
}

/// What to do about the RX interrupt after a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxSignal {
    /// No delay applies: signal now (if the guest wants an interrupt).
    Now,
    /// A safety valve fired: signal now, and count the valve.
    Valve(Valve),
    /// Leave it to the RX timer (armed for `delay_ns` unless it already is).
    Defer,
}

/// The RX interrupt decision (docs/design.md §4): with a delay in effect (and the guest's RX
/// interrupts on), the interrupt waits
/// for the timer unless a valve fires: the guest ran out of buffers (low water), its own
/// EVENT_IDX batching asked for this point ([`used_event_asks`]), the frame cap was reached, or
/// fewer free buffers than the low-water share remain.
pub fn rx_signal(valves: &Valves, b: &RxBatch) -> RxSignal {
    if b.delay_ns == 0 || b.interrupts_off {
        return RxSignal::Now;
    }
    if b.no_buffers {
        return RxSignal::Valve(Valve::LowWater);
    }
    if let Some((ev, old, new)) = b.used_event {
        if used_event_asks(ev, old, new) {
            return RxSignal::Valve(Valve::UsedEvent);
        }
    }
    if b.pending >= u32::from(valves.frame_cap) {
        RxSignal::Valve(Valve::FrameCap)
    } else if u32::from(b.free) * 100 < u32::from(b.size) * u32::from(valves.rx_low_water_pct) {
        RxSignal::Valve(Valve::LowWater)
    } else {
        RxSignal::Defer
    }
}

/// Whether TX completions are signalled now (docs/design.md §4). Without held kicks, at once.
/// While kicks are held, at most once per `T` (the guest reclaims TX buffers on its next
/// transmit and in its RX poll anyway), or when a frame cap of them waits: a guest whose ring
/// filled up waits for exactly this interrupt.
pub fn tx_signal_due(
    valves: &Valves,
    kicks_held: bool,
    unsignalled: u32,
    now_ns: u64,
    last_signal_ns: u64,
    t_ns: u64,
) -> bool {
    unsignalled > 0
        && (!kicks_held
            || unsignalled >= u32::from(valves.frame_cap)
            || now_ns.saturating_sub(last_signal_ns) >= t_ns)
}

/// How often a delayed VM's payoff is measured again when its delayed notification rate is
/// below the threshold: one rate window without delays every this many ms (2 % of the time
/// with 100 ms windows).
pub const PROBE_EVERY_MS: u64 = 5000;
/// A delayed VM whose packet rate fell to half the rate of its last undelayed measurement is
/// measured again after this many ms already, not [`PROBE_EVERY_MS`] (the traffic changed).
pub const PROBE_SOONEST_MS: u64 = 1000;

/// A VM's running counters since any fixed origin, as the policy reads them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Packets the guest sent.
    pub sent: u64,
    /// Packets delivered to the guest.
    pub recv: u64,
    /// Notifications both ways: interrupts to the guest and the guest's kicks.
    pub notifications: u64,
}

impl From<(u64, u64)> for Totals {
    /// Packet totals with no notification counted.
    fn from((sent, recv): (u64, u64)) -> Self {
        Totals {
            sent,
            recv,
            notifications: 0,
        }
    }
}

impl From<(u64, u64, u64)> for Totals {
    fn from((sent, recv, notifications): (u64, u64, u64)) -> Self {
        Totals {
            sent,
            recv,
            notifications,
        }
    }
}

/// The payoff check's state ([`PolicyConfig::notify_per_period`]).
#[derive(Debug, Clone, Copy, Default)]
struct Payoff {
    /// The current rate window runs undelayed to measure again.
    probing: bool,
    /// Some delay applied at some point of the current rate window.
    window_delayed: bool,
    /// Notifications per second of the last undelayed rate window.
    natural_nps: u64,
    /// Packets per second (both ways) of that window.
    natural_pps: u64,
    /// When that window ended.
    measured_ns: u64,
    /// Windows run undelayed because the last measurement was delayed.
    probes: u64,
    /// Undelayed measurements that found too few notifications to save.
    refusals: u64,
}

/// The per-VM batching policy.
///
/// **The payoff check** (`adaptive` only): a timer of `T` can at best merge the notifications
/// that fall within `T` of each other. A VM whose guest already batches by itself (NAPI polls
/// while interrupts are off, EVENT_IDX suppresses the rest) may send fewer than one
/// notification per `T` even at thousands of packets per second; delaying it then adds up to
/// `T` of latency and saves next to nothing (a 50 Mb/s UDP stream into a TCG guest: 4,500
/// packets/s, 1,100 notifications/s, −10 % notifications for twice the RTT). So every rate
/// window run without delays measures the VM's notifications per second, and delays apply only
/// while that rate times `T` is at least [`PolicyConfig::notify_per_period`]. While delays
/// apply, the natural rate cannot be seen (the delays lower it). A delayed window that still
/// reaches the threshold proves it; otherwise one window in [`PROBE_EVERY_MS`] runs undelayed
/// to measure it again, sooner ([`PROBE_SOONEST_MS`]) when the packet rate fell by half.
#[derive(Debug, Clone)]
pub struct Policy {
    cfg: PolicyConfig,
    guest: GuestPrefs,
    /// `p*`, the smoothed send share.
    p_star: f64,
    /// [`EwmaRule::Fast`]: the smoothed packets sent and received per interval.
    smoothed: (f64, f64),
    last_update_ns: u64,
    last_update_counts: (u64, u64),
    window_start_ns: u64,
    window_counts: Totals,
    /// Packets per second of the last rate window, `(sent, received)`.
    rates: (u64, u64),
    /// Notifications per second of the last rate window.
    notify_rate: u64,
    /// The last rate window was above the floor.
    active: bool,
    updates: u64,
    floor_windows: u64,
    payoff: Payoff,
}

/// The policy's visible state, for stats and control replies.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PolicyView {
    /// The operator's configuration.
    pub config: PolicyConfig,
    /// What the guest asked for.
    pub guest: GuestPrefs,
    /// Effective `T`, µs.
    pub t_us: u32,
    /// `p*`.
    pub send_ratio: f64,
    /// Configured RX delay `b_r`, µs (before the rate floor).
    pub rx_delay_us: u32,
    /// Configured TX delay `b_s`, µs (before the rate floor).
    pub tx_delay_us: u32,
    /// Whether the packet rate is above the floor (delays apply).
    pub active: bool,
    /// Packets per second sent by the guest in the last rate window.
    pub tx_pps: u64,
    /// Packets per second received by the guest in the last rate window.
    pub rx_pps: u64,
    /// EWMA updates so far.
    pub updates: u64,
    /// Rate windows in which the floor held the delays at zero.
    pub floor_windows: u64,
    /// Notifications (interrupts + kicks) per second in the last rate window.
    #[serde(default)]
    pub notify_rate: u64,
    /// The payoff check lets delays apply (always true when the check is off).
    #[serde(default)]
    pub payoff_open: bool,
    /// Notifications per second the last undelayed rate window measured.
    #[serde(default)]
    pub natural_notify_rate: u64,
    /// Rate windows run undelayed to measure the payoff again.
    #[serde(default)]
    pub payoff_probes: u64,
    /// Undelayed measurements that found too few notifications to be worth a delay.
    #[serde(default)]
    pub payoff_refusals: u64,
    /// RX delay in effect now, µs (after the rate floor and the one-packet-per-period rule).
    pub applied_rx_delay_us: u32,
    /// TX delay in effect now, µs (likewise).
    pub applied_tx_delay_us: u32,
}

impl Policy {
    /// A policy starting at `now_ns` with `p* = 0.5` (no information yet) and the VM's packet
    /// totals `(n_s, n_r)` at that time.
    pub fn new(cfg: PolicyConfig, now_ns: u64, totals: impl Into<Totals>) -> Self {
        let totals = totals.into();
        let mut p = Policy {
            cfg,
            guest: GuestPrefs::default(),
            p_star: 0.5,
            smoothed: (0.0, 0.0),
            last_update_ns: now_ns,
            last_update_counts: (totals.sent, totals.recv),
            window_start_ns: now_ns,
            window_counts: totals,
            rates: (0, 0),
            notify_rate: 0,
            active: cfg.rate_floor_pps == 0,
            updates: 0,
            floor_windows: 0,
            payoff: Payoff {
                measured_ns: now_ns,
                ..Payoff::default()
            },
        };
        p.note_delays();
        p
    }

    /// Whether the payoff check applies: `adaptive` with a threshold.
    fn payoff_checked(&self) -> bool {
        self.cfg.mode == ModeKind::Adaptive && self.cfg.notify_per_period > 0.0
    }

    /// Whether `nps` notifications per second, undelayed, are worth a delay of `T`.
    fn worth_delaying(&self, nps: u64) -> bool {
        nps as f64 * f64::from(self.t_us()) >= self.cfg.notify_per_period * 1_000_000.0
    }

    /// The payoff check lets delays apply now (see [`Policy`]).
    fn payoff_open(&self) -> bool {
        !self.payoff_checked()
            || (!self.payoff.probing && self.worth_delaying(self.payoff.natural_nps))
    }

    /// Records that the current rate window ran with some delay (after every change).
    fn note_delays(&mut self) {
        let d = self.delays();
        if d.rx_ns | d.tx_ns != 0 {
            self.payoff.window_delayed = true;
        }
    }

    /// Closes a rate window for the payoff check: `nps` notifications and `pps` packets per
    /// second were measured in it.
    fn close_payoff_window(&mut self, now_ns: u64, nps: u64, pps: u64) {
        let t = f64::from(self.t_us());
        let checked = self.payoff_checked();
        let counts = checked && self.active && t > 0.0;
        let worth = self.worth_delaying(nps);
        let q = &mut self.payoff;
        if !q.window_delayed || worth {
            // An undelayed window measures the guest's own notification rate. A delayed one
            // that still reaches the threshold proves it as well (delays only take
            // notifications away), so a busy VM is never probed.
            q.natural_nps = nps;
            q.natural_pps = pps;
            q.measured_ns = now_ns;
            q.probing = false;
            if !q.window_delayed && !worth && counts {
                q.refusals += 1;
            }
        } else if checked {
            let since = now_ns.saturating_sub(q.measured_ns);
            if since >= PROBE_EVERY_MS * 1_000_000
                || (since >= PROBE_SOONEST_MS * 1_000_000 && pps.saturating_mul(2) < q.natural_pps)
            {
                q.probing = true;
                q.probes += 1;
            }
        }
        q.window_delayed = false;
    }

    /// The configuration.
    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// The operator changes mode and budget (takes effect at once).
    pub fn set_operator(&mut self, mode: ModeKind, budget_us: u32) {
        self.cfg.mode = mode;
        self.cfg.budget_us = budget_us;
        self.note_delays();
    }

    /// The guest's SET. Returns true when the request was clamped to the operator's budget
    /// (or to zero because the operator turned batching off).
    pub fn set_guest(&mut self, prefs: GuestPrefs) -> bool {
        self.guest = prefs;
        self.note_delays();
        let wants = (prefs.rx || prefs.tx) && prefs.max_rtt_us > 0;
        wants && prefs.max_rtt_us > self.operator_t_us()
    }

    /// Forgets the guest's preferences (a new frontend connected).
    pub fn reset_guest(&mut self) {
        self.guest = GuestPrefs::default();
        self.note_delays();
    }

    /// The guest's preferences.
    pub fn guest(&self) -> GuestPrefs {
        self.guest
    }

    fn operator_t_us(&self) -> u32 {
        match self.cfg.mode {
            ModeKind::Off => 0,
            _ => self.cfg.budget_us,
        }
    }

    /// Effective `T` in µs: the smaller of the budget and the guest's limit; 0 when off.
    pub fn t_us(&self) -> u32 {
        if !self.guest.rx && !self.guest.tx {
            return 0;
        }
        self.operator_t_us().min(self.guest.max_rtt_us)
    }

    /// `p*`.
    pub fn send_ratio(&self) -> f64 {
        self.p_star
    }

    /// The configured delays `(b_r, b_s)` in µs, ignoring the rate floor.
    pub fn configured_us(&self) -> (u32, u32) {
        let t = self.t_us() as f64;
        let (r, s) = match self.cfg.mode {
            ModeKind::Off => (0.0, 0.0),
            ModeKind::Fixed => (t, t),
            ModeKind::Adaptive if !self.guest.adaptive => (t, t),
            ModeKind::Adaptive => ((1.0 - self.p_star) * t, self.p_star * t),
        };
        let keep = |on: bool, v: f64| {
            let v = v.round() as u32;
            if on && v >= MIN_DELAY_US {
                v
            } else {
                0
            }
        };
        (keep(self.guest.rx, r), keep(self.guest.tx, s))
    }

    /// The delays to apply now: the configured ones while the rate is above the floor and the
    /// payoff check lets them (see [`Policy`]), and per direction only if at least one packet
    /// is expected per delay period (a timer firing more often than packets arrive would cost
    /// more wake-ups than the notifications it saves).
    pub fn delays(&self) -> Delays {
        if !self.active || !self.payoff_open() {
            return Delays::default();
        }
        let (r, s) = self.configured_us();
        // A floor of 0 turns both rate conditions off.
        let floor = self.cfg.rate_floor_pps > 0;
        let frames = self.cfg.period_frames;
        let worth =
            |us: u32, pps: u64| !floor || f64::from(us) * pps as f64 >= frames * 1_000_000.0;
        let rx_ns = if worth(r, self.rates.1) {
            u64::from(r) * 1000
        } else {
            0
        };
        let tx_ns = if worth(s, self.rates.0) {
            u64::from(s) * 1000
        } else {
            0
        };
        let t_ns = if rx_ns | tx_ns != 0 {
            u64::from(self.t_us()) * 1000
        } else {
            0
        };
        Delays { rx_ns, tx_ns, t_ns }
    }

    /// When [`Policy::tick`] next has work to do.
    pub fn next_tick_ns(&self) -> u64 {
        let w = self.window_start_ns + u64::from(self.cfg.rate_window_ms) * 1_000_000;
        let u = self.last_update_ns + u64::from(self.cfg.update_ms) * 1_000_000;
        w.min(u)
    }

    /// Advances the clock to `now_ns` with the VM's packet totals `(n_s, n_r)` (guest→host,
    /// host→guest, since any fixed origin). Closes a rate window and/or an update interval when
    /// they are due; an interval that spanned idle time counts as one sample. Returns true if
    /// the delays may have changed.
    pub fn tick(&mut self, now_ns: u64, totals: impl Into<Totals>) -> bool {
        let totals = totals.into();
        let before = self.delays();
        let mut changed = false;
        let window_ns = u64::from(self.cfg.rate_window_ms) * 1_000_000;
        let elapsed = now_ns.saturating_sub(self.window_start_ns);
        if elapsed >= window_ns {
            let sent = totals.sent.saturating_sub(self.window_counts.sent);
            let recv = totals.recv.saturating_sub(self.window_counts.recv);
            let notes = totals
                .notifications
                .saturating_sub(self.window_counts.notifications);
            let pps = |n: u64| (u128::from(n) * 1_000_000_000 / u128::from(elapsed.max(1))) as u64;
            self.rates = (pps(sent), pps(recv));
            self.notify_rate = pps(notes);
            let packets = sent + recv;
            // packets / elapsed ≥ floor / 1 s, in integers.
            let active = u128::from(packets) * 1_000_000_000
                >= u128::from(self.cfg.rate_floor_pps) * u128::from(elapsed);
            if !active {
                self.floor_windows += 1;
            }
            changed |= active != self.active;
            self.active = active;
            self.close_payoff_window(now_ns, self.notify_rate, pps(sent + recv));
            self.window_start_ns = now_ns;
            self.window_counts = totals;
        }
        let update_ns = u64::from(self.cfg.update_ms) * 1_000_000;
        if now_ns.saturating_sub(self.last_update_ns) >= update_ns {
            let n_s = totals.sent.saturating_sub(self.last_update_counts.0) as f64;
            let n_r = totals.recv.saturating_sub(self.last_update_counts.1) as f64;
            let a = self.cfg.alpha;
            match self.cfg.rule {
                EwmaRule::Paper => {
                    let p_s = n_s / (n_s + n_r + 1.0);
                    self.p_star = a * self.p_star + (1.0 - a) * p_s;
                }
                EwmaRule::Fast => {
                    let (s, r) = self.smoothed;
                    let (s, r) = (a * s + (1.0 - a) * n_s, a * r + (1.0 - a) * n_r);
                    self.smoothed = (s, r);
                    // Less than one packet's worth of traffic says nothing about its direction.
                    if s + r >= 1.0 {
                        self.p_star = s / (s + r);
                    }
                }
            }
            self.last_update_ns = now_ns;
            self.last_update_counts = (totals.sent, totals.recv);
            self.updates += 1;
            changed = true;
        }
        self.note_delays();
        changed || self.delays() != before
    }

    /// A snapshot for stats and replies.
    pub fn view(&self) -> PolicyView {
        let (r, s) = self.configured_us();
        let applied = self.delays();
        PolicyView {
            config: self.cfg,
            guest: self.guest,
            t_us: self.t_us(),
            send_ratio: self.p_star,
            rx_delay_us: r,
            tx_delay_us: s,
            active: self.active,
            tx_pps: self.rates.0,
            rx_pps: self.rates.1,
            updates: self.updates,
            floor_windows: self.floor_windows,
            notify_rate: self.notify_rate,
            payoff_open: self.payoff_open(),
            natural_notify_rate: self.payoff.natural_nps,
            payoff_probes: self.payoff.probes,
            payoff_refusals: self.payoff.refusals,
            applied_rx_delay_us: (applied.rx_ns / 1000) as u32,
            applied_tx_delay_us: (applied.tx_ns / 1000) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A fake clock and traffic generator driving a policy.
    struct Sim {
        now: u64,
        sent: u64,
        recv: u64,
        /// Notifications so far.
        notes: f64,
        /// Notifications per packet the simulated guest sends (1: no batching of its own).
        notes_per_packet: f64,
        /// Notifications per delay period while a delay applies.
        notes_per_delay: f64,
        p: Policy,
    }

    impl Sim {
        fn new(cfg: PolicyConfig) -> Sim {
            Sim {
                now: 1_000 * MS,
                sent: 0,
                recv: 0,
                notes: 0.0,
                notes_per_packet: 1.0,
                notes_per_delay: 1.0,
                p: Policy::new(cfg, 1_000 * MS, (0, 0)),
            }
        }

        /// Runs `ms` milliseconds of traffic at `s` + `r` packets per ms, ticking every ms.
        fn run(&mut self, ms: u64, s: u64, r: u64) {
            for _ in 0..ms {
                self.now += MS;
                self.sent += s;
                self.recv += r;
                // Undelayed, the guest notifies at its own rate; a delay of d lets at most
                // `notes_per_delay` notifications per d through.
                let d = self.p.delays();
                let own = (s + r) as f64 * self.notes_per_packet;
                let cap = match d.rx_ns.max(d.tx_ns) {
                    0 => own,
                    ns => self.notes_per_delay * 1_000_000.0 / ns as f64,
                };
                self.notes += own.min(cap);
                self.p
                    .tick(self.now, (self.sent, self.recv, self.notes as u64));
            }
        }
    }

    fn cfg(mode: ModeKind, budget_us: u32) -> PolicyConfig {
        PolicyConfig {
            mode,
            budget_us,
            update_ms: 100,
            ..PolicyConfig::default()
        }
    }

    #[test]
    fn budget_resolution() {
        let m = |s: &str| s.parse::<ModeSpec>().unwrap();
        assert_eq!(
            resolve_budget(m("adaptive"), None),
            Ok((ModeKind::Adaptive, DEFAULT_BUDGET_US))
        );
        assert_eq!(
            resolve_budget(m("fixed"), Some(250)),
            Ok((ModeKind::Fixed, 250))
        );
        assert_eq!(
            resolve_budget(m("adaptive:1000"), Some(1000)),
            Ok((ModeKind::Adaptive, 1000))
        );
        assert!(matches!(
            resolve_budget(m("adaptive:1000"), Some(500)),
            Err(PolicyError::ConflictingBudget { .. })
        ));
        assert_eq!(
            resolve_budget(m("off"), Some(0)),
            Err(PolicyError::BadBudget(0))
        );
    }

    #[test]
    fn config_ranges() {
        assert!(PolicyConfig::default().validate().is_ok());
        for c in [
            PolicyConfig {
                alpha: 1.0,
                ..Default::default()
            },
            PolicyConfig {
                alpha: -0.1,
                ..Default::default()
            },
            PolicyConfig {
                update_ms: 5,
                ..Default::default()
            },
        ] {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }

    #[test]
    fn ewma_converges_to_the_send_share() {
        let mut s = Sim::new(cfg(ModeKind::Adaptive, 1000));
        // 3 sent per 1 received: p_s = 0.75 (minus the +1 in the denominator).
        s.run(3000, 30, 10);
        let p = s.p.send_ratio();
        assert!((p - 0.75).abs() < 0.01, "p* = {p}");
        let (r, t) = s.p.configured_us();
        assert!((245..=255).contains(&r), "b_r {r}");
        assert!((745..=755).contains(&t), "b_s {t}");
        // Traffic turns around: p* follows within a handful of intervals, smoothly.
        s.run(100, 10, 30);
        let one = s.p.send_ratio();
        // One interval moves p* by (1-α) of the distance: 0.75 → 0.75·0.75 + 0.25·0.25 = 0.625.
        assert!((one - 0.625).abs() < 0.01, "after one interval p* = {one}");
        s.run(2000, 10, 30);
        assert!((s.p.send_ratio() - 0.25).abs() < 0.01);
    }

    #[test]
    fn the_paper_update_is_the_recursive_ewma() {
        let paper = PolicyConfig {
            rule: EwmaRule::Paper,
            ..cfg(ModeKind::Adaptive, 1000)
        };
        let mut p = Policy::new(paper, 0, (0, 0));
        p.tick(0, (0, 0));
        // One interval all sends: p_s = 99/100.
        p.tick(100 * MS, (99, 0));
        let expect = 0.75 * 0.5 + 0.25 * (99.0 / 100.0);
        assert!((p.send_ratio() - expect).abs() < 1e-9);
        // Next interval all receives: the first sample still weighs in (not a two-tap filter).
        p.tick(200 * MS, (99, 99));
        let expect2 = 0.75 * expect + 0.25 * 0.0;
        assert!((p.send_ratio() - expect2).abs() < 1e-9);
    }

    /// Runs 20 s of all-send traffic, then all-receive traffic at the same rate; returns `p*`
    /// at the turn and sampled every 100 ms after it.
    fn after_a_turn(rule: EwmaRule, update_ms: u32) -> (f64, Vec<f64>) {
        let mut s = Sim::new(PolicyConfig {
            rule,
            update_ms,
            ..cfg(ModeKind::Adaptive, 1000)
        });
        s.run(20_000, 20, 0);
        let at_turn = s.p.send_ratio();
        let after = (0..20)
            .map(|_| {
                s.run(100, 0, 20);
                s.p.send_ratio()
            })
            .collect();
        (at_turn, after)
    }

    #[test]
    fn the_default_rule_follows_a_change_of_direction_within_a_second() {
        let (at_turn, p) = after_a_turn(EwmaRule::Fast, FAST_UPDATE_MS);
        assert!(at_turn > 0.999, "{at_turn}");
        // Old traffic weighs α^k after k intervals of 50 ms.
        assert!((p[0] - 0.5625).abs() < 0.01, "after 100 ms: {}", p[0]);
        assert!(p[4] < 0.06, "after 500 ms p* = {}", p[4]);
        assert!(p[9] < 0.01, "after 1 s p* = {}", p[9]);
        // The delays follow: RX (the direction now carrying the traffic) gets most of T.
        let mut s = Sim::new(cfg(ModeKind::Adaptive, 1000));
        s.run(20_000, 20, 0);
        assert!(s.p.configured_us().1 > 950, "{:?}", s.p.view());
        s.run(1000, 0, 20);
        let (rx, tx) = s.p.configured_us();
        assert!(
            rx > 900 && tx < 100,
            "rx {rx} tx {tx} µs a second after the turn"
        );
    }

    #[test]
    fn the_paper_rule_has_not_moved_a_second_after_a_turn() {
        let (at_turn, p) = after_a_turn(EwmaRule::Paper, PAPER_UPDATE_MS);
        // Four 5 s updates from 0.5 have not even reached the all-send share yet.
        assert!(
            (at_turn - (1.0 - 0.5 * 0.75f64.powi(4))).abs() < 0.01,
            "{at_turn}"
        );
        // Its next update comes at the next 5 s boundary: nothing moves for 2 s.
        assert_eq!(p[9], at_turn, "after 1 s");
        assert_eq!(p[19], at_turn, "after 2 s");
    }

    #[test]
    fn idle_intervals_leave_the_default_rule_where_it_was() {
        let mut s = Sim::new(cfg(ModeKind::Adaptive, 1000));
        s.run(2000, 30, 10);
        let before = s.p.send_ratio();
        assert!((before - 0.75).abs() < 0.01, "{before}");
        s.run(3000, 0, 0);
        assert!((s.p.send_ratio() - before).abs() < 1e-9, "idle moved p*");
        // The paper's rule reads an idle interval as "the guest sent nothing".
        let mut p = Sim::new(PolicyConfig {
            rule: EwmaRule::Paper,
            ..cfg(ModeKind::Adaptive, 1000)
        });
        p.run(2000, 30, 10);
        let before = p.p.send_ratio();
        p.run(3000, 0, 0);
        assert!(p.p.send_ratio() < before / 2.0);
    }

    #[test]
    fn the_frames_per_period_threshold_decides_which_direction_waits() {
        let mk = |period_frames| {
            let mut s = Sim::new(PolicyConfig {
                period_frames,
                ..cfg(ModeKind::Fixed, 500)
            });
            // 10 sent and 1 received per ms: 500 µs holds 5 sent, 0.5 received packets.
            s.run(300, 10, 1);
            s.p.delays()
        };
        assert_eq!((mk(1.0).rx_ns, mk(1.0).tx_ns), (0, 500_000));
        assert_eq!((mk(0.5).rx_ns, mk(0.5).tx_ns), (500_000, 500_000));
        assert_eq!((mk(8.0).rx_ns, mk(8.0).tx_ns), (0, 0));
        assert!(PolicyConfig {
            period_frames: 65.0,
            ..PolicyConfig::default()
        }
        .validate()
        .is_err());
    }

    /// A guest that already batches by itself (NAPI, EVENT_IDX): a 50 Mb/s UDP stream into a
    /// TCG guest measured 4,500 packets/s and 1,100 interrupts/s undelayed.
    fn self_batching(s: &mut Sim, ms: u64) {
        s.notes_per_packet = 0.25;
        s.run(ms, 0, 4) // with the Sim's 1 ms tick: 4,000 packets/s, 1,000 notifications/s
    }

    #[test]
    fn a_guest_that_batches_by_itself_is_not_delayed() {
        // 1,000 notifications/s × 500 µs = 0.5 per period: below the default 1.
        let mut s = Sim::new(cfg(ModeKind::Adaptive, 500));
        self_batching(&mut s, 2000);
        assert_eq!(s.p.delays(), Delays::default());
        let v = s.p.view();
        assert!(!v.payoff_open && v.active, "{v:?}");
        assert_eq!(v.natural_notify_rate, 1000);
        assert!(v.payoff_refusals >= 19, "{v:?}");
        assert!(v.rx_delay_us > 400, "configured, not applied: {v:?}");
        // A budget of 1,000 µs makes it one per period: worth it.
        s.p.set_operator(ModeKind::Adaptive, 1000);
        assert!(s.p.delays().rx_ns > 900_000);
        // So does a lower threshold, and 0 turns the check off.
        for (npp, delayed) in [(1.0, false), (0.5, true), (0.0, true)] {
            let mut s = Sim::new(PolicyConfig {
                notify_per_period: npp,
                ..cfg(ModeKind::Adaptive, 500)
            });
            self_batching(&mut s, 2000);
            assert_eq!(s.p.delays().rx_ns > 0, delayed, "{npp}");
        }
        // A guest that notifies once per packet is delayed at the same packet rate.
        let mut s = Sim::new(cfg(ModeKind::Adaptive, 500));
        s.run(2000, 0, 4);
        assert!(s.p.delays().rx_ns > 400_000, "{:?}", s.p.view());
        // `fixed` is the operator's fixed delay: no payoff check.
        let mut s = Sim::new(cfg(ModeKind::Fixed, 500));
        self_batching(&mut s, 2000);
        assert_eq!(s.p.delays().rx_ns, 500_000);
        assert!(PolicyConfig {
            notify_per_period: 64.5,
            ..PolicyConfig::default()
        }
        .validate()
        .is_err());
    }

    /// Windows (100 ms) of the next `ms` in which no delay applied.
    fn undelayed_windows(s: &mut Sim, ms: u64, per_ms: (u64, u64)) -> u64 {
        let mut n = 0;
        for i in 0..ms {
            s.run(1, per_ms.0, per_ms.1);
            if i % 100 == 50 && s.p.delays() == Delays::default() {
                n += 1;
            }
        }
        n
    }

    #[test]
    fn the_payoff_is_measured_again_while_delayed() {
        let mut s = Sim::new(cfg(ModeKind::Adaptive, 500));
        // Opening takes one undelayed window.
        s.run(250, 0, 20);
        assert!(s.p.delays().rx_ns > 0);
        // A VM that still notifies once per T while delayed proves the payoff: no probe.
        assert_eq!(undelayed_windows(&mut s, 20_000, (0, 20)), 0);
        assert_eq!(s.p.view().payoff_probes, 0);
        // Below that, one window in PROBE_EVERY_MS runs undelayed (2 % of the time).
        s.notes_per_delay = 0.5;
        let off = undelayed_windows(&mut s, 20_000, (0, 20));
        assert!((3..=5).contains(&off), "{off} undelayed windows in 20 s");
        assert!(s.p.view().payoff_probes >= 3);
        // The guest starts batching by itself at the same packet rate: the next probe sees it
        // and the delays stop within PROBE_EVERY_MS.
        s.notes_per_packet = 0.02;
        let off = undelayed_windows(&mut s, PROBE_EVERY_MS + 200, (0, 20));
        assert!(off >= 1);
        assert_eq!(s.p.delays(), Delays::default());
        // ... and stay off while it does.
        assert_eq!(undelayed_windows(&mut s, 3000, (0, 20)), 30);
        // It stops batching by itself: delays are back after one undelayed window.
        s.notes_per_packet = 1.0;
        s.run(200, 0, 20);
        assert!(s.p.delays().rx_ns > 0);
    }

    #[test]
    fn a_fall_in_the_packet_rate_is_measured_sooner() {
        let mut s = Sim::new(cfg(ModeKind::Adaptive, 500));
        s.run(2000, 0, 20);
        assert!(s.p.delays().rx_ns > 0);
        // The traffic turns into a slower stream the guest batches by itself.
        let t0 = s.now;
        while s.p.delays() != Delays::default() {
            self_batching(&mut s, 1);
            assert!(s.now - t0 <= (PROBE_SOONEST_MS + 300) * MS, "still delayed");
        }
    }

    #[test]
    fn delays_follow_budget_and_guest_within_one_interval() {
        let mut s = Sim::new(cfg(ModeKind::Adaptive, 1000));
        s.run(2000, 10, 10);
        let d = s.p.delays();
        assert!(d.rx_ns > 400_000 && d.tx_ns > 400_000, "{d:?}");
        assert_eq!(d.rx_ns + d.tx_ns, 1_000_000);
        // The operator lowers the budget: effective at once, or after one undelayed rate
        // window when the rate measured under the longer delays does not prove the payoff of
        // the shorter ones.
        s.p.set_operator(ModeKind::Adaptive, 200);
        s.run(200, 10, 10);
        assert_eq!(s.p.delays().rx_ns + s.p.delays().tx_ns, 200_000);
        // The guest asks for less.
        s.p.set_operator(ModeKind::Adaptive, 1000);
        let clamped = s.p.set_guest(GuestPrefs {
            max_rtt_us: 100,
            ..Default::default()
        });
        assert!(!clamped);
        assert_eq!(s.p.t_us(), 100);
        // ... and for more: clamped to the budget.
        assert!(s.p.set_guest(GuestPrefs {
            max_rtt_us: 5000,
            ..Default::default()
        }));
        assert_eq!(s.p.t_us(), 1000);
        // A split share below the minimum delay is not applied.
        s.p.set_guest(GuestPrefs {
            max_rtt_us: 60,
            ..Default::default()
        });
        assert_eq!(s.p.delays(), Delays::default());
        // RX only, fixed split.
        s.p.set_guest(GuestPrefs {
            tx: false,
            adaptive: false,
            max_rtt_us: 300,
            ..Default::default()
        });
        assert_eq!(
            s.p.delays(),
            Delays {
                rx_ns: 300_000,
                tx_ns: 0,
                t_ns: 300_000
            }
        );
        // Everything off.
        s.p.set_guest(GuestPrefs {
            rx: false,
            tx: false,
            adaptive: false,
            max_rtt_us: 0,
        });
        assert_eq!(s.p.delays(), Delays::default());
        assert_eq!(s.p.t_us(), 0);
        s.p.reset_guest();
        assert_eq!(s.p.t_us(), 1000);
    }

    #[test]
    fn fixed_and_off() {
        let mut s = Sim::new(cfg(ModeKind::Fixed, 250));
        s.run(500, 50, 5);
        // Fixed: both directions wait T, and T (not 2T) bounds any completion's wait.
        assert_eq!(
            s.p.delays(),
            Delays {
                rx_ns: 250_000,
                tx_ns: 250_000,
                t_ns: 250_000
            }
        );
        s.p.set_operator(ModeKind::Off, 250);
        assert_eq!(s.p.delays(), Delays::default());
        // With the operator's batching off, any buffering a guest asks for is clamped to 0.
        assert!(s.p.set_guest(GuestPrefs {
            max_rtt_us: 10,
            ..Default::default()
        }));
        assert!(!s.p.set_guest(GuestPrefs {
            rx: false,
            tx: false,
            adaptive: false,
            max_rtt_us: 0
        }));
    }

    #[test]
    fn rate_floor_holds_delays_at_zero_and_releases() {
        let mut s = Sim::new(cfg(ModeKind::Fixed, 500));
        // 999 packets/s: below the 1000 pps floor.
        for _ in 0..20 {
            s.now += 100 * MS;
            s.sent += 99;
            s.p.tick(s.now, (s.sent, s.recv));
            assert_eq!(s.p.delays(), Delays::default());
        }
        assert_eq!(s.p.view().floor_windows, 20);
        // 4 packets/ms = 4000 pps: active after one window.
        s.run(100, 2, 2);
        assert_eq!(s.p.delays().rx_ns, 500_000);
        assert!(s.p.view().active);
        // Traffic stops; the next tick after a long idle gap sees the low rate.
        s.now += 10_000 * MS;
        s.p.tick(s.now, (s.sent, s.recv));
        assert_eq!(s.p.delays(), Delays::default());
        // Exactly at the floor counts as active.
        s.now += 100 * MS;
        s.sent += 100;
        s.p.tick(s.now, (s.sent, s.recv));
        assert!(s.p.view().active);
    }

    #[test]
    fn a_direction_too_slow_to_fill_a_period_is_not_delayed() {
        let mut s = Sim::new(cfg(ModeKind::Fixed, 500));
        // 10 sent and 1 received per ms: 500 µs holds 5 sent but only 0.5 received packets.
        s.run(300, 10, 1);
        let d = s.p.delays();
        assert_eq!((d.rx_ns, d.tx_ns), (0, 500_000), "{:?}", s.p.view());
        s.run(300, 10, 2);
        assert_eq!(s.p.delays().rx_ns, 500_000);
    }

    fn batch(delay_ns: u64, pending: u32, free: u16) -> RxBatch {
        RxBatch {
            delay_ns,
            no_buffers: false,
            used_event: None,
            pending,
            free,
            size: 256,
            interrupts_off: false,
        }
    }

    #[test]
    fn rx_signal_defers_unless_a_valve_fires() {
        let v = Valves::default();
        // No delay: at once, whatever the ring says.
        assert_eq!(rx_signal(&v, &batch(0, 100, 0)), RxSignal::Now);
        assert_eq!(rx_signal(&v, &batch(500_000, 1, 256)), RxSignal::Defer);
        assert_eq!(rx_signal(&v, &batch(500_000, 63, 64)), RxSignal::Defer);
        assert_eq!(
            rx_signal(&v, &batch(500_000, 64, 256)),
            RxSignal::Valve(Valve::FrameCap)
        );
        assert_eq!(
            rx_signal(&v, &batch(500_000, 1, 63)),
            RxSignal::Valve(Valve::LowWater)
        );
        assert_eq!(
            rx_signal(&v, &batch(500_000, 1, 0)),
            RxSignal::Valve(Valve::LowWater)
        );
        let dry = RxBatch {
            no_buffers: true,
            ..batch(500_000, 1, 200)
        };
        assert_eq!(rx_signal(&v, &dry), RxSignal::Valve(Valve::LowWater));
        // The guest's delayed callback inside this batch (10..15 reached 12): now.
        let asks = RxBatch {
            used_event: Some((12, 10, 15)),
            ..batch(500_000, 5, 200)
        };
        assert_eq!(rx_signal(&v, &asks), RxSignal::Valve(Valve::UsedEvent));
        // The normal re-enable at the first new entry: deferred.
        let normal = RxBatch {
            used_event: Some((10, 10, 15)),
            ..batch(500_000, 5, 200)
        };
        assert_eq!(rx_signal(&v, &normal), RxSignal::Defer);
        // A polling guest (interrupts off): nothing to hold back, no timer.
        let polling = RxBatch {
            interrupts_off: true,
            ..batch(500_000, 5, 200)
        };
        assert_eq!(rx_signal(&v, &polling), RxSignal::Now);
    }

    #[test]
    fn tx_completions_wait_at_most_t_while_kicks_are_held() {
        let v = Valves::default();
        let t = 500 * 1000;
        // Nothing to signal.
        assert!(!tx_signal_due(&v, true, 0, 10 * MS, 0, t));
        // Kicks not held: at once.
        assert!(tx_signal_due(&v, false, 1, 10 * MS, 10 * MS, t));
        // Held: a fake clock walks through one period.
        let last = 100 * MS;
        assert!(!tx_signal_due(&v, true, 3, last + t - 1, last, t));
        assert!(tx_signal_due(&v, true, 3, last + t, last, t));
        // A frame cap of completions does not wait.
        assert!(tx_signal_due(&v, true, 64, last + 1, last, t));
        assert!(!tx_signal_due(&v, true, 63, last + 1, last, t));
    }

    #[test]
    fn used_event_valve() {
        // Normal re-enable: used_event = first new entry → defer.
        assert!(!used_event_asks(10, 10, 15));
        // Delayed callback at 12, batch 10..15 reached it → flush.
        assert!(used_event_asks(12, 10, 15));
        // Not reached yet.
        assert!(!used_event_asks(20, 10, 15));
        assert!(!used_event_asks(15, 10, 15));
        // Already passed (the guest lags): the normal deferred path handles it.
        assert!(!used_event_asks(5, 10, 15));
        // Wrapping.
        assert!(used_event_asks(2, 65534, 5));
        assert!(!used_event_asks(65534, 65534, 5));
    }
}
