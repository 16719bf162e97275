//! `vnb-guest`: ask the device for a buffering limit, or read the current one.
//!
//! ```text
//! vnb-guest --iface eth0 set --max-rtt-us 500 [--rx on|off] [--tx on|off] [--adaptive on|off]
//! vnb-guest --iface eth0 get
//! vnb-guest --iface eth0 off
//! vnb-guest --iface eth0 watch [--ms 5000]
//! ```
//! Prints the effective values from the device's reply. Exit 0 on OK or CLAMPED, 2 on
//! INVALID or RATE_LIMITED, 1 when no reply comes in time or the request cannot be sent.
//! `watch` sends nothing: it prints every control frame the interface sends or receives
//! (e.g. those of a driver's `ethtool -C`), one line each, for the given time.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use control_msg::{parse_frame, Flags, Message, Status, DEVICE_MAC, ETHERTYPE, MAX_FRAME_LEN};
use guest_driver_patch::format::{frame_line, on_off, reply_line};
use guest_driver_patch::open;

#[derive(Parser)]
#[command(
    name = "vnb-guest",
    version,
    about = "Tell vhost-net-batch how much extra RTT this guest tolerates"
)]
struct Cli {
    /// The virtio-net interface served by vhost-net-batch.
    #[arg(long, default_value = "eth0")]
    iface: String,
    /// How long to wait for the device's reply, in ms.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Ask for buffering up to MAX_RTT_US of extra round-trip time.
    Set {
        /// Largest extra RTT tolerated, in µs (0 = no buffering).
        #[arg(long)]
        max_rtt_us: u32,
        /// Buffer RX interrupts.
        #[arg(long, default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
        rx: bool,
        /// Buffer TX kicks.
        #[arg(long, default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
        tx: bool,
        /// Split the delay by the send/receive ratio (off: both directions get the full limit).
        #[arg(long, default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
        adaptive: bool,
    },
    /// Read the current settings.
    Get,
    /// Turn buffering off for this guest.
    Off,
    /// Send nothing; print every control frame sent or received on the interface, with its
    /// bytes, for MS milliseconds.
    Watch {
        /// How long to watch, in ms.
        #[arg(long, default_value_t = 5000)]
        ms: u64,
    },
}

fn request(cmd: &Cmd, seq: u16) -> Message {
    match *cmd {
        Cmd::Set {
            max_rtt_us,
            rx,
            tx,
            adaptive,
        } => {
            let mut f = Flags::default();
            if rx {
                f = f | Flags::RX;
            }
            if tx {
                f = f | Flags::TX;
            }
            if adaptive {
                f = f | Flags::ADAPTIVE;
            }
            Message::set(seq, f, max_rtt_us)
        }
        Cmd::Get | Cmd::Watch { .. } => Message::get(seq),
        Cmd::Off => Message::set(seq, Flags::default(), 0),
    }
}

/// `watch`: frames of every EtherType are read (a socket bound to one EtherType does not see
/// the frames its host sends) and the control ones printed.
fn watch(iface: &str, ms: u64) -> ExitCode {
    let (ch, mac) = match open(iface, vnb_common::packet::ETH_P_ALL) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vnb-guest: {e}");
            return ExitCode::from(1);
        }
    };
    let mut n = 0u64;
    let res = ch.recv_until(Duration::from_millis(ms), |f| {
        if control_msg::ethertype(f) == Some(ETHERTYPE) {
            println!("{}", frame_line(f, &mac));
            n += 1;
        }
        None::<()>
    });
    if let Err(e) = res {
        eprintln!("vnb-guest: {e}");
        return ExitCode::from(1);
    }
    println!("watched {ms} ms: {n} control frames");
    ExitCode::SUCCESS
}

fn seq() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (t ^ std::process::id()) as u16
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Watch { ms } = cli.cmd {
        return watch(&cli.iface, ms);
    }
    let (ch, mac) = match open(&cli.iface, ETHERTYPE) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vnb-guest: {e}");
            return ExitCode::from(1);
        }
    };
    let req = request(&cli.cmd, seq());
    let mut frame = [0u8; MAX_FRAME_LEN];
    let n = req.encode_frame(DEVICE_MAC, mac, &mut frame);
    if let Err(e) = ch.send(&frame[..n]) {
        eprintln!("vnb-guest: cannot send on {}: {e}", cli.iface);
        return ExitCode::from(1);
    }
    let want = req.op.reply();
    let got = ch.recv_until(Duration::from_millis(cli.timeout_ms), |f| {
        if f.get(6..12) != Some(&DEVICE_MAC[..]) {
            return None;
        }
        let (_, m) = parse_frame(f).ok()?;
        (m.op == want && m.seq == req.seq).then_some(m)
    });
    let reply = match got {
        Ok(Some(m)) => m,
        Ok(None) => {
            eprintln!(
                "vnb-guest: no reply from the device within {} ms on {} (is the backend vhost-net-batch with control messages enabled?)",
                cli.timeout_ms, cli.iface
            );
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("vnb-guest: {e}");
            return ExitCode::from(1);
        }
    };
    println!("{}", reply_line(&reply));
    match reply.status {
        Status::Ok => ExitCode::SUCCESS,
        Status::Clamped => {
            if let Cmd::Set { max_rtt_us, .. } = cli.cmd {
                eprintln!(
                    "vnb-guest: asked for {max_rtt_us} µs; clamped to the operator's budget of {} µs",
                    reply.budget_us
                );
            }
            ExitCode::SUCCESS
        }
        Status::Invalid => {
            eprintln!("vnb-guest: the device rejected the request as invalid");
            ExitCode::from(2)
        }
        Status::RateLimited => {
            eprintln!(
                "vnb-guest: rate limited by the device (at most 20 requests a second); try again"
            );
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control_msg::Op;

    #[test]
    fn requests_from_arguments() {
        let c = Cli::try_parse_from([
            "vnb-guest",
            "--iface",
            "eth1",
            "set",
            "--max-rtt-us",
            "500",
            "--tx",
            "off",
        ])
        .unwrap();
        assert_eq!(c.iface, "eth1");
        let m = request(&c.cmd, 7);
        assert_eq!((m.op, m.seq, m.max_rtt_us), (Op::Set, 7, 500));
        assert_eq!(m.flags, Flags::RX | Flags::ADAPTIVE);
        let m = request(&Cli::try_parse_from(["vnb-guest", "off"]).unwrap().cmd, 1);
        assert_eq!(
            (m.op, m.flags, m.max_rtt_us),
            (Op::Set, Flags::default(), 0)
        );
        let m = request(&Cli::try_parse_from(["vnb-guest", "get"]).unwrap().cmd, 1);
        assert_eq!(m.op, Op::Get);
        assert!(
            Cli::try_parse_from(["vnb-guest", "set"]).is_err(),
            "max-rtt-us is required"
        );
        assert!(
            Cli::try_parse_from(["vnb-guest", "set", "--max-rtt-us", "5", "--rx", "maybe"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["vnb-guest", "set", "--max-rtt-us", "-5"]).is_err());
        let w = Cli::try_parse_from(["vnb-guest", "watch", "--ms", "200"]).unwrap();
        assert!(matches!(w.cmd, Cmd::Watch { ms: 200 }));
    }
}
