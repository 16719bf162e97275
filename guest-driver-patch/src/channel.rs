//! A raw `AF_PACKET` socket on one interface for control frames.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Errors opening or using the channel, with what to do about them.
#[derive(Debug)]
pub enum ChannelError {
    /// No such interface.
    NoInterface(String),
    /// Raw sockets need CAP_NET_RAW.
    Permission,
    /// Another system error.
    Io(&'static str, io::Error),
}

impl std::fmt::Display for ChannelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelError::NoInterface(i) => write!(f, "no network interface named {i:?}"),
            ChannelError::Permission => write!(
                f,
                "cannot open a raw packet socket: permission denied (run as root or give the tool CAP_NET_RAW)"
            ),
            ChannelError::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for ChannelError {}

/// A raw socket bound to one interface and one EtherType.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
    ifindex: i32,
    /// The interface's MAC address.
    pub mac: [u8; 6],
}

fn io_err(what: &'static str) -> ChannelError {
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EPERM) || e.raw_os_error() == Some(libc::EACCES) {
        ChannelError::Permission
    } else {
        ChannelError::Io(what, e)
    }
}

impl Channel {
    /// Opens a socket on `iface` receiving frames of `ethertype`.
    pub fn open(iface: &str, ethertype: u16) -> Result<Channel, ChannelError> {
        let name = std::ffi::CString::new(iface)
            .map_err(|_| ChannelError::NoInterface(iface.to_string()))?;
        if iface.is_empty() || iface.len() >= libc::IFNAMSIZ {
            return Err(ChannelError::NoInterface(iface.to_string()));
        }
        // SAFETY: NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(ChannelError::NoInterface(iface.to_string()));
        }
        let proto = ethertype.to_be();
        // SAFETY: plain syscall, result checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(io_err("socket"));
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
            return Err(io_err("bind"));
        }
        // SAFETY: zeroed ifreq with the name copied in; SIOCGIFHWADDR fills ifr_hwaddr.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(iface.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: as above.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) };
        if rc < 0 {
            return Err(io_err("SIOCGIFHWADDR"));
        }
        // SAFETY: SIOCGIFHWADDR succeeded, so the union holds a sockaddr.
        let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
            *m = *b as u8;
        }
        Ok(Channel { fd, ifindex, mac })
    }

    /// Sends one frame (Ethernet header included).
    pub fn send(&self, frame: &[u8]) -> Result<(), ChannelError> {
        // SAFETY: zeroed sockaddr_ll is valid; the destination is in the frame itself.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        for (d, s) in sll.sll_addr.iter_mut().zip(frame.iter().take(6)) {
            *d = *s;
        }
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
            return Err(io_err("send"));
        }
        Ok(())
    }

    /// Receives frames until `accept` returns `Some` or `timeout` passes.
    pub fn recv_until<T>(
        &self,
        timeout: Duration,
        mut accept: impl FnMut(&[u8]) -> Option<T>,
    ) -> Result<Option<T>, ChannelError> {
        let end = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
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
                return Err(io_err("poll"));
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
                return Err(ChannelError::Io("recv", e));
            }
            if let Some(v) = accept(&buf[..n as usize]) {
                return Ok(Some(v));
            }
        }
    }
}
