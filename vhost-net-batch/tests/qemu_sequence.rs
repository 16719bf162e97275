//! Replays the exact connect sequences stock QEMU 7.2 and 10.0 send (recorded, in
//! `tests/fixtures/`) through a real Unix socket: the early `SET_VRING_ENABLE`, before
//! `SET_FEATURES`, must be acknowledged when asked and must not cost the connection; the device
//! must then start and move traffic.

mod common;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Frontend;
use vhost_net_batch::shim::{
    recv_message, send_message, Message, FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION,
};

fn code(name: &str) -> u32 {
    match name {
        "GET_FEATURES" => 1,
        "SET_FEATURES" => 2,
        "SET_OWNER" => 3,
        "SET_VRING_CALL" => 13,
        "SET_VRING_ERR" => 14,
        "GET_PROTOCOL_FEATURES" => 15,
        "SET_PROTOCOL_FEATURES" => 16,
        "GET_QUEUE_NUM" => 17,
        "SET_VRING_ENABLE" => 18,
        "SEND_RARP" => 19,
        "GET_MAX_MEM_SLOTS" => 36,
        other => panic!("fixture names an unknown request {other}"),
    }
}

fn parse_u64(s: &str) -> u64 {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap(),
        None => s.parse().unwrap(),
    }
}

/// A raw vhost-user connection to `sock`, replies awaited at most 5 s.
fn raw_connect(sock: &std::path::Path) -> UnixStream {
    let stream = UnixStream::connect(sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

/// Sends one message (`flags` besides the version flag).
fn send_raw(stream: &UnixStream, request: u32, flags: u32, payload: Vec<u8>, fds: Vec<OwnedFd>) {
    send_message(
        stream,
        &Message {
            request,
            flags: FLAG_VERSION | flags,
            payload,
            fds,
        },
    )
    .unwrap();
}

/// `tag` must be unique per test: it names the test's namespace and tap.
fn replay(tag: &str, fixture: &str, queues: u16) {
    let _ns = Netns::enter(tag);
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let tap = format!("vnb{tag}");
    let _slot = start_slot_mq("sq", &tap, &sock, queues);
    let pkt = PacketSocket::bind(&tap);
    let stream = raw_connect(&sock);
    let mut early_enables = 0;
    for line in fixture
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        let request = code(words[0]);
        let need_reply = words.contains(&"need_reply");
        let payload = words
            .get(1)
            .filter(|w| **w != "fd" && **w != "need_reply")
            .map(|w| parse_u64(w).to_le_bytes().to_vec())
            .unwrap_or_default();
        let fds: Vec<OwnedFd> = if words.contains(&"fd") {
            {
                // SAFETY: eventfd(2) returns a new descriptor we own.
                let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
                assert!(fd >= 0);
                // SAFETY: as above.
                vec![unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }]
            }
        } else {
            vec![]
        };
        let flags = if need_reply { FLAG_NEED_REPLY } else { 0 };
        send_raw(&stream, request, flags, payload, fds);
        if request == 18 {
            early_enables += 1;
        }
        let is_get = matches!(request, 1 | 15 | 17 | 36);
        if is_get || need_reply {
            let reply = recv_message(&stream)
                .unwrap_or_else(|e| panic!("{line}: no reply: {e}"))
                .unwrap_or_else(|| panic!("{line}: backend closed the connection"));
            assert_eq!(reply.request, request, "{line}: reply to another request");
            assert_ne!(reply.flags & FLAG_REPLY, 0, "{line}: reply flag");
            if need_reply {
                assert_eq!(
                    reply.payload_u64(),
                    Some(0),
                    "{line}: ack must report success"
                );
            }
            if request == 17 {
                assert_eq!(
                    reply.payload_u64(),
                    Some(2 * queues as u64),
                    "GET_QUEUE_NUM"
                );
            }
        }
    }
    assert!(
        early_enables > 0,
        "the fixture has the early SET_VRING_ENABLE"
    );
    // The connection survived; the guest driver now starts the device.
    let mem = guest_memory();
    // No SET_VRING_ENABLE of our own: pair 0 must be enabled by the early enables the shim
    // deferred and replayed after SET_FEATURES (lose them and neither direction moves).
    let g = Guest::setup_opts(
        Frontend::from_stream(stream, 2 * queues as u64),
        &mem,
        false,
        test_features(),
        false,
    );
    let f = test_frame(7, 120);
    g.send(0, &f);
    assert!(
        pkt.recv_matching(Duration::from_secs(5), |b| b == f.as_slice())
            .is_some(),
        "no guest->tap traffic after the QEMU connect sequence (deferred enable lost?)"
    );
    g.post_rx(0, 8, 2048);
    std::thread::sleep(Duration::from_millis(50));
    let r = test_frame(8, 150);
    pkt.send(&r);
    let end = std::time::Instant::now() + Duration::from_secs(5);
    let delivered = loop {
        let hit = g.used(0).into_iter().any(|(id, len)| {
            len as usize == 12 + r.len() && g.rx_buf(id as u16, len as usize)[12..] == r[..]
        });
        if hit || std::time::Instant::now() > end {
            break hit;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        delivered,
        "no tap->guest traffic after the QEMU connect sequence (deferred enable lost?)"
    );
}

#[test]
fn qemu_7_2_single_queue() {
    replay("q72s", include_str!("fixtures/qemu-7.2-q1.txt"), 1);
}

#[test]
fn qemu_7_2_multiqueue() {
    replay("q72m", include_str!("fixtures/qemu-7.2-q2.txt"), 2);
}

#[test]
fn qemu_10_0_single_queue() {
    replay("q10s", include_str!("fixtures/qemu-10.0-q1.txt"), 1);
}

#[test]
fn qemu_10_0_multiqueue() {
    replay("q10m", include_str!("fixtures/qemu-10.0-q2.txt"), 2);
}

/// What a migration's destination QEMU sends once the guest runs there, for a guest without
/// `GUEST_ANNOUNCE`: `SEND_RARP` with the guest's MAC. The backend offers the `RARP` protocol
/// feature, broadcasts the announcement on the tap and acks it; a payload too short to hold a
/// MAC is refused (ack 1) and the connection goes on.
#[test]
fn send_rarp_announces_the_guest_on_the_tap() {
    let _ns = Netns::enter("rarp");
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let slot = start_slot("rp", "vnbrarp", &sock);
    let pkt = PacketSocket::bind("vnbrarp");
    let stream = raw_connect(&sock);
    let ask = |request: u32, flags: u32, payload: Vec<u8>| {
        send_raw(&stream, request, flags, payload, vec![]);
        let reply = recv_message(&stream).unwrap().expect("connection closed");
        assert_eq!(reply.request, request);
        assert_ne!(reply.flags & FLAG_REPLY, 0);
        reply.payload_u64().unwrap()
    };
    let rarp = VhostUserProtocolFeatures::RARP.bits();
    let proto = ask(code("GET_PROTOCOL_FEATURES"), 0, vec![]);
    assert_ne!(proto & rarp, 0, "the RARP protocol feature is offered");
    send_raw(
        &stream,
        code("SET_PROTOCOL_FEATURES"),
        0,
        (VhostUserProtocolFeatures::REPLY_ACK.bits() | rarp)
            .to_le_bytes()
            .to_vec(),
        vec![],
    );
    let mac = slot.config().mac().0;
    let payload = |m: [u8; 6]| [&m[..], &[0, 0]].concat();
    assert_eq!(
        ask(code("SEND_RARP"), FLAG_NEED_REPLY, payload(mac)),
        0,
        "SEND_RARP acked as done"
    );
    let frame = vhost_net_batch::announce::rarp_frame(mac);
    assert!(
        pkt.recv_matching(Duration::from_secs(5), |b| b == frame.as_slice())
            .is_some(),
        "no RARP announcement from {mac:02x?} on the tap"
    );
    assert_eq!(slot.metrics().vm_counters().announcements, 1);
    // A payload without a MAC, or another MAC than the VM's (it would steer someone else's
    // traffic to this tap): refused, nothing sent, the connection stays.
    assert_eq!(ask(code("SEND_RARP"), FLAG_NEED_REPLY, vec![1, 2]), 1);
    let mut other = mac;
    other[5] ^= 1;
    assert_eq!(ask(code("SEND_RARP"), FLAG_NEED_REPLY, payload(other)), 1);
    let stray = vhost_net_batch::announce::rarp_frame(other);
    assert!(
        pkt.recv_matching(Duration::from_millis(300), |b| b == stray.as_slice())
            .is_none(),
        "a foreign MAC was announced"
    );
    assert_ne!(ask(code("GET_FEATURES"), 0, vec![]), 0);
    let c = slot.metrics().vm_counters();
    assert_eq!((c.announcements, c.announcements_refused), (1, 2));
    // At most ANNOUNCE_PER_S a second: a flood of three seconds' worth, sent in far less than
    // a second (it may straddle one window boundary), is cut to at most two windows' worth.
    let per_s = vhost_net_batch::announce::ANNOUNCE_PER_S;
    let t = std::time::Instant::now();
    let acks: Vec<u64> = (0..3 * per_s)
        .map(|_| ask(code("SEND_RARP"), FLAG_NEED_REPLY, payload(mac)))
        .collect();
    let took = t.elapsed();
    let sent = acks.iter().filter(|&&a| a == 0).count() as u64;
    assert!(
        took >= Duration::from_secs(1) || sent < 2 * per_s,
        "{sent} of {} announcements went out in {took:?}",
        acks.len()
    );
    let c = slot.metrics().vm_counters();
    assert_eq!(
        c.announcements + c.announcements_refused,
        3 + acks.len() as u64
    );
}

/// Every `SET_VRING_CALL` with an eventfd gets one interrupt at once (as libvhost-user does
/// after a reconnect): completions a previous backend, or a previous descriptor, left
/// unsignalled are what the guest may be waiting for.
#[test]
fn each_new_call_eventfd_is_signalled_once() {
    let _ns = Netns::enter("callfd");
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let _slot = start_slot("cf", "vnbcallfd", &sock);
    let stream = raw_connect(&sock);
    let send = |request: u32, payload: Option<u64>, fds: Vec<OwnedFd>| {
        let payload = payload.map(|v| v.to_le_bytes().to_vec());
        send_raw(&stream, request, 0, payload.unwrap_or_default(), fds);
    };
    send(code("GET_FEATURES"), None, vec![]);
    recv_message(&stream).unwrap().expect("reply");
    send(code("SET_OWNER"), None, vec![]);
    for ring in [0u64, 1] {
        // SAFETY: eventfd(2) returns a new descriptor we own.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(efd >= 0);
        // SAFETY: `efd` is ours; the dup is sent and closed with the message.
        let (ours, sent) = unsafe {
            (
                <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(efd),
                <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(libc::dup(efd)),
            )
        };
        send(code("SET_VRING_CALL"), Some(ring), vec![sent]);
        let end = std::time::Instant::now() + Duration::from_secs(5);
        let count = loop {
            let mut v = [0u8; 8];
            // SAFETY: reads 8 bytes into a live buffer from our non-blocking eventfd.
            let n = unsafe {
                libc::read(
                    std::os::fd::AsRawFd::as_raw_fd(&ours),
                    v.as_mut_ptr().cast(),
                    8,
                )
            };
            if n == 8 {
                break u64::from_ne_bytes(v);
            }
            assert!(
                std::time::Instant::now() < end,
                "ring {ring}: the new call eventfd was never signalled"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(count, 1, "ring {ring}: one interrupt per new call eventfd");
        std::thread::sleep(Duration::from_millis(100));
        let mut v = [0u8; 8];
        // SAFETY: as above.
        let n = unsafe {
            libc::read(
                std::os::fd::AsRawFd::as_raw_fd(&ours),
                v.as_mut_ptr().cast(),
                8,
            )
        };
        assert!(n < 0, "ring {ring}: a second interrupt without completions");
    }
}
