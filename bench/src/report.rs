//! Writing a campaign out: `results.json` (everything), `results.csv` (one row per run) and
//! `report.md` (per workload, each configuration's mean ± stddev, min/median/max and the change
//! against `off`, in the shape of the paper's tables).

use std::fmt::Write as _;
use std::path::Path;

use crate::error::{BenchError, Result};
use crate::figures::{metrics, summary, Metric};
use crate::model::{Campaign, RunResult};
use crate::{adaptation, pareto};

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The CSV of every run.
pub fn csv(c: &Campaign) -> String {
    let cols = [
        "config",
        "workload",
        "rep",
        "seconds",
        "throughput_mbps",
        "requests_per_s",
        "rtt_p50_ms",
        "rtt_p99_ms",
        "guest_irqs_per_s",
        "irqs_per_packet",
        "kicks_per_s",
        "kicks_per_packet",
        "guest_packets",
        "backend_cpu_s",
        "qemu_cpu_s",
        "backend_ctx_switches",
        "qemu_ctx_switches",
        "joules",
        "watts",
        "joules_per_gb",
        "energy_kind",
        "domains",
        "error",
    ];
    let mut out = cols.join(",");
    out.push('\n');
    for r in &c.runs {
        let v = serde_json::to_value(r).unwrap_or_default();
        let row: Vec<String> = cols
            .iter()
            .map(|k| match &v[*k] {
                // Per-domain energy as one field: `name=joules J;…`.
                _ if *k == "domains" => format!(
                    "\"{}\"",
                    r.domains
                        .iter()
                        .map(|d| format!("{}={:.3} J", d.name, d.joules))
                        .collect::<Vec<_>>()
                        .join(";")
                ),
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => format!("\"{}\"", s.replace('"', "\"\"")),
                other => other.to_string(),
            })
            .collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

/// The Markdown report.
pub fn markdown(c: &Campaign) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# vnb-bench report\n");
    if c.interrupted {
        let _ = writeln!(
            o,
            "**Interrupted**: this campaign was stopped early; only the {} runs finished before are reported.\n",
            c.runs.len()
        );
    }
    let _ = writeln!(o, "Rerun with:\n\n```\n{}\n```\n", c.command);
    let m = &c.machine;
    let _ = writeln!(
        o,
        "Machine: {}; host kernel {}; {}; guest kernel {}; {}.\n\nPower: {}. {} repetition(s) of {} s per workload; one freshly booted guest per configuration and repetition.\n",
        m.cpu, m.kernel, m.qemu, m.guest_kernel, m.vnb, m.power, c.reps, c.duration_s
    );
    if m.power.contains("estimate") {
        let _ = writeln!(
            o,
            "**Energy figures are an ESTIMATE** (a CPU-time model, no RAPL or wall meter on this machine), not a measurement.\n"
        );
    }
    let failed: Vec<&RunResult> = c.runs.iter().filter(|r| r.error.is_some()).collect();
    let mut noisy = Vec::new();
    let mut workloads = vec!["idle".to_string()];
    workloads.extend(c.workloads.iter().cloned());
    for w in &workloads {
        if !c.runs.iter().any(|r| &r.workload == w) {
            continue;
        }
        let _ = writeln!(o, "## {w}\n");
        let cols: Vec<Metric> = metrics()
            .into_iter()
            .filter(|mt| c.configs.iter().any(|cf| summary(c, cf, w, mt).is_some()))
            .collect();
        let _ = write!(o, "| configuration |");
        for mt in &cols {
            let _ = write!(o, " {} |", mt.title);
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "|---|{}", "---|".repeat(cols.len()));
        for cf in &c.configs {
            let _ = write!(o, "| {cf} |");
            for mt in &cols {
                match summary(c, cf, w, mt) {
                    Some(s) => {
                        let base = summary(c, "off", w, mt).map(|b| b.mean);
                        let delta = match base {
                            Some(b) if cf != "off" && b != 0.0 => {
                                format!(" ({:+.1} %)", (s.mean / b - 1.0) * 100.0)
                            }
                            _ => String::new(),
                        };
                        let spread = if s.n > 1 {
                            format!(
                                " ± {} [{}/{}/{}]",
                                fmt_num(s.stddev),
                                fmt_num(s.min),
                                fmt_num(s.median),
                                fmt_num(s.max)
                            )
                        } else {
                            String::new()
                        };
                        if s.n > 1 && s.cv() > 0.1 {
                            noisy.push(format!(
                                "{w} / {cf} / {}: cv {:.0} %",
                                mt.title,
                                s.cv() * 100.0
                            ));
                        }
                        let _ = write!(o, " {}{spread}{delta} |", fmt_num(s.mean));
                    }
                    None => {
                        let _ = write!(o, " – |");
                    }
                }
            }
            let _ = writeln!(o);
        }
        let _ = writeln!(o);
    }
    let _ = writeln!(
        o,
        "Cells: mean ± stddev [min/median/max] over repetitions, and the change against `off` in parentheses.\n"
    );
    trade_off(&mut o, c);
    adaptation(&mut o, c);
    let charts = crate::charts::planned(c);
    if !charts.is_empty() {
        let _ = writeln!(
            o,
            "## Charts\n\nIn `charts/`, as SVG and PNG (bars: mean, whiskers: ± stddev).\n"
        );
        for chart in &charts {
            let base = chart.base();
            let _ = writeln!(o, "![{base}](charts/{base}.png)");
        }
        let _ = writeln!(o);
    }
    let _ = writeln!(o, "## Noise\n");
    if noisy.is_empty() {
        let _ = writeln!(
            o,
            "No figure varied by more than 10 % between repetitions.\n"
        );
    } else {
        let _ = writeln!(o, "Figures that varied by more than 10 % (coefficient of variation) between repetitions:\n");
        for n in &noisy {
            let _ = writeln!(o, "- {n}");
        }
        let _ = writeln!(o);
    }
    if !failed.is_empty() {
        let _ = writeln!(o, "## Failed runs\n");
        for r in failed {
            let _ = writeln!(
                o,
                "- {} / {} / rep {}: {}",
                r.config,
                r.workload,
                r.rep,
                r.error.as_deref().unwrap_or("")
            );
        }
    }
    o
}

/// The configuration the trade-off section judges: adaptive at the default budget, default rule.
pub const DEFAULT_CONFIG: &str = "adaptive:500";

/// Per workload, the energy-latency points of every configuration, their Pareto fronts and
/// whether any configuration dominates [`DEFAULT_CONFIG`].
fn trade_off(o: &mut String, c: &Campaign) {
    let workloads: Vec<&String> = c
        .workloads
        .iter()
        .filter(|w| !pareto::points(c, w, pareto::VIEWS[0]).is_empty())
        .collect();
    if workloads.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "## Energy-latency trade-off\n\n\
         One point per configuration: medians over repetitions of the cost per GB the guest's \
         NIC moved (backend + QEMU CPU seconds; joules) and of the RTT of an echo at 100/s \
         running alongside the workload. A point is on the front (✓) when no other is at least \
         as good on both axes and better on one. Charts: `charts/pareto-*`.\n"
    );
    for w in workloads {
        let _ = writeln!(o, "### {w}\n");
        let views: Vec<Vec<pareto::Point>> = pareto::VIEWS
            .iter()
            .map(|v| pareto::points(c, w, *v))
            .collect();
        let _ = writeln!(
            o,
            "| configuration | RTT p50 ms | RTT p99 ms | CPU-s/GB | J/GB | front (CPU-s/GB, p99) | front (J/GB, p50) |\n|---|---|---|---|---|---|---|"
        );
        for cf in &c.configs {
            let find = |v: usize| views[v].iter().find(|p| &p.config == cf);
            let (Some(a), b) = (find(0), find(1)) else {
                continue;
            };
            let mark = |p: Option<&pareto::Point>| match p {
                Some(p) if p.on_front => "✓",
                Some(_) => "",
                None => "–",
            };
            let _ = writeln!(
                o,
                "| {cf} | {} | {} | {} | {} | {} | {} |",
                b.map_or("–".into(), |b| fmt_num(b.rtt)),
                fmt_num(a.rtt),
                fmt_num(a.cost),
                b.map_or("–".into(), |b| fmt_num(b.cost)),
                mark(Some(a)),
                mark(b)
            );
        }
        let _ = writeln!(o);
        for (v, pts) in pareto::VIEWS.iter().zip(&views) {
            if !pts.iter().any(|p| p.config == DEFAULT_CONFIG) {
                continue;
            }
            let d = pareto::dominators(pts, DEFAULT_CONFIG);
            if d.is_empty() {
                let _ = writeln!(
                    o,
                    "- ({}, {}): `{DEFAULT_CONFIG}` is on the front.",
                    v.0, v.1
                );
            } else {
                let who: Vec<String> = d
                    .iter()
                    .map(|(p, dc, dr)| {
                        format!(
                            "`{}` ({:.0} % cheaper, {} ms lower)",
                            p.config,
                            dc * 100.0,
                            fmt_num(*dr)
                        )
                    })
                    .collect();
                let _ = writeln!(
                    o,
                    "- ({}, {}): `{DEFAULT_CONFIG}` is dominated by {}.",
                    v.0,
                    v.1,
                    who.join(", ")
                );
            }
        }
        let _ = writeln!(o);
    }
}

/// Per `mix` run of ours, how the policy followed each phase.
fn adaptation(o: &mut String, c: &Campaign) {
    let runs: Vec<&RunResult> = c
        .runs
        .iter()
        .filter(|r| r.workload == "mix" && !r.series.is_empty() && r.error.is_none())
        .collect();
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "## Adaptation (mix)\n\n\
         Per phase: the share of packets the guest sent (backend counters), `p*` when the phase \
         began, the time `p*` took to cover 90 % of the way to that share once the phase's \
         traffic flowed (at half its median packet rate; – when the phase asked \
         for less than {:.1} of a move, ✗ when it did not get there within the phase), the \
         policy's delay half way (from the sample where the traffic's share got half way), \
         the tracking error (mean distance between `p*` and the share of the last {} samples' \
         packets, from {:.0} s after the traffic flowed), and the mean distance between `p*` \
         and the phase's share. Chart: `charts/mix-policy.png`.\n",
        adaptation::MIN_STEP,
        adaptation::TRACK_WINDOW,
        adaptation::TRACK_AFTER_S
    );
    let _ = writeln!(
        o,
        "| configuration | rep | phase | start s | share | p* at start | 90 % rise s | delay s | tracking error | mean error |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in &runs {
        for f in adaptation::fit(r) {
            let rise = match (f.step, f.rise_s) {
                (false, _) => "–".to_string(),
                (true, None) => "✗".to_string(),
                (true, Some(t)) => format!("{t:.1}"),
            };
            let delay = match (f.step, f.delay_s) {
                (false, _) => "–".to_string(),
                (true, None) => "✗".to_string(),
                (true, Some(t)) => format!("{t:.1}"),
            };
            let tracking = f
                .tracking_error
                .map_or("–".to_string(), |e| format!("{e:.3}"));
            let _ = writeln!(
                o,
                "| {} | {} | {} | {:.1} | {:.2} | {:.2} | {rise} | {delay} | {tracking} | {:.2} |",
                r.config, r.rep, f.name, f.start_s, f.share, f.p_start, f.mean_error
            );
        }
    }
    let _ = writeln!(o);
    for cf in &c.configs {
        let fits: Vec<adaptation::PhaseFit> = runs
            .iter()
            .filter(|r| &r.config == cf)
            .flat_map(|r| adaptation::fit(r))
            .filter(|f| f.step)
            .collect();
        if fits.is_empty() {
            continue;
        }
        let reached: Vec<f64> = fits.iter().filter_map(|f| f.rise_s).collect();
        let delays: Vec<f64> = fits.iter().filter_map(|f| f.delay_s).collect();
        let tracking: Vec<f64> = fits.iter().filter_map(|f| f.tracking_error).collect();
        let _ = writeln!(
            o,
            "- `{cf}`: {} of {} direction changes reached 90 % within their phase{}; {} got half way{}; tracking error {}; mean distance to the traffic's share {:.2}.",
            reached.len(),
            fits.len(),
            crate::stats::percentile(&reached, 50.0)
                .map_or(String::new(), |m| format!(", median rise {m:.1} s")),
            delays.len(),
            crate::stats::percentile(&delays, 50.0)
                .map_or(String::new(), |m| format!(", median delay {m:.1} s")),
            crate::stats::percentile(&tracking, 50.0)
                .map_or("–".to_string(), |m| format!("median {m:.3}")),
            fits.iter().map(|f| f.mean_error).sum::<f64>() / fits.len() as f64
        );
    }
    let _ = writeln!(o);
}

/// Writes `results.json`, `results.csv` and `report.md` into `dir`.
pub fn write_all(c: &Campaign, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(BenchError::file(dir))?;
    let w = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).map_err(BenchError::file(dir.join(name)))
    };
    w(
        "results.json",
        serde_json::to_string_pretty(c).expect("a campaign serializes"),
    )?;
    w("results.csv", csv(c))?;
    w("report.md", markdown(c))?;
    crate::charts::write_charts(c, dir)?;
    Ok(())
}

/// Reads `results.json` from `dir`.
pub fn load(dir: &Path) -> Result<Campaign> {
    let p = dir.join("results.json");
    let text = std::fs::read_to_string(&p).map_err(BenchError::file(&p))?;
    serde_json::from_str(&text).map_err(|e| BenchError::Parse {
        path: p,
        msg: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(config: &str, workload: &str, rep: u32, mbps: f64, irq: f64) -> RunResult {
        RunResult {
            config: config.into(),
            workload: workload.into(),
            rep,
            seconds: 2.0,
            throughput_mbps: Some(mbps),
            guest_irqs_per_s: irq,
            qemu_cpu_s: 1.0,
            energy_kind: "estimate".into(),
            ..Default::default()
        }
    }

    fn campaign() -> Campaign {
        Campaign {
            command: "vnb-bench run --modes off,adaptive:500".into(),
            machine: crate::model::Machine {
                power: "estimate (estimate)".into(),
                ..Default::default()
            },
            configs: vec!["off".into(), "adaptive:500".into()],
            workloads: vec!["iperf-rx".into()],
            reps: 2,
            duration_s: 2,
            interrupted: false,
            runs: vec![
                run("off", "iperf-rx", 1, 1000.0, 8000.0),
                run("off", "iperf-rx", 2, 1100.0, 8200.0),
                run("adaptive:500", "iperf-rx", 1, 1050.0, 1000.0),
                run("adaptive:500", "iperf-rx", 2, 1050.0, 1000.0),
                RunResult {
                    error: Some("iperf3: boom".into()),
                    ..run("adaptive:500", "iperf-rx", 3, 0.0, 0.0)
                },
            ],
        }
    }

    #[test]
    fn markdown_tables_changes_and_failures() {
        let md = markdown(&campaign());
        assert!(md.contains("vnb-bench run --modes off,adaptive:500"));
        assert!(md.contains("## iperf-rx"));
        assert!(
            md.contains("| off | 1050 ± 70.7 [1000/1050/1100] | 8100 ± 141.4"),
            "{md}"
        );
        assert!(md.contains("| adaptive:500 | 1050 ± 0.000 [1050/1050/1050] (+0.0 %) | 1000 ± 0.000 [1000/1000/1000] (-87.7 %)"), "{md}");
        // Workloads without runs get no table.
        assert!(!md.contains("## idle"));
        assert!(md.contains("ESTIMATE"));
        assert!(md.contains("adaptive:500 / iperf-rx / rep 3: iperf3: boom"));
        // The failed run is not in the means.
        assert!(!md.contains("700.0"));
    }

    #[test]
    fn csv_has_a_row_per_run_and_json_round_trips() {
        let c = campaign();
        let text = csv(&c);
        assert_eq!(text.lines().count(), 1 + c.runs.len());
        assert!(text
            .lines()
            .next()
            .unwrap()
            .starts_with("config,workload,rep"));
        assert!(text.contains("\"adaptive:500\",\"iperf-rx\",3"));
        let dir = std::env::temp_dir().join(format!("vnb-report-{}", std::process::id()));
        write_all(&c, &dir).unwrap();
        assert_eq!(load(&dir).unwrap(), c);
        assert!(dir.join("report.md").exists());
        for f in ["iperf-rx-throughput-Mb-s", "iperf-rx-guest-irq-s"] {
            for ext in ["svg", "png"] {
                let p = dir.join(format!("charts/{f}.{ext}"));
                let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                assert!(len > 1000, "{} missing or empty", p.display());
            }
        }
        let svg = std::fs::read_to_string(dir.join("charts/iperf-rx-throughput-Mb-s.svg")).unwrap();
        assert!(svg.contains("adaptive:500") && svg.contains("iperf-rx: throughput Mb/s"));
        assert!(markdown(&c)
            .contains("![iperf-rx-throughput-Mb-s](charts/iperf-rx-throughput-Mb-s.png)"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
