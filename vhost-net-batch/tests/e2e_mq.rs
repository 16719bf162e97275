//! Multiqueue end to end with stock QEMU: a two-pair device whose one-vCPU Linux guest starts
//! with one pair (Linux's default), then turns the second on and off again with `ethtool -L`.
//! Many host->guest flows must arrive in every state: the tap's queues have to follow the
//! pairs the guest enabled, or the kernel hashes flows to a queue nobody reads.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

const GUEST_IP: &str = "10.77.3.2";

fn ctl_stats(sock: &Path) -> Value {
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_vhost-net-batch"))
            .args(["ctl", "--control", sock.to_str().unwrap()])
            .args(["stats", "mq", "--json"]),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl stats: {e}: {out}"))
}

/// Packets the backend moved to the guest on each queue pair.
fn rx_per_queue(sock: &Path) -> Vec<u64> {
    ctl_stats(sock)["queues"]
        .as_array()
        .expect("per-queue stats")
        .iter()
        .map(|q| q["rx_packets"].as_u64().unwrap())
        .collect()
}

/// Eight parallel host->guest TCP streams for 3 s; every one must deliver data.
fn eight_flows(ns: &ScriptNetns, what: &str) {
    let json = run_ok(&mut ns.cmd(&[
        "timeout", "40", "iperf3", "-c", GUEST_IP, "-P", "8", "-t", "3", "-J",
    ]));
    let v: Value = serde_json::from_str(&json).expect("iperf3 JSON");
    let streams = v["end"]["streams"].as_array().expect("streams");
    assert_eq!(streams.len(), 8, "{what}: {json}");
    for (i, s) in streams.iter().enumerate() {
        let bytes = s["receiver"]["bytes"].as_u64().unwrap_or(0);
        assert!(bytes > 0, "{what}: stream {i} delivered nothing: {json}");
    }
    let mbps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6;
    println!("{what}: 8 host->guest flows, {mbps:.0} Mb/s");
}

#[test]
fn guest_turning_queue_pairs_on_and_off_loses_no_flow() {
    require_cmd(
        "qemu-system-x86_64",
        "qemu-system-x86 (QEMU 10.0 from bookworm-backports)",
    );
    require_cmd("iperf3", "iperf3");
    run_ok(&mut Command::new(repo().join("ci/guest/build-image.sh")));
    let ns = ScriptNetns::create("mq");
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let ctl = dir.join("ctl.sock");
    let _backend = spawn_backend(
        &ns,
        "mq",
        &sock,
        "vnbmq0",
        &[
            "--mac",
            "52:54:00:77:01:02",
            "--queues",
            "2",
            "--mode",
            "off",
            "--control",
            ctl.to_str().unwrap(),
        ],
    );
    run_ok(Command::new(repo().join("ci/netns.sh")).args([
        "addr",
        &ns.name,
        "vnbmq0",
        "10.77.3.1/24",
    ]));
    let g = QemuGuest::boot(
        &sock,
        &dir,
        "mq",
        "10.77.3.2/24",
        &["--queues", "2", "--guest-queues", "1"],
    );
    let l = g.exec("ethtool -l eth0");
    println!("{l}");
    run_ok(&mut ns.cmd(&["ping", "-c", "3", "-i", "0.2", "-W", "5", GUEST_IP]));

    // One pair on (the guest's default with one vCPU): every flow lands on pair 0.
    let before = rx_per_queue(&ctl);
    eight_flows(&ns, "one pair enabled");
    let after = rx_per_queue(&ctl);
    assert_eq!(after.len(), 2);
    assert!(after[0] > before[0], "pair 0 moved nothing: {after:?}");
    assert_eq!(after[1], before[1], "pair 1 is off but moved packets");

    // Both pairs: the second one carries traffic too.
    g.exec("ethtool -L eth0 combined 2");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let before = rx_per_queue(&ctl);
    eight_flows(&ns, "two pairs enabled");
    let after = rx_per_queue(&ctl);
    assert!(
        after[1] > before[1],
        "8 flows and pair 1 moved nothing: {before:?} -> {after:?}"
    );

    // Back to one.
    g.exec("ethtool -L eth0 combined 1");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let before = rx_per_queue(&ctl);
    eight_flows(&ns, "back to one pair");
    let after = rx_per_queue(&ctl);
    assert_eq!(after[1], before[1], "pair 1 is off again but moved packets");
    g.quit();
}
