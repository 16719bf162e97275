//! RAPL through the powercap sysfs interface (`/sys/class/powercap/intel-rapl*`).
//!
//! Layout (the same for Intel and, with the `intel_rapl_msr` driver, AMD):
//!
//! ```text
//! /sys/class/powercap/intel-rapl            control type (no energy_uj): skipped
//! /sys/class/powercap/intel-rapl:0          name=package-0  energy_uj  max_energy_range_uj
//! /sys/class/powercap/intel-rapl:0:0        name=core       (a subzone of package-0)
//! /sys/class/powercap/intel-rapl:0:1        name=uncore
//! /sys/class/powercap/intel-rapl:0:2        name=dram
//! /sys/class/powercap/intel-rapl:1          name=psys       (or package-1 on a 2-socket server)
//! /sys/class/powercap/intel-rapl-mmio:0     name=package-0  (the same package through MMIO)
//! ```
//!
//! Zones are identified by their `name` file, never by their index: the index order differs between
//! machines (on servers `intel-rapl:0:0` is `dram`, on clients it is `core`). A subzone belongs to the
//! package named by its parent zone. When the MMIO interface duplicates a zone already seen through the
//! MSR interface (`intel-rapl-mmio:0` is package-0 again) it is skipped, so nothing is counted twice.
//!
//! `energy_uj` wraps at `max_energy_range_uj`; [`WrapCounter`] accumulates across wraps.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::counter::WrapCounter;
use crate::error::PowerError;
use crate::platform::Platform;
use crate::rapl::{hints, in_total_flags, RaplDomain};
use crate::source::{DomainInfo, EnergySource};

const NAME: &str = "powercap";

/// One powercap zone that will be read.
#[derive(Debug, Clone)]
pub struct Zone {
    /// Zone directory (for example `/sys/class/powercap/intel-rapl:0:2`).
    pub dir: PathBuf,
    /// The zone's `name` file (`package-0`, `core`, `dram`, …).
    pub zone_name: String,
    /// The domain name used in reports (`package-0`, `core-0`, `dram-0`, `psys`).
    pub domain: String,
    /// RAPL domain kind, when the name is a known one.
    pub rapl: Option<RaplDomain>,
    /// `max_energy_range_uj`.
    pub max_energy_range_uj: u64,
    counter: WrapCounter,
}

/// The powercap RAPL reader.
#[derive(Debug)]
pub struct Powercap {
    platform: Platform,
    zones: Vec<Zone>,
    domains: Vec<DomainInfo>,
    warnings: Vec<String>,
}

struct Found {
    dir: PathBuf,
    prefix: String,
    id: String,
    mmio: bool,
    name: String,
}

fn classify(name: &str) -> Option<(RaplDomain, Option<u32>)> {
    if let Some(n) = name.strip_prefix("package-") {
        return n.parse().ok().map(|n| (RaplDomain::Package, Some(n)));
    }
    match name {
        "core" => Some((RaplDomain::Core, None)),
        "uncore" => Some((RaplDomain::Uncore, None)),
        "dram" => Some((RaplDomain::Dram, None)),
        "psys" => Some((RaplDomain::Psys, None)),
        _ => None,
    }
}

impl Powercap {
    /// Find every RAPL zone under `<sys_root>/class/powercap` and check that `energy_uj` is readable.
    pub fn open(platform: &Platform) -> Result<Self, PowerError> {
        let base = platform.sys("class/powercap");
        let entries = match fs::read_dir(&base) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(PowerError::not_present(
                    NAME,
                    hints::absent(
                        platform,
                        &format!("{} does not exist", base.display()),
                        "load the RAPL driver with `sudo modprobe intel_rapl_msr` (kernel \
                         CONFIG_INTEL_RAPL, a CPU with RAPL)",
                    ),
                ))
            }
            Err(e) => return Err(PowerError::io(NAME, base, e)),
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(fname) = file_name.to_str() else {
                continue;
            };
            let (prefix, id, mmio) = if let Some(id) = fname.strip_prefix("intel-rapl-mmio:") {
                ("intel-rapl-mmio", id, true)
            } else if let Some(id) = fname.strip_prefix("intel-rapl:") {
                ("intel-rapl", id, false)
            } else {
                continue;
            };
            let dir = entry.path();
            if !dir.join("energy_uj").exists() {
                continue;
            }
            let name_path = dir.join("name");
            let name = platform
                .read_trimmed(&name_path)
                .map_err(|e| PowerError::io(NAME, &name_path, e))?;
            found.push(Found {
                dir,
                prefix: prefix.to_string(),
                id: id.to_string(),
                mmio,
                name,
            });
        }
        if found.is_empty() {
            return Err(PowerError::not_present(
                NAME,
                hints::absent(
                    platform,
                    &format!("no intel-rapl zone with energy_uj under {}", base.display()),
                    "load the RAPL driver (`sudo modprobe intel_rapl_msr`); AMD needs a kernel \
                     whose intel_rapl_msr supports AMD",
                ),
            ));
        }
        // MSR interface before MMIO, then by id, so duplicates from MMIO are the ones dropped.
        found.sort_by_key(|f| (f.mmio, id_key(&f.id)));

        let mut zones: Vec<Zone> = Vec::new();
        let mut warnings = Vec::new();
        for f in &found {
            let Some((kind, pkg_in_name)) = classify(&f.name) else {
                warnings.push(format!(
                    "powercap zone {} has unknown name '{}': ignored",
                    f.dir.display(),
                    f.name
                ));
                continue;
            };
            let pkg = match pkg_in_name {
                Some(p) => p,
                None => parent_package(&found, f).unwrap_or(0),
            };
            let domain = kind.name(pkg);
            if zones.iter().any(|z| z.domain == domain) {
                if !f.mmio {
                    warnings.push(format!(
                        "powercap zone {} duplicates domain {domain}: ignored",
                        f.dir.display()
                    ));
                }
                continue;
            }
            let range_path = f.dir.join("max_energy_range_uj");
            let max_energy_range_uj = platform
                .read_trimmed(&range_path)
                .map_err(|e| PowerError::io(NAME, &range_path, e))?
                .parse::<u64>()
                .map_err(|e| {
                    PowerError::parse(NAME, range_path.display().to_string(), e.to_string())
                })?;
            if max_energy_range_uj == 0 {
                return Err(PowerError::parse(
                    NAME,
                    range_path.display().to_string(),
                    "max_energy_range_uj is 0",
                ));
            }
            zones.push(Zone {
                dir: f.dir.clone(),
                zone_name: f.name.clone(),
                domain,
                rapl: Some(kind),
                max_energy_range_uj,
                counter: WrapCounter::new(u128::from(max_energy_range_uj) + 1),
            });
        }
        if zones.is_empty() {
            return Err(PowerError::not_present(
                NAME,
                format!("no known RAPL zone name under {}", base.display()),
            ));
        }
        // Stable report order: by package, then package/core/uncore/dram/psys.
        zones.sort_by(|a, b| {
            let ka = (pkg_of(&a.domain), a.rapl);
            let kb = (pkg_of(&b.domain), b.rapl);
            ka.cmp(&kb)
        });
        let kinds: Vec<RaplDomain> = zones.iter().filter_map(|z| z.rapl).collect();
        let flags = in_total_flags(&kinds);
        let domains = zones
            .iter()
            .zip(flags)
            .map(|(z, t)| DomainInfo::energy(z.domain.clone(), t))
            .collect();
        let mut pc = Powercap {
            platform: platform.clone(),
            zones,
            domains,
            warnings,
        };
        // Fail now, not in the sampler thread, when energy_uj is root-only.
        for i in 0..pc.zones.len() {
            let raw = pc.read_raw(i)?;
            pc.zones[i].counter.update(raw);
        }
        Ok(pc)
    }

    /// The zones being read, in report order.
    pub fn zones(&self) -> &[Zone] {
        &self.zones
    }

    fn read_raw(&self, i: usize) -> Result<u64, PowerError> {
        let path = self.zones[i].dir.join("energy_uj");
        let text = self
            .platform
            .read_trimmed(&path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::PermissionDenied => PowerError::PermissionDenied {
                    source_name: NAME.into(),
                    hint: hints::powercap_permission_hint(&path),
                    path: path.clone(),
                },
                _ if matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ENODATA)) => {
                    PowerError::not_present(
                        NAME,
                        hints::absent(
                            &self.platform,
                            &format!("reading {} failed ({e})", path.display()),
                            "the driver could not read the RAPL register",
                        ),
                    )
                }
                _ => PowerError::io(NAME, &path, e),
            })?;
        text.parse::<u64>().map_err(|e| {
            PowerError::parse(NAME, path.display().to_string(), format!("{e}: '{text}'"))
        })
    }
}

fn id_key(id: &str) -> Vec<u32> {
    id.split(':')
        .map(|p| p.parse().unwrap_or(u32::MAX))
        .collect()
}

fn pkg_of(domain: &str) -> u32 {
    domain
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The package number of a subzone's parent (`intel-rapl:1:0` → the zone `intel-rapl:1`'s
/// `package-N`).
fn parent_package(all: &[Found], zone: &Found) -> Option<u32> {
    let (parent_id, _) = zone.id.rsplit_once(':')?;
    let parent = all
        .iter()
        .find(|f| f.prefix == zone.prefix && f.id == parent_id)?;
    match classify(&parent.name)? {
        (RaplDomain::Package, Some(n)) => Some(n),
        _ => None,
    }
}

impl EnergySource for Powercap {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> String {
        let zones: Vec<String> = self
            .zones
            .iter()
            .map(|z| {
                format!(
                    "{}={}",
                    z.domain,
                    z.dir.file_name().map(Path::new).unwrap_or(&z.dir).display()
                )
            })
            .collect();
        format!(
            "RAPL via {} ({})",
            self.platform.sys("class/powercap").display(),
            zones.join(", ")
        )
    }

    fn domains(&self) -> &[DomainInfo] {
        &self.domains
    }

    fn read(&mut self, _now: Instant) -> Result<Vec<f64>, PowerError> {
        let mut out = Vec::with_capacity(self.zones.len());
        for i in 0..self.zones.len() {
            let raw = self.read_raw(i)?;
            let zone = &mut self.zones[i];
            let step = zone.counter.update(raw);
            if step.suspicious {
                self.warnings.push(format!(
                    "{}: energy_uj advanced by more than half of max_energy_range_uj between two \
                     reads (reads too far apart, or the counter was reset): sample more often",
                    zone.domain
                ));
            }
            out.push(zone.counter.total() as f64 * 1e-6);
        }
        Ok(out)
    }

    fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
}
