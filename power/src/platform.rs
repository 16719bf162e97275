//! Where the sources look for things (`/sys`, `/proc`, `/dev`), and how they read files.
//!
//! Every path a source opens is built from a [`Platform`], so a test (or `vnb-power --sysfs-root DIR`)
//! can point the crate at a recorded tree. File contents are read through an injectable [`FileReader`]:
//! tests run as root, and root bypasses file modes, so the "permission denied" path of a root-only
//! `energy_uj` can only be exercised by a reader that refuses what an unprivileged user could not read.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Reads whole (small) files. Implement this to simulate what another user would see.
pub trait FileReader: Send + Sync + fmt::Debug {
    /// Read a file's whole content as text.
    fn read_to_string(&self, path: &Path) -> io::Result<String>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl FileReader for RealFs {
    fn read_to_string(&self, path: &Path) -> io::Result<String> {
        fs::read_to_string(path)
    }
}

/// The roots every source builds its paths from, plus the file reader.
#[derive(Debug, Clone)]
pub struct Platform {
    /// Stands in for `/sys` (so `<sys_root>/class/powercap`, `<sys_root>/class/hwmon`, …).
    pub sys_root: PathBuf,
    /// Stands in for `/proc` (`cpuinfo`, `stat`, `PID/stat`).
    pub proc_root: PathBuf,
    /// Stands in for `/dev` (`cpu/N/msr`, `ipmi0`).
    pub dev_root: PathBuf,
    /// How file contents are read.
    pub fs: Arc<dyn FileReader>,
}

impl Default for Platform {
    fn default() -> Self {
        Self::host()
    }
}

/// CPU vendor, as far as RAPL is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuVendor {
    /// `GenuineIntel`.
    Intel,
    /// `AuthenticAMD`.
    Amd,
    /// `HygonGenuine` (uses the AMD RAPL MSRs).
    Hygon,
    /// Anything else (the vendor string).
    Other(String),
}

/// What `/proc/cpuinfo` says about the CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuInfo {
    /// Vendor.
    pub vendor: CpuVendor,
    /// `cpu family` (decimal).
    pub family: u32,
    /// `model` (decimal).
    pub model: u32,
    /// The `hypervisor` flag: this kernel runs in a virtual machine.
    pub hypervisor: bool,
    /// The `rapl` flag (AMD reports it; Intel does not).
    pub rapl_flag: bool,
}

/// One logical CPU with its place in the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTopo {
    /// Logical CPU number (`cpuN`).
    pub cpu: u32,
    /// `physical_package_id`.
    pub package: u32,
    /// `core_id` (unique within a package).
    pub core: u32,
}

impl Platform {
    /// The running host: `/sys`, `/proc`, `/dev`, real file reads.
    pub fn host() -> Self {
        Platform {
            sys_root: PathBuf::from("/sys"),
            proc_root: PathBuf::from("/proc"),
            dev_root: PathBuf::from("/dev"),
            fs: Arc::new(RealFs),
        }
    }

    /// Replace the `/sys` root.
    pub fn with_sys_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.sys_root = root.into();
        self
    }

    /// Replace the `/proc` root.
    pub fn with_proc_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.proc_root = root.into();
        self
    }

    /// Replace the `/dev` root.
    pub fn with_dev_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.dev_root = root.into();
        self
    }

    /// Replace the file reader.
    pub fn with_reader(mut self, fs: Arc<dyn FileReader>) -> Self {
        self.fs = fs;
        self
    }

    /// `<sys_root>/<rel>`.
    pub fn sys(&self, rel: &str) -> PathBuf {
        self.sys_root.join(rel)
    }

    /// `<proc_root>/<rel>`.
    pub fn proc_path(&self, rel: &str) -> PathBuf {
        self.proc_root.join(rel)
    }

    /// `<dev_root>/<rel>`.
    pub fn dev(&self, rel: &str) -> PathBuf {
        self.dev_root.join(rel)
    }

    /// Read a file through the injected reader and trim surrounding white space.
    pub fn read_trimmed(&self, path: &Path) -> io::Result<String> {
        Ok(self.fs.read_to_string(path)?.trim().to_string())
    }

    /// Parse `/proc/cpuinfo` (first processor entry plus flags). `None` when unreadable.
    pub fn cpu_info(&self) -> Option<CpuInfo> {
        let text = self.fs.read_to_string(&self.proc_path("cpuinfo")).ok()?;
        Some(parse_cpuinfo(&text))
    }

    /// One sentence when the CPU says it runs under a hypervisor, used to explain missing RAPL.
    pub fn vm_note(&self) -> Option<String> {
        match self.cpu_info() {
            Some(info) if info.hypervisor => Some(
                "this machine is a virtual machine (the CPU reports the 'hypervisor' flag in \
                 /proc/cpuinfo) and hypervisors do not expose RAPL energy counters to guests: \
                 measure on the host, or use a wall meter or the labelled estimate"
                    .to_string(),
            ),
            _ => None,
        }
    }

    /// The CPU topology from `<sys_root>/devices/system/cpu/cpuN/topology`, sorted by CPU number.
    /// Empty when the directory is missing.
    pub fn topology(&self) -> Vec<CpuTopo> {
        let dir = self.sys("devices/system/cpu");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut cpus = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(num) = name
                .to_str()
                .and_then(|n| n.strip_prefix("cpu"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let topo = entry.path().join("topology");
            let read_num = |f: &str| -> Option<u32> {
                self.read_trimmed(&topo.join(f))
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .map(|v| v.max(0) as u32)
            };
            let Some(package) = read_num("physical_package_id") else {
                continue;
            };
            let core = read_num("core_id").unwrap_or(num);
            cpus.push(CpuTopo {
                cpu: num,
                package,
                core,
            });
        }
        cpus.sort_by_key(|c| c.cpu);
        cpus
    }

    /// The first logical CPU of every package, as `(package, cpu)` sorted by package.
    /// Falls back to `[(0, 0)]` when the topology is unknown.
    pub fn package_cpus(&self) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        for c in self.topology() {
            if !out.iter().any(|(p, _)| *p == c.package) {
                out.push((c.package, c.cpu));
            }
        }
        if out.is_empty() {
            out.push((0, 0));
        }
        out.sort();
        out
    }
}

/// Parse the text of `/proc/cpuinfo`.
pub fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut vendor = None;
    let mut family = 0;
    let mut model = 0;
    let mut hypervisor = false;
    let mut rapl_flag = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let key = key.trim();
        let value = value.trim();
        match key {
            "vendor_id" if vendor.is_none() => {
                vendor = Some(match value {
                    "GenuineIntel" => CpuVendor::Intel,
                    "AuthenticAMD" => CpuVendor::Amd,
                    "HygonGenuine" => CpuVendor::Hygon,
                    other => CpuVendor::Other(other.to_string()),
                })
            }
            "cpu family" if family == 0 => family = value.parse().unwrap_or(0),
            "model" if model == 0 => model = value.parse().unwrap_or(0),
            "flags" => {
                hypervisor |= value.split_whitespace().any(|f| f == "hypervisor");
                rapl_flag |= value.split_whitespace().any(|f| f == "rapl");
            }
            _ => {}
        }
    }
    CpuInfo {
        vendor: vendor.unwrap_or(CpuVendor::Other(String::new())),
        family,
        model,
        hypervisor,
        rapl_flag,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_detects_vendor_model_and_hypervisor() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\n\
                    model name\t: Intel(R) Xeon(R)\nflags\t\t: fpu vme hypervisor rapl\n\n\
                    processor\t: 1\nvendor_id\t: GenuineIntel\n";
        let info = parse_cpuinfo(text);
        assert_eq!(info.vendor, CpuVendor::Intel);
        assert_eq!(info.family, 6);
        assert_eq!(info.model, 85);
        assert!(info.hypervisor);
        assert!(info.rapl_flag);
        let amd =
            parse_cpuinfo("vendor_id : AuthenticAMD\ncpu family : 25\nmodel : 1\nflags : fpu\n");
        assert_eq!(amd.vendor, CpuVendor::Amd);
        assert_eq!(amd.family, 25);
        assert!(!amd.hypervisor);
    }
}
