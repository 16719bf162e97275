//! `vnb-frame`: sends a raw frame with a given payload (used by tests to send malformed
//! control frames from inside the guest, or a counted burst of data frames) and prints the
//! control frames that come back.
//!
//! ```text
//! vnb-frame --iface eth0 [--dst MAC] [--ethertype 0x88b5] --payload-hex HEX [--count N] [--wait-ms N]
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use control_msg::DEVICE_MAC;
use guest_driver_patch::format::{from_hex, hex};
use guest_driver_patch::open;

#[derive(Parser)]
#[command(
    name = "vnb-frame",
    version,
    about = "Send one raw Ethernet frame and print control replies"
)]
struct Cli {
    /// Interface to send on.
    #[arg(long, default_value = "eth0")]
    iface: String,
    /// Destination MAC (default: the device's control address).
    #[arg(long, value_parser = parse_mac)]
    dst: Option<[u8; 6]>,
    /// EtherType (hex with 0x, or decimal).
    #[arg(long, default_value = "0x88b5", value_parser = parse_u16)]
    ethertype: u16,
    /// The payload after the 14-byte Ethernet header, in hex.
    #[arg(long, value_parser = parse_hex)]
    payload_hex: Hex,
    /// Send the frame this many times, back to back (prints how many were sent).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// Wait this long for control frames coming back and print them.
    #[arg(long)]
    wait_ms: Option<u64>,
}

/// Payload bytes given in hex.
#[derive(Debug, Clone, PartialEq)]
struct Hex(Vec<u8>);

fn parse_hex(s: &str) -> Result<Hex, String> {
    from_hex(s).map(Hex)
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC {s:?}")))
        .collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| format!("bad MAC {s:?}"))
}

fn parse_u16(s: &str) -> Result<u16, String> {
    match s.strip_prefix("0x") {
        Some(h) => u16::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("bad EtherType {s:?}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (ch, mac) = match open(&cli.iface, control_msg::ETHERTYPE) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vnb-frame: {e}");
            return ExitCode::from(1);
        }
    };
    let mut frame = Vec::with_capacity(14 + cli.payload_hex.0.len());
    frame.extend_from_slice(&cli.dst.unwrap_or(DEVICE_MAC));
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&cli.ethertype.to_be_bytes());
    frame.extend_from_slice(&cli.payload_hex.0);
    for i in 0..cli.count {
        if let Err(e) = ch.send(&frame) {
            eprintln!("vnb-frame: cannot send (after {i} frames): {e}");
            return ExitCode::from(1);
        }
    }
    if cli.count > 1 {
        println!("sent {} frames", cli.count);
    }
    if let Some(ms) = cli.wait_ms {
        let mut n = 0;
        let _ = ch.recv_until(Duration::from_millis(ms), |f| {
            if f.get(6..12) == Some(&DEVICE_MAC[..]) && f.len() >= 14 {
                let p = &f[14..];
                let b = |i: usize| p.get(i).copied().unwrap_or(0);
                println!(
                    "reply status={} op={} seq={} hex={}",
                    b(5),
                    b(4),
                    u16::from_le_bytes([b(6), b(7)]),
                    hex(p)
                );
                n += 1;
            }
            None::<()>
        });
        if n == 0 {
            println!("no reply");
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use control_msg::ETHERTYPE;

    #[test]
    fn arguments() {
        let c = Cli::try_parse_from([
            "vnb-frame",
            "--iface",
            "eth1",
            "--payload-hex",
            "0aff",
            "--ethertype",
            "0x0800",
            "--dst",
            "02:00:00:00:00:01",
            "--wait-ms",
            "10",
            "--count",
            "300",
        ])
        .unwrap();
        assert_eq!(c.payload_hex, Hex(vec![10, 255]));
        assert_eq!(c.count, 300);
        assert_eq!(c.ethertype, 0x0800);
        assert_eq!(c.dst, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(c.wait_ms, Some(10));
        let d = Cli::try_parse_from(["vnb-frame", "--payload-hex", ""]).unwrap();
        assert_eq!((d.ethertype, d.dst, d.count), (ETHERTYPE, None, 1));
        assert!(Cli::try_parse_from(["vnb-frame", "--payload-hex", "00", "--count", "0"]).is_err());
        assert!(Cli::try_parse_from(["vnb-frame", "--payload-hex", "abc"]).is_err());
        assert!(Cli::try_parse_from(["vnb-frame", "--payload-hex", "00", "--dst", "1:2"]).is_err());
        assert!(Cli::try_parse_from(["vnb-frame"]).is_err());
    }
}
