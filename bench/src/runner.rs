//! A campaign: for each configuration and repetition a private network namespace, the backend,
//! a freshly booted guest, an idle baseline and the workloads; everything torn down on success,
//! failure and Ctrl-C (the guard's `Drop`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_net_batch::metrics::QueueSnapshot;
use vnb_common::procfs;

use crate::backend::BackendSpec;
use crate::error::{sh, BenchError, Result};
use crate::model::{
    Backend, Campaign, GuestDriver, Machine, PhaseMark, RunResult, SeriesPoint, Workload,
};
use crate::parse;
use crate::stats::percentile;

const HOST_IP: &str = "10.77.5.1/24";
const GUEST_IP: &str = "10.77.5.2";
const GUEST_MAC: &str = "52:54:00:77:05:02";
const TAP: &str = "vnbb0";

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Configurations, in order.
    pub configs: Vec<Backend>,
    /// Workloads, in order.
    pub workloads: Vec<Workload>,
    /// Repetitions per configuration.
    pub reps: u32,
    /// Seconds per workload run.
    pub duration: u32,
    /// The repository (for `ci/`).
    pub repo: PathBuf,
    /// The `vhost-net-batch` binary.
    pub vnb_bin: PathBuf,
    /// Power source (`auto`, `estimate`, …).
    pub power_source: String,
    /// The command line, recorded for reruns.
    pub command: String,
    /// Scratch directory (sockets, logs).
    pub scratch: PathBuf,
    /// Seconds per phase of `mix`.
    pub mix_phase_s: u32,
    /// Measure the idle baseline of each guest before its workloads.
    pub idle: bool,
}

/// One configuration's VM: namespace, backend, QEMU. Dropping it tears everything down.
struct Vm {
    repo: PathBuf,
    ns: String,
    dir: PathBuf,
    qemu_pid: Option<u32>,
    backend: Option<Child>,
    control: Option<PathBuf>,
    agent: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(pid) = self.qemu_pid {
            // SAFETY: signalling our QEMU.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let Some(mut b) = self.backend.take() {
            let _ = b.kill();
            let _ = b.wait();
        }
        let _ = Command::new(self.repo.join("ci/netns.sh"))
            .args(["delete", &self.ns])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Vm {
    fn gexec(&self, cmd: &str) -> Result<String> {
        sh(Command::new(self.repo.join("ci/gexec.py")).args([
            self.agent.to_str().unwrap_or_default(),
            "--timeout",
            "120",
            "--",
            cmd,
        ]))
    }

    fn host(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).args(args);
        c
    }

    /// Our backend's counters (none for QEMU's own NIC or an external backend).
    fn backend_counts(&self) -> Option<QueueSnapshot> {
        let s = vhost_net_batch::control_socket::stats(self.control.as_ref()?, "bench").ok()?;
        Some(s.total)
    }
}

/// Counters read before and after a run.
#[derive(Debug, Clone, Copy, Default)]
struct Snap {
    irqs: u64,
    packets: u64,
    bytes: u64,
    /// The guest's (busy, total) CPU ticks.
    guest_cpu: Option<(u64, u64)>,
    backend: Option<QueueSnapshot>,
    backend_cpu: Option<f64>,
    qemu_cpu: f64,
    backend_ctx: Option<u64>,
    qemu_ctx: u64,
}

/// Runs a campaign. Results of failed runs are recorded with their error; setting up a VM
/// that fails is an error for the whole campaign (nothing would be comparable).
pub fn run(opts: &RunOptions, stop: &Arc<AtomicBool>) -> Result<Campaign> {
    let kind: power::SourceKind = opts
        .power_source
        .parse()
        .map_err(|e| BenchError::Input(format!("--power-source: {e}")))?;
    let sources = power::open_sources(&[kind], &power::SourceOptions::from_env()?)?;
    let sampler = power::Sampler::start(
        sources,
        power::SamplerConfig::every(Duration::from_millis(100)),
    )?;
    let energy_kind = sampler.kind().to_string();
    let mut camp = Campaign {
        command: opts.command.clone(),
        machine: machine(&opts.vnb_bin),
        configs: opts.configs.iter().map(Backend::name).collect(),
        workloads: opts
            .workloads
            .iter()
            .map(|w| w.name().to_string())
            .collect(),
        reps: opts.reps,
        duration_s: opts.duration,
        runs: Vec::new(),
        interrupted: false,
    };
    camp.machine.power = format!(
        "{} ({energy_kind})",
        sampler
            .sources()
            .iter()
            .map(|m| m.source.clone())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let total =
        opts.configs.len() * opts.reps as usize * (opts.workloads.len() + usize::from(opts.idle));
    let started = Instant::now();
    let mut done = 0usize;
    for rep in 1..=opts.reps {
        for (ci, cfg) in opts.configs.iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                camp.interrupted = true;
                return Ok(camp);
            }
            let vm = match boot(opts, cfg, ci, rep) {
                Ok(vm) => vm,
                // Interrupted while booting: report what finished.
                Err(_) if stop.load(Ordering::Relaxed) => {
                    camp.interrupted = true;
                    return Ok(camp);
                }
                Err(e) => return Err(e),
            };
            if camp.machine.guest_kernel.is_empty() {
                camp.machine.guest_kernel = vm.gexec("uname -r").unwrap_or_default().trim().into();
            }
            let idle = opts.idle.then_some(Workload::Idle);
            for w in idle.into_iter().chain(opts.workloads.iter().copied()) {
                if stop.load(Ordering::Relaxed) {
                    camp.interrupted = true;
                    return Ok(camp);
                }
                done += 1;
                let eta = if done > 1 {
                    let per = started.elapsed().as_secs_f64() / (done - 1) as f64;
                    format!("ETA {:.0} s", per * (total - done + 1) as f64)
                } else {
                    String::new()
                };
                eprintln!("[{done}/{total}] {} rep {rep} {w} {eta}", cfg.name());
                let mut r = run_one(&vm, opts, w, &sampler);
                if stop.load(Ordering::Relaxed) {
                    // Ctrl-C reached the workload's tools too: this run is cut, not a result.
                    camp.interrupted = true;
                    return Ok(camp);
                }
                r.config = cfg.name();
                r.rep = rep;
                r.energy_kind = energy_kind.clone();
                if let Some(e) = &r.error {
                    eprintln!("  failed: {e}");
                }
                camp.runs.push(r);
            }
            drop(vm);
        }
    }
    Ok(camp)
}

fn machine(vnb: &Path) -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            let model = c
                .lines()
                .find(|l| l.starts_with("model name"))?
                .split(':')
                .nth(1)?
                .trim()
                .to_string();
            let n = c.lines().filter(|l| l.starts_with("processor")).count();
            Some(format!("{model} × {n}"))
        })
        .unwrap_or_default();
    let first_line = |c: &mut Command| {
        sh(c)
            .map(|s| s.lines().next().unwrap_or("").trim().to_string())
            .unwrap_or_default()
    };
    Machine {
        cpu,
        kernel: first_line(Command::new("uname").arg("-r")),
        qemu: first_line(Command::new("qemu-system-x86_64").arg("--version")),
        guest_kernel: String::new(),
        vnb: first_line(Command::new(vnb).arg("--version")),
        power: String::new(),
    }
}

fn boot(opts: &RunOptions, cfg: &Backend, ci: usize, rep: u32) -> Result<Vm> {
    let ns = format!("vnbb{}c{ci}r{rep}", std::process::id() % 10000);
    let dir = opts
        .scratch
        .join(format!("{}-{ci}-{rep}", cfg.name().replace(':', "_")));
    std::fs::create_dir_all(&dir).map_err(BenchError::file(&dir))?;
    sh(Command::new(opts.repo.join("ci/netns.sh")).args(["create", &ns]))?;
    let mut vm = Vm {
        repo: opts.repo.clone(),
        ns: ns.clone(),
        dir: dir.clone(),
        qemu_pid: None,
        backend: None,
        control: None,
        agent: dir.join("agent"),
    };
    let qemu_run = opts.repo.join("ci/qemu-run.sh");
    let guest = cfg.guest_driver();
    let common = |c: &mut Command| {
        if guest.is_some() {
            c.args(["--guest-driver", "patched"]);
        }
        c.args(["--mac", GUEST_MAC, "--ip", &format!("{GUEST_IP}/24")])
            .arg("--agent")
            .arg(vm_agent(&dir))
            .arg("--console-log")
            .arg(dir.join("console.log"));
    };
    let qemu_out = match cfg {
        Backend::Ours { .. } | Backend::External { .. } => {
            let sock = dir.join("vm.sock");
            let ctl = dir.join("ctl.sock");
            let ours = matches!(cfg, Backend::Ours { .. });
            vm.backend = Some(
                BackendSpec {
                    config: cfg,
                    vnb_bin: &opts.vnb_bin,
                    ns: &ns,
                    vm: "bench",
                    tap: TAP,
                    mac: GUEST_MAC,
                    socket: &sock,
                    control: ours.then_some(ctl.as_path()),
                    log: dir.join("backend.log"),
                }
                .start()?,
            );
            if ours {
                vm.control = Some(ctl);
            }
            sh(Command::new(opts.repo.join("ci/netns.sh")).args(["addr", &ns, TAP, HOST_IP]))?;
            let mut c = Command::new(&qemu_run);
            c.arg("--vhost-user").arg(&sock);
            common(&mut c);
            sh(&mut c)?
        }
        Backend::QemuTap { tx_timer } => {
            let mut c = Command::new(&qemu_run);
            c.args(["--tap-netns", &ns, "--tap", TAP]);
            if *tx_timer {
                c.arg("--tx-timer");
            }
            common(&mut c);
            let out = sh(&mut c)?;
            let end = Instant::now() + Duration::from_secs(10);
            while sh(&mut vm.host(&["ip", "link", "show", TAP])).is_err() {
                if Instant::now() > end {
                    return Err(BenchError::Setup("QEMU did not create its tap".into()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            sh(Command::new(opts.repo.join("ci/netns.sh")).args(["addr", &ns, TAP, HOST_IP]))?;
            out
        }
    };
    let pid: u32 = qemu_out.trim().parse().map_err(|_| BenchError::Output {
        tool: "qemu-run.sh",
        msg: format!("printed {qemu_out:?}, not a pid"),
    })?;
    vm.qemu_pid = Some(pid);
    sh(Command::new(opts.repo.join("ci/gexec.py")).args([
        vm.agent.to_str().unwrap_or_default(),
        "--wait-ready",
        "180",
        "--pid",
        &pid.to_string(),
    ]))
    .map_err(|e| {
        BenchError::Setup(format!(
            "guest did not come up: {e}\nconsole:\n{}",
            std::fs::read_to_string(dir.join("console.log")).unwrap_or_default()
        ))
    })?;
    if let Some(g) = guest {
        // The patched driver's TX kick timer: off, or on with `ethtool -C` (whose control frame
        // also asks the device for T = US in both directions).
        let cmd = match g {
            GuestDriver::Patched => {
                "echo 0 > /sys/module/virtio_net_batch/parameters/tx_timer".to_string()
            }
            GuestDriver::Timer(us) => format!(
                "echo 1 > /sys/module/virtio_net_batch/parameters/tx_timer && \
                 (ethtool -C eth0 tx-usecs {us} rx-usecs {us} 2>&1 | grep -v clamped; true)"
            ),
        };
        vm.gexec(&cmd)?;
    }
    Ok(vm)
}

fn vm_agent(dir: &Path) -> PathBuf {
    dir.join("agent")
}

fn snap(vm: &Vm) -> Result<Snap> {
    let text = vm.gexec(
        "cat /proc/interrupts; head -1 /proc/stat; cd /sys/class/net/eth0/statistics; \
         echo PKTS $(cat rx_packets tx_packets); echo BYTES $(cat rx_bytes tx_bytes)",
    )?;
    let sum = |tag: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(tag))
            .map(|r| {
                r.split_whitespace()
                    .filter_map(|v| v.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0)
    };
    let qemu = vm.qemu_pid.unwrap_or(0);
    let backend = vm.backend.as_ref().map(|c| c.id());
    Ok(Snap {
        irqs: parse::interrupts(&text, "virtio1-"),
        packets: sum("PKTS "),
        bytes: sum("BYTES "),
        guest_cpu: parse::proc_stat_busy(&text),
        backend: vm.backend_counts(),
        backend_cpu: backend.map(|p| procfs::cpu_seconds(p).unwrap_or(0.0)),
        qemu_cpu: procfs::cpu_seconds(qemu).unwrap_or(0.0),
        backend_ctx: backend.map(|p| procfs::context_switches(p).unwrap_or(0)),
        qemu_ctx: procfs::context_switches(qemu).unwrap_or(0),
    })
}

/// Runs one workload; errors end up in the result.
fn run_one(vm: &Vm, opts: &RunOptions, w: Workload, sampler: &power::Sampler) -> RunResult {
    let mut r = RunResult {
        workload: w.name().into(),
        ..Default::default()
    };
    if let Err(e) = measure(vm, opts, w, sampler, &mut r) {
        r.error = Some(e.to_string());
    }
    r
}

/// An ICMP echo at 100/s from the host side while a workload runs: the RTT under that load.
struct RttProbe(Child);

impl RttProbe {
    fn start(vm: &Vm) -> Result<RttProbe> {
        vm.host(&["ping", "-i", "0.01", "-W", "1", GUEST_IP])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map(RttProbe)
            .map_err(|source| BenchError::Spawn {
                cmd: "ping".into(),
                source,
            })
    }

    /// Stops the probe; the round-trip times it saw, ms.
    fn finish(self) -> Result<Vec<f64>> {
        // SAFETY: signalling our own child; SIGINT makes ping print what it has and exit.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let out = self
            .0
            .wait_with_output()
            .map_err(|source| BenchError::Spawn {
                cmd: "ping".into(),
                source,
            })?;
        Ok(parse::ping_rtts_ms(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// Samples our backend's policy and counters every `every` until stopped (on its own thread).
fn sample_series(ctl: &Path, t0: Instant, every: Duration, stop: &AtomicBool) -> Vec<SeriesPoint> {
    let mut out = Vec::new();
    let mut prev: Option<(Instant, QueueSnapshot)> = None;
    while !stop.load(Ordering::Relaxed) {
        if let Ok(s) = vhost_net_batch::control_socket::stats(ctl, "bench") {
            let now = Instant::now();
            let t = s.total;
            if let Some((then, p)) = prev {
                let dt = now.duration_since(then).as_secs_f64().max(1e-6);
                let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / dt;
                out.push(SeriesPoint {
                    t_s: now.duration_since(t0).as_secs_f64(),
                    send_ratio: s.policy.send_ratio,
                    rx_delay_us: s.policy.applied_rx_delay_us,
                    tx_delay_us: s.policy.applied_tx_delay_us,
                    interrupts_per_s: rate(
                        p.rx_interrupts + p.tx_interrupts,
                        t.rx_interrupts + t.tx_interrupts,
                    ),
                    kicks_per_s: rate(p.rx_kicks + p.tx_kicks, t.rx_kicks + t.tx_kicks),
                    tx_pps: rate(p.tx_packets, t.tx_packets),
                    rx_pps: rate(p.rx_packets, t.rx_packets),
                    payoff_open: Some(s.policy.payoff_open),
                });
            }
            prev = Some((now, t));
        }
        std::thread::sleep(every);
    }
    out
}

/// The phases of `mix`, in order.
const MIX_PHASES: [&str; 3] = ["send", "receive", "ping-pong"];

/// Runs the workload itself; fills throughput, requests and phases.
fn run_workload(
    vm: &Vm,
    opts: &RunOptions,
    w: Workload,
    t0: Instant,
    r: &mut RunResult,
) -> Result<()> {
    let d = opts.duration.to_string();
    let iperf = |secs: &str, guest_sends: bool| -> Result<f64> {
        let mut args = vec!["iperf3", "-c", GUEST_IP, "-t", secs, "-J"];
        if guest_sends {
            args.push("-R");
        }
        // The guest's iperf3 server takes a moment to listen again after a test (seconds
        // under TCG): a refused or busy connection right after one is retried for up to 5 s.
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let r = sh(&mut vm.host(&args)).and_then(|out| parse::iperf3_mbps(&out));
            match r {
                Err(e) if Instant::now() < end && iperf_not_ready(&e) => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                r => return r,
            }
        }
    };
    match w {
        Workload::Idle => std::thread::sleep(Duration::from_secs(u64::from(opts.duration))),
        Workload::IperfTx | Workload::IperfRx => {
            r.throughput_mbps = Some(iperf(&d, w == Workload::IperfTx)?);
        }
        Workload::Http => {
            let url = format!("http://{GUEST_IP}/20M.bin");
            let out =
                sh(&mut vm.host(&["ab", "-c", "100", "-t", &d, "-n", "1000000", "-r", &url]))?;
            let ab = parse::ab(&out)?;
            r.throughput_mbps = Some(ab.mbps);
            r.requests_per_s = Some(ab.rps);
        }
        Workload::Tbench => {
            let out = sh(&mut vm.host(&["tbench", "-t", &d, "100", GUEST_IP]))?;
            let mbs = parse::tbench_mbs(&out)?;
            if mbs <= 0.0 {
                return Err(BenchError::Workload(format!(
                    "tbench finished no operation in {d} s (100 clients on a TCG guest need a \
                     few seconds to start: use a longer --duration)"
                )));
            }
            r.throughput_mbps = Some(mbs * 8.0 * 1.048_576);
        }
        Workload::UdpTx => {
            let out = sh(&mut vm.host(&[
                "iperf3", "-c", GUEST_IP, "-R", "-u", "-b", "100M", "-l", "1400", "-t", &d, "-J",
            ]))?;
            r.throughput_mbps = Some(parse::iperf3_mbps(&out)?);
        }
        Workload::RrLoad => {
            let out = sh(&mut vm.host(&[
                "iperf3", "-c", GUEST_IP, "-u", "-b", "50M", "-l", "1400", "-t", &d, "-J",
            ]))?;
            r.throughput_mbps = Some(parse::iperf3_mbps(&out)?);
        }
        Workload::Rr => {
            let count = (opts.duration * 100).to_string();
            let out = sh(&mut vm.host(&["ping", "-c", &count, "-i", "0.01", "-W", "1", GUEST_IP]))?;
            let rtts = parse::ping_rtts_ms(&out);
            if rtts.is_empty() {
                return Err(BenchError::Workload("no ping replies".into()));
            }
            r.rtt_p50_ms = percentile(&rtts, 50.0);
            r.rtt_p99_ms = percentile(&rtts, 99.0);
        }
        Workload::Mix => {
            let phase = opts.mix_phase_s.to_string();
            for _ in 0..mix_cycles(opts) {
                for name in MIX_PHASES {
                    r.phases.push(PhaseMark {
                        t_s: t0.elapsed().as_secs_f64(),
                        name: name.into(),
                    });
                    match name {
                        "send" => {
                            iperf(&phase, true)?;
                        }
                        "receive" => {
                            iperf(&phase, false)?;
                        }
                        _ => {
                            // Request/response as fast as the replies come back.
                            sh(&mut vm.host(&["ping", "-f", "-q", "-w", &phase, GUEST_IP]))?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Whether iperf3 failed because the guest's server was not listening yet or still busy
/// (a busy server may also accept and reset the control connection at once).
fn iperf_not_ready(e: &BenchError) -> bool {
    let t = e.to_string();
    t.contains("Connection refused")
        || t.contains("server is busy")
        || t.contains("unable to receive control message: Connection reset by peer")
}

/// Cycles of `mix`: at least two, and as many as `--duration` asks for.
fn mix_cycles(opts: &RunOptions) -> u32 {
    let cycle = 3 * opts.mix_phase_s.max(1);
    opts.duration.div_ceil(cycle).max(2)
}

fn measure(
    vm: &Vm,
    opts: &RunOptions,
    w: Workload,
    sampler: &power::Sampler,
    r: &mut RunResult,
) -> Result<()> {
    let a = snap(vm)?;
    let m0 = sampler.mark()?;
    let t0 = Instant::now();
    // The echo alongside the workload (`rr` is that echo itself) and the policy's samples.
    let probe = match w {
        Workload::Idle | Workload::Rr => None,
        _ => Some(RttProbe::start(vm)?),
    };
    let every = Duration::from_millis(if w == Workload::Mix { 100 } else { 250 });
    let stop = AtomicBool::new(false);
    let (done, series) = std::thread::scope(|s| {
        let sampler = vm
            .control
            .as_deref()
            .map(|ctl| s.spawn(|| sample_series(ctl, t0, every, &stop)));
        let done = run_workload(vm, opts, w, t0, r);
        stop.store(true, Ordering::Relaxed);
        let series = sampler.map(|h| h.join().unwrap_or_default());
        (done, series.unwrap_or_default())
    });
    let rtts = probe.map(RttProbe::finish).transpose();
    done?;
    if let Some(rtts) = rtts? {
        if rtts.is_empty() {
            return Err(BenchError::Workload(format!("no ping replies during {w}")));
        }
        r.rtt_p50_ms = percentile(&rtts, 50.0);
        r.rtt_p99_ms = percentile(&rtts, 99.0);
    }
    r.series = series;
    let secs = t0.elapsed().as_secs_f64();
    let m1 = sampler.mark()?;
    let b = snap(vm)?;
    let iv = sampler.between(&m0, &m1);
    r.seconds = secs;
    r.joules = iv.total_joules();
    r.watts = iv.mean_watts();
    r.domains = iv
        .sources
        .iter()
        .flat_map(|s| {
            s.domains.iter().map(move |d| crate::model::DomainFigure {
                name: format!("{}/{}", s.source, d.domain),
                joules: d.joules,
                watts: d.mean_watts,
                in_total: d.in_total,
            })
        })
        .collect();
    let packets = b.packets.saturating_sub(a.packets);
    r.guest_packets = packets;
    r.guest_bytes = b.bytes.saturating_sub(a.bytes);
    if w == Workload::Mix {
        r.throughput_mbps = Some(r.guest_bytes as f64 * 8.0 / secs / 1e6);
    }
    if let (Some((b0, t0)), Some((b1, t1))) = (a.guest_cpu, b.guest_cpu) {
        if t1 > t0 {
            r.guest_cpu_busy = Some(b1.saturating_sub(b0) as f64 / (t1 - t0) as f64);
        }
    }
    let irqs = b.irqs.saturating_sub(a.irqs);
    r.guest_irqs_per_s = irqs as f64 / secs;
    if packets > 0 {
        r.irqs_per_packet = Some(irqs as f64 / packets as f64);
    }
    let counts = a.backend.zip(b.backend);
    let delta = |f: fn(&QueueSnapshot) -> u64| counts.map(|(x, y)| f(&y).saturating_sub(f(&x)));
    let kicks = delta(|q| q.tx_kicks + q.rx_kicks);
    if let Some(k) = kicks {
        r.kicks_per_s = Some(k as f64 / secs);
        if packets > 0 {
            r.kicks_per_packet = Some(k as f64 / packets as f64);
        }
    }
    r.backend_cpu_s = a.backend_cpu.zip(b.backend_cpu).map(|(x, y)| y - x);
    r.qemu_cpu_s = b.qemu_cpu - a.qemu_cpu;
    r.backend_ctx_switches = a
        .backend_ctx
        .zip(b.backend_ctx)
        .map(|(x, y)| y.saturating_sub(x));
    r.qemu_ctx_switches = b.qemu_ctx.saturating_sub(a.qemu_ctx);
    // Per GB the guest's NIC moved (received + sent, headers included).
    if r.guest_bytes > 0 {
        let gb = r.guest_bytes as f64 / 1e9;
        r.joules_per_gb = r.joules.map(|j| j / gb);
        r.notifications_per_gb = kicks.map(|k| (irqs + k) as f64 / gb);
        r.kicks_per_gb = kicks.map(|k| k as f64 / gb);
        r.rx_irqs_per_gb = delta(|q| q.rx_interrupts).map(|n| n as f64 / gb);
        r.tx_irqs_per_gb = delta(|q| q.tx_interrupts).map(|n| n as f64 / gb);
        r.cpu_s_per_gb = Some((r.backend_cpu_s.unwrap_or(0.0) + r.qemu_cpu_s) / gb);
        r.backend_cpu_s_per_gb = r.backend_cpu_s.map(|c| c / gb);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf_failures_of_a_busy_or_late_server_are_retried_others_are_not() {
        let e = |t: &str| BenchError::Workload(t.into());
        for t in [
            "iperf3: error - unable to connect to server: Connection refused",
            "iperf3: error - the server is busy running a test. try again later",
            "iperf3: error - unable to receive control message: Connection reset by peer",
        ] {
            assert!(iperf_not_ready(&e(t)), "{t}");
        }
        for t in [
            "iperf3: error - unable to connect to server: No route to host",
            "iperf3: error - control socket has closed unexpectedly",
        ] {
            assert!(!iperf_not_ready(&e(t)), "{t}");
        }
    }
}
