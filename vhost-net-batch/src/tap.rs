//! Host side of the data path: a Linux tap device opened with `IFF_VNET_HDR`.
//!
//! One file descriptor per queue pair (`IFF_MULTI_QUEUE` when there is more than one). The tap
//! is created when missing and attached when it exists; it lives as long as the daemon holds
//! its descriptors, so a frontend reconnecting finds the same interface.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

// The tun driver's flags are `c_int` in libc; the kernel's ifreq field is a short.
const IFF_TAP: libc::c_short = libc::IFF_TAP as libc::c_short;
const IFF_NO_PI: libc::c_short = libc::IFF_NO_PI as libc::c_short;
const IFF_VNET_HDR: libc::c_short = libc::IFF_VNET_HDR as libc::c_short;
const IFF_MULTI_QUEUE: libc::c_short = libc::IFF_MULTI_QUEUE as libc::c_short;
const IFF_ATTACH_QUEUE: libc::c_short = libc::IFF_ATTACH_QUEUE as libc::c_short;
const IFF_DETACH_QUEUE: libc::c_short = libc::IFF_DETACH_QUEUE as libc::c_short;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// Errors opening or configuring the tap device.
#[derive(Debug, Error)]
pub enum TapError {
    /// The interface name is empty, too long or has characters the kernel rejects.
    #[error("invalid tap name {0:?}: 1 to 15 characters, no '/', ':' or whitespace")]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun: {0} (load the tun module: `modprobe tun`)")]
    OpenTun(#[source] io::Error),
    /// Creating or attaching the interface was refused for lack of privilege.
    #[error(
        "cannot create or attach tap {name:?}: permission denied; run as root, grant \
         CAP_NET_ADMIN (e.g. `setcap cap_net_admin+ep vhost-net-batch`), or pre-create the tap \
         for this user with `ip tuntap add dev {name} mode tap vnet_hdr{mq} user $USER`"
    )]
    PermissionDenied {
        /// Interface name.
        name: String,
        /// " multi_queue" when more than one queue pair was asked for.
        mq: &'static str,
    },
    /// The interface exists with incompatible flags (e.g. single-queue vs multi-queue).
    #[error(
        "cannot attach tap {name:?}: it exists with other flags ({source}); \
         a tap for {queues} queue pair(s) must be created {hint}"
    )]
    Incompatible {
        /// Interface name.
        name: String,
        /// Requested queue pairs.
        queues: u16,
        /// How to create a compatible tap.
        hint: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// Any other ioctl failure.
    #[error("tap {name:?}: {what} failed: {source}")]
    Ioctl {
        /// Interface name.
        name: String,
        /// Which operation failed.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// A frame the backend made itself could not be written to the tap.
    #[error("tap {name:?}: cannot write a frame: {source}")]
    Write {
        /// Interface name.
        name: String,
        /// The kernel's error, or why the frame was not sent.
        #[source]
        source: io::Error,
    },
}

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReqFlags {
    fn new(name: &str) -> Self {
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req
    }
}

/// Checks an interface name the way the kernel's `dev_valid_name` does.
pub fn validate_ifname(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(TapError::InvalidName(name.to_string()))
    }
}

/// A tap interface with one non-blocking queue descriptor per queue pair.
///
/// Queue 0 is always attached. The others are attached only while the guest has their queue
/// pair enabled ([`Tap::set_queue_enabled`]): the kernel spreads flows over the attached queues,
/// and a frame hashed to the queue of a pair nobody reads would sit there until the kernel
/// dropped it.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<File>,
    attached: std::sync::Mutex<Vec<bool>>,
}

impl Tap {
    /// Creates the tap `name` (or attaches to it) with `queue_pairs` queues, `IFF_VNET_HDR`,
    /// a 12-byte virtio-net header and the link set up.
    pub fn open(name: &str, queue_pairs: u16) -> Result<Self, TapError> {
        validate_ifname(name)?;
        let mut queues = Vec::with_capacity(queue_pairs as usize);
        for _ in 0..queue_pairs.max(1) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(TapError::OpenTun)?;
            let mut req = IfReqFlags::new(name);
            req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
            if queue_pairs > 1 {
                req.flags |= IFF_MULTI_QUEUE;
            }
            // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                return Err(match err.raw_os_error() {
                    Some(libc::EPERM) | Some(libc::EACCES) => TapError::PermissionDenied {
                        name: name.to_string(),
                        mq: if queue_pairs > 1 { " multi_queue" } else { "" },
                    },
                    Some(libc::EINVAL) | Some(libc::EBUSY) => TapError::Incompatible {
                        name: name.to_string(),
                        queues: queue_pairs,
                        hint: if queue_pairs > 1 {
                            "with `ip tuntap add mode tap multi_queue vnet_hdr`"
                        } else {
                            "with `ip tuntap add mode tap vnet_hdr` (not multi_queue)"
                        },
                        source: err,
                    },
                    _ => TapError::Ioctl {
                        name: name.to_string(),
                        what: "TUNSETIFF",
                        source: err,
                    },
                });
            }
            queues.push(file);
        }
        let n = queues.len();
        let tap = Tap {
            name: name.to_string(),
            queues,
            attached: std::sync::Mutex::new(vec![true; n]),
        };
        tap.set_vnet_hdr_len(12)?;
        tap.set_offload(0)?;
        tap.set_up()?;
        tap.detach_extra_queues()?;
        Ok(tap)
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of queue descriptors.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Raw descriptor of queue `i`.
    pub fn queue_fd(&self, i: usize) -> RawFd {
        self.queues[i].as_raw_fd()
    }

    fn ioctl_int(
        &self,
        what: &'static str,
        req: libc::Ioctl,
        arg: libc::c_ulong,
    ) -> Result<(), TapError> {
        // Device-wide settings (the kernel keeps one per device): set once, through queue 0.
        if let Some(q) = self.queues.first() {
            // SAFETY: these tun ioctls take an integer argument (by value or by pointer as noted
            // by the caller) and touch no other memory.
            let rc = unsafe { libc::ioctl(q.as_raw_fd(), req, arg) };
            if rc < 0 {
                return Err(TapError::Ioctl {
                    name: self.name.clone(),
                    what,
                    source: io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// Sets the virtio-net header length the kernel reads and writes (10 or 12).
    pub fn set_vnet_hdr_len(&self, len: i32) -> Result<(), TapError> {
        // Device-wide, like the offloads: set once, through queue 0.
        if let Some(q) = self.queues.first() {
            let v: libc::c_int = len;
            // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer.
            let rc = unsafe { libc::ioctl(q.as_raw_fd(), libc::TUNSETVNETHDRSZ, &v) };
            if rc < 0 {
                return Err(TapError::Ioctl {
                    name: self.name.clone(),
                    what: "TUNSETVNETHDRSZ",
                    source: io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// Writes one frame (Ethernet header on) into the host side through queue 0, behind an
    /// empty virtio-net header of the length the device uses now.
    pub fn send_frame(&self, frame: &[u8]) -> Result<(), TapError> {
        let err = |what, source| TapError::Ioctl {
            name: self.name.clone(),
            what,
            source,
        };
        let q = self.queues[0].as_raw_fd();
        let mut len: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes an int through the pointer.
        if unsafe { libc::ioctl(q, libc::TUNGETVNETHDRSZ, &mut len) } < 0 {
            return Err(err("TUNGETVNETHDRSZ", io::Error::last_os_error()));
        }
        let write_err = |source| TapError::Write {
            name: self.name.clone(),
            source,
        };
        // The device's header is 10 or 12 bytes (this backend sets it); anything else is not
        // a tap this code knows how to frame for.
        if !(10..=12).contains(&len) {
            return Err(write_err(io::Error::other(format!(
                "unexpected virtio-net header length {len}"
            ))));
        }
        let mut buf = vec![0u8; len as usize];
        buf.extend_from_slice(frame);
        // SAFETY: writes `buf.len()` bytes from a live buffer to the queue's descriptor.
        let n = unsafe { libc::write(q, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(write_err(io::Error::last_os_error()));
        }
        if n as usize != buf.len() {
            return Err(write_err(io::Error::other("short write")));
        }
        Ok(())
    }

    /// Attaches (`enabled`) or detaches queue `i` from the interface, following whether the
    /// guest has queue pair `i` enabled. Queue 0 stays attached; unknown queues are ignored.
    pub fn set_queue_enabled(&self, i: usize, enabled: bool) -> Result<(), TapError> {
        if i == 0 || i >= self.queues.len() {
            return Ok(());
        }
        let mut attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        if attached[i] == enabled {
            return Ok(());
        }
        let mut req = IfReqFlags::new("");
        req.flags = if enabled {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        };
        // SAFETY: TUNSETQUEUE reads the flags of an ifreq, which `req` is laid out as.
        let rc = unsafe { libc::ioctl(self.queues[i].as_raw_fd(), libc::TUNSETQUEUE, &mut req) };
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "TUNSETQUEUE",
                source: io::Error::last_os_error(),
            });
        }
        attached[i] = enabled;
        Ok(())
    }

    /// Detaches every queue but 0: the state of a device no guest has enabled a pair of yet.
    pub fn detach_extra_queues(&self) -> Result<(), TapError> {
        (1..self.queues.len()).try_for_each(|i| self.set_queue_enabled(i, false))
    }

    /// Sets which offloads the kernel may use in frames it hands us (`TUN_F_*`).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        self.ioctl_int("TUNSETOFFLOAD", libc::TUNSETOFFLOAD, flags as libc::c_ulong)
    }

    /// Features the tun driver supports (`TUNGETFEATURES`).
    pub fn features(&self) -> Result<u32, TapError> {
        let mut v: libc::c_uint = 0;
        // SAFETY: TUNGETFEATURES writes an unsigned int through the pointer.
        let rc = unsafe { libc::ioctl(self.queues[0].as_raw_fd(), libc::TUNGETFEATURES, &mut v) };
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "TUNGETFEATURES",
                source: io::Error::last_os_error(),
            });
        }
        Ok(v)
    }

    fn set_up(&self) -> Result<(), TapError> {
        let err = |what, source| TapError::Ioctl {
            name: self.name.clone(),
            what,
            source,
        };
        // SAFETY: plain socket(2) call.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(err("socket", io::Error::last_os_error()));
        }
        // SAFETY: we own `sock` from here on.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sock) };
        let mut req = IfReqFlags::new(&self.name);
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(err("SIOCGIFFLAGS", io::Error::last_os_error()));
        }
        if req.flags & libc::IFF_UP as libc::c_short == 0 {
            req.flags |= libc::IFF_UP as libc::c_short;
            // SAFETY: as above.
            if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
                return Err(err("SIOCSIFFLAGS (link up)", io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_validation() {
        assert!(validate_ifname("tap0").is_ok());
        assert!(validate_ifname("vnb-tap_1.2").is_ok());
        assert!(validate_ifname("").is_err());
        assert!(validate_ifname("0123456789abcdef").is_err());
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("a:b").is_err());
        assert!(validate_ifname("a b").is_err());
        assert!(validate_ifname("..").is_err());
    }
}
