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
