//! What runs inside the guest: `vnb-guest`, which asks the device (vhost-net-batch) for a
//! buffering limit with the in-band control frame of docs/design.md §5 and prints the effective
//! values, and `vnb-frame`, a raw frame sender used by the end-to-end tests to send malformed
//! control frames. Both are built as static executables for the busybox guest image.
//!
//! - [`open_control`]: a packet socket on the guest's interface, bound to the control EtherType;
//! - [`format`]: human-readable and parse-friendly output of a reply.

pub mod format;

use vnb_common::packet::{PacketError, PacketSocket};

/// A packet socket on `iface` receiving control frames (EtherType 0x88B5), and the interface's
/// MAC address (the source of the frames the tools send).
pub fn open_control(iface: &str) -> Result<(PacketSocket, [u8; 6]), PacketError> {
    let s = PacketSocket::open(iface, control_msg::ETHERTYPE)?;
    let mac = s.mac()?;
    Ok((s, mac))
}
