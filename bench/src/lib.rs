//! `vnb-bench`: runs workloads (iperf3 both ways, ab, tbench, request/response latency) against
//! a fresh guest per configuration and repetition, over our backend in each batching mode and
//! over QEMU's own virtio-net as a peer; records throughput, latency, notifications, CPU time,
//! context switches and energy; writes a report.
//!
//! - [`error`]: the one error type;
//! - [`stats`]: mean, standard deviation, min/median/max;
//! - [`figures`]: the figures of a run that reports and charts show;
//! - [`parse`]: iperf3 JSON, ab, ping and tbench output;
//! - [`model`]: configurations, workloads and per-run results;
//! - [`backend`]: starting a vhost-user backend in a namespace and waiting until it serves;
//! - [`runner`]: the campaign (namespaces, backends, guests, workloads, teardown);
//! - [`pareto`]: the energy-latency trade-off: points, fronts, dominance;
//! - [`adaptation`]: how the policy followed the phases of a `mix` run;
//! - [`report`]: `report.md`, `results.csv`, `results.json`;
//! - [`charts`]: bar charts with error bars and a latency-vs-energy scatter, SVG and PNG;
//! - [`datapath`]: the data path's own cost without a VM (DPDK testpmd as the frontend).

pub mod adaptation;
pub mod backend;
pub mod charts;
pub mod datapath;
pub mod error;
pub mod figures;
pub mod model;
pub mod pareto;
pub mod parse;
pub mod report;
pub mod runner;
pub mod stats;
pub mod tapfloor;
