//! Dirty-page logging for live migration, over the vhost-user protocol as QEMU drives it: the
//! frontend negotiates `LOG_SHMFD`, hands over a log (`SET_LOG_BASE` with a memfd) and acks
//! `VHOST_F_LOG_ALL`; then every guest page the backend writes is marked in that log: RX
//! payloads (written by the tap's `readv`, behind `vm-memory`'s back), RX and TX used rings.
//! Pages it did not write stay clean.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use common::*;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion};

const PAGE: u64 = 4096;
const T: Duration = Duration::from_secs(5);

fn logged(log: &File, addr: u64) -> bool {
    let page = addr / PAGE;
    let mut b = [0u8; 1];
    log.read_exact_at(&mut b, page / 8).unwrap();
    b[0] & (1 << (page % 8)) != 0
}

#[test]
fn with_a_log_installed_every_page_the_backend_writes_is_marked() {
    let _ns = Netns::enter("dl");
    let dir = tempdir();
    let sock = dir.join("vm.sock");
    let _slot = start_slot("dl", "vnbdl0", &sock);
    // Frames of two pages: the second is written by readv only.
    let ip = Command::new("ip")
        .args(["link", "set", "dev", "vnbdl0", "mtu", "9000"])
        .status()
        .unwrap();
    assert!(ip.success());
    // Fewer frames of the kernel's own on the tap.
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/vnbdl0/disable_ipv6", "1");
    let pkt = PacketSocket::bind("vnbdl0");
    let mem = guest_memory();
    let fe = Frontend::connect(&sock, 2).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert_ne!(offered & VhostUserVirtioFeatures::LOG_ALL.bits(), 0);
    let mut fe = fe;
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    // With REPLY_ACK, as QEMU: SET_FEATURES with LOG_ALL returns once the backend applied it.
    fe.set_protocol_features(
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK,
    )
    .unwrap();
    let g = Guest::setup_features(fe, &mem, false, test_features());

    // The log QEMU hands over when a migration starts: one bit per 4 KiB page.
    let size = (MEM_SIZE as u64 / PAGE).div_ceil(8);
    let log = memfd(c"vnb-log", size);
    g.fe.set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: 0,
            mmap_handle: log.as_raw_fd(),
        }),
    )
    .unwrap();
    g.fe.set_features(test_features() | VhostUserVirtioFeatures::LOG_ALL.bits())
        .unwrap();
    // Messages are handled in order: once this is answered, LOG_ALL is in effect.
    g.fe.get_features().unwrap();

    // Six RX buffers of two pages each; the frame needs one.
    g.post_rx(0, 6, 2 * PAGE as u32);
    let rx_buf = |i: u64| BUF + 0x80_0000 + 0x1_0000 * i;
    let f = test_frame(7, 6000);
    pkt.send(&f);
    // The kernel may put its own frames (IPv6 neighbour discovery) on the tap too: find ours.
    let end = std::time::Instant::now() + T;
    let (id, _) = loop {
        let used = g.used(0);
        if let Some(&e) = used.iter().find(|&&(_, len)| len as usize == 12 + f.len()) {
            break e;
        }
        assert!(
            std::time::Instant::now() < end,
            "the frame did not reach the guest: {used:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        g.rx_buf(id as u16, 12 + f.len())[12..] == f[..],
        "the frame's bytes in buffer {id}"
    );
    let id = u64::from(id);
    assert!(logged(&log, rx_buf(id)), "the RX buffer's first page");
    assert!(
        logged(&log, rx_buf(id) + PAGE),
        "the RX buffer's second page, written by readv only"
    );
    assert!(logged(&log, g.used_ring(0).0), "the RX used ring");
    let written: Vec<u64> = g.used(0).iter().map(|&(i, _)| u64::from(i)).collect();
    for i in (0..6).filter(|i| !written.contains(i)) {
        assert!(!logged(&log, rx_buf(i)), "RX buffer {i}, never written");
    }
    // TX: the used ring the backend writes back.
    // QEMU clears what it synced; so does this test, to see what a TX frame marks.
    log.write_all_at(&vec![0u8; size as usize], 0).unwrap();
    assert!(!logged(&log, g.used_ring(1).0));
    g.send(0, &test_frame(8, 200));
    assert_eq!(g.wait_used(1, 1, T).len(), 1, "the TX frame was not taken");
    assert!(logged(&log, g.used_ring(1).0), "the TX used ring");
    // The TX buffer is only read.
    assert!(!logged(&log, BUF), "the TX buffer, only read");
}
