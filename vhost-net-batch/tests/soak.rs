//! The soak (`make soak`, not part of `make test`): one backend serving four VMs in four
//! batching modes for VNB_SOAK_MINUTES (default 30) of mixed traffic — iperf3 both ways in
//! turn, a steady ping, the operator changing modes with `ctl set` — with the backend's RSS and
//! descriptors sampled every minute. Passes when both stay flat after the first minute and, once
//! the traffic stops, every frame each guest sent is accounted for by the backend (sent to the
//! tap, refused by it, rejected as malformed, or consumed as a control frame). Writes its
//! samples to VNB_SOAK_OUT (default target/soak) as soak.csv and summary.txt.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vhost_net_batch::control_socket::{stats, Request, StatsReply};

const VMS: usize = 4;
const MODES: [&str; VMS] = ["adaptive:500", "fixed:250", "off", "adaptive:1000"];

fn guest_ip(i: usize) -> String {
    format!("10.77.{}.2", 20 + i)
}

fn host_ip(i: usize) -> String {
    format!("10.77.{}.1", 20 + i)
}

fn set_mode(ctl: &Path, vm: &str, mode: &str) {
    let _: StatsReply = vhost_net_batch::control_socket::request(
        ctl,
        &Request::Set {
            vm: vm.into(),
            mode: Some(mode.parse().unwrap()),
            budget_us: None,
        },
    )
    .unwrap();
}

#[test]
fn four_vms_of_mixed_traffic_keep_memory_descriptors_and_counts() {
    require_cmd(
        "qemu-system-x86_64",
        "qemu-system-x86 (QEMU 10.0 from bookworm-backports)",
    );
    require_cmd("iperf3", "iperf3");
    let minutes: u64 = std::env::var("VNB_SOAK_MINUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    assert!(minutes >= 2, "VNB_SOAK_MINUTES must be at least 2");
    let out: PathBuf = std::env::var_os("VNB_SOAK_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/soak"));
    std::fs::create_dir_all(&out).unwrap();
    run_ok(&mut Command::new(repo().join("ci/guest/build-image.sh")));
    let ns = ScriptNetns::create("sk");
    let dir = tempdir();
    let ctl = dir.join("ctl.sock");
    let mut cfg = String::new();
    for (i, mode) in MODES.iter().enumerate() {
        cfg += &format!(
            "[[vm]]\nname='s{i}'\nsocket='{}'\ntap='vnbsk{i}'\nqueues={}\nmac='52:54:00:77:01:02'\nmode='{mode}'\n\n",
            dir.join(format!("s{i}.sock")).display(),
            1 + i % 2
        );
    }
    std::fs::write(dir.join("vms.toml"), cfg).unwrap();
    let log = std::fs::File::create(out.join("backend.log")).unwrap();
    let backend = Proc(
        ns.cmd(&[
            env!("CARGO_BIN_EXE_vhost-net-batch"),
            "serve",
            "--config",
            dir.join("vms.toml").to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
            "--log",
            "warn",
        ])
        .stderr(log)
        .spawn()
        .unwrap(),
    );
    let end = Instant::now() + Duration::from_secs(10);
    while !ctl.exists() {
        assert!(Instant::now() < end, "the backend did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..VMS {
        run_ok(Command::new(repo().join("ci/netns.sh")).args([
            "addr",
            &ns.name,
            &format!("vnbsk{i}"),
            &format!("{}/24", host_ip(i)),
        ]));
    }
    let guests: Vec<QemuGuest> = (0..VMS)
        .map(|i| {
            QemuGuest::boot(
                &dir.join(format!("s{i}.sock")),
                &dir,
                &format!("s{i}"),
                &format!("{}/24", guest_ip(i)),
                &["--mem", "256", "--queues", &(1 + i % 2).to_string()],
            )
        })
        .collect();
    // A steady echo to every guest for the whole soak.
    let pings: Vec<Proc> = (0..VMS)
        .map(|i| {
            Proc(
                ns.cmd(&["ping", "-i", "0.05", "-q", &guest_ip(i)])
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let pid = backend.pid();
    let mut csv = String::from("minute,rss_kib,fds,threads,tx_packets,rx_packets\n");
    let mut samples = Vec::new();
    let started = Instant::now();
    let modes = [
        "adaptive:500",
        "fixed:250",
        "off",
        "adaptive:1000",
        "fixed:1000",
    ];
    for minute in 0..minutes {
        let until = started + Duration::from_secs(60 * (minute + 1));
        let mut k = 0usize;
        while Instant::now() < until {
            // One VM at a time moves bulk traffic, alternating directions; modes rotate.
            let i = k % VMS;
            let dir_flag = if k.is_multiple_of(2) { "-R" } else { "" };
            let mut args = vec!["timeout", "30", "iperf3", "-c"];
            let ip = guest_ip(i);
            args.push(&ip);
            args.extend(["-t", "4", "-b", "30M"]);
            if !dir_flag.is_empty() {
                args.push(dir_flag);
            }
            let _ = ns
                .cmd(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            set_mode(&ctl, &format!("s{}", (k + 1) % VMS), modes[k % modes.len()]);
            k += 1;
            std::thread::sleep(Duration::from_millis(500));
        }
        let t: Vec<StatsReply> = (0..VMS)
            .map(|i| stats(&ctl, &format!("s{i}")).unwrap())
            .collect();
        let rss = vnb_common::procfs::rss_kib(pid).unwrap();
        let fds = vnb_common::procfs::fd_count(pid).unwrap();
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .count();
        let txp: u64 = t.iter().map(|s| s.total.tx_packets).sum();
        let rxp: u64 = t.iter().map(|s| s.total.rx_packets).sum();
        csv += &format!("{minute},{rss},{fds},{threads},{txp},{rxp}\n");
        println!("soak minute {minute}: RSS {rss} KiB, {fds} fds, {threads} threads, {txp} tx / {rxp} rx packets");
        samples.push((rss, fds, threads));
        std::fs::write(out.join("soak.csv"), &csv).unwrap();
    }
    drop(pings);
    std::thread::sleep(Duration::from_secs(3));
    // Accounting, traffic stopped: what each guest sent, the backend accounted for.
    let mut summary =
        format!("{minutes} minutes, {VMS} VMs ({MODES:?} at start, modes rotated by ctl set)\n");
    let mut lost = Vec::new();
    for (i, g) in guests.iter().enumerate() {
        let sent: u64 = g
            .exec("cat /sys/class/net/eth0/statistics/tx_packets")
            .trim()
            .parse()
            .unwrap();
        let s = stats(&ctl, &format!("s{i}")).unwrap();
        let t = s.total;
        let accounted = t.tx_packets + t.tx_dropped + t.tx_bad_chains + t.control_frames;
        summary += &format!(
            "s{i}: guest sent {sent}; backend: {} to the tap, {} refused by it, {} malformed, {} control; received {} ({} dropped)\n",
            t.tx_packets, t.tx_dropped, t.tx_bad_chains, t.control_frames, t.rx_packets, t.rx_dropped
        );
        if accounted != sent {
            lost.push(format!(
                "s{i}: guest sent {sent}, backend accounted for {accounted}"
            ));
        }
    }
    let (rss0, fds0, th0) = samples[1.min(samples.len() - 1)];
    let (rss1, fds1, th1) = *samples.last().unwrap();
    summary += &format!(
        "after minute 1: RSS {rss0} KiB, {fds0} fds, {th0} threads; at the end: RSS {rss1} KiB, {fds1} fds, {th1} threads\n"
    );
    print!("{summary}");
    std::fs::write(out.join("summary.txt"), &summary).unwrap();
    assert!(lost.is_empty(), "frames unaccounted for: {lost:?}");
    // A control connection being served holds a thread and two descriptors for a moment, so
    // single samples differ by that much: flat means the second half never goes above what
    // the first minutes saw.
    let early = &samples[1.min(samples.len() - 1)..samples.len().min(4)];
    let late = &samples[samples.len() / 2..];
    let most = |s: &[(u64, usize, usize)], f: fn(&(u64, usize, usize)) -> usize| {
        s.iter().map(f).max().unwrap_or(0)
    };
    assert!(
        most(late, |s| s.1) <= most(early, |s| s.1),
        "descriptors grew: {samples:?}"
    );
    assert!(
        most(late, |s| s.2) <= most(early, |s| s.2),
        "threads grew: {samples:?}"
    );
    assert!(
        rss1 <= rss0 + rss0 / 10 + 1024,
        "RSS grew from {rss0} to {rss1} KiB: {samples:?}"
    );
    for g in guests {
        g.quit();
    }
}
