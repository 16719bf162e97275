//! Starting a vhost-user backend (ours in a mode, or an external one from a command template)
//! inside a namespace and waiting until it serves: one way for the campaign and the data path
//! bench.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};
use crate::model::Backend;

/// Where and how a backend is started.
pub struct BackendSpec<'a> {
    /// The configuration (ours or external; QEMU's own NIC is no vhost-user backend).
    pub config: &'a Backend,
    /// Our binary.
    pub vnb_bin: &'a Path,
    /// The namespace it runs in.
    pub ns: &'a str,
    /// The VM name given to ours.
    pub vm: &'a str,
    /// The tap it creates in the namespace.
    pub tap: &'a str,
    /// The guest's MAC.
    pub mac: &'a str,
    /// The vhost-user socket it listens on.
    pub socket: &'a Path,
    /// Our control socket, if wanted.
    pub control: Option<&'a Path>,
    /// Its log (standard output and error).
    pub log: PathBuf,
}

impl BackendSpec<'_> {
    /// Starts the backend and waits up to 30 s until its socket and tap exist; a backend that
    /// exits or takes longer is an error carrying its log.
    pub fn start(&self) -> Result<Child> {
        let log = std::fs::File::create(&self.log).map_err(BenchError::file(&self.log))?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns]);
        let what = match self.config {
            Backend::Ours { mode, tuning } => {
                c.arg(self.vnb_bin)
                    .args([
                        "serve", "--vm", self.vm, "--tap", self.tap, "--mac", self.mac,
                    ])
                    .arg("--mode")
                    .arg(mode.to_string())
                    .args(tuning.args())
                    .arg("--socket")
                    .arg(self.socket)
                    .args(["--log", "warn"]);
                if let Some(ctl) = self.control {
                    c.arg("--control").arg(ctl);
                }
                self.vnb_bin.display().to_string()
            }
            Backend::External { template, .. } => {
                let cmd =
                    Backend::fill(template, &self.socket.to_string_lossy(), self.tap, self.mac);
                c.args(["sh", "-c", &format!("exec {cmd}")]);
                cmd
            }
            Backend::QemuTap { .. } => {
                return Err(BenchError::Input(format!(
                    "{}: QEMU's own virtio-net is not a vhost-user backend",
                    self.config.name()
                )))
            }
        };
        let mut child = c
            .stdout(log.try_clone().map_err(BenchError::file(&self.log))?)
            .stderr(log)
            .spawn()
            .map_err(|source| BenchError::Spawn {
                cmd: what.clone(),
                source,
            })?;
        let end = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() || !self.tap_exists() {
            let exited = child.try_wait().ok().flatten();
            if Instant::now() > end || exited.is_some() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BenchError::Setup(format!(
                    "{what} did not create {} and tap {}: {}",
                    self.socket.display(),
                    self.tap,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }

    fn tap_exists(&self) -> bool {
        Command::new("ip")
            .args(["netns", "exec", self.ns, "ip", "link", "show", self.tap])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}
