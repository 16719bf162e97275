//! Wall (or at least whole-system) power, which RAPL cannot see: PSU, disks, NICs, fans, VRM losses.
//!
//! * [`hwmon`]: kernel hwmon sensors, `power*_input` in µW and `energy*_input` in µJ.
//! * [`ipmi`]: the BMC's DCMI power reading via `ipmitool dcmi power reading`.
//! * [`meter`]: any command that prints watts (a smart plug, a lab meter's CLI, …).
//!
//! Power-only sources report watts; the [sampler](crate::sampler) integrates them over time into
//! joules (trapezoidal rule between reads), so their joules are only as good as the read interval.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

pub mod hwmon;
pub mod ipmi;
pub mod meter;

/// How long an external command (ipmitool, meter) may take before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Find a program the way a shell would: a path with `/` as is, otherwise the first match in `$PATH`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = Path::new(program);
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Run a command with piped output; kill it (by its own pid) if it takes longer than `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> io::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn()?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out,
        Err(_) => {
            // SAFETY: kill(2) on the pid of the child this function spawned and has not reaped yet
            // (the waiting thread still owns it).
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            let _ = rx.recv_timeout(Duration::from_secs(1));
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {} s (killed)", timeout.as_secs()),
            ))
        }
    }
}
