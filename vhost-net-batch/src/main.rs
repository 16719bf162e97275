//! `vhost-net-batch`: the daemon's command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use vhost_net_batch::config::{validate_all, FileConfig, MacAddr, VmConfig};
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
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML file with [[vm]] tables (name, socket, tap, queues, mac).
    #[arg(long, conflicts_with_all = ["vm", "socket", "tap", "queues", "mac", "mode", "budget_us", "alpha", "update_ms"])]
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
    let vms = vec![vm];
    validate_all(&vms).map_err(|e| e.to_string())?;
    Ok(vms)
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let vms = vms_from(&args)?;
    // Open every VM first: a bad one stops the start-up, before anything serves.
    let mut slots = Vec::new();
    for vm in vms {
        slots.push(Arc::new(VmSlot::open(vm).map_err(|e| e.to_string())?));
    }
    // SIGINT/SIGTERM: remove the sockets and internal files, then exit; taps we created vanish
    // with our descriptors.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let for_signals = slots.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!(signal = sig, "shutting down");
                for s in &for_signals {
                    s.remove_socket();
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve(args) => {
            let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .init();
            match serve(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
