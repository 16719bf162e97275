//! How a worker moves frames to and from its tap queue: one system call per frame, or, for the
//! guest → tap direction, many `writev`s submitted at once through an `io_uring`.
//!
//! A tap takes one frame per `write` and has no multi-frame write, so on the TX path the system
//! call's entry and exit are paid once per frame. Submitting a whole TX step's frames (up to
//! [`crate::datapath::TX_STEP`]) as one `io_uring_enter` pays them once per step. Measured on the
//! project's rig (a 2-vCPU VM, retpolines): 1,070–1,140 ns of CPU per 64-byte frame written with
//! `writev`, 720–830 ns through the ring (`bench/results/2026-12-06-datapath-uring-64/`).
//!
//! Every submission is waited for before [`UringTap::writev_batch`] returns: the kernel never
//! reads guest memory after the call, so the caller's guest-memory guard covers all of it.
//! The tap's fd is passed by number, not registered: the ring holds no reference to it between
//! calls, and a restarted backend can attach the tap again at once.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};
use serde::{Deserialize, Serialize};

use crate::datapath::{writev_each, TapFd, TapIo};

/// How frames are written to the tap (operator setting `--tap-io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TapIoKind {
    /// Each TX step's frames in one `io_uring` submission; one `writev` per frame where the
    /// kernel or a sandbox refuses `io_uring` (logged once per connection).
    #[default]
    Uring,
    /// One `writev`/`readv` system call per frame.
    Syscalls,
}

/// Failed `io_uring_enter` calls in one batch before the ring is given up.
const MAX_SUBMIT_FAILURES: u32 = 100;

/// Submission queue entries of a worker's ring: one TX step.
const RING_ENTRIES: u32 = crate::datapath::TX_STEP as u32;

/// A tap queue written through an `io_uring`.
pub struct UringTap {
    fd: TapFd,
    ring: IoUring,
    /// The ring failed a submission: it is never entered again.
    broken: bool,
    /// Why, until the worker has reported it.
    failure: Option<io::Error>,
}

impl std::fmt::Debug for UringTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringTap").field("fd", &self.fd.0).finish()
    }
}

impl UringTap {
    /// A ring for the tap queue `fd`; fails where `io_uring` is unavailable (old kernel,
    /// `kernel.io_uring_disabled`, seccomp).
    pub fn new(fd: RawFd) -> io::Result<Self> {
        // The ring's fd is close-on-exec (io_uring_setup makes it so). Not SINGLE_ISSUER: the
        // ring is made on the connection's thread and used on the worker's.
        let ring = IoUring::builder().build(RING_ENTRIES)?;
        Ok(UringTap {
            fd: TapFd(fd),
            ring,
            broken: false,
            failure: None,
        })
    }

    /// Submits `n` queued entries and collects their completions into `res` (indexed by user
    /// data). Returns only when every submitted entry has completed.
    fn submit_all(&mut self, n: usize, res: &mut [i32]) -> io::Result<()> {
        let mut done = 0;
        let mut failures = 0;
        while done < n {
            match self.ring.submit_and_wait(n - done) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // Entries the kernel has taken complete and are waited for. If it keeps
                    // refusing to take them (EAGAIN, EBUSY are transient; others are not), give
                    // up on the ring: entries never taken are never taken later.
                    failures += 1;
                    if !self.ring.submission().is_empty() && failures > MAX_SUBMIT_FAILURES {
                        return Err(e);
                    }
                }
            }
            for cqe in self.ring.completion() {
                if let Some(r) = res.get_mut(cqe.user_data() as usize) {
                    *r = cqe.result();
                    done += 1;
                }
            }
        }
        Ok(())
    }
}

impl TapIo for UringTap {
    fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.fd.readv(iov)
    }

    fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.fd.writev(iov)
    }

    fn writev_batch(&mut self, iov: &[libc::iovec], frames: &[(usize, usize)], res: &mut Vec<i32>) {
        if self.broken {
            return writev_each(&mut self.fd, iov, frames, res);
        }
        res.clear();
        res.resize(frames.len(), -libc::EAGAIN);
        let mut base = 0;
        while base < frames.len() {
            let chunk = &frames[base..(base + RING_ENTRIES as usize).min(frames.len())];
            let mut queued = 0;
            {
                let mut sq = self.ring.submission();
                for (i, &(start, end)) in chunk.iter().enumerate() {
                    let e = opcode::Writev::new(
                        types::Fd(self.fd.0),
                        iov[start..end].as_ptr(),
                        (end - start) as u32,
                    )
                    // Never wait for room in the tap: a full one answers EAGAIN, as `writev` does.
                    .rw_flags(libc::RWF_NOWAIT)
                    .build()
                    .user_data(i as u64);
                    // SAFETY: the iovecs and the guest memory they point into stay valid until
                    // `submit_all` below has collected this entry's completion.
                    if unsafe { sq.push(&e) }.is_err() {
                        break;
                    }
                    queued += 1;
                }
            }
            let submitted = if queued == 0 {
                Err(io::Error::other("the submission queue is full"))
            } else {
                self.submit_all(queued, &mut res[base..base + queued])
            };
            if let Err(e) = submitted {
                // The ring refused the work: it is not entered again (entries it did not take
                // stay unsubmitted for good), and frames go one call at a time from now on.
                self.broken = true;
                self.failure = Some(e);
                let mut one = Vec::with_capacity(chunk.len());
                writev_each(&mut self.fd, iov, chunk, &mut one);
                res[base..base + chunk.len()].copy_from_slice(&one);
                queued = chunk.len();
            }
            base += queued;
        }
    }
}

/// A worker's tap queue, written the way its [`TapIoKind`] says.
#[derive(Debug)]
pub enum TapQueue {
    /// One system call per frame.
    Syscalls(TapFd),
    /// TX steps through an `io_uring`.
    Uring(Box<UringTap>),
}

impl TapQueue {
    /// The tap queue `fd` with `kind` I/O; `Uring` falls back to system calls if no ring can be
    /// set up (the error is returned beside the queue, for the caller to log).
    pub fn new(fd: RawFd, kind: TapIoKind) -> (Self, Option<io::Error>) {
        match kind {
            TapIoKind::Syscalls => (TapQueue::Syscalls(TapFd(fd)), None),
            TapIoKind::Uring => match UringTap::new(fd) {
                Ok(u) => (TapQueue::Uring(Box::new(u)), None),
                Err(e) => (TapQueue::Syscalls(TapFd(fd)), Some(e)),
            },
        }
    }

    /// Why the ring stopped being used, once (for the worker to log).
    pub fn take_failure(&mut self) -> Option<io::Error> {
        match self {
            TapQueue::Uring(u) => u.failure.take(),
            TapQueue::Syscalls(_) => None,
        }
    }

    /// The I/O in use (a ring that failed a submission counts as system calls).
    pub fn kind(&self) -> TapIoKind {
        match self {
            TapQueue::Uring(u) if !u.broken => TapIoKind::Uring,
            _ => TapIoKind::Syscalls,
        }
    }
}

impl TapIo for TapQueue {
    fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        match self {
            TapQueue::Syscalls(t) => t.readv(iov),
            TapQueue::Uring(t) => t.readv(iov),
        }
    }

    fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        match self {
            TapQueue::Syscalls(t) => t.writev(iov),
            TapQueue::Uring(t) => t.writev(iov),
        }
    }

    fn writev_batch(&mut self, iov: &[libc::iovec], frames: &[(usize, usize)], res: &mut Vec<i32>) {
        match self {
            TapQueue::Syscalls(t) => t.writev_batch(iov, frames, res),
            TapQueue::Uring(t) => t.writev_batch(iov, frames, res),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A non-blocking SOCK_SEQPACKET pair: frame boundaries kept, EAGAIN when full.
    fn pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds has room for two descriptors.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both descriptors were just created and are owned here.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn frames(n: usize, len: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![i as u8; len]).collect()
    }

    fn iovs(bufs: &mut [Vec<u8>]) -> (Vec<libc::iovec>, Vec<(usize, usize)>) {
        let iov: Vec<_> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let ranges = (0..iov.len()).map(|i| (i, i + 1)).collect();
        (iov, ranges)
    }

    fn read_all(fd: &OwnedFd) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                return out;
            }
            out.push(buf[..n as usize].to_vec());
        }
    }

    #[test]
    fn a_batch_goes_out_in_order_through_the_ring() {
        let (a, b) = pair();
        let (mut q, fallback) = TapQueue::new(a.as_raw_fd(), TapIoKind::Uring);
        assert!(fallback.is_none(), "no io_uring here: {fallback:?}");
        let mut bufs = frames(150, 60);
        let (iov, ranges) = iovs(&mut bufs);
        let mut res = Vec::new();
        q.writev_batch(&iov, &ranges, &mut res);
        assert_eq!(res, vec![60; 150]);
        assert!(q.take_failure().is_none());
        assert_eq!(q.kind(), TapIoKind::Uring, "the ring is still in use");
        assert_eq!(read_all(&b), bufs, "every frame, once, in order");
    }

    #[test]
    fn a_full_peer_refuses_the_tail_with_eagain_and_nothing_is_lost() {
        for kind in [TapIoKind::Uring, TapIoKind::Syscalls] {
            let (a, b) = pair();
            let (mut q, _) = TapQueue::new(a.as_raw_fd(), kind);
            let mut bufs = frames(64, 2000);
            let (iov, ranges) = iovs(&mut bufs);
            let mut res = Vec::new();
            let mut sent = 0;
            // Fill the socket until it refuses.
            for _ in 0..1000 {
                q.writev_batch(&iov, &ranges, &mut res);
                let ok = res.iter().filter(|&&r| r == 2000).count();
                assert!(
                    res.iter().all(|&r| r == 2000 || r == -libc::EAGAIN),
                    "{kind:?}: {res:?}"
                );
                sent += ok;
                if ok < ranges.len() {
                    break;
                }
            }
            assert!(res.contains(&-libc::EAGAIN), "{kind:?}: never full");
            if kind == TapIoKind::Syscalls {
                let first = res.iter().position(|&r| r < 0).unwrap();
                assert!(res[first..].iter().all(|&r| r == -libc::EAGAIN), "{res:?}");
            }
            assert_eq!(
                read_all(&b).len(),
                sent,
                "{kind:?}: every accepted frame arrived"
            );
        }
    }

    #[test]
    fn errors_other_than_eagain_are_reported_per_frame() {
        let (a, b) = pair();
        let (mut q, _) = TapQueue::new(a.as_raw_fd(), TapIoKind::Uring);
        drop(b);
        let mut bufs = frames(3, 60);
        let (iov, ranges) = iovs(&mut bufs);
        let mut res = Vec::new();
        q.writev_batch(&iov, &ranges, &mut res);
        assert_eq!(res, vec![-libc::EPIPE; 3]);
        assert_eq!(
            q.kind(),
            TapIoKind::Uring,
            "a frame's error is not the ring's"
        );
    }
}
