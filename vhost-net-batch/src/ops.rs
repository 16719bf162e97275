//! Operator interfaces (DESIGN.md §6): the control socket (`--control PATH`, mode 0600, one
//! JSON request per line, one JSON reply per line) that `vhost-net-batch ctl` talks to, and
//! Prometheus metrics over HTTP (`--metrics-addr`).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::metrics::BATCH_BOUNDS;
use crate::policy::{resolve_budget, ModeKind, ModeSpec};
use crate::server::VmSlot;

/// A request on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// The VMs and their batching settings.
    List,
    /// One VM's counters and policy state.
    Stats {
        /// VM name.
        vm: String,
    },
    /// Changes a VM's mode and/or budget at run time.
    Set {
        /// VM name.
        vm: String,
        /// `off`, `fixed[:US]`, `adaptive[:US]`; unchanged if absent.
        #[serde(default)]
        mode: Option<String>,
        /// Budget in µs; unchanged if absent.
        #[serde(default)]
        budget_us: Option<u32>,
    },
}

/// The VMs a daemon serves, for the operator interfaces.
#[derive(Clone)]
pub struct Vms(pub Vec<Arc<VmSlot>>);

impl std::fmt::Debug for Vms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|s| &s.config().name))
            .finish()
    }
}

impl Vms {
    fn find(&self, name: &str) -> Result<&Arc<VmSlot>, String> {
        self.0
            .iter()
            .find(|s| s.config().name == name)
            .ok_or_else(|| {
                let names: Vec<_> = self.0.iter().map(|s| s.config().name.as_str()).collect();
                format!("no VM named {name:?} (VMs: {})", names.join(", "))
            })
    }

    /// A VM's settings, counters and policy state.
    pub fn stats(&self, slot: &VmSlot) -> Value {
        let b = slot.batching();
        let view = b.view();
        let m = slot.metrics();
        let queues: Vec<_> = m.queues.iter().map(|q| q.snapshot()).collect();
        json!({
            "vm": slot.config().name,
            "mode": view.config.mode,
            "budget_us": view.config.budget_us,
            "policy": view,
            "control": b.control_counts(),
            "energy_uj": b.energy_uj(),
            "energy_kind": b.energy_kind(),
            "connections": m.connections.load(std::sync::atomic::Ordering::Relaxed),
            "total": m.total(),
            "queues": queues,
        })
    }

    /// Answers one request.
    pub fn handle(&self, req: Request) -> Result<Value, String> {
        match req {
            Request::List => Ok(json!({
                "vms": self.0.iter().map(|s| {
                    let v = s.batching().view();
                    json!({
                        "vm": s.config().name,
                        "socket": s.config().socket,
                        "tap": s.config().tap,
                        "queues": s.config().queues,
                        "mode": v.config.mode,
                        "budget_us": v.config.budget_us,
                        "t_us": v.t_us,
                        "rx_delay_us": v.rx_delay_us,
                        "tx_delay_us": v.tx_delay_us,
                        "send_ratio": v.send_ratio,
                        "active": v.active,
                    })
                }).collect::<Vec<_>>()
            })),
            Request::Stats { vm } => Ok(self.stats(self.find(&vm)?)),
            Request::Set {
                vm,
                mode,
                budget_us,
            } => {
                let slot = self.find(&vm)?;
                if mode.is_none() && budget_us.is_none() {
                    return Err("set needs --mode and/or --budget-us".into());
                }
                let cur = slot.batching().view().config;
                let spec = match &mode {
                    Some(m) => m.parse::<ModeSpec>().map_err(|e| e.to_string())?,
                    None => ModeSpec {
                        kind: cur.mode,
                        budget_us: None,
                    },
                };
                let budget = budget_us.or(if spec.budget_us.is_none() {
                    Some(cur.budget_us)
                } else {
                    None
                });
                let (kind, budget) = resolve_budget(spec, budget).map_err(|e| e.to_string())?;
                slot.batching().set_operator(kind, budget);
                tracing::info!(vm = %vm, mode = ?kind, budget_us = budget, "operator changed batching");
                Ok(self.stats(slot))
            }
        }
    }
}

/// Serves the control socket at `path` (0600) on a thread; requests are answered one per line.
pub fn serve_control(path: &Path, vms: Vms) -> io::Result<()> {
    let listener = crate::server::bind_socket("control", path)
        .map_err(|e| io::Error::new(io::ErrorKind::AddrInUse, e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_loop(listener, vms))?;
    Ok(())
}

fn accept_loop(listener: UnixListener, vms: Vms) {
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let vms = vms.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve_client(s, &vms) {
                            tracing::debug!(%e, "control client");
                        }
                    });
            }
            Err(e) => {
                tracing::warn!(%e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

fn serve_client(s: UnixStream, vms: &Vms) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut r).take(MAX_REQUEST as u64).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        let reply = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => match vms.handle(req) {
                Ok(v) => json!({"ok": true, "result": v}),
                Err(e) => json!({"ok": false, "error": e}),
            },
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        writeln!(w, "{reply}")?;
        if !line.ends_with('\n') {
            // Over-long or unterminated: answered, then the connection is closed.
            return Ok(());
        }
    }
}

/// Sends one request to a control socket and returns the result (or the daemon's error).
pub fn request(path: &Path, req: &Request) -> Result<Value, String> {
    let s = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot connect to the control socket {}: {e} (is `vhost-net-batch serve --control {}` running, and may you open it? it is mode 0600)",
            path.display(),
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    writeln!(
        w,
        "{}",
        serde_json::to_string(req).map_err(|e| e.to_string())?
    )
    .map_err(|e| format!("control socket: {e}"))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("control socket: {e}"))?;
    let v: Value =
        serde_json::from_str(&line).map_err(|e| format!("bad reply from the daemon: {e}"))?;
    if v["ok"] == json!(true) {
        Ok(v["result"].clone())
    } else {
        Err(v["error"].as_str().unwrap_or("unknown error").to_string())
    }
}

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
        let gauges: [(&str, &str, Gauge); 9] = [
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
        type Count = fn(&crate::control::ControlCounts) -> u64;
        let counts: [(&str, &str, Count); 7] = [
            ("vnb_control_accepted", "Control frames acted on", |c| {
                c.accepted
            }),
            (
                "vnb_control_clamped",
                "Control SETs clamped to the budget",
                |c| c.clamped,
            ),
            ("vnb_control_invalid", "Malformed control frames", |c| {
                c.invalid
            }),
            (
                "vnb_control_rate_limited",
                "Control frames over the rate limit",
                |c| c.rate_limited,
            ),
            (
                "vnb_control_dropped",
                "Control frames dropped unanswered",
                |c| c.dropped,
            ),
            (
                "vnb_control_from_tap",
                "Control-EtherType frames from the tap (dropped)",
                |c| c.from_tap,
            ),
            (
                "vnb_control_replies_lost",
                "Control replies the guest had no buffer for",
                |c| c.replies_lost,
            ),
        ];
        for (name, help, f) in counts {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (vm, _, c, _, _) in &views {
                let l = [("vm", vm.as_str())];
                ConstCounter::new(f(c)).encode(m.encode_family(&l)?)?;
            }
        }
        {
            // The fourth safety valve: rate windows below the packet-rate floor (no delay).
            let mut m = enc.encode_descriptor(
                "vnb_rate_floor_windows",
                "Rate windows below the packet-rate floor, in which nothing was delayed",
                None,
                MetricType::Counter,
            )?;
            for (vm, v, _, _, _) in &views {
                let l = [("vm", vm.as_str())];
                ConstCounter::new(v.floor_windows).encode(m.encode_family(&l)?)?;
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

/// Serves `/metrics` on `addr` on a thread.
pub fn serve_metrics(addr: &str, vms: Vms) -> Result<(), String> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let resp = if req.url() == "/metrics" {
                    let ct = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                    )
                    .expect("static header");
                    tiny_http::Response::from_string(render_metrics(&vms)).with_header(ct)
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        })
        .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
    Ok(())
}
