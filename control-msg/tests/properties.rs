//! Property tests of the wire format: every valid message survives a round trip (with any
//! padding), every malformed variant is rejected with the right error, and the parser never
//! panics; whatever it accepts re-encodes to the same bytes.

use control_msg::*;
use proptest::prelude::*;

const DST: [u8; 6] = DEVICE_MAC;

fn flags() -> impl Strategy<Value = Flags> {
    (0u32..8).prop_map(|b| Flags::from_bits(b).unwrap())
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![
        Just(Status::Ok),
        Just(Status::Clamped),
        Just(Status::Invalid),
        Just(Status::RateLimited)
    ]
}

fn request() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u16>(), flags(), any::<u32>()).prop_map(|(s, f, r)| Message::set(s, f, r)),
        any::<u16>().prop_map(Message::get),
    ]
}

fn reply() -> impl Strategy<Value = Message> {
    (
        prop_oneof![Just(Op::SetReply), Just(Op::GetReply)],
        status(),
        any::<u16>(),
        flags(),
        any::<[u32; 5]>(),
        any::<u64>(),
    )
        .prop_map(|(op, status, seq, flags, v, energy_uj)| Message {
            op,
            status,
            seq,
            flags,
            max_rtt_us: v[0],
            budget_us: v[1],
            rx_delay_us: v[2],
            tx_delay_us: v[3],
            send_ratio_ppm: v[4],
            energy_uj,
        })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![request(), reply()]
}

/// A unicast source MAC.
fn mac() -> impl Strategy<Value = [u8; 6]> {
    any::<[u8; 6]>().prop_map(|mut m| {
        m[0] &= 0xfe;
        m
    })
}

/// The frame of `m` from `src` with `pad` payload bytes (40..=64 in all).
fn frame(m: &Message, src: [u8; 6], payload_len: usize) -> Vec<u8> {
    let mut out = [0u8; MAX_FRAME_LEN];
    m.encode_frame(DST, src, &mut out);
    out[..ETH_HDR_LEN + payload_len].to_vec()
}

proptest! {
    #[test]
    fn round_trip_with_any_padding(m in message(), src in mac(), len in PAYLOAD_LEN..=MAX_PAYLOAD_LEN) {
        let f = frame(&m, src, len);
        let (s, back) = parse_frame(&f).unwrap();
        prop_assert_eq!(s, src);
        prop_assert_eq!(back, m);
        let mut p = [0u8; PAYLOAD_LEN];
        m.encode_payload(&mut p);
        prop_assert_eq!(parse_payload(&p).unwrap(), m);
    }

    #[test]
    fn wrong_magic_is_rejected(m in message(), magic in any::<[u8; 4]>()) {
        prop_assume!(magic != MAGIC);
        let mut f = frame(&m, [2, 0, 0, 0, 0, 1], PAYLOAD_LEN);
        f[14..18].copy_from_slice(&magic);
        prop_assert_eq!(parse_frame(&f), Err(ParseError::BadMagic));
    }

    #[test]
    fn unknown_op_is_rejected(m in message(), op in any::<u8>()) {
        prop_assume!(![1u8, 2, 0x81, 0x82].contains(&op));
        let mut f = frame(&m, [2, 0, 0, 0, 0, 1], PAYLOAD_LEN);
        f[18] = op;
        prop_assert_eq!(parse_frame(&f), Err(ParseError::UnknownOp(op)));
    }

    #[test]
    fn unknown_status_is_rejected(m in message(), st in 4u8..) {
        let mut f = frame(&m, [2, 0, 0, 0, 0, 1], PAYLOAD_LEN);
        f[19] = st;
        prop_assert_eq!(parse_frame(&f), Err(ParseError::UnknownStatus(st)));
    }

    #[test]
    fn unknown_flag_bits_are_rejected(m in message(), bits in any::<u32>()) {
        prop_assume!(bits & !7 != 0);
        let mut f = frame(&m, [2, 0, 0, 0, 0, 1], PAYLOAD_LEN);
        f[22..26].copy_from_slice(&bits.to_le_bytes());
        prop_assert_eq!(parse_frame(&f), Err(ParseError::UnknownFlags(bits)));
    }

    #[test]
    fn reply_fields_in_requests_are_rejected(m in request(), field in 0usize..5, v in 1u32..) {
        // budget, rx, tx, ratio, energy low word: payload offsets 16, 20, 24, 28, 32.
        let mut f = frame(&m, [2, 0, 0, 0, 0, 1], PAYLOAD_LEN);
        let off = 14 + 16 + 4 * field;
        f[off..off + 4].copy_from_slice(&v.to_le_bytes());
        prop_assert_eq!(parse_frame(&f), Err(ParseError::ReservedNonZero));
    }

    #[test]
    fn status_in_a_request_is_rejected(m in request(), st in 1u8..4) {
        let mut f = frame(&m, [2, 0, 0, 0, 0, 1], PAYLOAD_LEN);
        f[19] = st;
        prop_assert_eq!(parse_frame(&f), Err(ParseError::ReservedNonZero));
    }

    #[test]
    fn get_with_set_fields_is_rejected(seq in any::<u16>(), f_bits in 1u32..8, rtt in any::<u32>(), which in any::<bool>()) {
        let mut f = frame(&Message::get(seq), [2, 0, 0, 0, 0, 1], PAYLOAD_LEN);
        if which {
            f[22..26].copy_from_slice(&f_bits.to_le_bytes());
        } else {
            prop_assume!(rtt != 0);
            f[26..30].copy_from_slice(&rtt.to_le_bytes());
        }
        prop_assert_eq!(parse_frame(&f), Err(ParseError::ReservedNonZero));
    }

    #[test]
    fn short_frames_are_rejected(m in message(), len in 0usize..ETH_HDR_LEN + PAYLOAD_LEN) {
        let f = frame(&m, [2, 0, 0, 0, 0, 1], MAX_PAYLOAD_LEN);
        let r = parse_frame(&f[..len]);
        prop_assert_eq!(r, Err(ParseError::TooShort(len)));
    }

    #[test]
    fn long_frames_are_rejected(m in message(), extra in 1usize..200) {
        let mut f = frame(&m, [2, 0, 0, 0, 0, 1], MAX_PAYLOAD_LEN);
        f.resize(f.len() + extra, 0);
        prop_assert_eq!(parse_frame(&f), Err(ParseError::TooLong(MAX_FRAME_LEN + extra)));
    }

    #[test]
    fn non_zero_padding_is_rejected(m in message(), len in PAYLOAD_LEN + 1..=MAX_PAYLOAD_LEN, pos in any::<prop::sample::Index>(), b in 1u8..) {
        let mut f = frame(&m, [2, 0, 0, 0, 0, 1], len);
        let i = ETH_HDR_LEN + PAYLOAD_LEN + pos.index(len - PAYLOAD_LEN);
        f[i] = b;
        prop_assert_eq!(parse_frame(&f), Err(ParseError::NonZeroPadding));
    }

    #[test]
    fn wrong_ethertype_is_rejected(m in message(), et in any::<u16>()) {
        prop_assume!(et != ETHERTYPE);
        let mut f = frame(&m, [2, 0, 0, 0, 0, 1], PAYLOAD_LEN);
        f[12..14].copy_from_slice(&et.to_be_bytes());
        prop_assert_eq!(parse_frame(&f), Err(ParseError::NotControl(et)));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_accepted_ones_are_canonical(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok((src, m)) = parse_frame(&bytes) {
            let mut out = [0u8; MAX_FRAME_LEN];
            m.encode_frame([0; 6], src, &mut out);
            prop_assert_eq!(&out[6..ETH_HDR_LEN + PAYLOAD_LEN], &bytes[6..ETH_HDR_LEN + PAYLOAD_LEN]);
        }
        let _ = parse_payload(&bytes);
    }

    #[test]
    fn control_frames_near_valid_never_panic(m in message(), pos in 0usize..MAX_FRAME_LEN, b in any::<u8>(), len in 0usize..=MAX_FRAME_LEN + 4) {
        let mut f = frame(&m, [2, 0, 0, 0, 0, 1], MAX_PAYLOAD_LEN);
        f[pos] = b;
        f.resize(len, 0);
        if let Ok((src, back)) = parse_frame(&f) {
            let mut out = [0u8; MAX_FRAME_LEN];
            back.encode_frame([0; 6], src, &mut out);
            prop_assert_eq!(&out[6..ETH_HDR_LEN + PAYLOAD_LEN], &f[6..ETH_HDR_LEN + PAYLOAD_LEN]);
        }
    }
}
