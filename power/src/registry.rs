//! Which sources exist and how they are chosen: [`SourceKind`] names them on the command line,
//! [`open_sources`] opens them (`auto` or by name), [`list_sources`] says which are usable and
//! why not. The sources themselves implement [`EnergySource`](crate::source::EnergySource) and
//! know nothing of this registry.

use std::fmt;
use std::str::FromStr;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::PowerError;
use crate::estimate::{CpuEstimate, EstimateModel};
use crate::platform::Platform;
use crate::rapl::{msr::MsrRapl, perf::PerfRapl, powercap::Powercap};
use crate::source::{EnergySource, Kind, Quantity};
use crate::wall::{hwmon::Hwmon, ipmi::IpmiDcmi, meter::ExternalMeter};

/// Which source to use, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// The best RAPL reader (powercap, then perf, then MSR) or, without RAPL, the estimate; plus every
    /// usable wall source (hwmon, IPMI with a local BMC, the meter command when given).
    Auto,
    /// `/sys/class/powercap/intel-rapl*` (`energy_uj`).
    Powercap,
    /// The perf_event `power` PMU.
    Perf,
    /// `/dev/cpu/N/msr` RAPL registers.
    Msr,
    /// hwmon power/energy sensors.
    Hwmon,
    /// `ipmitool dcmi power reading`.
    Ipmi,
    /// An external command that prints watts.
    Meter,
    /// The CPU-time model (ESTIMATE).
    Estimate,
}

impl SourceKind {
    /// Every concrete source (not `auto`), in the order `auto` prefers them.
    pub const CONCRETE: [SourceKind; 7] = [
        SourceKind::Powercap,
        SourceKind::Perf,
        SourceKind::Msr,
        SourceKind::Hwmon,
        SourceKind::Ipmi,
        SourceKind::Meter,
        SourceKind::Estimate,
    ];

    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Auto => "auto",
            SourceKind::Powercap => "powercap",
            SourceKind::Perf => "perf",
            SourceKind::Msr => "msr",
            SourceKind::Hwmon => "hwmon",
            SourceKind::Ipmi => "ipmi",
            SourceKind::Meter => "meter",
            SourceKind::Estimate => "estimate",
        }
    }

    /// True for the three RAPL readers.
    pub fn is_rapl(self) -> bool {
        matches!(
            self,
            SourceKind::Powercap | SourceKind::Perf | SourceKind::Msr
        )
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SourceKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => SourceKind::Auto,
            "powercap" => SourceKind::Powercap,
            "perf" => SourceKind::Perf,
            "msr" => SourceKind::Msr,
            "hwmon" => SourceKind::Hwmon,
            "ipmi" => SourceKind::Ipmi,
            "meter" => SourceKind::Meter,
            "estimate" => SourceKind::Estimate,
            other => {
                return Err(format!(
                    "unknown source '{other}': expected one of auto, powercap, perf, msr, hwmon, \
                     ipmi, meter, estimate"
                ))
            }
        })
    }
}

/// Everything needed to open sources.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Where to look (`/sys`, `/proc`, `/dev`) and how to read files.
    pub platform: Platform,
    /// The estimate's model.
    pub model: EstimateModel,
    /// The ipmitool command (program plus optional arguments such as `-I lanplus -H bmc …`);
    /// `dcmi power reading` is appended.
    pub ipmitool: String,
    /// A shell command that prints the current wall power in watts (the `meter` source).
    pub meter_command: Option<String>,
    /// How long a RAPL counter may stay unchanged when a source is opened before it is called stuck.
    pub probe_window: Duration,
}

impl SourceOptions {
    /// The defaults, with the estimate's model and the wall sources taken from the environment
    /// variables `vnb-power` also reads: `VNB_IDLE_WATTS`, `VNB_WATTS_PER_CORE`,
    /// `VNB_METER_CMD` and `VNB_IPMITOOL`.
    pub fn from_env() -> Result<Self, PowerError> {
        let mut o = SourceOptions::default();
        let watts = |var: &str, default: f64| -> Result<f64, PowerError> {
            match std::env::var(var) {
                Ok(v) => v.trim().parse::<f64>().map_err(|_| {
                    PowerError::Config(format!("{var}={v:?} is not a number of watts"))
                }),
                Err(_) => Ok(default),
            }
        };
        o.model.idle_watts = watts("VNB_IDLE_WATTS", o.model.idle_watts)?;
        o.model.watts_per_busy_core = watts("VNB_WATTS_PER_CORE", o.model.watts_per_busy_core)?;
        o.model.validate()?;
        if let Ok(cmd) = std::env::var("VNB_METER_CMD") {
            o.meter_command = Some(cmd);
        }
        if let Ok(cmd) = std::env::var("VNB_IPMITOOL") {
            o.ipmitool = cmd;
        }
        Ok(o)
    }
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            platform: Platform::host(),
            model: EstimateModel::default(),
            ipmitool: crate::wall::ipmi::DEFAULT_IPMITOOL.to_string(),
            meter_command: None,
            probe_window: Duration::from_millis(100),
        }
    }
}

/// Open one concrete source (for `Auto`, use [`open_sources`]). RAPL sources are probed: a counter
/// that does not advance within `opts.probe_window` is an error.
pub fn open_one(
    kind: SourceKind,
    opts: &SourceOptions,
) -> Result<Box<dyn EnergySource>, PowerError> {
    let mut src: Box<dyn EnergySource> = match kind {
        SourceKind::Auto => {
            return Err(PowerError::Config(
                "open_one does not resolve 'auto'; use open_sources".into(),
            ))
        }
        SourceKind::Powercap => Box::new(Powercap::open(&opts.platform)?),
        SourceKind::Perf => Box::new(PerfRapl::open(&opts.platform)?),
        SourceKind::Msr => Box::new(MsrRapl::open(&opts.platform)?),
        SourceKind::Hwmon => Box::new(Hwmon::open(&opts.platform)?),
        SourceKind::Ipmi => Box::new(IpmiDcmi::open(&opts.platform, &opts.ipmitool)?),
        SourceKind::Meter => {
            match &opts.meter_command {
                Some(cmd) => Box::new(ExternalMeter::open(cmd)?),
                None => return Err(PowerError::not_present(
                    "meter",
                    "no meter command given: pass --meter-cmd 'CMD' (a command that prints watts)",
                )),
            }
        }
        SourceKind::Estimate => Box::new(CpuEstimate::open(&opts.platform, opts.model.clone())?),
    };
    if kind.is_rapl() {
        probe_advancing(src.as_mut(), opts.probe_window)?;
    }
    Ok(src)
}

/// Open the named sources. `Auto` expands to the best RAPL reader (or, without RAPL, the estimate)
/// followed by every usable wall source. The first source is the *primary* one.
pub fn open_sources(
    kinds: &[SourceKind],
    opts: &SourceOptions,
) -> Result<Vec<Box<dyn EnergySource>>, PowerError> {
    if kinds.is_empty() {
        return Err(PowerError::Config("no source given".into()));
    }
    let mut out: Vec<Box<dyn EnergySource>> = Vec::new();
    for &kind in kinds {
        if kind == SourceKind::Auto {
            for src in open_auto(opts)? {
                push_unique(&mut out, src)?;
            }
        } else {
            push_unique(&mut out, open_one(kind, opts)?)?;
        }
    }
    Ok(out)
}

fn push_unique(
    out: &mut Vec<Box<dyn EnergySource>>,
    src: Box<dyn EnergySource>,
) -> Result<(), PowerError> {
    if out.iter().any(|s| s.name() == src.name()) {
        return Err(PowerError::Config(format!(
            "source '{}' given twice",
            src.name()
        )));
    }
    out.push(src);
    Ok(())
}

/// What `auto` picks, and why the RAPL readers were not usable (empty when one was).
fn open_auto(opts: &SourceOptions) -> Result<Vec<Box<dyn EnergySource>>, PowerError> {
    let mut out: Vec<Box<dyn EnergySource>> = Vec::new();
    let mut rapl_errors = Vec::new();
    for kind in [SourceKind::Powercap, SourceKind::Perf, SourceKind::Msr] {
        match open_one(kind, opts) {
            Ok(src) => {
                out.push(src);
                break;
            }
            Err(e) => rapl_errors.push(e.to_string()),
        }
    }
    if out.is_empty() {
        tracing::info!(
            "no RAPL source usable ({}); using the CPU-time ESTIMATE",
            rapl_errors.join("; ")
        );
        out.push(open_one(SourceKind::Estimate, opts)?);
    }
    for kind in [SourceKind::Hwmon, SourceKind::Ipmi, SourceKind::Meter] {
        if kind == SourceKind::Meter && opts.meter_command.is_none() {
            continue;
        }
        match open_one(kind, opts) {
            Ok(src) => out.push(src),
            Err(e) => tracing::debug!("auto: {e}"),
        }
    }
    Ok(out)
}

/// Read a source until one of its in-total energy domains advances, or fail after `window`.
/// Sources without in-total energy domains pass at once.
pub fn probe_advancing(src: &mut dyn EnergySource, window: Duration) -> Result<(), PowerError> {
    let watched: Vec<usize> = src
        .domains()
        .iter()
        .enumerate()
        .filter(|(_, d)| d.in_total && d.quantity == Quantity::Energy)
        .map(|(i, _)| i)
        .collect();
    if watched.is_empty() || src.kind() == Kind::Estimate {
        return Ok(());
    }
    let start = Instant::now();
    let first = src.read(start)?;
    loop {
        thread::sleep(Duration::from_millis(2));
        let now = Instant::now();
        let v = src.read(now)?;
        if watched.iter().any(|&i| v[i] != first[i]) {
            return Ok(());
        }
        if now.duration_since(start) >= window {
            let names: Vec<&str> = watched
                .iter()
                .map(|&i| src.domains()[i].name.as_str())
                .collect();
            return Err(PowerError::Counter {
                source_name: src.name().to_string(),
                domain: names.join(","),
                detail: format!(
                    "did not advance in {} ms although RAPL updates about every millisecond: the \
                     firmware or hypervisor exposes the counter but never updates it (seen in VMs and \
                     emulators; a tree replayed with --sysfs-root that nothing updates looks the \
                     same), so it cannot measure anything; use another source",
                    window.as_millis()
                ),
            });
        }
    }
}

/// One row of `vnb-power list`.
#[derive(Debug, Clone, Serialize)]
pub struct Availability {
    /// The source (`auto` is included: it says what `auto` would pick).
    pub source: SourceKind,
    /// Whether opening (and probing) it worked here.
    pub usable: bool,
    /// Why not, or what it reads.
    pub reason: String,
    /// Measurement or estimate (when usable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
}

/// Try every source and say which are usable here and why not; the last row explains `auto`.
pub fn list_sources(opts: &SourceOptions) -> Vec<Availability> {
    let mut rows = Vec::new();
    let mut usable_rapl = None;
    let mut wall = Vec::new();
    for kind in SourceKind::CONCRETE {
        match open_one(kind, opts) {
            Ok(src) => {
                if kind.is_rapl() && usable_rapl.is_none() {
                    usable_rapl = Some(kind);
                }
                if matches!(
                    kind,
                    SourceKind::Hwmon | SourceKind::Ipmi | SourceKind::Meter
                ) {
                    wall.push(kind.as_str());
                }
                rows.push(Availability {
                    source: kind,
                    usable: true,
                    reason: src.description(),
                    kind: Some(src.kind()),
                });
            }
            Err(e) => {
                let reason = e.to_string();
                let reason = reason
                    .strip_prefix(&format!("{}: ", kind.as_str()))
                    .unwrap_or(&reason)
                    .to_string();
                rows.push(Availability {
                    source: kind,
                    usable: false,
                    reason,
                    kind: None,
                });
            }
        }
    }
    let primary = match usable_rapl {
        Some(k) => format!("RAPL present: would use {k}"),
        None => format!(
            "RAPL absent (powercap, perf and msr all unusable, see above{}): would use the \
             CPU-time ESTIMATE, which is a model, not a measurement",
            if opts.platform.vm_note().is_some() {
                "; this is a virtual machine"
            } else {
                ""
            }
        ),
    };
    let wall = if wall.is_empty() {
        "; no wall power source".to_string()
    } else {
        format!("; wall power from {}", wall.join(", "))
    };
    rows.push(Availability {
        source: SourceKind::Auto,
        usable: true,
        reason: format!("{primary}{wall}"),
        kind: Some(if usable_rapl.is_some() {
            Kind::Measurement
        } else {
            Kind::Estimate
        }),
    });
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_kind_round_trips() {
        for k in SourceKind::CONCRETE {
            assert_eq!(k.as_str().parse::<SourceKind>().unwrap(), k);
        }
        assert_eq!("AUTO".parse::<SourceKind>().unwrap(), SourceKind::Auto);
        let err = "rapl".parse::<SourceKind>().unwrap_err();
        assert!(err.contains("unknown source 'rapl'"), "{err}");
    }
}
