//! Fuzz target: the data path (`TxPath`, `RxPath` of `datapath.rs`) over a small guest memory
//! whose rings the input writes: arbitrary descriptor tables and indirect tables, avail rings
//! with heads in and out of range, avail indices that jump, flags and EVENT_IDX fields. The
//! input then drives a sequence of operations (TX runs with and without hold, RX runs against a
//! fake tap serving frames of chosen lengths and errors, control replies, abandoning a pending
//! frame, guest updates between them), and after each one checks, independently of the code
//! under test. Half the inputs (by their first byte) read the tap ahead, many frames per call,
//! as with an `io_uring`, where an empty read between two frames leaves a hole in a batch;
//! runs switch to reading ahead after 0, 2 or `AHEAD_AFTER` frames read one at a time.
//! Checked:
//!
//! - every used entry the operation added names a head below the queue size, TX entries have
//!   length 0, RX entries are no longer than the chain's writable bytes (walked here from the
//!   descriptor table the input wrote);
//! - the used index advanced by exactly `counts.used`;
//! - counters add up: a TX run moved as many chains as it took off the ring, each one completed
//!   exactly once (out-of-range heads cannot be), tap writes match `packets`/`dropped`/`bytes`;
//!   every frame the tap served is a packet, a drop, a control frame, held (half placed or
//!   read ahead) or abandoned; a run reads at most `budget` frames; chains taken = chains
//!   completed + chains held by a pending frame (none once it is abandoned);
//! - guest memory outside the device-writable buffers of the ring and its used ring is
//!   unchanged, and every iovec handed to the tap lies in such a buffer (or the RX scratch);
//! - bytes given to the tap are exactly the guest's buffers, a control frame never reaches it.
//!
//! Run it with AddressSanitizer (`cargo fuzz run datapath --sanitizer address`).
#![no_main]

use std::collections::VecDeque;
use std::io;

use libfuzzer_sys::fuzz_target;
use vhost_net_batch::datapath::{
    free_buffers, release_kicks, should_notify, used_event, DeliverError, HdrLayout, PathCounts,
    RxPath, TapIo, TxPath, AHEAD_AFTER, CONTROL_INBOX, CONTROL_KEEP, MAX_CHAIN_DESCS, MAX_FRAME,
    MAX_SEGMENTS,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const ETHERTYPE: [u8; 2] = control_msg::ETHERTYPE.to_be_bytes();

/// Where the control EtherType is in `f` (a virtio-net header of `hdr` bytes, then the
/// Ethernet frame), looking behind at most two VLAN tags (0x8100, 0x88a8, 0x9100): the offset in
/// `f`, or `None` for any other frame.
fn ctl_at(f: &[u8], hdr: usize) -> Option<usize> {
    let mut et = hdr + 12;
    for _ in 0..3 {
        let t = f.get(et..et + 2)?;
        if t == ETHERTYPE {
            return Some(et);
        }
        if !matches!(u16::from_be_bytes([t[0], t[1]]), 0x8100 | 0x88a8 | 0x9100) {
            return None;
        }
        et += 4;
    }
    None
}

// Guest-physical layout. Region 0 always starts at 0 and holds the rings.
const RX_DESC: u64 = 0x0000;
const RX_AVAIL: u64 = 0x1000;
const RX_USED: u64 = 0x2000;
const TX_DESC: u64 = 0x3000;
const TX_AVAIL: u64 = 0x4000;
const TX_USED: u64 = 0x5000;
/// Four slots for explicit indirect tables, 0x2000 bytes apart.
const TABLES: u64 = 0x6000;
/// A generated (long) indirect table, up to 4096 entries.
const LONG_TABLE: u64 = 0x10000;
/// Where buffers mostly point: 0x10000..0x50000 (past the end of memory or in the hole for
/// some of it, depending on the layout).
const DATA: u64 = 0x10000;
const DATA_SPAN: u64 = 0x40000;
/// Region ends and holes, for buffers that straddle them.
const EDGES: [u64; 4] = [0x20000, 0x30000, 0x40000, 0x50000];
const RINGS: [u64; 6] = [RX_DESC, RX_AVAIL, RX_USED, TX_DESC, TX_AVAIL, TX_USED];
/// Operations per input.
const MAX_OPS: usize = 48;

/// `VNB_FUZZ_TRACE=1` prints each operation and its result (to check what an input does).
fn trace() -> bool {
    static T: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *T.get_or_init(|| std::env::var_os("VNB_FUZZ_TRACE").is_some())
}

/// The guest memory layouts: one region; two adjacent ones (a buffer may span both); two with a
/// hole between them.
fn layout(sel: u8) -> Vec<(GuestAddress, usize)> {
    match sel % 3 {
        0 => vec![(GuestAddress(0), 0x40000)],
        1 => vec![(GuestAddress(0), 0x20000), (GuestAddress(0x20000), 0x20000)],
        _ => vec![(GuestAddress(0), 0x20000), (GuestAddress(0x30000), 0x20000)],
    }
}

/// Reads the input front to back; past its end every value is 0.
struct In<'a>(&'a [u8]);

impl In<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }
    fn empty(&self) -> bool {
        self.0.is_empty()
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
}

/// A descriptor as the guest wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Desc {
    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

fn gen_addr(i: &mut In) -> u64 {
    match i.u8() % 8 {
        0..=3 => DATA + (u64::from(i.u16()) * 16) % DATA_SPAN,
        4 => EDGES[usize::from(i.u8() % 4)] - u64::from(i.u8()),
        5 => match i.u8() % 5 {
            4 => LONG_TABLE,
            k => TABLES + 0x2000 * u64::from(k),
        },
        6 => RINGS[usize::from(i.u8() % 6)] + u64::from(i.u8() % 4) * 8,
        _ => i.u64(),
    }
}

fn gen_len(i: &mut In, indirect: bool) -> u32 {
    if indirect {
        return match i.u8() % 4 {
            0 | 1 => 16 * u32::from(i.u8()),
            2 => 16 * u32::from(i.u16()),
            _ => i.u32(),
        };
    }
    match i.u8() % 8 {
        0 => 0,
        1 | 2 => u32::from(i.u8()),
        3 | 4 => u32::from(i.u16() & 0xfff),
        5 => u32::from(i.u16()),
        6 => u32::from(i.u16()) << 4,
        _ => i.u32(),
    }
}

/// A descriptor at index `idx` of a table of `n` entries; mostly device-writable if `write`.
fn gen_desc(i: &mut In, idx: u16, n: u16, write: bool) -> Desc {
    let f = i.u8();
    let mut flags = 0;
    if f & 1 != 0 {
        flags |= F_NEXT;
    }
    // One in four descriptors has the other direction.
    if ((f >> 1) & 3 != 0) == write {
        flags |= F_WRITE;
    }
    if (f >> 3) & 7 == 7 {
        flags |= F_INDIRECT;
    }
    let next = match f >> 6 {
        0 | 1 => idx.wrapping_add(1),
        2 => u16::from(i.u8()) % n.max(1),
        _ => i.u16(),
    };
    let addr = gen_addr(i);
    let len = gen_len(i, flags & F_INDIRECT != 0);
    Desc {
        addr,
        len,
        flags,
        next,
    }
}

/// A guest memory region and where it is mapped in this process.
#[derive(Debug, Clone, Copy)]
struct Region {
    start: u64,
    len: u64,
    host: usize,
}

/// Sorted, merged half-open guest address ranges.
#[derive(Debug, Default, Clone)]
struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    fn from(mut v: Vec<(u64, u64)>) -> Self {
        v.retain(|r| r.0 < r.1);
        // Buffers often follow each other: merge those before sorting.
        v.dedup_by(|b, a| {
            let joined = a.1 == b.0;
            if joined {
                a.1 = b.1;
            }
            joined
        });
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (a, b) in v {
            match out.last_mut() {
                Some(l) if a <= l.1 => l.1 = l.1.max(b),
                _ => out.push((a, b)),
            }
        }
        Ranges(out)
    }
    fn contains(&self, a: u64, b: u64) -> bool {
        let k = self.0.partition_point(|r| r.1 < b);
        a >= b || self.0.get(k).is_some_and(|r| r.0 <= a && b <= r.1)
    }
    fn overlaps(&self, a: u64, b: u64) -> bool {
        let k = self.0.partition_point(|r| r.1 <= a);
        self.0.get(k).is_some_and(|r| r.0 < b)
    }
    fn union(&self, o: &Ranges) -> Ranges {
        Ranges::from(self.0.iter().chain(o.0.iter()).copied().collect())
    }
}

/// `addr..addr+len` as a range, saturating at the top of the address space.
fn span(addr: u64, len: u64) -> (u64, u64) {
    (addr, addr.saturating_add(len))
}

/// A copy of all guest memory, read without going through the code under test.
struct Snap<'a> {
    regions: &'a [Region],
    bytes: &'a [Vec<u8>],
}

impl Snap<'_> {
    /// Reads `out.len()` bytes at `addr`; false if any of them is outside memory (a range may
    /// span adjacent regions, as vm-memory allows).
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        let mut cur = addr;
        let mut done = 0;
        while done < out.len() {
            let Some(k) = self
                .regions
                .iter()
                .position(|r| cur >= r.start && cur - r.start < r.len)
            else {
                return false;
            };
            let off = (cur - self.regions[k].start) as usize;
            let n = (self.bytes[k].len() - off).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.bytes[k][off..off + n]);
            done += n;
            cur = match cur.checked_add(n as u64) {
                Some(c) => c,
                None => return done == out.len(),
            };
        }
        true
    }
    fn u16(&self, addr: u64) -> Option<u16> {
        let mut b = [0u8; 2];
        self.read(addr, &mut b).then(|| u16::from_le_bytes(b))
    }
    fn u32(&self, addr: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b).then(|| u32::from_le_bytes(b))
    }
    fn desc(&self, addr: u64) -> Option<Desc> {
        let mut b = [0u8; 16];
        self.read(addr, &mut b).then(|| Desc {
            addr: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            flags: u16::from_le_bytes(b[12..14].try_into().unwrap()),
            next: u16::from_le_bytes(b[14..16].try_into().unwrap()),
        })
    }
    /// Number of regions `addr..addr+len` touches (the iovecs it takes), if all in memory.
    fn pieces(&self, addr: u64, len: u64) -> Option<usize> {
        let end = addr.checked_add(len)?;
        let mut a = addr;
        let mut n = 0;
        while a < end {
            let r = self
                .regions
                .iter()
                .find(|r| a >= r.start && a - r.start < r.len)?;
            a = r.start + r.len;
            n += 1;
        }
        Some(n)
    }
    fn gather(&self, descs: &[Desc]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for d in descs.iter().filter(|d| d.len > 0) {
            let k = out.len();
            out.resize(k + d.len as usize, 0);
            if !self.read(d.addr, &mut out[k..]) {
                return None;
            }
        }
        Some(out)
    }
}

/// A descriptor chain as the virtio spec defines it (virtio-queue's limits: at most `size`
/// descriptors, an indirect table of at most 65535 entries, no nested indirect tables, at most
/// 4 GiB in all).
#[derive(Debug, Default)]
struct Chain {
    descs: Vec<Desc>,
    /// Ends with a descriptor without NEXT (rather than a bad index, loop or table).
    terminated: bool,
    /// Addresses of the descriptors read while walking (to know what a write could change).
    read_at: Vec<u64>,
}

impl Chain {
    fn walk(s: &Snap, table: u64, size: u16, head: u16) -> Chain {
        let mut c = Chain::default();
        let (mut tbl, mut n, mut idx, mut ttl, mut indirect) = (table, size, head, size, false);
        let mut total: u32 = 0;
        loop {
            if ttl == 0 || idx >= n {
                return c;
            }
            let Some(a) = tbl.checked_add(16 * u64::from(idx)) else {
                return c;
            };
            let Some(d) = s.desc(a) else {
                return c;
            };
            c.read_at.push(a);
            if d.flags & F_INDIRECT != 0 {
                if indirect || d.len % 16 != 0 || d.len / 16 > 0xffff {
                    return c;
                }
                (tbl, n, idx, ttl, indirect) =
                    (d.addr, (d.len / 16) as u16, 0, (d.len / 16) as u16, true);
                continue;
            }
            match total.checked_add(d.len) {
                Some(t) => total = t,
                None => return c,
            }
            c.descs.push(d);
            if d.flags & F_NEXT == 0 {
                c.terminated = true;
                return c;
            }
            idx = d.next;
            ttl -= 1;
        }
    }
    fn writable_bytes(&self) -> u64 {
        self.descs
            .iter()
            .filter(|d| d.flags & F_WRITE != 0)
            .map(|d| u64::from(d.len))
            .sum()
    }
    /// The chain's length if the data path must accept it in direction `write` with at most
    /// `max_segs` iovecs (what `collect_chain` checks).
    fn valid(&self, s: &Snap, write: bool, max_segs: usize) -> Option<usize> {
        if !self.terminated || self.descs.is_empty() || self.descs.len() > MAX_CHAIN_DESCS {
            return None;
        }
        let mut segs = 0;
        let mut total = 0usize;
        for d in &self.descs {
            if (d.flags & F_WRITE != 0) != write {
                return None;
            }
            if d.len == 0 {
                continue;
            }
            segs += s.pieces(d.addr, u64::from(d.len))?;
            total += d.len as usize;
        }
        (segs <= max_segs).then_some(total)
    }
    fn ranges(&self) -> Vec<(u64, u64)> {
        self.descs
            .iter()
            .filter(|d| d.len > 0)
            .map(|d| span(d.addr, u64::from(d.len)))
            .collect()
    }
    /// Ranges of the descriptors in direction `write`.
    fn ranges_dir(&self, write: bool) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.descs
            .iter()
            .filter(move |d| d.len > 0 && (d.flags & F_WRITE != 0) == write)
            .map(|d| span(d.addr, u64::from(d.len)))
    }
}

/// One virtqueue and what the checks know about it.
struct QState {
    q: Queue,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// `next_avail` at the start.
    base: u16,
    /// Avail entries completed so far: used entries plus out-of-range heads (mod 2^16).
    completed: u16,
    /// False once the guest's ring changed under the device (its buffers overlap its own
    /// rings), after which chain accounting cannot be followed.
    accounting: bool,
}

impl QState {
    fn used_ring(&self) -> (u64, u64) {
        span(self.used, 6 + 8 * u64::from(self.size))
    }
    fn consumed(&self) -> u16 {
        self.q.next_avail().wrapping_sub(self.base)
    }
    /// The ring's metadata: descriptor table, avail ring and every indirect table the
    /// descriptor table refers to. If the device changes any of it (the guest pointed a
    /// writable buffer at it), the chains it walked are not the ones walked here.
    fn meta(&self, s: &Snap) -> Ranges {
        let mut v = vec![
            span(self.desc, 16 * u64::from(self.size)),
            span(self.avail, 6 + 2 * u64::from(self.size)),
        ];
        for k in 0..self.size {
            if let Some(d) = s.desc(self.desc + 16 * u64::from(k)) {
                if d.flags & F_INDIRECT != 0 {
                    v.push(span(d.addr, u64::from(d.len)));
                }
            }
        }
        Ranges::from(v)
    }
    /// Every buffer of the ring's descriptors (and indirect tables) in direction `write`: a
    /// superset of what any chain of this ring may expose to the device.
    fn buffers(&self, s: &Snap, write: bool) -> Ranges {
        let mut v = Vec::new();
        let mut tables: Vec<(u64, u32)> = Vec::new();
        let want = |d: &Desc| (d.flags & F_WRITE != 0) == write && d.len > 0;
        for k in 0..self.size {
            let Some(d) = s.desc(self.desc + 16 * u64::from(k)) else {
                continue;
            };
            if d.flags & F_INDIRECT != 0 {
                if d.len % 16 == 0 && d.len / 16 <= 0xffff && !tables.contains(&(d.addr, d.len)) {
                    tables.push((d.addr, d.len));
                }
            } else if want(&d) {
                v.push(span(d.addr, u64::from(d.len)));
            }
        }
        for (addr, len) in tables {
            for j in 0..u64::from(len / 16) {
                let Some(e) = addr.checked_add(16 * j).and_then(|a| s.desc(a)) else {
                    break;
                };
                if e.flags & F_INDIRECT == 0 && want(&e) {
                    v.push(span(e.addr, u64::from(e.len)));
                }
            }
        }
        Ranges::from(v)
    }
    /// Avail entries `from..from+n` with a head out of range (never completed).
    fn out_of_range(&self, s: &Snap, from: u16, n: u16) -> u16 {
        (0..n)
            .filter(|&k| {
                let slot = u64::from(from.wrapping_add(k) % self.size);
                s.u16(self.avail + 4 + 2 * slot)
                    .is_none_or(|h| h >= self.size)
            })
            .count() as u16
    }
    /// The heads and chains of avail entries `from..from+n` (heads out of range have none).
    fn window(&self, s: &Snap, from: u16, n: u16) -> Vec<(u16, Chain)> {
        (0..n)
            .filter_map(|k| {
                let slot = u64::from(from.wrapping_add(k) % self.size);
                let head = s.u16(self.avail + 4 + 2 * slot)?;
                (head < self.size).then(|| (head, Chain::walk(s, self.desc, self.size, head)))
            })
            .collect()
    }

    /// Used entries `from..to` (id, len).
    fn entries(&self, s: &Snap, from: u16, to: u16) -> Vec<(u32, u32)> {
        let n = to.wrapping_sub(from);
        (0..n)
            .map(|k| {
                let e = self.used + 4 + 8 * u64::from(from.wrapping_add(k) % self.size);
                (s.u32(e).unwrap(), s.u32(e + 4).unwrap())
            })
            .collect()
    }
}

/// What the fake tap serves on the next read.
#[derive(Debug)]
enum RxEv {
    Frame(Vec<u8>),
    Again,
    Fail,
}

#[derive(Debug, PartialEq, Eq)]
enum TxRes {
    Ok,
    Again,
    Fail,
}

/// A tap in memory that checks every iovec it is handed.
struct Tap {
    regions: Vec<Region>,
    /// Guest ranges of this operation's iovecs, checked against the ring's buffers afterwards.
    iov_ranges: Vec<(u64, u64)>,
    rx: VecDeque<RxEv>,
    script: VecDeque<u8>,
    /// Results of this operation's reads: frame length, or an error (true: would block).
    reads: Vec<Result<usize, bool>>,
    /// This operation's writes: result and bytes.
    writes: Vec<(TxRes, Vec<u8>)>,
    /// Reads many frames per call, as a tap served by an `io_uring` does: the RX path reads
    /// ahead into its own buffers.
    batched: bool,
}

impl Tap {
    /// Guest range of a host iovec, if it points into guest memory.
    fn guest_range(&mut self, v: &libc::iovec) -> Option<(u64, u64)> {
        let p = v.iov_base as usize;
        let r = self
            .regions
            .iter()
            .find(|r| p >= r.host && p < r.host + r.len as usize)?;
        let off = (p - r.host) as u64;
        assert!(
            off + v.iov_len as u64 <= r.len,
            "iovec {p:#x}+{:#x} runs past the end of its guest region",
            v.iov_len
        );
        Some((r.start + off, r.start + off + v.iov_len as u64))
    }

    fn check_iov(&mut self, iov: &[libc::iovec], scratch_ok: bool) {
        assert!(
            iov.len() <= MAX_SEGMENTS,
            "{} iovecs: the kernel refuses more than {MAX_SEGMENTS}",
            iov.len()
        );
        for (k, v) in iov.iter().enumerate() {
            match self.guest_range(v) {
                Some(r) => self.iov_ranges.push(r),
                None => assert!(
                    scratch_ok && k + 1 == iov.len() && v.iov_len == MAX_FRAME,
                    "iovec {k} of {} ({:p}, {:#x}) points neither into guest memory nor at the RX scratch buffer",
                    iov.len(),
                    v.iov_base,
                    v.iov_len
                ),
            }
        }
    }
}

impl TapIo for Tap {
    fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.check_iov(iov, true);
        match self.rx.pop_front() {
            Some(RxEv::Frame(f)) => {
                let room: usize = iov.iter().map(|v| v.iov_len).sum();
                assert!(
                    room >= f.len(),
                    "{room} bytes of room for a {}-byte frame",
                    f.len()
                );
                let mut off = 0;
                for v in iov {
                    let n = v.iov_len.min(f.len() - off);
                    // SAFETY: checked above: the iovec lies in guest memory or is the scratch
                    // buffer (a heap allocation AddressSanitizer watches).
                    unsafe {
                        std::ptr::copy_nonoverlapping(f[off..].as_ptr(), v.iov_base.cast(), n)
                    };
                    off += n;
                }
                self.reads.push(Ok(f.len()));
                Ok(f.len())
            }
            Some(RxEv::Fail) => {
                self.reads.push(Err(false));
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
            Some(RxEv::Again) | None => {
                self.reads.push(Err(true));
                Err(io::Error::from_raw_os_error(libc::EAGAIN))
            }
        }
    }

    fn batches_reads(&self) -> bool {
        self.batched
    }

    fn readv_batch(&mut self, bufs: &[libc::iovec], res: &mut Vec<i32>) {
        // Like a ring: every read is tried, so an `Again` between two frames leaves a hole.
        res.clear();
        for b in bufs {
            res.push(match self.readv(std::slice::from_ref(b)) {
                Ok(n) => n as i32,
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            });
        }
    }

    fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.check_iov(iov, false);
        let mut bytes = Vec::new();
        for v in iov {
            // SAFETY: checked above: the iovec lies in guest memory.
            bytes.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
            });
        }
        let n = bytes.len();
        let res = match self.script.pop_front().unwrap_or(0) % 8 {
            6 => TxRes::Again,
            7 => TxRes::Fail,
            _ => TxRes::Ok,
        };
        let out = match res {
            TxRes::Ok => Ok(n),
            TxRes::Again => Err(io::Error::from_raw_os_error(libc::EAGAIN)),
            TxRes::Fail => Err(io::Error::from_raw_os_error(libc::ENOBUFS)),
        };
        self.writes.push((res, bytes));
        out
    }
}

/// Frames the tap served, by what became of them.
#[derive(Debug, Default)]
struct RxTotals {
    served: u64,
    packets: u64,
    dropped: u64,
    control: u64,
    abandoned: u64,
}

struct World {
    mem: GuestMemoryMmap<()>,
    regions: Vec<Region>,
    pre: Vec<Vec<u8>>,
    post: Vec<Vec<u8>>,
    rxq: QState,
    txq: QState,
    hdr: HdrLayout,
    rx: RxPath,
    tx: TxPath,
    tap: Tap,
    totals: RxTotals,
    serial: u8,
    op: usize,
    /// Whether `post` still shows guest memory as it is.
    fresh: bool,
    /// RX chains taken while a frame is pending, as they were when taken: the device keeps
    /// using them as such even if the guest rewrites its descriptor table meanwhile.
    held: Vec<(u16, Chain)>,
    /// False once a chain was taken while the ring changed under the device: what a pending
    /// frame holds is then unknown here until it completes.
    held_known: bool,
}

fn snapshot(regions: &[Region], out: &mut Vec<Vec<u8>>) {
    out.resize_with(regions.len(), Vec::new);
    for (r, o) in regions.iter().zip(out.iter_mut()) {
        o.clear();
        // SAFETY: the region is mapped for its whole length and nothing else runs meanwhile.
        o.extend_from_slice(unsafe {
            std::slice::from_raw_parts(r.host as *const u8, r.len as usize)
        });
    }
}

impl World {
    fn pre(&self) -> Snap<'_> {
        Snap {
            regions: &self.regions,
            bytes: &self.pre,
        }
    }
    fn post(&self) -> Snap<'_> {
        Snap {
            regions: &self.regions,
            bytes: &self.post,
        }
    }
    /// Snapshot before an operation: the last one taken after an operation if memory has not
    /// changed since.
    fn take_pre(&mut self) {
        if self.fresh {
            std::mem::swap(&mut self.pre, &mut self.post);
        } else {
            snapshot(&self.regions, &mut self.pre);
        }
        self.fresh = false;
        self.tap.iov_ranges.clear();
    }
    fn take_post(&mut self) {
        snapshot(&self.regions, &mut self.post);
        self.fresh = true;
    }

    /// Panics unless every iovec of the operation lay in `allowed` (the buffers, in the right
    /// direction, of the chains the operation took).
    fn check_iovecs(&self, allowed: &Ranges, what: &str) {
        for &(a, b) in &self.tap.iov_ranges {
            assert!(
                allowed.contains(a, b),
                "op {}: {what}: an iovec covers guest {a:#x}..{b:#x}, outside the buffers of the chains taken",
                self.op
            );
        }
    }

    /// The first guest byte that changed outside `allowed`: (address, before, after).
    fn changed_outside(&self, allowed: &Ranges) -> Option<(u64, u8, u8)> {
        for (k, r) in self.regions.iter().enumerate() {
            let (pre, post) = (&self.pre[k], &self.post[k]);
            let end = r.start + r.len;
            // Compare the gaps between allowed ranges.
            let mut from = r.start;
            for &(x, y) in allowed.0.iter().chain([(end, end)].iter()) {
                let (ga, gb) = (from, x.min(end));
                if ga < gb {
                    let (i, j) = ((ga - r.start) as usize, (gb - r.start) as usize);
                    if pre[i..j] != post[i..j] {
                        let d = (i..j).find(|&d| pre[d] != post[d]).unwrap();
                        return Some((r.start + d as u64, pre[d], post[d]));
                    }
                }
                from = from.max(y);
                if from >= end {
                    break;
                }
            }
        }
        None
    }

    /// Panics if memory changed outside `allowed`.
    fn check_unchanged(&self, allowed: &Ranges, what: &str) {
        if let Some((addr, p, q)) = self.changed_outside(allowed) {
            panic!(
                "op {} ({what}) changed guest byte {addr:#x} ({p:#04x} -> {q:#04x}) outside the device-writable buffers and the used ring",
                self.op
            );
        }
    }

    /// Whether the ring's metadata is the same before and after the operation.
    fn meta_stable(&self, rx: bool) -> bool {
        let q = if rx { &self.rxq } else { &self.txq };
        // (If the descriptor table itself is unchanged, so is the list of indirect tables.)
        let meta = q.meta(&self.pre());
        self.regions.iter().enumerate().all(|(k, r)| {
            let (rs, re) = (r.start, r.start + r.len);
            meta.0.iter().all(|&(a, b)| {
                let (x, y) = (a.max(rs), b.min(re));
                x >= y
                    || self.pre[k][(x - rs) as usize..(y - rs) as usize]
                        == self.post[k][(x - rs) as usize..(y - rs) as usize]
            })
        })
    }

    fn frame(&mut self, len: usize, control: bool, seed: u8) -> Vec<u8> {
        self.serial = self.serial.wrapping_add(1);
        let off = (usize::from(self.serial) * 4099 + usize::from(seed) * 31) % MAX_FRAME;
        let mut f = noise()[off..off + len].to_vec();
        let et = self.hdr.len + 12;
        if f.len() >= et + 2 {
            if control {
                // Untagged, or behind one or two VLAN tags, by the seed.
                let tags = usize::from(seed % 3).min((f.len() - et - 2) / 4);
                for k in 0..tags {
                    let tpid: [u8; 2] = if k + 1 < tags { [0x88, 0xa8] } else { [0x81, 0x00] };
                    f[et + 4 * k..et + 4 * k + 2].copy_from_slice(&tpid);
                }
                f[et + 4 * tags..et + 4 * tags + 2].copy_from_slice(&ETHERTYPE);
            } else if ctl_at(&f, self.hdr.len).is_some() {
                f[et] = 0x08;
            }
        }
        f
    }

    fn tx_run(&mut self, budget: usize, hold: Option<u16>, script: Vec<u8>) {
        self.take_pre();
        let (na0, nu0) = (self.txq.q.next_avail(), self.txq.q.next_used());
        self.tap.writes.clear();
        self.tap.script = script.into();
        let r = self.tx.run(
            &mut self.txq.q,
            &self.mem,
            &mut self.tap,
            self.hdr,
            budget,
            hold,
        );
        self.take_post();
        let stable = self.meta_stable(false);
        let c = r.counts;
        let op = self.op;
        if trace() {
            eprintln!(
                "op {op}: TX budget {budget} hold {hold:?}: {r:?}, writes {:?}, stable {stable}",
                self.tap
                    .writes
                    .iter()
                    .map(|w| (&w.0, w.1.len()))
                    .collect::<Vec<_>>()
            );
        }
        // TX writes nothing but its used ring.
        self.check_unchanged(&Ranges::from(vec![self.txq.used_ring()]), "TX run");
        if stable && !self.tap.iov_ranges.is_empty() {
            let taken = self.txq.window(
                &self.pre(),
                na0,
                self.txq.q.next_avail().wrapping_sub(na0) + 1,
            );
            let allowed = Ranges::from(taken.iter().flat_map(|c| c.1.ranges_dir(false)).collect());
            self.check_iovecs(&allowed, "TX run");
        }
        let size = self.txq.size;
        let took = self.txq.q.next_avail().wrapping_sub(na0);
        let used = self.txq.q.next_used().wrapping_sub(nu0);
        assert_eq!(
            u64::from(used),
            c.used,
            "op {op}: TX used index advanced by {used}, counts.used {}",
            c.used
        );
        assert_eq!(
            u64::from(took),
            r.moved(),
            "op {op}: TX took {took} chains, moved() {}: {r:?}",
            r.moved()
        );
        assert!(
            took <= size,
            "op {op}: TX took {took} chains from a {size}-entry ring"
        );
        assert!(
            r.moved() <= budget as u64,
            "op {op}: TX moved {} over budget {budget}",
            r.moved()
        );
        let post = self.post();
        // (Unless it added entries, the device does not write the index: the guest may have.)
        assert!(
            used == 0 || post.u16(self.txq.used + 2) == Some(self.txq.q.next_used()),
            "op {op}: TX used idx in memory"
        );
        for (k, (id, len)) in self
            .txq
            .entries(&post, nu0, self.txq.q.next_used())
            .into_iter()
            .enumerate()
        {
            assert!(
                id < u32::from(size),
                "op {op}: TX used entry {k} has id {id}, queue size {size}"
            );
            assert_eq!(
                len, 0,
                "op {op}: TX used entry {k} (head {id}) has length {len}"
            );
        }
        // Each chain taken is completed exactly once, except those whose head is out of range.
        let oor = self.txq.out_of_range(&self.pre(), na0, took);
        assert_eq!(
            used + oor,
            took,
            "op {op}: TX took {took} chains, {oor} with a bad head, completed {used}"
        );
        assert!(
            u64::from(oor) <= c.bad_chains,
            "op {op}: {oor} bad heads but bad_chains {}",
            c.bad_chains
        );
        self.txq.completed = self.txq.completed.wrapping_add(used + oor);
        assert_eq!(
            self.txq.consumed(),
            self.txq.completed,
            "op {op}: TX chain accounting"
        );
        // What the tap saw.
        let w = &self.tap.writes;
        let ok = w.iter().filter(|x| x.0 == TxRes::Ok).count() as u64;
        let fail = w.iter().filter(|x| x.0 == TxRes::Fail).count() as u64;
        let again = w.iter().filter(|x| x.0 == TxRes::Again).count();
        assert_eq!(c.packets, ok, "op {op}: packets vs tap writes");
        assert_eq!(c.tap_errors, fail, "op {op}: tap_errors vs failed writes");
        assert!(
            again <= 1 && (again == 1) == r.blocked,
            "op {op}: blocked {} after {again} EAGAIN",
            r.blocked
        );
        if again == 1 {
            assert_eq!(
                w.last().unwrap().0,
                TxRes::Again,
                "op {op}: TX went on after EAGAIN"
            );
        }
        let bytes: u64 = w
            .iter()
            .filter(|x| x.0 == TxRes::Ok)
            .map(|x| (x.1.len() - self.hdr.len) as u64)
            .sum();
        assert_eq!(c.bytes, bytes, "op {op}: TX bytes");
        for (res, f) in w {
            assert!(
                f.len() >= self.hdr.len,
                "op {op}: a {}-byte frame went to the tap",
                f.len()
            );
            assert!(
                ctl_at(f, self.hdr.len).is_none(),
                "op {op}: a control frame went to the tap ({res:?})"
            );
        }
        let kept = self.tx.control.len() as u64;
        assert_eq!(
            kept,
            c.control.min(CONTROL_INBOX as u64),
            "op {op}: control frames kept"
        );
        assert_eq!(c.dropped, fail + (c.control - kept), "op {op}: TX dropped");
        for f in &self.tx.control {
            assert!(
                f.len <= CONTROL_KEEP && f.len >= 14,
                "op {op}: control frame of {} bytes",
                f.len
            );
            if stable {
                assert_eq!(
                    f.bytes()[12..14],
                    ETHERTYPE,
                    "op {op}: control frame EtherType"
                );
            }
        }
        // Exact contents: each chain taken, in order, against the tap and the control inbox.
        if stable {
            self.tx_exact(na0, took, &r);
        }
    }

    /// Replays the chains a TX run took with the chain model here and compares what the tap and
    /// the control inbox received.
    fn tx_exact(&self, na0: u16, took: u16, r: &vhost_net_batch::datapath::TxRun) {
        let s = self.pre();
        let q = &self.txq;
        let op = self.op;
        let mut writes = self.tap.writes.iter();
        let mut control = self.tx.control.iter();
        let (mut bad, mut ctl) = (0u64, 0u64);
        let used = Ranges::from(vec![q.used_ring()]);
        for k in 0..=took {
            let slot = u64::from(na0.wrapping_add(k) % q.size);
            let head = s.u16(q.avail + 4 + 2 * slot).unwrap();
            if k == took && !r.blocked {
                break;
            }
            let chain = if head < q.size {
                Chain::walk(&s, q.desc, q.size, head)
            } else {
                Chain::default()
            };
            // Earlier completions may have overwritten descriptors or buffers that overlap the
            // used ring: the model no longer knows what the device saw.
            if chain.ranges().iter().any(|&(a, b)| used.overlaps(a, b))
                || chain.read_at.iter().any(|&a| used.overlaps(a, a + 16))
            {
                return;
            }
            let valid = chain
                .valid(&s, false, MAX_SEGMENTS)
                .filter(|&n| n >= self.hdr.len);
            let Some(total) = valid else {
                assert!(
                    k < took,
                    "op {op}: TX blocked on an invalid chain (head {head})"
                );
                bad += 1;
                continue;
            };
            let frame = s.gather(&chain.descs).unwrap();
            assert_eq!(frame.len(), total);
            if let Some(at) = ctl_at(&frame, self.hdr.len) {
                assert!(k < took, "op {op}: TX blocked on a control frame");
                ctl += 1;
                if let Some(f) = control.next() {
                    // The addresses, then the EtherType and payload (VLAN tags left out).
                    let h = self.hdr.len;
                    let mut want = frame[h..h + 12].to_vec();
                    want.extend_from_slice(&frame[at..]);
                    want.truncate(CONTROL_KEEP);
                    assert_eq!(
                        f.bytes(),
                        &want[..],
                        "op {op}: control frame {ctl} (head {head})"
                    );
                }
                continue;
            }
            let (res, got) = writes.next().unwrap_or_else(|| {
                panic!("op {op}: chain {k} (head {head}) never reached the tap")
            });
            assert_eq!(*got, frame, "op {op}: chain {k} (head {head}): the tap got other bytes than the guest's buffers");
            assert_eq!(
                k == took,
                *res == TxRes::Again,
                "op {op}: chain {k} of {took}"
            );
        }
        assert!(
            writes.next().is_none(),
            "op {op}: more tap writes than valid chains"
        );
        assert_eq!(
            bad, r.counts.bad_chains,
            "op {op}: TX bad chains: model {bad}, counted {}",
            r.counts.bad_chains
        );
        assert_eq!(ctl, r.counts.control, "op {op}: TX control frames");
    }

    /// Checks common to everything that completes RX chains: used index and entries, memory,
    /// chain accounting. Returns the entries added when they can be read back reliably.
    fn rx_common(
        &mut self,
        na0: u16,
        nu0: u16,
        c: &PathCounts,
        what: &str,
    ) -> Option<Vec<(u32, u32)>> {
        let op = self.op;
        let stable = self.meta_stable(true);
        let size = self.rxq.size;
        let used = self.rxq.q.next_used().wrapping_sub(nu0);
        let took = self.rxq.q.next_avail().wrapping_sub(na0);
        assert_eq!(
            u64::from(used),
            c.used,
            "op {op}: {what}: used index advanced by {used}, counts.used {}",
            c.used
        );
        if trace() {
            eprintln!("  {what}: stable {stable}, took {took}, used {used}");
        }
        // Chains taken in this operation (one more: the last may have been given back after a
        // read).
        let taken = self.rxq.window(&self.pre(), na0, took.min(size) + 1);
        let out = self.rx_checks(stable, (na0, nu0, took, used), c, &taken, what);
        if !self.rx.has_pending() {
            self.held.clear();
            self.held_known = true;
        } else if stable {
            self.held.extend(taken);
        } else {
            self.held_known = false;
        }
        out
    }

    fn rx_checks(
        &mut self,
        stable: bool,
        (na0, nu0, took, used): (u16, u16, u16, u16),
        c: &PathCounts,
        taken: &[(u16, Chain)],
        what: &str,
    ) -> Option<Vec<(u32, u32)>> {
        let op = self.op;
        let size = self.rxq.size;
        if !stable {
            // The guest's buffers overlap its rings: the device saw other chains than the
            // ones walked here.
            self.rxq.accounting = false;
            return None;
        }
        assert!(
            took <= size,
            "op {op}: {what} took {took} chains from a {size}-entry ring"
        );
        let oor = self.rxq.out_of_range(&self.pre(), na0, took);
        self.rxq.completed = self.rxq.completed.wrapping_add(used + oor);
        self.check_rx_accounting();
        let (pre, post) = (self.pre(), self.post());
        let took_w = Ranges::from(taken.iter().flat_map(|c| c.1.ranges_dir(true)).collect());
        self.check_iovecs(&took_w, what);
        if !self.held_known {
            return None;
        }
        // A guest that made more buffers available than its ring has entries gets more used
        // entries than the ring holds: the later ones overwrite the earlier.
        let entries = if used <= size {
            self.rxq.entries(&post, nu0, self.rxq.q.next_used())
        } else {
            Vec::new()
        };
        let completed: Vec<Chain> = entries
            .iter()
            .map(|e| {
                if e.0 < u32::from(size) {
                    Chain::walk(&pre, self.rxq.desc, size, e.0 as u16)
                } else {
                    Chain::default()
                }
            })
            .collect();
        // The device writes only into chains it took in this operation, chains it completed,
        // chains a pending frame holds, and the used ring.
        let touched = Ranges::from(
            taken
                .iter()
                .chain(&self.held)
                .map(|h| &h.1)
                .chain(&completed)
                .flat_map(|c| c.ranges_dir(true))
                .chain(self.tap.iov_ranges.iter().copied())
                .collect(),
        );
        let used_ring = Ranges::from(vec![self.rxq.used_ring()]);
        let (a, b) = self.rxq.used_ring();
        if trace() {
            eprintln!("  entries {entries:?}");
            for (h, c) in taken {
                eprintln!("  taken {h}: {:?}", c.descs);
            }
        }
        if used > size || touched.overlaps(a, b) {
            // Frame data may have overwritten used entries, or entries each other: only what
            // holds regardless.
            let all = self.rxq.buffers(&pre, true);
            self.check_unchanged(&all.union(&touched).union(&used_ring), what);
            return None;
        }
        self.check_unchanged(&touched.union(&used_ring), what);
        assert!(
            used == 0 || post.u16(self.rxq.used + 2) == Some(self.rxq.q.next_used()),
            "op {op}: {what}: used idx in memory"
        );
        let (mut zero, mut zero_good) = (0u64, 0u64);
        for (k, &(id, len)) in entries.iter().enumerate() {
            assert!(
                id < u32::from(size),
                "op {op}: {what}: used entry {k} has id {id}, queue size {size}"
            );
            // The entry's chain as the device may have seen it: walked now, or taken earlier
            // while a frame was pending.
            let seen: Vec<&Chain> = self
                .held
                .iter()
                .filter(|h| u32::from(h.0) == id)
                .map(|h| &h.1)
                .chain([&completed[k]])
                .collect();
            let cap = seen.iter().map(|c| c.writable_bytes()).max().unwrap();
            assert!(
                u64::from(len) <= cap,
                "op {op}: {what}: used entry {k} (head {id}) has length {len}, its chain holds {cap} writable bytes"
            );
            if len == 0 {
                zero += 1;
                // A chain fit for any RX use is completed empty only with a frame dropped
                // (one that met a malformed chain while spanning several buffers).
                let good = seen.iter().all(|c| {
                    c.valid(&pre, true, MAX_SEGMENTS - 1)
                        .is_some_and(|n| n >= self.hdr.len)
                });
                zero_good += u64::from(good);
            } else {
                assert!(
                    seen.iter()
                        .any(|c| c.valid(&pre, true, MAX_SEGMENTS).is_some()),
                    "op {op}: {what}: head {id} got {len} bytes but is not a valid RX chain: {:?}",
                    completed[k].descs
                );
            }
        }
        assert!(
            zero_good == 0 || c.dropped > 0,
            "op {op}: {what}: {zero_good} good chains completed empty, no frame dropped: {entries:?}"
        );
        // A malformed chain is completed empty unless its head is out of range; so are the
        // chains of a frame dropped on meeting one.
        let bad = u64::from(oor) + zero;
        assert!(
            bad == c.bad_chains || (c.dropped > 0 && bad > c.bad_chains),
            "op {op}: {what}: {zero} empty completions + {oor} bad heads vs bad_chains {} (dropped {})",
            c.bad_chains,
            c.dropped
        );
        Some(entries)
    }

    fn check_rx_accounting(&self) {
        if !self.rxq.accounting {
            return;
        }
        let held = self.rxq.consumed().wrapping_sub(self.rxq.completed);
        let op = self.op;
        if self.rx.has_pending() {
            // (More than the ring size only if the guest made more buffers available than its
            // ring has entries.)
            assert!(
                (1..0x8000).contains(&held),
                "op {op}: a pending frame holds {held} chains (taken {}, completed {})",
                self.rxq.consumed(),
                self.rxq.completed
            );
        } else {
            assert_eq!(
                held,
                0,
                "op {op}: RX chains taken {} but completed {} with no frame pending",
                self.rxq.consumed(),
                self.rxq.completed
            );
        }
    }

    fn check_rx_totals(&self) {
        let t = &self.totals;
        let held = self.rx.held();
        assert_eq!(
            t.served,
            t.packets + t.dropped + t.control + t.abandoned + held,
            "op {}: frames served vs packets + dropped + control + abandoned + held \
             ({held}): {t:?}",
            self.op
        );
    }

    fn rx_run(&mut self, budget: usize, events: Vec<RxEv>) {
        self.tap.rx.extend(events);
        self.take_pre();
        let (na0, nu0) = (self.rxq.q.next_avail(), self.rxq.q.next_used());
        self.tap.reads.clear();
        let r = self
            .rx
            .run(&mut self.rxq.q, &self.mem, &mut self.tap, self.hdr, budget);
        self.take_post();
        let op = self.op;
        let c = r.counts;
        let reads = std::mem::take(&mut self.tap.reads);
        if trace() {
            eprintln!(
                "op {op}: RX budget {budget}: {r:?}, reads {reads:?}, pending {}, held {}",
                self.rx.has_pending(),
                self.rx.held()
            );
        }
        let served = reads.iter().filter(|x| x.is_ok()).count() as u64;
        let fails = reads.iter().filter(|x| **x == Err(false)).count() as u64;
        assert!(
            served <= budget as u64,
            "op {op}: an RX run with budget {budget} read {served} frames from the tap"
        );
        assert_eq!(c.tap_errors, fails, "op {op}: RX tap_errors");
        if self.tap.batched {
            // Reads ahead end on the tap's answer, but the run may end first (no buffers, budget).
            assert!(
                !r.tap_empty || reads.last().is_some_and(|x| x.is_err()),
                "op {op}: tap_empty after {reads:?}"
            );
        } else {
            assert_eq!(
                r.tap_empty,
                reads.last().is_some_and(|x| x.is_err()),
                "op {op}: tap_empty {} after {reads:?}",
                r.tap_empty
            );
        }
        self.totals.served += served;
        self.totals.packets += c.packets;
        self.totals.dropped += c.dropped;
        self.totals.control += c.control;
        self.check_rx_totals();
        let Some(entries) = self.rx_common(na0, nu0, &c, "RX run") else {
            return;
        };
        let sum: u64 = entries.iter().map(|e| u64::from(e.1)).sum();
        assert_eq!(
            sum,
            c.bytes + self.hdr.len as u64 * c.packets,
            "op {op}: RX used lengths add up to {sum}: bytes {} + {} headers",
            c.bytes,
            c.packets
        );
    }

    fn deliver(&mut self, frame: Vec<u8>) {
        let busy = self.rx.has_pending();
        self.take_pre();
        let (na0, nu0) = (self.rxq.q.next_avail(), self.rxq.q.next_used());
        let mut c = PathCounts::default();
        let res = self
            .rx
            .deliver(&mut self.rxq.q, &self.mem, self.hdr, &frame, &mut c);
        self.take_post();
        let op = self.op;
        if trace() {
            eprintln!("op {op}: deliver {} bytes: {res:?} {c:?}", frame.len());
        }
        if busy {
            assert_eq!(
                res,
                Err(DeliverError::Busy),
                "op {op}: deliver while a frame is pending"
            );
            assert!(
                self.pre == self.post && c == PathCounts::default(),
                "op {op}: a refused deliver changed something"
            );
            assert_eq!(
                (self.rxq.q.next_avail(), self.rxq.q.next_used()),
                (na0, nu0)
            );
            return;
        }
        assert_ne!(
            res,
            Err(DeliverError::Busy),
            "op {op}: deliver busy without a pending frame"
        );
        assert_eq!(
            c.packets + c.dropped + c.control + c.bytes + c.tap_errors,
            0,
            "op {op}: deliver counted {c:?}"
        );
        let Some(entries) = self.rx_common(na0, nu0, &c, "deliver") else {
            return;
        };
        let full: Vec<_> = entries.iter().filter(|e| e.1 > 0).collect();
        match res {
            Ok(()) => {
                let want = (self.hdr.len + frame.len()) as u32;
                assert!(
                    full.len() == 1 && entries.last().unwrap().1 == want,
                    "op {op}: a delivered {}-byte reply: entries {entries:?}",
                    frame.len()
                );
                self.check_delivered(entries.last().unwrap().0 as u16, &frame);
            }
            Err(e) => assert!(
                full.is_empty(),
                "op {op}: deliver failed ({e:?}) but published {full:?}"
            ),
        }
    }

    /// The reply landed whole in the chain, after a virtio-net header with num_buffers 1.
    fn check_delivered(&self, head: u16, frame: &[u8]) {
        let pre = self.pre();
        let chain = Chain::walk(&pre, self.rxq.desc, self.rxq.size, head);
        let ranges = chain.ranges();
        // Only if nothing else was written over the buffers meanwhile.
        let meta = self
            .rxq
            .meta(&pre)
            .union(&Ranges::from(vec![self.rxq.used_ring()]));
        let mut sorted = ranges.clone();
        sorted.sort_unstable();
        let disjoint = sorted.windows(2).all(|w| w[0].1 <= w[1].0)
            && ranges.iter().all(|&(a, b)| !meta.overlaps(a, b));
        if !disjoint {
            return;
        }
        let got = self.post().gather(&chain.descs).unwrap();
        let mut want = vec![0u8; self.hdr.len];
        if self.hdr.len == 12 {
            want[10] = 1;
        }
        want.extend_from_slice(frame);
        assert_eq!(
            &got[..want.len()],
            &want[..],
            "op {}: the delivered reply in head {head}",
            self.op
        );
    }

    fn abandon(&mut self) {
        let had = self.rx.held();
        let nu0 = self.rxq.q.next_used();
        let dropped = self.rx.abandon_pending(&mut self.rxq.q);
        if trace() {
            eprintln!("op {}: abandon_pending: {dropped}", self.op);
        }
        assert_eq!(
            dropped, had,
            "op {}: abandon_pending returned {dropped} with {had} frames held",
            self.op
        );
        assert!(!self.rx.has_pending() && self.rx.held() == 0);
        assert_eq!(self.rxq.q.next_used(), nu0);
        self.totals.abandoned += dropped;
        self.held.clear();
        self.held_known = true;
        self.check_rx_totals();
        self.check_rx_accounting();
    }

    /// Signalling helpers: they touch nothing but the used ring (and the RX path's count of
    /// entries since its last decision).
    fn notify(&mut self, rx: bool, which: u8) {
        self.take_pre();
        let mem = &self.mem;
        let q = if rx { &mut self.rxq } else { &mut self.txq };
        let (na, nu) = (q.q.next_avail(), q.q.next_used());
        match which % 5 {
            // The RX ring's entries are counted by the RX path, which decides for it.
            0 | 1 if rx => {
                let _ = self.rx.should_notify(&mut q.q, mem, which % 5 == 1);
            }
            0 => {
                let _ = should_notify(&mut q.q, mem, false);
            }
            1 => {
                let _ = should_notify(&mut q.q, mem, true);
            }
            2 => {
                let _ = release_kicks(&mut q.q, mem);
            }
            3 => {
                let _ = free_buffers(&q.q, mem);
            }
            _ => {
                let _ = used_event(&q.q, mem);
            }
        }
        assert_eq!((q.q.next_avail(), q.q.next_used()), (na, nu));
        let used = Ranges::from(vec![q.used_ring()]);
        self.take_post();
        self.check_unchanged(&used, "notify");
    }
}

fn gen_avail(i: &mut In, mem: &GuestMemoryMmap<()>, q: &QState, n: u16) {
    let idx: u16 = mem.read_obj(GuestAddress(q.avail + 2)).unwrap();
    for k in 0..n {
        let h = i.u8();
        let head = if h < 0xe0 {
            u16::from(h) % q.size
        } else {
            i.u16()
        };
        let slot = u64::from(idx.wrapping_add(k) % q.size);
        mem.write_obj(head, GuestAddress(q.avail + 4 + 2 * slot))
            .unwrap();
    }
    mem.write_obj(idx.wrapping_add(n), GuestAddress(q.avail + 2))
        .unwrap();
}

fn gen_queue(
    i: &mut In,
    mem: &GuestMemoryMmap<()>,
    (desc, avail, used): (u64, u64, u64),
    write: bool,
) -> QState {
    let size = 1u16 << (i.u8() % 9);
    let event_idx = i.bool();
    let start = match i.u8() % 4 {
        0 | 1 => 0,
        2 => 0xfff0 | u16::from(i.u8() & 0xf),
        _ => i.u16(),
    };
    let mut q = Queue::new(size).unwrap();
    q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
    q.try_set_used_ring_address(GuestAddress(used)).unwrap();
    q.set_ready(true);
    q.set_event_idx(event_idx);
    q.set_next_avail(start);
    q.set_next_used(start);
    assert!(q.is_valid(mem));
    let qs = QState {
        q,
        size,
        desc,
        avail,
        used,
        base: start,
        completed: 0,
        accounting: true,
    };
    let n = u16::from(i.u8()).min(size);
    for k in 0..n {
        let d = gen_desc(i, k, size, write);
        mem.write_slice(&d.bytes(), GuestAddress(desc + 16 * u64::from(k)))
            .unwrap();
    }
    mem.write_obj(start, GuestAddress(used + 2)).unwrap();
    mem.write_obj(start, GuestAddress(avail + 2)).unwrap();
    let flags = u16::from(i.u8() & 1);
    mem.write_obj(flags, GuestAddress(avail)).unwrap();
    let used_event = i.u16();
    mem.write_obj(used_event, GuestAddress(avail + 4 + 2 * u64::from(size)))
        .unwrap();
    qs
}

fn gen_tables(i: &mut In, mem: &GuestMemoryMmap<()>) {
    for _ in 0..i.u8() % 6 {
        let slot = i.u8() % 5;
        if slot < 4 {
            let n = u16::from(i.u8() % 128);
            let write = i.bool();
            let base = TABLES + 0x2000 * u64::from(slot);
            for k in 0..n {
                let d = gen_desc(i, k, n, write);
                mem.write_slice(&d.bytes(), GuestAddress(base + 16 * u64::from(k)))
                    .unwrap();
            }
        } else {
            // A long, well-formed linear table: many segments.
            let n = 1 + i.u16() % 4096;
            let base = gen_addr(i);
            let stride = u64::from(i.u8());
            let len = u32::from(i.u8());
            let write = if i.bool() { F_WRITE } else { 0 };
            for k in 0..n {
                let last = k + 1 == n;
                let d = Desc {
                    addr: base.wrapping_add(stride * u64::from(k)),
                    len,
                    flags: write | if last { 0 } else { F_NEXT },
                    next: k + 1,
                };
                mem.write_slice(&d.bytes(), GuestAddress(LONG_TABLE + 16 * u64::from(k)))
                    .unwrap();
            }
        }
    }
}

/// Pseudo-random bytes frames are cut from (computed once: per-byte loops are slow under the
/// fuzzer's instrumentation).
fn noise() -> &'static [u8] {
    static N: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    N.get_or_init(|| {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..2 * MAX_FRAME)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    })
}

/// What the buffer area holds at the start, by guest address up to the end of the address
/// space used: a ramp, with the control EtherType every 64 bytes (at the offsets of both header
/// sizes) if `ethertype`.
fn fill(ethertype: bool) -> &'static [u8] {
    static F: [std::sync::OnceLock<Vec<u8>>; 2] =
        [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    F[usize::from(ethertype)].get_or_init(|| {
        let mut v: Vec<u8> = (0..DATA + DATA_SPAN)
            .map(|a| (a as u8).wrapping_mul(29))
            .collect();
        if ethertype {
            for c in v.chunks_mut(64) {
                c[22..26].copy_from_slice(&[
                    ETHERTYPE[0],
                    ETHERTYPE[1],
                    ETHERTYPE[0],
                    ETHERTYPE[1],
                ]);
            }
        }
        v
    })
}

fn gen_budget(i: &mut In) -> usize {
    match i.u8() % 8 {
        0 => 0,
        1 => 1,
        2 => 2,
        3 => 8,
        4 | 5 => 256,
        _ => usize::from(i.u16() % 300),
    }
}

/// Guest memories (one per layout) and snapshot buffers, kept from one input to the next:
/// fresh ones cost more in page faults than all the checks.
type Kept = (GuestMemoryMmap<()>, Vec<Region>, Vec<Vec<u8>>, Vec<Vec<u8>>);

thread_local! {
    static KEPT: std::cell::RefCell<[Option<Kept>; 3]> = const { std::cell::RefCell::new([None, None, None]) };
}

/// Guest memory of layout `sel`, all zeros.
fn memory(sel: u8) -> Kept {
    if let Some(k) = KEPT.with(|c| c.borrow_mut()[usize::from(sel % 3)].take()) {
        for r in &k.1 {
            // SAFETY: the region is mapped for its whole length and nothing else uses it.
            unsafe { std::ptr::write_bytes(r.host as *mut u8, 0, r.len as usize) };
        }
        return k;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&layout(sel)).unwrap();
    let regions: Vec<Region> = mem
        .iter()
        .map(|r| Region {
            start: r.start_addr().0,
            len: r.len(),
            host: mem.get_host_address(r.start_addr()).unwrap() as usize,
        })
        .collect();
    (mem, regions, Vec::new(), Vec::new())
}

/// `VNB_FUZZ_ASAN_SELFTEST=1` makes every input read one byte past a heap buffer, which
/// AddressSanitizer must report (the bounded test checks the sanitizer is really on).
fn asan_selftest() {
    static T: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *T.get_or_init(|| std::env::var_os("VNB_FUZZ_ASAN_SELFTEST").is_some()) {
        let v = std::hint::black_box(vec![0u8; 16]);
        // SAFETY: none: this is the deliberate out-of-bounds read the sanitizer must catch.
        let b = unsafe { std::ptr::read_volatile(v.as_ptr().add(v.len())) };
        std::hint::black_box(b);
    }
}

fn run(data: &[u8]) {
    asan_selftest();
    let mut i = In(data);
    let first = i.u8();
    let sel = first % 3;
    // Half the inputs read the tap ahead, many frames per call (existing seeds keep their
    // meaning otherwise).
    let batched = (first / 3) % 2 == 1;
    // Those read ahead from a run's first frame, after two read one at a time, or after the
    // default number (runs switch from one way to the other).
    let ahead_after = [0, 2, AHEAD_AFTER][usize::from(first / 6 % 3)];
    let (mem, regions, pre, post) = memory(sel);
    // Fill the buffer area: zeros, a ramp, or a control EtherType every 64 bytes (at both
    // header sizes' offsets).
    let pattern = i.u8() % 3;
    if pattern != 0 {
        for r in &regions {
            let from = r.start.max(DATA);
            let end = r.start + r.len;
            if from < end {
                let fill = &fill(pattern == 2)[from as usize..end as usize];
                mem.write_slice(fill, GuestAddress(from)).unwrap();
            }
        }
    }
    let features = match i.u8() % 3 {
        0 => 1 << 32 | 1 << 15,
        1 => 1 << 32,
        _ => 0,
    };
    let hdr = HdrLayout::from_features(features);
    let rxq = gen_queue(&mut i, &mem, (RX_DESC, RX_AVAIL, RX_USED), true);
    let txq = gen_queue(&mut i, &mem, (TX_DESC, TX_AVAIL, TX_USED), false);
    gen_tables(&mut i, &mem);
    for q in [&rxq, &txq] {
        let n = u16::from(i.u8()) % (q.size + 1);
        gen_avail(&mut i, &mem, q, n);
        if i.u8() % 8 == 7 {
            // The avail index jumps anywhere.
            mem.write_obj(i.u16(), GuestAddress(q.avail + 2)).unwrap();
        }
    }
    let mut w = World {
        tap: Tap {
            regions: regions.clone(),
            iov_ranges: Vec::new(),
            rx: VecDeque::new(),
            script: VecDeque::new(),
            reads: Vec::new(),
            writes: Vec::new(),
            batched,
        },
        mem,
        regions,
        pre,
        post,
        rxq,
        txq,
        hdr,
        rx: RxPath::new().with_ahead_after(ahead_after),
        tx: TxPath::new(),
        totals: RxTotals::default(),
        serial: 0,
        fresh: false,
        op: 0,
        held: Vec::new(),
        held_known: true,
    };
    while !i.empty() && w.op < MAX_OPS {
        w.op += 1;
        match i.u8() % 10 {
            0 | 1 => {
                let budget = gen_budget(&mut i);
                let hold = i.bool().then(|| u16::from(i.u8()));
                let n = usize::from(i.u8() % 16);
                let script = i.bytes(n);
                w.tx_run(budget, hold, script);
            }
            2..=4 => {
                let budget = gen_budget(&mut i);
                let n = i.u8() % 16;
                let mut events = Vec::new();
                for _ in 0..n {
                    let k = i.u8();
                    let h = w.hdr.len;
                    let len = match (k >> 3) % 4 {
                        0 => usize::from(i.u8()) % (h + 1),
                        1 => h + usize::from(i.u8()),
                        2 => usize::from(i.u16() % 4096),
                        _ => (usize::from(i.u16()) + h + usize::from(i.u8())).min(MAX_FRAME),
                    };
                    let seed = i.u8();
                    events.push(match k % 8 {
                        0..=4 => RxEv::Frame(w.frame(len, false, seed)),
                        5 => RxEv::Frame(w.frame(len.max(h + 14), true, seed)),
                        6 => RxEv::Again,
                        _ => RxEv::Fail,
                    });
                }
                w.rx_run(budget, events);
            }
            5 => {
                let len = if i.bool() {
                    usize::from(i.u8())
                } else {
                    usize::from(i.u16() % 1600)
                };
                let seed = i.u8();
                // A control reply: Ethernet header and payload, no virtio-net header.
                let f = w.frame(len, false, seed);
                w.deliver(f);
            }
            6 => w.abandon(),
            7 => {
                let rx = i.bool();
                let which = i.u8();
                w.notify(rx, which);
            }
            8 => {
                // The guest posts more buffers, rewrites descriptors or moves its avail index.
                w.fresh = false;
                let rx = i.bool();
                let q = if rx { &w.rxq } else { &w.txq };
                match i.u8() % 4 {
                    0 | 1 => {
                        let n = u16::from(i.u8()) % (q.size + 1);
                        gen_avail(&mut i, &w.mem, q, n);
                    }
                    2 => {
                        for _ in 0..i.u8() % 8 {
                            let k = u16::from(i.u8()) % q.size;
                            let d = gen_desc(&mut i, k, q.size, rx);
                            w.mem
                                .write_slice(&d.bytes(), GuestAddress(q.desc + 16 * u64::from(k)))
                                .unwrap();
                        }
                    }
                    _ => {
                        let (off, v) = match i.u8() % 3 {
                            0 => (2, i.u16()),
                            1 => (0, u16::from(i.u8() & 1)),
                            _ => (4 + 2 * u64::from(q.size), i.u16()),
                        };
                        w.mem.write_obj(v, GuestAddress(q.avail + off)).unwrap();
                    }
                }
            }
            _ => {
                // The guest writes a few bytes anywhere (e.g. an EtherType into a TX buffer).
                w.fresh = false;
                let addr = gen_addr(&mut i);
                let n = usize::from(i.u8() % 32);
                let b = i.bytes(n);
                let _ = w.mem.write_slice(&b, GuestAddress(addr));
            }
        }
    }
    let World {
        mem,
        regions,
        pre,
        post,
        ..
    } = w;
    KEPT.with(|c| c.borrow_mut()[usize::from(sel)] = Some((mem, regions, pre, post)));
}

fuzz_target!(|data: &[u8]| run(data));
