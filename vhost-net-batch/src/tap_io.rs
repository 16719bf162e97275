//! How a worker moves frames to and from its tap queue: one system call per frame, or many
//! `writev`s or `read`s submitted at once through an `io_uring`.
//!
//! A tap takes or gives one frame per call and has no multi-frame write or read, so one
//! system call per frame pays its entry and exit per frame. Submitting a whole TX step's frames
//! (up to [`crate::datapath::TX_STEP`]) as one `io_uring_enter` pays them once per step.
//! Measured on the project's rig (a 2-vCPU VM, retpolines): 1,070–1,140 ns of CPU per 64-byte
//! frame written with `writev`, 720–830 ns through the ring
//! (`bench/results/2026-12-06-datapath-uring-64/`). On the RX side the same ring reads a batch of
//! frames ahead into the RX path's own buffers ([`crate::read_ahead`]) once a run has found the
//! tap holding many frames.
//!
//! Every submission is waited for before [`TapQueue`]'s `writev_batch` or `readv_batch`
//! returns: the kernel never touches the buffers after the call, so the caller's guest-memory
//! guard covers all of it. Entries carry `RWF_NOWAIT`, so a full or empty tap answers `EAGAIN`
//! at once instead of parking an entry in the kernel. The tap's fd is passed by number, not
//! registered: the ring holds no reference to it between calls, and a restarted backend can
//! attach the tap again at once.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types, IoUring};
use serde::{Deserialize, Serialize};

use crate::datapath::{readv_each, writev_each, TapFd, TapIo};

/// How frames are written to the tap (operator setting `--tap-io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TapIoKind {
    /// Each TX step's frames in one `io_uring` submission, and RX frames read ahead in batches
    /// through it where the tap holds many; one system call per frame where the kernel or a
    /// sandbox refuses `io_uring` (logged once per connection).
    #[default]
    Uring,
    /// One `writev`/`readv` system call per frame.
    Syscalls,
}

/// Failed `io_uring_enter` calls in one batch before the ring is given up.
const MAX_SUBMIT_FAILURES: u32 = 100;

/// Submission queue entries of a worker's ring: one TX step (an RX batch,
/// [`crate::read_ahead::READ_AHEAD`], is smaller).
const RING_ENTRIES: u32 = crate::datapath::TX_STEP as u32;

/// A worker's tap queue, written the way its [`TapIoKind`] says.
pub struct TapQueue {
    fd: TapFd,
    /// The ring while it is in use. None with `syscalls`, where no ring could be set up, and
    /// once the ring failed a submission: it is dropped then, and entries it never took are
    /// never taken.
    ring: Option<IoUring>,
    /// Why the ring was given up, until the worker has reported it.
    failure: Option<io::Error>,
}

impl std::fmt::Debug for TapQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapQueue")
            .field("fd", &self.fd.0)
            .field("kind", &self.kind())
            .finish()
    }
}

impl TapQueue {
    /// The tap queue `fd` with `kind` I/O; `Uring` falls back to system calls where no ring can
    /// be set up (old kernel, `kernel.io_uring_disabled`, seccomp: the error is returned beside
    /// the queue, for the caller to log).
    pub fn new(fd: RawFd, kind: TapIoKind) -> (Self, Option<io::Error>) {
        let (ring, err) = match kind {
            TapIoKind::Syscalls => (None, None),
            // The ring's fd is close-on-exec (io_uring_setup makes it so). Not SINGLE_ISSUER:
            // the ring is made on the connection's thread and used on the worker's.
            TapIoKind::Uring => match IoUring::builder().build(RING_ENTRIES) {
                Ok(r) => (Some(r), None),
                Err(e) => (None, Some(e)),
            },
        };
        let q = TapQueue {
            fd: TapFd(fd),
            ring,
            failure: None,
        };
        (q, err)
    }

    /// Why the ring stopped being used, once (for the worker to log).
    pub fn take_failure(&mut self) -> Option<io::Error> {
        self.failure.take()
    }

    /// The I/O in use (a ring that failed a submission counts as system calls).
    pub fn kind(&self) -> TapIoKind {
        if self.ring.is_some() {
            TapIoKind::Uring
        } else {
            TapIoKind::Syscalls
        }
    }
}

/// Submits `n` queued entries and collects their completions into `res` (indexed by user
/// data). Returns only when every entry the kernel took has completed; an error means it kept
/// refusing to take some.
fn submit_all(ring: &mut IoUring, n: usize, res: &mut [i32]) -> io::Result<()> {
    let mut done = 0;
    let mut failures = 0;
    while done < n {
        match ring.submit_and_wait(n - done) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => {
                // Entries the kernel has taken complete and are waited for. If it keeps
                // refusing to take them (EAGAIN, EBUSY are transient; others are not), give up
                // on the ring.
                failures += 1;
                if !ring.submission().is_empty() && failures > MAX_SUBMIT_FAILURES {
                    return Err(e);
                }
            }
        }
        for cqe in ring.completion() {
            if let Some(r) = res.get_mut(cqe.user_data() as usize) {
                *r = cqe.result();
                done += 1;
            }
        }
    }
    Ok(())
}

impl TapQueue {
    /// Runs operations `0..n` through the ring, operation `i` being `entry(i)`, and sets
    /// `res[i]` to its result (`-EAGAIN` for any not run). Returns how many ran: all of them,
    /// unless the ring is (or gets) given up, in which case the caller does the rest with
    /// system calls.
    ///
    /// # Safety
    /// The buffers each entry points to must stay valid until this returns (every completion
    /// is collected before it does).
    unsafe fn through_ring(
        &mut self,
        n: usize,
        entry: impl Fn(usize) -> squeue::Entry,
        res: &mut Vec<i32>,
    ) -> usize {
        res.clear();
        res.resize(n, -libc::EAGAIN);
        let mut base = 0;
        while base < n {
            let Some(ring) = self.ring.as_mut() else {
                break;
            };
            let end = (base + RING_ENTRIES as usize).min(n);
            let mut queued = 0;
            {
                let mut sq = ring.submission();
                for i in base..end {
                    let e = entry(i).user_data((i - base) as u64);
                    // SAFETY: the caller keeps the buffers valid until every completion is
                    // collected, which `submit_all` does before this returns.
                    if unsafe { sq.push(&e) }.is_err() {
                        break;
                    }
                    queued += 1;
                }
            }
            let submitted = if queued == 0 {
                Err(io::Error::other("the submission queue is full"))
            } else {
                submit_all(ring, queued, &mut res[base..base + queued])
            };
            match submitted {
                Ok(()) => base += queued,
                Err(e) => {
                    // The ring refused the work: one call per frame from now on.
                    self.ring = None;
                    self.failure = Some(e);
                }
            }
        }
        base
    }
}

impl TapIo for TapQueue {
    fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.fd.readv(iov)
    }

    fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.fd.writev(iov)
    }

    fn writev_batch(&mut self, iov: &[libc::iovec], frames: &[(usize, usize)], res: &mut Vec<i32>) {
        if self.ring.is_none() {
            return writev_each(&mut self.fd, iov, frames, res);
        }
        let fd = types::Fd(self.fd.0);
        let write = |i: usize| {
            let (start, end) = frames[i];
            opcode::Writev::new(fd, iov[start..end].as_ptr(), (end - start) as u32)
                // Never wait for room in the tap: a full one answers EAGAIN, as `writev` does.
                .rw_flags(libc::RWF_NOWAIT)
                .build()
        };
        // SAFETY: `iov` and the guest memory it points into outlive this call.
        let done = unsafe { self.through_ring(frames.len(), write, res) };
        if done < frames.len() {
            // Once, when the ring was just given up.
            let mut rest = Vec::with_capacity(frames.len() - done);
            writev_each(&mut self.fd, iov, &frames[done..], &mut rest);
            res[done..].copy_from_slice(&rest);
        }
    }

    fn batches_reads(&self) -> bool {
        self.ring.is_some()
    }

    fn readv_batch(&mut self, bufs: &[libc::iovec], res: &mut Vec<i32>) {
        if self.ring.is_none() {
            return readv_each(&mut self.fd, bufs, res);
        }
        let fd = types::Fd(self.fd.0);
        let read = |i: usize| {
            let b = &bufs[i];
            opcode::Read::new(fd, b.iov_base.cast(), b.iov_len as u32)
                // Never wait for a frame: an empty tap answers EAGAIN, as `readv` does.
                .rw_flags(libc::RWF_NOWAIT)
                .build()
        };
        // SAFETY: the buffers `bufs` points to outlive this call.
        let done = unsafe { self.through_ring(bufs.len(), read, res) };
        if done < bufs.len() {
            let mut rest = Vec::with_capacity(bufs.len() - done);
            readv_each(&mut self.fd, &bufs[done..], &mut rest);
            res[done..].copy_from_slice(&rest);
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

    #[test]
    fn reads_through_the_ring_take_queued_frames_in_order_then_answer_eagain() {
        for kind in [TapIoKind::Uring, TapIoKind::Syscalls] {
            let (a, b) = pair();
            let (mut q, _) = TapQueue::new(a.as_raw_fd(), kind);
            assert_eq!(q.batches_reads(), kind == TapIoKind::Uring);
            let sent = frames(5, 70);
            for f in &sent {
                // SAFETY: f is valid for its length.
                let n = unsafe { libc::write(b.as_raw_fd(), f.as_ptr().cast(), f.len()) };
                assert_eq!(n, 70);
            }
            let mut bufs = vec![vec![0xeeu8; 100]; 8];
            let (iov, _) = iovs(&mut bufs);
            let mut res = Vec::new();
            q.readv_batch(&iov, &mut res);
            assert_eq!(
                res,
                [
                    70,
                    70,
                    70,
                    70,
                    70,
                    -libc::EAGAIN,
                    -libc::EAGAIN,
                    -libc::EAGAIN
                ],
                "{kind:?}"
            );
            for (got, want) in bufs.iter().zip(&sent) {
                assert_eq!(&got[..70], &want[..], "{kind:?}: frames in order");
            }
            assert!(
                bufs[5].iter().all(|&x| x == 0xee),
                "{kind:?}: nothing else written"
            );
            assert!(q.take_failure().is_none());
            q.readv_batch(&iov[..2], &mut res);
            assert_eq!(res, [-libc::EAGAIN; 2], "{kind:?}: an empty tap");
        }
    }
}
