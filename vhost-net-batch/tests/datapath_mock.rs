//! RX/TX data path over `virtio_queue::mock` guest memory with a scripted tap.

use std::collections::VecDeque;
use std::io;

use vhost_net_batch::datapath::{
    should_notify, ChainError, DeliverError, HdrLayout, PathError, RxPath, TapIo, TxPath,
    AHEAD_AFTER, CONTROL_INBOX, MAX_CHAIN_DESCS, MAX_FRAME, MAX_SEGMENTS, RUN_DESC_BUDGET,
    USED_PUBLISH,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const QSIZE: u16 = 256;
const BUF: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x100_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;

thread_local! {
    /// Whether this thread's [`FakeTap`]s read many frames per call (see [`both_reads`]).
    static READ_AHEAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs an RX test twice: the path reading straight into guest chains (one `readv` per frame),
/// then reading ahead into its own buffers (as with a tap served by an `io_uring`).
fn both_reads(test: impl Fn(bool)) {
    for ahead in [false, true] {
        READ_AHEAD.with(|c| c.set(ahead));
        eprintln!("read-ahead: {ahead}");
        test(ahead);
    }
}

/// An RX path that, on a tap that batches reads, reads ahead from a run's first frame (the
/// tests below check read-ahead; `rx_reads_ahead_only_once_a_run_finds_many_frames` checks
/// when it starts by default).
fn rx_path() -> RxPath {
    RxPath::new().with_ahead_after(0)
}

#[derive(Default)]
struct FakeTap {
    /// Frames the tap hands over, one per read; an empty one is a read failing with `EIO`.
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
    tx_error: Option<i32>,
    /// Reads made one at a time (`readv`), and the size of each batch of reads.
    direct_reads: usize,
    batches: Vec<usize>,
}

fn iov_total(iov: &[libc::iovec]) -> usize {
    iov.iter().map(|v| v.iov_len).sum()
}

impl FakeTap {
    fn read_one(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        if iov.len() > MAX_SEGMENTS {
            // As the kernel does (UIO_MAXIOV).
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let frame = self
            .rx
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        if frame.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        assert!(
            iov_total(iov) >= frame.len(),
            "the data path must offer room for a whole frame"
        );
        let mut off = 0;
        for v in iov {
            let n = v.iov_len.min(frame.len() - off);
            // SAFETY: the iovecs point into guest memory or the RX scratch buffer.
            unsafe { std::ptr::copy_nonoverlapping(frame[off..].as_ptr(), v.iov_base.cast(), n) };
            off += n;
            if off == frame.len() {
                break;
            }
        }
        Ok(frame.len())
    }
}

impl TapIo for FakeTap {
    fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.direct_reads += 1;
        self.read_one(iov)
    }

    fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        if iov.len() > MAX_SEGMENTS {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if let Some(e) = self.tx_error {
            return Err(io::Error::from_raw_os_error(e));
        }
        let mut out = Vec::new();
        for v in iov {
            // SAFETY: the iovecs point into guest memory.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
            });
        }
        let n = out.len();
        self.tx.push(out);
        Ok(n)
    }

    fn batches_reads(&self) -> bool {
        READ_AHEAD.with(|c| c.get())
    }

    fn readv_batch(&mut self, bufs: &[libc::iovec], res: &mut Vec<i32>) {
        // Like a ring: every read is tried, empty ones too.
        self.batches.push(bufs.len());
        res.clear();
        for b in bufs {
            res.push(match self.read_one(std::slice::from_ref(b)) {
                Ok(n) => n as i32,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => -libc::EAGAIN,
                Err(e) => -e.raw_os_error().unwrap(),
            });
        }
    }
}

fn mem() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Used ring entries (id, len) published so far.
fn used(m: &GuestMemoryMmap<()>, q: &Queue) -> Vec<(u32, u32)> {
    let base = q.used_ring();
    let idx: u16 = m.read_obj(GuestAddress(base + 2)).unwrap();
    (0..idx as u64)
        .map(|i| {
            let e = base + 4 + 8 * (i % QSIZE as u64);
            (
                m.read_obj(GuestAddress(e)).unwrap(),
                m.read_obj(GuestAddress(e + 4)).unwrap(),
            )
        })
        .collect()
}

fn frame(payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f[0] = 1; // NEEDS_CSUM, to check the header passes untouched
    f.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    f
}

#[test]
fn tx_moves_split_and_indirect_chains_to_the_tap() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let f1 = frame(100, 1);
    let f2 = frame(1400, 2);
    // Chain 0: header and payload in separate descriptors.
    m.write_slice(&f1[..12], GuestAddress(BUF)).unwrap();
    m.write_slice(&f1[12..], GuestAddress(BUF + 0x1000))
        .unwrap();
    // Chain 1: indirect table with three descriptors.
    let table = BUF + 0x10000;
    m.write_slice(&f2[..12], GuestAddress(BUF + 0x2000))
        .unwrap();
    m.write_slice(&f2[12..700], GuestAddress(BUF + 0x3000))
        .unwrap();
    m.write_slice(&f2[700..], GuestAddress(BUF + 0x4000))
        .unwrap();
    for (i, (a, l, fl, nx)) in [
        (BUF + 0x2000, 12u32, N, 1u16),
        (BUF + 0x3000, 688, N, 2),
        (BUF + 0x4000, (f2.len() - 700) as u32, 0, 0),
    ]
    .into_iter()
    .enumerate()
    {
        m.write_obj(d(a, l, fl, nx), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    vq.add_desc_chains(
        &[
            d(BUF, 12, N, 1),
            d(BUF + 0x1000, 100, 0, 0),
            d(table, 48, VRING_DESC_F_INDIRECT as u16, 0),
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap::default();
    let r = TxPath::new().run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
    assert_eq!(r.counts.packets, 2);
    assert_eq!(r.counts.bytes, 100 + 1400);
    assert_eq!(r.counts.bad_chains, 0);
    assert_eq!(tap.tx, vec![f1, f2]);
    assert_eq!(used(&m, &q), vec![(0, 0), (2, 0)]);
    assert!(!r.blocked && !r.more);
}

/// Writes descriptors at their table slots and publishes `heads` on the avail ring.
fn publish(
    m: &GuestMemoryMmap<()>,
    vq: &MockSplitQueue<GuestMemoryMmap<()>>,
    descs: &[(u16, RawDescriptor)],
    heads: &[u16],
) {
    for &(i, desc) in descs {
        vq.desc_table().store(i, desc).unwrap();
    }
    let avail = vq.avail_addr().0;
    let idx: u16 = m.read_obj(GuestAddress(avail + 2)).unwrap();
    for (k, &h) in heads.iter().enumerate() {
        let slot = (idx as u64 + k as u64) % QSIZE as u64;
        m.write_obj(h, GuestAddress(avail + 4 + 2 * slot)).unwrap();
    }
    m.write_obj(
        idx.wrapping_add(heads.len() as u16),
        GuestAddress(avail + 2),
    )
    .unwrap();
}

#[test]
fn tx_control_frames_are_consumed_and_never_reach_the_tap() {
    // Ordinary frames and control frames (EtherType 0x88b5) interleaved in one step: the
    // control frames go to the control inbox, whole, and everything else to the tap in order.
    // One control frame has its EtherType split across two descriptors, another's lies in a
    // descriptor after a header-only one, and a frame whose EtherType differs in one byte is
    // ordinary.
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let eth = |ethertype: [u8; 2], payload: &[u8]| {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x52, 0x54, 0, 0x77, 1, 2, 0x52, 0x54, 0, 0x77, 1, 3]);
        f.extend_from_slice(&ethertype);
        f.extend_from_slice(payload);
        f
    };
    let ctl1 = eth([0x88, 0xb5], b"VNB1 first control frame");
    let ordinary1 = eth([0x08, 0x00], &[7; 60]);
    let ctl2 = eth([0x88, 0xb5], b"VNB1 second, split");
    let near_miss = eth([0x88, 0xb6], &[9; 46]);
    let ctl3 = eth([0x88, 0xb5], b"VNB1 third, after a header-only descriptor");
    // (guest address, bytes) of each descriptor; a chain is a list of them.
    let chains: Vec<Vec<&[u8]>> = vec![
        vec![&ctl1[..]],
        vec![&ordinary1[..]],
        // Split between the two bytes of the EtherType (offset 12 + 12 + 1).
        vec![&ctl2[..25], &ctl2[25..]],
        vec![&near_miss[..]],
        vec![&ctl3[..12], &ctl3[12..]],
    ];
    let mut descs = Vec::new();
    let mut heads = Vec::new();
    let mut addr = BUF;
    for c in &chains {
        heads.push(descs.len() as u16);
        for (k, part) in c.iter().enumerate() {
            m.write_slice(part, GuestAddress(addr)).unwrap();
            let i = descs.len() as u16;
            let last = k + 1 == c.len();
            descs.push((
                i,
                d(
                    addr,
                    part.len() as u32,
                    if last { 0 } else { N },
                    if last { 0 } else { i + 1 },
                ),
            ));
            addr += 0x1000;
        }
    }
    publish(&m, &vq, &descs, &heads);
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap::default();
    let mut tx = TxPath::new();
    let r = tx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
    assert_eq!(
        tap.tx,
        vec![ordinary1, near_miss],
        "only ordinary frames reach the tap"
    );
    assert_eq!((r.counts.packets, r.counts.control), (2, 3));
    let got: Vec<Vec<u8>> = tx.control.iter().map(|f| f.bytes().to_vec()).collect();
    assert_eq!(
        got,
        vec![
            ctl1[12..].to_vec(),
            ctl2[12..].to_vec(),
            ctl3[12..].to_vec()
        ],
        "control frames reach the inbox whole, without the virtio-net header"
    );
    assert_eq!(
        used(&m, &q).iter().map(|e| e.0).collect::<Vec<_>>(),
        heads.iter().map(|&h| u32::from(h)).collect::<Vec<_>>(),
        "every chain is completed"
    );
}

#[test]
fn tx_moved_counts_each_chain_once_when_the_control_inbox_overflows() {
    // Found by the `datapath` fuzz target. Control frames beyond the inbox are dropped and
    // counted in both `control` and `dropped`; `moved()` (the run's budget, the batch-size
    // histogram) must still count each chain taken once.
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut ctl = frame(60, 1);
    ctl[24..26].copy_from_slice(&[0x88, 0xb5]);
    m.write_slice(&ctl, GuestAddress(BUF)).unwrap();
    let n = CONTROL_INBOX + 4;
    let descs: Vec<_> = (0..n).map(|_| d(BUF, ctl.len() as u32, 0, 0)).collect();
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap::default();
    let mut tx = TxPath::new();
    let r = tx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
    assert_eq!(tx.control.len(), CONTROL_INBOX);
    assert_eq!((r.counts.control, r.counts.dropped), (n as u64, 4));
    assert_eq!(r.moved(), u64::from(q.next_avail()), "{r:?}");
    assert_eq!(r.moved(), n as u64);
}

#[test]
fn tx_rejects_malformed_chains_and_keeps_going() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let good = frame(60, 9);
    m.write_slice(&good, GuestAddress(BUF)).unwrap();
    // A bad indirect table: length not a multiple of 16.
    publish(
        &m,
        &vq,
        &[
            // 0: outside guest memory.
            (0, d(MEM_SIZE as u64 - 8, 64, 0, 0)),
            // 1: device-writable buffer in a TX chain.
            (1, d(BUF, 72, W, 0)),
            // 2: shorter than the virtio-net header.
            (2, d(BUF, 8, 0, 0)),
            // 3 -> 4 -> 3: a loop.
            (3, d(BUF, 12, N, 4)),
            (4, d(BUF, 12, N, 3)),
            // 5: next index out of range.
            (5, d(BUF, 12, N, 999)),
            // 6: indirect table with a bad length.
            (6, d(BUF, 20, VRING_DESC_F_INDIRECT as u16, 0)),
            // 7: good.
            (7, d(BUF, good.len() as u32, 0, 0)),
        ],
        &[0, 1, 2, 3, 5, 6, 7],
    );
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap::default();
    let r = TxPath::new().run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
    assert_eq!(r.counts.bad_chains, 6, "{r:?}");
    assert_eq!(r.counts.packets, 1);
    assert_eq!(tap.tx, vec![good]);
    let u = used(&m, &q);
    assert_eq!(
        u.len(),
        7,
        "every chain is completed, bad ones with length 0"
    );
    assert!(u.iter().all(|&(_, len)| len == 0));
    assert_eq!(
        u.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 5, 6, 7]
    );
}

#[test]
fn tx_tap_would_block_gives_the_chain_back() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    vq.add_desc_chains(&[d(BUF, 80, 0, 0)], 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap {
        tx_error: Some(libc::EAGAIN),
        ..Default::default()
    };
    let mut tx = TxPath::new();
    let r = tx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
    assert!(r.blocked);
    assert_eq!(q.next_avail(), 0);
    assert!(used(&m, &q).is_empty());
    tap.tx_error = None;
    let r = tx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
    assert_eq!(r.counts.packets, 1);
    assert_eq!(used(&m, &q), vec![(0, 0)]);
    // A hard error drops and completes the frame.
    vq.add_desc_chains(&[d(BUF, 80, 0, 0)], 1).unwrap();
    tap.tx_error = Some(libc::EINVAL);
    let r = tx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
    assert_eq!(
        (r.counts.dropped, r.counts.tap_errors, r.counts.used),
        (1, 1, 1)
    );
}

/// A tap writing batches the way an `io_uring` may: frame by frame, each refused with EAGAIN
/// where the script says so, later frames still going out.
struct HoleyTap {
    script: Vec<bool>,
    tap: FakeTap,
}

impl TapIo for HoleyTap {
    fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.tap.readv(iov)
    }

    fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.tap.writev(iov)
    }

    fn writev_batch(&mut self, iov: &[libc::iovec], frames: &[(usize, usize)], res: &mut Vec<i32>) {
        res.clear();
        for (i, &(a, b)) in frames.iter().enumerate() {
            if self.script.get(i).copied().unwrap_or(true) {
                res.push(self.writev(&iov[a..b]).unwrap() as i32);
            } else {
                res.push(-libc::EAGAIN);
            }
        }
    }
}

#[test]
fn tx_a_batch_refused_in_the_middle_drops_the_hole_and_gives_back_the_tail() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let frames: Vec<_> = (0..5).map(|i| frame(60, i)).collect();
    for (i, f) in frames.iter().enumerate() {
        m.write_slice(f, GuestAddress(BUF + 0x1000 * i as u64))
            .unwrap();
    }
    let descs: Vec<_> = (0..5)
        .map(|i| d(BUF + 0x1000 * i as u64, 72, 0, 0))
        .collect();
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = HoleyTap {
        script: vec![true, false, true, false, false],
        tap: FakeTap::default(),
    };
    let mut tx = TxPath::new();
    let r = tx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
    // Frame 1 cannot go back behind frame 2, which went out: dropped and counted. Frames 3
    // and 4 go back to the ring.
    assert!(r.blocked);
    assert_eq!(
        (r.counts.packets, r.counts.dropped, r.counts.tap_errors),
        (2, 1, 1)
    );
    assert_eq!(q.next_avail(), 3);
    assert_eq!(used(&m, &q), vec![(0, 0), (1, 0), (2, 0)]);
    tap.script.clear();
    let r = tx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
    assert_eq!(r.counts.packets, 2);
    assert!(!r.blocked);
    let sent = vec![
        frames[0].clone(),
        frames[2].clone(),
        frames[3].clone(),
        frames[4].clone(),
    ];
    assert_eq!(
        tap.tap.tx, sent,
        "every frame but the counted one, once, in order"
    );
    assert_eq!(used(&m, &q).len(), 5);
}

#[test]
fn tx_budget_bounds_one_run() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let descs: Vec<_> = (0..200).map(|_| d(BUF, 80, 0, 0)).collect();
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap::default();
    let mut tx = TxPath::new();
    let r = tx.run(&mut q, &m, &mut tap, HdrLayout::default(), 64, None);
    assert_eq!((r.counts.packets, r.more), (64, true));
    let r = tx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
    assert_eq!((r.counts.packets, r.more), (136, false));
}

#[test]
fn tx_full_step_of_many_segment_frames_all_move() {
    // 64 frames of 20 segments each (a TSO/sendfile guest): 1280 iovecs in one step of the TX
    // loop. The per-chain segment limit is per chain, so none of them may be refused.
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let segs = 20u64;
    let mut heads = Vec::new();
    let mut frames = Vec::new();
    for c in 0..64u64 {
        let table = BUF + 0x40_0000 + c * 0x1000;
        let data = BUF + c * 0x8000;
        let f = frame((segs as usize - 1) * 100, c as u8);
        m.write_slice(&f, GuestAddress(data)).unwrap();
        for i in 0..segs {
            let (off, len) = if i == 0 {
                (0, 12)
            } else {
                (12 + (i - 1) * 100, 100)
            };
            let flags = if i + 1 < segs { N } else { 0 };
            m.write_obj(
                d(data + off, len as u32, flags, (i + 1) as u16),
                GuestAddress(table + 16 * i),
            )
            .unwrap();
        }
        let head = c as u16;
        vq.desc_table()
            .store(
                head,
                d(table, (16 * segs) as u32, VRING_DESC_F_INDIRECT as u16, 0),
            )
            .unwrap();
        heads.push(head);
        frames.push(f);
    }
    publish(&m, &vq, &[], &heads);
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap::default();
    let r = TxPath::new().run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
    assert_eq!((r.counts.packets, r.counts.bad_chains), (64, 0));
    assert_eq!(tap.tx, frames);
}

/// Writes at `table` an indirect table of `n` chained device-writable descriptors, the `i`th
/// one at guest address and length `seg(i)`.
fn writable_table(m: &GuestMemoryMmap<()>, table: u64, n: u64, seg: impl Fn(u64) -> (u64, u32)) {
    for i in 0..n {
        let flags = if i + 1 < n { W | N } else { W };
        let (addr, len) = seg(i);
        m.write_obj(
            d(addr, len, flags, (i + 1) as u16),
            GuestAddress(table + 16 * i),
        )
        .unwrap();
    }
}

#[test]
fn rx_chain_with_more_segments_than_one_read_takes_is_refused_and_counted() {
    both_reads(|_| {
        // 1024 writable segments plus the scratch buffer would be 1025 iovecs, which readv refuses:
        // such a chain must be rejected as malformed (not retried forever), and the next one used.
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        let table = BUF + 0x40_0000;
        let n = MAX_SEGMENTS as u64;
        writable_table(&m, table, n, |i| (BUF + 16 * i, 16));
        publish(
            &m,
            &vq,
            &[
                (
                    0,
                    d(table, (16 * n) as u32, VRING_DESC_F_INDIRECT as u16, 0),
                ),
                (1, d(BUF + 0x20_0000, 2048, W, 0)),
            ],
            &[0, 1],
        );
        let mut q: Queue = vq.create_queue().unwrap();
        let f = frame(100, 9);
        let mut tap = FakeTap {
            rx: VecDeque::from([f.clone()]),
            ..Default::default()
        };
        let r = rx_path().run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert_eq!(
            (r.counts.bad_chains, r.counts.packets, r.counts.tap_errors),
            (1, 1, 0)
        );
        assert_eq!(used(&m, &q), vec![(0, 0), (1, f.len() as u32)]);
    });
}

fn rx_setup(
    m: &GuestMemoryMmap<()>,
    vq: &MockSplitQueue<GuestMemoryMmap<()>>,
    bufs: &[u32],
    first: u16,
) {
    let descs: Vec<_> = bufs
        .iter()
        .enumerate()
        .map(|(i, &len)| d(BUF + 0x10000 * (first as u64 + i as u64), len, W, 0))
        .collect();
    vq.add_desc_chains(&descs, first).unwrap();
    let _ = m;
}

fn read_guest(m: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[test]
fn rx_small_frames_fill_one_buffer_each() {
    both_reads(|_| {
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        rx_setup(&m, &vq, &[2048, 2048, 2048], 0);
        let mut q: Queue = vq.create_queue().unwrap();
        let f1 = frame(60, 3);
        let f2 = frame(1500, 4);
        let mut tap = FakeTap {
            rx: VecDeque::from([f1.clone(), f2.clone()]),
            ..Default::default()
        };
        let r = rx_path().run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert_eq!(r.counts.packets, 2);
        assert!(r.tap_empty);
        assert_eq!(
            used(&m, &q),
            vec![(0, f1.len() as u32), (1, f2.len() as u32)]
        );
        let mut want1 = f1.clone();
        want1[10] = 1; // num_buffers = 1
        assert_eq!(read_guest(&m, BUF, f1.len()), want1);
        assert_eq!(read_guest(&m, BUF + 0x10000 + 12, 1500), f2[12..]);
        assert_eq!(
            q.next_avail(),
            2,
            "the chain offered for the EAGAIN read is given back"
        );
    });
}

#[test]
fn rx_mergeable_frame_spans_buffers_with_num_buffers() {
    both_reads(|_| {
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        rx_setup(&m, &vq, &[1500, 1500, 1500, 1500], 0);
        let mut q: Queue = vq.create_queue().unwrap();
        let big = frame(4000, 5); // 4012 bytes with the header: 1500 + 1500 + 1012
        let mut tap = FakeTap {
            rx: VecDeque::from([big.clone()]),
            ..Default::default()
        };
        let r = rx_path().run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert_eq!(r.counts.packets, 1);
        assert_eq!(r.counts.bytes, 4000);
        assert_eq!(used(&m, &q), vec![(0, 1500), (1, 1500), (2, 1012)]);
        let mut got = read_guest(&m, BUF, 1500);
        got.extend(read_guest(&m, BUF + 0x10000, 1500));
        got.extend(read_guest(&m, BUF + 0x20000, 1012));
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
        got[10] = 0;
        assert_eq!(got, big);
    });
}

#[test]
fn rx_mergeable_waits_for_more_buffers_without_publishing_a_partial_frame() {
    both_reads(|ahead| {
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        rx_setup(&m, &vq, &[1500, 1500], 0);
        let mut q: Queue = vq.create_queue().unwrap();
        let big = frame(4000, 6);
        let small = frame(40, 7);
        let mut tap = FakeTap {
            rx: VecDeque::from([big.clone(), small.clone()]),
            ..Default::default()
        };
        let mut rx = rx_path();
        let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert!(r.no_buffers && rx.has_pending());
        assert_eq!(r.counts.packets, 0);
        assert!(
            used(&m, &q).is_empty(),
            "nothing of a partial frame is visible to the guest"
        );
        if ahead {
            // One batch read both (the guest had posted two chains); the small frame waits,
            // read ahead, behind the pending one.
            assert_eq!((tap.rx.len(), rx.held()), (0, 2));
        } else {
            assert_eq!(
                tap.rx.len(),
                1,
                "no further frame is read while one is pending"
            );
        }
        rx_setup(&m, &vq, &[1500, 1500], 2);
        let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert_eq!(r.counts.packets, 2);
        assert_eq!(
            used(&m, &q),
            vec![(0, 1500), (1, 1500), (2, 1012), (3, small.len() as u32)]
        );
        assert_eq!(rx.held(), 0);
    });
}

#[test]
fn rx_pending_frame_is_given_back_when_the_ring_stops() {
    both_reads(|_| {
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        rx_setup(&m, &vq, &[1500], 0);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap {
            rx: VecDeque::from([frame(4000, 1)]),
            ..Default::default()
        };
        let mut rx = rx_path();
        rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert_eq!(q.next_avail(), 1);
        assert_eq!(rx.abandon_pending(&mut q), 1);
        assert_eq!(q.next_avail(), 0, "held chains return to the guest");
    });
}

#[test]
fn rx_read_ahead_takes_no_more_frames_than_the_guest_has_buffers_for() {
    READ_AHEAD.with(|c| c.set(true));
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    rx_setup(&m, &vq, &[2048, 2048], 0);
    let mut q: Queue = vq.create_queue().unwrap();
    let frames: Vec<_> = (0..5).map(|i| frame(60 + i, i as u8)).collect();
    let mut tap = FakeTap {
        rx: frames.iter().cloned().collect(),
        ..Default::default()
    };
    let mut rx = rx_path();
    let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
    assert_eq!(
        (r.counts.packets, r.no_buffers, r.tap_empty),
        (2, true, false)
    );
    assert_eq!(
        (tap.rx.len(), rx.held()),
        (3, 0),
        "frames beyond the guest's buffers stay in the tap"
    );
    // The batch asked for no more than the budget either.
    rx_setup(&m, &vq, &[2048, 2048, 2048], 2);
    let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 1);
    assert_eq!((r.counts.packets, r.more), (1, true));
    assert_eq!((tap.rx.len(), rx.held()), (2, 0));
    let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
    assert_eq!(r.counts.packets, 2);
    let lens: Vec<u32> = used(&m, &q).iter().map(|e| e.1).collect();
    let want: Vec<u32> = frames.iter().map(|f| f.len() as u32).collect();
    assert_eq!(lens, want, "every frame, in order");
}

#[test]
fn rx_reads_ahead_only_once_a_run_finds_many_frames() {
    READ_AHEAD.with(|c| c.set(true));
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    rx_setup(&m, &vq, &[2048; 128], 0);
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap::default();
    let mut rx = RxPath::new();
    let mut sent = Vec::new();
    // Queues `n` frames in the tap, runs the path once and returns the single reads and the
    // batches the run made.
    let mut run = |tap: &mut FakeTap, q: &mut Queue, n: usize| {
        for _ in 0..n {
            let f = frame(60 + sent.len() % 200, sent.len() as u8);
            sent.push(f.len() as u32);
            tap.rx.push_back(f);
        }
        let (direct, batches) = (tap.direct_reads, tap.batches.len());
        let r = rx.run(q, &m, tap, HdrLayout::default(), 256);
        assert_eq!((r.counts.packets, r.tap_empty), (n as u64, true), "{r:?}");
        assert!(tap.rx.is_empty());
        (tap.direct_reads - direct, tap.batches.len() - batches)
    };
    // A few frames: one read each, straight into guest chains, and the read that finds the
    // tap empty.
    assert_eq!(run(&mut tap, &mut q, 5), (6, 0));
    // Many: AHEAD_AFTER one at a time, the rest read ahead.
    let (direct, batches) = run(&mut tap, &mut q, 40);
    assert_eq!(direct, AHEAD_AFTER);
    assert!(batches >= 2, "{batches} batches for 24 frames");
    // After a run that read many, the next one reads ahead from its first frame...
    let (direct, batches) = run(&mut tap, &mut q, 3);
    assert_eq!(direct, 0);
    assert!(batches >= 1);
    // ... and after one that read few, one at a time again.
    assert_eq!(run(&mut tap, &mut q, 2), (3, 0));
    let lens: Vec<u32> = used(&m, &q).iter().map(|e| e.1).collect();
    assert_eq!(lens, sent, "every frame, in order");
}

#[test]
fn rx_read_ahead_reads_the_tap_again_in_a_new_run() {
    // Found by the `datapath` fuzz target. A batch's empty last read ends the run that read
    // it without another call; a later run (the worker saw the tap's edge for a new frame in
    // between) must not take it as the tap's answer.
    READ_AHEAD.with(|c| c.set(true));
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    // A good chain, then a malformed one (device-readable).
    vq.add_desc_chains(&[d(BUF, 2048, W, 0), d(BUF + 0x10000, 2048, 0, 0)], 0)
        .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap {
        rx: VecDeque::from([frame(60, 1)]),
        ..Default::default()
    };
    let mut rx = rx_path();
    // Room for two frames: the batch reads the frame and finds the tap empty; the frame
    // goes to the first chain, the second is malformed, and the run ends without buffers,
    // the batch's empty read not yet handed out.
    let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
    assert_eq!(
        (
            r.counts.packets,
            r.counts.bad_chains,
            r.no_buffers,
            r.tap_empty
        ),
        (1, 1, true, false)
    );
    rx_setup(&m, &vq, &[2048], 2);
    tap.rx.push_back(frame(61, 2));
    let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
    assert_eq!(r.counts.packets, 1, "the new frame is read: {r:?}");
    assert!(tap.rx.is_empty());
    assert_eq!(used(&m, &q), vec![(0, 72), (1, 0), (2, 73)]);
}

#[test]
fn rx_frames_read_ahead_are_dropped_and_counted_when_the_ring_stops() {
    READ_AHEAD.with(|c| c.set(true));
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    rx_setup(&m, &vq, &[1500, 1500], 0);
    let mut q: Queue = vq.create_queue().unwrap();
    // Two chains posted: both frames are read; the first needs three chains.
    let mut tap = FakeTap {
        rx: VecDeque::from([frame(4000, 1), frame(60, 2)]),
        ..Default::default()
    };
    let mut rx = rx_path();
    let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
    assert!(r.no_buffers);
    assert_eq!((rx.held(), tap.rx.len()), (2, 0));
    assert_eq!(rx.abandon_pending(&mut q), 2, "both frames counted");
    assert_eq!(q.next_avail(), 0, "held chains return to the guest");
    assert_eq!(rx.held(), 0);
    assert!(used(&m, &q).is_empty());
    // Nothing stale is delivered once the ring runs again.
    tap.rx.push_back(frame(70, 3));
    let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
    assert_eq!(r.counts.packets, 1);
    assert_eq!(used(&m, &q), vec![(0, 82)]);
}

#[test]
fn rx_read_ahead_delivers_the_frames_after_a_failed_read() {
    READ_AHEAD.with(|c| c.set(true));
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    rx_setup(&m, &vq, &[2048, 2048, 2048], 0);
    let mut q: Queue = vq.create_queue().unwrap();
    let (f1, f2) = (frame(60, 1), frame(61, 2));
    let mut tap = FakeTap {
        rx: VecDeque::from([f1.clone(), Vec::new(), f2.clone()]),
        ..Default::default()
    };
    let mut rx = rx_path();
    let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
    assert_eq!((r.counts.packets, r.counts.tap_errors), (2, 1));
    assert!(r.tap_empty);
    assert_eq!(
        used(&m, &q),
        vec![(0, f1.len() as u32), (1, f2.len() as u32)]
    );
    assert_eq!(read_guest(&m, BUF + 0x10000 + 12, 61), f2[12..]);
    assert_eq!(q.next_avail(), 2, "no chain is lost to the failed read");
}

#[test]
fn rx_abandoned_frame_gives_back_no_chain_it_already_completed() {
    both_reads(|_| {
        // Found by the `datapath` fuzz target. A frame spanning several buffers meets a malformed
        // chain while it collects them, and the ring stops (the frame is abandoned) before it
        // completes. Abandoning gives back every chain taken since the frame's first one, so none
        // of those may already be in the used ring: the guest would get that head twice once the
        // ring runs again.
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        vq.add_desc_chains(
            &[
                d(BUF, 1500, W, 0),
                d(BUF + 0x10000, 1500, 0, 0), // device-readable: malformed for RX
                d(BUF + 0x20000, 1500, W, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap {
            rx: VecDeque::from([frame(4000, 1)]),
            ..Default::default()
        };
        let mut rx = rx_path();
        let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        rx.abandon_pending(&mut q);
        // Completed: exactly the chains taken and not given back, each once.
        let taken: Vec<u32> = (0..q.next_avail())
            .map(|i| {
                let slot = vq.avail_addr().0 + 4 + 2 * u64::from(i % QSIZE);
                u32::from(m.read_obj::<u16>(GuestAddress(slot)).unwrap())
            })
            .collect();
        let mut completed: Vec<u32> = used(&m, &q).iter().map(|e| e.0).collect();
        completed.sort_unstable();
        assert_eq!(
            completed, taken,
            "the used ring must hold exactly the chains taken and not given back"
        );
        // The frame cannot be placed around the malformed chain: it is dropped and counted, its
        // buffers completed empty.
        assert_eq!((r.counts.dropped, r.counts.bad_chains), (1, 1));
        assert_eq!(used(&m, &q), vec![(0, 0), (1, 0)]);
        // The next frame uses the next buffers.
        rx_setup(&m, &vq, &[1500], 3);
        tap.rx.push_back(frame(2500, 2));
        let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert_eq!(r.counts.packets, 1);
        assert_eq!(used(&m, &q), vec![(0, 0), (1, 0), (2, 1500), (3, 1012)]);
    });
}

#[test]
fn rx_without_mergeable_drops_oversized_and_reuses_the_buffer() {
    both_reads(|_| {
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        rx_setup(&m, &vq, &[1526], 0);
        let mut q: Queue = vq.create_queue().unwrap();
        let big = frame(3000, 1);
        let ok = frame(1000, 2);
        let mut tap = FakeTap {
            rx: VecDeque::from([big, ok.clone()]),
            ..Default::default()
        };
        let hdr = HdrLayout {
            len: 12,
            mergeable: false,
        };
        let r = rx_path().run(&mut q, &m, &mut tap, hdr, 256);
        assert_eq!((r.counts.dropped, r.counts.packets), (1, 1));
        assert_eq!(used(&m, &q), vec![(0, ok.len() as u32)]);
    });
}

#[test]
fn rx_control_frames_from_the_tap_count_against_the_budget() {
    both_reads(|_| {
        // Found by the `datapath` fuzz target. Control frames arriving from the tap are dropped
        // (nobody outside may forge a control reply); a host flooding them must not keep one RX
        // run reading for as long as the tap has frames.
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        rx_setup(&m, &vq, &[2048; 4], 0);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut ctl = frame(60, 1);
        ctl[24..26].copy_from_slice(&[0x88, 0xb5]);
        let mut tap = FakeTap {
            rx: std::iter::repeat_n(ctl, 100).collect(),
            ..Default::default()
        };
        let r = rx_path().run(&mut q, &m, &mut tap, HdrLayout::default(), 8);
        assert_eq!(r.counts.control, 8, "{r:?}");
        assert_eq!(tap.rx.len(), 92, "read no more than the budget");
        assert!(r.more);
        assert!(used(&m, &q).is_empty());
    });
}

#[test]
fn rx_tso_frame_keeps_its_vnet_header() {
    both_reads(|_| {
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        // Linux with GUEST_TSO and mergeable buffers posts page-sized buffers.
        let bufs: Vec<u32> = (0..20).map(|_| 4096).collect();
        rx_setup(&m, &vq, &bufs, 0);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut gso = frame(60000, 8);
        // virtio_net_hdr: flags NEEDS_CSUM, gso_type TCPV4, hdr_len 66, gso_size 1448, csum 34/16.
        gso[..10].copy_from_slice(&[1, 1, 66, 0, 0xa8, 0x05, 34, 0, 16, 0]);
        let mut tap = FakeTap {
            rx: VecDeque::from([gso.clone()]),
            ..Default::default()
        };
        let r = rx_path().run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert_eq!(r.counts.packets, 1);
        let u = used(&m, &q);
        assert_eq!(u.len(), 15); // 60012 bytes over 4096-byte buffers
        assert_eq!(u.iter().map(|e| e.1 as usize).sum::<usize>(), gso.len());
        let hdr = read_guest(&m, BUF, 12);
        assert_eq!(&hdr[..10], &gso[..10]);
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 15);
        assert!(gso.len() < MAX_FRAME);
    });
}

#[test]
fn rx_rejects_bad_chains() {
    both_reads(|_| {
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        vq.add_desc_chains(
            &[
                d(BUF, 2048, 0, 0),                      // read-only buffer in RX
                d(BUF, 4, W, 0),                         // too short for the header
                d(MEM_SIZE as u64 + 0x1000, 2048, W, 0), // outside memory
                d(BUF, 2048, W, 0),                      // good
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let f = frame(100, 1);
        let mut tap = FakeTap {
            rx: VecDeque::from([f.clone()]),
            ..Default::default()
        };
        let r = rx_path().run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert_eq!((r.counts.bad_chains, r.counts.packets), (3, 1));
        assert_eq!(
            used(&m, &q),
            vec![(0, 0), (1, 0), (2, 0), (3, f.len() as u32)]
        );
    });
}

#[test]
fn event_idx_signalling_follows_used_event() {
    both_reads(|_| {
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        rx_setup(&m, &vq, &[2048, 2048, 2048, 2048], 0);
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_event_idx(true);
        let used_event_addr = GuestAddress(q.avail_ring() + 4 + 2 * QSIZE as u64);
        // The guest wants an interrupt once the used index passes 1 (i.e. after 2 entries).
        m.write_obj(1u16, used_event_addr).unwrap();
        let mut tap = FakeTap {
            rx: VecDeque::from([frame(10, 1)]),
            ..Default::default()
        };
        let mut rx = rx_path();
        rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert!(
            !rx.should_notify(&mut q, &m, false),
            "1 used entry: used_event 1 not reached"
        );
        tap.rx.push_back(frame(10, 2));
        rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert!(
            rx.should_notify(&mut q, &m, false),
            "2nd entry crosses used_event"
        );
        tap.rx.push_back(frame(10, 3));
        rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert!(
            !rx.should_notify(&mut q, &m, false),
            "already signalled past used_event"
        );
        // Out of buffers: EVENT_IDX re-arms RX kicks through avail_event = next_avail.
        tap.rx.push_back(frame(10, 4));
        tap.rx.push_back(frame(10, 5));
        let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert!(r.no_buffers);
        assert_eq!(q.next_avail(), 4);
        let avail_event: u16 = m
            .read_obj(GuestAddress(q.used_ring() + 4 + 8 * QSIZE as u64))
            .unwrap();
        assert_eq!(avail_event, q.next_avail());
    });
}

#[test]
fn flags_signalling_without_event_idx() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    rx_setup(&m, &vq, &[2048], 0);
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(should_notify(&mut q, &m, false));
    // VRING_AVAIL_F_NO_INTERRUPT.
    m.write_obj(1u16, GuestAddress(q.avail_ring())).unwrap();
    assert!(!should_notify(&mut q, &m, false));
    // The ring still has one buffer: NOTIFY_ON_EMPTY does not apply yet.
    assert!(!should_notify(&mut q, &m, true));
    q.set_next_avail(1);
    assert!(
        should_notify(&mut q, &m, true),
        "NOTIFY_ON_EMPTY overrides when the ring is empty"
    );
    // Kick suppression: TX processing sets VRING_USED_F_NO_NOTIFY while it works and clears it
    // when the ring is empty.
    let mut tap = FakeTap::default();
    q.set_next_avail(0);
    TxPath::new().run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
    let used_flags: u16 = m.read_obj(GuestAddress(q.used_ring())).unwrap();
    assert_eq!(used_flags, 0, "kicks re-enabled once the ring is drained");
}

#[test]
fn corrupt_avail_index_does_not_spin_the_worker() {
    both_reads(|_| {
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        vq.add_desc_chains(&[d(BUF, 80, 0, 0)], 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        // The guest claims 1000 new entries on a 256-entry ring.
        m.write_obj(1000u16, vq.avail_addr().unchecked_add(2))
            .unwrap();
        let mut tap = FakeTap::default();
        let r = TxPath::new().run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
        assert_eq!(r.counts.packets, 0);
        assert!(!r.more);
        let mut tap = FakeTap {
            rx: VecDeque::from([frame(10, 1)]),
            ..Default::default()
        };
        let r = rx_path().run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert!(r.no_buffers);
        assert_eq!(
            tap.rx.len(),
            1,
            "nothing read without a buffer to put it in"
        );
        // Counted (not logged by virtio-queue on every look at the ring).
        assert!(r.counts.bad_avail >= 1, "{r:?}");
        assert_eq!(r.counts.last_error, Some(PathError::AvailIndex));
    });
}

/// Writes an indirect table of `n` chained descriptors of `len` bytes each at `table`, the k-th
/// at `buf + k·len` (zero-length ones all at `buf`), with `flags` (W for RX) on each.
fn indirect_table(m: &GuestMemoryMmap<()>, table: u64, n: u32, len: u32, buf: u64, flags: u16) {
    let mut t = Vec::with_capacity(16 * n as usize);
    for k in 0..n {
        let last = k + 1 == n;
        let f = if last { flags } else { flags | N };
        let desc = SplitDescriptor::new(buf + u64::from(k * len), len, f, (k + 1) as u16);
        t.extend_from_slice(vm_memory::ByteValued::as_slice(&RawDescriptor::from(desc)));
    }
    m.write_slice(&t, GuestAddress(table)).unwrap();
}

#[test]
fn rx_malformed_chains_count_against_the_budget() {
    both_reads(|_| {
        // A guest that refills its ring with bad chains must not keep one run going.
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        let mut descs: Vec<_> = (0..100).map(|_| d(BUF, 2048, 0, 0)).collect(); // read-only
        descs.push(d(BUF, 2048, W, 0));
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap {
            rx: VecDeque::from([frame(100, 1)]),
            ..Default::default()
        };
        let r = rx_path().run(&mut q, &m, &mut tap, HdrLayout::default(), 8);
        assert_eq!(r.counts.bad_chains, 8, "{r:?}");
        assert!(r.more);
        assert_eq!(q.next_avail(), 8);
        assert_eq!(
            r.counts.last_error,
            Some(PathError::Chain {
                head: 7,
                error: ChainError::WrongDirection
            })
        );
    });
}

#[test]
fn a_65535_entry_indirect_table_is_refused_after_max_chain_descs_both_ways() {
    both_reads(|_| {
        // The most descriptor reads one avail entry can ask for: an indirect table of 65,535
        // zero-length descriptors. Each chain is refused after MAX_CHAIN_DESCS of them, and one run
        // stops after RUN_DESC_BUDGET descriptors with work left, however many such chains wait.
        let m = mem();
        let table = BUF + 0x20_0000;
        for (rx, flags) in [(true, W), (false, 0)] {
            indirect_table(&m, table, 65_535, 0, BUF, flags);
            let vq = MockSplitQueue::new(&m, QSIZE);
            let heads = vec![0u16; 100];
            publish(
                &m,
                &vq,
                &[(0, d(table, 16 * 65_535, VRING_DESC_F_INDIRECT as u16, 0))],
                &heads,
            );
            let mut q: Queue = vq.create_queue().unwrap();
            let counts = if rx {
                let mut tap = FakeTap {
                    rx: VecDeque::from([frame(100, 1)]),
                    ..Default::default()
                };
                let r = rx_path().run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
                assert!(r.more, "{r:?}");
                r.counts
            } else {
                let mut tap = FakeTap::default();
                let r = TxPath::new().run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
                assert!(r.more, "{r:?}");
                assert!(tap.tx.is_empty());
                r.counts
            };
            let per_run = (RUN_DESC_BUDGET / MAX_CHAIN_DESCS) as u64;
            assert!(
                counts.bad_chains >= per_run && counts.bad_chains <= per_run + 1,
                "rx {rx}: {} chains walked in one run",
                counts.bad_chains
            );
            assert_eq!(
                counts.last_error,
                Some(PathError::Chain {
                    head: 0,
                    error: ChainError::TooManyDescriptors
                }),
                "rx {rx}"
            );
            assert_eq!(counts.used, counts.bad_chains);
        }
    });
}

#[test]
fn a_chain_of_max_chain_descs_is_still_accepted() {
    // The limit is not off by one: exactly MAX_CHAIN_DESCS descriptors (some zero-length) make
    // a good TX frame.
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let table = BUF + 0x20_0000;
    let n = MAX_CHAIN_DESCS as u32;
    let f = frame(n as usize - 12, 4);
    m.write_slice(&f, GuestAddress(BUF)).unwrap();
    indirect_table(&m, table, n, 1, BUF, 0);
    publish(
        &m,
        &vq,
        &[(0, d(table, 16 * n, VRING_DESC_F_INDIRECT as u16, 0))],
        &[0],
    );
    let mut q: Queue = vq.create_queue().unwrap();
    let mut tap = FakeTap::default();
    let r = TxPath::new().run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
    assert_eq!((r.counts.packets, r.counts.bad_chains), (1, 0), "{r:?}");
    assert_eq!(tap.tx, vec![f]);
}

#[test]
fn rx_a_frame_over_long_chains_is_placed_over_several_runs() {
    both_reads(|_| {
        // A mergeable frame whose buffers are chains of 1000 one-byte descriptors: placing it walks
        // more than one run's descriptor budget, so it is completed over several runs (each one
        // returning with work left) instead of in one unbounded loop, and arrives whole.
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        // (A first RX chain keeps one iovec for the scratch buffer: 1000 segments fit any chain.)
        let per = 1000u32;
        let chains = 40u32;
        let data = BUF + 0x80_0000;
        let mut descs = Vec::new();
        for c in 0..chains {
            let table = BUF + 0x20_0000 + u64::from(c) * 16 * u64::from(per);
            indirect_table(&m, table, per, 1, data + u64::from(c * per), W);
            descs.push((
                c as u16,
                d(table, 16 * per, VRING_DESC_F_INDIRECT as u16, 0),
            ));
        }
        let heads: Vec<u16> = (0..chains as u16).collect();
        publish(&m, &vq, &descs, &heads);
        let mut q: Queue = vq.create_queue().unwrap();
        let f = frame(30_000, 5);
        let mut tap = FakeTap {
            rx: VecDeque::from([f.clone()]),
            ..Default::default()
        };
        let mut rx = rx_path();
        let mut runs = 0;
        loop {
            let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
            runs += 1;
            if r.counts.packets == 1 {
                break;
            }
            assert!(r.more && rx.has_pending(), "run {runs}: {r:?}");
            assert!(runs < 10);
        }
        assert!(runs >= 2, "placed in one run");
        let u = used(&m, &q);
        let need = f.len().div_ceil(per as usize);
        assert_eq!(u.len(), need);
        let mut got = read_guest(&m, data, f.len());
        assert_eq!(u16::from_le_bytes([got[10], got[11]]) as usize, need);
        got[10..12].copy_from_slice(&f[10..12]);
        assert_eq!(got, f);
    });
}

#[test]
fn vlan_tagged_control_frames_are_filtered_both_ways() {
    both_reads(|_| {
        // Behind one or two VLAN tags the control EtherType still marks a control frame: from the
        // guest it is consumed (the inbox gets it untagged), from the tap it is dropped, so that a
        // forged reply cannot reach the guest's packet socket by wearing a tag.
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        let eth = |tags: &[[u8; 4]], et: [u8; 2], payload: &[u8]| {
            let mut f = vec![0u8; 12];
            f.extend_from_slice(&[0x52, 0x54, 0, 0x77, 1, 2, 0x52, 0x54, 0, 0x77, 1, 3]);
            for t in tags {
                f.extend_from_slice(t);
            }
            f.extend_from_slice(&et);
            f.extend_from_slice(payload);
            f
        };
        let q1 = [0x81, 0x00, 0x00, 0x05];
        let ad = [0x88, 0xa8, 0x00, 0x07];
        let ctl_tagged = eth(&[q1], [0x88, 0xb5], b"VNB1 tagged");
        let ctl_qinq = eth(&[ad, q1], [0x88, 0xb5], b"VNB1 double tagged");
        let three = eth(&[ad, q1, q1], [0x88, 0xb5], b"three tags: not ours");
        let tagged_ip = eth(&[q1], [0x08, 0x00], &[1; 46]);
        let frames = [&ctl_tagged, &ctl_qinq, &three, &tagged_ip];
        let mut descs = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let addr = BUF + 0x1000 * i as u64;
            m.write_slice(f, GuestAddress(addr)).unwrap();
            descs.push((i as u16, d(addr, f.len() as u32, 0, 0)));
        }
        publish(&m, &vq, &descs, &[0, 1, 2, 3]);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap::default();
        let mut tx = TxPath::new();
        let r = tx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256, None);
        assert_eq!((r.counts.control, r.counts.packets), (2, 2), "{r:?}");
        assert_eq!(tap.tx, vec![three.clone(), tagged_ip.clone()]);
        let untag = |f: &[u8], off: usize| [&f[12..24], &f[off..]].concat();
        let got: Vec<Vec<u8>> = tx.control.iter().map(|f| f.bytes().to_vec()).collect();
        assert_eq!(got, vec![untag(&ctl_tagged, 28), untag(&ctl_qinq, 32)]);

        // From the tap: both tagged control frames are dropped, the others delivered.
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        rx_setup(&m, &vq, &[2048; 8], 0);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap {
            rx: frames.iter().map(|f| f.to_vec()).collect(),
            ..Default::default()
        };
        let r = rx_path().run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert_eq!((r.counts.control, r.counts.packets), (2, 2), "{r:?}");
        assert_eq!(
            used(&m, &q),
            vec![(0, three.len() as u32), (1, tagged_ip.len() as u32)]
        );
    });
}

#[test]
fn deliver_looks_at_one_chain_and_completes_a_bad_one() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    vq.add_desc_chains(
        &[
            d(BUF, 2048, 0, 0),
            d(BUF, 2048, 0, 0),
            d(BUF + 0x1000, 2048, W, 0),
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut rx = rx_path();
    let mut c = Default::default();
    let reply = [7u8; 60];
    for _ in 0..2 {
        assert_eq!(
            rx.deliver(&mut q, &m, HdrLayout::default(), &reply, &mut c),
            Err(DeliverError::BadChain)
        );
    }
    assert_eq!(
        rx.deliver(&mut q, &m, HdrLayout::default(), &reply, &mut c),
        Ok(())
    );
    assert_eq!(used(&m, &q), vec![(0, 0), (1, 0), (2, 72)]);
    assert_eq!((c.bad_chains, c.used), (2, 3));
}

/// While the frontend migrates the guest (`VHOST_F_LOG_ALL`), every byte the tap's `readv`
/// writes into a guest buffer is marked in the dirty log; `vm-memory` cannot see those writes.
/// Without logging, the second page of a frame, written only by `readv`, stays clean.
#[test]
fn rx_writes_behind_vm_memory_are_marked_dirty_while_logging() {
    both_reads(|_| {
        use vm_memory::bitmap::{AtomicBitmap, Bitmap};
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        const PAGE: u64 = 0x1000;
        for log in [true, false] {
            let m: GuestMemoryMmap<AtomicBitmap> =
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let vq = MockSplitQueue::new(&m, QSIZE);
            // One two-page buffer, and one the frame does not need.
            vq.add_desc_chains(
                &[
                    d(BUF, 2 * PAGE as u32, W, 0),
                    d(BUF + 4 * PAGE, 0x800, W, 0),
                ],
                0,
            )
            .unwrap();
            let mut q: Queue = vq.create_queue().unwrap();
            let bitmap = m.find_region(GuestAddress(0)).unwrap().bitmap();
            // The mock wrote only its rings: the buffers start clean.
            assert!(!bitmap.dirty_at(BUF as usize) && !bitmap.dirty_at((BUF + PAGE) as usize));
            let f = frame(6000, 9);
            let mut tap = FakeTap {
                rx: VecDeque::from([f.clone()]),
                ..Default::default()
            };
            let mut rx = rx_path();
            rx.log_writes = log;
            let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
            assert_eq!(r.counts.packets, 1);
            let dirty = |a: u64| bitmap.dirty_at(a as usize);
            assert_eq!(
                dirty(BUF + PAGE),
                log,
                "log_writes={log}: the frame's second page, written by readv only"
            );
            assert!(
                dirty(BUF),
                "the header page (num_buffers goes through vm-memory)"
            );
            assert!(!dirty(BUF + 4 * PAGE), "a buffer the frame did not use");
            assert!(!dirty(BUF + 2 * PAGE), "past the frame's end");
        }
    });
}

/// A tap that notes, at each read, the used index the guest can see.
struct WatchingTap<'m> {
    inner: FakeTap,
    mem: &'m GuestMemoryMmap<()>,
    used_idx: GuestAddress,
    seen: Vec<u16>,
}

impl<'m> WatchingTap<'m> {
    /// A tap handing over `frames`, watching `q`'s used index.
    fn new(mem: &'m GuestMemoryMmap<()>, q: &Queue, frames: &[Vec<u8>]) -> Self {
        WatchingTap {
            inner: FakeTap {
                rx: frames.iter().cloned().collect(),
                ..Default::default()
            },
            mem,
            used_idx: GuestAddress(q.used_ring() + 2),
            seen: Vec::new(),
        }
    }

    fn look(&mut self) {
        self.seen.push(self.mem.read_obj(self.used_idx).unwrap());
    }
}

impl TapIo for WatchingTap<'_> {
    fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.look();
        self.inner.readv(iov)
    }

    fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.inner.writev(iov)
    }

    fn batches_reads(&self) -> bool {
        self.inner.batches_reads()
    }

    fn readv_batch(&mut self, bufs: &[libc::iovec], res: &mut Vec<i32>) {
        self.look();
        self.inner.readv_batch(bufs, res)
    }
}

#[test]
fn rx_used_index_is_stored_once_per_batch_of_entries_and_when_the_run_ends() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    rx_setup(&m, &vq, &[2048; 48], 0);
    let mut q: Queue = vq.create_queue().unwrap();
    let frames: Vec<_> = (0..40).map(|i| frame(60, i as u8)).collect();
    let mut tap = WatchingTap::new(&m, &q, &frames);
    let mut rx = rx_path();
    let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
    assert_eq!(r.counts.packets, 40);
    // Read k comes after k entries were written; the guest sees them 16 at a time: 0 at the
    // first 16 reads, 16 at the next 16, 32 at the last 9 (the last one found the tap empty).
    assert_eq!(USED_PUBLISH, 16);
    let want: Vec<u16> = [(0, 16), (16, 16), (32, 9)]
        .iter()
        .flat_map(|&(idx, reads)| std::iter::repeat_n(idx, reads))
        .collect();
    assert_eq!(tap.seen, want);
    // The run's end publishes the rest.
    let all: Vec<_> = (0..40)
        .map(|i| (i, frames[i as usize].len() as u32))
        .collect();
    assert_eq!(used(&m, &q), all);
    assert_eq!(q.next_avail(), 40);
}

#[test]
fn rx_the_used_index_never_stops_inside_a_merged_frame() {
    // One read per frame (no read-ahead), so the tap looks at the index before every frame.
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    rx_setup(&m, &vq, &[1500; 40], 0);
    let mut q: Queue = vq.create_queue().unwrap();
    // 14 one-buffer frames, then 3-buffer ones: entries 15–17 are one frame (the 16th
    // entry inside it), 18–20 the next, and so on.
    let mut frames: Vec<_> = (0..14).map(|i| frame(60, i)).collect();
    frames.extend((0..6).map(|i| frame(3500, 20 + i)));
    let mut tap = WatchingTap::new(&m, &q, &frames);
    let mut rx = rx_path();
    let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
    assert_eq!(r.counts.packets, 20);
    // Where the guest may see the used index: between frames.
    let mut bounds = vec![0u16];
    for f in &frames {
        let n = f.len().div_ceil(1500) as u16;
        bounds.push(bounds.last().unwrap() + n);
    }
    // And after the run.
    tap.look();
    for idx in &tap.seen {
        assert!(
            bounds.contains(idx),
            "used index {idx} inside a frame (seen {:?})",
            tap.seen
        );
    }
    assert!(
        tap.seen.iter().any(|&i| i > 0 && i < 32),
        "stored during the run, not only at its end: {:?}",
        tap.seen
    );
    assert_eq!(*tap.seen.last().unwrap(), 32);
    assert_eq!(used(&m, &q).len(), 32);
}

#[test]
fn event_idx_signalling_counts_the_entries_of_every_run_since_the_last_decision() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, QSIZE);
    rx_setup(&m, &vq, &[2048; 8], 0);
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_event_idx(true);
    // An interrupt once the used index passes 0 (after the first entry).
    m.write_obj(0u16, GuestAddress(q.avail_ring() + 4 + 2 * QSIZE as u64))
        .unwrap();
    let mut tap = FakeTap::default();
    let mut rx = rx_path();
    // Two runs of one frame each, the interrupt decided after both (a deferred signal): the
    // first run's entry crossed it.
    for seed in 0..2 {
        tap.rx.push_back(frame(10, seed));
        rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
    }
    assert!(rx.should_notify(&mut q, &m, false), "entry 1 crossed it");
    assert!(!rx.should_notify(&mut q, &m, false), "nothing added since");
    // A device-made frame counts too.
    m.write_obj(2u16, GuestAddress(q.avail_ring() + 4 + 2 * QSIZE as u64))
        .unwrap();
    let mut counts = Default::default();
    let reply = [0u8; 60];
    rx.deliver(&mut q, &m, HdrLayout::default(), &reply, &mut counts)
        .unwrap();
    assert_eq!(used(&m, &q).len(), 3, "published when deliver returns");
    assert!(rx.should_notify(&mut q, &m, false), "entry 3 crossed 2");
}

#[test]
fn rx_a_merged_frame_takes_only_the_chains_it_fills() {
    both_reads(|_| {
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        // A small first buffer, then large ones: the frame needs three of the 21.
        let mut bufs = vec![100];
        bufs.extend([1500; 20]);
        rx_setup(&m, &vq, &bufs, 0);
        let mut q: Queue = vq.create_queue().unwrap();
        let big = frame(3000, 8); // 3012 bytes: 100 + 1500 + 1412
        let mut tap = FakeTap {
            rx: VecDeque::from([big.clone()]),
            ..Default::default()
        };
        let mut rx = rx_path();
        let r = rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert_eq!((r.counts.packets, r.counts.bad_chains), (1, 0));
        assert_eq!(used(&m, &q), vec![(0, 100), (1, 1500), (2, 1412)]);
        assert_eq!(
            q.next_avail(),
            3,
            "the chains not used are the guest's again"
        );
        let mut got = read_guest(&m, BUF, 100);
        got.extend(read_guest(&m, BUF + 0x10000, 1500));
        got.extend(read_guest(&m, BUF + 0x20000, 1412));
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        got[10] = 0;
        assert_eq!(got, big);
        // The next frame takes the next chain.
        let small = frame(50, 9);
        tap.rx.push_back(small.clone());
        rx.run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert_eq!(used(&m, &q)[3], (3, small.len() as u32));
        assert_eq!(q.next_avail(), 4);
    });
}

#[test]
fn rx_a_further_chain_of_as_many_segments_as_a_read_takes_is_used() {
    both_reads(|_| {
        // A frame's first chain keeps one iovec for the scratch buffer (one of MAX_SEGMENTS
        // segments is refused, above); a further chain does not, so one of MAX_SEGMENTS
        // segments holds the rest of a merged frame.
        let m = mem();
        let vq = MockSplitQueue::new(&m, QSIZE);
        let table = BUF + 0x40_0000;
        let n = MAX_SEGMENTS as u64;
        writable_table(&m, table, n, |i| (BUF + 0x20_0000 + i, 1));
        publish(
            &m,
            &vq,
            &[
                (0, d(BUF, 20, W, 0)),
                (
                    1,
                    d(table, (16 * n) as u32, VRING_DESC_F_INDIRECT as u16, 0),
                ),
            ],
            &[0, 1],
        );
        let mut q: Queue = vq.create_queue().unwrap();
        let f = frame(20 + MAX_SEGMENTS - 12, 10); // 20 + MAX_SEGMENTS bytes
        let mut tap = FakeTap {
            rx: VecDeque::from([f.clone()]),
            ..Default::default()
        };
        let r = rx_path().run(&mut q, &m, &mut tap, HdrLayout::default(), 256);
        assert_eq!((r.counts.packets, r.counts.bad_chains), (1, 0));
        assert_eq!(used(&m, &q), vec![(0, 20), (1, MAX_SEGMENTS as u32)]);
        assert_eq!(
            read_guest(&m, BUF + 0x20_0000, MAX_SEGMENTS),
            f[20..].to_vec()
        );
    });
}
