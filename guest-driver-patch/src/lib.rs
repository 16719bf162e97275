//! What runs inside the guest: `vnb-guest`, which asks the device (vhost-net-batch) for a
//! buffering limit with the in-band control frame of docs/design.md §5 and prints the effective
//! values, and `vnb-frame`, a raw frame sender used by the end-to-end tests to send malformed
//! control frames. Both are built as static executables for the busybox guest image.
//!
//! - [`open`]: a packet socket on the guest's interface (bound to the control EtherType, or to
//!   every frame for `vnb-guest watch`) and the interface's MAC;
//! - [`format`]: human-readable and parse-friendly output of a reply or a frame.
//!
//! The Linux `virtio_net` patch series (guest TX kick timer, `ethtool -C/-c` over the control
//! frame) is in `linux/` beside this crate; see its README.

pub mod format;

use vnb_common::packet::{PacketError, PacketSocket};

/// A packet socket on `iface` receiving frames of `protocol` (the control EtherType 0x88B5, or
/// `ETH_P_ALL`), and the interface's MAC address (the source of the frames the tools send).
pub fn open(iface: &str, protocol: u16) -> Result<(PacketSocket, [u8; 6]), PacketError> {
    let s = PacketSocket::open(iface, protocol)?;
    let mac = s.mac()?;
    Ok((s, mac))
}
