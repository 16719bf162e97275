//! The CPU-time ESTIMATE, for machines without RAPL (like the VMs this project is developed on).
//!
//! **This is a model, not a measurement.** It is labelled `"kind": "estimate"` in JSON and `ESTIMATE`
//! in text everywhere it appears. Model:
//!
//! ```text
//! P = idle_watts + watts_per_busy_core × busy_cores
//! E(t0, t1) = idle_watts × (t1 − t0) + watts_per_busy_core × busy_core_seconds(t0, t1)
//! ```
//!
//! `busy_core_seconds` comes from the aggregate `cpu` line of `/proc/stat`: the increase of
//! `user + nice + system + irq + softirq` ticks divided by `sysconf(_SC_CLK_TCK)`. `idle`, `iowait` and
//! `steal` are not busy (steal is time the hypervisor gave to someone else); `guest`/`guest_nice` are
//! already inside `user`/`nice` and are not added again.
//!
//! Defaults (`--idle-watts 40 --watts-per-core 5`, or `VNB_IDLE_WATTS` / `VNB_WATTS_PER_CORE`) are
//! placeholders in the range of a small one-socket server; they make *differences between
//! configurations* (driven by CPU time) visible, not absolute watts. Calibrate them against a meter:
//! `idle_watts` = power of the idle machine, `watts_per_busy_core` = (power with N cores busy −
//! idle power) / N. The estimate cannot see what batching really saves in hardware (fewer wake-ups,
//! deeper C-states beyond CPU time), so a benchmark must report RAPL or wall power when it has them.

use std::time::Instant;

use serde::Serialize;

use crate::error::PowerError;
use crate::platform::Platform;
use crate::source::{DomainInfo, EnergySource, Kind};

const NAME: &str = "estimate";

/// Default idle power of the model, watts.
pub const DEFAULT_IDLE_WATTS: f64 = 40.0;
/// Default power per fully busy core (logical CPU), watts.
pub const DEFAULT_WATTS_PER_BUSY_CORE: f64 = 5.0;

/// The estimate's parameters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EstimateModel {
    /// Power of the idle machine, watts.
    pub idle_watts: f64,
    /// Additional power per fully busy logical CPU, watts.
    pub watts_per_busy_core: f64,
}

impl Default for EstimateModel {
    fn default() -> Self {
        EstimateModel {
            idle_watts: DEFAULT_IDLE_WATTS,
            watts_per_busy_core: DEFAULT_WATTS_PER_BUSY_CORE,
        }
    }
}

impl EstimateModel {
    /// Check that both parameters are finite and not negative.
    pub fn validate(&self) -> Result<(), PowerError> {
        for (name, v) in [
            ("idle watts", self.idle_watts),
            ("watts per busy core", self.watts_per_busy_core),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(PowerError::Config(format!(
                    "estimate model: {name} must be a finite number >= 0, got {v}"
                )));
            }
        }
        Ok(())
    }

    /// Joules for `elapsed_s` seconds during which the CPUs were busy `busy_core_s` core-seconds.
    pub fn energy_joules(&self, elapsed_s: f64, busy_core_s: f64) -> f64 {
        self.idle_watts * elapsed_s + self.watts_per_busy_core * busy_core_s
    }

    /// Watts with `busy_cores` cores busy on average.
    pub fn watts(&self, busy_cores: f64) -> f64 {
        self.idle_watts + self.watts_per_busy_core * busy_cores
    }
}

/// Aggregate CPU time from `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    /// `user + nice + system + irq + softirq`.
    pub busy: u64,
    /// `busy + idle + iowait + steal`.
    pub total: u64,
}

/// What the estimate needs from `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// The aggregate `cpu` line.
    pub all: CpuTimes,
    /// How many `cpuN` lines there are (logical CPUs).
    pub cpus: usize,
}

/// Parse the text of `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Result<ProcStat, String> {
    let mut all = None;
    let mut cpus = 0;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(label) = fields.next() else {
            continue;
        };
        if label == "cpu" {
            let v: Vec<u64> = fields
                .map(|f| {
                    f.parse::<u64>()
                        .map_err(|e| format!("bad cpu field '{f}': {e}"))
                })
                .collect::<Result<_, _>>()?;
            if v.len() < 4 {
                return Err(format!(
                    "cpu line has {} fields, expected at least 4",
                    v.len()
                ));
            }
            let get = |i: usize| v.get(i).copied().unwrap_or(0);
            // user nice system idle iowait irq softirq steal guest guest_nice
            let busy = get(0) + get(1) + get(2) + get(5) + get(6);
            let total = busy + get(3) + get(4) + get(7);
            all = Some(CpuTimes { busy, total });
        } else if label.starts_with("cpu") && label[3..].parse::<u32>().is_ok() {
            cpus += 1;
        }
    }
    let all = all.ok_or("no aggregate 'cpu' line")?;
    Ok(ProcStat {
        all,
        cpus: cpus.max(1),
    })
}

pub use vnb_common::procfs::clock_ticks_per_second;

/// The CPU-time estimate as an [`EnergySource`] (kind [`Kind::Estimate`], domain `cpu-estimate`).
#[derive(Debug)]
pub struct CpuEstimate {
    platform: Platform,
    model: EstimateModel,
    hz: f64,
    cpus: usize,
    start: Option<(Instant, CpuTimes)>,
    domains: Vec<DomainInfo>,
}

impl CpuEstimate {
    /// Check `/proc/stat` and the model. The first [`EnergySource::read`] is the zero point.
    pub fn open(platform: &Platform, model: EstimateModel) -> Result<Self, PowerError> {
        model.validate()?;
        let mut e = CpuEstimate {
            platform: platform.clone(),
            model,
            hz: clock_ticks_per_second(),
            cpus: 1,
            start: None,
            domains: vec![DomainInfo::energy("cpu-estimate", true)],
        };
        e.cpus = e.stat()?.cpus;
        Ok(e)
    }

    /// The model in use.
    pub fn model(&self) -> &EstimateModel {
        &self.model
    }

    fn stat(&self) -> Result<ProcStat, PowerError> {
        let path = self.platform.proc_path("stat");
        let text = self
            .platform
            .fs
            .read_to_string(&path)
            .map_err(|e| PowerError::io(NAME, &path, e))?;
        parse_proc_stat(&text).map_err(|e| PowerError::parse(NAME, path.display().to_string(), e))
    }
}

impl EnergySource for CpuEstimate {
    fn name(&self) -> &str {
        NAME
    }

    fn kind(&self) -> Kind {
        Kind::Estimate
    }

    fn description(&self) -> String {
        format!(
            "ESTIMATE (a model, not a measurement): {} W idle + {} W per busy core, CPU time from {} \
             ({} logical CPUs)",
            self.model.idle_watts,
            self.model.watts_per_busy_core,
            self.platform.proc_path("stat").display(),
            self.cpus
        )
    }

    fn domains(&self) -> &[DomainInfo] {
        &self.domains
    }

    fn read(&mut self, now: Instant) -> Result<Vec<f64>, PowerError> {
        let st = self.stat()?.all;
        let (t0, first) = *self.start.get_or_insert((now, st));
        let elapsed = now.saturating_duration_since(t0).as_secs_f64();
        let busy_s = st.busy.saturating_sub(first.busy) as f64 / self.hz;
        Ok(vec![self.model.energy_joules(elapsed, busy_s)])
    }

    fn base_watts_hint(&self) -> Option<f64> {
        Some(self.model.idle_watts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields() {
        let text = "cpu  100 5 50 1000 20 3 2 7 40 0\ncpu0 50 2 25 500 10 1 1 3 20 0\n\
                    cpu1 50 3 25 500 10 2 1 4 20 0\nintr 123\nctxt 456\n";
        let st = parse_proc_stat(text).unwrap();
        assert_eq!(st.cpus, 2);
        assert_eq!(st.all.busy, 100 + 5 + 50 + 3 + 2);
        assert_eq!(st.all.total, 160 + 1000 + 20 + 7);
        assert!(parse_proc_stat("intr 1\n").is_err());
        assert!(parse_proc_stat("cpu 1 x 3 4\n").is_err());
    }

    #[test]
    fn model_arithmetic() {
        let m = EstimateModel {
            idle_watts: 30.0,
            watts_per_busy_core: 7.5,
        };
        // 10 s, 4 core-seconds busy: 300 J idle + 30 J active.
        assert_eq!(m.energy_joules(10.0, 4.0), 330.0);
        assert_eq!(m.watts(2.0), 45.0);
        assert!(EstimateModel {
            idle_watts: -1.0,
            watts_per_busy_core: 1.0
        }
        .validate()
        .is_err());
        assert!(EstimateModel {
            idle_watts: 1.0,
            watts_per_busy_core: f64::NAN
        }
        .validate()
        .is_err());
    }
}
