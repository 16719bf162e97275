//! Printing replies: one line of `key=value` pairs, easy to read and to parse.

use control_msg::{parse_frame, Flags, Message, Op, Status, ENERGY_UNKNOWN};

/// The status as a word.
pub fn status_word(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Clamped => "clamped",
        Status::Invalid => "invalid",
        Status::RateLimited => "rate_limited",
    }
}

/// The flags as a comma list (`none` when empty).
pub fn flags_word(f: Flags) -> String {
    let mut v = Vec::new();
    if f.contains(Flags::RX) {
        v.push("rx");
    }
    if f.contains(Flags::TX) {
        v.push("tx");
    }
    if f.contains(Flags::ADAPTIVE) {
        v.push("adaptive");
    }
    if v.is_empty() {
        "none".into()
    } else {
        v.join(",")
    }
}

/// One line describing a reply.
pub fn reply_line(m: &Message) -> String {
    let energy = if m.energy_uj == ENERGY_UNKNOWN {
        "unknown".to_string()
    } else {
        m.energy_uj.to_string()
    };
    format!(
        "status={} flags={} max_rtt_us={} budget_us={} rx_delay_us={} tx_delay_us={} send_ratio={:.4} energy_uj={}",
        status_word(m.status),
        flags_word(m.flags),
        m.max_rtt_us,
        m.budget_us,
        m.rx_delay_us,
        m.tx_delay_us,
        f64::from(m.send_ratio_ppm) / 1e6,
        energy
    )
}

/// Parses `on`/`off`.
pub fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

/// The op as a word.
pub fn op_word(op: Op) -> &'static str {
    match op {
        Op::Set => "set",
        Op::Get => "get",
        Op::SetReply => "set_reply",
        Op::GetReply => "get_reply",
    }
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn mac_word(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One line describing a control frame seen on an interface whose address is `own`: its
/// direction (`out` when `own` sent it), addresses, the decoded message (or why it does not
/// decode) and the whole frame in hex.
pub fn frame_line(frame: &[u8], own: &[u8; 6]) -> String {
    let dst = frame.get(0..6).map(mac_word).unwrap_or_default();
    let src = frame.get(6..12).map(mac_word).unwrap_or_default();
    let dir = if frame.get(6..12) == Some(&own[..]) {
        "out"
    } else {
        "in"
    };
    let what = match parse_frame(frame) {
        Ok((_, m)) => format!("op={} seq={} {}", op_word(m.op), m.seq, reply_line(&m)),
        Err(e) => format!("invalid=\"{e}\""),
    };
    format!(
        "frame dir={dir} src={src} dst={dst} len={} {what} hex={}",
        frame.len(),
        hex(frame)
    )
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes from hex text (whitespace ignored).
pub fn from_hex(s: &str) -> Result<Vec<u8>, String> {
    let t: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    if !t.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    t.chunks(2)
        .map(|p| {
            let s = std::str::from_utf8(p).map_err(|_| "not hex".to_string())?;
            u8::from_str_radix(s, 16).map_err(|_| format!("not hex: {s:?}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use control_msg::Op;

    #[test]
    fn reply_line_has_every_field() {
        let m = Message {
            op: Op::SetReply,
            status: Status::Clamped,
            seq: 9,
            flags: Flags::RX | Flags::ADAPTIVE,
            max_rtt_us: 1000,
            budget_us: 1000,
            rx_delay_us: 600,
            tx_delay_us: 400,
            send_ratio_ppm: 412_300,
            energy_uj: ENERGY_UNKNOWN,
        };
        assert_eq!(
            reply_line(&m),
            "status=clamped flags=rx,adaptive max_rtt_us=1000 budget_us=1000 rx_delay_us=600 tx_delay_us=400 send_ratio=0.4123 energy_uj=unknown"
        );
        let m2 = Message {
            flags: Flags::default(),
            energy_uj: 5,
            status: Status::Ok,
            ..m
        };
        assert!(reply_line(&m2).contains("flags=none"));
        assert!(reply_line(&m2).ends_with("energy_uj=5"));
    }

    #[test]
    fn frame_lines() {
        let own = [0x52, 0x54, 0, 0x77, 1, 2];
        let mut f = [0u8; control_msg::MAX_FRAME_LEN];
        let n = Message::set(7, Flags::RX | Flags::TX, 500).encode_frame(
            control_msg::DEVICE_MAC,
            own,
            &mut f,
        );
        let l = frame_line(&f[..n], &own);
        assert!(
            l.starts_with(
                "frame dir=out src=52:54:00:77:01:02 dst=02:76:6e:62:00:00 len=60 op=set seq=7 status=ok flags=rx,tx max_rtt_us=500 "
            ),
            "{l}"
        );
        assert!(l.ends_with(&format!(" hex={}", hex(&f[..n]))), "{l}");
        let l = frame_line(&f[..20], &[0; 6]);
        assert!(l.starts_with("frame dir=in "), "{l}");
        assert!(l.contains("invalid=\"frame too short: 20 bytes\""), "{l}");
    }

    #[test]
    fn parsers() {
        assert_eq!(on_off("on"), Ok(true));
        assert_eq!(on_off("off"), Ok(false));
        assert!(on_off("yes").is_err());
        assert_eq!(from_hex("0a ff"), Ok(vec![10, 255]));
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
        assert_eq!(hex(&[1, 0xab]), "01ab");
    }
}
