//! What a campaign runs and what it records.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use vhost_net_batch::policy::EwmaRule;
use vnb_common::mode::ModeSpec;

use crate::error::BenchError;

/// A workload, run from the host side of the namespace against the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Nothing runs: the idle baseline of the configuration.
    Idle,
    /// iperf3 guest→host.
    IperfTx,
    /// iperf3 host→guest.
    IperfRx,
    /// ab, 100 concurrent clients downloading a 20 MB file from the guest's web server.
    Http,
    /// tbench with 100 processes against tbench_srv in the guest.
    Tbench,
    /// Request/response latency: ICMP echo at a fixed rate (100/s), p50/p99.
    Rr,
    /// The same echo while a 50 Mb/s UDP stream runs host→guest: the latency a request sees
    /// when batching is engaged (an idle link stays under the rate floor and is never delayed).
    RrLoad,
    /// Guest→host UDP at 100 Mb/s offered (1400-byte datagrams): where guest TX kicks add up.
    UdpTx,
    /// Direction-switching traffic: guest→host TCP bulk, host→guest TCP bulk, then ping-pong
    /// (flood ping), one phase after the other, the cycle repeated; the backend's policy is
    /// sampled every 100 ms so reports show it following the traffic.
    Mix,
}

impl Workload {
    /// Every workload except the idle baseline, in report order.
    pub const ALL: [Workload; 8] = [
        Workload::IperfTx,
        Workload::IperfRx,
        Workload::Http,
        Workload::Tbench,
        Workload::Rr,
        Workload::RrLoad,
        Workload::UdpTx,
        Workload::Mix,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::IperfTx => "iperf-tx",
            Workload::IperfRx => "iperf-rx",
            Workload::Http => "http",
            Workload::Tbench => "tbench",
            Workload::Rr => "rr",
            Workload::RrLoad => "rr-load",
            Workload::UdpTx => "udp-tx",
            Workload::Mix => "mix",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = BenchError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Workload::ALL
            .into_iter()
            .chain([Workload::Idle])
            .find(|w| w.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
                BenchError::Input(format!("unknown workload {s:?}: use {}", names.join(", ")))
            })
    }
}

/// The backend serving the guest's NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Backend {
    /// vhost-net-batch in a batching mode (`off`, `fixed:US`, `adaptive:US`), with optional
    /// policy settings after `@` (`adaptive:500@paper`).
    Ours {
        /// The `--mode` value.
        mode: ModeSpec,
        /// Policy settings beyond the mode.
        #[serde(default, skip_serializing_if = "Tuning::is_default")]
        tuning: Tuning,
    },
    /// QEMU's own userspace virtio-net on a tap (`tx=timer` when asked).
    QemuTap {
        /// Use `tx=timer`.
        tx_timer: bool,
    },
    /// Any vhost-user backend, started from a command line template run with `sh -c` inside
    /// the namespace: `{socket}` is the vhost-user socket it must listen on, `{tap}` the tap it
    /// must create, `{mac}` the guest's MAC.
    External {
        /// Name in reports (`ext:NAME`).
        name: String,
        /// The command line template.
        template: String,
    },
}

/// The guest's virtio-net driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestDriver {
    /// The patched `virtio_net_batch` with its TX kick timer off (kicks as stock).
    Patched,
    /// The patched driver with its TX kick timer on, `ethtool -C eth0 tx-usecs US rx-usecs US`
    /// (which also asks the device for `T = US`).
    Timer(u32),
}

impl GuestDriver {
    fn name(self) -> String {
        match self {
            GuestDriver::Patched => "patched".into(),
            GuestDriver::Timer(us) => format!("timer:{us}"),
        }
    }
}

/// Settings beyond the mode, written after `@` in a configuration name, comma separated:
/// `paper` or `fast` (`--policy`), `floor=N` (`--rate-floor-pps`), `frames=F`
/// (`--period-frames`), `notify=N` (`--notify-per-period`), and the guest's driver,
/// `guest=patched` or `guest=timer:US`.
/// `adaptive:500@paper`, `fixed:500@floor=0,frames=0.25`, `adaptive:500@notify=0`,
/// `off@guest=timer:500`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tuning {
    /// The EWMA rule.
    pub policy: Option<EwmaRule>,
    /// The packet-rate floor, packets per second.
    pub rate_floor_pps: Option<u32>,
    /// Frames per delay period a direction needs to be delayed (as written).
    pub period_frames: Option<String>,
    /// Notifications per period `adaptive` needs to delay a VM (as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_per_period: Option<String>,
    /// The guest's driver (stock when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestDriver>,
}

impl Tuning {
    fn is_default(&self) -> bool {
        *self == Tuning::default()
    }

    fn parse(s: &str) -> Result<Tuning, BenchError> {
        let mut t = Tuning::default();
        let bad = |what: &str| {
            BenchError::Input(format!(
                "bad setting {what:?} after '@': use paper, fast, floor=PPS, frames=F, notify=N, guest=patched or guest=timer:US"
            ))
        };
        for opt in s.split(',') {
            match opt.split_once('=') {
                None if opt == "paper" => t.policy = Some(EwmaRule::Paper),
                None if opt == "fast" => t.policy = Some(EwmaRule::Fast),
                Some(("floor", v)) => t.rate_floor_pps = Some(v.parse().map_err(|_| bad(opt))?),
                Some(("guest", "patched")) => t.guest = Some(GuestDriver::Patched),
                Some(("guest", v)) => {
                    let us = v
                        .strip_prefix("timer:")
                        .and_then(|u| u.parse().ok())
                        .filter(|u| (1..=100_000).contains(u))
                        .ok_or_else(|| bad(opt))?;
                    t.guest = Some(GuestDriver::Timer(us));
                }
                Some((key @ ("frames" | "notify"), v)) => {
                    let f: f64 = v.parse().map_err(|_| bad(opt))?;
                    if !(0.0..=64.0).contains(&f) {
                        return Err(bad(opt));
                    }
                    let slot = if key == "frames" {
                        &mut t.period_frames
                    } else {
                        &mut t.notify_per_period
                    };
                    *slot = Some(v.to_string());
                }
                _ => return Err(bad(opt)),
            }
        }
        Ok(t)
    }

    /// The backend flags these settings give.
    pub fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(p) = self.policy {
            a.push("--policy".into());
            a.push(p.name().into());
        }
        if let Some(f) = self.rate_floor_pps {
            a.push("--rate-floor-pps".into());
            a.push(f.to_string());
        }
        if let Some(f) = &self.period_frames {
            a.push("--period-frames".into());
            a.push(f.clone());
        }
        if let Some(f) = &self.notify_per_period {
            a.push("--notify-per-period".into());
            a.push(f.clone());
        }
        a
    }
}

impl fmt::Display for Tuning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if let Some(p) = self.policy {
            parts.push(p.name().into());
        }
        if let Some(v) = self.rate_floor_pps {
            parts.push(format!("floor={v}"));
        }
        if let Some(v) = &self.period_frames {
            parts.push(format!("frames={v}"));
        }
        if let Some(v) = &self.notify_per_period {
            parts.push(format!("notify={v}"));
        }
        if let Some(g) = self.guest {
            parts.push(format!("guest={}", g.name()));
        }
        if !parts.is_empty() {
            write!(f, "@{}", parts.join(","))?;
        }
        Ok(())
    }
}

impl Backend {
    /// The guest driver this configuration boots (stock when `None`).
    pub fn guest_driver(&self) -> Option<GuestDriver> {
        match self {
            Backend::Ours { tuning, .. } => tuning.guest,
            _ => None,
        }
    }

    /// Parses `--external NAME=TEMPLATE`.
    pub fn external(spec: &str) -> Result<Backend, BenchError> {
        let (name, template) = spec.split_once('=').ok_or_else(|| {
            BenchError::Input(format!(
                "--external {spec:?}: expected NAME=COMMAND TEMPLATE"
            ))
        })?;
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            return Err(BenchError::Input(format!(
                "--external: bad name {name:?} (letters, digits, - _ .)"
            )));
        }
        if !template.contains("{socket}") {
            return Err(BenchError::Input(format!(
                "--external {name}: the template must contain {{socket}} (the vhost-user socket to listen on)"
            )));
        }
        Ok(Backend::External {
            name: name.into(),
            template: template.into(),
        })
    }

    /// The template with its placeholders filled in.
    pub fn fill(template: &str, socket: &str, tap: &str, mac: &str) -> String {
        template
            .replace("{socket}", socket)
            .replace("{tap}", tap)
            .replace("{mac}", mac)
    }
}

impl Backend {
    /// The configuration's name in reports: `off`, `adaptive:500`, `qemu-tap`, `qemu-tap-txtimer`.
    pub fn name(&self) -> String {
        match self {
            Backend::Ours { mode, tuning } => format!("{mode}{tuning}"),
            Backend::QemuTap { tx_timer: false } => "qemu-tap".into(),
            Backend::QemuTap { tx_timer: true } => "qemu-tap-txtimer".into(),
            Backend::External { name, .. } => format!("ext:{name}"),
        }
    }
}

impl FromStr for Backend {
    type Err = BenchError;

    /// `off`, `fixed:US`, `adaptive:US` (ours, the backend's own mode grammar) or `qemu-tap`,
    /// `qemu-tap-txtimer` (peers).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "qemu-tap" => Ok(Backend::QemuTap { tx_timer: false }),
            "qemu-tap-txtimer" => Ok(Backend::QemuTap { tx_timer: true }),
            _ => {
                let (mode, tuning) = match s.split_once('@') {
                    Some((m, t)) => (m, Tuning::parse(t)?),
                    None => (s, Tuning::default()),
                };
                let mode = mode.parse::<ModeSpec>().map_err(|e| {
                    BenchError::Input(format!(
                        "unknown configuration {s:?}: {e}; or qemu-tap, qemu-tap-txtimer"
                    ))
                })?;
                Ok(Backend::Ours { mode, tuning })
            }
        }
    }
}

/// One workload run on one configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Configuration name.
    pub config: String,
    /// Workload name.
    pub workload: String,
    /// Repetition, from 1.
    pub rep: u32,
    /// Measured seconds.
    pub seconds: f64,
    /// Throughput in Mb/s (iperf, http, tbench).
    pub throughput_mbps: Option<f64>,
    /// Requests per second (http).
    pub requests_per_s: Option<f64>,
    /// RTT median, ms: the `rr` echo itself, and for every other workload an echo at 100/s
    /// running alongside it (the RTT under that load).
    pub rtt_p50_ms: Option<f64>,
    /// RTT 99th percentile, ms (as the median).
    pub rtt_p99_ms: Option<f64>,
    /// Guest interrupts per second on the NIC under test.
    pub guest_irqs_per_s: f64,
    /// Guest interrupts per packet (both directions).
    pub irqs_per_packet: Option<f64>,
    /// Guest kicks per second (our backend's counters; none for QEMU's own NIC).
    pub kicks_per_s: Option<f64>,
    /// Kicks per packet.
    pub kicks_per_packet: Option<f64>,
    /// Packets the guest sent and received.
    pub guest_packets: u64,
    /// Bytes the guest's NIC sent and received.
    #[serde(default)]
    pub guest_bytes: u64,
    /// Guest interrupts plus kicks per GB the guest's NIC moved (kicks come from our
    /// backend's counters: none for QEMU's own NIC).
    #[serde(default)]
    pub notifications_per_gb: Option<f64>,
    /// CPU seconds of the backend and of QEMU per GB the guest's NIC moved.
    #[serde(default)]
    pub cpu_s_per_gb: Option<f64>,
    /// Share of the guest's CPU time spent busy over the run (from its `/proc/stat`).
    #[serde(default)]
    pub guest_cpu_busy: Option<f64>,
    /// Guest kicks per GB (our backend's counters).
    #[serde(default)]
    pub kicks_per_gb: Option<f64>,
    /// RX interrupts our backend sent per GB.
    #[serde(default)]
    pub rx_irqs_per_gb: Option<f64>,
    /// TX completion interrupts our backend sent per GB.
    #[serde(default)]
    pub tx_irqs_per_gb: Option<f64>,
    /// CPU seconds of the backend alone per GB (none when QEMU is the backend).
    #[serde(default)]
    pub backend_cpu_s_per_gb: Option<f64>,
    /// CPU seconds of the backend process (none when QEMU is the backend).
    pub backend_cpu_s: Option<f64>,
    /// CPU seconds of QEMU.
    pub qemu_cpu_s: f64,
    /// Context switches of the backend.
    pub backend_ctx_switches: Option<u64>,
    /// Context switches of QEMU.
    pub qemu_ctx_switches: u64,
    /// Joules of the power source's total over the run.
    pub joules: Option<f64>,
    /// Mean watts over the run.
    pub watts: Option<f64>,
    /// Joules per gigabyte moved (throughput workloads).
    pub joules_per_gb: Option<f64>,
    /// `measurement` or `estimate`.
    pub energy_kind: String,
    /// Joules and mean watts of every domain of every power source over the run (the
    /// headline `joules`/`watts` are the primary source's total).
    #[serde(default)]
    pub domains: Vec<DomainFigure>,
    /// Why the run failed, if it did.
    pub error: Option<String>,
    /// Our backend's policy and notifications, sampled over the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<SeriesPoint>,
    /// When the phases of a `mix` run began.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseMark>,
}

/// One sample of our backend's state during a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoint {
    /// Seconds since the run's start.
    pub t_s: f64,
    /// `p*`, the smoothed send share.
    pub send_ratio: f64,
    /// RX interrupt delay in effect, µs.
    pub rx_delay_us: u32,
    /// TX kick delay in effect, µs.
    pub tx_delay_us: u32,
    /// Interrupts the backend sent per second since the previous sample.
    pub interrupts_per_s: f64,
    /// Kicks the backend received per second since the previous sample.
    pub kicks_per_s: f64,
    /// Frames the guest sent per second since the previous sample.
    pub tx_pps: f64,
    /// Frames the guest received per second since the previous sample.
    pub rx_pps: f64,
    /// Whether `adaptive`'s payoff check let delays apply (absent in older results).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payoff_open: Option<bool>,
}

/// The start of a phase of a `mix` run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseMark {
    /// Seconds since the run's start.
    pub t_s: f64,
    /// `send` (guest→host bulk), `receive` (host→guest bulk) or `ping-pong`.
    pub name: String,
}

/// One power domain's figures over a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DomainFigure {
    /// `source/domain`, e.g. `powercap/package-0` or `estimate/cpu-estimate`.
    pub name: String,
    /// Joules over the run.
    pub joules: f64,
    /// Mean watts over the run.
    pub watts: f64,
    /// Whether the domain is part of its source's total.
    pub in_total: bool,
}

/// The machine a campaign ran on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model and count.
    pub cpu: String,
    /// Host kernel.
    pub kernel: String,
    /// QEMU version.
    pub qemu: String,
    /// Guest kernel.
    pub guest_kernel: String,
    /// vhost-net-batch version.
    pub vnb: String,
    /// Power source and its kind.
    pub power: String,
}

/// A campaign's results.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    /// The command that ran it (to rerun).
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// Configurations in order.
    pub configs: Vec<String>,
    /// Workloads in order.
    pub workloads: Vec<String>,
    /// Repetitions.
    pub reps: u32,
    /// Seconds per workload run.
    pub duration_s: u32,
    /// Every run.
    pub runs: Vec<RunResult>,
    /// Stopped early (Ctrl-C): the runs are those finished before.
    #[serde(default)]
    pub interrupted: bool,
}

/// `a` as one shell word: unchanged when it has only safe characters, else single-quoted.
pub fn shell_quote(a: &str) -> String {
    let safe = !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:=,@%+-".contains(c));
    if safe {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// `args` as one shell command line that pastes back: arguments with anything but safe
/// characters are single-quoted.
pub fn shell_command(args: &[String]) -> String {
    args.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_command_quotes_what_needs_it() {
        let args: Vec<String> = [
            "vnb-bench",
            "--external",
            "dpdk=testpmd --vdev x,path={socket}",
            "it's",
            "",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            shell_command(&args),
            "vnb-bench --external 'dpdk=testpmd --vdev x,path={socket}' 'it'\\''s' ''"
        );
    }

    #[test]
    fn names_parse_and_print() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>().unwrap(), w);
        }
        assert!("iperf".parse::<Workload>().is_err());
        for c in [
            "off",
            "fixed:100",
            "adaptive:1000",
            "qemu-tap",
            "qemu-tap-txtimer",
            "adaptive:500@notify=0",
            "fixed:500@floor=0,frames=0.25",
        ] {
            assert_eq!(c.parse::<Backend>().unwrap().name(), c);
        }
        let Backend::Ours { tuning, .. } = "adaptive:500@notify=2".parse::<Backend>().unwrap()
        else {
            panic!("not ours");
        };
        assert_eq!(tuning.args(), ["--notify-per-period", "2"]);
        for bad in [
            "on",
            "off:5",
            "fixed:",
            "adaptive:0",
            "adaptive:100001",
            "qemu",
            "adaptive:500@notify=65",
            "adaptive:500@notify=x",
        ] {
            assert!(bad.parse::<Backend>().is_err(), "{bad}");
        }
        let e =
            Backend::external("ch=vhost_user_net --net-backend socket={socket},tap={tap}").unwrap();
        assert_eq!(e.name(), "ext:ch");
        if let Backend::External { template, .. } = &e {
            assert_eq!(
                Backend::fill(template, "/s", "t0", "m"),
                "vhost_user_net --net-backend socket=/s,tap=t0"
            );
        }
        assert!(Backend::external("noequals").is_err());
        assert!(Backend::external("a b=cmd {socket}").is_err());
        assert!(Backend::external("x=cmd without socket").is_err());
    }
}
