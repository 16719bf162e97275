//! The one trait every power source implements: its domains and how it reads them.
//!
//! A source reports a fixed list of *domains* (`package-0`, `dram-0`, `psys`, `wall`, `cpu-estimate`, …).
//! Each domain is either an **energy** domain (the source returns cumulative joules since it was opened,
//! with counter wraparound already handled) or a **power** domain (the source returns instantaneous watts,
//! which the [sampler](crate::sampler) integrates over time into joules).
//!
//! Each domain also says whether it belongs in the source's *total*: RAPL `core`/`uncore` are inside
//! `package`, so the total is `psys` when present, else every `package-N` plus every `dram-N`.

use std::fmt;
use std::time::Instant;

use serde::Serialize;

use crate::error::PowerError;

/// Whether numbers are measured or modelled. An estimate is never presented as a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read from hardware counters or meters.
    Measurement,
    /// Computed from a model (CPU time × configured watts): labelled ESTIMATE everywhere.
    Estimate,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Measurement => "measurement",
            Kind::Estimate => "estimate",
        })
    }
}

/// What a domain's value means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantity {
    /// Cumulative joules since the source was opened (wraps already handled).
    Energy,
    /// Instantaneous watts; integrated over time by the sampler.
    Power,
}

/// One domain of a source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DomainInfo {
    /// Unique name within the source: `package-0`, `core-0`, `uncore-0`, `dram-0`, `psys`, `wall`, …
    pub name: String,
    /// Energy counter or power gauge.
    pub quantity: Quantity,
    /// Whether this domain is added into the source's total (no double counting).
    pub in_total: bool,
}

impl DomainInfo {
    /// An energy domain.
    pub fn energy(name: impl Into<String>, in_total: bool) -> Self {
        DomainInfo {
            name: name.into(),
            quantity: Quantity::Energy,
            in_total,
        }
    }

    /// A power domain.
    pub fn power(name: impl Into<String>, in_total: bool) -> Self {
        DomainInfo {
            name: name.into(),
            quantity: Quantity::Power,
            in_total,
        }
    }
}

/// A power or energy source: RAPL reader, wall meter or the CPU-time estimate.
pub trait EnergySource: Send {
    /// Short name: `powercap`, `perf`, `msr`, `hwmon`, `ipmi`, `meter`, `estimate` (or a test's own).
    fn name(&self) -> &str;

    /// Measurement or estimate.
    fn kind(&self) -> Kind {
        Kind::Measurement
    }

    /// One line saying what is read (paths, registers, model parameters).
    fn description(&self) -> String;

    /// The domains, in the order [`EnergySource::read`] returns values.
    fn domains(&self) -> &[DomainInfo];

    /// Read every domain once: cumulative joules for energy domains, watts for power domains.
    /// `now` is the monotonic time of the read (the estimate uses it for its idle term).
    fn read(&mut self, now: Instant) -> Result<Vec<f64>, PowerError>;

    /// Warnings gathered since the last call (suspicious counter jumps, …).
    fn take_warnings(&mut self) -> Vec<String> {
        Vec::new()
    }

    /// Watts this source considers "idle" (the estimate's configured idle power), if it knows.
    fn base_watts_hint(&self) -> Option<f64> {
        None
    }
}
