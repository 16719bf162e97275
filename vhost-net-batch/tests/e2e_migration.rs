//! Live migration of a guest served by vhost-net-batch, end to end with two QEMU 10 processes on
//! this machine: the source, and a destination started with `-incoming unix:`, each on its own
//! VM (socket and tap) of one backend process. The taps share a bridge holding the host's
//! address, so the guest keeps its IP and its peers.
//!
//! The guest is migrated while host->guest and guest->host UDP streams, a ping, a TCP stream
//! and a file transfer into the guest (paced TCP, received by busybox nc) run; then back again
//! with batching at adaptive:1000 (no rate floor, so kicks are held while it moves). After
//! each: the TCP stream is still up, the file's size and checksum in the guest match the
//! host's, the backend logged its RX writes while QEMU asked for it (`LOG_ALL`), and the
//! datagrams lost are counted and few. (Whether each page `readv` writes is marked is checked in
//! `datapath_mock`: end to end, a missed page would rarely show, since the guest consumes its
//! buffers before the last copy and TCP would resend what a stale buffer spoiled.)

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const GUEST_IP: &str = "10.77.12.2";
const HOST_IP: &str = "10.77.12.1";
const MAC: &str = "52:54:00:77:01:02";
/// Size of the file sent into the guest across each migration, MiB.
const FILE_MB: u64 = 24;

/// A QMP connection.
struct Qmp(BufReader<UnixStream>);

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let end = Instant::now() + Duration::from_secs(10);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < end => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qmp(BufReader::new(s));
        q.line(); // greeting
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.0.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP said {l:?}: {e}"))
    }

    /// Sends a command and returns its `return` (events in between are skipped).
    fn cmd(&mut self, c: &str) -> Value {
        writeln!(self.0.get_mut(), "{c}").unwrap();
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "QMP {c}: {v}");
        }
    }
}

/// Starts QEMU for the guest on `sock` with QMP on `qmp` and, for a destination, `-incoming`.
fn qemu(sock: &Path, dir: &Path, tag: &str, incoming: Option<&Path>) -> (u32, PathBuf) {
    let agent = dir.join(format!("{tag}.agent"));
    let qmp = dir.join(format!("{tag}.qmp"));
    let mut extra = format!("-qmp unix:{},server=on,wait=off", qmp.display());
    if let Some(m) = incoming {
        extra += &format!(" -incoming unix:{}", m.display());
    }
    let out = run_ok(
        Command::new(repo().join("ci/qemu-run.sh"))
            .args(["--vhost-user", sock.to_str().unwrap(), "--mac", MAC])
            .args(["--ip", &format!("{GUEST_IP}/24"), "--reconnect-ms", "500"])
            .args(["--agent", agent.to_str().unwrap()])
            .args([
                "--console-log",
                dir.join(format!("{tag}.console")).to_str().unwrap(),
            ])
            .args(["--extra", &extra]),
    );
    (out.trim().parse().unwrap(), qmp)
}

/// Runs a command in the guest through the agent at `agent`.
fn gexec(agent: &Path, cmd: &str) -> String {
    run_ok(Command::new(repo().join("ci/gexec.py")).args([
        agent.to_str().unwrap(),
        "--timeout",
        "120",
        "--",
        cmd,
    ]))
}

/// Sends a file to `host:port` over TCP at `rate` bytes per second, then half-closes and waits
/// for the peer to close; exits non-zero if the connection breaks.
const PACED_SENDER: &str = r#"
import socket, sys, time
host, port, path, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
data = open(path, "rb").read()
s = socket.create_connection((host, port), timeout=60)
t0, i = time.monotonic(), 0
while i < len(data):
    s.sendall(data[i:i + 65536])
    i += 65536
    lag = i / rate - (time.monotonic() - t0)
    if lag > 0:
        time.sleep(lag)
s.shutdown(socket.SHUT_WR)
s.recv(1)
s.close()
"#;

/// Traffic started before a migration and checked after it.
struct Traffic {
    /// The file sender: exits 0 once every byte went out and the guest closed.
    sender: std::process::Child,
    udp_in: std::process::Child,
    tcp_in: std::process::Child,
    file_sum: String,
}

fn start_traffic(ns: &ScriptNetns, agent: &Path, dir: &Path, round: u32) -> Traffic {
    // A 24 MB file the host sends into the guest during the migration, at 2 MB/s so that it
    // spans it; the guest's busybox nc writes what it receives into a file, whose checksum is
    // compared afterwards.
    let file = dir.join(format!("payload{round}"));
    run_ok(Command::new("dd").args([
        "if=/dev/urandom",
        &format!("of={}", file.display()),
        "bs=1M",
        &format!("count={FILE_MB}"),
        "status=none",
    ]));
    let sum = run_ok(Command::new("sha256sum").arg(&file));
    let file_sum = sum.split_whitespace().next().unwrap().to_string();
    gexec(
        agent,
        &format!(
            "rm -f /tmp/recv{round}; nc -l -p 5204 > /tmp/recv{round} < /dev/null 2>&1 & sleep 0.3"
        ),
    );
    let sender = ns
        .cmd(&[
            "python3",
            "-c",
            PACED_SENDER,
            GUEST_IP,
            "5204",
            file.to_str().unwrap(),
            "2000000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded UDP both ways (counted), and a TCP stream host->guest.
    gexec(
        agent,
        &format!("iperf3 -c {HOST_IP} -p 5202 -u -b 8M -l 1000 -t 14 > /tmp/udp_out{round} 2>&1 &"),
    );
    let udp_in = ns
        .cmd(&[
            "iperf3", "-c", GUEST_IP, "-u", "-b", "8M", "-l", "1000", "-t", "14", "-J",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tcp_in = ns
        .cmd(&[
            "iperf3", "-c", GUEST_IP, "-p", "5203", "-b", "10M", "-t", "14", "-J",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Traffic {
        sender,
        udp_in,
        tcp_in,
        file_sum,
    }
}

/// Migrates from `qmp_src` to the destination listening on `mig`; returns QEMU's downtime, ms.
fn migrate(qmp_src: &Path, mig: &Path) -> u64 {
    let mut q = Qmp::connect(qmp_src);
    q.cmd(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"unix:{}"}}}}"#,
        mig.display()
    ));
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let st = q.cmd(r#"{"execute":"query-migrate"}"#);
        match st["status"].as_str() {
            Some("completed") => return st["downtime"].as_u64().unwrap_or(0),
            Some("failed") | Some("cancelled") => panic!("migration failed: {st}"),
            _ => {}
        }
        assert!(Instant::now() < end, "migration did not complete: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits up to two minutes for a host-side client (iperf3 never times out by itself: a guest
/// whose network stalled after the move would hang the test).
fn bounded(
    mut c: std::process::Child,
    what: &str,
    round: u32,
    diag: &dyn Fn() -> String,
) -> std::process::Output {
    let end = Instant::now() + Duration::from_secs(120);
    while c.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = c.kill();
            let _ = c.wait();
            panic!(
                "round {round}: {what} did not end within 120 s: the guest's network stalled\n{}",
                diag()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    c.wait_with_output().unwrap()
}

/// Checks what ran across a migration; returns a line of figures.
fn check(
    t: Traffic,
    agent: &Path,
    round: u32,
    downtime: u64,
    rcvbuf_before: &mut u64,
    diag: &dyn Fn() -> String,
) -> String {
    let udp_in = bounded(t.udp_in, "the host->guest UDP stream", round, diag);
    let v: Value = serde_json::from_slice(&udp_in.stdout).unwrap_or_default();
    let sum = &v["end"]["sum"];
    let (lost_in, sent_in) = (
        sum["lost_packets"].as_u64().unwrap_or(u64::MAX),
        sum["packets"].as_u64().unwrap_or(0),
    );
    let tcp = bounded(t.tcp_in, "the host->guest TCP stream", round, diag);
    let tv: Value = serde_json::from_slice(&tcp.stdout).unwrap_or_default();
    assert!(
        tv["error"].is_null() && tv["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0) > 0,
        "round {round}: the TCP stream did not survive the migration: {}\n{}",
        tv["error"],
        diag()
    );
    let out = gexec(agent, &format!("sleep 1; cat /tmp/udp_out{round}"));
    // iperf3's UDP summary: "... lost/total (pct)" on the receiver line.
    let lost_out = out.lines().find(|l| l.contains("receiver")).and_then(|l| {
        l.split_whitespace().find_map(|w| {
            let (a, b) = w.split_once('/')?;
            Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
        })
    });
    // The file: the sender ends once the guest closed after the last byte.
    let sent = bounded(t.sender, "the file transfer", round, diag);
    assert!(
        sent.status.success(),
        "round {round}: the file transfer broke: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let got = gexec(
        agent,
        &format!("wc -c < /tmp/recv{round}; sha256sum /tmp/recv{round}"),
    );
    let mut words = got.split_whitespace();
    let (size, got) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    assert_eq!(
        (size, got),
        ((FILE_MB << 20).to_string().as_str(), t.file_sum.as_str()),
        "round {round}: the file written in the guest from received data differs"
    );
    // Where host->guest datagrams went missing: the guest's UDP drops (socket buffer full
    // while TCG crawls through the copy) and the kernel's on the taps (no reader while the
    // guest is stopped), for the figures.
    let snmp = gexec(agent, "grep Udp: /proc/net/snmp");
    let udp = snmp
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .collect::<Vec<_>>();
    let rcvbuf: u64 = match udp.as_slice() {
        [h, v, ..] => h
            .iter()
            .zip(v)
            .find(|(k, _)| **k == "RcvbufErrors")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0),
        _ => 0,
    };
    let guest_dropped = rcvbuf.saturating_sub(*rcvbuf_before);
    *rcvbuf_before = rcvbuf;
    let lost_line = format!("{guest_dropped} of them dropped by the guest's full socket buffer");
    // The guest's own drops (its socket buffer full while TCG crawls through the copy, more so
    // on a busy machine) are counted by the guest; more than a fifth of the stream lost
    // anywhere else would mean the path broke.
    assert!(
        sent_in > 1000 && lost_in.saturating_sub(guest_dropped) * 5 <= sent_in,
        "round {round}: host->guest UDP lost {lost_in} of {sent_in} ({lost_line})"
    );
    let (lo, so) = lost_out.unwrap_or_else(|| panic!("round {round}: guest iperf3 said {out}"));
    assert!(
        so > 1000 && lo * 5 <= so,
        "round {round}: guest->host UDP lost {lo} of {so}"
    );
    format!(
        "round {round}: downtime {downtime} ms; UDP lost host->guest {lost_in}/{sent_in} ({lost_line}), guest->host {lo}/{so}; TCP stream kept; {FILE_MB} MiB file checksum matches"
    )
}

#[test]
fn a_guest_migrates_and_back_with_traffic_and_held_kicks() {
    require_cmd(
        "qemu-system-x86_64",
        "qemu-system-x86 (QEMU 10.0 from bookworm-backports)",
    );
    require_cmd("iperf3", "iperf3");
    run_ok(&mut Command::new(repo().join("ci/guest/build-image.sh")));
    let ns = ScriptNetns::create("mg");
    let dir = tempdir();
    let (a, b, ctl) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("ctl.sock"));
    let cfg = dir.join("vms.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[vm]]\nname='a'\nsocket='{}'\ntap='vnbmga'\nmac='{MAC}'\nmode='off'\n\n\
             [[vm]]\nname='b'\nsocket='{}'\ntap='vnbmgb'\nmac='{MAC}'\nmode='off'\n",
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("backend.log")).unwrap();
    let backend = Proc(
        ns.cmd(&[
            env!("CARGO_BIN_EXE_vhost-net-batch"),
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
            "--log",
            "info,vhost_net_batch::shim=trace",
        ])
        .stderr(log)
        .spawn()
        .unwrap(),
    );
    let end = Instant::now() + Duration::from_secs(10);
    while !(a.exists() && b.exists() && ctl.exists()) {
        assert!(Instant::now() < end, "the backend did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // One L2 segment for both taps, the host's address on the bridge.
    for c in [
        vec!["ip", "link", "add", "br0", "type", "bridge"],
        vec!["ip", "link", "set", "vnbmga", "master", "br0"],
        vec!["ip", "link", "set", "vnbmgb", "master", "br0"],
        vec!["ip", "link", "set", "br0", "up"],
    ] {
        run_ok(&mut ns.cmd(&c));
    }
    run_ok(Command::new(repo().join("ci/netns.sh")).args([
        "addr",
        &ns.name,
        "br0",
        &format!("{HOST_IP}/24"),
    ]));
    // Servers on the host side for the guest's streams.
    let _servers: Vec<Proc> = ["5202"]
        .iter()
        .map(|p| {
            Proc(
                ns.cmd(&["iperf3", "-s", "-p", p])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let (src_pid, src_qmp) = qemu(&a, &dir, "src", None);
    let mut qemus = vec![QemuGuest {
        agent: dir.join("src.agent"),
        qemu_pid: src_pid,
    }];
    run_ok(Command::new(repo().join("ci/gexec.py")).args([
        dir.join("src.agent").to_str().unwrap(),
        "--wait-ready",
        "180",
    ]));
    let src_agent = dir.join("src.agent");
    gexec(
        &src_agent,
        "iperf3 -s -D -p 5203 --logfile /tmp/iperf3-5203.log",
    );
    run_ok(&mut ns.cmd(&["ping", "-c", "3", "-i", "0.2", "-W", "5", GUEST_IP]));
    let mut figures = Vec::new();
    // The guest's UDP RcvbufErrors so far.
    let mut rcvbuf = 0u64;
    let mut from = (a.clone(), src_qmp, src_agent);
    let mut from_pid = src_pid;
    let mut to_sock = b.clone();
    for (round, mode) in [(1u32, "off"), (2, "adaptive:1000")] {
        for vm in ["a", "b"] {
            run_ok(Command::new(env!("CARGO_BIN_EXE_vhost-net-batch")).args([
                "ctl",
                "--control",
                ctl.to_str().unwrap(),
                "set",
                vm,
                "--mode",
                mode,
            ]));
        }
        let mig = dir.join(format!("mig{round}"));
        let tag = format!("dst{round}");
        let (dst_pid, dst_qmp) = qemu(&to_sock, &dir, &tag, Some(&mig));
        // Killed at the end of the test, or when it fails.
        qemus.push(QemuGuest {
            agent: dir.join(format!("{tag}.agent")),
            qemu_pid: dst_pid,
        });
        let ping = ns
            .cmd(&["ping", "-i", "0.01", "-q", GUEST_IP])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let t = start_traffic(&ns, &from.2, &dir, round);
        std::thread::sleep(Duration::from_secs(4));
        let downtime = migrate(&from.1, &mig);
        let dst_agent = dir.join(format!("{tag}.agent"));
        // The source is done: it quits; its VM's socket listens again.
        quit(&from.1, from_pid);
        let diag = || {
            // What the guest and the backend saw, for a stalled network (the agent talks over
            // virtio-serial, not the network).
            let guest = Command::new(repo().join("ci/gexec.py"))
                .args([dst_agent.to_str().unwrap(), "--timeout", "30", "--"])
                .arg(
                    "dmesg | tail -n 30; grep -i virtio /proc/interrupts; \
                     ethtool -S eth0 2>&1 | grep -v ': 0$'; cat /proc/net/dev; \
                     tail -n 20 /tmp/iperf3-5203.log",
                )
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let stats: String = ["a", "b"]
                .iter()
                .map(|vm| {
                    Command::new(env!("CARGO_BIN_EXE_vhost-net-batch"))
                        .args(["ctl", "--control", ctl.to_str().unwrap(), "stats", vm])
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default()
                })
                .collect();
            let host: String = [
                vec!["bridge", "fdb", "show", "br", "br0"],
                vec!["ip", "neigh"],
            ]
            .iter()
            .map(|c| {
                ns.cmd(c)
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            })
            .collect();
            // Where each backend thread waits (a handler or worker stuck on a lock shows).
            let threads: String = std::fs::read_dir(format!("/proc/{}/task", backend.pid()))
                .map(|d| {
                    d.flatten()
                        .map(|t| {
                            let f = |n: &str| {
                                std::fs::read_to_string(t.path().join(n))
                                    .unwrap_or_default()
                                    .trim()
                                    .to_string()
                            };
                            format!("{} {} {}\n", f("comm"), f("wchan"), f("stat"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let log = std::fs::read_to_string(dir.join("backend.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            format!(
                "guest:\n{guest}\nhost bridge and neighbours:\n{host}\nbackend stats:\n{stats}\nbackend threads:\n{threads}\nbackend log (last lines):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        };
        let line = check(t, &dst_agent, round, downtime, &mut rcvbuf, &diag);
        // SAFETY: SIGINT to our ping: it prints its summary and exits.
        unsafe { libc::kill(ping.id() as i32, libc::SIGINT) };
        let p = ping.wait_with_output().unwrap();
        let summary = String::from_utf8_lossy(&p.stdout)
            .lines()
            .find(|l| l.contains("packet loss"))
            .unwrap_or("")
            .to_string();
        println!("{line}; ping: {summary}");
        figures.push(format!("{line}; ping: {summary}"));
        // The guest kept its address and answers through the destination's tap.
        run_ok(&mut ns.cmd(&["ping", "-c", "3", "-i", "0.2", "-W", "5", GUEST_IP]));
        from = (to_sock.clone(), dst_qmp, dst_agent);
        from_pid = dst_pid;
        to_sock = if round == 1 { a.clone() } else { b.clone() };
    }
    let log = std::fs::read_to_string(dir.join("backend.log")).unwrap();
    // On at each source once QEMU starts the copy (the source then stops, with it still on).
    let on = log.matches("dirty-page logging on").count();
    assert!(
        on >= 2,
        "the backend should log its writes during each migration (turned on {on} times):\n{log}"
    );
    // The destination announced the guest (QEMU's SEND_RARP, a few rounds per move) for each
    // of the two moves: a VM the guest moved to and one it moved back to.
    for vm in ["a", "b"] {
        let c = vhost_net_batch::control_socket::stats(&ctl, vm)
            .unwrap()
            .vm_counters;
        assert!(
            c.announcements >= 1 && c.announcements_refused == 0,
            "VM {vm} should have announced the guest after it moved there: {c:?}\n{}",
            strip_ansi(&log)
        );
    }
    let text = figures.join("\n") + "\n";
    let _ = std::fs::write(repo().join("target/e2e-migration-figures.txt"), &text);
    print!("{text}");
    quit(&from.1, from_pid);
}

/// Asks the QEMU on `qmp` to quit and waits for its process `pid` to end (killed after 10 s).
/// The monitor may close before the command's reply arrives: QEMU is quitting.
fn quit(qmp: &Path, pid: u32) {
    if let Ok(s) = UnixStream::connect(qmp) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut r = BufReader::new(s);
        let mut l = String::new();
        // Greeting, capabilities, quit, each waited for: a monitor closed before it read a
        // command drops it.
        let _ = r.read_line(&mut l);
        for c in ["qmp_capabilities", "quit"] {
            if writeln!(r.get_mut(), "{{\"execute\":\"{c}\"}}").is_err() {
                break;
            }
            l.clear();
            while r.read_line(&mut l).is_ok_and(|n| n > 0) && !l.contains("\"return\"") {
                l.clear();
            }
        }
    }
    let end = Instant::now() + Duration::from_secs(10);
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid as i32, 0) } == 0 {
        if Instant::now() > end {
            // SAFETY: SIGKILL to the QEMU this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `s` without its terminal colour sequences (`ESC [ … m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
