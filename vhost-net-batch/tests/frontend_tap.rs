//! In-process integration: the `vhost` crate's `Frontend` with memfd guest memory drives the
//! backend over a real Unix socket; frames move to and from a real tap in a private netns.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use vhost::vhost_user::Frontend;
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(5);

#[test]
fn frames_flow_both_ways_and_bad_chains_are_counted() {
    let _ns = Netns::enter("fe");
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let slot = start_slot("fe", "vnbfe0", &sock);
    let pkt = PacketSocket::bind("vnbfe0");
    let mem = guest_memory();
    let g = Guest::setup(Frontend::connect(&sock, 2).unwrap(), &mem, true);

    // Guest -> tap.
    let f = test_frame(1, 200);
    g.send(0, &f);
    let got = pkt.recv_matching(T, |b| b == f.as_slice());
    assert!(
        got.is_some(),
        "frame sent by the guest did not reach the tap"
    );
    assert_eq!(g.wait_used(1, 1, T), vec![(0, 0)]);

    // Tap -> guest.
    g.post_rx(0, 4, 2048);
    std::thread::sleep(Duration::from_millis(100));
    let r = test_frame(2, 300);
    pkt.send(&r);
    // The kernel may send its own frames (IPv6 neighbour discovery) into the tap too: find ours.
    let end = Instant::now() + T;
    let found = loop {
        let hit = g.used(0).into_iter().find(|&(id, len)| {
            len as usize == 12 + r.len() && g.rx_buf(id as u16, len as usize)[12..] == r[..]
        });
        if hit.is_some() || Instant::now() > end {
            break hit;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (id, _) = found.expect("frame sent into the tap did not reach the guest");
    let buf = g.rx_buf(id as u16, 12 + 300);
    assert_eq!(u16::from_le_bytes([buf[10], buf[11]]), 1, "num_buffers");
    assert!(
        g.call[0].read().unwrap() >= 1,
        "the guest got an RX interrupt"
    );

    // A TX chain pointing outside guest memory: completed with length 0 and counted.
    g.tx.add_desc_chains(&[desc(MEM_SIZE as u64 + 4096, 100, 0, 0)], 1)
        .unwrap();
    g.kick[1].write(1).unwrap();
    assert_eq!(g.wait_used(1, 2, T), vec![(0, 0), (1, 0)]);
    let m = &slot.metrics().queues[0];
    assert_eq!(m.tx_bad_chains.load(Relaxed), 1);
    assert_eq!(m.tx_packets.load(Relaxed), 1);
    assert!(m.rx_packets.load(Relaxed) >= 1);
    // The backend still serves: another frame goes through.
    let f3 = test_frame(3, 64);
    g.send(2, &f3);
    assert!(pkt.recv_matching(T, |b| b == f3.as_slice()).is_some());
    let _ = mem.read_obj::<u8>(GuestAddress(0));
}

#[test]
fn twenty_reconnects_leak_no_fds_or_threads() {
    let _ns = Netns::enter("rc");
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let slot = start_slot("rc", "vnbrc0", &sock);
    let pkt = PacketSocket::bind("vnbrc0");
    let mem = guest_memory();
    // One warm-up cycle so lazily created process-wide state exists before counting.
    let cycle = |i: u8| {
        let g = Guest::setup(Frontend::connect(&sock, 2).unwrap(), &mem, true);
        let f = test_frame(i, 100);
        g.send(0, &f);
        assert!(
            pkt.recv_matching(T, |b| b == f.as_slice()).is_some(),
            "cycle {i}: no traffic"
        );
        drop(g);
    };
    let settle = |want: u64| {
        let end = Instant::now() + T;
        while slot.metrics().connections.load(Relaxed) < want && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Wait for the slot to finish tearing the connection down (accept again).
        std::thread::sleep(Duration::from_millis(200));
    };
    cycle(0);
    settle(1);
    let fds = fd_count();
    let threads = thread_count();
    for i in 1..=20u8 {
        cycle(i);
    }
    settle(21);
    let end = Instant::now() + T;
    while (fd_count() > fds || thread_count() > threads) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(slot.metrics().connections.load(Relaxed), 21);
    assert_eq!(fd_count(), fds, "descriptors leaked over 20 connections");
    assert_eq!(
        thread_count(),
        threads,
        "threads leaked over 20 connections"
    );
    // The socket is still served.
    assert!(UnixStream::connect(&sock).is_ok());
}

/// An IPv4/UDP frame from `sport`, tagged so the test can find it among the kernel's own frames.
fn udp_frame(sport: u16) -> Vec<u8> {
    let mut f = vec![
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc,
    ];
    f.extend_from_slice(&[0x08, 0x00]);
    let payload = format!("vnb-mq-{sport:05}");
    let total = (20 + 8 + payload.len()) as u16;
    f.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[10, 77, 9, 1, 10, 77, 9, 2]);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload.as_bytes());
    f
}

#[test]
fn flows_for_a_pair_the_guest_did_not_enable_reach_the_enabled_one() {
    // A two-pair device whose guest enables only pair 0 (a one-vCPU Linux guest does exactly
    // that): the kernel must not hash any flow to the tap queue of pair 1, which nobody reads.
    let _ns = Netns::enter("mq");
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let slot = start_slot_mq("mq", "vnbmq0", &sock, 2);
    let pkt = PacketSocket::bind("vnbmq0");
    let mem = guest_memory();
    let g = Guest::setup(Frontend::connect(&sock, 4).unwrap(), &mem, true);
    g.post_rx(0, 128, 2048);
    std::thread::sleep(Duration::from_millis(100));
    let frames: Vec<Vec<u8>> = (0..32u16).map(|i| udp_frame(20_000 + 97 * i)).collect();
    for f in &frames {
        pkt.send(f);
    }
    let end = Instant::now() + T;
    let missing = loop {
        let got: Vec<Vec<u8>> = g
            .used(0)
            .into_iter()
            .map(|(id, len)| g.rx_buf(id as u16, len as usize)[12..].to_vec())
            .collect();
        let missing = frames.iter().filter(|f| !got.contains(f)).count();
        if missing == 0 || Instant::now() > end {
            break missing;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        missing, 0,
        "{missing} of 32 flows never reached the enabled queue pair (hashed to a detached one?)"
    );
    assert_eq!(slot.metrics().queues[1].rx_packets.load(Relaxed), 0);
}
