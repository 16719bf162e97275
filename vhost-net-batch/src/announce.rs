//! Announcing a guest's new place on the network after a live migration.
//!
//! When a guest has moved, the switches in front of the destination's tap still send its
//! traffic to the source's port until the guest transmits. A guest without
//! `VIRTIO_NET_F_GUEST_ANNOUNCE` does not announce itself, so the destination QEMU asks the
//! backend to (`VHOST_USER_SEND_RARP`, protocol feature `RARP`): one reverse-ARP broadcast from
//! the guest's MAC, as QEMU's own `announce-self` sends for other backends. Without it, host
//! traffic to an idle guest goes to the old port until a neighbour entry expires.

/// Most announcements sent per second for one connection (a
/// [`LogLimiter::per_second`](crate::metrics::LogLimiter::per_second) budget). QEMU sends one
/// per announce round (five within a second by default); more is a frontend flooding the host's
/// segment.
pub const ANNOUNCE_PER_S: u64 = 10;

/// Length of the announcement: the minimum Ethernet frame without its FCS.
pub const RARP_FRAME_LEN: usize = 60;

/// EtherType of reverse ARP.
const ETHERTYPE_RARP: u16 = 0x8035;

/// The RARP "request reverse" frame announcing `mac`: broadcast destination, `mac` as source
/// and as both hardware addresses, no protocol addresses, padded to 60 bytes.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; RARP_FRAME_LEN] {
    let mut f = [0u8; RARP_FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    let arp = &mut f[14..];
    arp[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    arp[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    arp[4] = 6; // hardware address length
    arp[5] = 4; // protocol address length
    arp[6..8].copy_from_slice(&3u16.to_be_bytes()); // request reverse
    arp[8..14].copy_from_slice(&mac); // sender hardware address
    arp[18..24].copy_from_slice(&mac); // target hardware address
    f
}

/// The MAC address in a `SEND_RARP` payload (its first six bytes), if it is long enough.
pub fn rarp_mac(payload: &[u8]) -> Option<[u8; 6]> {
    payload.get(..6)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_is_a_broadcast_reverse_request_from_the_mac() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = rarp_frame(mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &mac);
        assert!(f[38..].iter().all(|&b| b == 0));
    }

    #[test]
    fn announcements_are_limited_per_second() {
        let l = crate::metrics::LogLimiter::per_second(ANNOUNCE_PER_S);
        let t0 = 5_000_000_000;
        assert!((0..ANNOUNCE_PER_S).all(|i| l.allow(t0 + i).is_some()));
        assert!(l.allow(t0 + 999_999_999).is_none());
        assert!(l.allow(t0 + 1_000_000_000).is_some());
    }

    #[test]
    fn rarp_mac_takes_the_first_six_bytes_of_the_payload() {
        let mut p = [0u8; 8];
        p[..6].copy_from_slice(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(rarp_mac(&p), Some([1, 2, 3, 4, 5, 6]));
        assert_eq!(rarp_mac(&p[..5]), None);
    }
}
