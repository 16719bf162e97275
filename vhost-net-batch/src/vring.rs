//! The device's vrings: `vhost-user-backend`'s [`VringRwLock`], plus one interrupt to the guest
//! each time the frontend installs a new call eventfd.
//!
//! Why: a frontend hands over call eventfds more than once per ring. Stock QEMU sends one at
//! connect (its "masked notifier", which nobody reads under TCG and which it clears when the
//! ring starts), then the guest notifier right after `SET_VRING_KICK`. A worker woken between
//! the two (the kick eventfd starts readable) signals into the first one: the interrupt is
//! lost, and with `EVENT_IDX` the guest's `used_event` is then already behind, so nothing will
//! ever signal those completions again. The same holds for completions a killed predecessor or
//! a migration's source left unsignalled. One interrupt on every new eventfd, sent once it is
//! installed and under the vring's lock (so every completion published before is visible to
//! the guest when it looks), makes the guest catch up; a spurious one costs it a poll. This is
//! what libvhost-user does on `SET_VRING_CALL` ("in case of I/O hang after reconnecting").

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLockReadGuard, RwLockWriteGuard};

use vhost_user_backend::{VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as VirtQueError;

use crate::device::GuestMem;

/// A vring of the device (see the module documentation), with a count of the frontend's
/// requests waiting for or holding its lock.
#[derive(Clone)]
pub struct Vring(VringRwLock<GuestMem>, Arc<AtomicU32>);

/// Counts one frontend request for as long as it lives (a panic included).
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Vring {
    /// Runs a frontend request (a vhost-user message's handling) on the vring, counted.
    fn frontend<R>(&self, f: impl FnOnce(&VringRwLock<GuestMem>) -> R) -> R {
        self.1.fetch_add(1, Ordering::SeqCst);
        let _w = Waiting(&self.1);
        f(&self.0)
    }

    /// Whether a frontend request waits for or holds the vring's lock. `std`'s locks are not
    /// fair: a worker that takes the lock again as soon as it lets it go can keep such a request
    /// waiting for seconds while a guest floods its rings, so a worker lets it go first
    /// ([`crate::device`]).
    pub fn frontend_waiting(&self) -> bool {
        self.1.load(Ordering::SeqCst) > 0
    }
}

/// Whether `f` looks like an eventfd: the catch-up interrupt is written only to one (a file a
/// frontend passes instead gets no bytes from it). Without `/proc` there is no telling: then
/// it is written, as the crate writes every later interrupt to whatever was installed.
fn is_eventfd(f: &File) -> bool {
    match std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())) {
        Ok(p) => p.as_os_str() == "anon_inode:[eventfd]",
        Err(_) => true,
    }
}

impl<'a> VringStateGuard<'a, GuestMem> for Vring {
    type G = RwLockReadGuard<'a, VringState<GuestMem>>;
}

impl<'a> VringStateMutGuard<'a, GuestMem> for Vring {
    type G = RwLockWriteGuard<'a, VringState<GuestMem>>;
}

impl VringT<GuestMem> for Vring {
    fn new(mem: GuestMem, max_queue_size: u16) -> Result<Self, VirtQueError> {
        Ok(Vring(
            VringRwLock::new(mem, max_queue_size)?,
            Arc::new(AtomicU32::new(0)),
        ))
    }

    fn get_ref(&self) -> RwLockReadGuard<'_, VringState<GuestMem>> {
        self.0.get_ref()
    }

    fn get_mut(&self) -> RwLockWriteGuard<'_, VringState<GuestMem>> {
        self.0.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.0.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.0.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.0.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.0.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.0.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.frontend(|v| v.set_enabled(enabled))
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.frontend(|v| v.set_queue_info(desc_table, avail_ring, used_ring))
    }

    fn queue_next_avail(&self) -> u16 {
        self.frontend(|v| v.queue_next_avail())
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.frontend(|v| v.set_queue_next_avail(base))
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.frontend(|v| v.set_queue_next_used(idx))
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.frontend(|v| v.queue_used_idx())
    }

    fn set_queue_size(&self, num: u16) {
        self.frontend(|v| v.set_queue_size(num))
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.frontend(|v| v.set_queue_event_idx(enabled))
    }

    fn set_queue_ready(&self, ready: bool) {
        self.frontend(|v| v.set_queue_ready(ready))
    }

    fn set_kick(&self, file: Option<File>) {
        self.frontend(|v| v.set_kick(file))
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.0.read_kick()
    }

    /// Installs the new call eventfd and signals it once, under the vring's lock. It is made
    /// close-on-exec (no child process may inherit it) and non-blocking: an eventfd a frontend
    /// filled to its limit would otherwise block every interrupt write, and with it the vring.
    fn set_call(&self, file: Option<File>) {
        let notify = file.as_ref().is_some_and(|f| {
            let fd = f.as_raw_fd();
            // SAFETY: F_SETFD/F_GETFL/F_SETFL on a descriptor `f` owns; no memory is passed.
            let nonblocking = unsafe {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                let fl = libc::fcntl(fd, libc::F_GETFL);
                fl >= 0 && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
            };
            nonblocking && is_eventfd(f)
        });
        self.frontend(|v| {
            v.set_call(file);
            if notify {
                // Under the lock a worker's wake-up holds for writing: every completion
                // published so far is in the used ring when the guest looks.
                if let Some(call) = v.get_ref().get_call() {
                    let _ = call.notify();
                }
            }
        })
    }

    fn set_err(&self, file: Option<File>) {
        self.frontend(|v| v.set_err(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    fn eventfd() -> (File, File) {
        // SAFETY: eventfd(2) returns a new descriptor we own; `dup` a second handle on it.
        unsafe {
            let fd = libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
            assert!(fd >= 0);
            (File::from_raw_fd(fd), File::from_raw_fd(libc::dup(fd)))
        }
    }

    fn count(f: &File) -> u64 {
        let mut v = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer from a non-blocking eventfd.
        let n = unsafe { libc::read(f.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
        if n == 8 {
            u64::from_ne_bytes(v)
        } else {
            0
        }
    }

    #[test]
    fn each_new_call_eventfd_gets_one_interrupt_and_other_files_none() {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        let v = Vring::new(mem, 256).unwrap();
        let (first, sent) = eventfd();
        v.set_call(Some(sent));
        assert_eq!(count(&first), 1);
        assert_eq!(count(&first), 0, "once");
        // Installed: the device signals through it.
        v.signal_used_queue().unwrap();
        assert_eq!(count(&first), 1);
        let (second, sent) = eventfd();
        v.set_call(Some(sent));
        assert_eq!((count(&first), count(&second)), (0, 1));
        // Close-on-exec whatever the frontend sent.
        let fd = v.get_ref().get_call().as_ref().unwrap().as_raw_fd();
        // SAFETY: F_GETFD on a descriptor the vring owns.
        assert_ne!(
            unsafe { libc::fcntl(fd, libc::F_GETFD) } & libc::FD_CLOEXEC,
            0
        );
        // A regular file is installed (the crate's choice) but never written here.
        let f = tempfile::tempfile().unwrap();
        v.set_call(Some(f.try_clone().unwrap()));
        assert_eq!(f.metadata().unwrap().len(), 0);
        v.set_call(None);
        assert!(v.get_ref().get_call().is_none());
    }

    #[test]
    fn a_full_blocking_eventfd_from_the_frontend_blocks_nothing() {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        let v = Vring::new(mem, 256).unwrap();
        // SAFETY: a blocking eventfd filled to its limit (one more write would block).
        let f = unsafe {
            let fd = libc::eventfd(0, libc::EFD_CLOEXEC);
            assert!(fd >= 0);
            let full = (u64::MAX - 1).to_ne_bytes();
            assert_eq!(libc::write(fd, full.as_ptr().cast(), 8), 8);
            File::from_raw_fd(fd)
        };
        v.set_call(Some(f));
        assert!(v.signal_used_queue().is_err(), "EAGAIN, not a hang");
        let fd = v.get_ref().get_call().as_ref().unwrap().as_raw_fd();
        // SAFETY: F_GETFL on a descriptor the vring owns.
        assert_ne!(
            unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_NONBLOCK,
            0
        );
    }
}
