//! RAPL through the perf_event `power` PMU.
//!
//! The kernel describes the PMU under `/sys/bus/event_source/devices/power`:
//!
//! ```text
//! type                       dynamic PMU type number, e.g. "23"
//! cpumask                    one CPU per package, e.g. "0,24"
//! events/energy-pkg          "event=0x02"
//! events/energy-pkg.scale    "2.3283064365386962890625e-10"   (joules per count)
//! events/energy-pkg.unit     "Joules"
//! events/energy-cores, energy-gpu, energy-ram, energy-psys   (whatever the CPU has)
//! ```
//!
//! One counter is opened per event and per CPU of `cpumask` with
//! `perf_event_open(attr{type, config}, pid = -1, cpu, -1, 0)` (system-wide counting, which needs
//! CAP_PERFMON or `perf_event_paranoid <= 0`). The kernel keeps the count in 64 bits (it handles the
//! hardware's 32-bit wrap itself), so reading is one `read(2)` of a `u64` times the scale.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Instant;

use crate::counter::WrapCounter;
use crate::error::PowerError;
use crate::platform::Platform;
use crate::rapl::{hints, in_total_flags, RaplDomain};
use crate::source::{DomainInfo, EnergySource};

const NAME: &str = "perf";

/// One event of the `power` PMU.
#[derive(Debug, Clone, PartialEq)]
pub struct PmuEvent {
    /// Event name (`energy-pkg`, `energy-cores`, `energy-gpu`, `energy-ram`, `energy-psys`).
    pub name: String,
    /// The `config` value (`event=0x02` → 2).
    pub config: u64,
    /// Joules per count (the `.scale` file).
    pub scale: f64,
    /// The `.unit` file (`Joules`).
    pub unit: String,
    /// Which RAPL domain the event measures.
    pub domain: RaplDomain,
}

/// What sysfs says about the `power` PMU.
#[derive(Debug, Clone, PartialEq)]
pub struct PowerPmu {
    /// The PMU type for `perf_event_attr.type`.
    pub pmu_type: u32,
    /// One CPU per package (`cpumask`).
    pub cpus: Vec<u32>,
    /// The energy events.
    pub events: Vec<PmuEvent>,
}

/// Parse a kernel CPU list such as `0,24` or `0-3,8-11`.
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, String> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: u32 = a
                .trim()
                .parse()
                .map_err(|_| format!("bad CPU range '{part}'"))?;
            let b: u32 = b
                .trim()
                .parse()
                .map_err(|_| format!("bad CPU range '{part}'"))?;
            if b < a {
                return Err(format!("bad CPU range '{part}'"));
            }
            cpus.extend(a..=b);
        } else {
            cpus.push(
                part.trim()
                    .parse()
                    .map_err(|_| format!("bad CPU '{part}'"))?,
            );
        }
    }
    Ok(cpus)
}

fn event_domain(name: &str) -> Option<RaplDomain> {
    Some(match name {
        "energy-pkg" => RaplDomain::Package,
        "energy-cores" => RaplDomain::Core,
        "energy-gpu" => RaplDomain::Uncore,
        "energy-ram" => RaplDomain::Dram,
        "energy-psys" => RaplDomain::Psys,
        _ => return None,
    })
}

/// Parse `event=0x02` (the only term RAPL events use).
pub fn parse_event_config(text: &str) -> Result<u64, String> {
    let mut config = None;
    for term in text.trim().split(',') {
        let (k, v) = term
            .split_once('=')
            .ok_or_else(|| format!("bad event term '{term}'"))?;
        if k.trim() != "event" {
            return Err(format!("unsupported event term '{term}'"));
        }
        let v = v.trim();
        let parsed = match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        };
        config = Some(parsed.map_err(|_| format!("bad event value '{v}'"))?);
    }
    config.ok_or_else(|| "empty event description".to_string())
}

/// Read the `power` PMU description from `<sys_root>/bus/event_source/devices/power`.
pub fn read_power_pmu(platform: &Platform) -> Result<PowerPmu, PowerError> {
    let dir = platform.sys("bus/event_source/devices/power");
    if !dir.exists() {
        return Err(PowerError::not_present(
            NAME,
            hints::absent(
                platform,
                &format!("{} does not exist", dir.display()),
                "the kernel has no RAPL 'power' PMU, which needs CONFIG_PERF_EVENTS_INTEL_RAPL \
                 and a CPU with RAPL",
            ),
        ));
    }
    let read = |rel: &str| -> Result<String, PowerError> {
        let p = dir.join(rel);
        platform
            .read_trimmed(&p)
            .map_err(|e| PowerError::io(NAME, p, e))
    };
    let pmu_type = read("type")?.parse::<u32>().map_err(|e| {
        PowerError::parse(NAME, dir.join("type").display().to_string(), e.to_string())
    })?;
    let cpus = parse_cpu_list(&read("cpumask")?)
        .map_err(|e| PowerError::parse(NAME, dir.join("cpumask").display().to_string(), e))?;
    let events_dir = dir.join("events");
    let mut names: Vec<String> = fs::read_dir(&events_dir)
        .map_err(|e| PowerError::io(NAME, &events_dir, e))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| !n.contains('.'))
        .collect();
    names.sort();
    let mut events = Vec::new();
    for name in names {
        let Some(domain) = event_domain(&name) else {
            continue;
        };
        let config = parse_event_config(&read(&format!("events/{name}"))?).map_err(|e| {
            PowerError::parse(NAME, events_dir.join(&name).display().to_string(), e)
        })?;
        let scale_text = read(&format!("events/{name}.scale"))?;
        let scale = scale_text.parse::<f64>().map_err(|e| {
            PowerError::parse(
                NAME,
                format!("events/{name}.scale"),
                format!("{e}: '{scale_text}'"),
            )
        })?;
        if !(scale.is_finite() && scale > 0.0) {
            return Err(PowerError::parse(
                NAME,
                format!("events/{name}.scale"),
                format!("scale must be positive, got {scale}"),
            ));
        }
        let unit = read(&format!("events/{name}.unit")).unwrap_or_else(|_| "Joules".into());
        if unit != "Joules" {
            return Err(PowerError::parse(
                NAME,
                format!("events/{name}.unit"),
                format!("expected 'Joules', got '{unit}'"),
            ));
        }
        events.push(PmuEvent {
            name,
            config,
            scale,
            unit,
            domain,
        });
    }
    if events.is_empty() {
        return Err(PowerError::not_present(
            NAME,
            format!("{} lists no energy events", events_dir.display()),
        ));
    }
    if cpus.is_empty() {
        return Err(PowerError::parse(NAME, "cpumask", "empty"));
    }
    Ok(PowerPmu {
        pmu_type,
        cpus,
        events,
    })
}

/// `struct perf_event_attr`, first version (`PERF_ATTR_SIZE_VER0` = 64 bytes), which every kernel accepts.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttrV0 {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// One counting perf event (no sampling), read as a 64-bit count.
#[derive(Debug)]
pub struct PerfCounter {
    file: File,
}

impl PerfCounter {
    /// `perf_event_open` a system-wide counter of `(pmu_type, config)` on `cpu`.
    pub fn open(pmu_type: u32, config: u64, cpu: u32) -> io::Result<Self> {
        let attr = PerfEventAttrV0 {
            type_: pmu_type,
            size: std::mem::size_of::<PerfEventAttrV0>() as u32,
            config,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid, fully initialised perf_event_attr (VER0 layout with its size
        // set), alive for the duration of the call; the other arguments are plain integers.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttrV0,
                -1 as libc::pid_t,
                cpu as libc::c_int,
                -1 as libc::c_int,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a new file descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        Ok(PerfCounter {
            file: File::from(owned),
        })
    }

    /// The current count.
    pub fn read(&mut self) -> io::Result<u64> {
        let mut buf = [0u8; 8];
        self.file.read_exact(&mut buf)?;
        Ok(u64::from_ne_bytes(buf))
    }
}

struct Counter {
    counter: PerfCounter,
    scale: f64,
    acc: WrapCounter,
}

/// The perf_event RAPL reader.
pub struct PerfRapl {
    pmu: PowerPmu,
    counters: Vec<Counter>,
    domains: Vec<DomainInfo>,
    dir: PathBuf,
}

impl std::fmt::Debug for PerfRapl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerfRapl")
            .field("pmu", &self.pmu)
            .field("domains", &self.domains)
            .finish()
    }
}

/// The (package, event) pairs to open: every event on every package CPU, except `psys`, which is
/// platform-wide and read once (on the first CPU).
pub fn plan_counters(pmu: &PowerPmu, platform: &Platform) -> Vec<(u32, u32, PmuEvent)> {
    let topo = platform.topology();
    let mut plan = Vec::new();
    for (ordinal, &cpu) in pmu.cpus.iter().enumerate() {
        let pkg = topo
            .iter()
            .find(|t| t.cpu == cpu)
            .map(|t| t.package)
            .unwrap_or(ordinal as u32);
        for ev in &pmu.events {
            if ev.domain == RaplDomain::Psys && ordinal > 0 {
                continue;
            }
            plan.push((pkg, cpu, ev.clone()));
        }
    }
    plan.sort_by_key(|(pkg, _, ev)| (*pkg, ev.domain));
    plan
}

impl PerfRapl {
    /// Read the PMU description and open one counter per event and package.
    pub fn open(platform: &Platform) -> Result<Self, PowerError> {
        let pmu = read_power_pmu(platform)?;
        let dir = platform.sys("bus/event_source/devices/power");
        let plan = plan_counters(&pmu, platform);
        let mut counters = Vec::new();
        let mut kinds = Vec::new();
        let mut names = Vec::new();
        for (pkg, cpu, ev) in plan {
            match PerfCounter::open(pmu.pmu_type, ev.config, cpu) {
                Ok(mut counter) => {
                    let mut acc = WrapCounter::bits64();
                    let first = counter.read().map_err(|e| PowerError::io(NAME, &dir, e))?;
                    acc.update(first);
                    counters.push(Counter {
                        counter,
                        scale: ev.scale,
                        acc,
                    });
                    kinds.push(ev.domain);
                    names.push(ev.domain.name(pkg));
                }
                Err(e) => {
                    let errno = e.raw_os_error();
                    if matches!(errno, Some(libc::EACCES) | Some(libc::EPERM)) {
                        let paranoid = platform
                            .read_trimmed(&platform.proc_path("sys/kernel/perf_event_paranoid"))
                            .ok()
                            .and_then(|s| s.parse().ok());
                        return Err(PowerError::PermissionDenied {
                            source_name: NAME.into(),
                            path: dir,
                            hint: hints::perf_permission_hint(paranoid),
                        });
                    }
                    if ev.domain == RaplDomain::Package {
                        return Err(PowerError::not_present(
                            NAME,
                            hints::absent(
                                platform,
                                &format!(
                                    "perf_event_open(type {}, {}, cpu {cpu}) failed: {e}",
                                    pmu.pmu_type, ev.name
                                ),
                                "the kernel refused the RAPL event",
                            ),
                        ));
                    }
                    tracing::debug!("perf: {} on cpu {cpu} not available: {e}", ev.name);
                }
            }
        }
        let flags = in_total_flags(&kinds);
        let domains = names
            .into_iter()
            .zip(flags)
            .map(|(n, t)| DomainInfo::energy(n, t))
            .collect();
        Ok(PerfRapl {
            pmu,
            counters,
            domains,
            dir,
        })
    }
}

impl EnergySource for PerfRapl {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> String {
        let events: Vec<&str> = self.pmu.events.iter().map(|e| e.name.as_str()).collect();
        format!(
            "RAPL via perf_event PMU type {} ({}), events {} on CPUs {:?}",
            self.pmu.pmu_type,
            self.dir.display(),
            events.join(","),
            self.pmu.cpus
        )
    }

    fn domains(&self) -> &[DomainInfo] {
        &self.domains
    }

    fn read(&mut self, _now: Instant) -> Result<Vec<f64>, PowerError> {
        let mut out = Vec::with_capacity(self.counters.len());
        for c in &mut self.counters {
            let raw = c
                .counter
                .read()
                .map_err(|e| PowerError::io(NAME, &self.dir, e))?;
            c.acc.update(raw);
            out.push(c.acc.total() as f64 * c.scale);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert_eq!(parse_cpu_list("0,24\n").unwrap(), vec![0, 24]);
        assert_eq!(parse_cpu_list("0-2,8").unwrap(), vec![0, 1, 2, 8]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
    }

    #[test]
    fn event_configs() {
        assert_eq!(parse_event_config("event=0x02").unwrap(), 2);
        assert_eq!(parse_event_config("event=0x1a\n").unwrap(), 0x1a);
        assert_eq!(parse_event_config("event=5").unwrap(), 5);
        assert!(parse_event_config("umask=0x1").is_err());
        assert!(parse_event_config("").is_err());
    }
}
