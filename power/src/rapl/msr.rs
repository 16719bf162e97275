//! RAPL through the model-specific registers (`/dev/cpu/N/msr`, read with `pread` at offset = MSR).
//!
//! Intel: `MSR_RAPL_POWER_UNIT` 0x606, energy status `PKG` 0x611, `PP0` (cores) 0x639, `PP1` (uncore /
//! graphics) 0x641, `DRAM` 0x619, `PLATFORM` (psys) 0x64D. AMD (family 17h and later, and Hygon):
//! units 0xC0010299, core energy 0xC001029A (one register per physical core), package energy 0xC001029B.
//!
//! The unit register packs three exponents: bits 3:0 power unit (1/2^PU W), bits 12:8 energy status
//! unit (1/2^ESU J; ESU 14 → 61.035 µJ, 16 → 15.259 µJ), bits 19:16 time unit (1/2^TU s). Energy status
//! registers count in that unit in their low 32 bits and wrap at 2^32.
//!
//! Exceptions (as the Linux driver applies them): Intel Xeon parts from Haswell-EP up to Ice Lake-SP
//! (and Xeon Phi) count DRAM in a fixed 15.3 µJ unit whatever ESU says; Sapphire Rapids and Emerald
//! Rapids count psys in whole joules.
//!
//! Reading needs the `msr` driver (`modprobe msr`), CAP_SYS_RAWIO and read access to the device node.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use crate::counter::WrapCounter;
use crate::error::PowerError;
use crate::platform::{CpuInfo, CpuVendor, Platform};
use crate::rapl::{hints, in_total_flags, RaplDomain};
use crate::source::{DomainInfo, EnergySource};

const NAME: &str = "msr";

/// Intel `MSR_RAPL_POWER_UNIT`.
pub const INTEL_RAPL_POWER_UNIT: u32 = 0x606;
/// Intel `MSR_PKG_ENERGY_STATUS`.
pub const INTEL_PKG_ENERGY_STATUS: u32 = 0x611;
/// Intel `MSR_PP0_ENERGY_STATUS` (cores).
pub const INTEL_PP0_ENERGY_STATUS: u32 = 0x639;
/// Intel `MSR_PP1_ENERGY_STATUS` (uncore / graphics).
pub const INTEL_PP1_ENERGY_STATUS: u32 = 0x641;
/// Intel `MSR_DRAM_ENERGY_STATUS`.
pub const INTEL_DRAM_ENERGY_STATUS: u32 = 0x619;
/// Intel `MSR_PLATFORM_ENERGY_STATUS` (psys).
pub const INTEL_PLATFORM_ENERGY_STATUS: u32 = 0x64D;
/// AMD `MSR_AMD_RAPL_POWER_UNIT`.
pub const AMD_RAPL_POWER_UNIT: u32 = 0xC001_0299;
/// AMD `MSR_AMD_CORE_ENERGY_STATUS` (per physical core).
pub const AMD_CORE_ENERGY_STATUS: u32 = 0xC001_029A;
/// AMD `MSR_AMD_PKG_ENERGY_STATUS`.
pub const AMD_PKG_ENERGY_STATUS: u32 = 0xC001_029B;

/// The decoded RAPL unit register.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RaplUnits {
    /// Watts per power-limit count (1/2^PU).
    pub power_w: f64,
    /// Joules per energy-status count (1/2^ESU).
    pub energy_j: f64,
    /// Seconds per time-window count (1/2^TU).
    pub time_s: f64,
    /// The raw energy status unit exponent (ESU).
    pub esu: u32,
}

/// Decode a raw `RAPL_POWER_UNIT` value (Intel 0x606 and AMD 0xC0010299 share the layout).
pub fn decode_units(raw: u64) -> RaplUnits {
    let pu = (raw & 0xF) as i32;
    let esu = ((raw >> 8) & 0x1F) as u32;
    let tu = ((raw >> 16) & 0xF) as i32;
    RaplUnits {
        power_w: 0.5f64.powi(pu),
        energy_j: 0.5f64.powi(esu as i32),
        time_s: 0.5f64.powi(tu),
        esu,
    }
}

/// The energy count in an energy status register (its low 32 bits).
pub fn energy_count(raw: u64) -> u32 {
    (raw & 0xFFFF_FFFF) as u32
}

/// The fixed DRAM energy unit of Intel server parts (Haswell-EP … Ice Lake-SP, Xeon Phi), in joules.
pub fn intel_dram_unit_override(family: u32, model: u32) -> Option<f64> {
    // 0x3F Haswell-X, 0x4F Broadwell-X, 0x56 Broadwell-D, 0x55 Skylake-X/Cascade Lake/Cooper Lake,
    // 0x6A Ice Lake-X, 0x6C Ice Lake-D, 0x57 Knights Landing, 0x85 Knights Mill.
    (family == 6 && matches!(model, 0x3F | 0x4F | 0x56 | 0x55 | 0x6A | 0x6C | 0x57 | 0x85))
        .then_some(15.3e-6)
}

/// The fixed psys energy unit of Sapphire Rapids and Emerald Rapids, in joules.
pub fn intel_psys_unit_override(family: u32, model: u32) -> Option<f64> {
    (family == 6 && matches!(model, 0x8F | 0xCF)).then_some(1.0)
}

/// Reads one MSR of one CPU. Tests implement it with recorded register values.
pub trait MsrAccess: Send {
    /// Read MSR `msr` on logical CPU `cpu`.
    fn read_msr(&mut self, cpu: u32, msr: u32) -> io::Result<u64>;
    /// The device path used for `cpu` (for messages).
    fn path(&self, cpu: u32) -> PathBuf;
}

/// `/dev/cpu/N/msr`: `pread(fd, 8, offset = msr)`.
#[derive(Debug)]
pub struct DevCpuMsr {
    dev_root: PathBuf,
    files: HashMap<u32, File>,
}

impl DevCpuMsr {
    /// Use `<dev_root>/cpu/N/msr`.
    pub fn new(dev_root: impl Into<PathBuf>) -> Self {
        DevCpuMsr {
            dev_root: dev_root.into(),
            files: HashMap::new(),
        }
    }
}

impl MsrAccess for DevCpuMsr {
    fn read_msr(&mut self, cpu: u32, msr: u32) -> io::Result<u64> {
        if !self.files.contains_key(&cpu) {
            let f = File::open(self.path(cpu))?;
            self.files.insert(cpu, f);
        }
        let f = &self.files[&cpu];
        let mut buf = [0u8; 8];
        f.read_exact_at(&mut buf, u64::from(msr))?;
        Ok(u64::from_le_bytes(buf))
    }

    fn path(&self, cpu: u32) -> PathBuf {
        self.dev_root.join(format!("cpu/{cpu}/msr"))
    }
}

/// A domain to probe: its kind, the (cpu, msr) registers summed into it, and its unit in joules.
type Wanted = (RaplDomain, Vec<(u32, u32)>, f64);

#[derive(Debug)]
struct Part {
    cpu: u32,
    msr: u32,
    unit_j: f64,
    acc: WrapCounter,
}

#[derive(Debug)]
struct MsrDomain {
    rapl: RaplDomain,
    pkg: u32,
    parts: Vec<Part>,
}

/// The MSR RAPL reader.
pub struct MsrRapl {
    access: Box<dyn MsrAccess>,
    vendor: CpuVendor,
    units: Vec<(u32, RaplUnits)>,
    doms: Vec<MsrDomain>,
    domains: Vec<DomainInfo>,
    warnings: Vec<String>,
}

impl std::fmt::Debug for MsrRapl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsrRapl")
            .field("vendor", &self.vendor)
            .field("units", &self.units)
            .field("domains", &self.domains)
            .finish()
    }
}

fn map_err(platform: &Platform, path: PathBuf, msr: u32, e: io::Error) -> PowerError {
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::NotFound, _) | (_, Some(libc::ENXIO)) | (_, Some(libc::ENODEV)) => {
            PowerError::not_present(
                NAME,
                hints::absent(
                    platform,
                    &format!("{} does not exist", path.display()),
                    "load the msr driver with `sudo modprobe msr`, and in a container pass the \
                     device in with `--device /dev/cpu/N/msr`",
                ),
            )
        }
        (io::ErrorKind::PermissionDenied, _) | (_, Some(libc::EPERM)) => {
            PowerError::PermissionDenied {
                source_name: NAME.into(),
                hint: hints::msr_permission_hint(&path),
                path,
            }
        }
        (_, Some(libc::EIO)) | (io::ErrorKind::UnexpectedEof, _) => PowerError::not_present(
            NAME,
            hints::absent(
                platform,
                &format!("reading MSR {msr:#x} from {} failed ({e})", path.display()),
                "the CPU does not implement this RAPL register",
            ),
        ),
        _ => PowerError::io(NAME, path, e),
    }
}

impl MsrRapl {
    /// Open RAPL MSRs of this machine (vendor from `/proc/cpuinfo`, devices under `<dev_root>/cpu`).
    pub fn open(platform: &Platform) -> Result<Self, PowerError> {
        let info = platform.cpu_info().ok_or_else(|| {
            PowerError::not_present(
                NAME,
                format!("cannot read {}", platform.proc_path("cpuinfo").display()),
            )
        })?;
        Self::open_with(
            platform,
            &info,
            Box::new(DevCpuMsr::new(&platform.dev_root)),
        )
    }

    /// Open with a given CPU identity and register reader (tests pass recorded registers).
    pub fn open_with(
        platform: &Platform,
        cpu: &CpuInfo,
        mut access: Box<dyn MsrAccess>,
    ) -> Result<Self, PowerError> {
        let amd = match &cpu.vendor {
            CpuVendor::Intel => false,
            CpuVendor::Amd | CpuVendor::Hygon => true,
            CpuVendor::Other(v) => {
                return Err(PowerError::not_present(
                    NAME,
                    format!("CPU vendor '{v}' has no known RAPL MSRs"),
                ))
            }
        };
        let topo = platform.topology();
        let mut units = Vec::new();
        let mut doms = Vec::new();
        let packages = platform.package_cpus();
        for (ordinal, &(pkg, pcpu)) in packages.iter().enumerate() {
            let unit_reg = if amd {
                AMD_RAPL_POWER_UNIT
            } else {
                INTEL_RAPL_POWER_UNIT
            };
            let u = decode_units(
                access
                    .read_msr(pcpu, unit_reg)
                    .map_err(|e| map_err(platform, access.path(pcpu), unit_reg, e))?,
            );
            if u.esu == 0 {
                return Err(PowerError::not_present(
                    NAME,
                    hints::absent(
                        platform,
                        &format!("MSR {unit_reg:#x} on CPU {pcpu} reads an energy unit of 0"),
                        "the register is not implemented",
                    ),
                ));
            }
            units.push((pkg, u));
            let mut wanted: Vec<Wanted> = Vec::new();
            if amd {
                wanted.push((
                    RaplDomain::Package,
                    vec![(pcpu, AMD_PKG_ENERGY_STATUS)],
                    u.energy_j,
                ));
                // One core energy register per physical core of this package.
                let mut cores: Vec<(u32, u32)> = Vec::new();
                for t in topo.iter().filter(|t| t.package == pkg) {
                    if !cores.iter().any(|(c, _)| *c == t.core) {
                        cores.push((t.core, t.cpu));
                    }
                }
                if !cores.is_empty() {
                    wanted.push((
                        RaplDomain::Core,
                        cores
                            .iter()
                            .map(|&(_, c)| (c, AMD_CORE_ENERGY_STATUS))
                            .collect(),
                        u.energy_j,
                    ));
                }
            } else {
                let dram = intel_dram_unit_override(cpu.family, cpu.model).unwrap_or(u.energy_j);
                let psys = intel_psys_unit_override(cpu.family, cpu.model).unwrap_or(u.energy_j);
                wanted.push((
                    RaplDomain::Package,
                    vec![(pcpu, INTEL_PKG_ENERGY_STATUS)],
                    u.energy_j,
                ));
                wanted.push((
                    RaplDomain::Core,
                    vec![(pcpu, INTEL_PP0_ENERGY_STATUS)],
                    u.energy_j,
                ));
                wanted.push((
                    RaplDomain::Uncore,
                    vec![(pcpu, INTEL_PP1_ENERGY_STATUS)],
                    u.energy_j,
                ));
                wanted.push((
                    RaplDomain::Dram,
                    vec![(pcpu, INTEL_DRAM_ENERGY_STATUS)],
                    dram,
                ));
                if ordinal == 0 {
                    wanted.push((
                        RaplDomain::Psys,
                        vec![(pcpu, INTEL_PLATFORM_ENERGY_STATUS)],
                        psys,
                    ));
                }
            }
            for (rapl, regs, unit_j) in wanted {
                let mut parts = Vec::new();
                let mut failed = None;
                for (cpu_n, msr) in regs {
                    match access.read_msr(cpu_n, msr) {
                        Ok(raw) => {
                            let mut acc = WrapCounter::bits32();
                            acc.update(u64::from(energy_count(raw)));
                            parts.push(Part {
                                cpu: cpu_n,
                                msr,
                                unit_j,
                                acc,
                            });
                        }
                        Err(e) => {
                            failed = Some(map_err(platform, access.path(cpu_n), msr, e));
                            break;
                        }
                    }
                }
                match failed {
                    None => doms.push(MsrDomain { rapl, pkg, parts }),
                    Some(e) if rapl == RaplDomain::Package => return Err(e),
                    Some(e) => {
                        if e.is_permission_denied() {
                            return Err(e);
                        }
                        tracing::debug!("msr: {} not available: {e}", rapl.name(pkg));
                    }
                }
            }
        }
        doms.sort_by_key(|d| (d.pkg, d.rapl));
        let kinds: Vec<RaplDomain> = doms.iter().map(|d| d.rapl).collect();
        let domains = doms
            .iter()
            .zip(in_total_flags(&kinds))
            .map(|(d, t)| DomainInfo::energy(d.rapl.name(d.pkg), t))
            .collect();
        Ok(MsrRapl {
            access,
            vendor: cpu.vendor.clone(),
            units,
            doms,
            domains,
            warnings: Vec::new(),
        })
    }

    /// The decoded unit register of every package.
    pub fn units(&self) -> &[(u32, RaplUnits)] {
        &self.units
    }
}

impl EnergySource for MsrRapl {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> String {
        let layout = match self.vendor {
            CpuVendor::Intel => "Intel 0x606/0x611/0x639/0x641/0x619/0x64D",
            _ => "AMD 0xC0010299/0xC001029B/0xC001029A",
        };
        let units: Vec<String> = self
            .units
            .iter()
            .map(|(p, u)| format!("package-{p}: {:.3} uJ/count", u.energy_j * 1e6))
            .collect();
        format!(
            "RAPL via {} ({layout}; {})",
            self.access.path(0).display(),
            units.join(", ")
        )
    }

    fn domains(&self) -> &[DomainInfo] {
        &self.domains
    }

    fn read(&mut self, _now: Instant) -> Result<Vec<f64>, PowerError> {
        let mut out = Vec::with_capacity(self.doms.len());
        for d in &mut self.doms {
            let mut joules = 0.0;
            for p in &mut d.parts {
                let raw = self
                    .access
                    .read_msr(p.cpu, p.msr)
                    .map_err(|e| PowerError::io(NAME, self.access.path(p.cpu), e))?;
                let step = p.acc.update(u64::from(energy_count(raw)));
                if step.suspicious {
                    self.warnings.push(format!(
                        "{}: MSR {:#x} on CPU {} advanced by more than 2^31 counts between two reads: \
                         sample more often",
                        d.rapl.name(d.pkg),
                        p.msr,
                        p.cpu
                    ));
                }
                joules += p.acc.total() as f64 * p.unit_j;
            }
            out.push(joules);
        }
        Ok(out)
    }

    fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_intel_units() {
        // A typical Sandy Bridge … Skylake value: PU=3 (1/8 W), ESU=14 (61.035 µJ), TU=10 (976.6 µs).
        let u = decode_units(0x000A_0E03);
        assert_eq!(u.power_w, 0.125);
        assert_eq!(u.esu, 14);
        assert!((u.energy_j - 61.035_156_25e-6).abs() < 1e-15);
        assert!((u.time_s - 976.562_5e-6).abs() < 1e-12);
    }

    #[test]
    fn decode_amd_units() {
        // AMD Zen: PU=3, ESU=16 (15.259 µJ), TU=10.
        let u = decode_units(0x000A_1003);
        assert_eq!(u.esu, 16);
        assert!((u.energy_j - 15.258_789_062_5e-6).abs() < 1e-15);
        assert_eq!(u.power_w, 0.125);
    }

    #[test]
    fn energy_count_uses_low_32_bits() {
        assert_eq!(energy_count(0xDEAD_BEEF_0000_1234), 0x1234);
    }

    #[test]
    fn unit_quirks() {
        assert_eq!(intel_dram_unit_override(6, 0x55), Some(15.3e-6));
        assert_eq!(intel_dram_unit_override(6, 0x9E), None);
        assert_eq!(intel_psys_unit_override(6, 0x8F), Some(1.0));
        assert_eq!(intel_psys_unit_override(6, 0x55), None);
    }
}
