//! A third-party vhost-user frontend: DPDK's testpmd with `net_virtio_user` drives the backend
//! without a VM. txonly: its packets must appear on the tap; rxonly: frames sent into the tap
//! must reach testpmd. Prints packets per second and per backend CPU-second.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn tap_stat(ns: &ScriptNetns, tap: &str, stat: &str) -> u64 {
    run_ok(&mut ns.cmd(&["cat", &format!("/sys/class/net/{tap}/statistics/{stat}")]))
        .trim()
        .parse()
        .unwrap()
}

/// Runs testpmd against `sock` in `mode` while `during` runs; returns testpmd's output.
fn testpmd(
    sock: &std::path::Path,
    mode: &str,
    prefix: &str,
    secs: u64,
    during: impl FnOnce(),
) -> String {
    let mut child = Command::new("dpdk-testpmd")
        .args([
            "-l",
            "0-1",
            "--no-pci",
            "--single-file-segments",
            "-m",
            "256",
            "--file-prefix",
            prefix,
        ])
        .arg("--vdev")
        .arg(format!("net_virtio_user0,path={},queues=1", sock.display()))
        .args([
            "--",
            "--forward-mode",
            mode,
            "--stats-period",
            "1",
            "--no-lsc-interrupt",
            "--tx-first",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dpdk-testpmd");
    std::thread::sleep(Duration::from_secs(3));
    during();
    std::thread::sleep(Duration::from_secs(secs));
    // SAFETY: signalling our own child; testpmd prints its totals on SIGINT and exits.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let end = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    out + &err
}

/// The number after `key` in testpmd's last "Forward statistics" block.
fn last_stat(out: &str, key: &str) -> u64 {
    out.rsplit("Accumulated forward statistics")
        .next()
        .and_then(|block| block.split(key).nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in testpmd output:\n{out}"))
}

fn prerequisites() {
    require_cmd("dpdk-testpmd", "dpdk (Debian package)");
    let huge: u64 = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        huge >= 128,
        "DPDK needs hugepages: run ci/setup.sh (reserves 512 x 2 MiB)"
    );
}

#[test]
fn testpmd_txonly_reaches_the_tap_and_rxonly_receives_from_it() {
    prerequisites();
    let ns = ScriptNetns::create("dp");
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let tap = "vnbdp0";
    let backend = spawn_backend(&ns, "dpdk", &sock, tap, &[]);

    // txonly: testpmd -> backend -> tap.
    let (rx0, cpu0) = (tap_stat(&ns, tap, "rx_packets"), backend.cpu_seconds());
    let t0 = Instant::now();
    let out = testpmd(
        &sock,
        "txonly",
        &format!("vnbtx{}", std::process::id()),
        5,
        || {},
    );
    let secs = t0.elapsed().as_secs_f64();
    let (rx1, cpu1) = (tap_stat(&ns, tap, "rx_packets"), backend.cpu_seconds());
    let sent = last_stat(&out, "TX-packets:");
    let on_tap = rx1 - rx0;
    let cpu = (cpu1 - cpu0).max(0.01);
    let figure = format!(
        "txonly: testpmd sent {sent}, tap received {on_tap} in {secs:.1} s ({:.0} pps), backend CPU {cpu:.2} s => {:.0} packets per backend CPU-second",
        on_tap as f64 / secs,
        on_tap as f64 / cpu
    );
    println!("{figure}");
    // Kept for the record (cargo test captures stdout of passing tests).
    let _ = std::fs::write(
        repo().join("target/dpdk-figures.txt"),
        format!("{figure}\n"),
    );
    assert!(
        on_tap > 10_000,
        "only {on_tap} of testpmd's packets reached the tap:\n{out}"
    );
    assert!(
        on_tap <= sent + 1000,
        "tap saw more than testpmd sent ({on_tap} > {sent})"
    );

    // rxonly: frames sent into the tap reach testpmd.
    let nsfile = File::open(format!("/var/run/netns/{}", ns.name)).unwrap();
    let n = 2000u32;
    let out = testpmd(
        &sock,
        "rxonly",
        &format!("vnbrx{}", std::process::id()),
        2,
        || {
            std::thread::scope(|s| {
                s.spawn(|| {
                    // SAFETY: moves only this helper thread into the test's namespace.
                    assert_eq!(
                        unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) },
                        0
                    );
                    let pkt = PacketSocket::bind(tap);
                    for i in 0..n {
                        pkt.send(&test_frame(i as u8, 128));
                        if i % 100 == 99 {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                });
            });
        },
    );
    let got = last_stat(&out, "RX-packets:");
    println!("rxonly: sent {n} frames into the tap, testpmd received {got}");
    assert!(
        got >= n as u64,
        "testpmd received {got} of {n} frames:\n{out}"
    );
    assert!(std::path::Path::new(&format!("/proc/{}", backend.pid())).exists());
}
