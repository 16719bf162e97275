//! `vhost-net-batch`: the daemon's command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use thiserror::Error;
use vhost_net_batch::config::{validate_all, ConfigError, FileConfig, VmConfig};
use vhost_net_batch::control_socket::{
    request, serve_control, ControlError, ListReply, Request, StatsReply, Vms,
};
use vhost_net_batch::policy::ModeSpec;
use vhost_net_batch::prometheus::{serve_metrics, MetricsError};
use vhost_net_batch::server::{remove_private_dir, ServeError, VmSlot};

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
        mode: Option<ModeSpec>,
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
    /// TOML file with [[vm]] tables (the per-VM flags below as keys, `name` for --vm).
    #[arg(long, conflicts_with = "one_vm")]
    config: Option<PathBuf>,
    #[command(flatten)]
    vm: Option<VmConfig>,
    /// Control socket for `vhost-net-batch ctl` (created mode 0600).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9900), path /metrics.
    #[arg(long)]
    metrics_addr: Option<String>,
    #[command(flatten)]
    power: PowerArgs,
    /// Log filter (error, warn, info, debug, trace or a tracing directive).
    #[arg(long, default_value = "info", env = "VNB_LOG")]
    log: String,
}

#[derive(Args)]
struct PowerArgs {
    /// Account energy per VM from this power source (auto, powercap, perf, msr, hwmon, ipmi,
    /// estimate): shown in stats, metrics and the guest's control replies. Without RAPL, `auto`
    /// falls back to the CPU-time estimate, labelled as such.
    #[arg(long)]
    power_source: Option<power::SourceKind>,
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
}

/// Why the daemon or a `ctl` command stopped.
#[derive(Debug, Error)]
enum CliError {
    /// Neither one VM's flags nor a file.
    #[error("give --vm NAME --socket PATH --tap NAME, or --config FILE")]
    NoVm,
    /// A bad VM setting.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A VM could not be opened.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The control socket.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The metrics endpoint.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// A power model flag without a power source.
    #[error("{0} configures per-VM energy accounting: give --power-source too")]
    PowerWithoutSource(&'static str),
    /// A bad power flag.
    #[error("{flag} must be {what}, got {value}")]
    PowerFlag {
        /// The flag.
        flag: &'static str,
        /// What it must be.
        what: &'static str,
        /// What was given.
        value: String,
    },
    /// Power accounting could not start.
    #[error("{what}: {source}")]
    Power {
        /// Which part.
        what: &'static str,
        /// Why.
        #[source]
        source: power::PowerError,
    },
    /// A thread or the signal handler could not start.
    #[error("cannot start {what}: {source}")]
    Start {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn vms_from(args: &ServeArgs) -> Result<Vec<VmConfig>, CliError> {
    if let Some(path) = &args.config {
        return Ok(FileConfig::load(path)?);
    }
    let vms = vec![args.vm.clone().ok_or(CliError::NoVm)?];
    validate_all(&vms)?;
    Ok(vms)
}

/// Starts the power sampler and the per-VM energy meter.
fn start_meter(kind: power::SourceKind, p: &PowerArgs) -> Result<power::VmEnergyMeter, CliError> {
    if p.power_period_ms == 0 {
        return Err(CliError::PowerFlag {
            flag: "--power-period-ms",
            what: "> 0",
            value: "0".into(),
        });
    }
    let watts = |flag: &'static str, v: Option<f64>| match v {
        Some(w) if !w.is_finite() || w < 0.0 => Err(CliError::PowerFlag {
            flag,
            what: "a finite number of watts >= 0",
            value: w.to_string(),
        }),
        _ => Ok(v),
    };
    let power = |what| move |source| CliError::Power { what, source };
    let base_watts = watts("--power-base-watts", p.power_base_watts)?;
    let mut opts = power::SourceOptions::from_env().map_err(power("--power-source"))?;
    if let Some(w) = watts("--power-idle-watts", p.power_idle_watts)? {
        opts.model.idle_watts = w;
    }
    if let Some(w) = watts("--power-watts-per-core", p.power_watts_per_core)? {
        opts.model.watts_per_busy_core = w;
    }
    if let Some(cmd) = &p.power_meter_cmd {
        opts.meter_command = Some(cmd.clone());
    }
    let sources = power::open_sources(&[kind], &opts).map_err(power("--power-source"))?;
    let sampler = power::Sampler::start(
        sources,
        power::SamplerConfig::every(std::time::Duration::from_millis(100)),
    )
    .map_err(power("power sampler"))?;
    let names: Vec<String> = sampler.sources().iter().map(|m| m.source.clone()).collect();
    let kind = sampler.kind();
    let meter = power::VmEnergyMeter::start(
        sampler,
        power::MeterConfig {
            period: std::time::Duration::from_millis(p.power_period_ms),
            base_watts,
            ..Default::default()
        },
    )
    .map_err(power("per-VM energy meter"))?;
    tracing::info!(sources = ?names, %kind, base_watts = meter.handle().base_watts(), "per-VM energy accounting on");
    Ok(meter)
}

fn serve(args: ServeArgs) -> Result<(), CliError> {
    let p = &args.power;
    if p.power_source.is_none() {
        let given = [
            ("--power-base-watts", p.power_base_watts.is_some()),
            ("--power-idle-watts", p.power_idle_watts.is_some()),
            ("--power-watts-per-core", p.power_watts_per_core.is_some()),
            ("--power-meter-cmd", p.power_meter_cmd.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
            return Err(CliError::PowerWithoutSource(flag));
        }
    }
    let vms = vms_from(&args)?;
    let meter = match args.power.power_source {
        Some(kind) => Some(start_meter(kind, &args.power)?),
        None => None,
    };
    // Open every VM first: a bad one stops the start-up, before anything serves.
    let mut slots = Vec::new();
    for vm in vms {
        let mut slot = VmSlot::open(vm)?;
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
    .map_err(|source| CliError::Start {
        what: "the signal handlers",
        source,
    })?;
    let vms = Vms(slots.clone());
    if let Some(path) = &args.control {
        serve_control(path, vms.clone())?;
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
        .map_err(|source| CliError::Start {
            what: "the signal thread",
            source,
        })?;
    let mut threads = Vec::new();
    for slot in slots {
        let name = format!("vm-{}", slot.config().name);
        let t = std::thread::Builder::new()
            .name(name)
            .spawn(move || slot.serve_forever())
            .map_err(|source| CliError::Start {
                what: "a VM thread",
                source,
            })?;
        threads.push(t);
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn print_stats(v: &StatsReply) {
    let p = &v.policy;
    println!(
        "{}: mode {} budget {} µs, T {} µs, rx delay {} µs, tx delay {} µs, send ratio {:.3}, {}",
        v.vm,
        v.mode.name(),
        v.budget_us,
        p.t_us,
        p.rx_delay_us,
        p.tx_delay_us,
        p.send_ratio,
        if !p.active {
            "below the rate floor"
        } else if !p.payoff_open {
            "not worth a delay (the guest batches by itself)"
        } else {
            "active"
        }
    );
    println!(
        "  applied rx {} µs tx {} µs; notifications {}/s, undelayed {}/s; payoff probes {} refusals {}",
        p.applied_rx_delay_us,
        p.applied_tx_delay_us,
        p.notify_rate,
        p.natural_notify_rate,
        p.payoff_probes,
        p.payoff_refusals
    );
    for (name, value, _) in v.total.counters() {
        println!("  {name:<20} {value}");
    }
    for (name, value, _) in v.vm_counters.counters() {
        println!("  {name:<20} {value}");
    }
    let c = &v.control;
    println!(
        "  control: accepted {} clamped {} invalid {} rate-limited {} dropped {} from-tap {} replies-lost {}",
        c.accepted, c.clamped, c.invalid, c.rate_limited, c.dropped, c.from_tap, c.replies_lost
    );
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string(v).expect("replies serialize"));
}

fn ctl(args: CtlArgs) -> Result<(), CliError> {
    match args.cmd {
        CtlCmd::List { json } => {
            let l: ListReply = request(&args.control, &Request::List)?;
            if json {
                print_json(&l);
            }
            for vm in l.vms.iter().filter(|_| !json) {
                println!(
                    "{:<16} mode {:<8} budget {:>6} µs  T {:>6} µs  rx {:>6} µs  tx {:>6} µs  p* {:.3}  tap {}",
                    vm.vm,
                    vm.mode.name(),
                    vm.budget_us,
                    vm.t_us,
                    vm.rx_delay_us,
                    vm.tx_delay_us,
                    vm.send_ratio,
                    vm.tap,
                );
            }
        }
        CtlCmd::Stats { vm, json } => {
            let s: StatsReply = request(&args.control, &Request::Stats { vm })?;
            if json {
                print_json(&s);
            } else {
                print_stats(&s);
            }
        }
        CtlCmd::Set {
            vm,
            mode,
            budget_us,
            json,
        } => {
            if mode.is_none() && budget_us.is_none() {
                return Err(ControlError::NothingToSet.into());
            }
            let s: StatsReply = request(
                &args.control,
                &Request::Set {
                    vm,
                    mode,
                    budget_us,
                },
            )?;
            if json {
                print_json(&s);
            } else {
                print_stats(&s);
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Ctl(args) => ctl(args),
        Cmd::Serve(args) => {
            let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .init();
            serve(*args)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
