//! The guest ↔ device control message, wire format v1 (docs/design.md §5).
//!
//! An Ethernet frame with EtherType 0x88B5 whose payload is 40 little-endian bytes, optionally
//! followed by zero padding up to 64 payload bytes. Parsing validates everything, never panics,
//! never allocates and does no I/O.

#![no_std]

use thiserror::Error;

/// IEEE 802 local experimental EtherType used by the control message.
pub const ETHERTYPE: u16 = 0x88B5;
/// Payload magic.
pub const MAGIC: [u8; 4] = *b"VNB1";
/// Ethernet header length.
pub const ETH_HDR_LEN: usize = 14;
/// Payload length of format v1.
pub const PAYLOAD_LEN: usize = 40;
/// Largest payload accepted (with zero padding).
pub const MAX_PAYLOAD_LEN: usize = 64;
/// Largest frame accepted.
pub const MAX_FRAME_LEN: usize = ETH_HDR_LEN + MAX_PAYLOAD_LEN;
/// Source MAC of replies.
pub const DEVICE_MAC: [u8; 6] = [0x02, 0x76, 0x6e, 0x62, 0x00, 0x00];
/// `energy_uj` when the energy is unknown.
pub const ENERGY_UNKNOWN: u64 = u64::MAX;

/// Operation codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Set buffering (request).
    Set = 1,
    /// Read the effective values (request).
    Get = 2,
    /// Reply to SET.
    SetReply = 0x81,
    /// Reply to GET.
    GetReply = 0x82,
}

impl Op {
    /// The op for a wire byte, if known.
    pub fn from_u8(v: u8) -> Option<Op> {
        match v {
            1 => Some(Op::Set),
            2 => Some(Op::Get),
            0x81 => Some(Op::SetReply),
            0x82 => Some(Op::GetReply),
            _ => None,
        }
    }

    /// The reply op for a request op.
    pub fn reply(self) -> Op {
        match self {
            Op::Set | Op::SetReply => Op::SetReply,
            Op::Get | Op::GetReply => Op::GetReply,
        }
    }
}

/// Reply status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Applied as asked.
    Ok = 0,
    /// Asked more than the operator's budget; the budget was applied.
    Clamped = 1,
    /// The request was malformed; nothing changed.
    Invalid = 2,
    /// Too many control frames; nothing changed.
    RateLimited = 3,
}

impl Status {
    fn from_u8(v: u8) -> Option<Status> {
        match v {
            0 => Some(Status::Ok),
            1 => Some(Status::Clamped),
            2 => Some(Status::Invalid),
            3 => Some(Status::RateLimited),
            _ => None,
        }
    }
}

/// Buffering flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(u32);

impl Flags {
    /// RX buffering (interrupt delay).
    pub const RX: Flags = Flags(1);
    /// TX buffering (kick delay).
    pub const TX: Flags = Flags(2);
    /// Adaptive delays (EWMA of the send ratio).
    pub const ADAPTIVE: Flags = Flags(4);
    const ALL: u32 = 7;

    /// Flags from raw bits, if no unknown bit is set.
    pub fn from_bits(bits: u32) -> Option<Flags> {
        (bits & !Self::ALL == 0).then_some(Flags(bits))
    }

    /// Raw bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether all of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl core::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, o: Flags) -> Flags {
        Flags(self.0 | o.0)
    }
}

/// The 40-byte payload, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    /// Operation.
    pub op: Op,
    /// Status (0 in requests).
    pub status: Status,
    /// Sequence number, echoed in the reply.
    pub seq: u16,
    /// Buffering flags.
    pub flags: Flags,
    /// Asked (SET) or effective (reply) maximum extra RTT in µs; 0 = no buffering.
    pub max_rtt_us: u32,
    /// Operator's budget (reply only).
    pub budget_us: u32,
    /// Current RX delay b_r (reply only).
    pub rx_delay_us: u32,
    /// Current TX delay b_s (reply only).
    pub tx_delay_us: u32,
    /// p* × 10⁶ (reply only).
    pub send_ratio_ppm: u32,
    /// Apportioned energy since attach, µJ (reply only; `ENERGY_UNKNOWN` if unknown).
    pub energy_uj: u64,
}

impl Message {
    /// A SET request.
    pub fn set(seq: u16, flags: Flags, max_rtt_us: u32) -> Message {
        Message {
            op: Op::Set,
            status: Status::Ok,
            seq,
            flags,
            max_rtt_us,
            budget_us: 0,
            rx_delay_us: 0,
            tx_delay_us: 0,
            send_ratio_ppm: 0,
            energy_uj: 0,
        }
    }

    /// A GET request.
    pub fn get(seq: u16) -> Message {
        Message {
            op: Op::Get,
            flags: Flags::default(),
            max_rtt_us: 0,
            ..Message::set(seq, Flags::default(), 0)
        }
    }

    /// Whether this is a request (SET or GET).
    pub fn is_request(&self) -> bool {
        matches!(self.op, Op::Set | Op::Get)
    }

    /// Writes the 40-byte payload.
    pub fn encode_payload(&self, out: &mut [u8; PAYLOAD_LEN]) {
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = self.op as u8;
        out[5] = self.status as u8;
        out[6..8].copy_from_slice(&self.seq.to_le_bytes());
        out[8..12].copy_from_slice(&self.flags.0.to_le_bytes());
        out[12..16].copy_from_slice(&self.max_rtt_us.to_le_bytes());
        out[16..20].copy_from_slice(&self.budget_us.to_le_bytes());
        out[20..24].copy_from_slice(&self.rx_delay_us.to_le_bytes());
        out[24..28].copy_from_slice(&self.tx_delay_us.to_le_bytes());
        out[28..32].copy_from_slice(&self.send_ratio_ppm.to_le_bytes());
        out[32..40].copy_from_slice(&self.energy_uj.to_le_bytes());
    }

    /// Writes a whole frame (padded to the 60-byte Ethernet minimum) and returns its length.
    pub fn encode_frame(&self, dst: [u8; 6], src: [u8; 6], out: &mut [u8; MAX_FRAME_LEN]) -> usize {
        out.fill(0);
        out[0..6].copy_from_slice(&dst);
        out[6..12].copy_from_slice(&src);
        out[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        let mut p = [0u8; PAYLOAD_LEN];
        self.encode_payload(&mut p);
        out[ETH_HDR_LEN..ETH_HDR_LEN + PAYLOAD_LEN].copy_from_slice(&p);
        60
    }
}

/// Why a control frame was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ParseError {
    /// Shorter than the Ethernet header plus the 40-byte payload.
    #[error("frame too short: {0} bytes")]
    TooShort(usize),
    /// Payload longer than 64 bytes.
    #[error("frame too long: {0} bytes")]
    TooLong(usize),
    /// Not EtherType 0x88B5.
    #[error("not a control frame (EtherType {0:#06x})")]
    NotControl(u16),
    /// Wrong magic.
    #[error("bad magic")]
    BadMagic,
    /// Unknown op code.
    #[error("unknown op {0:#04x}")]
    UnknownOp(u8),
    /// Unknown status code.
    #[error("unknown status {0}")]
    UnknownStatus(u8),
    /// Unknown flag bits.
    #[error("unknown flag bits {0:#x}")]
    UnknownFlags(u32),
    /// A request with a non-zero status or reply-only field, or a GET with SET fields.
    #[error("non-zero reserved field in a request")]
    ReservedNonZero,
    /// Padding after the payload is not zero.
    #[error("non-zero padding")]
    NonZeroPadding,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The EtherType of a frame, if it has an Ethernet header.
pub fn ethertype(frame: &[u8]) -> Option<u16> {
    frame.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// Parses and validates a frame: Ethernet header, payload, padding. Returns the source MAC and
/// the message.
pub fn parse_frame(frame: &[u8]) -> Result<([u8; 6], Message), ParseError> {
    let et = ethertype(frame).ok_or(ParseError::TooShort(frame.len()))?;
    if et != ETHERTYPE {
        return Err(ParseError::NotControl(et));
    }
    if frame.len() < ETH_HDR_LEN + PAYLOAD_LEN {
        return Err(ParseError::TooShort(frame.len()));
    }
    if frame.len() > MAX_FRAME_LEN {
        return Err(ParseError::TooLong(frame.len()));
    }
    let mut src = [0u8; 6];
    src.copy_from_slice(&frame[6..12]);
    let p = &frame[ETH_HDR_LEN..];
    if p[PAYLOAD_LEN..].iter().any(|&b| b != 0) {
        return Err(ParseError::NonZeroPadding);
    }
    Ok((src, parse_payload(&p[..PAYLOAD_LEN])?))
}

/// Parses and validates the 40-byte payload.
pub fn parse_payload(p: &[u8]) -> Result<Message, ParseError> {
    if p.len() < PAYLOAD_LEN {
        return Err(ParseError::TooShort(p.len()));
    }
    if p.len() > PAYLOAD_LEN {
        return Err(ParseError::TooLong(p.len()));
    }
    if p[0..4] != MAGIC {
        return Err(ParseError::BadMagic);
    }
    let op = Op::from_u8(p[4]).ok_or(ParseError::UnknownOp(p[4]))?;
    let status = Status::from_u8(p[5]).ok_or(ParseError::UnknownStatus(p[5]))?;
    let raw_flags = u32_at(p, 8);
    let flags = Flags::from_bits(raw_flags).ok_or(ParseError::UnknownFlags(raw_flags))?;
    let m = Message {
        op,
        status,
        seq: u16::from_le_bytes([p[6], p[7]]),
        flags,
        max_rtt_us: u32_at(p, 12),
        budget_us: u32_at(p, 16),
        rx_delay_us: u32_at(p, 20),
        tx_delay_us: u32_at(p, 24),
        send_ratio_ppm: u32_at(p, 28),
        energy_uj: u64::from(u32_at(p, 32)) | u64::from(u32_at(p, 36)) << 32,
    };
    if m.is_request() {
        let reply_fields = m.budget_us | m.rx_delay_us | m.tx_delay_us | m.send_ratio_ppm;
        let get_fields = if op == Op::Get {
            m.flags.0 | m.max_rtt_us
        } else {
            0
        };
        if status != Status::Ok || reply_fields != 0 || m.energy_uj != 0 || get_fields != 0 {
            return Err(ParseError::ReservedNonZero);
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    const GUEST: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn frame(m: &Message) -> Vec<u8> {
        let mut out = [0u8; MAX_FRAME_LEN];
        let n = m.encode_frame(DEVICE_MAC, GUEST, &mut out);
        out[..n].to_vec()
    }

    fn samples() -> [Message; 4] {
        let reply = Message {
            op: Op::SetReply,
            status: Status::Clamped,
            seq: 0xbeef,
            flags: Flags::RX | Flags::TX | Flags::ADAPTIVE,
            max_rtt_us: 1000,
            budget_us: 1000,
            rx_delay_us: 250,
            tx_delay_us: 750,
            send_ratio_ppm: 750_000,
            energy_uj: ENERGY_UNKNOWN,
        };
        [
            Message::set(1, Flags::RX | Flags::ADAPTIVE, 500),
            Message::get(2),
            reply,
            Message {
                op: Op::GetReply,
                status: Status::Ok,
                energy_uj: 123_456_789_012,
                ..reply
            },
        ]
    }

    #[test]
    fn round_trip() {
        for m in samples() {
            let f = frame(&m);
            assert_eq!(f.len(), 60);
            assert_eq!(parse_frame(&f), Ok((GUEST, m)));
            // Padding up to 64 payload bytes is accepted, longer is not.
            let mut long = f.clone();
            long.resize(MAX_FRAME_LEN, 0);
            assert_eq!(parse_frame(&long), Ok((GUEST, m)));
            long.push(0);
            assert_eq!(
                parse_frame(&long),
                Err(ParseError::TooLong(MAX_FRAME_LEN + 1))
            );
            // The exact 54-byte frame (no padding) is fine too.
            assert_eq!(parse_frame(&f[..54]), Ok((GUEST, m)));
        }
    }

    #[test]
    fn every_truncation_is_rejected() {
        for m in samples() {
            let f = frame(&m);
            for n in 0..54 {
                assert!(parse_frame(&f[..n]).is_err(), "{n} bytes accepted");
            }
        }
    }

    /// Every single-byte change either is rejected or decodes to exactly what the changed
    /// bytes say (no field silently ignored).
    #[test]
    fn every_byte_mutation_is_rejected_or_faithful() {
        for m in samples() {
            let f = frame(&m);
            for i in 0..f.len() {
                for v in [0u8, 1, 2, 3, 4, 7, 8, 0x55, 0x80, 0x81, 0x82, 0xff] {
                    let mut g = f.clone();
                    if g[i] == v {
                        continue;
                    }
                    g[i] = v;
                    match parse_frame(&g) {
                        Err(_) => {}
                        Ok((src, got)) => {
                            // Only the source MAC, the destination or fields whose new value
                            // is valid may change; re-encoding must give the mutated bytes.
                            let mut out = [0u8; MAX_FRAME_LEN];
                            let n = got.encode_frame(DEVICE_MAC, src, &mut out);
                            let mut want = g.clone();
                            want[0..6].copy_from_slice(&DEVICE_MAC);
                            assert_eq!(&out[..n], &want[..], "byte {i} = {v:#x}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn specific_rejections() {
        let set = frame(&Message::set(1, Flags::RX, 100));
        let mut g = set.clone();
        g[12] = 0x08;
        g[13] = 0x00;
        assert_eq!(parse_frame(&g), Err(ParseError::NotControl(0x0800)));
        let mut g = set.clone();
        g[14] = b'X';
        assert_eq!(parse_frame(&g), Err(ParseError::BadMagic));
        let mut g = set.clone();
        g[18] = 9;
        assert_eq!(parse_frame(&g), Err(ParseError::UnknownOp(9)));
        let mut g = set.clone();
        g[19] = 1;
        assert_eq!(
            parse_frame(&g),
            Err(ParseError::ReservedNonZero),
            "status in a request"
        );
        let mut g = set.clone();
        g[22] = 8;
        assert_eq!(parse_frame(&g), Err(ParseError::UnknownFlags(8)));
        let mut g = set.clone();
        g[30] = 1;
        assert_eq!(
            parse_frame(&g),
            Err(ParseError::ReservedNonZero),
            "budget in a request"
        );
        let mut g = set.clone();
        g[59] = 1;
        assert_eq!(parse_frame(&g), Err(ParseError::NonZeroPadding));
        let mut get = frame(&Message::get(3));
        get[26] = 1;
        assert_eq!(
            parse_frame(&get),
            Err(ParseError::ReservedNonZero),
            "max_rtt in a GET"
        );
    }
}
