//! `vnb-bench run …` runs a campaign and writes its report; `vnb-bench report DIR` rewrites the
//! report from `DIR/results.json`; `vnb-bench datapath …` measures the data path alone with
//! DPDK testpmd as the frontend.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use bench::datapath::{self, DatapathOptions};
use bench::error::{BenchError, Result};
use bench::model::{Backend, Workload};
use bench::report;
use bench::runner::{run, RunOptions};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

#[derive(Parser)]
#[command(
    name = "vnb-bench",
    version,
    about = "Benchmark campaigns for vhost-net-batch"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a campaign and write report.md, results.csv and results.json into --out.
    Run(RunArgs),
    /// Measure the data path without a VM: DPDK testpmd (txonly) drives each configuration,
    /// repetitions interleaved; writes report.md and results.json into --out.
    Datapath(DatapathArgs),
    /// Rewrite the report of a campaign directory from its results.json.
    Report {
        /// The campaign directory.
        dir: PathBuf,
    },
}

#[derive(Args, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunArgs {
    /// TOML plan with the same keys as the flags (workloads, modes, reps, duration, out,
    /// power_source); flags given on the command line win.
    #[arg(long)]
    #[serde(skip)]
    plan: Option<PathBuf>,
    /// Workloads: iperf-tx, iperf-rx, http, tbench, rr, rr-load, udp-tx, mix (default all).
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    workloads: Vec<String>,
    /// Configurations: off, fixed:US, adaptive:US (ours), qemu-tap, qemu-tap-txtimer (peers);
    /// `sweep` stands for docs/design.md's sweep: off, fixed and adaptive at 100, 250, 500 and
    /// 1000 µs, and both QEMU peers.
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    modes: Vec<String>,
    /// External vhost-user backends, `NAME=COMMAND TEMPLATE` (repeatable): run with `sh -c`
    /// inside the namespace; `{socket}` is the socket to listen on, `{tap}` the tap to create,
    /// `{mac}` the guest's MAC. Reported as `ext:NAME`.
    #[arg(long)]
    #[serde(default)]
    external: Vec<String>,
    /// Repetitions (default 3).
    #[arg(long)]
    reps: Option<u32>,
    /// Seconds per workload run (default 10).
    #[arg(long)]
    duration: Option<u32>,
    /// Output directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Power source for watts and joules (default auto: RAPL if present, else the estimate).
    #[arg(long)]
    power_source: Option<String>,
    /// Seconds per phase of the `mix` workload (default 10); it runs at least two cycles of
    /// its three phases, more when --duration asks for more.
    #[arg(long)]
    mix_phase_s: Option<u32>,
    /// Skip the idle baseline each guest measures before its workloads (for focused studies;
    /// a recorded campaign keeps it).
    #[arg(long)]
    #[serde(default)]
    skip_idle: bool,
}

#[derive(Args, Debug)]
struct DatapathArgs {
    /// Configurations of ours: off, fixed:US, adaptive:US (default: off). The first
    /// configuration given (ours, else the first --external) is the reference of the ratios.
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// External vhost-user backends, `NAME=COMMAND TEMPLATE` (repeatable), as for `run`;
    /// e.g. an older build of ours, to see what a change costs.
    #[arg(long)]
    external: Vec<String>,
    /// Directions: tx (testpmd txonly → backend → tap), rx (tap flood → backend → testpmd
    /// rxonly); default both.
    #[arg(long, value_delimiter = ',', default_value = "tx,rx")]
    directions: Vec<datapath::Direction>,
    /// Ethernet frame length in bytes, 60 to 1514 (default 64).
    #[arg(long, default_value_t = 64)]
    frame_len: u16,
    /// RX flood: full (more than any backend takes, so the backend never waits: the cost of a
    /// frame), even (the same flood at the backend's priority: the backend drains the tap and
    /// waits for frames, thousands of times a second) or partial (one send per frame at normal
    /// priority, as campaigns before 2026-12-06's read-ahead one did: the backend idles about
    /// half the time).
    #[arg(long, default_value = "full")]
    rx_load: datapath::RxLoad,
    /// Repetitions (default 5).
    #[arg(long, default_value_t = 5)]
    reps: u32,
    /// Measured seconds per run (default 8).
    #[arg(long, default_value_t = 8)]
    duration: u32,
    /// Seconds testpmd runs before the measurement starts (default 3).
    #[arg(long, default_value_t = 3)]
    warmup: u32,
    /// Bare tap readers to run beside the configurations in direction rx, each repetition, on
    /// the same flood: readv, batch, multishot (`floor:HOW` in the report). They do no
    /// virtio work: what every tap reader pays per frame. multishot needs Linux 6.7+.
    #[arg(long, value_delimiter = ',')]
    floor: Vec<bench::tapfloor::FloorRead>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
}

fn repo() -> PathBuf {
    std::env::var_os("VNB_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
}

fn vnb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VNB_BIN") {
        return p.into();
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("vhost-net-batch")))
        .unwrap_or_else(|| "vhost-net-batch".into())
}

/// Our binary, which must exist when a configuration runs it.
fn checked_vnb_bin(configs: &[Backend]) -> Result<PathBuf> {
    let vnb = vnb_bin();
    if configs.iter().any(|c| matches!(c, Backend::Ours { .. })) && !vnb.exists() {
        return Err(BenchError::Setup(format!(
            "{} not found: build it (cargo build --release) or set VNB_BIN",
            vnb.display()
        )));
    }
    Ok(vnb)
}

fn run_cmd(mut a: RunArgs) -> Result<()> {
    if let Some(p) = &a.plan {
        let text = std::fs::read_to_string(p).map_err(BenchError::file(p))?;
        let plan: RunArgs = toml::from_str(&text).map_err(|e| BenchError::Parse {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        if a.workloads.is_empty() {
            a.workloads = plan.workloads;
        }
        if a.modes.is_empty() {
            a.modes = plan.modes;
        }
        if a.external.is_empty() {
            a.external = plan.external;
        }
        a.reps = a.reps.or(plan.reps);
        a.duration = a.duration.or(plan.duration);
        a.out = a.out.or(plan.out);
        a.power_source = a.power_source.or(plan.power_source);
        a.mix_phase_s = a.mix_phase_s.or(plan.mix_phase_s);
        a.skip_idle |= plan.skip_idle;
    }
    let workloads: Vec<Workload> = if a.workloads.is_empty() {
        Workload::ALL.to_vec()
    } else {
        a.workloads
            .iter()
            .map(|w| w.parse())
            .collect::<Result<_>>()?
    };
    let mut configs: Vec<Backend> = if a.modes.is_empty() && !a.external.is_empty() {
        Vec::new()
    } else if a.modes.is_empty() {
        ["off", "adaptive:500", "adaptive:1000"]
            .iter()
            .map(|m| m.parse().unwrap())
            .collect()
    } else {
        let mut names: Vec<String> = Vec::new();
        for m in &a.modes {
            if m == "sweep" {
                names.push("off".into());
                for kind in ["fixed", "adaptive"] {
                    names.extend(
                        [100, 250, 500, 1000]
                            .iter()
                            .map(|us| format!("{kind}:{us}")),
                    );
                }
                names.extend(["qemu-tap".into(), "qemu-tap-txtimer".into()]);
            } else {
                names.push(m.clone());
            }
        }
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(n.clone()));
        names.iter().map(|m| m.parse()).collect::<Result<_>>()?
    };
    for e in &a.external {
        configs.push(Backend::external(e)?);
    }
    let reps = a.reps.unwrap_or(3);
    let duration = a.duration.unwrap_or(10);
    if reps == 0 || duration == 0 || a.mix_phase_s == Some(0) {
        return Err(BenchError::Input(
            "--reps, --duration and --mix-phase-s must be at least 1".into(),
        ));
    }
    let out = a
        .out
        .ok_or_else(|| BenchError::Input("give --out DIR".into()))?;
    let vnb = checked_vnb_bin(&configs)?;
    let stop = stop_flag()?;
    let scratch = std::env::temp_dir().join(format!("vnb-bench-{}", std::process::id()));
    let opts = RunOptions {
        configs,
        workloads,
        reps,
        duration,
        repo: repo(),
        vnb_bin: vnb,
        power_source: a.power_source.unwrap_or_else(|| "auto".into()),
        // The energy model and meter come from VNB_* variables too: they belong to the rerun.
        command: {
            let env = [
                "VNB_IDLE_WATTS",
                "VNB_WATTS_PER_CORE",
                "VNB_METER_CMD",
                "VNB_IPMITOOL",
            ]
            .iter()
            .filter_map(|k| {
                let v = std::env::var(k).ok()?;
                Some(format!("{k}={} ", bench::model::shell_quote(&v)))
            })
            .collect::<String>();
            format!(
                "{env}{}",
                bench::model::shell_command(&std::env::args().collect::<Vec<_>>())
            )
        },
        scratch: scratch.clone(),
        mix_phase_s: a.mix_phase_s.unwrap_or(10),
        idle: !a.skip_idle,
    };
    let result = run(&opts, &stop);
    let _ = std::fs::remove_dir_all(&scratch);
    let camp = result?;
    report::write_all(&camp, &out)?;
    println!("{}", report::markdown(&camp));
    println!("report: {}", out.join("report.md").display());
    if camp.interrupted {
        return Err(BenchError::Workload(format!(
            "interrupted after {} runs; the partial report is in {}",
            camp.runs.len(),
            out.display()
        )));
    }
    Ok(())
}

fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|source| BenchError::Spawn {
            cmd: "signal handler".into(),
            source,
        })?;
    }
    Ok(stop)
}

fn datapath_cmd(a: DatapathArgs) -> Result<()> {
    let mut configs: Vec<Backend> = if a.modes.is_empty() && !a.external.is_empty() {
        Vec::new()
    } else if a.modes.is_empty() {
        vec!["off".parse()?]
    } else {
        a.modes.iter().map(|m| m.parse()).collect::<Result<_>>()?
    };
    for e in &a.external {
        configs.push(Backend::external(e)?);
    }
    if a.reps == 0 || a.duration == 0 {
        return Err(BenchError::Input(
            "--reps and --duration must be at least 1".into(),
        ));
    }
    if !a.floor.is_empty() && !a.directions.contains(&datapath::Direction::Rx) {
        return Err(BenchError::Input(
            "--floor measures tap readers: add rx to --directions".into(),
        ));
    }
    let vnb = checked_vnb_bin(&configs)?;
    let stop = stop_flag()?;
    let scratch = std::env::temp_dir().join(format!("vnb-bench-dp-{}", std::process::id()));
    let opts = DatapathOptions {
        configs,
        directions: a.directions,
        frame_len: a.frame_len,
        rx_load: a.rx_load,
        reps: a.reps,
        duration: a.duration,
        warmup: a.warmup,
        repo: repo(),
        vnb_bin: vnb,
        command: bench::model::shell_command(&std::env::args().collect::<Vec<_>>()),
        scratch: scratch.clone(),
        floor: a.floor,
    };
    let result = datapath::run(&opts, &stop);
    let _ = std::fs::remove_dir_all(&scratch);
    let camp = result?;
    datapath::write_all(&camp, &a.out)?;
    println!("{}", datapath::markdown(&camp));
    println!("report: {}", a.out.join("report.md").display());
    if camp.interrupted {
        return Err(BenchError::Workload(format!(
            "interrupted after {} runs; the partial report is in {}",
            camp.runs.len(),
            a.out.display()
        )));
    }
    let failed = camp.runs.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        return Err(BenchError::Workload(format!(
            "{failed} of {} runs failed; see the report",
            camp.runs.len()
        )));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run_cmd(a),
        Cmd::Datapath(a) => datapath_cmd(a),
        Cmd::Report { dir } => report::load(&dir).and_then(|c| {
            report::write_all(&c, &dir)?;
            println!("report: {}", dir.join("report.md").display());
            Ok(())
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vnb-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
