//! Prometheus metrics (docs/design.md §6): every VM's counters, batch-size histograms, policy
//! state and control-frame counts, collected at scrape time, and the `/metrics` HTTP endpoint
//! (`--metrics-addr`).

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::control_socket::Vms;
use crate::metrics::BATCH_BOUNDS;
use crate::policy::ModeKind;

/// Exports every VM's counters, histograms and policy state at scrape time.
#[derive(Debug)]
pub struct Collector(pub Vms);

fn labels<'a>(vm: &'a str, queue: &'a str) -> [(&'static str, &'a str); 2] {
    [("vm", vm), ("queue", queue)]
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let vms = &self.0 .0;
        let snaps: Vec<(String, Vec<crate::metrics::QueueSnapshot>)> = vms
            .iter()
            .map(|s| {
                (
                    s.config().name.clone(),
                    s.metrics().queues.iter().map(|q| q.snapshot()).collect(),
                )
            })
            .collect();
        let Some(first) = snaps.iter().find_map(|(_, q)| q.first()) else {
            return Ok(());
        };
        for (i, (name, _, help)) in first.counters().into_iter().enumerate() {
            let full = format!("vnb_{name}");
            let mut m = enc.encode_descriptor(&full, help, None, MetricType::Counter)?;
            for (vm, queues) in &snaps {
                for (qi, q) in queues.iter().enumerate() {
                    let qs = qi.to_string();
                    let l = labels(vm, &qs);
                    ConstCounter::new(q.counters()[i].1).encode(m.encode_family(&l)?)?;
                }
            }
        }
        for (metric, help, pick) in [
            (
                "vnb_rx_batch_packets",
                "Packets per RX interrupt flush",
                0usize,
            ),
            (
                "vnb_tx_batch_packets",
                "Packets per TX drain while kicks were held",
                1,
            ),
        ] {
            let mut m = enc.encode_descriptor(metric, help, None, MetricType::Histogram)?;
            for (vm, queues) in &snaps {
                for (qi, q) in queues.iter().enumerate() {
                    let h = if pick == 0 {
                        q.rx_batches
                    } else {
                        q.tx_batches
                    };
                    let mut buckets: Vec<(f64, u64)> = BATCH_BOUNDS
                        .iter()
                        .zip(h.buckets)
                        .map(|(&b, c)| (b as f64, c))
                        .collect();
                    buckets.push((f64::INFINITY, h.buckets[BATCH_BOUNDS.len()]));
                    let qs = qi.to_string();
                    let l = labels(vm, &qs);
                    m.encode_family(&l)?.encode_histogram::<NoLabelSet>(
                        h.sum as f64,
                        h.count(),
                        &buckets,
                        None,
                    )?;
                }
            }
        }
        let views: Vec<_> = vms
            .iter()
            .map(|s| {
                (
                    s.config().name.clone(),
                    s.batching().view(),
                    s.batching().control_counts(),
                    s.batching().energy_uj(),
                    s.batching().energy_kind().unwrap_or_default(),
                )
            })
            .collect();
        type Gauge = fn(&crate::policy::PolicyView) -> f64;
        let gauges: [(&str, &str, Gauge); 11] = [
            (
                "vnb_rx_delay_us",
                "Configured RX interrupt delay b_r (µs), before the rate floor",
                |v| v.rx_delay_us as f64,
            ),
            (
                "vnb_tx_delay_us",
                "Configured TX kick delay b_s (µs), before the rate floor",
                |v| v.tx_delay_us as f64,
            ),
            (
                "vnb_applied_rx_delay_us",
                "RX interrupt delay in effect now (µs): 0 under the rate floor",
                |v| v.applied_rx_delay_us as f64,
            ),
            (
                "vnb_applied_tx_delay_us",
                "TX kick delay in effect now (µs): 0 under the rate floor",
                |v| v.applied_tx_delay_us as f64,
            ),
            ("vnb_send_ratio", "EWMA of the guest's send share p*", |v| {
                v.send_ratio
            }),
            (
                "vnb_effective_t_us",
                "Effective tolerable extra RTT T (µs)",
                |v| v.t_us as f64,
            ),
            ("vnb_budget_us", "Operator's buffer budget (µs)", |v| {
                v.config.budget_us as f64
            }),
            (
                "vnb_batching_active",
                "1 while the packet rate is above the floor and delays apply",
                |v| u8::from(v.active) as f64,
            ),
            (
                "vnb_payoff_open",
                "1 while adaptive's payoff check lets delays apply (the VM, undelayed, notifies at least --notify-per-period times per T)",
                |v| u8::from(v.payoff_open) as f64,
            ),
            (
                "vnb_natural_notify_rate",
                "Notifications (interrupts + kicks) per second the last undelayed rate window measured",
                |v| v.natural_notify_rate as f64,
            ),
            (
                "vnb_mode",
                "Batching mode: 0 off, 1 fixed, 2 adaptive",
                |v| match v.config.mode {
                    ModeKind::Off => 0.0,
                    ModeKind::Fixed => 1.0,
                    ModeKind::Adaptive => 2.0,
                },
            ),
        ];
        for (name, help, f) in gauges {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (vm, v, _, _, _) in &views {
                let l = [("vm", vm.as_str())];
                ConstGauge::new(f(v)).encode(m.encode_family(&l)?)?;
            }
        }
        // Per-VM counters of the control plane and the policy.
        type Count = fn(&crate::policy::PolicyView, &crate::control::ControlCounts) -> u64;
        let counts: [(&str, &str, Count); 10] = [
            ("vnb_control_accepted", "Control frames acted on", |_, c| {
                c.accepted
            }),
            (
                "vnb_control_clamped",
                "Control SETs clamped to the budget",
                |_, c| c.clamped,
            ),
            ("vnb_control_invalid", "Malformed control frames", |_, c| {
                c.invalid
            }),
            (
                "vnb_control_rate_limited",
                "Control frames over the rate limit",
                |_, c| c.rate_limited,
            ),
            (
                "vnb_control_dropped",
                "Control frames dropped unanswered",
                |_, c| c.dropped,
            ),
            (
                "vnb_control_from_tap",
                "Control-EtherType frames from the tap (dropped)",
                |_, c| c.from_tap,
            ),
            (
                "vnb_control_replies_lost",
                "Control replies the guest had no buffer for",
                |_, c| c.replies_lost,
            ),
            // The fourth safety valve: rate windows below the packet-rate floor (no delay).
            (
                "vnb_rate_floor_windows",
                "Rate windows below the packet-rate floor, in which nothing was delayed",
                |v, _| v.floor_windows,
            ),
            (
                "vnb_payoff_probes",
                "Rate windows adaptive ran undelayed to measure the payoff of its delays again",
                |v, _| v.payoff_probes,
            ),
            (
                "vnb_payoff_refusals",
                "Undelayed rate windows that found too few notifications to be worth a delay",
                |v, _| v.payoff_refusals,
            ),
        ];
        for (name, help, f) in counts {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (vm, v, c, _, _) in &views {
                let l = [("vm", vm.as_str())];
                ConstCounter::new(f(v, c)).encode(m.encode_family(&l)?)?;
            }
        }
        let vm_counters: Vec<_> = vms
            .iter()
            .map(|s| (s.config().name.clone(), s.metrics().vm_counters()))
            .collect();
        if let Some((_, first)) = vm_counters.first() {
            for (i, (name, _, help)) in first.counters().into_iter().enumerate() {
                let full = format!("vnb_{name}");
                let mut m = enc.encode_descriptor(&full, help, None, MetricType::Counter)?;
                for (vm, c) in &vm_counters {
                    let l = [("vm", vm.as_str())];
                    ConstCounter::new(c.counters()[i].1).encode(m.encode_family(&l)?)?;
                }
            }
        }
        if views.iter().any(|v| v.3.is_some()) {
            let mut m = enc.encode_descriptor(
                "vnb_energy_microjoules",
                "Energy apportioned to the VM since its frontend attached (µJ); kind=estimate when no power meter is present",
                None,
                MetricType::Counter,
            )?;
            for (vm, _, _, e, kind) in &views {
                if let Some(e) = e {
                    let l = [("vm", vm.as_str()), ("kind", kind.as_str())];
                    ConstCounter::new(*e).encode(m.encode_family(&l)?)?;
                }
            }
        }
        Ok(())
    }
}

/// The metrics text for the VMs (what `/metrics` serves).
pub fn render_metrics(vms: &Vms) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(Collector(vms.clone())));
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    out
}

/// The metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Listening on the address failed.
    #[error("cannot listen for metrics on {addr}: {msg}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        msg: String,
    },
    /// The serving thread could not start.
    #[error("cannot start the metrics thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Serves `/metrics` on `addr` on a thread ([`crate::metrics_endpoint`]).
pub fn serve_metrics(addr: &str, vms: Vms) -> Result<(), MetricsError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| MetricsError::Listen {
        addr: addr.into(),
        msg: e.to_string(),
    })?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || crate::metrics_endpoint::run(listener, &|| render_metrics(&vms)))?;
    Ok(())
}
