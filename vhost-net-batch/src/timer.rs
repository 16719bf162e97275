//! One-shot `timerfd`s for the queue workers' epoll, and the monotonic clock the policy is fed
//! with. Non-blocking, so a stale readiness never blocks a worker.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Nanoseconds on `CLOCK_MONOTONIC`.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A one-shot monotonic timer.
#[derive(Debug)]
pub struct Timer {
    fd: OwnedFd,
    armed: bool,
}

impl Timer {
    /// A disarmed timer.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor we own.
        Ok(Timer {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            armed: false,
        })
    }

    fn set(&mut self, ns: u64) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: valid fd and spec; a null old-value pointer is allowed.
        let r =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Fires once after `ns` nanoseconds (at least 1), unless already armed.
    pub fn arm(&mut self, ns: u64) -> io::Result<()> {
        if !self.armed {
            self.set(ns.max(1))?;
            self.armed = true;
        }
        Ok(())
    }

    /// Cancels a pending expiry (also clears one not yet read).
    pub fn disarm(&mut self) {
        if self.armed {
            let _ = self.set(0);
            self.armed = false;
        }
    }

    /// Whether an expiry is pending.
    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// Consumes an expiry after epoll reported the fd readable. Returns true if the timer had
    /// really fired (false for a stale wake-up after `disarm`).
    pub fn ack(&mut self) -> bool {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `buf`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        if n == 8 {
            self.armed = false;
            true
        } else {
            false
        }
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shot_fires_once_and_disarm_clears() {
        let mut t = Timer::new().unwrap();
        assert!(!t.ack(), "nothing before arming");
        t.arm(1_000_000).unwrap();
        assert!(t.is_armed());
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(t.ack());
        assert!(!t.is_armed());
        assert!(!t.ack(), "one-shot");
        t.arm(1_000_000).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        t.disarm();
        assert!(!t.ack(), "disarm drops an unread expiry");
        let a = now_ns();
        assert!(now_ns() >= a);
    }
}
