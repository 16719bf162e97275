//! What runs inside the guest: `vnb-guest`, which asks the device (vhost-net-batch) for a
//! buffering limit with the in-band control frame of DESIGN.md §5 and prints the effective
//! values, and `vnb-frame`, a raw frame sender used by the end-to-end tests to send malformed
//! control frames. Both are built as static executables for the busybox guest image.
//!
//! - [`channel`]: an `AF_PACKET` socket on one interface, bound to the control EtherType;
//! - [`format`]: human-readable and parse-friendly output of a reply or a frame.
//!
//! The Linux `virtio_net` patch series (guest TX kick timer, `ethtool -C/-c` over the control
//! frame) is in `linux/` beside this crate; see its README.

pub mod channel;
pub mod format;
