//! Message-level shim between a vhost-user frontend (QEMU) and the `vhost` crate's handler.
//!
//! Stock QEMU's vhost-user-net sends `SET_VRING_ENABLE` for queue pair 0 right after connecting,
//! before `SET_FEATURES`. The `vhost` crate answers that with `InactiveFeature` and drops the
//! connection, because until `SET_FEATURES` it cannot know that `VHOST_USER_F_PROTOCOL_FEATURES`
//! will be acked. The shim relays every message unchanged except that an enable arriving before
//! `SET_FEATURES` is acknowledged here (QEMU >= 8.1 waits for that reply when `REPLY_ACK` is
//! negotiated) and replayed to the crate right after the `SET_FEATURES` that acks protocol
//! features. Nothing else is interpreted, so the crate keeps validating everything it receives.

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use thiserror::Error;

/// Size of a vhost-user message header (request, flags, size: three u32).
pub const HDR_LEN: usize = 12;
/// Largest payload relayed; larger claims are treated as a protocol error.
pub const MAX_PAYLOAD: usize = 4096 + 512;
/// Most file descriptors one message may carry.
pub const MAX_FDS: usize = 32;

/// `VHOST_USER_GET_FEATURES`.
pub const GET_FEATURES: u32 = 1;
/// `VHOST_USER_SET_FEATURES`.
pub const SET_FEATURES: u32 = 2;
/// `VHOST_USER_SET_OWNER`.
pub const SET_OWNER: u32 = 3;
/// `VHOST_USER_RESET_OWNER`.
pub const RESET_OWNER: u32 = 4;
/// `VHOST_USER_SET_PROTOCOL_FEATURES`.
pub const SET_PROTOCOL_FEATURES: u32 = 16;
/// `VHOST_USER_SET_VRING_ENABLE`.
pub const SET_VRING_ENABLE: u32 = 18;
/// `VHOST_USER_RESET_DEVICE`.
pub const RESET_DEVICE: u32 = 34;

/// Header flag: protocol version 1.
pub const FLAG_VERSION: u32 = 0x1;
/// Header flag: this message is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Header flag: the sender wants a reply (`REPLY_ACK`).
pub const FLAG_NEED_REPLY: u32 = 0x8;

const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;

/// Errors that end a relayed connection.
#[derive(Debug, Error)]
pub enum ShimError {
    /// Socket I/O failed.
    #[error("vhost-user socket I/O: {0}")]
    Io(#[from] io::Error),
    /// A message announced a payload larger than any vhost-user message.
    #[error("vhost-user message {request} announces {size} payload bytes (max {MAX_PAYLOAD})")]
    Oversized {
        /// Request code.
        request: u32,
        /// Announced payload size.
        size: u32,
    },
    /// The peer closed the connection in the middle of a message.
    #[error("vhost-user peer closed the socket mid-message")]
    Truncated,
}

/// One vhost-user message with the descriptors that came with it.
#[derive(Debug)]
pub struct Message {
    /// Request code.
    pub request: u32,
    /// Header flags.
    pub flags: u32,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Descriptors passed with SCM_RIGHTS.
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// The payload's first u64, if it has one (features, protocol features).
    pub fn payload_u64(&self) -> Option<u64> {
        self.payload
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn header(&self) -> [u8; HDR_LEN] {
        let mut h = [0u8; HDR_LEN];
        h[0..4].copy_from_slice(&self.request.to_le_bytes());
        h[4..8].copy_from_slice(&self.flags.to_le_bytes());
        h[8..12].copy_from_slice(&(self.payload.len() as u32).to_le_bytes());
        h
    }
}

/// Reads one message; `Ok(None)` on a clean end of stream before a header.
pub fn recv_message(sock: &UnixStream) -> Result<Option<Message>, ShimError> {
    let mut hdr = [0u8; HDR_LEN];
    let (n, fds) = recv_with_fds(sock, &mut hdr)?;
    if n == 0 {
        return Ok(None);
    }
    let mut got = n;
    while got < HDR_LEN {
        let m = (&*sock).read(&mut hdr[got..])?;
        if m == 0 {
            return Err(ShimError::Truncated);
        }
        got += m;
    }
    let request = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
    let flags = u32::from_le_bytes(hdr[4..8].try_into().expect("4 bytes"));
    let size = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes"));
    if size as usize > MAX_PAYLOAD {
        return Err(ShimError::Oversized { request, size });
    }
    let mut payload = vec![0u8; size as usize];
    let mut off = 0;
    while off < payload.len() {
        let m = (&*sock).read(&mut payload[off..])?;
        if m == 0 {
            return Err(ShimError::Truncated);
        }
        off += m;
    }
    Ok(Some(Message {
        request,
        flags,
        payload,
        fds,
    }))
}

/// Writes one message, passing its descriptors with SCM_RIGHTS.
pub fn send_message(sock: &UnixStream, msg: &Message) -> Result<(), ShimError> {
    let hdr = msg.header();
    let raw: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
    let bufs = [IoSlice::new(&hdr), IoSlice::new(&msg.payload)];
    let total = HDR_LEN + msg.payload.len();
    let sent = send_with_fds(sock, &bufs, &raw)?;
    if sent < total {
        // Stream socket: finish the rest without descriptors.
        let mut all = Vec::with_capacity(total);
        all.extend_from_slice(&hdr);
        all.extend_from_slice(&msg.payload);
        std::io::Write::write_all(&mut &*sock, &all[sent..])?;
    }
    Ok(())
}

fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg = [0u64; (MAX_FDS * 4 + 64) / 8];
    let mut iov = [IoSliceMut::new(buf)];
    // SAFETY: msghdr is plain data; every pointer below refers to live local buffers.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = iov.as_mut_ptr().cast();
    mh.msg_iovlen = 1;
    mh.msg_control = cmsg.as_mut_ptr().cast();
    mh.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    let n = loop {
        // SAFETY: `mh` describes valid buffers for the duration of the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: iterating the control messages the kernel just wrote into `cmsg`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    // (The control buffer has room for more than MAX_FDS descriptors.)
    if mh.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "vhost-user message carried more descriptors than allowed",
        ));
    }
    Ok((n, fds))
}

fn send_with_fds(sock: &UnixStream, bufs: &[IoSlice<'_>], fds: &[RawFd]) -> io::Result<usize> {
    let mut cmsg = [0u64; (MAX_FDS * 4 + 64) / 8];
    // SAFETY: msghdr is plain data; every pointer below refers to live local buffers.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    mh.msg_iovlen = bufs.len() as _;
    if !fds.is_empty() {
        let fd_bytes = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
        mh.msg_control = cmsg.as_mut_ptr().cast();
        mh.msg_controllen = space as _;
        // SAFETY: `cmsg` is large enough for MAX_FDS descriptors; we fill one header.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), fd_bytes);
        }
    }
    loop {
        // SAFETY: `mh` describes valid buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What the shim does with one frontend message.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Relay it to the backend.
    Forward,
    /// Keep it until `SET_FEATURES`; answer the frontend now if it asked for a reply.
    Defer {
        /// Whether to send an ack to the frontend.
        ack: bool,
    },
    /// Relay it, then relay the deferred messages.
    ForwardThenReplay,
    /// Relay it and drop the deferred messages (features without PROTOCOL_FEATURES: the crate
    /// enables all rings itself, as the spec says).
    ForwardAndDiscard,
}

/// The shim's protocol state for one connection (pure: no I/O).
#[derive(Debug, Default)]
pub struct ShimState {
    features_set: bool,
    reply_ack: bool,
    deferred: usize,
}

impl ShimState {
    /// Decides what to do with a message from the frontend.
    pub fn on_frontend(&mut self, msg: &Message) -> Action {
        match msg.request {
            SET_PROTOCOL_FEATURES => {
                self.reply_ack = msg.payload_u64().unwrap_or(0) & PROTOCOL_F_REPLY_ACK != 0;
                Action::Forward
            }
            SET_VRING_ENABLE if !self.features_set => {
                self.deferred += 1;
                Action::Defer {
                    ack: self.reply_ack && msg.flags & FLAG_NEED_REPLY != 0,
                }
            }
            SET_FEATURES => {
                self.features_set = true;
                let pending = std::mem::take(&mut self.deferred) > 0;
                let proto = msg.payload_u64().unwrap_or(0) & PROTOCOL_FEATURES_BIT != 0;
                match (pending, proto) {
                    (false, _) => Action::Forward,
                    (true, true) => Action::ForwardThenReplay,
                    (true, false) => Action::ForwardAndDiscard,
                }
            }
            RESET_OWNER | RESET_DEVICE => {
                self.features_set = false;
                Action::Forward
            }
            _ => Action::Forward,
        }
    }
}

/// An ack (`u64` 0 = success) for `request`.
pub fn ack_for(request: u32) -> Message {
    Message {
        request,
        flags: FLAG_VERSION | FLAG_REPLY,
        payload: 0u64.to_le_bytes().to_vec(),
        fds: Vec::new(),
    }
}

/// Relays messages between `frontend` and `backend` until either side closes.
///
/// Returns `Ok(())` when the frontend disconnects cleanly.
pub fn relay(frontend: &UnixStream, backend: &UnixStream) -> Result<(), ShimError> {
    relay_observed(frontend, backend, &mut |_| {})
}

/// `SET_VRING_ENABLE`'s argument: (ring index, enabled), if `msg` is one.
pub fn vring_enable(msg: &Message) -> Option<(u32, bool)> {
    if msg.request != SET_VRING_ENABLE {
        return None;
    }
    let v = msg.payload_u64()?;
    Some((v as u32, (v >> 32) as u32 != 0))
}

/// As [`relay`], calling `seen` with every frontend message right after it went to the
/// backend (deferred ones when they are replayed), so the caller can follow ring state.
pub fn relay_observed(
    frontend: &UnixStream,
    backend: &UnixStream,
    seen: &mut dyn FnMut(&Message),
) -> Result<(), ShimError> {
    let mut state = ShimState::default();
    let mut deferred: Vec<Message> = Vec::new();
    loop {
        let mut pfd = [
            libc::pollfd {
                fd: frontend.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: backend.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `pfd` is a valid array of two pollfd.
        let rc = unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        // Backend replies first, so they reach the frontend in order.
        if pfd[1].revents != 0 {
            match recv_message(backend)? {
                Some(reply) => send_message(frontend, &reply)?,
                None => return Ok(()),
            }
        }
        if pfd[0].revents != 0 {
            let Some(mut msg) = recv_message(frontend)? else {
                return Ok(());
            };
            tracing::trace!(request = msg.request, flags = msg.flags, len = msg.payload.len(), arg = ?msg.payload_u64(), "vhost-user");
            match state.on_frontend(&msg) {
                Action::Forward => {
                    send_message(backend, &msg)?;
                    seen(&msg);
                }
                Action::Defer { ack } => {
                    tracing::debug!(
                        "deferring SET_VRING_ENABLE received before SET_FEATURES (QEMU quirk)"
                    );
                    if ack {
                        send_message(frontend, &ack_for(msg.request))?;
                    }
                    msg.flags &= !FLAG_NEED_REPLY;
                    deferred.push(msg);
                }
                Action::ForwardThenReplay => {
                    send_message(backend, &msg)?;
                    seen(&msg);
                    for m in deferred.drain(..) {
                        send_message(backend, &m)?;
                        seen(&m);
                    }
                }
                Action::ForwardAndDiscard => {
                    deferred.clear();
                    send_message(backend, &msg)?;
                    seen(&msg);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(request: u32, flags: u32, v: Option<u64>) -> Message {
        Message {
            request,
            flags,
            payload: v.map(|v| v.to_le_bytes().to_vec()).unwrap_or_default(),
            fds: Vec::new(),
        }
    }

    #[test]
    fn early_enable_is_deferred_and_replayed() {
        let mut s = ShimState::default();
        assert_eq!(
            s.on_frontend(&msg(SET_PROTOCOL_FEATURES, 1, Some(1 << 3))),
            Action::Forward
        );
        assert_eq!(
            s.on_frontend(&msg(SET_VRING_ENABLE, 1 | FLAG_NEED_REPLY, Some(1 << 32))),
            Action::Defer { ack: true }
        );
        assert_eq!(
            s.on_frontend(&msg(SET_FEATURES, 1, Some(1 << 30 | 1 << 32))),
            Action::ForwardThenReplay
        );
        // After SET_FEATURES, enables go straight through.
        assert_eq!(
            s.on_frontend(&msg(SET_VRING_ENABLE, 1, Some(0))),
            Action::Forward
        );
    }

    #[test]
    fn no_ack_without_reply_ack() {
        let mut s = ShimState::default();
        assert_eq!(
            s.on_frontend(&msg(SET_VRING_ENABLE, 1 | FLAG_NEED_REPLY, Some(0))),
            Action::Defer { ack: false }
        );
        assert_eq!(
            s.on_frontend(&msg(SET_FEATURES, 1, Some(1 << 32))),
            Action::ForwardAndDiscard
        );
    }

    #[test]
    fn reset_rearms_deferral() {
        let mut s = ShimState::default();
        assert_eq!(
            s.on_frontend(&msg(SET_FEATURES, 1, Some(1 << 30))),
            Action::Forward
        );
        assert_eq!(s.on_frontend(&msg(RESET_OWNER, 1, None)), Action::Forward);
        assert!(matches!(
            s.on_frontend(&msg(SET_VRING_ENABLE, 1, Some(1))),
            Action::Defer { .. }
        ));
    }

    #[test]
    fn messages_round_trip_with_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let m = Message {
            request: 13,
            flags: 1,
            payload: 7u64.to_le_bytes().to_vec(),
            fds: vec![OwnedFd::from(f)],
        };
        send_message(&a, &m).unwrap();
        let r = recv_message(&b).unwrap().unwrap();
        assert_eq!(
            (r.request, r.flags, r.payload.clone()),
            (13, 1, m.payload.clone())
        );
        assert_eq!(r.fds.len(), 1);
        drop(a);
        assert!(recv_message(&b).unwrap().is_none());
    }

    #[test]
    fn more_descriptors_than_max_fds_are_refused() {
        // Found by the `shim` fuzz target: the control buffer holds up to 44 descriptors, and
        // a message with 33..=44 of them got through.
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = [f.as_raw_fd(); MAX_FDS + 1];
        let hdr = msg(GET_FEATURES, FLAG_VERSION, None).header();
        send_with_fds(&a, &[IoSlice::new(&hdr)], &fd).unwrap();
        assert!(matches!(recv_message(&b), Err(ShimError::Io(_))));
        let (a, b) = UnixStream::pair().unwrap();
        send_with_fds(&a, &[IoSlice::new(&hdr)], &fd[..MAX_FDS]).unwrap();
        assert_eq!(recv_message(&b).unwrap().unwrap().fds.len(), MAX_FDS);
    }

    #[test]
    fn oversized_is_rejected() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut h = [0u8; 12];
        h[0..4].copy_from_slice(&5u32.to_le_bytes());
        h[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
        std::io::Write::write_all(&mut &a, &h).unwrap();
        assert!(matches!(recv_message(&b), Err(ShimError::Oversized { .. })));
    }
}
