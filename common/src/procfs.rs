//! CPU time and context switches of processes and threads, from `/proc` (the one reader of
//! `stat` files in the project: the per-VM energy meter, the bench and the tests use it).
//!
//! Every function takes the `/proc` root so tests can point it at a recorded tree.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// A `stat` file that does not have the expected fields.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StatError {
    /// No `)` closing the command name.
    #[error("no ')' after the command name")]
    NoName,
    /// Fewer fields than `stime` needs.
    #[error("stat has only {0} fields after the name")]
    Short(usize),
    /// A field that should be a number is not.
    #[error("bad number in field {field}: {value:?}")]
    Number {
        /// 1-based field number as in proc(5).
        field: usize,
        /// The text found.
        value: String,
    },
}

impl From<StatError> for io::Error {
    fn from(e: StatError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// `utime + stime` (clock ticks) from the text of a `stat` file.
pub fn stat_cpu_ticks(text: &str) -> Result<u64, StatError> {
    // The command name (field 2) is in parentheses and may contain spaces and ')'.
    let close = text.rfind(')').ok_or(StatError::NoName)?;
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let field = |i: usize| -> Result<u64, StatError> {
        let v = rest.get(i).ok_or(StatError::Short(rest.len()))?;
        v.parse::<u64>().map_err(|_| StatError::Number {
            field: i + 3,
            value: (*v).to_string(),
        })
    };
    Ok(field(11)? + field(12)?)
}

/// A process or one of its threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    /// A whole process (all its threads, including exited ones): `PID/stat`.
    Process(u32),
    /// One thread of a process: `PID/task/TID/stat`.
    Thread {
        /// The process.
        pid: u32,
        /// The thread.
        tid: u32,
    },
}

impl Task {
    /// The task's `stat` file under `proc_root`.
    pub fn stat_path(self, proc_root: &Path) -> PathBuf {
        match self {
            Task::Process(pid) => proc_root.join(format!("{pid}/stat")),
            Task::Thread { pid, tid } => proc_root.join(format!("{pid}/task/{tid}/stat")),
        }
    }

    /// The task's `utime + stime` in clock ticks.
    pub fn cpu_ticks(self, proc_root: &Path) -> io::Result<u64> {
        let text = std::fs::read_to_string(self.stat_path(proc_root))?;
        Ok(stat_cpu_ticks(&text)?)
    }
}

/// Clock ticks per second of `stat` files (`sysconf(_SC_CLK_TCK)`, normally 100).
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// User + system CPU seconds of process `pid` (all its threads) under `/proc`.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    Ok(Task::Process(pid).cpu_ticks(Path::new("/proc"))? as f64 / clock_ticks_per_second())
}

/// Voluntary plus involuntary context switches of every live thread of process `pid`.
pub fn context_switches(pid: u32) -> io::Result<u64> {
    threads_switches(pid, Switches::All)
}

/// Voluntary context switches of every live thread of process `pid`: how often its threads
/// went to sleep (waited for an event, a lock or I/O).
pub fn voluntary_context_switches(pid: u32) -> io::Result<u64> {
    threads_switches(pid, Switches::Voluntary)
}

/// User + system CPU seconds of thread `tid` of process `pid`.
pub fn thread_cpu_seconds(pid: u32, tid: u32) -> io::Result<f64> {
    Ok(Task::Thread { pid, tid }.cpu_ticks(Path::new("/proc"))? as f64 / clock_ticks_per_second())
}

/// Voluntary context switches of thread `tid` of process `pid`.
pub fn thread_voluntary_context_switches(pid: u32, tid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))?;
    Ok(status_switches(&status, Switches::Voluntary))
}

/// Which context switches to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Switches {
    All,
    Voluntary,
}

fn threads_switches(pid: u32, which: Switches) -> io::Result<u64> {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        // A thread may exit between the listing and the read: it is skipped.
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        total += status_switches(&status, which);
    }
    Ok(total)
}

/// The context switches a `/proc/<pid>/task/<tid>/status` text reports.
fn status_switches(status: &str, which: Switches) -> u64 {
    status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(key, _)| match which {
            Switches::All => matches!(
                *key,
                "voluntary_ctxt_switches" | "nonvoluntary_ctxt_switches"
            ),
            Switches::Voluntary => *key == "voluntary_ctxt_switches",
        })
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

/// Open descriptors of this process.
pub fn own_fd_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}

/// Threads of this process.
pub fn own_thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// Resident set size of process `pid`, in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no VmRSS line"))
}

/// Open descriptors of process `pid`.
pub fn fd_count(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_with_tricky_command_names() {
        let t = "42 (a) b) c) S 1 2 3 4 5 6 7 8 9 10 111 222 13 14";
        assert_eq!(stat_cpu_ticks(t), Ok(333));
        let line =
            "1234 (qemu-system-x86) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 \
                    100 1000 200 18446744073709551615\n";
        assert_eq!(stat_cpu_ticks(line), Ok(325));
        let odd = "77 (a) b (c)) R 1 77 77 0 -1 0 0 0 0 0 11 22 0 0 20 0 1 0 5 0 0\n";
        assert_eq!(stat_cpu_ticks(odd), Ok(33));
        assert!(stat_cpu_ticks("garbage").is_err());
        assert_eq!(stat_cpu_ticks("42 (x) S 1 2"), Err(StatError::Short(3)));
        assert_eq!(stat_cpu_ticks("42 x S"), Err(StatError::NoName));
        assert!(matches!(
            stat_cpu_ticks("42 (a) S 1 2 3 4 5 6 7 8 9 10 x 2"),
            Err(StatError::Number { field: 14, .. })
        ));
    }

    #[test]
    fn context_switches_from_a_status_text() {
        let t = "Name:\tx\nvoluntary_ctxt_switches:\t42\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(status_switches(t, Switches::All), 49);
        assert_eq!(status_switches(t, Switches::Voluntary), 42);
        assert_eq!(status_switches("Name:\tx\n", Switches::All), 0);
    }

    #[test]
    fn own_process_figures() {
        let me = std::process::id();
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        assert!(context_switches(me).unwrap() > 0);
        assert!(voluntary_context_switches(me).unwrap() <= context_switches(me).unwrap());
        assert!(own_fd_count().unwrap() >= 3);
        assert!(own_thread_count().unwrap() >= 1);
        assert!(rss_kib(me).unwrap() > 0);
        assert!(fd_count(me).unwrap() >= 3);
        assert!(cpu_seconds(u32::MAX).is_err());
    }

    #[test]
    fn one_thread_figures_are_that_thread_s() {
        let me = std::process::id();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let own_cpu = || {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: ts is valid for the call.
                unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
                ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
            };
            // Burn 300 ms of this thread's CPU, then sleep 20 times.
            while own_cpu() < 0.3 {
                std::hint::black_box(0u64);
            }
            for _ in 0..20 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            // SAFETY: gettid has no preconditions.
            let _ = tx.send(unsafe { libc::gettid() } as u32);
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        // This thread burns as much: the process's figure is twice the thread's.
        let start = cpu_seconds(me).unwrap();
        while cpu_seconds(me).unwrap() < start + 0.3 {
            std::hint::black_box(0u64);
        }
        let cpu = thread_cpu_seconds(me, tid).unwrap();
        let waits = thread_voluntary_context_switches(me, tid).unwrap();
        // Its own figures: 300 ms in 10 ms ticks.
        assert!((0.28..0.4).contains(&cpu), "{cpu} s");
        assert!(waits >= 20, "{waits}");
        assert!(thread_cpu_seconds(me, u32::MAX).is_err());
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }
}
