//! A raw `AF_PACKET` socket on one interface: the guest tools send control frames with it, the
//! tests and the bench inject and capture frames on a tap.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use thiserror::Error;

/// `ETH_P_ALL`: receive every protocol.
pub const ETH_P_ALL: u16 = libc::ETH_P_ALL as u16;

/// Errors opening or using a packet socket, with what to do about them.
#[derive(Debug, Error)]
pub enum PacketError {
    /// No such interface (in this network namespace).
    #[error("no network interface named {0:?}")]
    NoInterface(String),
    /// Raw sockets need CAP_NET_RAW.
    #[error("cannot open a raw packet socket: permission denied (run as root or give the tool CAP_NET_RAW)")]
    Permission,
    /// Another system error.
    #[error("{0}: {1}")]
    Io(&'static str, #[source] io::Error),
}

fn last_err(what: &'static str) -> PacketError {
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => PacketError::Permission,
        _ => PacketError::Io(what, e),
    }
}

/// The index of interface `name` in this namespace.
pub fn if_index(name: &str) -> Option<u32> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return None;
    }
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// A raw socket bound to one interface, receiving one EtherType (or [`ETH_P_ALL`], or nothing
/// with protocol 0: a socket that only sends).
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
    iface: String,
}

impl PacketSocket {
    /// Opens a socket on `iface` receiving frames of `protocol` (an EtherType, `ETH_P_ALL`, or
    /// 0 to receive nothing).
    pub fn open(iface: &str, protocol: u16) -> Result<PacketSocket, PacketError> {
        let ifindex =
            if_index(iface).ok_or_else(|| PacketError::NoInterface(iface.to_string()))? as i32;
        let proto = protocol.to_be();
        // SAFETY: plain syscall, result checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(last_err("socket"));
        }
        // SAFETY: a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed sockaddr_ll is valid; the fields are set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: `sll` is a valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(last_err("bind"));
        }
        Ok(PacketSocket {
            fd,
            ifindex,
            iface: iface.to_string(),
        })
    }

    /// The interface's MAC address.
    pub fn mac(&self) -> Result<[u8; 6], PacketError> {
        // SAFETY: zeroed ifreq with the name copied in; SIOCGIFHWADDR fills ifr_hwaddr.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(self.iface.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: as above.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) };
        if rc < 0 {
            return Err(last_err("SIOCGIFHWADDR"));
        }
        // SAFETY: SIOCGIFHWADDR succeeded, so the union holds a sockaddr.
        let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
            *m = *b as u8;
        }
        Ok(mac)
    }

    /// Sends frames straight to the device's queue, past the qdisc: a full queue drops, the
    /// sender never waits (`PACKET_QDISC_BYPASS`).
    pub fn bypass_qdisc(&self) -> Result<(), PacketError> {
        self.set_int(libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1)
    }

    /// Gives up a blocking receive after `timeout`.
    pub fn set_recv_timeout(&self, timeout: Duration) -> Result<(), PacketError> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: setting a timeval option of its size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc < 0 {
            return Err(last_err("SO_RCVTIMEO"));
        }
        Ok(())
    }

    fn set_int(&self, level: i32, name: i32, v: libc::c_int) -> Result<(), PacketError> {
        // SAFETY: setting an int option.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if rc < 0 {
            return Err(last_err("setsockopt"));
        }
        Ok(())
    }

    /// The link-layer address to send `frame` to: this interface, the frame's destination MAC.
    fn dest(&self, frame: &[u8]) -> libc::sockaddr_ll {
        // SAFETY: zeroed sockaddr_ll is valid; the destination is in the frame itself.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        for (d, s) in sll.sll_addr.iter_mut().zip(frame.iter().take(6)) {
            *d = *s;
        }
        sll
    }

    /// Sends one frame (Ethernet header included) out of the interface.
    pub fn send(&self, frame: &[u8]) -> Result<usize, PacketError> {
        let sll = self.dest(frame);
        // SAFETY: buffer and address valid for the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(last_err("send"));
        }
        Ok(n as usize)
    }

    /// Sends `copies` copies of one frame with one `sendmmsg` call (a flood that costs its
    /// sender little per frame); returns how many the kernel took.
    pub fn send_copies(&self, frame: &[u8], copies: usize) -> Result<usize, PacketError> {
        let mut sll = self.dest(frame);
        let mut iov = libc::iovec {
            iov_base: frame.as_ptr().cast_mut().cast(),
            iov_len: frame.len(),
        };
        let mut msgs: Vec<libc::mmsghdr> = (0..copies.min(1024))
            .map(|_| {
                // SAFETY: a zeroed mmsghdr is valid; the pointers are set below.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                m.msg_hdr.msg_iov = &mut iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: every header points at `sll`, `iov` and `frame`, valid for the call; the
        // kernel only reads the frame.
        let n =
            unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0) };
        if n < 0 {
            return Err(last_err("sendmmsg"));
        }
        Ok(n as usize)
    }

    /// Receives frames until `accept` returns `Some` or `timeout` passes.
    pub fn recv_until<T>(
        &self,
        timeout: Duration,
        mut accept: impl FnMut(&[u8]) -> Option<T>,
    ) -> Result<Option<T>, PacketError> {
        let end = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            if rc < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(last_err("poll"));
            }
            if rc == 0 {
                continue;
            }
            // SAFETY: reads into `buf`.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(PacketError::Io("recv", e));
            }
            if let Some(v) = accept(&buf[..n as usize]) {
                return Ok(Some(v));
            }
        }
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_interfaces_are_named_in_the_error() {
        let e = PacketSocket::open("vnb-no-such-if", ETH_P_ALL).unwrap_err();
        assert!(e.to_string().contains("vnb-no-such-if"), "{e}");
        assert_eq!(if_index(""), None);
        assert_eq!(if_index("0123456789abcdefXX"), None);
        assert!(if_index("lo").is_some());
    }
}
