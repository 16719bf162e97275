//! Charts of a campaign, as SVG and PNG: per workload, bar charts with error bars (mean ±
//! stddev over repetitions) of throughput, watts and guest interrupts per second, one bar per
//! configuration; and a latency-vs-energy scatter of the `rr` runs.
//!
//! Text is drawn with DejaVu Sans (Debian's `fonts-dejavu-core`), registered with plotters'
//! `ab_glyph` font backend, so no fontconfig is needed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::error::{BenchError, Result};
use crate::figures::{self, metrics, summary, Metric};
use crate::model::{Campaign, RunResult};
use crate::pareto;

/// Where the font is looked for.
pub const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let done = DONE.get_or_init(|| {
        let bytes = FONT_PATHS
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or_else(|| {
                format!(
                    "no DejaVu Sans font at {}: install fonts-dejavu-core (ci/setup.sh does)",
                    FONT_PATHS.join(" or ")
                )
            })?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "the DejaVu Sans font could not be loaded".to_string())
    });
    done.clone().map_err(|msg| BenchError::Chart {
        name: "font".into(),
        msg,
    })
}

/// Maps a drawing error of chart `name`.
fn chart_err(name: &str) -> impl Fn(&dyn std::fmt::Display) -> BenchError + '_ {
    move |e| BenchError::Chart {
        name: name.to_string(),
        msg: e.to_string(),
    }
}

/// What energy charts say when the campaign's energy is the CPU-time estimate, not a meter.
fn estimate_tag(c: &Campaign) -> &'static str {
    if c.machine.power.contains("estimate") {
        " — ESTIMATE (CPU-time model, not measured)"
    } else {
        ""
    }
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .trim_matches('-')
        .to_string()
}

fn bars<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    c: &Campaign,
    workload: &str,
    m: &Metric,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = chart_err(workload);
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let rows: Vec<(String, f64, f64)> = c
        .configs
        .iter()
        .filter_map(|cf| summary(c, cf, workload, m).map(|s| (cf.clone(), s.mean, s.stddev)))
        .collect();
    let ymax = rows
        .iter()
        .map(|r| r.1 + r.2)
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.15;
    let n = rows.len() as u32;
    let energy = m.title.contains("watts") || m.title.contains("joules") || m.title.contains("J/");
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{workload}: {}{}",
                m.title,
                if energy { estimate_tag(c) } else { "" }
            ),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(70)
        .build_cartesian_2d((0..n.saturating_sub(1)).into_segmented(), 0f64..ymax)
        .map_err(|e| err(&e))?;
    let names: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(m.title)
        .y_label_formatter(&|v| {
            if ymax > 20.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
        .x_labels(rows.len().max(1))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_style(("sans-serif", 11))
        .y_label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(
            Histogram::vertical(&chart)
                .style(BLUE.mix(0.6).filled())
                .margin(8)
                .data(rows.iter().enumerate().map(|(i, r)| (i as u32, r.1))),
        )
        .map_err(|e| err(&e))?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            ErrorBar::new_vertical(
                SegmentValue::CenterOf(i as u32),
                (r.1 - r.2).max(0.0),
                r.1,
                r.1 + r.2,
                BLACK.stroke_width(2),
                12,
            )
        }))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn scatter<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    c: &Campaign,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = chart_err("rr-latency-vs-energy");
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let pts: Vec<(&RunResult, f64, f64)> = c
        .runs
        .iter()
        .filter(|r| r.workload == "rr" && r.error.is_none())
        .filter_map(|r| Some((r, r.rtt_p99_ms?, r.joules?)))
        .collect();
    let xmax = pts.iter().map(|p| p.2).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let xmin = pts.iter().map(|p| p.2).fold(f64::MAX, f64::min).min(xmax) * 0.9;
    let ymax = pts.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-9) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("rr: p99 RTT against energy per run{}", estimate_tag(c)),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(xmin..xmax, 0f64..ymax)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(if estimate_tag(c).is_empty() {
            "joules per run"
        } else {
            "joules per run (estimated from CPU time)"
        })
        .y_desc("p99 RTT (ms)")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| err(&e))?;
    for (k, cf) in c.configs.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(
                pts.iter()
                    .filter(|p| &p.0.config == cf)
                    .map(|p| Circle::new((p.2, p.1), 5, color.filled())),
            )
            .map_err(|e| err(&e))?
            .label(cf.clone())
            .legend(move |(x, y)| Circle::new((x, y), 5, color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Draws one configuration's point per workload: cost per GB against the RTT under load,
/// whiskers from the smallest to the largest repetition, the Pareto front joined by a line.
fn pareto_chart<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    c: &Campaign,
    workload: &str,
    view: (&str, &str),
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let name = format!("pareto-{workload}");
    let err = chart_err(&name);
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let pts = pareto::points(c, workload, view);
    // Room on the right for the last point's label.
    let xmax = pts
        .iter()
        .map(|p| p.rtt_range.1)
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.3;
    let ymax = pts
        .iter()
        .map(|p| p.cost_range.1)
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let energy = view.0.starts_with('J');
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{workload}: {} against {} under load{}",
                view.0,
                view.1,
                if energy { estimate_tag(c) } else { "" }
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(format!("{view_x} (lower is better)", view_x = view.1))
        .y_desc(format!("{} (lower is better)", view.0))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| err(&e))?;
    let mut front: Vec<&pareto::Point> = pts.iter().filter(|p| p.on_front).collect();
    front.sort_by(|a, b| a.rtt.total_cmp(&b.rtt));
    chart
        .draw_series(LineSeries::new(
            front.iter().map(|p| (p.rtt, p.cost)),
            BLACK.mix(0.4).stroke_width(2),
        ))
        .map_err(|e| err(&e))?;
    for (k, p) in pts.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series([ErrorBar::new_vertical(
                p.rtt,
                p.cost_range.0,
                p.cost,
                p.cost_range.1,
                color.stroke_width(1),
                6,
            )])
            .map_err(|e| err(&e))?;
        chart
            .draw_series([ErrorBar::new_horizontal(
                p.cost,
                p.rtt_range.0,
                p.rtt,
                p.rtt_range.1,
                color.stroke_width(1),
                6,
            )])
            .map_err(|e| err(&e))?;
        let size = if p.on_front { 7 } else { 4 };
        chart
            .draw_series([Circle::new((p.rtt, p.cost), size, color.filled())])
            .map_err(|e| err(&e))?
            .label(format!(
                "{}{}",
                p.config,
                if p.on_front { " (front)" } else { "" }
            ))
            .legend(move |(x, y)| Circle::new((x, y), 5, color.filled()));
        chart
            .draw_series([Text::new(
                p.config.clone(),
                (p.rtt, p.cost),
                ("sans-serif", 11).into_font().color(&color),
            )])
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The first `mix` run of each configuration of ours: p*, the delays in effect and the
/// notifications per second over time, phases shaded.
fn mix_policy<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    c: &Campaign,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = chart_err("mix-policy");
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let runs: Vec<&RunResult> = c
        .configs
        .iter()
        .filter_map(|cf| {
            c.runs
                .iter()
                .find(|r| &r.config == cf && r.workload == "mix" && !r.series.is_empty())
        })
        .collect();
    let tmax = runs
        .iter()
        .flat_map(|r| r.series.last().map(|p| p.t_s))
        .fold(1.0f64, f64::max);
    let root = root
        .titled("mix: the policy following the traffic", ("sans-serif", 22))
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((3, 1));
    type Pick = fn(&crate::model::SeriesPoint) -> f64;
    let specs: [(&str, Vec<(&str, Pick)>); 3] = [
        ("p* (send share)", vec![("p*", |p| p.send_ratio)]),
        (
            "delay in effect (µs)",
            vec![
                ("RX", |p| f64::from(p.rx_delay_us)),
                ("TX", |p| f64::from(p.tx_delay_us)),
            ],
        ),
        (
            "per second",
            vec![
                ("interrupts", |p| p.interrupts_per_s),
                ("kicks", |p| p.kicks_per_s),
            ],
        ),
    ];
    for (panel, (title, lines)) in panels.iter().zip(specs) {
        let ymax = runs
            .iter()
            .flat_map(|r| r.series.iter())
            .flat_map(|p| lines.iter().map(move |(_, f)| f(p)))
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..tmax, 0f64..ymax)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(title)
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| err(&e))?;
        if let Some(r) = runs.first() {
            for (i, ph) in r.phases.iter().enumerate() {
                let end = r.phases.get(i + 1).map_or(tmax, |n| n.t_s);
                let shade = match ph.name.as_str() {
                    "send" => RGBColor(255, 235, 205),
                    "receive" => RGBColor(205, 230, 255),
                    _ => RGBColor(225, 245, 225),
                };
                chart
                    .draw_series([Rectangle::new([(ph.t_s, 0.0), (end, ymax)], shade.filled())])
                    .map_err(|e| err(&e))?;
            }
        }
        for (k, r) in runs.iter().enumerate() {
            for (j, (label, f)) in lines.iter().enumerate() {
                let color = Palette99::pick(2 * k + j).to_rgba();
                chart
                    .draw_series(LineSeries::new(
                        r.series.iter().map(|p| (p.t_s, f(p))),
                        color.stroke_width(2),
                    ))
                    .map_err(|e| err(&e))?
                    .label(format!("{} {label}", r.config))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The metrics charted per workload.
pub const CHARTED: [&str; 3] = ["throughput Mb/s", "watts", "guest irq/s"];

/// One chart of a campaign.
#[derive(Debug, Clone, PartialEq)]
pub enum Chart {
    /// A metric per configuration, for one workload.
    Bars {
        /// The workload.
        workload: String,
        /// The metric's title.
        metric: &'static str,
    },
    /// The `rr` runs' p99 RTT against their energy.
    RrScatter,
    /// The energy-latency trade-off of one workload in one view of [`pareto::VIEWS`].
    Pareto {
        /// The workload.
        workload: String,
        /// Index into [`pareto::VIEWS`].
        view: usize,
    },
    /// The policy over time in `mix` runs.
    MixPolicy,
}

impl Chart {
    /// The file base name.
    pub fn base(&self) -> String {
        match self {
            Chart::Bars { workload, metric } => format!("{}-{}", slug(workload), slug(metric)),
            Chart::RrScatter => "rr-latency-vs-energy".into(),
            Chart::Pareto { workload, view } => {
                format!("pareto-{}-{}", slug(workload), slug(pareto::VIEWS[*view].0))
            }
            Chart::MixPolicy => "mix-policy".into(),
        }
    }
}

/// The charts a campaign gets.
pub fn planned(c: &Campaign) -> Vec<Chart> {
    let mut v = Vec::new();
    for w in &c.workloads {
        for m in metrics().into_iter().filter(|m| CHARTED.contains(&m.title)) {
            if c.configs.iter().any(|cf| summary(c, cf, w, &m).is_some()) {
                v.push(Chart::Bars {
                    workload: w.clone(),
                    metric: m.title,
                });
            }
        }
        for view in 0..pareto::VIEWS.len() {
            if !pareto::points(c, w, pareto::VIEWS[view]).is_empty() {
                v.push(Chart::Pareto {
                    workload: w.clone(),
                    view,
                });
            }
        }
    }
    if c.runs
        .iter()
        .any(|r| r.workload == "rr" && r.rtt_p99_ms.is_some() && r.joules.is_some())
    {
        v.push(Chart::RrScatter);
    }
    if c.runs
        .iter()
        .any(|r| r.workload == "mix" && !r.series.is_empty())
    {
        v.push(Chart::MixPolicy);
    }
    v
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    c: &Campaign,
    chart: &Chart,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    match chart {
        Chart::Bars { workload, metric } => bars(root, c, workload, &figures::metric(metric)),
        Chart::RrScatter => scatter(root, c),
        Chart::Pareto { workload, view } => pareto_chart(root, c, workload, pareto::VIEWS[*view]),
        Chart::MixPolicy => mix_policy(root, c),
    }
}

/// Draws every chart into `dir/charts/` as SVG and PNG; returns the files written.
pub fn write_charts(c: &Campaign, dir: &Path) -> Result<Vec<PathBuf>> {
    register_font()?;
    let out = dir.join("charts");
    std::fs::create_dir_all(&out).map_err(BenchError::file(&out))?;
    let mut files = Vec::new();
    for chart in planned(c) {
        let base = chart.base();
        let size = match chart {
            Chart::Bars { .. } => (1200, 520),
            Chart::MixPolicy => (1400, 900),
            _ => (900, 600),
        };
        let svg = out.join(format!("{base}.svg"));
        let png = out.join(format!("{base}.png"));
        draw(SVGBackend::new(&svg, size).into_drawing_area(), c, &chart)?;
        draw(
            BitMapBackend::new(&png, size).into_drawing_area(),
            c,
            &chart,
        )?;
        files.push(svg);
        files.push(png);
    }
    Ok(files)
}
