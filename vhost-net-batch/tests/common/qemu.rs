//! A real QEMU guest for end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::{repo, run_ok};

/// A QEMU guest booted with ci/qemu-run.sh over a vhost-user socket, driven through its
/// virtio-serial agent (never over the NIC under test).
pub struct QemuGuest {
    /// The agent socket.
    pub agent: PathBuf,
    /// QEMU's pid.
    pub qemu_pid: u32,
}

impl QemuGuest {
    /// Boots the test image with MAC 52:54:00:77:01:02 and address `ip`; waits for its agent.
    pub fn boot(sock: &Path, dir: &Path, tag: &str, ip: &str, extra: &[&str]) -> QemuGuest {
        let agent = dir.join(format!("{tag}.agent"));
        let _ = std::fs::remove_file(&agent);
        let console = dir.join(format!("{tag}.console"));
        let out = run_ok(
            Command::new(repo().join("ci/qemu-run.sh"))
                .args([
                    "--vhost-user",
                    sock.to_str().unwrap(),
                    "--mac",
                    "52:54:00:77:01:02",
                ])
                .args(["--ip", ip, "--agent", agent.to_str().unwrap()])
                .args(["--console-log", console.to_str().unwrap()])
                .args(extra),
        );
        let qemu_pid = out.trim().parse().expect("qemu-run prints the pid");
        let g = QemuGuest { agent, qemu_pid };
        let t = Instant::now();
        let st = Command::new(repo().join("ci/gexec.py"))
            .args([g.agent.to_str().unwrap(), "--wait-ready", "180"])
            .status()
            .unwrap();
        assert!(
            st.success(),
            "guest did not come up; console:\n{}\nqemu stderr:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default(),
            std::fs::read_to_string(console.with_extension("console.qemu-stderr"))
                .unwrap_or_default()
        );
        println!("{tag}: guest ready in {:.1} s", t.elapsed().as_secs_f64());
        g
    }

    /// Runs a shell command in the guest; panics unless it exits 0.
    pub fn exec(&self, cmd: &str) -> String {
        run_ok(Command::new(repo().join("ci/gexec.py")).args([
            self.agent.to_str().unwrap(),
            "--timeout",
            "120",
            "--",
            cmd,
        ]))
    }

    /// Runs a shell command in the guest and returns (exit ok, stdout + stderr).
    pub fn try_exec(&self, cmd: &str) -> (bool, String) {
        let out = Command::new(repo().join("ci/gexec.py"))
            .args([self.agent.to_str().unwrap(), "--timeout", "120", "--", cmd])
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Stops QEMU (SIGTERM) and waits up to 20 s for it to exit.
    pub fn quit(self) {
        // SAFETY: signalling our own child QEMU.
        unsafe { libc::kill(self.qemu_pid as i32, libc::SIGTERM) };
        let end = Instant::now() + std::time::Duration::from_secs(20);
        while Path::new(&format!("/proc/{}", self.qemu_pid)).exists() && Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        // SAFETY: as above; harmless if it already exited.
        unsafe { libc::kill(self.qemu_pid as i32, libc::SIGKILL) };
    }
}
