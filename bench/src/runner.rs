//! A campaign: for each configuration and repetition a private network namespace, the backend,
//! a freshly booted guest, an idle baseline and the workloads; everything torn down on success,
//! failure and Ctrl-C (the guard's `Drop`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vnb_common::procfs;

use crate::backend::BackendSpec;
use crate::error::{sh, BenchError, Result};
use crate::model::{Backend, Campaign, Machine, RunResult, Workload};
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

    fn kicks(&self) -> Option<u64> {
        let s = vhost_net_batch::control_socket::stats(self.control.as_ref()?, "bench").ok()?;
        Some(s.total.tx_kicks + s.total.rx_kicks)
    }
}

/// Counters read before and after a run.
#[derive(Debug, Clone, Copy, Default)]
struct Snap {
    irqs: u64,
    packets: u64,
    kicks: Option<u64>,
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
    let total = opts.configs.len() * opts.reps as usize * (opts.workloads.len() + 1);
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
            for w in std::iter::once(Workload::Idle).chain(opts.workloads.iter().copied()) {
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
    let common = |c: &mut Command| {
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
    Ok(vm)
}

fn vm_agent(dir: &Path) -> PathBuf {
    dir.join("agent")
}

fn snap(vm: &Vm) -> Result<Snap> {
    let text = vm.gexec(
        "cat /proc/interrupts; echo PKTS $(cat /sys/class/net/eth0/statistics/rx_packets) $(cat /sys/class/net/eth0/statistics/tx_packets)",
    )?;
    let packets = text
        .lines()
        .find_map(|l| l.strip_prefix("PKTS "))
        .map(|r| {
            r.split_whitespace()
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let qemu = vm.qemu_pid.unwrap_or(0);
    let backend = vm.backend.as_ref().map(|c| c.id());
    Ok(Snap {
        irqs: parse::interrupts(&text, "virtio1-"),
        packets,
        kicks: vm.kicks(),
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

fn measure(
    vm: &Vm,
    opts: &RunOptions,
    w: Workload,
    sampler: &power::Sampler,
    r: &mut RunResult,
) -> Result<()> {
    let d = opts.duration.to_string();
    let a = snap(vm)?;
    let m0 = sampler.mark()?;
    let t0 = Instant::now();
    let mut bytes: Option<f64> = None;
    match w {
        Workload::Idle => std::thread::sleep(Duration::from_secs(u64::from(opts.duration))),
        Workload::IperfTx | Workload::IperfRx => {
            let mut args = vec!["iperf3", "-c", GUEST_IP, "-t", &d, "-J"];
            if w == Workload::IperfTx {
                args.push("-R");
            }
            let out = sh(&mut vm.host(&args))?;
            let mbps = parse::iperf3_mbps(&out)?;
            r.throughput_mbps = Some(mbps);
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
        Workload::RrLoad => {
            let secs = (opts.duration + 2).to_string();
            let load = vm
                .host(&[
                    "iperf3", "-c", GUEST_IP, "-u", "-b", "50M", "-l", "1400", "-t", &secs, "-J",
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|source| BenchError::Spawn {
                    cmd: "iperf3".into(),
                    source,
                })?;
            std::thread::sleep(Duration::from_secs(1));
            let count = (opts.duration * 100).to_string();
            let ping = sh(&mut vm.host(&["ping", "-c", &count, "-i", "0.01", "-W", "1", GUEST_IP]));
            let out = load
                .wait_with_output()
                .map_err(|source| BenchError::Spawn {
                    cmd: "iperf3".into(),
                    source,
                })?;
            let ping = ping?;
            if !out.status.success() {
                return Err(BenchError::Workload(format!(
                    "background iperf3 failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            r.throughput_mbps = Some(parse::iperf3_mbps(&String::from_utf8_lossy(&out.stdout))?);
            let rtts = parse::ping_rtts_ms(&ping);
            if rtts.is_empty() {
                return Err(BenchError::Workload("no ping replies under load".into()));
            }
            r.rtt_p50_ms = percentile(&rtts, 50.0);
            r.rtt_p99_ms = percentile(&rtts, 99.0);
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
    }
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
    if let (Some(mbps), None) = (r.throughput_mbps, bytes) {
        bytes = Some(mbps * 1e6 / 8.0 * secs);
    }
    if let (Some(j), Some(by)) = (r.joules, bytes) {
        if by > 0.0 {
            r.joules_per_gb = Some(j / (by / 1e9));
        }
    }
    let packets = b.packets.saturating_sub(a.packets);
    r.guest_packets = packets;
    let irqs = b.irqs.saturating_sub(a.irqs);
    r.guest_irqs_per_s = irqs as f64 / secs;
    if packets > 0 {
        r.irqs_per_packet = Some(irqs as f64 / packets as f64);
    }
    if let (Some(k0), Some(k1)) = (a.kicks, b.kicks) {
        let k = k1.saturating_sub(k0);
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
    Ok(())
}
