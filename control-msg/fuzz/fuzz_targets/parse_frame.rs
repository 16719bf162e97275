//! Fuzz target: the control-frame parser must never panic, and whatever it accepts must
//! re-encode to the same bytes (one canonical form per message).
#![no_main]

use control_msg::{parse_frame, parse_payload, ETH_HDR_LEN, MAX_FRAME_LEN, PAYLOAD_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((src, m)) = parse_frame(data) {
        let mut out = [0u8; MAX_FRAME_LEN];
        m.encode_frame([0; 6], src, &mut out);
        assert_eq!(
            &out[6..ETH_HDR_LEN + PAYLOAD_LEN],
            &data[6..ETH_HDR_LEN + PAYLOAD_LEN]
        );
    }
    if let Ok(m) = parse_payload(data) {
        let mut p = [0u8; PAYLOAD_LEN];
        m.encode_payload(&mut p);
        assert_eq!(&p[..], data);
    }
});
