//! The guest tools against interfaces where nobody answers: a clear error and the documented
//! exit codes. Runs in a private network namespace (root and iproute2 required).

use std::process::{Command, Output};
use std::time::{Duration, Instant};

const GUEST: &str = env!("CARGO_BIN_EXE_vnb-guest");
const FRAME: &str = env!("CARGO_BIN_EXE_vnb-frame");

struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "these tests need root (network namespaces, raw sockets)"
        );
        let name = format!("vnbg{tag}{}", std::process::id());
        let ok = |c: &mut Command| {
            let o = c
                .output()
                .unwrap_or_else(|e| panic!("{c:?}: {e} (install iproute2)"));
            assert!(
                o.status.success(),
                "{c:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Ns(name);
        ok(Command::new("ip").args([
            "netns", "exec", &ns.0, "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1",
        ]));
        ok(Command::new("ip").args(["netns", "exec", &ns.0, "ip", "link", "set", "d0", "up"]));
        ok(Command::new("ip").args(["netns", "exec", &ns.0, "ip", "link", "set", "d1", "up"]));
        ns
    }

    fn run(&self, bin: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0, bin])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

#[test]
fn no_reply_within_the_timeout_is_exit_1_with_a_clear_message() {
    let ns = Ns::new("t");
    let t = Instant::now();
    let o = ns.run(GUEST, &["--iface", "d0", "get"]);
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no reply from the device within 1000 ms on d0"),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );
    let o = ns.run(
        GUEST,
        &[
            "--iface",
            "d0",
            "--timeout-ms",
            "100",
            "set",
            "--max-rtt-us",
            "10",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    // vnb-frame sends and reports that nothing came back.
    let o = ns.run(
        FRAME,
        &["--iface", "d0", "--payload-hex", "00", "--wait-ms", "100"],
    );
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "no reply");
}

#[test]
fn a_missing_interface_and_bad_arguments_are_named() {
    let ns = Ns::new("m");
    let o = ns.run(GUEST, &["--iface", "nope0", "get"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no network interface named \"nope0\""));
    let o = ns.run(
        GUEST,
        &[
            "--iface",
            "d0",
            "set",
            "--max-rtt-us",
            "10",
            "--rx",
            "sometimes",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected on or off"));
    let o = ns.run(FRAME, &["--iface", "nope0", "--payload-hex", "00"]);
    assert_eq!(o.status.code(), Some(1));
}

/// `watch` prints control frames an interface sends and receives, and nothing else; `vnb-frame
/// --count` sends a burst. Over a veth pair: a SET and data frames leave d0, a SET arrives on d1.
#[test]
fn watch_prints_control_frames_both_ways_and_count_sends_a_burst() {
    let ns = Ns::new("w");
    let spawn = |iface: &str| {
        Command::new("ip")
            .args(["netns", "exec", &ns.0, GUEST, "--iface", iface, "watch"])
            .args(["--ms", "1500"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (out, inc) = (spawn("d0"), spawn("d1"));
    std::thread::sleep(Duration::from_millis(400));
    // A SET request (seq 0x0102, RX|TX, 500 µs) as control-msg encodes its payload.
    let set = "564e42310100020103000000f4010000000000000000000000000000000000000000000000000000";
    let o = ns.run(FRAME, &["--iface", "d0", "--payload-hex", set]);
    assert!(o.status.success());
    let o = ns.run(
        FRAME,
        &[
            "--iface",
            "d0",
            "--ethertype",
            "0x88b6",
            "--payload-hex",
            "00",
            "--count",
            "5",
        ],
    );
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "sent 5 frames");
    let text = |c: std::process::Child| {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let (out, inc) = (text(out), text(inc));
    for (t, dir) in [(&out, "dir=out"), (&inc, "dir=in")] {
        let frames: Vec<&str> = t.lines().filter(|l| l.starts_with("frame ")).collect();
        assert_eq!(frames.len(), 1, "only the control frame is printed: {t}");
        let l = frames[0];
        assert!(l.contains(dir), "{l}");
        assert!(
            l.contains(
                "dst=02:76:6e:62:00:00 len=54 op=set seq=258 status=ok flags=rx,tx max_rtt_us=500"
            ),
            "{l}"
        );
        assert!(l.ends_with(set), "{l}");
        assert!(t.contains("watched 1500 ms: 1 control frames"), "{t}");
    }
}
