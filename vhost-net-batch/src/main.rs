//! `vhost-net-batch`: the daemon's command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use vhost_net_batch::config::{validate_all, FileConfig, MacAddr, VmConfig};
use vhost_net_batch::ops::{request, serve_control, serve_metrics, Request, Vms};
use vhost_net_batch::policy::PolicyError;
use vhost_net_batch::server::{remove_private_dir, VmSlot};

#[derive(Parser)]
#[command(
    name = "vhost-net-batch",
    version,
    about = "vhost-user virtio-net backend with notification batching"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve one VM (flags) or many (--config FILE) over vhost-user sockets.
    Serve(Box<ServeArgs>),
    /// Talk to a running daemon's control socket.
    Ctl(CtlArgs),
}

#[derive(Args)]
struct CtlArgs {
    /// The daemon's control socket (serve --control PATH).
    #[arg(long)]
    control: PathBuf,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Subcommand)]
enum CtlCmd {
    /// The VMs and their batching settings.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A VM's counters and policy state.
    Stats {
        /// VM name.
        vm: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a VM's batching mode and/or budget while it runs.
    Set {
        /// VM name.
        vm: String,
        /// off, fixed:US or adaptive:US.
        #[arg(long)]
        mode: Option<String>,
        /// Buffer budget in µs.
        #[arg(long)]
        budget_us: Option<u32>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// TOML file with [[vm]] tables (name, socket, tap, queues, mac).
    #[arg(long, conflicts_with_all = ["vm", "socket", "tap", "queues", "mac", "mode", "budget_us", "alpha", "update_ms", "rate_floor_pps"])]
    config: Option<PathBuf>,
    /// VM name (logs, metrics).
    #[arg(long)]
    vm: Option<String>,
    /// vhost-user socket path to listen on.
    #[arg(long, requires = "vm")]
    socket: Option<PathBuf>,
    /// Tap interface to create or attach.
    #[arg(long, requires = "vm")]
    tap: Option<String>,
    /// Queue pairs (one worker thread each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// The guest's MAC address (give QEMU the same).
    #[arg(long)]
    mac: Option<String>,
    /// Batching mode: off, fixed:US or adaptive:US (default adaptive with --budget-us).
    #[arg(long)]
    mode: Option<String>,
    /// The VM's buffer budget: the largest delay in µs (default 500).
    #[arg(long)]
    budget_us: Option<u32>,
    /// EWMA smoothing factor α in [0, 1) (default 0.75).
    #[arg(long)]
    alpha: Option<f64>,
    /// EWMA update interval in ms (default 5000).
    #[arg(long)]
    update_ms: Option<u32>,
    /// Packet rate below which nothing is delayed (default 1000; 0 = always delay).
    #[arg(long)]
    rate_floor_pps: Option<u32>,
    /// Control socket for `vhost-net-batch ctl` (created mode 0600).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9900), path /metrics.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Account energy per VM from this power source (auto, powercap, perf, msr, hwmon, ipmi,
    /// estimate): shown in stats, metrics and the guest's control replies. Without RAPL, `auto`
    /// falls back to the CPU-time estimate, labelled as such.
    #[arg(long)]
    power_source: Option<String>,
    /// How often energy is apportioned to VMs, in ms.
    #[arg(long, default_value_t = 1000)]
    power_period_ms: u64,
    /// Idle (base) watts of the power source, split evenly over the VMs; the rest is split by
    /// CPU time. Default: the estimate's idle watts, 0 for a measured source (measure it with
    /// `vnb-power sample` on the idle host).
    #[arg(long, value_name = "W", allow_negative_numbers = true)]
    power_base_watts: Option<f64>,
    /// ESTIMATE model: idle watts (also VNB_IDLE_WATTS; default 40).
    #[arg(long, value_name = "W", allow_negative_numbers = true)]
    power_idle_watts: Option<f64>,
    /// ESTIMATE model: watts per fully busy logical CPU (also VNB_WATTS_PER_CORE; default 5).
    #[arg(long, value_name = "W", allow_negative_numbers = true)]
    power_watts_per_core: Option<f64>,
    /// Wall-power `meter` source: a shell command printing watts (also VNB_METER_CMD).
    #[arg(long, value_name = "CMD")]
    power_meter_cmd: Option<String>,
    /// Log filter (error, warn, info, debug, trace or a tracing directive).
    #[arg(long, default_value = "info", env = "VNB_LOG")]
    log: String,
}

fn vms_from(args: &ServeArgs) -> Result<Vec<VmConfig>, String> {
    if let Some(path) = &args.config {
        return FileConfig::load(path).map_err(|e| e.to_string());
    }
    let (Some(name), Some(socket), Some(tap)) = (&args.vm, &args.socket, &args.tap) else {
        return Err("give --vm NAME --socket PATH --tap NAME, or --config FILE".into());
    };
    let mac = match &args.mac {
        Some(m) => Some(m.parse::<MacAddr>().map_err(|e| e.to_string())?),
        None => None,
    };
    let mut vm = VmConfig::new(name, socket, tap, args.queues, mac);
    vm.mode = match &args.mode {
        Some(m) => Some(m.parse().map_err(|e: PolicyError| e.to_string())?),
        None => None,
    };
    vm.budget_us = args.budget_us;
    vm.alpha = args.alpha;
    vm.update_ms = args.update_ms;
    vm.rate_floor_pps = args.rate_floor_pps;
    let vms = vec![vm];
    validate_all(&vms).map_err(|e| e.to_string())?;
    Ok(vms)
}

/// Starts the power sampler and the per-VM energy meter.
fn start_meter(kind: &str, args: &ServeArgs) -> Result<power::VmEnergyMeter, String> {
    let period_ms = args.power_period_ms;
    let kind: power::source::SourceKind = kind
        .parse()
        .map_err(|e: String| format!("--power-source: {e}"))?;
    if period_ms == 0 {
        return Err("--power-period-ms must be > 0".into());
    }
    let watts = |flag: &str, v: Option<f64>| -> Result<Option<f64>, String> {
        match v {
            Some(w) if !w.is_finite() || w < 0.0 => Err(format!(
                "{flag} must be a finite number of watts >= 0, got {w}"
            )),
            _ => Ok(v),
        }
    };
    let base_watts = watts("--power-base-watts", args.power_base_watts)?;
    let mut opts = power::source::SourceOptions::from_env().map_err(|e| e.to_string())?;
    if let Some(w) = watts("--power-idle-watts", args.power_idle_watts)? {
        opts.model.idle_watts = w;
    }
    if let Some(w) = watts("--power-watts-per-core", args.power_watts_per_core)? {
        opts.model.watts_per_busy_core = w;
    }
    if let Some(cmd) = &args.power_meter_cmd {
        opts.meter_command = Some(cmd.clone());
    }
    let sources =
        power::source::open_sources(&[kind], &opts).map_err(|e| format!("--power-source: {e}"))?;
    let sampler = power::Sampler::start(
        sources,
        power::SamplerConfig::every(std::time::Duration::from_millis(100)),
    )
    .map_err(|e| format!("power sampler: {e}"))?;
    let names: Vec<String> = sampler.sources().iter().map(|m| m.source.clone()).collect();
    let kind = sampler.kind();
    let meter = power::VmEnergyMeter::start(
        sampler,
        power::MeterConfig {
            period: std::time::Duration::from_millis(period_ms),
            base_watts,
            ..Default::default()
        },
    )
    .map_err(|e| format!("per-VM energy meter: {e}"))?;
    tracing::info!(sources = ?names, %kind, base_watts = meter.handle().base_watts(), "per-VM energy accounting on");
    Ok(meter)
}

fn serve(args: ServeArgs) -> Result<(), String> {
    if args.power_source.is_none() {
        let given = [
            ("--power-base-watts", args.power_base_watts.is_some()),
            ("--power-idle-watts", args.power_idle_watts.is_some()),
            (
                "--power-watts-per-core",
                args.power_watts_per_core.is_some(),
            ),
            ("--power-meter-cmd", args.power_meter_cmd.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
            return Err(format!(
                "{flag} configures per-VM energy accounting: give --power-source too"
            ));
        }
    }
    let vms = vms_from(&args)?;
    let meter = match &args.power_source {
        Some(kind) => Some(start_meter(kind, &args)?),
        None => None,
    };
    // Open every VM first: a bad one stops the start-up, before anything serves.
    let mut slots = Vec::new();
    for vm in vms {
        let mut slot = VmSlot::open(vm).map_err(|e| e.to_string())?;
        if let Some(m) = &meter {
            slot = slot.with_energy(m.handle());
        }
        slots.push(Arc::new(slot));
    }
    // SIGINT/SIGTERM: remove the sockets and internal files, then exit; taps we created vanish
    // with our descriptors.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let vms = Vms(slots.clone());
    if let Some(path) = &args.control {
        serve_control(path, vms.clone())
            .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    }
    if let Some(addr) = &args.metrics_addr {
        serve_metrics(addr, vms.clone())?;
    }
    let control_path = args.control.clone();
    let for_signals = slots.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!(signal = sig, "shutting down");
                for s in &for_signals {
                    s.remove_socket();
                }
                if let Some(p) = &control_path {
                    let _ = std::fs::remove_file(p);
                }
                remove_private_dir();
                std::process::exit(0);
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    let mut threads = Vec::new();
    for slot in slots {
        let name = format!("vm-{}", slot.config().name);
        let t = std::thread::Builder::new()
            .name(name)
            .spawn(move || slot.serve_forever())
            .map_err(|e| format!("cannot start a VM thread: {e}"))?;
        threads.push(t);
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn print_stats(v: &serde_json::Value) {
    let p = &v["policy"];
    let t = &v["total"];
    println!(
        "{}: mode {} budget {} µs, T {} µs, rx delay {} µs, tx delay {} µs, send ratio {:.3}, {}",
        v["vm"].as_str().unwrap_or("?"),
        v["mode"].as_str().unwrap_or("?"),
        v["budget_us"],
        p["t_us"],
        p["rx_delay_us"],
        p["tx_delay_us"],
        p["send_ratio"].as_f64().unwrap_or(0.0),
        if p["active"] == serde_json::json!(true) {
            "active"
        } else {
            "below the rate floor"
        }
    );
    for k in [
        "tx_packets",
        "rx_packets",
        "tx_kicks",
        "rx_interrupts",
        "tx_interrupts",
        "rx_timer_fires",
        "tx_timer_fires",
        "rx_flush_frame_cap",
        "rx_flush_low_water",
        "flush_used_event",
        "tx_flush_frame_cap",
        "control_frames",
    ] {
        println!("  {k:<20} {}", t[k]);
    }
    let c = &v["control"];
    println!(
        "  control: accepted {} clamped {} invalid {} rate-limited {} dropped {} from-tap {}",
        c["accepted"], c["clamped"], c["invalid"], c["rate_limited"], c["dropped"], c["from_tap"]
    );
}

fn ctl(args: CtlArgs) -> Result<(), String> {
    let (req, json) = match args.cmd {
        CtlCmd::List { json } => (Request::List, json),
        CtlCmd::Stats { vm, json } => (Request::Stats { vm }, json),
        CtlCmd::Set {
            vm,
            mode,
            budget_us,
            json,
        } => {
            if mode.is_none() && budget_us.is_none() {
                return Err("set: give --mode and/or --budget-us".into());
            }
            if let Some(m) = &mode {
                m.parse::<vhost_net_batch::policy::ModeSpec>()
                    .map_err(|e| e.to_string())?;
            }
            (
                Request::Set {
                    vm,
                    mode,
                    budget_us,
                },
                json,
            )
        }
    };
    let list = matches!(req, Request::List);
    let v = request(&args.control, &req)?;
    if json {
        println!("{v}");
    } else if list {
        for vm in v["vms"].as_array().into_iter().flatten() {
            println!(
                "{:<16} mode {:<8} budget {:>6} µs  T {:>6} µs  rx {:>6} µs  tx {:>6} µs  p* {:.3}  tap {}",
                vm["vm"].as_str().unwrap_or("?"),
                vm["mode"].as_str().unwrap_or("?"),
                vm["budget_us"],
                vm["t_us"],
                vm["rx_delay_us"],
                vm["tx_delay_us"],
                vm["send_ratio"].as_f64().unwrap_or(0.0),
                vm["tap"].as_str().unwrap_or("?"),
            );
        }
    } else {
        print_stats(&v);
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Ctl(args) => match ctl(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Serve(args) => {
            let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .init();
            match serve(*args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
