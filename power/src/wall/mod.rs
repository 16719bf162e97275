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

/// Run a command with piped output, in a process group of its own, inheriting no descriptor
/// beyond its standard ones; if it takes longer than `timeout`, kill the whole group (a shell
/// and whatever it started).
///
/// The daemon holds guests' memory and eventfds: descriptors it did not open itself arrive
/// without close-on-exec (the `vhost` crate receives them), so the child closes everything from
/// 3 up before it runs.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> io::Result<Output> {
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: close_range is async-signal-safe and touches only the child's descriptor table;
    // 0, 1 and 2 (the pipes set up above) stay open.
    unsafe {
        cmd.pre_exec(|| {
            libc::close_range(3, libc::c_uint::MAX, 0);
            Ok(())
        })
    };
    let child = cmd.spawn()?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out,
        Err(_) => {
            // SAFETY: kill(2) on the process group of the child this function spawned (its pid is
            // the group's id; the child is not reaped yet, the waiting thread owns it).
            unsafe {
                libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
            }
            let _ = rx.recv_timeout(Duration::from_secs(1));
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {} s (killed)", timeout.as_secs()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn alive(pid: i32) -> bool {
        // A zombie still has /proc/PID: read its state.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
    }

    #[test]
    fn a_hung_command_is_killed_with_everything_it_started() {
        let dir = std::env::temp_dir().join(format!("vnb-wall-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("grandchild");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "sleep 300 & echo $! > {}; sleep 300",
            pidfile.display()
        ));
        let t = Instant::now();
        let e = run_with_timeout(cmd, Duration::from_millis(500)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(2);
        while alive(pid) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !alive(pid),
            "the command's own child {pid} outlived the timeout"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn commands_inherit_no_descriptor_beyond_stdio() {
        // A descriptor without close-on-exec, as the vhost crate leaves a guest's memfd.
        let f = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: dup2 onto an unused high number; the copy is closed below.
        let high = unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&f), 900) };
        assert_eq!(high, 900);
        let mut cmd = Command::new("ls");
        cmd.arg("/proc/self/fd");
        let out = run_with_timeout(cmd, Duration::from_secs(10)).unwrap();
        // SAFETY: closing the copy made above.
        unsafe { libc::close(900) };
        let fds: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect();
        assert!(!fds.contains(&"900".to_string()), "inherited: {fds:?}");
        assert!(fds.contains(&"0".to_string()), "{fds:?}");
    }
}
