//! Energy measurement for vhost-net-batch.
//!
//! * [`rapl`]: RAPL energy counters via [powercap](rapl::powercap), the [perf `power` PMU](rapl::perf)
//!   and [MSRs](rapl::msr), all behind one trait, [`EnergySource`].
//! * [`wall`]: wall power from [hwmon](wall::hwmon), [IPMI DCMI](wall::ipmi) and an
//!   [external meter command](wall::meter); power-only sources are integrated into joules.
//! * [`estimate`]: without RAPL, a CPU-time model — always labelled ESTIMATE, never a measurement.
//! * [`sampler`]: a thread reading the sources every N ms (wrap-safe), marks, joules and mean watts
//!   per domain between marks, idle baseline.
//! * [`vm`]: per-VM energy: idle (base) part split evenly, active part by CPU time (after Lang).
//!
//! Sources are chosen by [`registry::open_sources`] (`auto` or by name) and listed, with the
//! reason when unusable, by [`registry::list_sources`]. All paths are relative to a [`platform::Platform`], so
//! recorded sysfs trees can be replayed (`vnb-power --sysfs-root DIR`).

#![warn(missing_docs)]

pub mod counter;
pub mod error;
pub mod estimate;
pub mod periodic;
pub mod platform;
pub mod rapl;
pub mod registry;
pub mod report;
pub mod sampler;
pub mod source;
pub mod vm;
pub mod wall;

pub use error::PowerError;
pub use estimate::EstimateModel;
pub use platform::Platform;
pub use registry::{list_sources, open_sources, SourceKind, SourceOptions};
pub use sampler::{Baseline, Interval, Mark, Sampler, SamplerConfig};
pub use source::{DomainInfo, EnergySource, Kind, Quantity};
pub use vm::{MeterConfig, VmEnergyHandle, VmEnergyMeter, VmTasks};
