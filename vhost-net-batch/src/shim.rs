//! Message-level shim between a vhost-user frontend (QEMU) and the `vhost` crate's handler.
//!
//! Stock QEMU's vhost-user-net sends `SET_VRING_ENABLE` for queue pair 0 right after connecting,
//! before `SET_FEATURES`. The `vhost` crate answers that with `InactiveFeature` and drops the
//! connection, because until `SET_FEATURES` it cannot know that `VHOST_USER_F_PROTOCOL_FEATURES`
//! will be acked. The shim relays every message unchanged except that an enable arriving before
//! `SET_FEATURES` is acknowledged here (QEMU >= 8.1 waits for that reply when `REPLY_ACK` is
//! negotiated) and replayed to the crate right after the `SET_FEATURES` that acks protocol
//! features. Nothing else is interpreted, so the crate keeps validating everything it receives.
//!
//! Limits, so that a frontend cannot make the shim hold more than a few messages: payloads of
//! at most the crate's [`MAX_MSG_SIZE`], at most [`MAX_FDS`] descriptors per message (sending
//! more is refused, receiving more is a protocol error) and at most [`MAX_DEFERRED`] deferred
//! enables; going over any ends that frontend's connection only. Descriptors arrive
//! close-on-exec.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use thiserror::Error;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Size of a vhost-user message header (request, flags, size: three u32).
pub const HDR_LEN: usize = 12;
/// Largest payload relayed (the `vhost` crate's limit); larger claims are a protocol error.
pub const MAX_PAYLOAD: usize = MAX_MSG_SIZE;
/// Most file descriptors one message may carry (the `vhost` crate's limit).
pub const MAX_FDS: usize = MAX_ATTACHED_FD_ENTRIES;
/// Most early `SET_VRING_ENABLE` messages kept until `SET_FEATURES` (QEMU sends one per ring
/// of pair 0; a queue-pair count's worth of both rings, twice, is far more than any frontend
/// needs).
pub const MAX_DEFERRED: usize = 64;

/// Header flag: protocol version 1.
pub const FLAG_VERSION: u32 = 0x1;
/// Header flag: this message is a reply.
pub const FLAG_REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();
/// Header flag: the sender wants a reply (`REPLY_ACK`).
pub const FLAG_NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();

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
    /// A message came with more descriptors than a message may carry.
    #[error("vhost-user message carried more than {MAX_FDS} descriptors")]
    TooManyFds,
    /// The device ended the connection (a panic or a guest memory fault; logged and counted).
    #[error("the device ended the connection")]
    Stopped,
    /// More early `SET_VRING_ENABLE` messages than [`MAX_DEFERRED`] before `SET_FEATURES`.
    #[error("more than {MAX_DEFERRED} SET_VRING_ENABLE messages before SET_FEATURES")]
    TooManyDeferred,
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
    /// The request, if it is one the `vhost` crate knows.
    pub fn req(&self) -> Option<FrontendReq> {
        FrontendReq::try_from(self.request).ok()
    }

    /// The payload's first u64, if it has one (features, protocol features).
    pub fn payload_u64(&self) -> Option<u64> {
        self.payload
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// The header as sent on the wire.
    pub fn header(&self) -> [u8; HDR_LEN] {
        let mut h = [0u8; HDR_LEN];
        h[0..4].copy_from_slice(&self.request.to_le_bytes());
        h[4..8].copy_from_slice(&self.flags.to_le_bytes());
        h[8..12].copy_from_slice(&(self.payload.len() as u32).to_le_bytes());
        h
    }
}

fn read_full(sock: &UnixStream, buf: &mut [u8]) -> Result<(), ShimError> {
    let mut off = 0;
    while off < buf.len() {
        match (&*sock).read(&mut buf[off..]) {
            Ok(0) => return Err(ShimError::Truncated),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads one message; `Ok(None)` on a clean end of stream before a header.
pub fn recv_message(sock: &UnixStream) -> Result<Option<Message>, ShimError> {
    let mut hdr = [0u8; HDR_LEN];
    let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR_LEN,
    }];
    let (n, nfds) = loop {
        // SAFETY: the iovec points at `hdr`, writable for its length.
        match unsafe { sock.recv_with_fds(&mut iov, &mut raw) } {
            Ok(r) => break r,
            Err(e) if e.errno() == libc::EINTR => continue,
            // vmm-sys-util closes the descriptors of a truncated control message.
            Err(e) if e.errno() == libc::ENOBUFS => return Err(ShimError::TooManyFds),
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        }
    };
    let fds: Vec<OwnedFd> = raw[..nfds]
        .iter()
        .map(|&fd| {
            // SAFETY: the kernel just installed these descriptors for us; nothing else owns
            // them.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            set_cloexec(&fd);
            fd
        })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    read_full(sock, &mut hdr[n..])?;
    let request = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
    let flags = u32::from_le_bytes(hdr[4..8].try_into().expect("4 bytes"));
    let size = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes"));
    if size as usize > MAX_PAYLOAD {
        return Err(ShimError::Oversized { request, size });
    }
    let mut payload = vec![0u8; size as usize];
    read_full(sock, &mut payload)?;
    Ok(Some(Message {
        request,
        flags,
        payload,
        fds,
    }))
}

/// Marks a descriptor received from a frontend close-on-exec, so no child process of the
/// daemon (a power meter command, say) ever inherits a guest's memory or eventfds.
fn set_cloexec(fd: &OwnedFd) {
    // SAFETY: F_SETFD on a descriptor we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// Writes one message, passing its descriptors with SCM_RIGHTS. More than [`MAX_FDS`]
/// descriptors are refused before anything is sent.
pub fn send_message(sock: &UnixStream, msg: &Message) -> Result<(), ShimError> {
    if msg.fds.len() > MAX_FDS {
        return Err(ShimError::TooManyFds);
    }
    let hdr = msg.header();
    let raw: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut all = Vec::with_capacity(HDR_LEN + msg.payload.len());
    all.extend_from_slice(&hdr);
    all.extend_from_slice(&msg.payload);
    let sent = loop {
        match sock.send_with_fds(&[&all[..]], &raw) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        }
    };
    if sent < all.len() {
        // Stream socket: finish the rest without descriptors.
        std::io::Write::write_all(&mut &*sock, &all[sent..])?;
    }
    Ok(())
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
    /// Handle it here, not in the crate (`SEND_RARP`, which the crate does not know); answer
    /// the frontend with the outcome if it asked for a reply.
    Local {
        /// Whether to send an ack to the frontend.
        ack: bool,
    },
}

/// The shim's protocol state for one connection (pure: no I/O).
#[derive(Debug, Default)]
pub struct ShimState {
    features_set: bool,
    reply_ack: bool,
    deferred: usize,
}

impl ShimState {
    /// Decides what to do with a message from the frontend; more than [`MAX_DEFERRED`] early
    /// enables are a protocol error.
    pub fn on_frontend(&mut self, msg: &Message) -> Result<Action, ShimError> {
        Ok(match msg.req() {
            Some(FrontendReq::SET_PROTOCOL_FEATURES) => {
                let acked =
                    VhostUserProtocolFeatures::from_bits_truncate(msg.payload_u64().unwrap_or(0));
                self.reply_ack = acked.contains(VhostUserProtocolFeatures::REPLY_ACK);
                Action::Forward
            }
            Some(FrontendReq::SET_VRING_ENABLE) if !self.features_set => {
                if self.deferred >= MAX_DEFERRED {
                    return Err(ShimError::TooManyDeferred);
                }
                self.deferred += 1;
                Action::Defer {
                    ack: self.reply_ack && msg.flags & FLAG_NEED_REPLY != 0,
                }
            }
            Some(FrontendReq::SET_FEATURES) => {
                self.features_set = true;
                let pending = std::mem::take(&mut self.deferred) > 0;
                let proto = msg.payload_u64().unwrap_or(0)
                    & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
                    != 0;
                match (pending, proto) {
                    (false, _) => Action::Forward,
                    (true, true) => Action::ForwardThenReplay,
                    (true, false) => Action::ForwardAndDiscard,
                }
            }
            Some(FrontendReq::SEND_RARP) => Action::Local {
                ack: self.reply_ack && msg.flags & FLAG_NEED_REPLY != 0,
            },
            Some(FrontendReq::RESET_OWNER | FrontendReq::RESET_DEVICE) => {
                self.features_set = false;
                Action::Forward
            }
            _ => Action::Forward,
        })
    }
}

/// An ack (`u64` 0 = success) for `request`.
pub fn ack_for(request: u32) -> Message {
    reply_for(request, true)
}

/// A `REPLY_ACK` reply for `request`: `u64` 0 when it succeeded, 1 when it failed.
pub fn reply_for(request: u32, ok: bool) -> Message {
    Message {
        request,
        flags: FLAG_VERSION | FLAG_REPLY,
        payload: u64::from(!ok).to_le_bytes().to_vec(),
        fds: Vec::new(),
    }
}

/// `SET_VRING_ENABLE`'s argument: (ring index, enabled), if `msg` is one.
pub fn vring_enable(msg: &Message) -> Option<(u32, bool)> {
    if msg.req() != Some(FrontendReq::SET_VRING_ENABLE) {
        return None;
    }
    let v = msg.payload_u64()?;
    Some((v as u32, (v >> 32) as u32 != 0))
}

/// Relays messages between `frontend` and `backend` until either side closes or `stop`
/// becomes readable, calling `seen`
/// with every frontend message right after it went to the backend (deferred ones when they are
/// replayed), so the caller can follow ring state, and `local` with the messages the shim
/// handles itself instead ([`Action::Local`]; its result is the frontend's ack).
///
/// Returns `Ok(())` when the frontend disconnects cleanly.
pub fn relay(
    frontend: &UnixStream,
    backend: &UnixStream,
    stop: &impl AsRawFd,
    seen: &mut dyn FnMut(&Message),
    local: &mut dyn FnMut(&Message) -> bool,
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
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `pfd` is a valid array of three pollfd.
        let rc = unsafe { libc::poll(pfd.as_mut_ptr(), 3, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if pfd[2].revents != 0 {
            return Err(ShimError::Stopped);
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
            match state.on_frontend(&msg)? {
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
                Action::Local { ack } => {
                    let ok = local(&msg);
                    if ack {
                        send_message(frontend, &reply_for(msg.request, ok))?;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET_FEATURES: u32 = FrontendReq::SET_FEATURES as u32;
    const SET_PROTOCOL_FEATURES: u32 = FrontendReq::SET_PROTOCOL_FEATURES as u32;
    const SET_VRING_ENABLE: u32 = FrontendReq::SET_VRING_ENABLE as u32;
    const RESET_OWNER: u32 = FrontendReq::RESET_OWNER as u32;

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
            s.on_frontend(&msg(SET_PROTOCOL_FEATURES, 1, Some(1 << 3)))
                .unwrap(),
            Action::Forward
        );
        assert_eq!(
            s.on_frontend(&msg(SET_VRING_ENABLE, 1 | FLAG_NEED_REPLY, Some(1 << 32)))
                .unwrap(),
            Action::Defer { ack: true }
        );
        assert_eq!(
            s.on_frontend(&msg(SET_FEATURES, 1, Some(1 << 30 | 1 << 32)))
                .unwrap(),
            Action::ForwardThenReplay
        );
        // After SET_FEATURES, enables go straight through.
        assert_eq!(
            s.on_frontend(&msg(SET_VRING_ENABLE, 1, Some(0))).unwrap(),
            Action::Forward
        );
    }

    #[test]
    fn no_ack_without_reply_ack() {
        let mut s = ShimState::default();
        assert_eq!(
            s.on_frontend(&msg(SET_VRING_ENABLE, 1 | FLAG_NEED_REPLY, Some(0)))
                .unwrap(),
            Action::Defer { ack: false }
        );
        assert_eq!(
            s.on_frontend(&msg(SET_FEATURES, 1, Some(1 << 32))).unwrap(),
            Action::ForwardAndDiscard
        );
    }

    #[test]
    fn reset_rearms_deferral() {
        let mut s = ShimState::default();
        assert_eq!(
            s.on_frontend(&msg(SET_FEATURES, 1, Some(1 << 30))).unwrap(),
            Action::Forward
        );
        assert_eq!(
            s.on_frontend(&msg(RESET_OWNER, 1, None)).unwrap(),
            Action::Forward
        );
        assert!(matches!(
            s.on_frontend(&msg(SET_VRING_ENABLE, 1, Some(1))).unwrap(),
            Action::Defer { .. }
        ));
    }

    #[test]
    fn send_rarp_is_handled_here_and_acked_only_when_asked() {
        const SEND_RARP: u32 = FrontendReq::SEND_RARP as u32;
        let mut s = ShimState::default();
        // Without REPLY_ACK negotiated, no reply even if the flag is set.
        assert_eq!(
            s.on_frontend(&msg(SEND_RARP, 1 | FLAG_NEED_REPLY, Some(0)))
                .unwrap(),
            Action::Local { ack: false }
        );
        let ack = VhostUserProtocolFeatures::REPLY_ACK.bits();
        s.on_frontend(&msg(
            FrontendReq::SET_PROTOCOL_FEATURES as u32,
            1,
            Some(ack),
        ))
        .unwrap();
        assert_eq!(
            s.on_frontend(&msg(SEND_RARP, 1 | FLAG_NEED_REPLY, Some(0)))
                .unwrap(),
            Action::Local { ack: true }
        );
        assert_eq!(
            s.on_frontend(&msg(SEND_RARP, 1, Some(0))).unwrap(),
            Action::Local { ack: false }
        );
        assert_eq!(reply_for(SEND_RARP, false).payload_u64(), Some(1));
        assert_eq!(reply_for(SEND_RARP, true).payload_u64(), Some(0));
    }

    #[test]
    fn deferred_enables_are_capped() {
        let mut s = ShimState::default();
        for _ in 0..MAX_DEFERRED {
            assert!(matches!(
                s.on_frontend(&msg(SET_VRING_ENABLE, 1, Some(1))).unwrap(),
                Action::Defer { .. }
            ));
        }
        assert!(matches!(
            s.on_frontend(&msg(SET_VRING_ENABLE, 1, Some(1))),
            Err(ShimError::TooManyDeferred)
        ));
    }

    fn dev_null() -> OwnedFd {
        OwnedFd::from(std::fs::File::open("/dev/null").unwrap())
    }

    #[test]
    fn messages_round_trip_with_fds_which_arrive_close_on_exec() {
        let (a, b) = UnixStream::pair().unwrap();
        let m = Message {
            request: 13,
            flags: 1,
            payload: 7u64.to_le_bytes().to_vec(),
            fds: vec![dev_null()],
        };
        send_message(&a, &m).unwrap();
        let r = recv_message(&b).unwrap().unwrap();
        assert_eq!(
            (r.request, r.flags, r.payload.clone()),
            (13, 1, m.payload.clone())
        );
        assert_eq!(r.fds.len(), 1);
        // SAFETY: F_GETFD on a descriptor we own.
        let fl = unsafe { libc::fcntl(r.fds[0].as_raw_fd(), libc::F_GETFD) };
        assert_ne!(
            fl & libc::FD_CLOEXEC,
            0,
            "received descriptors are close-on-exec"
        );
        drop(a);
        assert!(recv_message(&b).unwrap().is_none());
    }

    #[test]
    fn too_many_fds_are_refused_on_send_and_on_receive() {
        let (a, b) = UnixStream::pair().unwrap();
        let many = Message {
            request: 5,
            flags: 1,
            payload: Vec::new(),
            fds: (0..=MAX_FDS).map(|_| dev_null()).collect(),
        };
        assert!(matches!(
            send_message(&a, &many),
            Err(ShimError::TooManyFds)
        ));
        // A peer that sends more than a message may carry ends the connection.
        let raw: Vec<RawFd> = many.fds.iter().map(|f| f.as_raw_fd()).collect();
        let hdr = many.header();
        a.send_with_fds(&[&hdr[..]], &raw).unwrap();
        assert!(matches!(recv_message(&b), Err(ShimError::TooManyFds)));
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
