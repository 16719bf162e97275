//! The figures of a run that reports and charts show, and their summaries over repetitions.

use crate::model::{Campaign, RunResult};
use crate::stats::Summary;

/// A metric of a run, for tables.
pub struct Metric {
    /// Column title.
    pub title: &'static str,
    /// How to read it.
    pub get: fn(&RunResult) -> Option<f64>,
}

/// The metric titled `title`.
pub fn metric(title: &str) -> Metric {
    metrics()
        .into_iter()
        .find(|m| m.title == title)
        .unwrap_or_else(|| panic!("no metric titled {title:?}"))
}

/// The columns of the report's tables.
pub fn metrics() -> Vec<Metric> {
    vec![
        Metric {
            title: "throughput Mb/s",
            get: |r| r.throughput_mbps,
        },
        Metric {
            title: "requests/s",
            get: |r| r.requests_per_s,
        },
        Metric {
            title: "RTT p50 ms",
            get: |r| r.rtt_p50_ms,
        },
        Metric {
            title: "RTT p99 ms",
            get: |r| r.rtt_p99_ms,
        },
        Metric {
            title: "guest irq/s",
            get: |r| Some(r.guest_irqs_per_s),
        },
        Metric {
            title: "irq/packet",
            get: |r| r.irqs_per_packet,
        },
        Metric {
            title: "kicks/s",
            get: |r| r.kicks_per_s,
        },
        Metric {
            title: "kicks/packet",
            get: |r| r.kicks_per_packet,
        },
        Metric {
            title: "backend CPU s",
            get: |r| r.backend_cpu_s,
        },
        Metric {
            title: "QEMU CPU s",
            get: |r| Some(r.qemu_cpu_s),
        },
        Metric {
            title: "backend ctxsw",
            get: |r| r.backend_ctx_switches.map(|v| v as f64),
        },
        Metric {
            title: "QEMU ctxsw",
            get: |r| Some(r.qemu_ctx_switches as f64),
        },
        Metric {
            title: "watts",
            get: |r| r.watts,
        },
        Metric {
            title: "joules",
            get: |r| r.joules,
        },
        Metric {
            title: "J/GB",
            get: |r| r.joules_per_gb,
        },
        Metric {
            title: "CPU-s/GB",
            get: |r| r.cpu_s_per_gb,
        },
        Metric {
            title: "backend CPU-s/GB",
            get: |r| r.backend_cpu_s_per_gb,
        },
        Metric {
            title: "guest CPU busy",
            get: |r| r.guest_cpu_busy,
        },
        Metric {
            title: "irq+kicks/GB",
            get: |r| r.notifications_per_gb,
        },
    ]
}

/// The summary of metric `m` over the successful runs of `config` × `workload`.
pub fn summary(c: &Campaign, config: &str, workload: &str, m: &Metric) -> Option<Summary> {
    let v: Vec<f64> = c
        .runs
        .iter()
        .filter(|r| r.config == config && r.workload == workload && r.error.is_none())
        .filter_map(|r| (m.get)(r))
        .collect();
    Summary::of(&v)
}
