//! Guest control frames (docs/design.md §5): validate, rate-limit, apply to the policy, build the
//! reply. Pure: the caller supplies the time and the energy figure, and puts the reply on the
//! guest's RX queue.

use control_msg::{
    parse_frame, Flags, Message, Op, ParseError, Status, DEVICE_MAC, ETH_HDR_LEN, MAX_FRAME_LEN,
};
use serde::{Deserialize, Serialize};

use crate::policy::{GuestPrefs, Policy};

/// Control frames acted on per second per VM.
pub const CONTROL_RATE: u32 = 20;

/// Fault injection for tests: with `VNB_INJECT_PANIC=control` in the daemon's environment, a
/// control frame whose magic reads `VNBP` (instead of `VNB1`) panics the queue worker that
/// handles it, so tests can show that a panic ends only that VM's connection.
pub const INJECT_PANIC_ENV: &str = "VNB_INJECT_PANIC";

fn inject_panic(payload: &[u8]) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var(INJECT_PANIC_ENV).is_ok_and(|v| v == "control"));
    if on && payload.get(..4) == Some(b"VNBP") {
        panic!("{INJECT_PANIC_ENV}=control: a VNBP control frame");
    }
}

/// A token bucket: `rate` tokens per second, at most `rate` stored.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: u32,
    /// Tokens × 1e9 (token-nanoseconds), so refills need no division.
    level: u64,
    last_ns: u64,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(rate: u32, now_ns: u64) -> Self {
        RateLimiter {
            rate,
            level: u64::from(rate) * 1_000_000_000,
            last_ns: now_ns,
        }
    }

    /// Takes a token if one is there.
    pub fn take(&mut self, now_ns: u64) -> bool {
        let cap = u64::from(self.rate) * 1_000_000_000;
        let dt = now_ns.saturating_sub(self.last_ns);
        self.last_ns = now_ns.max(self.last_ns);
        self.level = self
            .level
            .saturating_add(dt.saturating_mul(u64::from(self.rate)))
            .min(cap);
        if self.level >= 1_000_000_000 {
            self.level -= 1_000_000_000;
            true
        } else {
            false
        }
    }
}

/// What became of one control frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A valid request, applied (SET) or answered (GET).
    Accepted,
    /// A SET asking more than the budget, applied clamped.
    Clamped,
    /// Malformed; answered INVALID, nothing changed.
    Invalid(ParseError),
    /// Over the rate limit; answered RATE_LIMITED, nothing changed.
    RateLimited,
    /// Not answerable (no source address, or over both limits); nothing changed.
    Dropped,
}

/// Counters of control frames, per VM.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ControlCounts {
    /// Valid requests acted on (including clamped ones).
    pub accepted: u64,
    /// SETs clamped to the budget.
    pub clamped: u64,
    /// Malformed frames.
    pub invalid: u64,
    /// Frames over the rate limit.
    pub rate_limited: u64,
    /// Frames dropped without reply.
    pub dropped: u64,
    /// Frames of the control EtherType arriving from the tap (dropped).
    pub from_tap: u64,
    /// Replies that could not be delivered to the guest (no RX buffer or queue full).
    pub replies_lost: u64,
}

impl ControlCounts {
    /// Counts one outcome.
    pub fn count(&mut self, o: Outcome) {
        match o {
            Outcome::Accepted => self.accepted += 1,
            Outcome::Clamped => {
                self.accepted += 1;
                self.clamped += 1
            }
            Outcome::Invalid(_) => self.invalid += 1,
            Outcome::RateLimited => self.rate_limited += 1,
            Outcome::Dropped => self.dropped += 1,
        }
    }
}

/// The per-VM control plane: rate limits and counters.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    acted: RateLimiter,
    replies: RateLimiter,
    /// Counters.
    pub counts: ControlCounts,
}

/// Fills a reply from the policy's current state.
pub fn reply_from(policy: &Policy, op: Op, status: Status, seq: u16, energy_uj: u64) -> Message {
    let g = policy.guest();
    let mut flags = Flags::default();
    if g.rx {
        flags = flags | Flags::RX;
    }
    if g.tx {
        flags = flags | Flags::TX;
    }
    if g.adaptive {
        flags = flags | Flags::ADAPTIVE;
    }
    let (rx, tx) = policy.configured_us();
    Message {
        op,
        status,
        seq,
        flags,
        max_rtt_us: policy.t_us(),
        budget_us: match policy.config().mode {
            crate::policy::ModeKind::Off => 0,
            _ => policy.config().budget_us,
        },
        rx_delay_us: rx,
        tx_delay_us: tx,
        send_ratio_ppm: (policy.send_ratio() * 1e6).round() as u32,
        energy_uj,
    }
}

impl ControlPlane {
    /// A control plane starting at `now_ns` with full buckets.
    pub fn new(now_ns: u64) -> Self {
        ControlPlane {
            acted: RateLimiter::new(CONTROL_RATE, now_ns),
            replies: RateLimiter::new(CONTROL_RATE, now_ns),
            counts: ControlCounts::default(),
        }
    }

    /// Handles one frame (Ethernet header + payload, no virtio-net header) sent by the guest.
    /// Writes the reply into `out` and returns its length when there is one.
    pub fn handle(
        &mut self,
        policy: &mut Policy,
        frame: &[u8],
        now_ns: u64,
        energy_uj: u64,
        out: &mut [u8; MAX_FRAME_LEN],
    ) -> (Outcome, Option<usize>) {
        let (outcome, reply) = self.decide(policy, frame, now_ns, energy_uj);
        self.counts.count(outcome);
        let len = reply.map(|(dst, m)| m.encode_frame(dst, DEVICE_MAC, out));
        (outcome, len)
    }

    fn decide(
        &mut self,
        policy: &mut Policy,
        frame: &[u8],
        now_ns: u64,
        energy_uj: u64,
    ) -> (Outcome, Option<([u8; 6], Message)>) {
        // A reply needs the sender's address; a frame without one is dropped.
        let Some(src) = frame.get(6..12) else {
            return (Outcome::Dropped, None);
        };
        let mut dst = [0u8; 6];
        dst.copy_from_slice(src);
        if dst[0] & 1 != 0 {
            // A group source address is not a sender we can answer.
            return (Outcome::Dropped, None);
        }
        let payload = &frame[frame.len().min(ETH_HDR_LEN)..];
        inject_panic(payload);
        let seq = payload
            .get(6..8)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .unwrap_or(0);
        let req_op = payload
            .get(4)
            .and_then(|&b| Op::from_u8(b))
            .filter(|o| matches!(o, Op::Set | Op::Get))
            .unwrap_or(Op::Set);
        if !self.acted.take(now_ns) {
            return if self.replies.take(now_ns) {
                let m = reply_from(policy, req_op.reply(), Status::RateLimited, seq, energy_uj);
                (Outcome::RateLimited, Some((dst, m)))
            } else {
                (Outcome::RateLimited, None)
            };
        }
        let msg = match parse_frame(frame) {
            Ok((_, m)) if m.is_request() => m,
            Ok(_) => {
                // A reply sent by the guest: not a request we act on.
                let m = reply_from(policy, req_op.reply(), Status::Invalid, seq, energy_uj);
                return (
                    Outcome::Invalid(ParseError::UnknownOp(req_op as u8)),
                    Some((dst, m)),
                );
            }
            Err(e) => {
                let m = reply_from(policy, req_op.reply(), Status::Invalid, seq, energy_uj);
                return (Outcome::Invalid(e), Some((dst, m)));
            }
        };
        let mut status = Status::Ok;
        if msg.op == Op::Set {
            let prefs = GuestPrefs {
                rx: msg.flags.contains(Flags::RX),
                tx: msg.flags.contains(Flags::TX),
                adaptive: msg.flags.contains(Flags::ADAPTIVE),
                max_rtt_us: msg.max_rtt_us,
            };
            if policy.set_guest(prefs) {
                status = Status::Clamped;
            }
        }
        let m = reply_from(policy, msg.op.reply(), status, msg.seq, energy_uj);
        let outcome = if status == Status::Clamped {
            Outcome::Clamped
        } else {
            Outcome::Accepted
        };
        (outcome, Some((dst, m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{ModeKind, PolicyConfig};
    use control_msg::ENERGY_UNKNOWN;

    const GUEST: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];

    fn policy(budget: u32) -> Policy {
        Policy::new(
            PolicyConfig {
                mode: ModeKind::Adaptive,
                budget_us: budget,
                ..Default::default()
            },
            0,
            (0, 0),
        )
    }

    fn frame(m: &Message) -> Vec<u8> {
        let mut out = [0u8; MAX_FRAME_LEN];
        let n = m.encode_frame(DEVICE_MAC, GUEST, &mut out);
        out[..n].to_vec()
    }

    fn reply(out: &[u8; MAX_FRAME_LEN], len: Option<usize>) -> Message {
        let n = len.expect("a reply");
        assert_eq!(&out[0..6], &GUEST);
        assert_eq!(&out[6..12], &DEVICE_MAC);
        parse_frame(&out[..n]).expect("reply parses").1
    }

    #[test]
    fn set_within_budget_then_get() {
        let mut p = policy(1000);
        let mut c = ControlPlane::new(0);
        let mut out = [0u8; MAX_FRAME_LEN];
        let set = Message::set(7, Flags::RX | Flags::TX | Flags::ADAPTIVE, 400);
        let (o, n) = c.handle(&mut p, &frame(&set), 1, ENERGY_UNKNOWN, &mut out);
        assert_eq!(o, Outcome::Accepted);
        let r = reply(&out, n);
        assert_eq!((r.op, r.status, r.seq), (Op::SetReply, Status::Ok, 7));
        assert_eq!((r.max_rtt_us, r.budget_us), (400, 1000));
        assert_eq!(r.rx_delay_us + r.tx_delay_us, 400);
        assert_eq!(r.send_ratio_ppm, 500_000);
        assert_eq!(r.energy_uj, ENERGY_UNKNOWN);
        assert_eq!(p.t_us(), 400);
        let (o, n) = c.handle(&mut p, &frame(&Message::get(8)), 2, 1234, &mut out);
        assert_eq!(o, Outcome::Accepted);
        let r = reply(&out, n);
        assert_eq!(
            (r.op, r.seq, r.max_rtt_us, r.energy_uj),
            (Op::GetReply, 8, 400, 1234)
        );
        assert_eq!(c.counts.accepted, 2);
    }

    #[test]
    fn set_above_budget_is_clamped() {
        let mut p = policy(1000);
        let mut c = ControlPlane::new(0);
        let mut out = [0u8; MAX_FRAME_LEN];
        let set = Message::set(1, Flags::RX, 5000);
        let (o, n) = c.handle(&mut p, &frame(&set), 1, 0, &mut out);
        assert_eq!(o, Outcome::Clamped);
        let r = reply(&out, n);
        assert_eq!(
            (r.status, r.max_rtt_us, r.flags),
            (Status::Clamped, 1000, Flags::RX)
        );
        assert_eq!(r.tx_delay_us, 0);
        assert_eq!(c.counts.clamped, 1);
    }

    #[test]
    fn malformed_frames_change_nothing_and_get_invalid() {
        let mut p = policy(1000);
        let before = p.view();
        let mut c = ControlPlane::new(0);
        let mut out = [0u8; MAX_FRAME_LEN];
        let good = frame(&Message::set(3, Flags::RX, 100));
        let mut bad_magic = good.clone();
        bad_magic[14] = b'X';
        let mut bad_flags = good.clone();
        bad_flags[14 + 8] = 0x80;
        let mut padding = good.clone();
        padding[59] = 1;
        let short = good[..30].to_vec();
        let mut long = good.clone();
        long.resize(100, 0);
        for (i, f) in [bad_magic, bad_flags, padding, short, long]
            .iter()
            .enumerate()
        {
            let (o, n) = c.handle(&mut p, f, i as u64, 0, &mut out);
            assert!(matches!(o, Outcome::Invalid(_)), "{i}: {o:?}");
            let r = reply(&out, n);
            assert_eq!(r.status, Status::Invalid, "{i}");
        }
        assert_eq!(p.view(), before);
        assert_eq!(c.counts.invalid, 5);
        // No source address: dropped without reply.
        let (o, n) = c.handle(&mut p, &good[..8], 10, 0, &mut out);
        assert_eq!((o, n), (Outcome::Dropped, None));
        // A multicast source cannot be answered either.
        let mut mc = good.clone();
        mc[6] = 0x01;
        assert_eq!(c.handle(&mut p, &mc, 11, 0, &mut out).0, Outcome::Dropped);
        assert_eq!(p.view(), before);
    }

    #[test]
    fn rate_limited_after_twenty_per_second() {
        let mut p = policy(1000);
        let mut c = ControlPlane::new(0);
        let mut out = [0u8; MAX_FRAME_LEN];
        let f = frame(&Message::get(1));
        let mut outcomes = Vec::new();
        for i in 0..45u64 {
            outcomes.push(c.handle(&mut p, &f, 1000 + i, 0, &mut out));
        }
        assert!(outcomes[..20].iter().all(|(o, _)| *o == Outcome::Accepted));
        // 20 more get a RATE_LIMITED reply, the rest are dropped silently.
        assert!(outcomes[20..40]
            .iter()
            .all(|(o, n)| *o == Outcome::RateLimited && n.is_some()));
        assert!(outcomes[40..]
            .iter()
            .all(|(o, n)| *o == Outcome::RateLimited && n.is_none()));
        // A SET while limited changes nothing.
        let set = frame(&Message::set(2, Flags::RX, 10));
        assert_eq!(
            c.handle(&mut p, &set, 2000, 0, &mut out).0,
            Outcome::RateLimited
        );
        assert_eq!(p.t_us(), 1000);
        // A second later the bucket is full again.
        assert_eq!(
            c.handle(&mut p, &set, 1_000_002_000, 0, &mut out).0,
            Outcome::Accepted
        );
        assert_eq!(p.t_us(), 10);
        assert_eq!(c.counts.rate_limited, 26);
    }

    #[test]
    fn bucket_refills_at_its_rate() {
        let mut b = RateLimiter::new(20, 0);
        for _ in 0..20 {
            assert!(b.take(0));
        }
        assert!(!b.take(0));
        assert!(!b.take(49_000_000));
        assert!(b.take(50_000_000));
        assert!(!b.take(50_000_001));
        // Time going backwards (never with a monotonic clock) cannot mint tokens.
        assert!(!b.take(10));
    }
}
