//! Fuzz target: the vhost-user message framing of `shim.rs`. The input is the byte stream a
//! frontend sends, written into one end of a `UnixStream` pair in two `sendmsg` calls that each
//! carry an input-chosen number of descriptors (up to 63: more than a message may carry). The
//! other end is read with `recv_message` until the stream ends or fails, and every message
//! parsed goes through `ShimState::on_frontend`. Checked:
//!
//! - no panic; a message's payload is at most `MAX_PAYLOAD` bytes and it carries at most
//!   `MAX_FDS` descriptors;
//! - a parsed message is exactly the next `12 + size` bytes of the stream, and `send_message`
//!   re-encodes it to the same bytes with as many descriptors;
//! - an error is one the stream calls for: `Oversized` only for a header announcing more than
//!   `MAX_PAYLOAD`, `Truncated` only when the stream ends inside a message, `TooManyFds` (or an
//!   I/O error) only when too many descriptors came;
//! - the shim's decisions keep the protocol: only an early `SET_VRING_ENABLE` is deferred, and
//!   acknowledged only when the frontend asked and `REPLY_ACK` was negotiated; deferred
//!   messages are replayed or discarded only by a `SET_FEATURES`, replayed only when it acks
//!   protocol features; more than `MAX_DEFERRED` early enables end the connection
//!   (`TooManyDeferred`) and nothing else does;
//! - no descriptor leaks.
#![no_main]

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use vhost_net_batch::shim::{
    recv_message, send_message, vring_enable, Action, Message, ShimError, ShimState,
    FLAG_NEED_REPLY, HDR_LEN, MAX_DEFERRED, MAX_FDS, MAX_PAYLOAD,
};

// Request codes, from the vhost-user specification (independent of the shim's own names).
const SET_FEATURES: u32 = 2;
const RESET_OWNER: u32 = 4;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const SEND_RARP: u32 = 19;
const RESET_DEVICE: u32 = 34;

/// Longest stream fed (well below a Unix socket's send buffer: written before it is read).
const MAX_STREAM: usize = 32 * 1024;
/// Most descriptors attached to one `sendmsg` (more than the shim's receive buffer holds).
const MAX_SEND_FDS: usize = 63;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Sends `bytes` with `fds` copies of `fd` attached.
fn send_with(sock: &UnixStream, bytes: &[u8], fd: &OwnedFd, fds: usize) {
    if bytes.is_empty() {
        return;
    }
    let raw = vec![fd.as_raw_fd(); fds];
    let mut cmsg = vec![0u64; 64];
    let iov = [IoSlice::new(bytes)];
    // SAFETY: msghdr is plain data; the pointers below refer to live local buffers.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = iov.as_ptr() as *mut libc::iovec;
    mh.msg_iovlen = 1;
    if fds > 0 {
        let n = std::mem::size_of_val(&raw[..]);
        mh.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: pure size computations; `cmsg` holds 512 bytes, enough for 63 descriptors.
        unsafe {
            mh.msg_controllen = libc::CMSG_SPACE(n as u32) as _;
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(n as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), n);
        }
    }
    // SAFETY: `mh` describes valid buffers for the call.
    let sent = unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
    assert_eq!(sent, bytes.len() as isize, "sendmsg to the socket pair");
}

/// Reads everything from `sock` (the peer has shut down), counting the descriptors that came.
fn drain(sock: &UnixStream) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut fds = 0;
    loop {
        let mut buf = [0u8; 8192];
        let mut cmsg = [0u64; 64];
        let mut iov = [IoSliceMut::new(&mut buf)];
        // SAFETY: as in `send_with`.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = iov.as_mut_ptr().cast();
        mh.msg_iovlen = 1;
        mh.msg_control = cmsg.as_mut_ptr().cast();
        mh.msg_controllen = std::mem::size_of_val(&cmsg) as _;
        // SAFETY: `mh` describes valid buffers for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        assert!(n >= 0, "recvmsg: {}", std::io::Error::last_os_error());
        // SAFETY: walking the control messages the kernel just wrote.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&mh);
            while !c.is_null() {
                if (*c).cmsg_type == libc::SCM_RIGHTS {
                    let k = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                    let data = libc::CMSG_DATA(c) as *const i32;
                    for i in 0..k {
                        libc::close(std::ptr::read_unaligned(data.add(i)));
                    }
                    fds += k;
                }
                c = libc::CMSG_NXTHDR(&mh, c);
            }
        }
        if n == 0 {
            return (out, fds);
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
}

/// What the checks know of the connection's protocol state.
#[derive(Default)]
struct Seen {
    features_set: bool,
    reply_ack: bool,
    deferred_since_features: bool,
    deferred: usize,
}

/// Checks the shim's decision on `msg`; returns false when it ended the connection.
fn check_action(seen: &mut Seen, msg: &Message, action: &Result<Action, ShimError>) -> bool {
    let arg = msg.payload_u64().unwrap_or(0);
    let action = match action {
        Ok(a) => a,
        Err(ShimError::TooManyDeferred) => {
            assert!(
                msg.request == SET_VRING_ENABLE && !seen.features_set,
                "TooManyDeferred for request {}",
                msg.request
            );
            assert_eq!(seen.deferred, MAX_DEFERRED, "refused after {} deferred", seen.deferred);
            return false;
        }
        Err(e) => panic!("on_frontend failed with {e}"),
    };
    match action {
        Action::Defer { ack } => {
            assert_eq!(
                msg.request, SET_VRING_ENABLE,
                "only SET_VRING_ENABLE is deferred"
            );
            assert!(!seen.features_set, "deferred after SET_FEATURES");
            assert_eq!(
                *ack,
                seen.reply_ack && msg.flags & FLAG_NEED_REPLY != 0,
                "ack of a deferred enable (REPLY_ACK {}, flags {:#x})",
                seen.reply_ack,
                msg.flags
            );
            seen.deferred_since_features = true;
            seen.deferred += 1;
            assert!(seen.deferred <= MAX_DEFERRED, "{} enables deferred", seen.deferred);
        }
        Action::ForwardThenReplay | Action::ForwardAndDiscard => {
            assert_eq!(
                msg.request, SET_FEATURES,
                "{action:?} for request {}",
                msg.request
            );
            assert!(
                seen.deferred_since_features,
                "{action:?} with nothing deferred"
            );
            assert_eq!(
                matches!(action, Action::ForwardThenReplay),
                arg & 1 << 30 != 0,
                "replay iff SET_FEATURES acks protocol features ({arg:#x})"
            );
        }
        Action::Forward => {
            assert!(
                msg.request != SET_VRING_ENABLE || seen.features_set,
                "an early SET_VRING_ENABLE was forwarded"
            );
            assert_ne!(msg.request, SEND_RARP, "SEND_RARP was forwarded to the crate");
        }
        Action::Local { ack } => {
            assert_eq!(msg.request, SEND_RARP, "handled locally: request {}", msg.request);
            assert_eq!(
                *ack,
                seen.reply_ack && msg.flags & FLAG_NEED_REPLY != 0,
                "ack of SEND_RARP (REPLY_ACK {}, flags {:#x})",
                seen.reply_ack,
                msg.flags
            );
        }
    }
    match msg.request {
        SET_PROTOCOL_FEATURES => seen.reply_ack = arg & 1 << 3 != 0,
        SET_FEATURES => {
            seen.features_set = true;
            seen.deferred_since_features = false;
            seen.deferred = 0;
        }
        RESET_OWNER | RESET_DEVICE => seen.features_set = false,
        _ => {}
    }
    true
}

fn run(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let fds_a = usize::from(data[0]) % (MAX_SEND_FDS + 1);
    let fds_b = usize::from(data[3]) % (MAX_SEND_FDS + 1);
    let stream = &data[4..data.len().min(4 + MAX_STREAM)];
    let split = usize::from(u16::from_le_bytes([data[1], data[2]])) % (stream.len() + 1);
    let before = open_fds();
    {
        let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let (front, shim) = UnixStream::pair().unwrap();
        send_with(&front, &stream[..split], &null, fds_a);
        send_with(&front, &stream[split..], &null, fds_b);
        front.shutdown(std::net::Shutdown::Write).unwrap();
        let mut state = ShimState::default();
        let mut seen = Seen::default();
        let mut off = 0;
        loop {
            let rest = &stream[off..];
            let announced = (rest.len() >= HDR_LEN)
                .then(|| u32::from_le_bytes(rest[8..12].try_into().unwrap()) as usize);
            match recv_message(&shim) {
                Ok(None) => {
                    assert!(
                        rest.is_empty(),
                        "end of stream reported with {} bytes left",
                        rest.len()
                    );
                    break;
                }
                Ok(Some(msg)) => {
                    let n = HDR_LEN + msg.payload.len();
                    assert!(
                        msg.payload.len() <= MAX_PAYLOAD,
                        "{}-byte payload",
                        msg.payload.len()
                    );
                    assert!(
                        msg.fds.len() <= MAX_FDS,
                        "a message came with {} descriptors (MAX_FDS {MAX_FDS})",
                        msg.fds.len()
                    );
                    assert!(
                        n <= rest.len(),
                        "parsed {n} bytes, {} in the stream",
                        rest.len()
                    );
                    assert_eq!(
                        announced,
                        Some(msg.payload.len()),
                        "payload length vs header"
                    );
                    // The same bytes again, with as many descriptors.
                    let (a, b) = UnixStream::pair().unwrap();
                    send_message(&a, &msg).unwrap();
                    drop(a);
                    let (bytes, fds) = drain(&b);
                    assert_eq!(&bytes[..], &rest[..n], "re-encoded message differs");
                    assert_eq!(fds, msg.fds.len(), "re-encoded descriptors");
                    let en = vring_enable(&msg);
                    assert_eq!(
                        en.is_some(),
                        msg.request == SET_VRING_ENABLE && msg.payload.len() >= 8
                    );
                    let action = state.on_frontend(&msg);
                    if !check_action(&mut seen, &msg, &action) {
                        break;
                    }
                    off += n;
                }
                Err(ShimError::Oversized { size, .. }) => {
                    assert_eq!(announced, Some(size as usize), "Oversized for another size");
                    assert!(
                        size as usize > MAX_PAYLOAD,
                        "{size} bytes refused as oversized"
                    );
                    break;
                }
                Err(ShimError::Truncated) => {
                    assert!(
                        announced.is_none_or(|s| rest.len() < HDR_LEN + s),
                        "Truncated with a whole message of {} bytes in the stream",
                        rest.len()
                    );
                    assert!(!rest.is_empty());
                    break;
                }
                Err(e @ (ShimError::TooManyFds | ShimError::Io(_))) => {
                    assert!(
                        fds_a.max(fds_b) > MAX_FDS,
                        "{e} without too many descriptors"
                    );
                    break;
                }
                Err(e) => panic!("recv_message: {e}"),
            }
        }
    }
    assert_eq!(open_fds(), before, "descriptors leaked");
}

fuzz_target!(|data: &[u8]| run(data));
