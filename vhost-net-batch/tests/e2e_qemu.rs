//! End to end with real parts: stock QEMU boots a Debian 6.12 guest over our vhost-user socket,
//! the tap sits in a private network namespace; ping both ways, iperf3 both ways, a 20 MB HTTP
//! download with ab; then QEMU quits and a second QEMU attaches to the same backend.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn iperf_mbps(json: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(json).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6
}

/// One 3 s iperf3 run from the host side against the guest's server. A run that reports no
/// bytes is printed in full and repeated once: CI once saw iperf3 exit 0 with an empty reverse
/// test, which we could not reproduce; a second empty run fails the test.
fn iperf(ns: &ScriptNetns, extra: &[&str]) -> f64 {
    for attempt in 1..=2 {
        let mut args = vec!["iperf3", "-c", "10.77.1.2", "-t", "3", "-J"];
        args.extend_from_slice(extra);
        let json = run_ok(&mut ns.cmd(&args));
        let mbps = iperf_mbps(&json);
        if mbps > 1.0 || attempt == 2 {
            return mbps;
        }
        println!("iperf3 {extra:?} attempt {attempt} moved nothing; its report:\n{json}");
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    unreachable!()
}

fn prerequisites() {
    require_cmd(
        "qemu-system-x86_64",
        "qemu-system-x86 (QEMU 10.0 from bookworm-backports)",
    );
    require_cmd("iperf3", "iperf3");
    require_cmd("ab", "apache2-utils");
    require_cmd("python3", "python3");
    run_ok(&mut Command::new(repo().join("ci/guest/build-image.sh")));
}

#[test]
fn qemu_guest_ping_iperf_http_and_reattach() {
    prerequisites();
    let ns = ScriptNetns::create("e2e");
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let backend = spawn_backend(
        &ns,
        "e2e",
        &sock,
        "vnbe2e0",
        &["--mac", "52:54:00:77:01:02"],
    );
    run_ok(Command::new(repo().join("ci/netns.sh")).args([
        "addr",
        &ns.name,
        "vnbe2e0",
        "10.77.1.1/24",
    ]));

    let g = QemuGuest::boot(&sock, &dir, "first", "10.77.1.2/24", &[]);
    run_ok(&mut ns.cmd(&["ping", "-c", "3", "-i", "0.2", "-W", "5", "10.77.1.2"]));
    let out = g.exec("ping -c 3 -W 5 10.77.1.1");
    assert!(
        out.contains("3 packets received"),
        "guest -> host ping: {out}"
    );

    let rx = iperf(&ns, &[]);
    let tx = iperf(&ns, &["-R"]);
    println!("iperf3 host->guest {rx:.0} Mb/s, guest->host {tx:.0} Mb/s");
    let _ = std::fs::write(
        repo().join("target/e2e-iperf-figures.txt"),
        format!("iperf3 host->guest {rx:.0} Mb/s, guest->host {tx:.0} Mb/s\n"),
    );
    assert!(
        rx > 1.0 && tx > 1.0,
        "iperf3 throughput host->guest {rx} guest->host {tx}"
    );

    let ab = run_ok(&mut ns.cmd(&["ab", "-n", "2", "-c", "1", "http://10.77.1.2/20M.bin"]));
    assert!(ab.contains("Complete requests:      2"), "{ab}");
    assert!(ab.contains("Failed requests:        0"), "{ab}");
    let transferred: u64 = ab
        .lines()
        .find(|l| l.starts_with("Total transferred:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        transferred >= 2 * 20 * 1024 * 1024,
        "ab transferred {transferred} bytes"
    );

    // The guest saw virtio interrupts and the backend moved packets both ways.
    let irqs = g.exec("cat /proc/interrupts");
    assert!(irqs.contains("virtio1-input.0"), "{irqs}");

    // QEMU quits; a second QEMU (with reconnect-ms) attaches to the same backend socket.
    g.quit();
    assert!(
        Path::new(&format!("/proc/{}", backend.pid())).exists(),
        "backend died with its frontend"
    );
    let g2 = QemuGuest::boot(
        &sock,
        &dir,
        "second",
        "10.77.1.2/24",
        &["--reconnect-ms", "1000"],
    );
    run_ok(&mut ns.cmd(&["ping", "-c", "3", "-i", "0.2", "-W", "5", "10.77.1.2"]));
    let out = g2.exec("ping -c 2 -W 5 10.77.1.1");
    assert!(
        out.contains("2 packets received"),
        "guest -> host ping after reattach: {out}"
    );
    g2.quit();
    let log = std::fs::read_to_string(sock.with_extension("log")).unwrap();
    assert_eq!(log.matches("frontend connected").count(), 2, "{log}");
}
