//! Frames read from the tap ahead of the guest buffers they go to, many per call.
//!
//! A tap hands over one frame per `read`, so reading straight into each guest chain pays a
//! system call's entry and exit per frame. [`ReadAhead`] reads a batch of frames with one
//! [`TapIo::readv_batch`] call (one `io_uring` submission on a [`crate::tap_io::TapQueue`])
//! into buffers of its own, and the RX path copies each frame into the guest's chain from there.
//! The RX path reads ahead only where it pays, once a run has read
//! [`crate::datapath::AHEAD_AFTER`] frames one at a time (or the run before it read that many):
//! at moderate load a wake-up finds a few frames, and the reads past them, the copy and the
//! ring's per-read work cost more than the system calls saved.
//!
//! That copy into the first chain is the only extra one: the rest of a frame larger than its
//! first guest chain is placed in further chains straight from the read-ahead buffer, as it
//! would be from the RX path's scratch buffer.
//! Reading into the backend's own buffers also keeps guest chains out of the batch, so a read
//! that finds the tap empty between two that do not (a frame arrived meanwhile) leaves no chain
//! popped and unused.
//!
//! A batch is sized by what the last one found (`want`), bounded by [`READ_AHEAD`], by the room
//! the guest has posted and by the run's budget; a batch whose last read found the tap empty
//! says so ([`Ahead::Empty`]) once its frames are taken, without another call, within the run
//! that read it ([`ReadAhead::new_run`]). The worker watches the tap edge-triggered, and every
//! frame queued after that read raises an edge the worker takes after the run.

use std::io;

use crate::datapath::{TapIo, MAX_FRAME};

/// Most frames read ahead in one call (the buffers take `READ_AHEAD` × [`MAX_FRAME`] bytes of
/// address space per RX queue, allocated on first use; a small frame touches one page).
pub const READ_AHEAD: usize = 16;
/// Fewest reads a batch asks for once it is sized by what the last one found.
const MIN_BATCH: usize = 4;

/// What [`ReadAhead::next`] found.
#[derive(Debug)]
pub enum Ahead {
    /// A frame of `len` bytes in buffer `slot` (see [`ReadAhead::frame`]).
    Frame {
        /// The read-ahead buffer holding it.
        slot: usize,
        /// Its length (virtio-net header included).
        len: usize,
    },
    /// The tap has no more frames (or only answered with errors: see
    /// [`ReadAhead::take_errors`]).
    Empty,
}

/// Buffers of frames read ahead, taken in the order the tap gave them.
pub struct ReadAhead {
    /// `READ_AHEAD` buffers of `MAX_FRAME` bytes, one after the other (empty until first use).
    bufs: Box<[u8]>,
    /// One iovec per buffer, built with `bufs`.
    iov: Vec<libc::iovec>,
    /// Result of each read of the last batch: length or `-errno`.
    res: Vec<i32>,
    /// The next result to hand out.
    next: usize,
    /// The last batch's last read found the tap empty.
    drained: bool,
    /// Reads the next batch asks for.
    want: usize,
    /// Reads that failed (not for want of frames) since the last `take_errors`, and the last
    /// such error.
    failed: u32,
    last_error: Option<io::Error>,
}

// SAFETY: the iovecs point into `bufs`, owned by the same struct and never reallocated after
// they are built.
unsafe impl Send for ReadAhead {}

impl Default for ReadAhead {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAhead")
            .field("held", &self.held())
            .field("want", &self.want)
            .finish()
    }
}

impl ReadAhead {
    /// Nothing read, no buffer allocated yet.
    pub fn new() -> Self {
        ReadAhead {
            bufs: Box::default(),
            iov: Vec::new(),
            res: Vec::with_capacity(READ_AHEAD),
            next: 0,
            drained: false,
            want: MIN_BATCH,
            failed: 0,
            last_error: None,
        }
    }

    /// A new run starts: a batch's empty last read from an earlier run says nothing now. (Within
    /// a run it does: a frame queued after that read raises an edge the worker has not yet
    /// taken. Between runs the worker may have taken it already.)
    pub fn new_run(&mut self) {
        self.drained = false;
    }

    /// Frames read and not yet taken.
    pub fn held(&self) -> usize {
        self.res[self.next..].iter().filter(|&&r| r >= 0).count()
    }

    /// Drops the frames held (the ring is stopping) and returns how many there were.
    pub fn discard(&mut self) -> usize {
        let n = self.held();
        self.res.clear();
        self.next = 0;
        self.drained = false;
        n
    }

    /// The bytes of a frame [`ReadAhead::next`] returned, valid until the next call that reads.
    pub fn frame(&self, slot: usize, len: usize) -> &[u8] {
        let start = slot * MAX_FRAME;
        self.bufs
            .get(start..start + len.min(MAX_FRAME))
            .unwrap_or(&[])
    }

    /// Reads that failed in the batches read since the last call (counted when read, so that
    /// the run that read them reports them), and the last error.
    pub fn take_errors(&mut self) -> Option<(u32, io::Error)> {
        let n = std::mem::take(&mut self.failed);
        let e = self.last_error.take()?;
        Some((n, e))
    }

    /// The next frame, reading a batch of at most `room()` frames from `tap` when none is held.
    /// A failed read is skipped (and kept for [`ReadAhead::take_errors`]): the frames after it
    /// are handed out.
    pub fn next<T: TapIo + ?Sized>(&mut self, tap: &mut T, room: impl FnOnce() -> usize) -> Ahead {
        let mut room = Some(room);
        loop {
            while let Some(&r) = self.res.get(self.next) {
                self.next += 1;
                if r >= 0 {
                    return Ahead::Frame {
                        slot: self.next - 1,
                        len: r as usize,
                    };
                }
            }
            if std::mem::take(&mut self.drained) {
                self.discard();
                return Ahead::Empty;
            }
            let Some(room) = room.take() else {
                // The batch just read found nothing: the tap is empty.
                self.discard();
                return Ahead::Empty;
            };
            if self.iov.is_empty() {
                self.allocate();
            }
            let k = self.want.min(room()).clamp(1, READ_AHEAD);
            tap.readv_batch(&self.iov[..k], &mut self.res);
            self.res.truncate(k);
            self.next = 0;
            for &r in &self.res {
                if r < 0 && r != -libc::EAGAIN {
                    self.failed += 1;
                    self.last_error = Some(io::Error::from_raw_os_error(-r));
                }
            }
            let got = self.res.iter().filter(|&&r| r >= 0).count();
            // A batch with a frame shows the tap answers these reads; its empty last read
            // ends the run. One that found nothing ends it too.
            self.drained = got > 0 && self.res.last() == Some(&-libc::EAGAIN);
            self.want = if self.res.last() == Some(&-libc::EAGAIN) {
                (got + 2).clamp(MIN_BATCH, READ_AHEAD)
            } else {
                (k * 2).min(READ_AHEAD)
            };
        }
    }

    fn allocate(&mut self) {
        self.bufs = vec![0u8; READ_AHEAD * MAX_FRAME].into_boxed_slice();
        let base = self.bufs.as_mut_ptr();
        self.iov = (0..READ_AHEAD)
            .map(|i| libc::iovec {
                // In bounds: `i * MAX_FRAME` < `bufs.len()`.
                iov_base: base.wrapping_add(i * MAX_FRAME).cast(),
                iov_len: MAX_FRAME,
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A tap whose reads return scripted results, one per read; `None` is a frame of the
    /// next length in `frames`.
    struct Script {
        results: VecDeque<Result<usize, i32>>,
        batches: Vec<usize>,
        batched: bool,
    }

    impl TapIo for Script {
        fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
            match self.results.pop_front() {
                Some(Ok(n)) => {
                    // SAFETY: the iovec is a read-ahead buffer of MAX_FRAME bytes.
                    unsafe { std::ptr::write_bytes(iov[0].iov_base.cast::<u8>(), n as u8, n) };
                    Ok(n)
                }
                Some(Err(e)) => Err(io::Error::from_raw_os_error(e)),
                None => Err(io::Error::from_raw_os_error(libc::EAGAIN)),
            }
        }
        fn writev(&mut self, _: &[libc::iovec]) -> io::Result<usize> {
            unreachable!()
        }
        fn readv_batch(&mut self, bufs: &[libc::iovec], res: &mut Vec<i32>) {
            self.batches.push(bufs.len());
            if !self.batched {
                return crate::datapath::readv_each(self, bufs, res);
            }
            res.clear();
            for b in bufs {
                res.push(match self.readv(std::slice::from_ref(b)) {
                    Ok(n) => n as i32,
                    Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                });
            }
        }
    }

    fn script(r: &[Result<usize, i32>], batched: bool) -> Script {
        Script {
            results: r.iter().copied().collect(),
            batches: Vec::new(),
            batched,
        }
    }

    fn take_all(a: &mut ReadAhead, t: &mut Script, room: usize) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            match a.next(t, || room) {
                Ahead::Frame { slot, len } => {
                    let f = a.frame(slot, len);
                    assert!(f.iter().all(|&b| b == len as u8), "frame bytes");
                    out.push(format!("{len}"));
                }
                Ahead::Empty => return out,
            }
            if let Some((n, e)) = a.take_errors() {
                out.push(format!("{n}×e{}", e.raw_os_error().unwrap()));
            }
        }
    }

    #[test]
    fn a_hole_in_a_batch_loses_no_frame_and_keeps_the_order() {
        // Read 2 finds the tap empty, read 3 finds a frame that arrived meanwhile.
        let mut t = script(&[Ok(60), Err(libc::EAGAIN), Ok(61), Ok(62)], true);
        let mut a = ReadAhead::new();
        assert_eq!(take_all(&mut a, &mut t, 64), ["60", "61", "62"]);
        // A first batch of MIN_BATCH (4) reads whose last read found a frame: a second batch,
        // twice as large, which finds nothing.
        assert_eq!(t.batches, [4, 8]);
        assert_eq!(a.held(), 0);
    }

    #[test]
    fn an_empty_last_read_ends_the_run_without_another_call() {
        let mut t = script(&[Ok(60), Ok(61)], true);
        let mut a = ReadAhead::new();
        assert_eq!(take_all(&mut a, &mut t, 64), ["60", "61"]);
        assert_eq!(
            t.batches,
            [4],
            "one call: its empty last read ended the run"
        );
        // Next run: sized by what the last batch found (2 + 2).
        t.results.extend([Ok(70), Ok(71), Ok(72), Ok(73), Ok(74)]);
        assert_eq!(take_all(&mut a, &mut t, 64), ["70", "71", "72", "73", "74"]);
        assert_eq!(t.batches, [4, 4, 8]);
    }

    #[test]
    fn an_empty_read_of_an_earlier_run_is_not_trusted() {
        let mut t = script(&[Ok(60), Ok(61)], true);
        let mut a = ReadAhead::new();
        assert!(matches!(
            a.next(&mut t, || 64),
            Ahead::Frame { len: 60, .. }
        ));
        // The run ends here (no more guest buffers); a frame arrives; the next run takes the
        // held one, then must read the tap again.
        t.results.push_back(Ok(62));
        a.new_run();
        assert_eq!(take_all(&mut a, &mut t, 64), ["61", "62"]);
    }

    #[test]
    fn a_failed_read_is_counted_when_read_and_the_frames_after_it_are_kept() {
        let mut t = script(&[Ok(60), Err(libc::EIO), Ok(61)], true);
        let mut a = ReadAhead::new();
        assert_eq!(take_all(&mut a, &mut t, 64), ["60", "1×e5", "61"]);
        assert!(a.take_errors().is_none(), "counted once");
    }

    #[test]
    fn a_batch_never_asks_for_more_than_the_room() {
        let mut t = script(&[Ok(60), Ok(61), Ok(62)], true);
        let mut a = ReadAhead::new();
        assert!(matches!(a.next(&mut t, || 2), Ahead::Frame { len: 60, .. }));
        assert_eq!(t.batches, [2]);
        assert_eq!(a.held(), 1);
        assert_eq!(a.discard(), 1, "the held frame is counted when dropped");
        assert_eq!(a.held(), 0);
    }

    #[test]
    fn a_tap_without_batches_reads_one_at_a_time_up_to_the_first_empty_read() {
        let mut t = script(&[Ok(60), Ok(61)], false);
        let mut a = ReadAhead::new();
        assert_eq!(take_all(&mut a, &mut t, 64), ["60", "61"]);
        assert!(t.results.is_empty());
    }

    #[test]
    fn a_batch_that_finds_nothing_says_empty() {
        let mut t = script(&[], true);
        let mut a = ReadAhead::new();
        assert!(matches!(a.next(&mut t, || 64), Ahead::Empty));
        assert_eq!(t.batches, [4]);
    }
}
