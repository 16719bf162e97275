//! Restarting the backend under a live guest: the backend is killed with SIGKILL while TCP
//! streams run both ways over both queue pairs of a multiqueue guest, and started again on the
//! same socket; QEMU 10 reconnects (`reconnect-ms`) and traffic must resume within 2 s in both
//! directions on both pairs, ten times in a row, without rebooting the guest. UDP flows time
//! the restarts (they resume as soon as the path does; TCP adds its own retransmission backoff);
//! TCP streams each way must survive all ten restarts.
//!
//! The tap is a persistent one the operator made (`ip tuntap add … multi_queue vnet_hdr`), so
//! its address outlives the backend process; the backend attaches to it.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const GUEST_IP: &str = "10.77.11.2";
const HOST_IP: &str = "10.77.11.1";
const TAP: &str = "vnbrs0";
const RESTARTS: usize = 10;
/// How long traffic may take to resume after the backend is back.
const RESUME: Duration = Duration::from_secs(2);

/// Packets moved per queue pair by the current backend: `(rx, tx)` of pairs 0 and 1.
fn per_queue(ctl: &Path) -> Option<[(u64, u64); 2]> {
    let s = vhost_net_batch::control_socket::stats(ctl, "rs").ok()?;
    let q = |i: usize| s.queues.get(i).map(|q| (q.rx_packets, q.tx_packets));
    Some([q(0)?, q(1)?])
}

#[test]
fn the_backend_restarts_under_a_live_guest_ten_times() {
    require_cmd(
        "qemu-system-x86_64",
        "qemu-system-x86 (QEMU 10.0 from bookworm-backports)",
    );
    require_cmd("iperf3", "iperf3");
    run_ok(&mut Command::new(repo().join("ci/guest/build-image.sh")));
    let ns = ScriptNetns::create("rs");
    run_ok(&mut ns.cmd(&[
        "ip",
        "tuntap",
        "add",
        "dev",
        TAP,
        "mode",
        "tap",
        "multi_queue",
        "vnet_hdr",
    ]));
    run_ok(Command::new(repo().join("ci/netns.sh")).args([
        "addr",
        &ns.name,
        TAP,
        &format!("{HOST_IP}/24"),
    ]));
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let ctl = dir.join("ctl.sock");
    let args = [
        "--mac",
        "52:54:00:77:01:02",
        "--queues",
        "2",
        "--control",
        ctl.to_str().unwrap(),
    ];
    let mut backend = spawn_backend(&ns, "rs", &sock, TAP, &args);
    let g = QemuGuest::boot(
        &sock,
        &dir,
        "rs",
        &format!("{GUEST_IP}/24"),
        &[
            "--queues",
            "2",
            "--guest-queues",
            "2",
            "--reconnect-ms",
            "200",
        ],
    );
    // One vCPU: let it transmit on both queues (XPS), so guest->host flows spread too.
    g.exec("for q in 0 1; do echo 1 > /sys/class/net/eth0/queues/tx-$q/xps_cpus; done");
    run_ok(&mut ns.cmd(&["ping", "-c", "3", "-i", "0.2", "-W", "5", GUEST_IP]));
    // Traffic for the whole test, each way: eight UDP flows (they resume as soon as the path
    // does, so they time the restarts) and two TCP streams (they must survive every restart).
    // The tap spreads host->guest flows over its queues by hash (or by the queue the guest last
    // sent the flow on): with eight UDP flows each way (and two TCP streams), the chance that
    // either pair gets none of the UDP flows is 1/128, so a silent pair most likely means a
    // stalled ring.
    let servers: Vec<Proc> = ["5201", "5202"]
        .iter()
        .map(|port| {
            Proc(
                ns.cmd(&["iperf3", "-s", "-p", port])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    g.exec("iperf3 -s -D -p 5202");
    std::thread::sleep(Duration::from_millis(500));
    let secs = "60";
    let host_udp = Proc(
        ns.cmd(&[
            "iperf3", "-c", GUEST_IP, "-p", "5201", "-u", "-b", "1M", "-P", "8", "-t", secs,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    // Reaped below; killed with the namespace if the test fails first.
    let host_tcp = ns
        .cmd(&[
            "iperf3", "-c", GUEST_IP, "-p", "5202", "-b", "4M", "-P", "2", "-t", secs, "-J",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    g.exec(&format!(
        "iperf3 -c {HOST_IP} -p 5201 -u -b 1M -P 8 -t {secs} >/dev/null 2>&1 & \
         iperf3 -c {HOST_IP} -p 5202 -b 4M -P 2 -t {secs} > /tmp/tcp.out 2>&1 &"
    ));
    std::thread::sleep(Duration::from_secs(3));
    let mut resumed = Vec::new();
    for round in 1..=RESTARTS {
        // SAFETY: SIGKILL to our own child backend.
        unsafe { libc::kill(backend.pid() as i32, libc::SIGKILL) };
        let _ = backend.0.wait();
        std::thread::sleep(Duration::from_millis(300));
        backend = spawn_backend(&ns, "rs", &sock, TAP, &args);
        let back = Instant::now();
        // Both pairs, both directions, counted by the new backend from zero.
        let mut last = None;
        let took = loop {
            if let Some(q) = per_queue(&ctl) {
                if q.iter().all(|&(rx, tx)| rx > 0 && tx > 0) {
                    break Some(back.elapsed());
                }
                last = Some(q);
            }
            if back.elapsed() > Duration::from_secs(15) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = took.unwrap_or_else(|| {
            let (_, guest) = g.try_exec("cat /proc/interrupts; ethtool -S eth0");
            panic!(
                "restart {round}: traffic did not resume on both pairs both ways within 15 s \
                 (per queue (rx, tx): {last:?}); backend: {:?}\nguest:\n{guest}\nbackend log:\n{}",
                vhost_net_batch::control_socket::stats(&ctl, "rs").map(|s| s.queues),
                std::fs::read_to_string(sock.with_extension("log")).unwrap_or_default()
            )
        });
        println!(
            "restart {round}: both pairs both ways after {:.2} s",
            took.as_secs_f64()
        );
        resumed.push(took);
        std::thread::sleep(Duration::from_millis(700));
    }
    let figures = format!(
        "backend restarts under a live guest: traffic resumed after (s) {:?}\n",
        resumed
            .iter()
            .map(|d| (d.as_secs_f64() * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );
    print!("{figures}");
    let _ = std::fs::write(repo().join("target/e2e-restart-figures.txt"), &figures);
    // The guest was never rebooted, and the TCP streams survived every restart.
    let uptime = g.exec("cut -d' ' -f1 /proc/uptime");
    println!("guest uptime {} s", uptime.trim());
    let left = Duration::from_secs(65).saturating_sub(started.elapsed());
    std::thread::sleep(left);
    let out = g.exec("cat /tmp/tcp.out");
    assert!(
        out.contains("receiver") && !out.contains("error"),
        "the guest's TCP streams did not survive:\n{out}"
    );
    let out = host_tcp.wait_with_output().unwrap();
    let json = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    assert!(
        v["error"].is_null() && v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0) > 0,
        "the host's TCP streams did not survive: {json}"
    );
    drop(host_udp);
    drop(servers);
    for (round, t) in resumed.iter().enumerate() {
        assert!(
            *t <= RESUME,
            "restart {}: traffic resumed only after {t:?}: {figures}",
            round + 1
        );
    }
    g.quit();
}
