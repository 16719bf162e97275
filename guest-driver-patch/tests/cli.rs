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
