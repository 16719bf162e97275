//! The floor under any tap reader's cost per frame: a thread that only reads frames from the
//! tap and copies each into a buffer standing for guest memory, with no virtio work at all.
//! `vnb-bench datapath --floor` runs it beside the backends, on the same flood, so that a
//! backend's cost per RX frame can be split into what the tap asks of every reader and what
//! the backend adds.
//!
//! Three ways of reading are measured ([`FloorRead`]): one `readv` per frame straight into the
//! buffer (what `--tap-io syscalls` does), batches of `read`s submitted at once through an
//! `io_uring` into buffers of the reader's own and copied out (what our read-ahead does), and
//! one multishot read (`IORING_OP_READ_MULTISHOT`, Linux 6.7+) into a ring of provided
//! buffers, which prepares no submission per frame and never reads past the last frame (the
//! lever the 2026-12-06 profiles left untried).

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};

use io_uring::{cqueue, opcode, types, IoUring};
use vhost_net_batch::datapath::MAX_FRAME;
use vhost_net_batch::read_ahead::READ_AHEAD;

/// Buffers in the multishot read's provided-buffer ring (a power of two).
pub const MULTISHOT_BUFS: usize = 64;
/// Slots of the buffer standing for guest memory, each [`SLOT`] bytes, used in turn.
const SLOTS: usize = 256;
/// Bytes per slot: an MTU-sized frame and its virtio-net header (the tap has no offloads, so
/// none is larger; a larger one is cut, as a too-short guest chain would cut it).
const SLOT: usize = 4096;
/// How long a reader waits for the tap before it looks at its stop flag again.
const WAIT_MS: i32 = 50;
/// Provided-buffer group of the multishot read.
const GROUP: u16 = 1;
/// User data of the multishot read's entry.
const MULTISHOT: u64 = 1;

/// How the floor reader takes frames from the tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloorRead {
    /// One `readv` per frame, straight into the slot.
    Readv,
    /// [`READ_AHEAD`] `read`s per `io_uring_enter`, with `RWF_NOWAIT`, then a copy.
    Batch,
    /// One multishot read into [`MULTISHOT_BUFS`] provided buffers, then a copy.
    Multishot,
}

impl FloorRead {
    /// The name used on the command line and in reports (`floor:NAME`).
    pub fn name(self) -> &'static str {
        match self {
            FloorRead::Readv => "readv",
            FloorRead::Batch => "batch",
            FloorRead::Multishot => "multishot",
        }
    }

    /// The configuration name in a datapath campaign.
    pub fn config(self) -> String {
        format!("floor:{}", self.name())
    }
}

impl std::str::FromStr for FloorRead {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "readv" => Ok(FloorRead::Readv),
            "batch" => Ok(FloorRead::Batch),
            "multishot" => Ok(FloorRead::Multishot),
            _ => Err(format!(
                "unknown floor reader {s:?}: give readv, batch or multishot"
            )),
        }
    }
}

/// The buffer standing for guest memory: frames go into its slots in turn.
struct Guest {
    buf: Vec<u8>,
    slot: usize,
}

impl Guest {
    fn new() -> Self {
        Guest {
            buf: vec![0; SLOTS * SLOT],
            slot: 0,
        }
    }

    fn next(&mut self) -> &mut [u8] {
        self.slot = (self.slot + 1) % SLOTS;
        &mut self.buf[self.slot * SLOT..(self.slot + 1) * SLOT]
    }

    fn copy(&mut self, frame: &[u8]) {
        let d = self.next();
        let n = frame.len().min(d.len());
        d[..n].copy_from_slice(&frame[..n]);
    }
}

/// Counts of a floor reader, updated as it reads (another thread may watch them).
#[derive(Debug, Default)]
pub struct FloorCounts {
    /// Frames read.
    pub frames: AtomicU64,
    /// Their bytes, virtio-net header included.
    pub bytes: AtomicU64,
}

impl FloorCounts {
    fn add(&self, len: usize) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
    }
}

/// A read's result as a frame length: a tap never ends, so a read of nothing is an error.
fn frame_len(r: i32) -> io::Result<Option<usize>> {
    match r {
        1.. => Ok(Some(r as usize)),
        0 => Err(io::ErrorKind::UnexpectedEof.into()),
        e if e == -libc::EAGAIN => Ok(None),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

/// Waits until `fd` is readable or [`WAIT_MS`] passed.
fn wait_readable(fd: RawFd) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, WAIT_MS) };
}

/// Reads frames from `fd` (non-blocking, one frame per read) the way `how` says until `stop`,
/// counting them in `counts`. Errors are the ring's setup (a kernel without multishot reads
/// says so here) or a read failing for another reason than an empty tap.
pub fn read_until(
    fd: RawFd,
    how: FloorRead,
    stop: &AtomicBool,
    counts: &FloorCounts,
) -> io::Result<()> {
    match how {
        FloorRead::Readv => read_each(fd, stop, counts),
        FloorRead::Batch => read_batches(fd, stop, counts),
        FloorRead::Multishot => read_multishot(fd, stop, counts),
    }
}

fn read_each(fd: RawFd, stop: &AtomicBool, counts: &FloorCounts) -> io::Result<()> {
    let mut guest = Guest::new();
    while !stop.load(Ordering::Relaxed) {
        let slot = guest.next();
        let iov = libc::iovec {
            iov_base: slot.as_mut_ptr().cast(),
            iov_len: slot.len(),
        };
        // SAFETY: the iovec points into `guest`, valid for its length.
        let n = unsafe { libc::readv(fd, &iov, 1) };
        let r = if n < 0 {
            -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            n as i32
        };
        match frame_len(r)? {
            Some(len) => counts.add(len),
            None => wait_readable(fd),
        }
    }
    Ok(())
}

fn read_batches(fd: RawFd, stop: &AtomicBool, counts: &FloorCounts) -> io::Result<()> {
    let mut ring = IoUring::new(READ_AHEAD as u32)?;
    let mut bufs = vec![0u8; READ_AHEAD * MAX_FRAME];
    let mut guest = Guest::new();
    let mut res = [0i32; READ_AHEAD];
    while !stop.load(Ordering::Relaxed) {
        {
            let mut sq = ring.submission();
            for i in 0..READ_AHEAD {
                // In bounds: i * MAX_FRAME < bufs.len().
                let buf = bufs.as_mut_ptr().wrapping_add(i * MAX_FRAME);
                let e = opcode::Read::new(types::Fd(fd), buf, MAX_FRAME as u32)
                    .rw_flags(libc::RWF_NOWAIT)
                    .build()
                    .user_data(i as u64);
                // SAFETY: `bufs` outlives the batch, whose completions are all collected below.
                unsafe { sq.push(&e) }.map_err(|_| io::Error::other("submission queue full"))?;
            }
        }
        let mut done = 0;
        while done < READ_AHEAD {
            match ring.submit_and_wait(READ_AHEAD - done) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
            for c in ring.completion() {
                if let Some(r) = res.get_mut(c.user_data() as usize) {
                    *r = c.result();
                    done += 1;
                }
            }
        }
        for (i, &r) in res.iter().enumerate() {
            if let Some(len) = frame_len(r)? {
                let start = i * MAX_FRAME;
                guest.copy(&bufs[start..start + len]);
                counts.add(len);
            }
        }
        if res[READ_AHEAD - 1] < 0 {
            wait_readable(fd);
        }
    }
    Ok(())
}

/// The provided-buffer ring's entries: page-aligned memory the kernel reads.
struct BufRing {
    base: *mut types::BufRingEntry,
    bytes: usize,
}

impl BufRing {
    fn new(entries: usize) -> io::Result<Self> {
        let bytes = (entries * std::mem::size_of::<types::BufRingEntry>()).max(4096);
        // SAFETY: an anonymous private mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(BufRing {
            base: p.cast(),
            bytes,
        })
    }

    /// The tail the kernel reads, shared with it.
    fn tail(&self) -> &AtomicU16 {
        // SAFETY: the tail lies in the first entry of the mapping, 2-byte aligned, and lives
        // as long as `self`.
        unsafe { &*types::BufRingEntry::tail(self.base).cast::<AtomicU16>() }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.base.cast(), self.bytes) };
    }
}

fn read_multishot(fd: RawFd, stop: &AtomicBool, counts: &FloorCounts) -> io::Result<()> {
    // Declared before the ring, so dropped after it on every return. The kernel writes into
    // it: its address is taken from a mutable pointer.
    let mut bufs = vec![0u8; MULTISHOT_BUFS * MAX_FRAME];
    let br = BufRing::new(MULTISHOT_BUFS)?;
    // Reads run only when this thread enters the ring (DEFER_TASKRUN): the kernel touches the
    // buffers only within `submit_with_args`.
    let mut ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        // Room for a completion per buffer: a full completion queue ends a multishot read.
        .setup_cqsize(2 * MULTISHOT_BUFS as u32)
        .build(8)
        .map_err(|e| io::Error::new(e.kind(), format!("io_uring with DEFER_TASKRUN: {e}")))?;
    // SAFETY: `br` stays mapped until after the ring is dropped.
    unsafe {
        ring.submitter().register_buf_ring_with_flags(
            br.base as u64,
            MULTISHOT_BUFS as u16,
            GROUP,
            0,
        )
    }
    .map_err(|e| io::Error::new(e.kind(), format!("provided-buffer ring (Linux 5.19+): {e}")))?;
    let mask = MULTISHOT_BUFS as u16 - 1;
    let mut tail: u16 = 0;
    let base = bufs.as_mut_ptr() as u64;
    let give = |bid: u16, tail: &mut u16| {
        // SAFETY: `tail & mask` indexes the ring's MULTISHOT_BUFS entries; the kernel reads an
        // entry only after the tail store that publishes it.
        let e = unsafe { &mut *br.base.add(usize::from(*tail & mask)) };
        e.set_addr(base + u64::from(bid) * MAX_FRAME as u64);
        e.set_len(MAX_FRAME as u32);
        e.set_bid(bid);
        *tail = tail.wrapping_add(1);
    };
    for bid in 0..MULTISHOT_BUFS as u16 {
        give(bid, &mut tail);
    }
    br.tail().store(tail, Ordering::Release);
    let arm = opcode::ReadMulti::new(types::Fd(fd), 0, GROUP)
        .build()
        .user_data(MULTISHOT);
    let push = |ring: &mut IoUring| {
        // SAFETY: the entry reads into provided buffers, which live as long as the ring.
        unsafe { ring.submission().push(&arm) }
            .map_err(|_| io::Error::other("submission queue full"))
    };
    push(&mut ring)?;
    let mut guest = Guest::new();
    let wait = types::Timespec::new().nsec(WAIT_MS as u32 * 1_000_000);
    let args = types::SubmitArgs::new().timespec(&wait);
    while !stop.load(Ordering::Relaxed) {
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
        let mut rearm = false;
        for c in ring.completion() {
            let r = c.result();
            if r != -libc::ENOBUFS {
                if let Some(len) = frame_len(r)? {
                    let bid = cqueue::buffer_select(c.flags())
                        .ok_or_else(|| io::Error::other("a multishot read without a buffer"))?;
                    let start = usize::from(bid) * MAX_FRAME;
                    guest.copy(&bufs[start..start + len]);
                    counts.add(len);
                    give(bid, &mut tail);
                }
            }
            // Out of buffers (or stopped for another reason): armed again below.
            rearm |= !cqueue::more(c.flags());
        }
        br.tail().store(tail, Ordering::Release);
        if rearm {
            push(&mut ring)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A non-blocking SOCK_SEQPACKET pair: one frame per read, pollable, like a tap.
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

    #[test]
    fn every_reader_takes_every_frame_once_including_ones_sent_while_it_waits() {
        for how in [FloorRead::Readv, FloorRead::Batch, FloorRead::Multishot] {
            let (a, b) = pair();
            let stop = Arc::new(AtomicBool::new(false));
            let counts = Arc::new(FloorCounts::default());
            let send = |n: usize, len: usize| {
                for i in 0..n {
                    let f = vec![i as u8; len];
                    // SAFETY: f is valid for its length.
                    let w = unsafe { libc::write(b.as_raw_fd(), f.as_ptr().cast(), len) };
                    assert_eq!(w, len as isize);
                }
            };
            // More than one batch and one ring of buffers before the reader starts.
            send(100, 70);
            let reader = {
                let (stop, counts) = (stop.clone(), counts.clone());
                let fd = a.as_raw_fd();
                std::thread::spawn(move || read_until(fd, how, &stop, &counts))
            };
            let until = |n: u64| {
                let end = Instant::now() + Duration::from_secs(10);
                while counts.frames.load(Ordering::Relaxed) < n && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(5));
                }
            };
            until(100);
            // The reader has drained the socket and waits: frames sent now wake it.
            std::thread::sleep(Duration::from_millis(120));
            send(30, 1514);
            until(130);
            std::thread::sleep(Duration::from_millis(60));
            stop.store(true, Ordering::Relaxed);
            reader
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("{how:?}: {e}"));
            assert_eq!(counts.frames.load(Ordering::Relaxed), 130, "{how:?}");
            assert_eq!(
                counts.bytes.load(Ordering::Relaxed),
                100 * 70 + 30 * 1514,
                "{how:?}"
            );
        }
    }

    #[test]
    fn a_failing_read_is_an_error_not_a_hang() {
        for how in [FloorRead::Readv, FloorRead::Batch, FloorRead::Multishot] {
            // A write-only end: reads fail with EBADF (multishot: at once or at arming).
            let mut fds = [0; 2];
            // SAFETY: fds has room for two descriptors.
            assert_eq!(
                unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) },
                0
            );
            // SAFETY: both descriptors were just created and are owned here.
            let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            let stop = AtomicBool::new(false);
            let counts = FloorCounts::default();
            let e = read_until(w.as_raw_fd(), how, &stop, &counts)
                .expect_err("reading a pipe's write end fails");
            assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{how:?}: {e}");
            drop(r);
        }
    }

    #[test]
    fn names_round_trip() {
        for how in [FloorRead::Readv, FloorRead::Batch, FloorRead::Multishot] {
            assert_eq!(how.name().parse::<FloorRead>(), Ok(how));
        }
        assert!("uring".parse::<FloorRead>().is_err());
    }
}
