//! What one guest, a compromised frontend or a local user can do must stay with that VM: each
//! test here fails on a backend without the protection it names.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use control_msg::{parse_frame, Message, Op, DEVICE_MAC, MAX_FRAME_LEN};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vhost_net_batch::config::VmConfig;
use vhost_net_batch::control_socket::StatsReply;

const T: Duration = Duration::from_secs(5);
const BIN: &str = env!("CARGO_BIN_EXE_vhost-net-batch");

/// Starts the backend binary in `ns` with `args` and `env`; waits for `socks`.
fn spawn(
    ns: &ScriptNetns,
    args: &[&str],
    env: &[(&str, &str)],
    socks: &[&Path],
    log: &Path,
) -> Proc {
    for s in socks {
        let _ = std::fs::remove_file(s);
    }
    let mut c = ns.cmd(&[BIN, "serve"]);
    c.args(args).args(["--log", "info"]);
    for (k, v) in env {
        c.env(k, v);
    }
    let p = Proc(
        c.stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    );
    let end = Instant::now() + Duration::from_secs(10);
    while !socks.iter().all(|s| s.exists()) {
        assert!(
            Instant::now() < end,
            "backend did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

fn stats(ctl: &Path, vm: &str) -> StatsReply {
    vhost_net_batch::control_socket::stats(ctl, vm).unwrap()
}

/// Waits until `cond` holds or `T` passes; returns whether it held.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + T;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Whether the daemon closed the frontend's connection (a read sees EOF or an error).
fn closed_by_peer(s: &UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut b = [0u8; 1];
    matches!(std::io::Read::read(&mut &*s, &mut b), Ok(0))
        || matches!(
            std::io::Read::read(&mut &*s, &mut b),
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut
        )
}

/// A frame from the guest to the device: a control GET, or (`magic`) one with another magic.
fn control_frame(seq: u16, magic: Option<&[u8; 4]>) -> Vec<u8> {
    let mut out = [0u8; MAX_FRAME_LEN];
    let n = Message::get(seq).encode_frame(DEVICE_MAC, [0x52, 0x54, 0, 0xaa, 0xbb, 0x01], &mut out);
    if let Some(m) = magic {
        out[14..18].copy_from_slice(m);
    }
    out[..n].to_vec()
}

/// The control replies the guest found in its RX ring.
fn replies(g: &Guest) -> Vec<Message> {
    g.used(0)
        .into_iter()
        .filter_map(|(id, len)| {
            let b = g.rx_buf(id as u16, len as usize);
            parse_frame(&b[12..]).ok().map(|(_, m)| m)
        })
        .collect()
}

#[test]
fn sockets_have_their_mode_and_strangers_are_refused() {
    let ns = ScriptNetns::create("hs");
    let dir = tempdir();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (a, b, ctl) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("ctl.sock"));
    let _pa = spawn(
        &ns,
        &[
            "--vm",
            "a",
            "--socket",
            a.to_str().unwrap(),
            "--tap",
            "vnbhsa",
            "--control",
            ctl.to_str().unwrap(),
        ],
        &[],
        &[&a, &ctl],
        &dir.join("a.log"),
    );
    let _pb = spawn(
        &ns,
        &[
            "--vm",
            "b",
            "--socket",
            b.to_str().unwrap(),
            "--tap",
            "vnbhsb",
            "--socket-mode",
            "0666",
            "--socket-group",
            "nogroup",
        ],
        &[],
        &[&b],
        &dir.join("b.log"),
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&a), 0o600, "vhost-user socket by default");
    assert_eq!(mode(&ctl), 0o600, "control socket");
    assert_eq!(mode(&b), 0o666);
    // A user who may reach the socket (mode 0666) but is neither root, the daemon's user nor
    // in its group: turned away before any message is answered.
    let probe = |sock: &Path, uid: u32, gid: u32| {
        Command::new("python3")
            .args([
                "-c",
                "import socket,struct,sys\n\
                 s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(5)\n\
                 try:\n s.sendall(struct.pack('<III',1,1,0)); r=s.recv(64)\n\
                 except OSError: r=b''\n\
                 print('answered' if r else 'closed')",
            ])
            .arg(sock)
            .uid(uid)
            .gid(gid)
            .output()
            .unwrap()
    };
    use std::os::unix::process::CommandExt;
    let said = |o: std::process::Output| String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(said(probe(&b, 4242, 4242)), "closed");
    // Root, and a member of the socket's group, are answered.
    assert_eq!(said(probe(&b, 0, 0)), "answered");
    let nogroup = vhost_net_batch::access::group_id("nogroup").unwrap();
    assert_eq!(said(probe(&b, 4242, nogroup)), "answered");
    // On the default 0600 socket the stranger cannot even connect.
    assert!(!probe(&a, 4242, 4242).status.success());
    let log = std::fs::read_to_string(dir.join("b.log")).unwrap();
    assert!(log.contains("refused a frontend"), "{log}");
    // The refusal is counted (a was never refused anything: its connect failed earlier).
    assert_eq!(stats(&ctl, "a").vm_counters.refused_peers, 0);
}

#[test]
fn a_panicking_worker_ends_only_its_vms_connection() {
    let ns = ScriptNetns::create("hp");
    let dir = tempdir();
    let (a, b, ctl) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("ctl.sock"));
    let cfg = dir.join("vms.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[vm]]\nname='a'\nsocket='{}'\ntap='vnbhpa'\nmode='off'\n\n[[vm]]\nname='b'\nsocket='{}'\ntap='vnbhpb'\nmode='off'\n",
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    let _p = spawn(
        &ns,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
        ],
        &[("VNB_INJECT_PANIC", "control")],
        &[&a, &b, &ctl],
        &dir.join("d.log"),
    );
    ns.enter();
    let pkt_b = PacketSocket::bind("vnbhpb");
    let (mem_a, mem_b) = (guest_memory(), guest_memory());
    let ga = Guest::setup(Frontend::connect(&a, 2).unwrap(), &mem_a, true);
    let gb = Guest::setup(Frontend::connect(&b, 2).unwrap(), &mem_b, true);
    let raw_a = UnixStream::connect(&a); // queued behind ga: accepted once ga's connection ends
    ga.post_rx(0, 8, 2048);
    // A frame that makes a's worker panic while it holds the VM's batching state.
    ga.send(0, &control_frame(1, Some(b"VNBP")));
    assert!(
        eventually(|| stats(&ctl, "a").vm_counters.panics == 1),
        "no panic counted: {}",
        std::fs::read_to_string(dir.join("d.log")).unwrap_or_default()
    );
    // b never noticed.
    let f = test_frame(9, 200);
    gb.send(0, &f);
    assert!(
        pkt_b.recv_matching(T, |x| x == f.as_slice()).is_some(),
        "b stopped forwarding"
    );
    // a's slot serves its next frontend, and a's control plane answers (its state survived the
    // panic).
    let raw_a = raw_a.unwrap();
    drop(ga);
    drop(raw_a);
    let mem_a2 = guest_memory();
    let ga2 = Guest::setup(Frontend::connect(&a, 2).unwrap(), &mem_a2, true);
    ga2.post_rx(0, 8, 2048);
    ga2.send(0, &control_frame(2, None));
    assert!(
        eventually(|| replies(&ga2)
            .iter()
            .any(|m| m.op == Op::GetReply && m.seq == 2)),
        "a's control plane does not answer after the panic"
    );
    assert_eq!(stats(&ctl, "a").vm_counters.panics, 1);
    assert_eq!(stats(&ctl, "b").vm_counters.panics, 0);
}

#[test]
fn guest_memory_taken_away_ends_only_that_connection() {
    let _ns = Netns::enter("hm");
    let dir = tempdir();
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let slot_a = start_slot("ma", "vnbhma", &a);
    let _slot_b = start_slot("mb", "vnbhmb", &b);
    let pkt_b = PacketSocket::bind("vnbhmb");
    let (file_a, mem_a) = guest_memory_with_file();
    let mem_b = guest_memory();
    let ga = Guest::setup(Frontend::connect(&a, 2).unwrap(), &mem_a, true);
    let gb = Guest::setup(Frontend::connect(&b, 2).unwrap(), &mem_b, true);
    // A chain is posted, then the frontend shrinks its memory file under the backend.
    ga.send_nokick(0, &test_frame(1, 100));
    file_a.set_len(0).unwrap();
    // Nothing of the test's own mapping of a's memory may be touched from here on.
    ga.kick[1].write(1).unwrap();
    assert!(
        eventually(|| slot_a.metrics().memory_faults.load(Relaxed) == 1),
        "the fault was not caught and counted"
    );
    let sock = ga.fe_socket();
    assert!(
        eventually(|| closed_by_peer(&sock)),
        "a's connection was not ended"
    );
    // b forwards as before; a takes a new frontend.
    let f = test_frame(2, 200);
    gb.send(0, &f);
    assert!(pkt_b.recv_matching(T, |x| x == f.as_slice()).is_some());
    std::mem::forget(ga); // its memory is gone: its queues must not be read any more
    let mem_a2 = guest_memory();
    let pkt_a = PacketSocket::bind("vnbhma");
    let ga2 = Guest::setup(Frontend::connect(&a, 2).unwrap(), &mem_a2, true);
    let f = test_frame(3, 200);
    ga2.send(0, &f);
    assert!(pkt_a.recv_matching(T, |x| x == f.as_slice()).is_some());
    assert_eq!(slot_a.metrics().memory_faults.load(Relaxed), 1);
}

#[test]
fn too_many_early_enables_end_the_connection_only() {
    let _ns = Netns::enter("he");
    let dir = tempdir();
    let a = dir.join("a.sock");
    let slot = start_slot("ea", "vnbhea", &a);
    let s = UnixStream::connect(&a).unwrap();
    let enable = |ring: u64| {
        let mut m = Vec::new();
        m.extend_from_slice(&18u32.to_le_bytes()); // SET_VRING_ENABLE
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&8u32.to_le_bytes());
        m.extend_from_slice(&((1u64 << 32) | ring).to_le_bytes());
        m
    };
    for i in 0..vhost_net_batch::shim::MAX_DEFERRED as u64 {
        std::io::Write::write_all(&mut &s, &enable(i % 2)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(!closed_by_peer(&s), "the cap itself is allowed");
    let _ = std::io::Write::write_all(&mut &s, &enable(0));
    assert!(
        eventually(|| closed_by_peer(&s)),
        "one enable over the cap kept the connection"
    );
    // The slot takes the next frontend.
    let mem = guest_memory();
    let pkt = PacketSocket::bind("vnbhea");
    let g = Guest::setup(Frontend::connect(&a, 2).unwrap(), &mem, true);
    let f = test_frame(4, 100);
    g.send(0, &f);
    assert!(pkt.recv_matching(T, |x| x == f.as_slice()).is_some());
    assert_eq!(slot.metrics().connections.load(Relaxed), 2);
}

#[test]
fn a_disabled_tx_ring_stops_its_timer() {
    let _ns = Netns::enter("ht");
    let dir = tempdir();
    let a = dir.join("a.sock");
    let mut cfg = VmConfig::new("ta", &a, "vnbhta", 1, None);
    cfg.mode = Some("fixed:1000".parse().unwrap());
    cfg.rate_floor_pps = Some(0);
    let slot = start_slot_cfg(cfg);
    let mem = guest_memory();
    let mut g = Guest::setup(Frontend::connect(&a, 2).unwrap(), &mem, true);
    // A frame with kicks held arms the TX drain timer, which keeps firing while the ring is
    // busy or idle for fewer than four periods.
    g.send(0, &test_frame(5, 100));
    assert!(eventually(|| g.used(1).len() == 1));
    g.fe.set_vring_enable(1, false).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let fires = || slot.metrics().queues[0].tx_timer_fires.load(Relaxed);
    let before = fires();
    std::thread::sleep(Duration::from_millis(300));
    let after = fires();
    assert!(
        after - before <= 1,
        "a disabled TX ring's timer fired {} times in 300 ms",
        after - before
    );
}

#[test]
fn meter_commands_inherit_no_guest_descriptor() {
    let ns = ScriptNetns::create("hf");
    let dir = tempdir();
    let (a, ctl) = (dir.join("a.sock"), dir.join("ctl.sock"));
    let listing = dir.join("fds.txt");
    let cmd = format!(
        "ls -l /proc/self/fd/ > {}.tmp; mv {0}.tmp {0}; echo 50",
        listing.display()
    );
    let _p = spawn(
        &ns,
        &[
            "--vm",
            "a",
            "--socket",
            a.to_str().unwrap(),
            "--tap",
            "vnbhfa",
            "--control",
            ctl.to_str().unwrap(),
            "--power-source",
            "meter",
            "--power-meter-cmd",
            &cmd,
        ],
        &[],
        &[&a, &ctl],
        &dir.join("a.log"),
    );
    let mem = guest_memory();
    let g = Guest::setup(Frontend::connect(&a, 2).unwrap(), &mem, true);
    g.send(0, &test_frame(6, 100));
    assert!(eventually(|| stats(&ctl, "a").total.tx_packets == 1));
    // The meter runs every 100 ms: a fresh listing taken with the guest's memory mapped.
    let _ = std::fs::remove_file(&listing);
    assert!(eventually(|| listing.exists()));
    let fds = std::fs::read_to_string(&listing).unwrap();
    for bad in ["memfd", "eventfd", "socket:", "/dev/net/tun"] {
        assert!(
            !fds.contains(bad),
            "the meter command inherited {bad}:\n{fds}"
        );
    }
}

#[test]
fn a_hung_meter_never_delays_a_control_reply() {
    let ns = ScriptNetns::create("hh");
    let dir = tempdir();
    let (a, ctl) = (dir.join("a.sock"), dir.join("ctl.sock"));
    let flag = dir.join("hang");
    let cmd = format!("[ -e {} ] && sleep 8; echo 50", flag.display());
    let _p = spawn(
        &ns,
        &[
            "--vm",
            "a",
            "--socket",
            a.to_str().unwrap(),
            "--tap",
            "vnbhha",
            "--control",
            ctl.to_str().unwrap(),
            "--power-source",
            "meter",
            "--power-meter-cmd",
            &cmd,
            "--power-period-ms",
            "200",
        ],
        &[],
        &[&a, &ctl],
        &dir.join("a.log"),
    );
    let mem = guest_memory();
    let g = Guest::setup(Frontend::connect(&a, 2).unwrap(), &mem, true);
    g.post_rx(0, 16, 2048);
    std::fs::write(&flag, b"").unwrap();
    // The sampler and the per-VM meter are now stuck in the command for 8 s.
    std::thread::sleep(Duration::from_millis(600));
    let t = Instant::now();
    g.send(0, &control_frame(7, None));
    let end = Instant::now() + Duration::from_secs(2);
    let reply = loop {
        if let Some(m) = replies(&g).into_iter().find(|m| m.seq == 7) {
            break Some(m);
        }
        if Instant::now() > end {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let waited = t.elapsed();
    let _ = std::fs::remove_file(&flag);
    let reply = reply.expect("no control reply within 2 s while the meter hung");
    assert_eq!(reply.op, Op::GetReply);
    assert!(
        waited < Duration::from_secs(1),
        "the reply waited {waited:?}"
    );
    let _ = g.fe.as_raw_fd();
}

#[test]
fn control_replies_queued_at_disconnect_are_counted() {
    let _ns = Netns::enter("hq");
    let dir = tempdir();
    let a = dir.join("a.sock");
    let slot = start_slot("qa", "vnbhqa", &a);
    let mem = guest_memory();
    let g = Guest::setup(Frontend::connect(&a, 2).unwrap(), &mem, true);
    // No RX buffer: the replies wait in the queue pair's outbox (it holds four).
    for seq in 0..3 {
        g.send(seq, &control_frame(seq, None));
    }
    assert!(
        eventually(|| g.used(1).len() == 3),
        "the control frames were not taken"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(slot.batching().control_counts().replies_lost, 0);
    let sock = g.fe_socket();
    drop(g);
    drop(sock);
    assert!(
        eventually(|| slot.batching().control_counts().replies_lost == 3),
        "replies lost at disconnect: {:?}",
        slot.batching().control_counts()
    );
}

#[test]
fn a_thousand_idle_metrics_connections_block_no_one() {
    let ns = ScriptNetns::create("hx");
    let dir = tempdir();
    let (a, ctl) = (dir.join("a.sock"), dir.join("ctl.sock"));
    let port = 20000 + (std::process::id() % 20000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let p = spawn(
        &ns,
        &[
            "--vm",
            "a",
            "--socket",
            a.to_str().unwrap(),
            "--tap",
            "vnbhxa",
            "--control",
            ctl.to_str().unwrap(),
            "--metrics-addr",
            &addr,
        ],
        &[],
        &[&a, &ctl],
        &dir.join("a.log"),
    );
    ns.enter();
    // This process needs more than the usual 1024 descriptors for the idle connections.
    // SAFETY: reading and raising our own soft limit to the hard one.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max.min(1 << 16);
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    let get = || -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        Some(body)
    };
    assert!(get().unwrap().starts_with("HTTP/1.0 200"));
    let fds_before = vnb_common::procfs::fd_count(p.pid()).unwrap();
    let idle: Vec<std::net::TcpStream> = (0..1000)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    // Some idle ones have sent half a request, too large a one, or garbage.
    for (i, s) in idle.iter().enumerate().take(30) {
        let mut s = s;
        let _ = std::io::Write::write_all(
            &mut s,
            match i % 3 {
                0 => &b"GET /metr"[..],
                1 => &[b'A'; 9000][..],
                _ => &b"\x01\x02\r\n\r\n"[..],
            },
        );
    }
    let t = Instant::now();
    let body = get().expect("no /metrics answer beside 1000 idle connections");
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(body.contains("vnb_tx_packets_total"));
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "/metrics took {:?}",
        t.elapsed()
    );
    let fds = vnb_common::procfs::fd_count(p.pid()).unwrap();
    assert!(
        fds <= fds_before + vhost_net_batch::metrics_endpoint::MAX_CONNECTIONS + 2,
        "the daemon holds {fds} descriptors (was {fds_before})"
    );
    // The VM still takes its frontend, the control socket answers.
    let mem = guest_memory();
    let g = Guest::setup(Frontend::connect(&a, 2).unwrap(), &mem, true);
    g.send(0, &test_frame(8, 100));
    assert!(eventually(|| stats(&ctl, "a").total.tx_packets == 1));
    drop(idle);
}

#[test]
fn a_hundred_reconnects_leave_descriptors_threads_and_memory_flat() {
    let ns = ScriptNetns::create("hr");
    let dir = tempdir();
    let (a, ctl) = (dir.join("a.sock"), dir.join("ctl.sock"));
    let p = spawn(
        &ns,
        &[
            "--vm",
            "a",
            "--socket",
            a.to_str().unwrap(),
            "--tap",
            "vnbhra",
            "--queues",
            "2",
            "--control",
            ctl.to_str().unwrap(),
        ],
        &[],
        &[&a, &ctl],
        &dir.join("a.log"),
    );
    let mem = guest_memory();
    let pid = p.pid();
    let threads = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .count()
    };
    let fds = || vnb_common::procfs::fd_count(pid).unwrap();
    let rss = || vnb_common::procfs::rss_kib(pid).unwrap();
    let mut sent = 0;
    let mut cycle = |seq: u8| {
        let g = Guest::setup(Frontend::connect(&a, 2).unwrap(), &mem, true);
        g.send(0, &test_frame(seq, 100));
        sent += 1;
        assert!(
            eventually(|| stats(&ctl, "a").total.tx_packets == sent),
            "cycle {seq}: no traffic"
        );
        drop(g);
    };
    // Let each connection's teardown finish before reading the figures.
    let settled = |n: u64| {
        assert!(eventually(|| stats(&ctl, "a").connections == n));
        std::thread::sleep(Duration::from_millis(200));
    };
    for i in 0..10 {
        cycle(i);
    }
    settled(10);
    let (fd0, th0, rss0) = (fds(), threads(), rss());
    let mut samples = vec![rss0];
    for i in 10..110u8 {
        cycle(i);
        if i % 20 == 9 {
            settled(u64::from(i) + 1);
            samples.push(rss());
        }
    }
    settled(110);
    let (fd1, th1, rss1) = (fds(), threads(), rss());
    println!(
        "100 reconnects: fds {fd0} -> {fd1}, threads {th0} -> {th1}, RSS KiB {samples:?} -> {rss1}"
    );
    assert_eq!(fd1, fd0, "descriptors leaked over 100 connections");
    assert_eq!(th1, th0, "threads leaked over 100 connections");
    assert!(
        rss1 <= rss0 + 2048,
        "RSS grew by {} KiB over 100 connections: {samples:?}",
        rss1.saturating_sub(rss0)
    );
}

/// The rings of a guest that keeps them full of chains which each point at a 65,535-entry
/// indirect table of zero-length descriptors: the most descriptor reads one avail entry can
/// cost. A refiller thread makes every completed entry available again at once and kicks.
struct ChainFlood<'a> {
    mem: &'a vm_memory::GuestMemoryMmap<()>,
    rings: Vec<(u64, u64, vmm_sys_util::eventfd::EventFd)>,
}

impl<'a> ChainFlood<'a> {
    const ENTRIES: u32 = 65_535;

    fn arm(g: &Guest<'a>) -> Self {
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use vm_memory::{Bytes, GuestAddress};
        let mut rings = Vec::new();
        for (i, q) in [&g.rx, &g.tx].into_iter().enumerate() {
            // RX chains must be device-writable to get past the direction check.
            let (table, flags) = if i == 0 {
                (0xA0_0000u64, 1u16 | 2)
            } else {
                (0xB0_0000u64, 1u16)
            };
            let mut t = Vec::with_capacity(16 * Self::ENTRIES as usize);
            for k in 0..Self::ENTRIES {
                let last = k + 1 == Self::ENTRIES;
                let f = if last { flags & !1 } else { flags };
                t.extend_from_slice(&0u64.to_le_bytes());
                t.extend_from_slice(&0u32.to_le_bytes());
                t.extend_from_slice(&f.to_le_bytes());
                t.extend_from_slice(&((k + 1) as u16).to_le_bytes());
            }
            g.mem.write_slice(&t, GuestAddress(table)).unwrap();
            for d in 0..QSIZE {
                let desc =
                    RawDescriptor::from(SplitDescriptor::new(table, 16 * Self::ENTRIES, 4, 0));
                q.desc_table().store(d, desc).unwrap();
            }
            rings.push((
                q.avail_addr().0,
                g.used_ring(i).0,
                g.kick[i].try_clone().unwrap(),
            ));
        }
        ChainFlood { mem: g.mem, rings }
    }

    /// Keeps both rings full until `stop`; returns the avail entries published.
    fn run(&self, stop: &std::sync::atomic::AtomicBool) -> u64 {
        use std::sync::atomic::Ordering::{Acquire, Release};
        use vm_memory::{Bytes, GuestAddress};
        let mut published = 0u64;
        while !stop.load(Relaxed) {
            for (avail, used, kick) in &self.rings {
                // Atomic loads: a byte-wise copy could see the device's index torn (255 -> 256
                // read as 0) and make the ring go backwards.
                let used_idx: u16 = self.mem.load(GuestAddress(used + 2), Acquire).unwrap();
                let avail_idx: u16 = self.mem.load(GuestAddress(avail + 2), Acquire).unwrap();
                let target = used_idx.wrapping_add(QSIZE);
                if avail_idx == target {
                    continue;
                }
                let mut k = avail_idx;
                while k != target {
                    let slot = u64::from(k % QSIZE);
                    self.mem
                        .write_obj(0u16, GuestAddress(avail + 4 + 2 * slot))
                        .unwrap();
                    k = k.wrapping_add(1);
                    published += 1;
                }
                self.mem
                    .store(target, GuestAddress(avail + 2), Release)
                    .unwrap();
                let _ = kick.write(1);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        published
    }
}

#[test]
fn a_guest_flooding_its_rings_with_huge_chains_holds_no_worker() {
    let _ns = Netns::enter("hc");
    let dir = tempdir();
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let slot_a = start_slot("ca", "vnbhca", &a);
    let _slot_b = start_slot("cb", "vnbhcb", &b);
    let pkt_a = PacketSocket::bind("vnbhca");
    let pkt_b = PacketSocket::bind("vnbhcb");
    let mem_a = guest_memory();
    let mem_b = guest_memory();
    let indirect = 1u64 << 28;
    let ga = Guest::setup_features(
        Frontend::connect(&a, 2).unwrap(),
        &mem_a,
        true,
        test_features() | indirect,
    );
    let gb = Guest::setup(Frontend::connect(&b, 2).unwrap(), &mem_b, true);
    let flood = ChainFlood::arm(&ga);
    let stop = std::sync::atomic::AtomicBool::new(false);
    // The frontend moves to a thread of its own for GET_VRING_BASE: a backend that never
    // answers must fail the test, not hang it.
    let Guest { fe, .. } = ga;
    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if go_rx.recv().is_ok() {
            let r = (fe.get_vring_base(0), fe.get_vring_base(1));
            let _ = stop_tx.send(r.0.is_ok() && r.1.is_ok());
        }
        // Dropping the frontend here ends the connection.
    });
    let (published, stop_ms, neighbour_ms) = std::thread::scope(|sc| {
        let refiller = sc.spawn(|| flood.run(&stop));
        // However this closure ends (a failed assertion too), the refiller stops, or the scope
        // would wait for it forever.
        struct StopOnDrop<'s>(&'s std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        // Frames for a's RX ring, so its RX path has reason to run too.
        for i in 0..20 {
            pkt_a.send(&test_frame(i, 100));
        }
        std::thread::sleep(Duration::from_millis(1500));
        // The neighbour forwards while a's workers are busy.
        let t0 = Instant::now();
        for i in 0..20u8 {
            let f = test_frame(i, 300);
            gb.send(u16::from(i), &f);
            assert!(
                pkt_b.recv_matching(T, |x| x == f.as_slice()).is_some(),
                "the neighbour's frame {i} did not get through"
            );
        }
        let neighbour_ms = t0.elapsed().as_millis();
        // Stopping a's rings (what QEMU does before a migration or at shutdown) is answered
        // within one budgeted step, not after the guest stops posting.
        let t0 = Instant::now();
        go_tx.send(()).unwrap();
        let answered = stop_rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("GET_VRING_BASE not answered within 5 s"));
        assert!(answered, "GET_VRING_BASE failed");
        let stop_ms = t0.elapsed().as_millis();
        stop.store(true, Relaxed);
        (refiller.join().unwrap(), stop_ms, neighbour_ms)
    });
    let m = slot_a.metrics();
    let q = m.total();
    println!(
        "published {published} flooded entries; bad chains rx {} tx {}; rings stopped in {stop_ms} ms; neighbour's 20 frames in {neighbour_ms} ms",
        q.rx_bad_chains, q.tx_bad_chains
    );
    assert!(
        q.rx_bad_chains > 0 && q.tx_bad_chains > 0,
        "the flood never reached the data path: {q:?}"
    );
    assert!(stop_ms < 1000, "stopping the rings took {stop_ms} ms");
    assert!(
        neighbour_ms < 5000,
        "the neighbour's 20 frames took {neighbour_ms} ms"
    );
    // The flood made the log budget suppress lines instead of writing one per chain.
    assert!(m.log.suppressed() > 0, "no log line was suppressed");
    // Disconnecting is prompt too, and the slot serves the next frontend.
    drop(flood);
    let mem_a2 = guest_memory();
    let t0 = Instant::now();
    let ga2 = Guest::setup(Frontend::connect(&a, 2).unwrap(), &mem_a2, true);
    let f = test_frame(9, 200);
    ga2.send(0, &f);
    assert!(pkt_a.recv_matching(T, |x| x == f.as_slice()).is_some());
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "reconnecting took {:?}",
        t0.elapsed()
    );
}
