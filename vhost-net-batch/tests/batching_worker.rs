//! The batching mechanism in the real queue workers: the `vhost` crate's `Frontend` drives the
//! device over its socket, rings are `virtio_queue::mock` rings in memfd guest memory, frames go
//! through a real tap in a private netns. Delays are long (100 ms) so the assertions are about
//! what happens, never about how fast; the operator interfaces (control socket, metrics) are
//! exercised on the same device.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use vhost::vhost_user::Frontend;
use vhost_net_batch::config::VmConfig;
use vhost_net_batch::control_socket::{
    request, serve_control, ListReply, Request, StatsReply, Vms,
};
use vhost_net_batch::metrics::QueueStats;
use vhost_net_batch::policy::ModeKind;
use vhost_net_batch::prometheus::{render_metrics, serve_metrics};
use vm_memory::Bytes;

const T: Duration = Duration::from_secs(5);

fn cfg(name: &str, tap: &str, sock: &Path, mode: &str) -> VmConfig {
    let mut c = VmConfig::new(name, sock, tap, 1, None);
    c.mode = Some(mode.parse().unwrap());
    c.rate_floor_pps = Some(0);
    c
}

/// Sends `n` frames into the tap and waits until the guest's RX ring holds `n` of them.
fn tap_to_guest(g: &Guest, pkt: &PacketSocket, seq0: u8, n: usize) {
    let frames: Vec<_> = (0..n)
        .map(|k| test_frame(seq0.wrapping_add(k as u8), 100))
        .collect();
    let before = g.used(0).len();
    for f in &frames {
        pkt.send(f);
    }
    let end = Instant::now() + T;
    loop {
        let ours = g.used(0)[before..]
            .iter()
            .filter(|&&(id, len)| {
                len as usize == 12 + 100
                    && frames
                        .iter()
                        .any(|f| g.rx_buf(id as u16, len as usize)[12..] == f[..])
            })
            .count();
        if ours >= n {
            return;
        }
        assert!(
            Instant::now() < end,
            "only {ours} of {n} frames reached the guest"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Loopback up, and no IPv6 on new interfaces: the kernel's own neighbour discovery frames
/// would otherwise add completions (and interrupts) the assertions do not expect.
fn quiet_netns() {
    run_ok(std::process::Command::new("ip").args(["link", "set", "lo", "up"]));
    run_ok(std::process::Command::new("sysctl").args([
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ]));
}

/// Interrupts signalled on queue `q` since the last call (the eventfd counter).
fn calls(g: &Guest, q: usize) -> u64 {
    g.call[q].read().unwrap_or(0)
}

/// Runs `test` against a VM slot in `mode` on tap `vnb{tag}0`, in a network namespace of its
/// own: a packet socket on the tap, a frontend with 128 RX buffers posted and its RX interrupt
/// count read to zero, and the slot's queue counters.
fn with_rx_guest(tag: &str, mode: &str, test: impl FnOnce(&Guest, &PacketSocket, &QueueStats)) {
    let _ns = Netns::enter(tag);
    quiet_netns();
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let tap = format!("vnb{tag}0");
    let slot = start_slot_cfg(cfg(tag, &tap, &sock, mode));
    let pkt = PacketSocket::bind(&tap);
    let mem = guest_memory();
    let g = Guest::setup(Frontend::connect(&sock, 2).unwrap(), &mem, true);
    g.post_rx(0, 128, 2048);
    std::thread::sleep(Duration::from_millis(200));
    let _ = calls(&g, 0);
    test(&g, &pkt, &slot.metrics().queues[0]);
}

#[test]
fn rx_interrupts_are_deferred_coalesced_and_flushed_by_the_valves() {
    with_rx_guest("bw", "fixed:100000", rx_valves);
}

fn rx_valves(g: &Guest, pkt: &PacketSocket, st: &QueueStats) {
    let fires0 = st.rx_timer_fires.load(Relaxed);

    // 10 frames, then traffic stops: completed at once, one interrupt after the 100 ms timer
    // for all of them, nothing left unsignalled.
    tap_to_guest(g, pkt, 1, 10);
    assert_eq!(
        calls(g, 0),
        0,
        "RX interrupt not deferred (the timer is 100 ms; the frames were just completed)"
    );
    let end = Instant::now() + T;
    let n = loop {
        let n = calls(g, 0);
        if n > 0 || Instant::now() > end {
            break n;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(n, 1, "one coalesced interrupt for the batch");
    assert!(st.rx_timer_fires.load(Relaxed) > fires0);
    let hist = st.rx_batches.snapshot();
    assert!(
        hist.sum >= 10 && hist.buckets[..4].iter().sum::<u64>() < hist.count(),
        "the batch of >= 10 packets is in the histogram: {hist:?}"
    );

    // 70 frames: the frame cap (64) flushes before the timer.
    let cap0 = st.rx_flush_frame_cap.load(Relaxed);
    tap_to_guest(g, pkt, 20, 70);
    assert!(
        st.rx_flush_frame_cap.load(Relaxed) > cap0,
        "frame cap valve did not fire"
    );
    assert!(calls(g, 0) >= 1, "frame-cap flush signalled");

    // Few RX buffers left (< 25 % of the ring): the low-water valve flushes at once.
    std::thread::sleep(Duration::from_millis(300));
    let _ = calls(g, 0);
    let lw0 = st.rx_flush_low_water.load(Relaxed);
    let free = 128 - g.used(0).len();
    assert!(free * 100 < 256 * 25, "test set-up: {free} buffers left");
    tap_to_guest(g, pkt, 100, 1);
    assert!(
        st.rx_flush_low_water.load(Relaxed) > lw0,
        "low-water valve did not fire with {free} buffers left"
    );
    assert_eq!(calls(g, 0), 1, "low-water flush signalled at once");
}

#[test]
fn a_polling_guest_gets_its_frames_without_an_rx_timer() {
    with_rx_guest("bp", "fixed:100000", polling_guest);
}

fn polling_guest(g: &Guest, pkt: &PacketSocket, st: &QueueStats) {
    let fires0 = st.rx_timer_fires.load(Relaxed);
    // The guest polls: VRING_AVAIL_F_NO_INTERRUPT (no EVENT_IDX here). Nothing to hold back,
    // so no 100 ms timer is armed for these frames, and no interrupt is sent.
    g.mem.write_obj(1u16, g.rx.avail_addr()).unwrap();
    tap_to_guest(g, pkt, 1, 10);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        st.rx_timer_fires.load(Relaxed),
        fires0,
        "an RX timer ran for a guest that asked for no interrupt"
    );
    assert_eq!(calls(g, 0), 0, "an interrupt the guest did not ask for");
    // Interrupts on again: the delay applies (one interrupt, after the timer).
    g.mem.write_obj(0u16, g.rx.avail_addr()).unwrap();
    tap_to_guest(g, pkt, 20, 10);
    assert_eq!(calls(g, 0), 0, "RX interrupt not deferred");
    assert!(eventually(|| st.rx_timer_fires.load(Relaxed) > fires0));
    assert!(
        eventually(|| calls(g, 0) == 1),
        "one interrupt after the timer"
    );
}

#[test]
fn tx_kicks_are_held_the_ring_drained_on_the_timer_and_kicks_come_back_when_idle() {
    let _ns = Netns::enter("bt");
    quiet_netns();
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let slot = start_slot_cfg(cfg("bt", "vnbbt0", &sock, "fixed:100000"));
    let pkt = PacketSocket::bind("vnbbt0");
    let mem = guest_memory();
    let g = Guest::setup(Frontend::connect(&sock, 2).unwrap(), &mem, true);
    let st = &slot.metrics().queues[0];

    // The first frame comes with a kick and goes out at once; then kicks are held.
    std::thread::sleep(Duration::from_millis(100));
    let kicks0 = st.tx_kicks.load(Relaxed);
    let f0 = test_frame(1, 200);
    g.send(0, &f0);
    assert!(pkt.recv_matching(T, |b| b == f0.as_slice()).is_some());
    assert_eq!(g.wait_used(1, 1, T).len(), 1);
    assert_eq!(
        g.used_flags(1) & 1,
        1,
        "VRING_USED_F_NO_NOTIFY set while buffering"
    );
    // Take the first frame's interrupt out of the way, so the check below is about the five
    // completions drained by the timer.
    std::thread::sleep(Duration::from_millis(50));
    let _ = calls(&g, 1);

    // The guest queues more without kicking (as a driver honouring NO_NOTIFY does). They are
    // not sent at once but when the TX timer fires.
    let frames: Vec<_> = (0..5).map(|k| test_frame(10 + k, 300)).collect();
    for (k, f) in frames.iter().enumerate() {
        g.send_nokick(1 + k as u16, f);
    }
    let fires0 = st.tx_timer_fires.load(Relaxed);
    for f in &frames {
        assert!(
            pkt.recv_matching(T, |b| b == f.as_slice()).is_some(),
            "a frame queued without a kick was never drained"
        );
    }
    assert_eq!(g.wait_used(1, 6, T).len(), 6);
    assert!(
        st.tx_timer_fires.load(Relaxed) > fires0,
        "drained by the timer"
    );
    assert_eq!(
        st.tx_kicks.load(Relaxed) - kicks0,
        1,
        "one kick for six frames"
    );
    let tx_hist = st.tx_batches.snapshot();
    assert!(tx_hist.sum >= 6, "{tx_hist:?}");

    // The ring stays idle: kicks come back, and the completions were all signalled.
    let end = Instant::now() + T;
    while g.used_flags(1) & 1 != 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(g.used_flags(1) & 1, 0, "kicks re-enabled on an idle ring");
    assert!(
        calls(&g, 1) >= 1,
        "the timer-drained TX completions were never signalled"
    );

    // Operator switches the VM off at run time: the next frame goes out on its kick, with
    // no hold afterwards.
    let ctl = dir.join("ctl.sock");
    serve_control(&ctl, Vms(vec![slot.clone()])).unwrap();
    let r: StatsReply = request(
        &ctl,
        &Request::Set {
            vm: "bt".into(),
            mode: Some("off".parse().unwrap()),
            budget_us: None,
        },
    )
    .unwrap();
    assert_eq!(r.mode, ModeKind::Off, "{r:?}");
    let f = test_frame(40, 100);
    g.send(6, &f);
    assert!(pkt.recv_matching(T, |b| b == f.as_slice()).is_some());
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.used_flags(1) & 1, 0, "no hold in mode off");
}

#[test]
fn control_socket_and_metrics_report_and_reject() {
    let _ns = Netns::enter("bm");
    quiet_netns();
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let slot = start_slot_cfg(cfg("bm", "vnbbm0", &sock, "adaptive:800"));
    let ctl = dir.join("ctl.sock");
    let vms = Vms(vec![slot.clone()]);
    serve_control(&ctl, vms.clone()).unwrap();
    let mode = std::fs::metadata(&ctl).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let list: ListReply = request(&ctl, &Request::List).unwrap();
    assert_eq!(list.vms[0].vm, "bm");
    assert_eq!(list.vms[0].budget_us, 800);
    let st: StatsReply = request(&ctl, &Request::Stats { vm: "bm".into() }).unwrap();
    assert_eq!(st.mode, ModeKind::Adaptive);
    assert_eq!(st.total.tx_kicks, 0);
    // Errors change nothing.
    for bad in [
        Request::Stats { vm: "nope".into() },
        Request::Set {
            vm: "bm".into(),
            mode: Some("fixed:100".parse().unwrap()),
            budget_us: Some(200),
        },
        Request::Set {
            vm: "bm".into(),
            mode: None,
            budget_us: Some(0),
        },
    ] {
        assert!(
            request::<StatsReply>(&ctl, &bad).is_err(),
            "{bad:?} accepted"
        );
    }
    // A mode the grammar does not know, as a client that does not check it would send it.
    {
        use std::io::{BufRead, Write};
        let s = std::os::unix::net::UnixStream::connect(&ctl).unwrap();
        writeln!(&s, r#"{{"op":"set","vm":"bm","mode":"turbo"}}"#).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(
            line.contains(r#""ok":false"#) && line.contains("unknown mode"),
            "{line}"
        );
    }
    assert_eq!(slot.batching().view().config.budget_us, 800);
    // Budget only: the mode is kept.
    let r: StatsReply = request(
        &ctl,
        &Request::Set {
            vm: "bm".into(),
            mode: None,
            budget_us: Some(300),
        },
    )
    .unwrap();
    assert_eq!((r.mode, r.budget_us), (ModeKind::Adaptive, 300));

    let text = render_metrics(&vms);
    for want in [
        "# TYPE vnb_tx_kicks counter",
        "vnb_tx_kicks_total{vm=\"bm\",queue=\"0\"} 0",
        "# TYPE vnb_rx_batch_packets histogram",
        "vnb_rx_batch_packets_bucket{le=\"+Inf\",vm=\"bm\",queue=\"0\"}",
        "vnb_budget_us{vm=\"bm\"} 300",
        "vnb_mode{vm=\"bm\"} 2",
        "vnb_control_invalid_total{vm=\"bm\"} 0",
        "vnb_rx_timer_fires_total",
        "vnb_rx_flush_low_water_total",
        "vnb_rate_floor_windows_total{vm=\"bm\"}",
        "vnb_applied_rx_delay_us{vm=\"bm\"}",
        "vnb_applied_tx_delay_us{vm=\"bm\"}",
        "vnb_payoff_open{vm=\"bm\"}",
        "vnb_natural_notify_rate{vm=\"bm\"}",
        "vnb_payoff_probes_total{vm=\"bm\"}",
        "vnb_payoff_refusals_total{vm=\"bm\"}",
    ] {
        assert!(text.contains(want), "metrics lack {want:?}:\n{text}");
    }

    // Over HTTP on the namespace's loopback.
    let port = 20000 + (std::process::id() % 20000) as u16;
    let addr = format!("127.0.0.1:{port}");
    serve_metrics(&addr, vms).unwrap();
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    assert!(
        body.contains("vnb_tx_packets_total{vm=\"bm\",queue=\"0\"}"),
        "{body}"
    );
}

/// VIRTIO_RING_F_EVENT_IDX: what stock QEMU and a Linux guest negotiate.
const EVENT_IDX: u64 = 1 << 29;

/// Polls `f` until it holds or `T` passes.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + T;
    while !f() {
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

#[test]
fn event_idx_tx_kicks_are_held_by_avail_event_and_rearmed_when_idle() {
    let _ns = Netns::enter("be");
    quiet_netns();
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let slot = start_slot_cfg(cfg("be", "vnbbe0", &sock, "fixed:100000"));
    let pkt = PacketSocket::bind("vnbbe0");
    let mem = guest_memory();
    let g = Guest::setup_features(
        Frontend::connect(&sock, 2).unwrap(),
        &mem,
        true,
        test_features() | EVENT_IDX,
    );
    let st = &slot.metrics().queues[0];
    std::thread::sleep(Duration::from_millis(100));
    let kicks0 = st.tx_kicks.load(Relaxed);
    let f0 = test_frame(1, 200);
    g.send(0, &f0);
    assert!(pkt.recv_matching(T, |b| b == f0.as_slice()).is_some());
    assert_eq!(g.wait_used(1, 1, T).len(), 1);
    // Held with EVENT_IDX: avail_event is set well ahead of what the guest published (a kick
    // only when it crosses it: the frame cap), and the ring flags are left alone.
    assert!(
        eventually(|| {
            let ahead = g.avail_event(1).wrapping_sub(g.avail_idx(1));
            (8..0x8000).contains(&ahead)
        }),
        "avail_event {} for avail index {}: kicks not held",
        g.avail_event(1),
        g.avail_idx(1)
    );
    assert_eq!(
        g.used_flags(1) & 1,
        0,
        "EVENT_IDX holds kicks with avail_event"
    );

    // A driver honouring avail_event does not kick for the next frames; they are drained by
    // the TX timer.
    let frames: Vec<_> = (0..5).map(|k| test_frame(10 + k, 300)).collect();
    let fires0 = st.tx_timer_fires.load(Relaxed);
    let kicked = frames
        .iter()
        .enumerate()
        .filter(|(k, f)| g.send_evidx(1 + *k as u16, f))
        .count();
    assert_eq!(
        kicked, 0,
        "avail_event asked the driver for kicks while held"
    );
    for f in &frames {
        assert!(
            pkt.recv_matching(T, |b| b == f.as_slice()).is_some(),
            "a frame queued under a held avail_event was never drained"
        );
    }
    assert_eq!(g.wait_used(1, 6, T).len(), 6);
    assert!(
        st.tx_timer_fires.load(Relaxed) > fires0,
        "drained by the timer"
    );
    assert_eq!(
        st.tx_kicks.load(Relaxed) - kicks0,
        1,
        "one kick for six frames"
    );

    // Idle: avail_event comes back to the avail index, so the guest's next frame kicks.
    assert!(
        eventually(|| g.avail_event(1) == g.avail_idx(1)),
        "kicks not re-armed on an idle ring: avail_event {} avail {}",
        g.avail_event(1),
        g.avail_idx(1)
    );
    let f = test_frame(50, 100);
    assert!(g.send_evidx(6, &f), "the driver was not asked to kick");
    assert!(pkt.recv_matching(T, |b| b == f.as_slice()).is_some());
}

#[test]
fn event_idx_used_event_inside_a_batch_flushes_at_once_and_the_normal_state_waits() {
    let _ns = Netns::enter("bu");
    quiet_netns();
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    // RX interrupts deferred by 100 ms.
    let slot = start_slot_cfg(cfg("bu", "vnbbu0", &sock, "fixed:100000"));
    let pkt = PacketSocket::bind("vnbbu0");
    let mem = guest_memory();
    let g = Guest::setup_features(
        Frontend::connect(&sock, 2).unwrap(),
        &mem,
        true,
        test_features() | EVENT_IDX,
    );
    let st = &slot.metrics().queues[0];

    // The guest batches by itself: three frames wait in the tap while the ring has no buffers,
    // the guest asks for an interrupt after entry 1 and posts buffers. The three arrive in one
    // batch (0 -> 3) that passes 1: signalled at once, no timer.
    let frames: Vec<_> = (0..3).map(|k| test_frame(30 + k, 100)).collect();
    for f in &frames {
        pkt.send(f);
    }
    std::thread::sleep(Duration::from_millis(50));
    g.set_used_event(0, 1);
    g.post_rx(0, 100, 2048);
    assert!(
        eventually(|| g.used(0).len() >= 3),
        "three frames did not reach the guest"
    );
    assert!(
        eventually(|| st.flush_used_event.load(Relaxed) == 1),
        "used_event inside the batch did not flush it"
    );
    assert_eq!(st.rx_timer_fires.load(Relaxed), 0);

    // The normal state: used_event at the next entry (3). That interrupt is the one batching
    // defers: the timer flushes it, no valve.
    g.set_used_event(0, 3);
    let fires0 = st.rx_timer_fires.load(Relaxed);
    tap_to_guest(&g, &pkt, 1, 1);
    assert!(
        eventually(|| st.rx_timer_fires.load(Relaxed) > fires0),
        "the deferred interrupt was never flushed by the timer"
    );
    // A polling guest reads entries nobody signalled and re-enables at its read point, past
    // the last interrupt: still the normal state. Entry 4 arrives (timer armed), the guest
    // reads it and asks for the next (5), entry 5 arrives: no valve, the timer flushes.
    let fires1 = st.rx_timer_fires.load(Relaxed);
    tap_to_guest(&g, &pkt, 2, 1);
    g.set_used_event(0, 5);
    tap_to_guest(&g, &pkt, 3, 1);
    assert!(eventually(|| st.rx_timer_fires.load(Relaxed) > fires1));
    assert_eq!(
        st.flush_used_event.load(Relaxed),
        1,
        "a used_event at the guest's read point must not flush"
    );
}

#[test]
fn a_frame_left_half_placed_by_a_vanished_frontend_is_counted_as_dropped() {
    let _ns = Netns::enter("hp");
    quiet_netns();
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let slot = start_slot_cfg(cfg("hp", "vnbhp0", &sock, "off"));
    let pkt = PacketSocket::bind("vnbhp0");
    let mem = guest_memory();
    let g = Guest::setup(Frontend::connect(&sock, 2).unwrap(), &mem, true);
    // One 256-byte buffer: a 1000-byte frame needs more (mergeable) and waits, half placed.
    g.post_rx(0, 1, 256);
    std::thread::sleep(Duration::from_millis(100));
    pkt.send(&test_frame(9, 1000));
    std::thread::sleep(Duration::from_millis(300));
    let st = &slot.metrics().queues[0];
    assert_eq!(g.used(0).len(), 0, "a partial frame must not be published");
    assert_eq!(st.rx_dropped.load(Relaxed), 0);
    // The frontend goes away without stopping its rings (QEMU killed).
    drop(g);
    assert!(
        eventually(|| st.rx_dropped.load(Relaxed) == 1),
        "the half-placed frame was lost without being counted"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(st.rx_dropped.load(Relaxed), 1, "counted once");
}
