//! The per-queue-pair data path: guest TX ring → tap, tap → guest RX ring.
//!
//! Mechanism only; no policy. Every guest-supplied descriptor is checked (direction, bounds in
//! guest memory, chain termination, minimum header size) and a bad chain is completed with length
//! 0 and counted instead of being trusted. TX frames go from guest buffers straight to the tap,
//! a step's frames in one [`TapIo::writev_batch`]. RX frames are read straight into guest
//! buffers, one `readv` per frame, or, from a tap that reads many frames per call
//! ([`TapIo::batches_reads`]), read ahead into the path's own buffers and copied from there
//! ([`crate::read_ahead`]). The part of a frame larger than its first mergeable buffer is placed
//! in further buffers from a per-queue scratch buffer allocated once, or from its read-ahead
//! buffer. The RX path stores the used index once per [`USED_PUBLISH`] entries and when it
//! returns, not with every entry: the guest's driver polls that index from another CPU.
//!
//! Every loop the guest drives is bounded: a run moves at most a budget of chains (good or bad)
//! and walks at most [`RUN_DESC_BUDGET`] descriptors, a chain has at most [`MAX_CHAIN_DESCS`]
//! descriptors (zero-length ones included), and a frame spans at most [`MAX_SEGMENTS`] chains.
//! Nothing here logs per packet: problems are counted in [`PathCounts`], the last one kept in
//! [`PathCounts::last_error`] for the caller's rate-limited log.

use std::io;
use std::os::fd::RawFd;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use crate::read_ahead::{Ahead, ReadAhead};

/// Frames an RX run reads one at a time, straight into guest chains, before it reads ahead
/// in batches on a tap that can ([`TapIo::batches_reads`]); a run after one that read at least
/// this many reads ahead from its start.
pub const AHEAD_AFTER: usize = crate::read_ahead::READ_AHEAD;

/// Most packets one direction moves before yielding to the other (like `VHOST_NET_WEIGHT`).
pub const BATCH_BUDGET: usize = 256;
/// Most segments a chain may have (`UIO_MAXIOV`).
pub const MAX_SEGMENTS: usize = 1024;
/// Most descriptors a chain may have, zero-length ones included: a longer chain (a 65,535-entry
/// indirect table, say) is rejected after this many, not walked to its end.
pub const MAX_CHAIN_DESCS: usize = 1024;
/// Most descriptors one TX or RX run walks (it stops after the chain that crosses it, with work
/// left): a guest posting long chains cannot hold a worker and its ring locks for longer than
/// this many descriptor reads.
pub const RUN_DESC_BUDGET: usize = 16 * 1024;
/// Largest frame the tap can hand us: 64 KiB GSO payload + headers + virtio-net header.
pub const MAX_FRAME: usize = 65536 + 256;

const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Control frames one TX run keeps for the control plane; more are dropped and counted.
pub const CONTROL_INBOX: usize = 8;
/// Bytes of a control frame kept: enough to tell a too-long frame from a valid one.
pub const CONTROL_KEEP: usize = control_msg::MAX_FRAME_LEN + 2;

/// A control frame taken off the TX ring (Ethernet header + payload, no virtio-net header).
#[derive(Debug, Clone, Copy)]
pub struct ControlFrame {
    /// The frame's first bytes.
    pub data: [u8; CONTROL_KEEP],
    /// How many of them are valid (the frame's length, capped at `CONTROL_KEEP`).
    pub len: usize,
}

impl ControlFrame {
    /// The frame's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

/// Copies `src` into the buffer that `iov` describes, as far as it goes; returns the bytes
/// copied.
fn copy_to_iov(mut src: &[u8], iov: &[libc::iovec]) -> usize {
    let mut done = 0;
    for v in iov {
        if src.is_empty() {
            break;
        }
        let n = v.iov_len.min(src.len());
        // SAFETY: every iovec points into mapped guest memory, valid while the caller holds the
        // memory guard; a volatile copy because the guest may access it concurrently.
        unsafe { VolatileSlice::new(v.iov_base.cast(), n) }.copy_from(&src[..n]);
        src = &src[n..];
        done += n;
    }
    done
}

/// Copies the bytes at `offset` of the buffer that `iov` describes into `out`; returns how many
/// were available.
fn peek_iov(iov: &[libc::iovec], mut offset: usize, out: &mut [u8]) -> usize {
    let mut done = 0;
    for v in iov {
        if done == out.len() {
            break;
        }
        if offset >= v.iov_len {
            offset -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - offset).min(out.len() - done);
        for (i, o) in out[done..done + n].iter_mut().enumerate() {
            // SAFETY: every iovec points into mapped guest memory or our scratch buffer, valid
            // while the caller holds the memory guard; volatile because the guest may write
            // concurrently.
            *o = unsafe { std::ptr::read_volatile((v.iov_base as *const u8).add(offset + i)) };
        }
        done += n;
        offset = 0;
    }
    done
}

/// Starts loading the cache line that holds byte `offset` of the frame in `iov`.
///
/// The control-frame check reads each TX frame's EtherType. The frontend's core has just
/// written that line, so the read is a cache miss per frame, which the kernel's copy into the
/// tap would otherwise take. Taken one frame after another right before each `writev`, those
/// misses cost about 7 % of TX frames per CPU-second against the build from before the control
/// message: the median of 50 interleaved 64-byte testpmd pairs,
/// `bench/results/2026-12-01-datapath/`. A TX step collects all its chains first and checks
/// them afterwards, and prefetching while collecting overlaps the misses. That recovered most of
/// the gap: 20 pairs, median +6 % against checking without it.
fn prefetch_at(iov: &[libc::iovec], mut offset: usize) {
    for v in iov {
        if offset < v.iov_len {
            let p = (v.iov_base as *const u8).wrapping_add(offset);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a prefetch is a hint: it never faults and changes no program-visible state,
            // whatever the address.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = p;
            return;
        }
        offset -= v.iov_len;
    }
}

/// VLAN tag protocol identifiers a control frame may hide behind (802.1Q, 802.1ad, and the
/// old QinQ value).
const VLAN_TPIDS: [u16; 3] = [0x8100, 0x88a8, 0x9100];
/// Most VLAN tags looked through (802.1ad: an outer and an inner tag).
const MAX_VLAN_TAGS: usize = 2;

/// Where the control EtherType is in the frame in `iov` (after a virtio-net header of `hdr_len`
/// bytes, `len` bytes in all): its offset in the Ethernet frame, 12 untagged, 16 or 20 behind
/// VLAN tags; `None` if it is not a control frame. Tags count because Linux hands a tagged frame
/// with no VLAN device to the untagged device's packet sockets: a forged reply must not get
/// through by wearing a tag.
fn control_at(iov: &[libc::iovec], hdr_len: usize, len: usize) -> Option<usize> {
    let mut off = 12;
    for _ in 0..=MAX_VLAN_TAGS {
        let mut et = [0u8; 2];
        if len < hdr_len + off + 2 || peek_iov(iov, hdr_len + off, &mut et) != 2 {
            return None;
        }
        let et = u16::from_be_bytes(et);
        if et == control_msg::ETHERTYPE {
            return Some(off);
        }
        if !VLAN_TPIDS.contains(&et) {
            return None;
        }
        off += 4;
    }
    None
}

/// The guest's `used_event` (EVENT_IDX), read from the avail ring.
pub fn used_event<M: GuestMemoryBackend>(q: &Queue, mem: &M) -> Option<u16> {
    let addr = q.avail_ring().checked_add(4 + 2 * u64::from(q.size()))?;
    mem.load::<u16>(GuestAddress(addr), std::sync::atomic::Ordering::Acquire)
        .ok()
        .map(u16::from_le)
}

/// Buffers the guest has made available and the device has not taken yet.
pub fn free_buffers<M: GuestMemoryBackend>(q: &Queue, mem: &M) -> u16 {
    q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map(|a| a.0.wrapping_sub(q.next_avail()))
        .unwrap_or(0)
}

/// Re-enables guest kicks after a hold. Returns true if chains arrived meanwhile (drain them
/// before relying on a kick).
pub fn release_kicks<M: GuestMemoryBackend>(q: &mut Queue, mem: &M) -> bool {
    matches!(q.enable_notification(mem), Ok(true))
}

/// Keeps guest kicks off until `cap` more chains are queued: with EVENT_IDX `avail_event` is
/// set `cap` entries ahead (the guest kicks once when it crosses it, which is the frame-cap
/// valve); without it `VRING_USED_F_NO_NOTIFY` stays set and only the timer drains the ring.
pub fn hold_kicks<M: GuestMemoryBackend>(q: &mut Queue, mem: &M, cap: u16) {
    if q.event_idx_enabled() {
        let event = q.next_avail().wrapping_add(cap.max(1) - 1);
        if let Some(addr) = q.used_ring().checked_add(4 + 8 * u64::from(q.size())) {
            let _ = mem.store(
                event.to_le(),
                GuestAddress(addr),
                std::sync::atomic::Ordering::Release,
            );
        }
    } else {
        let _ = q.disable_notification(mem);
    }
}

/// Access to the host side of a queue pair (the tap, or a fake in tests).
pub trait TapIo {
    /// Reads one frame (virtio-net header + Ethernet frame) into `iov`.
    fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize>;
    /// Writes one frame (virtio-net header + Ethernet frame) from `iov`.
    fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize>;
    /// Writes several frames, frame `i` being `iov[frames[i].0..frames[i].1]`, and sets `res[i]`
    /// to its byte count or `-errno`. Frames are tried in order; a frame whose result is
    /// `-EAGAIN` was not written. The default is [`writev_each`]: one `writev` per frame,
    /// stopping at the first `EAGAIN`.
    fn writev_batch(&mut self, iov: &[libc::iovec], frames: &[(usize, usize)], res: &mut Vec<i32>) {
        writev_each(self, iov, frames, res);
    }
    /// Whether [`TapIo::readv_batch`] reads several frames per call: the RX path then reads
    /// ahead into buffers of its own ([`crate::read_ahead`]) instead of straight into guest
    /// chains.
    fn batches_reads(&self) -> bool {
        false
    }
    /// Reads several frames, frame `i` into `bufs[i]`, and sets `res[i]` (one entry per buffer)
    /// to its length or `-errno`. Reads are tried in order; a frame that arrives during the
    /// call may fill a later buffer after an earlier read found the tap empty. The default is
    /// [`readv_each`]: one `readv` per buffer, stopping at the first `EAGAIN`.
    fn readv_batch(&mut self, bufs: &[libc::iovec], res: &mut Vec<i32>) {
        readv_each(self, bufs, res);
    }
}

/// A syscall's result as a batch entry: the byte count or `-errno`.
fn batch_result(r: io::Result<usize>) -> i32 {
    match r {
        Ok(n) => i32::try_from(n).unwrap_or(i32::MAX),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => -libc::EAGAIN,
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// One [`TapIo::readv`] per buffer of a batch; after the first `EAGAIN` the remaining buffers
/// are not tried and report `-EAGAIN` too.
pub fn readv_each<T: TapIo + ?Sized>(tap: &mut T, bufs: &[libc::iovec], res: &mut Vec<i32>) {
    res.clear();
    for b in bufs {
        let r = batch_result(tap.readv(std::slice::from_ref(b)));
        res.push(r);
        if r == -libc::EAGAIN {
            break;
        }
    }
    res.resize(bufs.len(), -libc::EAGAIN);
}

/// One [`TapIo::writev`] per frame of a batch; after the first `EAGAIN` the remaining frames are
/// not tried and report `-EAGAIN` too.
pub fn writev_each<T: TapIo + ?Sized>(
    tap: &mut T,
    iov: &[libc::iovec],
    frames: &[(usize, usize)],
    res: &mut Vec<i32>,
) {
    res.clear();
    for &(start, end) in frames {
        let r = batch_result(tap.writev(&iov[start..end]));
        res.push(r);
        if r == -libc::EAGAIN {
            break;
        }
    }
    res.resize(frames.len(), -libc::EAGAIN);
}

/// A tap queue descriptor.
#[derive(Debug, Clone, Copy)]
pub struct TapFd(pub RawFd);

/// A byte count from a syscall, or its error.
fn syscall_len(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

impl TapIo for TapFd {
    fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: every iovec points into mapped guest memory or our scratch buffer, valid for
        // the call; the caller holds the guest memory guard.
        syscall_len(unsafe { libc::readv(self.0, iov.as_ptr(), iov.len() as libc::c_int) })
    }

    fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: as for readv; the kernel only reads the buffers.
        syscall_len(unsafe { libc::writev(self.0, iov.as_ptr(), iov.len() as libc::c_int) })
    }
}

/// Why a descriptor chain was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// The chain ended early: a loop, a `next` out of range or an invalid indirect table.
    Truncated,
    /// A buffer lies (partly) outside guest memory.
    OutOfMemory,
    /// A device-writable buffer in a TX chain or a device-readable one in an RX chain.
    WrongDirection,
    /// Too short to hold the virtio-net header.
    TooShort,
    /// More segments than `MAX_SEGMENTS`.
    TooManySegments,
    /// More descriptors than `MAX_CHAIN_DESCS`.
    TooManyDescriptors,
}

/// A per-packet problem a run met, kept for the caller's rate-limited log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// A malformed chain: its head and why.
    Chain {
        /// Head descriptor index.
        head: u16,
        /// What was wrong.
        error: ChainError,
    },
    /// The guest's avail index is more than a ring's size ahead of the device's.
    AvailIndex,
    /// The tap refused a frame or failed a read.
    Tap(io::ErrorKind),
}

/// Counters one data-path call adds up; the caller folds them into shared metrics once.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PathCounts {
    /// Frames moved.
    pub packets: u64,
    /// Payload bytes moved (without the virtio-net header).
    pub bytes: u64,
    /// Used-ring entries added.
    pub used: u64,
    /// Chains rejected as malformed.
    pub bad_chains: u64,
    /// Frames dropped (too large for the guest's buffer, refused by the tap, or meeting a
    /// malformed chain while spanning several buffers).
    pub dropped: u64,
    /// Tap I/O errors other than "would block".
    pub tap_errors: u64,
    /// Control frames (EtherType 0x88B5): consumed from the guest on TX, dropped from the tap
    /// on RX. Never forwarded.
    pub control: u64,
    /// Times the guest's avail index was found corrupt (the ring reads as empty).
    pub bad_avail: u64,
    /// The last problem met (malformed chain, corrupt avail index, tap error), if any.
    pub last_error: Option<PathError>,
}

impl PathCounts {
    /// Adds `o` to `self`.
    pub fn add(&mut self, o: &PathCounts) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.used += o.used;
        self.bad_chains += o.bad_chains;
        self.dropped += o.dropped;
        self.tap_errors += o.tap_errors;
        self.control += o.control;
        self.bad_avail += o.bad_avail;
        self.last_error = o.last_error.or(self.last_error);
    }

    /// Problems worth a log line: malformed chains, corrupt avail indices, tap errors.
    pub fn problems(&self) -> u64 {
        self.bad_chains + self.bad_avail + self.tap_errors
    }

    fn bad_chain(&mut self, head: u16, error: ChainError) {
        self.bad_chains += 1;
        self.last_error = Some(PathError::Chain { head, error });
    }

    fn tap_error(&mut self, e: &io::Error) {
        self.tap_errors += 1;
        self.last_error = Some(PathError::Tap(e.kind()));
    }
}

/// Negotiated layout of the virtio-net header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HdrLayout {
    /// 12 with VERSION_1 or MRG_RXBUF, else 10.
    pub len: usize,
    /// Whether RX frames may span several chains (`VIRTIO_NET_F_MRG_RXBUF`).
    pub mergeable: bool,
}

impl HdrLayout {
    /// The layout for a negotiated feature set.
    pub fn from_features(features: u64) -> Self {
        let v1 = features & (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1) != 0;
        let mrg = features & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF) != 0;
        HdrLayout {
            len: if v1 || mrg { 12 } else { 10 },
            mergeable: mrg,
        }
    }
}

impl HdrLayout {
    /// `Ok(n)` if a chain of `n` bytes can hold the virtio-net header.
    fn fits(&self, n: usize) -> Result<usize, ChainError> {
        if n < self.len {
            Err(ChainError::TooShort)
        } else {
            Ok(n)
        }
    }
}

impl Default for HdrLayout {
    fn default() -> Self {
        HdrLayout {
            len: 12,
            mergeable: true,
        }
    }
}

/// A guest buffer: guest-physical address and length.
type Seg = (u64, u32);

/// Walks `head`'s chain, checking it, appending host iovecs and guest segments.
/// Returns the chain's total byte count.
///
/// At most `max_segs` iovecs are added for this chain (the kernel takes at most `MAX_SEGMENTS`
/// per `readv`/`writev`); `iov` may already hold other chains' iovecs, which do not count.
/// Every descriptor read is added to `walked`; past [`MAX_CHAIN_DESCS`] the chain is rejected.
fn collect_chain<M: GuestMemoryBackend>(
    mem: &M,
    chain: DescriptorChain<&M>,
    writable: bool,
    iov: &mut Vec<libc::iovec>,
    segs: Option<&mut Vec<Seg>>,
    max_segs: usize,
    walked: &mut usize,
) -> Result<usize, ChainError> {
    let limit = iov.len() + max_segs;
    let mut total = 0usize;
    let mut last_has_next = true;
    let mut descs = 0usize;
    let mut segs = segs;
    // The avail entry and head count even when the chain yields no descriptor.
    *walked += 1;
    for desc in chain {
        descs += 1;
        *walked += 1;
        if descs > MAX_CHAIN_DESCS {
            return Err(ChainError::TooManyDescriptors);
        }
        last_has_next = desc.has_next();
        if desc.is_write_only() != writable {
            return Err(ChainError::WrongDirection);
        }
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        if iov.len() >= limit {
            return Err(ChainError::TooManySegments);
        }
        // Fast path: the buffer lies in one memory region (almost always).
        if let Ok(slice) = mem.get_slice(desc.addr(), len) {
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        } else {
            for slice in mem.get_slices(desc.addr(), len) {
                let slice = slice.map_err(|_| ChainError::OutOfMemory)?;
                if iov.len() >= limit {
                    return Err(ChainError::TooManySegments);
                }
                iov.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        if let Some(s) = segs.as_deref_mut() {
            s.push((desc.addr().0, desc.len()));
        }
        total += len;
    }
    if descs == 0 || last_has_next {
        return Err(ChainError::Truncated);
    }
    Ok(total)
}

/// The next available chain. A corrupt avail index (for which virtio-queue's
/// `pop_descriptor_chain` logs an error on every call) is counted instead and reads as an
/// empty ring.
fn pop<'m, M: GuestMemoryBackend>(
    q: &mut Queue,
    mem: &'m M,
    counts: &mut PathCounts,
) -> Option<DescriptorChain<&'m M>> {
    match q.iter(mem) {
        Ok(mut chains) => chains.next(),
        Err(e) => {
            if matches!(e, virtio_queue::Error::InvalidAvailRingIndex) {
                counts.bad_avail += 1;
                counts.last_error = Some(PathError::AvailIndex);
            }
            None
        }
    }
}

/// Marks the first `len` bytes of the buffer formed by `segs` dirty in guest memory's log
/// (written behind `vm-memory`'s back, by the tap's `readv`).
fn mark_dirty<M: GuestMemoryBackend>(mem: &M, segs: &[Seg], mut len: usize) {
    for &(addr, l) in segs {
        if len == 0 {
            return;
        }
        let n = (l as usize).min(len);
        if let Ok(s) = mem.get_slice(GuestAddress(addr), n) {
            s.bitmap().mark_dirty(0, n);
        }
        len -= n;
    }
}

/// Writes `data` at byte `offset` of the buffer formed by `segs`.
fn write_segs<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Seg],
    mut offset: usize,
    mut data: &[u8],
) -> bool {
    for &(addr, len) in segs {
        let len = len as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(data.len());
        if mem
            .write_slice(&data[..n], GuestAddress(addr + offset as u64))
            .is_err()
        {
            return false;
        }
        data = &data[n..];
        offset = 0;
        if data.is_empty() {
            return true;
        }
    }
    data.is_empty()
}

/// Whether the guest has switched interrupts off with `VRING_AVAIL_F_NO_INTERRUPT` (only
/// without EVENT_IDX, where the flag is the guest's word).
pub fn interrupts_off<M: GuestMemoryBackend>(q: &Queue, mem: &M) -> bool {
    if q.event_idx_enabled() {
        return false;
    }
    let flags: u16 = mem.read_obj(GuestAddress(q.avail_ring())).unwrap_or(0);
    flags & VRING_AVAIL_F_NO_INTERRUPT != 0
}

/// Whether the guest wants an interrupt for the used entries just added.
///
/// With EVENT_IDX this is the `used_event` test; without it, `VRING_AVAIL_F_NO_INTERRUPT`
/// suppresses it unless `notify_on_empty` is negotiated and the avail ring is empty.
///
/// For rings whose entries `Queue::add_used` added (TX). Not for an RX ring served by
/// [`RxPath`], which adds its own: with EVENT_IDX this would never see them and never
/// signal; ask [`RxPath::should_notify`].
pub fn should_notify<M: GuestMemoryBackend>(q: &mut Queue, mem: &M, notify_on_empty: bool) -> bool {
    if q.event_idx_enabled() {
        return q.needs_notification(mem).unwrap_or(true);
    }
    // The used index stores before, the flags load after (the guest's side of this: it
    // clears the flag, then reads the used index).
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    if !interrupts_off(q, mem) {
        return true;
    }
    notify_on_empty
        && q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map(|i| i.0 == q.next_avail())
            .unwrap_or(false)
}

/// The ring looked empty: re-enable notifications and say whether to look once more (buffers
/// arrived meanwhile). [`pop`] also returns `None` for a corrupt avail index, for
/// which `enable_notification` keeps reporting work; looking again only once per empty ring keeps
/// a malicious guest from spinning the worker.
fn next_after_empty<M: GuestMemoryBackend>(q: &mut Queue, mem: &M, rechecked: &mut bool) -> bool {
    if *rechecked {
        return false;
    }
    *rechecked = true;
    matches!(q.enable_notification(mem), Ok(true))
}

fn unpop(q: &mut Queue) {
    q.set_next_avail(q.next_avail().wrapping_sub(1));
}

/// Used entries the RX path writes before it stores the used index, which the guest's driver
/// polls from another CPU: storing it once per this many entries (at the first frame boundary
/// after them, and at the end of every call that added some) instead of once per frame keeps
/// that cache line from moving between the two CPUs per frame. Like `VHOST_NET_BATCH`; it is
/// also the read-ahead batch.
pub const USED_PUBLISH: u32 = crate::read_ahead::READ_AHEAD as u32;

/// The device's side of the RX ring's used ring: `virtio-queue`'s `add_used` stores the used
/// index with every entry; this writes the entries and stores the index only between frames,
/// once [`USED_PUBLISH`] entries wait ([`UsedRing::publish_due`]) and whenever the path returns
/// ([`UsedRing::publish`]). So the guest never sees a used index ahead of its entries, nor one
/// inside a merged frame (the buffers of one packet are used together), and every entry is
/// visible once the path lets go of the ring. It also counts the entries added since the last
/// interrupt decision, which `Queue::needs_notification` can no longer count
/// ([`UsedRing::should_notify`]).
#[derive(Debug, Default)]
struct UsedRing {
    /// Entries written since the used index was last stored.
    unpublished: u32,
    /// Entries added since the last interrupt decision.
    added: u32,
}

impl UsedRing {
    /// Writes the used entry `(head, len)` at the queue's next used slot, as `add_used` does
    /// (the same bound check on `head`; nothing changes when it fails).
    fn add<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), ()> {
        if head >= q.size() {
            return Err(());
        }
        let slot = u64::from(q.next_used() % q.size());
        let addr = q.used_ring().checked_add(4 + 8 * slot).ok_or(())?;
        // `struct virtq_used_elem { le32 id; le32 len; }`
        let elem = (u64::from(len) << 32 | u64::from(head)).to_le();
        mem.write_obj(elem, GuestAddress(addr)).map_err(|_| ())?;
        q.set_next_used(q.next_used().wrapping_add(1));
        self.added = self.added.saturating_add(1);
        self.unpublished = self.unpublished.saturating_add(1);
        Ok(())
    }

    /// Stores the used index if [`USED_PUBLISH`] entries wait. Only between frames: never
    /// while a merged frame's entries are partly written.
    fn publish_due<M: GuestMemoryBackend>(&mut self, q: &Queue, mem: &M) {
        if self.unpublished >= USED_PUBLISH {
            self.publish(q, mem);
        }
    }

    /// Stores the used index (release: after the entries and the buffers they name).
    fn publish<M: GuestMemoryBackend>(&mut self, q: &Queue, mem: &M) {
        if self.unpublished == 0 {
            return;
        }
        self.unpublished = 0;
        if let Some(addr) = q.used_ring().checked_add(2) {
            let _ = mem.store(
                q.next_used().to_le(),
                GuestAddress(addr),
                std::sync::atomic::Ordering::Release,
            );
        }
    }

    /// Whether the guest wants an interrupt for the entries added since the last call: with
    /// EVENT_IDX, whether they crossed its `used_event` (`vring_need_event`), counting them
    /// here as `Queue::needs_notification` counts its own `add_used`s; without it, the flags
    /// ([`should_notify`]).
    fn should_notify<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        notify_on_empty: bool,
    ) -> bool {
        self.publish(q, mem);
        let added = std::mem::take(&mut self.added);
        if !q.event_idx_enabled() {
            return should_notify(q, mem, notify_on_empty);
        }
        // The used index stores before, the `used_event` load after.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let Some(event) = used_event(q, mem) else {
            return true;
        };
        u32::from(q.next_used().wrapping_sub(event).wrapping_sub(1)) < added
    }
}

/// Result of one TX run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxRun {
    /// Counters.
    pub counts: PathCounts,
    /// The tap refused with EAGAIN; wait for it to become writable.
    pub blocked: bool,
    /// The budget ran out with chains left.
    pub more: bool,
}

impl TxRun {
    /// Chains taken off the ring (sent, dropped, rejected or consumed as control frames).
    pub fn moved(&self) -> u64 {
        // A control frame beyond the inbox is counted in both `control` and `dropped`.
        let control = self.counts.control.min(CONTROL_INBOX as u64);
        self.counts.packets + self.counts.dropped + self.counts.bad_chains + control
    }
}

/// Chains one TX step reads from the avail ring at once (one avail-index read per step).
pub const TX_STEP: usize = 64;

/// A chain read in a TX step: head, its iovec range, and its length or why it was rejected.
#[derive(Debug, Clone, Copy)]
struct TxChain {
    head: u16,
    start: usize,
    end: usize,
    res: Result<usize, ChainError>,
    /// A control frame (for the control plane, not the tap).
    control: bool,
}

/// Guest → tap.
#[derive(Debug, Default)]
pub struct TxPath {
    iov: Vec<libc::iovec>,
    step: Vec<TxChain>,
    /// The step's frames for the tap (iovec ranges) and their results.
    frames: Vec<(usize, usize)>,
    results: Vec<i32>,
    /// Control frames taken off the ring in the last run, for the control plane.
    pub control: Vec<ControlFrame>,
}

// SAFETY: the iovec buffer is scratch space, only meaningful during a `run` call.
unsafe impl Send for TxPath {}

impl TxPath {
    /// A TX path with its scratch vectors allocated.
    pub fn new() -> Self {
        TxPath {
            iov: Vec::with_capacity(4 * TX_STEP),
            step: Vec::with_capacity(TX_STEP),
            frames: Vec::with_capacity(TX_STEP),
            results: Vec::with_capacity(TX_STEP),
            control: Vec::with_capacity(CONTROL_INBOX),
        }
    }

    /// Moves up to `budget` frames from the TX ring to the tap. Control frames go to
    /// [`TxPath::control`] instead (cleared at the start of each run).
    ///
    /// With `hold: Some(cap)` (TX buffering), the run leaves guest kicks off when it finds the
    /// ring empty ([`hold_kicks`]); the caller must have a timer armed to drain the ring and
    /// re-enables kicks itself when the ring stays idle ([`release_kicks`]).
    pub fn run<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        tap: &mut impl TapIo,
        hdr: HdrLayout,
        budget: usize,
        hold: Option<u16>,
    ) -> TxRun {
        let mut out = TxRun::default();
        self.control.clear();
        let _ = q.disable_notification(mem);
        let mut rechecked = false;
        let mut walked = 0usize;
        'steps: loop {
            let done = out.moved() as usize;
            if done >= budget || walked >= RUN_DESC_BUDGET {
                out.more = true;
                break;
            }
            self.iov.clear();
            self.step.clear();
            // A corrupt avail index makes `iter` fail: counted, treated as an empty ring.
            match q.iter(mem) {
                Err(virtio_queue::Error::InvalidAvailRingIndex) => {
                    out.counts.bad_avail += 1;
                    out.counts.last_error = Some(PathError::AvailIndex);
                }
                Err(_) => {}
                Ok(chains) => {
                    for chain in chains.take(TX_STEP.min(budget - done)) {
                        let head = chain.head_index();
                        let start = self.iov.len();
                        let res = collect_chain(
                            mem,
                            chain,
                            false,
                            &mut self.iov,
                            None,
                            MAX_SEGMENTS,
                            &mut walked,
                        )
                        .and_then(|n| hdr.fits(n));
                        if res.is_err() {
                            self.iov.truncate(start);
                        }
                        let end = self.iov.len();
                        if res.is_ok() {
                            prefetch_at(&self.iov[start..end], hdr.len + 12);
                        }
                        self.step.push(TxChain {
                            head,
                            start,
                            end,
                            res,
                            control: false,
                        });
                        if walked >= RUN_DESC_BUDGET {
                            break;
                        }
                    }
                }
            }
            if self.step.is_empty() {
                if let Some(cap) = hold {
                    hold_kicks(q, mem, cap);
                    break;
                }
                if next_after_empty(q, mem, &mut rechecked) {
                    continue;
                }
                break;
            }
            rechecked = false;
            let n = self.step.len();
            // The step's frames for the tap go out in one batch; control frames are marked
            // (`control`) so each chain is looked at once.
            self.frames.clear();
            for c in self.step.iter_mut() {
                if let Ok(total) = c.res {
                    if control_at(&self.iov[c.start..c.end], hdr.len, total).is_some() {
                        c.control = true;
                    } else {
                        self.frames.push((c.start, c.end));
                    }
                }
            }
            tap.writev_batch(&self.iov, &self.frames, &mut self.results);
            // Frames refused with EAGAIN at the end of the batch go back to the ring; one refused
            // before a frame that went out (an io_uring batch) cannot, and is dropped, counted.
            let tail = self
                .results
                .iter()
                .rposition(|&r| r != -libc::EAGAIN)
                .map_or(0, |i| i + 1);
            let mut written = 0;
            for k in 0..n {
                let c = self.step[k];
                match c.res {
                    Err(e) => out.counts.bad_chain(c.head, e),
                    Ok(total) if c.control => {
                        out.counts.control += 1;
                        if self.control.len() < CONTROL_INBOX {
                            let iov = &self.iov[c.start..c.end];
                            let off = control_at(iov, hdr.len, total).unwrap_or(12);
                            // The addresses, then the EtherType and payload: VLAN tags are
                            // left out (the reply goes back untagged on this port).
                            let mut f = ControlFrame {
                                data: [0; CONTROL_KEEP],
                                len: 0,
                            };
                            f.len = peek_iov(iov, hdr.len, &mut f.data[..12]);
                            let rest = (total - hdr.len - off).min(CONTROL_KEEP - 12);
                            f.len += peek_iov(iov, hdr.len + off, &mut f.data[12..12 + rest]);
                            self.control.push(f);
                        } else {
                            out.counts.dropped += 1;
                        }
                    }
                    Ok(total) => {
                        let r = self.results.get(written).copied().unwrap_or(-libc::EAGAIN);
                        if written >= tail {
                            // Give this chain and the rest of the step back to the ring.
                            q.set_next_avail(q.next_avail().wrapping_sub((n - k) as u16));
                            out.blocked = true;
                            break 'steps;
                        }
                        written += 1;
                        if r >= 0 {
                            out.counts.packets += 1;
                            out.counts.bytes += (total - hdr.len) as u64;
                        } else {
                            out.counts.dropped += 1;
                            out.counts.tap_error(&io::Error::from_raw_os_error(-r));
                        }
                    }
                }
                if q.add_used(mem, c.head, 0).is_ok() {
                    out.counts.used += 1;
                }
            }
        }
        out
    }
}

/// Result of one RX run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxRun {
    /// Counters.
    pub counts: PathCounts,
    /// The tap has no more frames (EAGAIN): wait for it to become readable.
    pub tap_empty: bool,
    /// The guest has no more RX buffers: wait for its kick (notifications were re-enabled).
    pub no_buffers: bool,
    /// The budget ran out with frames possibly left.
    pub more: bool,
}

/// A frame read from the tap that did not fit its first buffer and waits for more buffers.
#[derive(Debug)]
struct PendingRx {
    /// Avail index of the first chain, to give the chains back if the ring stops.
    start_avail: u16,
    /// Frame length including the virtio-net header.
    len: usize,
    /// Head of the first chain (holds the header; its segments are in `RxPath::first_segs`).
    first: u16,
    /// Bytes already placed in guest buffers (the first `filled` of the frame).
    filled: usize,
    /// Bytes placed in the first chain.
    first_len: usize,
    /// The read-ahead buffer holding the frame; `None`: the rest is in the scratch buffer.
    ahead_slot: Option<usize>,
}

/// Why a device-made frame could not be put on the RX ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliverError {
    /// A tap frame is half placed; try after it completes.
    Busy,
    /// The guest has no RX buffer.
    NoBuffer,
    /// The next buffer is too small for the frame.
    TooSmall,
    /// The next chain was malformed (completed empty and counted); try again.
    BadChain,
}

/// Why placing a pending frame stopped before it was whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stall {
    /// The guest has no more RX buffers.
    NoBuffers,
    /// The run's descriptor budget ran out.
    Budget,
}

/// Tap → guest.
pub struct RxPath {
    iov: Vec<libc::iovec>,
    segs: Vec<Seg>,
    /// Segments of a pending frame's first chain.
    first_segs: Vec<Seg>,
    /// A pending frame's further chains: head and bytes placed.
    extra: Vec<(u16, u32)>,
    scratch: Box<[u8]>,
    pending: Option<PendingRx>,
    /// Frames read ahead, for a tap that reads many per call.
    ahead: ReadAhead,
    /// The used ring's device side.
    used: UsedRing,
    /// Frames the last run read from the tap.
    last_run_reads: usize,
    /// Frames a run reads one at a time before it reads ahead ([`AHEAD_AFTER`]).
    ahead_after: usize,
    /// Mark the guest pages the tap's frames are read into in the dirty-page log (live
    /// migration); other writes go through `vm-memory`, which marks them itself.
    pub log_writes: bool,
}

// SAFETY: the iovec buffer is scratch space, only meaningful during a `run` call.
unsafe impl Send for RxPath {}

impl Default for RxPath {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for RxPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxPath")
            .field("pending", &self.pending)
            .field("ahead", &self.ahead)
            .finish()
    }
}

impl RxPath {
    /// An RX path with its scratch buffers allocated.
    pub fn new() -> Self {
        RxPath {
            iov: Vec::with_capacity(64),
            segs: Vec::with_capacity(64),
            first_segs: Vec::with_capacity(64),
            extra: Vec::with_capacity(64),
            scratch: vec![0u8; MAX_FRAME].into_boxed_slice(),
            pending: None,
            ahead: ReadAhead::new(),
            used: UsedRing::default(),
            last_run_reads: 0,
            ahead_after: AHEAD_AFTER,
            log_writes: false,
        }
    }

    /// The same path reading ahead, on a tap that can, once a run has read `n` frames one at a
    /// time (or the run before read that many); 0 reads ahead from the first frame.
    pub fn with_ahead_after(mut self, n: usize) -> Self {
        self.ahead_after = n;
        self
    }

    /// Whether a frame is half placed, waiting for more guest buffers.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Frames read from the tap and not yet in the guest's ring: one half placed, and those
    /// read ahead. The next run places them before reading the tap again.
    pub fn held(&self) -> u64 {
        u64::from(self.pending.is_some()) + self.ahead.held() as u64
    }

    /// Gives back the chains held by a partly placed frame (the ring is being stopped) and drops
    /// it and the frames read ahead. Returns how many frames were dropped.
    pub fn abandon_pending(&mut self, q: &mut Queue) -> u64 {
        let dropped = self.held();
        if let Some(p) = self.pending.take() {
            q.set_next_avail(p.start_avail);
        }
        self.ahead.discard();
        dropped
    }

    /// Puts a frame made by the device itself (a control reply: Ethernet header + payload) into
    /// the next RX chain, looking at one chain at most. Fails without side effects while a tap
    /// frame is half placed or when the guest has no buffer (the caller keeps the frame for
    /// later); a chain too small for the frame is given back and the frame refused; a malformed
    /// chain is completed empty and counted ([`DeliverError::BadChain`]: try again).
    pub fn deliver<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        hdr: HdrLayout,
        frame: &[u8],
        counts: &mut PathCounts,
    ) -> Result<(), DeliverError> {
        let r = self.deliver_one(q, mem, hdr, frame, counts);
        self.used.publish(q, mem);
        r
    }

    fn deliver_one<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        hdr: HdrLayout,
        frame: &[u8],
        counts: &mut PathCounts,
    ) -> Result<(), DeliverError> {
        if self.pending.is_some() {
            return Err(DeliverError::Busy);
        }
        let Some(chain) = pop(q, mem, counts) else {
            return Err(DeliverError::NoBuffer);
        };
        let head = chain.head_index();
        self.iov.clear();
        self.segs.clear();
        let mut walked = 0;
        match collect_chain(
            mem,
            chain,
            true,
            &mut self.iov,
            Some(&mut self.segs),
            MAX_SEGMENTS,
            &mut walked,
        ) {
            Ok(cap) if cap >= hdr.len + frame.len() => {
                let mut h = [0u8; 12];
                if hdr.len == 12 {
                    h[10] = 1;
                }
                if !write_segs(mem, &self.segs, 0, &h[..hdr.len])
                    || !write_segs(mem, &self.segs, hdr.len, frame)
                {
                    counts.bad_chain(head, ChainError::OutOfMemory);
                }
                if self
                    .used
                    .add(q, mem, head, (hdr.len + frame.len()) as u32)
                    .is_ok()
                {
                    counts.used += 1;
                }
                Ok(())
            }
            Ok(_) => {
                unpop(q);
                Err(DeliverError::TooSmall)
            }
            Err(e) => {
                counts.bad_chain(head, e);
                if self.used.add(q, mem, head, 0).is_ok() {
                    counts.used += 1;
                }
                Err(DeliverError::BadChain)
            }
        }
    }

    /// Moves up to `budget` frames from the tap into the RX ring.
    pub fn run<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        tap: &mut impl TapIo,
        hdr: HdrLayout,
        budget: usize,
    ) -> RxRun {
        let out = self.run_frames(q, mem, tap, hdr, budget);
        self.used.publish(q, mem);
        out
    }

    /// Whether the guest wants an interrupt for the used entries this path added since it was
    /// last asked ([`should_notify`], which cannot count them on this path's ring).
    pub fn should_notify<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        notify_on_empty: bool,
    ) -> bool {
        self.used.should_notify(q, mem, notify_on_empty)
    }

    fn run_frames<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        tap: &mut impl TapIo,
        hdr: HdrLayout,
        budget: usize,
    ) -> RxRun {
        let mut out = RxRun::default();
        let _ = q.disable_notification(mem);
        let mut rechecked = false;
        let mut walked = 0usize;
        // Frames this run read from the tap. Reading ahead pays only where the tap holds many
        // frames: at moderate load a run finds a few after each wake-up, and the batch's
        // reads past them, the copy out of the read-ahead buffer and the ring's per-read work
        // cost more than the system calls they save (`bench/results/2026-12-06-rx-load/`).
        let mut reads = 0usize;
        let ahead_from_start = self.last_run_reads >= self.ahead_after;
        self.ahead.new_run();
        loop {
            // Between frames: the last frame's entries, all of them, are written.
            self.used.publish_due(q, mem);
            if let Some(p) = self.pending.take() {
                match self.place_rest(q, mem, p, hdr, &mut out.counts, &mut walked) {
                    Ok(()) => {}
                    Err((p, stall)) => {
                        self.pending = Some(p);
                        match stall {
                            Stall::NoBuffers => out.no_buffers = true,
                            Stall::Budget => out.more = true,
                        }
                        break;
                    }
                }
            }
            // Every frame read counts, control frames too: a host flooding them must not hold
            // the worker in one run.
            // Every frame read counts, control frames too, and every malformed chain: a host
            // flooding control frames or a guest posting bad chains must not hold the worker.
            let c = &out.counts;
            if c.packets + c.dropped + c.control + c.bad_chains >= budget as u64
                || walked >= RUN_DESC_BUDGET
            {
                out.more = true;
                break;
            }
            let start_avail = q.next_avail();
            let Some(chain) = pop(q, mem, &mut out.counts) else {
                if next_after_empty(q, mem, &mut rechecked) {
                    continue;
                }
                out.no_buffers = true;
                break;
            };
            rechecked = false;
            let head = chain.head_index();
            self.iov.clear();
            self.segs.clear();
            // One iovec is kept for the scratch buffer that takes what does not fit.
            let cap = match collect_chain(
                mem,
                chain,
                true,
                &mut self.iov,
                Some(&mut self.segs),
                MAX_SEGMENTS - 1,
                &mut walked,
            )
            .and_then(|n| hdr.fits(n))
            {
                Ok(n) => n,
                Err(e) => {
                    out.counts.bad_chain(head, e);
                    if self.used.add(q, mem, head, 0).is_ok() {
                        out.counts.used += 1;
                    }
                    continue;
                }
            };
            // Frames held from an earlier batch go first, whichever way this run reads.
            let read = if (tap.batches_reads() && (ahead_from_start || reads >= self.ahead_after))
                || self.ahead.held() > 0
            {
                // No more frames than the guest has buffers for (this chain and the posted
                // ones) and the run has budget left.
                let c = &out.counts;
                let left = budget.saturating_sub((c.packets + c.dropped + c.control) as usize);
                let room = || (usize::from(free_buffers(q, mem)) + 1).min(left);
                let got = self.ahead.next(tap, room);
                if let Some((n, e)) = self.ahead.take_errors() {
                    for _ in 0..n {
                        out.counts.tap_error(&e);
                    }
                }
                match got {
                    Ahead::Frame { slot, len } => Ok((len, Some(slot))),
                    Ahead::Empty => Err(io::Error::from(io::ErrorKind::WouldBlock)),
                }
            } else {
                // Frames larger than the first chain spill into the scratch buffer.
                self.iov.push(libc::iovec {
                    iov_base: self.scratch.as_mut_ptr().cast(),
                    iov_len: self.scratch.len(),
                });
                tap.readv(&self.iov).map(|n| (n, None))
            };
            let (n, ahead_slot) = match read {
                Ok(r) => r,
                Err(e) => {
                    unpop(q);
                    if e.kind() != io::ErrorKind::WouldBlock {
                        out.counts.tap_error(&e);
                    }
                    out.tap_empty = true;
                    break;
                }
            };
            reads += 1;
            if n < hdr.len {
                // Not a frame we can deliver; reuse the chain.
                unpop(q);
                out.counts.dropped += 1;
                continue;
            }
            let frame_iov;
            let frame: &[libc::iovec] = match ahead_slot {
                Some(slot) => {
                    let f = self.ahead.frame(slot, n);
                    frame_iov = [libc::iovec {
                        iov_base: f.as_ptr().cast_mut().cast(),
                        iov_len: f.len(),
                    }];
                    &frame_iov
                }
                None => &self.iov,
            };
            if control_at(frame, hdr.len, n).is_some() {
                // Nobody outside may forge control replies: drop, reuse the chain.
                unpop(q);
                out.counts.control += 1;
                continue;
            }
            if let Some(slot) = ahead_slot {
                let f = self.ahead.frame(slot, n);
                copy_to_iov(&f[..f.len().min(cap)], &self.iov);
            }
            if self.log_writes {
                mark_dirty(mem, &self.segs, n.min(cap));
            }
            if n <= cap {
                if hdr.len == 12 && !write_segs(mem, &self.segs, 10, &1u16.to_le_bytes()) {
                    out.counts.bad_chain(head, ChainError::OutOfMemory);
                }
                if self.used.add(q, mem, head, n as u32).is_ok() {
                    out.counts.used += 1;
                }
                out.counts.packets += 1;
                out.counts.bytes += (n - hdr.len) as u64;
                continue;
            }
            if !hdr.mergeable {
                // The guest's buffer is too small and it cannot merge: drop, reuse the chain.
                unpop(q);
                out.counts.dropped += 1;
                continue;
            }
            let p = PendingRx {
                start_avail,
                len: n,
                first: head,
                filled: cap,
                first_len: cap,
                ahead_slot,
            };
            // Keep the first chain's segments; both buffers are reused, nothing allocated.
            std::mem::swap(&mut self.segs, &mut self.first_segs);
            self.extra.clear();
            self.pending = Some(p);
        }
        self.last_run_reads = reads;
        out
    }

    /// Places the rest of a pending frame into further chains and publishes it; gives the
    /// frame back if the guest runs out of buffers or the run out of descriptor budget
    /// (`walked`) first. A malformed chain drops the frame
    /// (its chains are completed empty, like the malformed one): completing that chain alone
    /// while holding the earlier ones would let `abandon_pending` give it back to the ring
    /// although the guest already has it.
    fn place_rest<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        mut p: PendingRx,
        hdr: HdrLayout,
        counts: &mut PathCounts,
        walked: &mut usize,
    ) -> Result<(), (PendingRx, Stall)> {
        let mut rechecked = false;
        while p.filled < p.len {
            if *walked >= RUN_DESC_BUDGET {
                return Err((p, Stall::Budget));
            }
            let Some(chain) = pop(q, mem, counts) else {
                if next_after_empty(q, mem, &mut rechecked) {
                    continue;
                }
                return Err((p, Stall::NoBuffers));
            };
            rechecked = false;
            let head = chain.head_index();
            self.iov.clear();
            self.segs.clear();
            match collect_chain(
                mem,
                chain,
                true,
                &mut self.iov,
                Some(&mut self.segs),
                MAX_SEGMENTS,
                walked,
            )
            .and_then(|n| {
                if n > 0 {
                    Ok(n)
                } else {
                    Err(ChainError::TooShort)
                }
            }) {
                Ok(cap) => {
                    let take = cap.min(p.len - p.filled);
                    let rest = match p.ahead_slot {
                        Some(slot) => self.ahead.frame(slot, p.len).get(p.filled..),
                        None => self.scratch.get(p.filled - p.first_len..),
                    }
                    .unwrap_or_default();
                    if !write_segs(mem, &self.segs, 0, &rest[..take.min(rest.len())]) {
                        counts.bad_chain(head, ChainError::OutOfMemory);
                    }
                    self.extra.push((head, take as u32));
                    p.filled += take;
                }
                Err(e) => {
                    counts.bad_chain(head, e);
                    counts.dropped += 1;
                    let held = std::iter::once(p.first).chain(self.extra.iter().map(|e| e.0));
                    for h in held.chain(std::iter::once(head)) {
                        if self.used.add(q, mem, h, 0).is_ok() {
                            counts.used += 1;
                        }
                    }
                    return Ok(());
                }
            }
        }
        let nbuf = (1 + self.extra.len()) as u16;
        if !write_segs(mem, &self.first_segs, 10, &nbuf.to_le_bytes()) {
            counts.bad_chain(p.first, ChainError::OutOfMemory);
        }
        if self.used.add(q, mem, p.first, p.first_len as u32).is_ok() {
            counts.used += 1;
        }
        for &(h, l) in &self.extra {
            if self.used.add(q, mem, h, l).is_ok() {
                counts.used += 1;
            }
        }
        counts.packets += 1;
        counts.bytes += (p.len - hdr.len) as u64;
        Ok(())
    }
}
