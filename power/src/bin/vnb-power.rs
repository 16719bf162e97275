//! `vnb-power`: measure joules and mean watts per power domain, and list usable power sources.
//!
//! ```text
//! vnb-power sample --duration S [--interval MS] [--source auto|powercap|perf|msr|hwmon|ipmi|meter|estimate[,…]]
//!                  [--sysfs-root DIR] [--json]
//! vnb-power baseline --duration S …     (same, labelled as an idle baseline)
//! vnb-power list [--json]               (each line: source, usable yes/no, reason)
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use power::estimate::{DEFAULT_IDLE_WATTS, DEFAULT_WATTS_PER_BUSY_CORE};
use power::platform::RealFs;
use power::report::{format_interval, format_list};
use power::wall::ipmi::DEFAULT_IPMITOOL;
use power::{
    list_sources, open_sources, EstimateModel, Platform, PowerError, Sampler, SamplerConfig,
    SourceKind, SourceOptions,
};

#[derive(Parser, Debug)]
#[command(
    name = "vnb-power",
    version,
    about = "Energy measurement for vhost-net-batch: RAPL (powercap, perf, MSR), wall power \
             (hwmon, IPMI, meter command), or a labelled CPU-time ESTIMATE"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Sample the sources for a while and print joules and mean watts per domain.
    Sample(SampleArgs),
    /// Like `sample`, labelled as an idle baseline (run it while the machine is idle).
    Baseline(SampleArgs),
    /// Show which sources are usable here and why not (source, usable yes/no, reason).
    List(CommonArgs),
}

#[derive(Args, Debug)]
struct SampleArgs {
    /// How long to sample, seconds (fractions allowed).
    #[arg(long, value_name = "S", value_parser = parse_duration, allow_negative_numbers = true)]
    duration: f64,
    /// Time between reads, milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    interval: u64,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args, Debug)]
struct CommonArgs {
    /// Source(s), comma-separated: auto, powercap, perf, msr, hwmon, ipmi, meter, estimate.
    /// `auto` = best RAPL reader (or, without RAPL, the ESTIMATE) plus usable wall sources.
    #[arg(long, value_name = "SOURCE", default_value = "auto", value_delimiter = ',',
          value_parser = parse_source)]
    source: Vec<SourceKind>,
    /// Directory standing in for /sys (replay a recorded tree).
    #[arg(long, value_name = "DIR", default_value = "/sys")]
    sysfs_root: PathBuf,
    /// Directory standing in for /proc (cpuinfo, stat).
    #[arg(long, value_name = "DIR", default_value = "/proc")]
    proc_root: PathBuf,
    /// Directory standing in for /dev (cpu/N/msr, ipmi0).
    #[arg(long, value_name = "DIR", default_value = "/dev")]
    dev_root: PathBuf,
    /// ESTIMATE model: power of the idle machine, watts.
    #[arg(long, value_name = "W", env = "VNB_IDLE_WATTS", default_value_t = DEFAULT_IDLE_WATTS,
          value_parser = parse_watts, allow_negative_numbers = true)]
    idle_watts: f64,
    /// ESTIMATE model: additional watts per fully busy logical CPU.
    #[arg(long, value_name = "W", env = "VNB_WATTS_PER_CORE",
          default_value_t = DEFAULT_WATTS_PER_BUSY_CORE, value_parser = parse_watts,
          allow_negative_numbers = true)]
    watts_per_core: f64,
    /// ipmitool program and interface options (`dcmi power reading` is appended).
    #[arg(long, value_name = "CMD", env = "VNB_IPMITOOL", default_value = DEFAULT_IPMITOOL)]
    ipmitool: String,
    /// Shell command printing the wall power in watts (the `meter` source).
    #[arg(long, value_name = "CMD", env = "VNB_METER_CMD")]
    meter_cmd: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_source(s: &str) -> Result<SourceKind, String> {
    s.parse()
}

fn parse_duration(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !v.is_finite() || v <= 0.0 || v > 7.0 * 86_400.0 {
        return Err(format!(
            "duration must be > 0 and at most one week (604800 s), got {s}"
        ));
    }
    Ok(v)
}

fn parse_watts(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of watts"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("watts must be a finite number >= 0, got {s}"));
    }
    Ok(v)
}

impl CommonArgs {
    fn options(&self) -> SourceOptions {
        SourceOptions {
            platform: Platform {
                sys_root: self.sysfs_root.clone(),
                proc_root: self.proc_root.clone(),
                dev_root: self.dev_root.clone(),
                fs: Arc::new(RealFs),
            },
            model: EstimateModel {
                idle_watts: self.idle_watts,
                watts_per_busy_core: self.watts_per_core,
            },
            ipmitool: self.ipmitool.clone(),
            meter_command: self.meter_cmd.clone(),
            ..SourceOptions::default()
        }
    }
}

fn sample(args: &SampleArgs, title: &str) -> Result<(), PowerError> {
    let opts = args.common.options();
    let sources = open_sources(&args.common.source, &opts)?;
    let interval = Duration::from_millis(args.interval);
    let sampler = Sampler::start(sources, SamplerConfig::every(interval))?;
    let iv = sampler.measure(Duration::from_secs_f64(args.duration))?;
    sampler.stop();
    if args.common.json {
        let mut v = serde_json::to_value(&iv).map_err(|e| PowerError::Config(e.to_string()))?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("mode".into(), serde_json::Value::from(title));
            obj.insert("interval_ms".into(), serde_json::Value::from(args.interval));
        }
        println!("{v}");
    } else {
        print!("{}", format_interval(&iv, title));
    }
    Ok(())
}

fn list(args: &CommonArgs) -> Result<(), PowerError> {
    let rows = list_sources(&args.options());
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&rows).map_err(|e| PowerError::Config(e.to_string()))?
        );
    } else {
        print!("{}", format_list(&rows));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Cmd::Sample(a) => sample(a, "sample"),
        Cmd::Baseline(a) => sample(a, "idle baseline"),
        Cmd::List(a) => list(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vnb-power: error: {e}");
            ExitCode::FAILURE
        }
    }
}
