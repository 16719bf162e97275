//! Guest memory that a frontend takes away must not crash the daemon.
//!
//! Guest memory is the frontend's file mapped into this process (`SET_MEM_TABLE`). A frontend
//! that shrinks the file afterwards (a memfd without `F_SEAL_SHRINK`, or a hugetlbfs file)
//! turns every access to the lost pages into a SIGBUS, whose default action ends the whole
//! process and with it every other VM. Sealing cannot be required: DPDK's hugepage files cannot
//! be sealed.
//!
//! So each connection registers its regions here ([`Regions`]), and a SIGBUS handler looks the
//! faulting address up: inside a registered region, it maps anonymous zero pages over the
//! whole region (the access then completes, reading zeros), marks the region faulted and
//! returns; the connection's worker sees the mark after its step and ends that connection
//! only. A SIGBUS anywhere else gets the default action, as before.
//!
//! The registry is a fixed table of atomics: the handler takes no lock and allocates nothing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

/// Regions registered at once, over every connection of the process.
pub const MAX_REGIONS: usize = 1024;

struct Slot {
    /// Start address; 0 when the slot is free.
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static SLOTS: [Slot; MAX_REGIONS] = [FREE; MAX_REGIONS];
/// Serializes taking and freeing slots (never taken by the handler).
static TAKE: Mutex<()> = Mutex::new(());
static INSTALL: Once = Once::new();

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler; si_addr is the
    // faulting address for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &SLOTS {
        let start = s.start.load(Ordering::Acquire);
        let len = s.len.load(Ordering::Acquire);
        if start != 0 && addr >= start && addr - start < len {
            // SAFETY: replaces our own mapping of the region (the frontend keeps its own) with
            // anonymous memory of the same size; mmap is a plain system call, safe in a signal
            // handler. The faulting access is retried on return and reads zeros.
            unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            s.faulted.store(true, Ordering::Release);
            return;
        }
    }
    // Not guest memory: a real bug. Default action on return (the access faults again).
    // SAFETY: resetting a signal's disposition is allowed in a handler.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction with our handler and SA_SIGINFO; sigaction copies it.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
        }
    });
}

/// The regions of one connection's guest memory; freed on drop.
#[derive(Debug, Default)]
pub struct Regions {
    slots: Vec<usize>,
}

impl Regions {
    /// Registers `(start, len)` host ranges, replacing what was registered before (a new memory
    /// table). Returns false when the table is full (those regions stay unguarded).
    pub fn set(&mut self, ranges: impl IntoIterator<Item = (usize, usize)>) -> bool {
        install();
        let _g = TAKE.lock().unwrap_or_else(|e| e.into_inner());
        self.release();
        let mut all = true;
        for (start, len) in ranges {
            if start == 0 || len == 0 {
                continue;
            }
            match SLOTS
                .iter()
                .position(|s| s.start.load(Ordering::Acquire) == 0)
            {
                Some(i) => {
                    SLOTS[i].faulted.store(false, Ordering::Release);
                    SLOTS[i].len.store(len, Ordering::Release);
                    SLOTS[i].start.store(start, Ordering::Release);
                    self.slots.push(i);
                }
                None => all = false,
            }
        }
        all
    }

    /// Whether guest memory of this connection went away under an access.
    pub fn faulted(&self) -> bool {
        self.slots
            .iter()
            .any(|&i| SLOTS[i].faulted.load(Ordering::Acquire))
    }

    fn release(&mut self) {
        for i in self.slots.drain(..) {
            SLOTS[i].start.store(0, Ordering::Release);
            SLOTS[i].len.store(0, Ordering::Release);
        }
    }
}

impl Drop for Regions {
    fn drop(&mut self) {
        let _g = TAKE.lock().unwrap_or_else(|e| e.into_inner());
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_truncated_mapping_reads_zeros_and_is_marked() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("mem"))
            .unwrap();
        let len = 4 * 4096;
        f.set_len(len as u64).unwrap();
        // SAFETY: a shared mapping of the file we just sized; unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        } as *mut u8;
        assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
        // SAFETY: within the mapping.
        unsafe { p.add(4096).write_volatile(7) };
        let mut r = Regions::default();
        assert!(r.set([(p as usize, len)]));
        assert!(!r.faulted());
        f.set_len(0).unwrap();
        // SAFETY: the page is gone from the file: this faults, and the handler maps zeros.
        let v = unsafe { p.add(4096).read_volatile() };
        assert_eq!(v, 0);
        assert!(r.faulted());
        drop(r);
        // SAFETY: our mapping (now anonymous), unmapped once.
        unsafe { libc::munmap(p.cast(), len) };
    }
}
