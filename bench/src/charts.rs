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
use crate::figures::{metrics, summary, Metric};
use crate::model::{Campaign, RunResult};

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

/// The metrics charted per workload.
pub const CHARTED: [&str; 3] = ["throughput Mb/s", "watts", "guest irq/s"];

/// The charts a campaign gets: `(file base name, workload, metric title)`; the scatter has an
/// empty workload.
pub fn planned(c: &Campaign) -> Vec<(String, String, &'static str)> {
    let mut v = Vec::new();
    for w in &c.workloads {
        for m in metrics().into_iter().filter(|m| CHARTED.contains(&m.title)) {
            if c.configs.iter().any(|cf| summary(c, cf, w, &m).is_some()) {
                v.push((format!("{}-{}", slug(w), slug(m.title)), w.clone(), m.title));
            }
        }
    }
    if c.runs
        .iter()
        .any(|r| r.workload == "rr" && r.rtt_p99_ms.is_some() && r.joules.is_some())
    {
        v.push(("rr-latency-vs-energy".into(), String::new(), ""));
    }
    v
}

/// Draws every chart into `dir/charts/` as SVG and PNG; returns the files written.
pub fn write_charts(c: &Campaign, dir: &Path) -> Result<Vec<PathBuf>> {
    register_font()?;
    let out = dir.join("charts");
    std::fs::create_dir_all(&out).map_err(BenchError::file(&out))?;
    let mut files = Vec::new();
    for (base, w, title) in planned(c) {
        let svg = out.join(format!("{base}.svg"));
        let png = out.join(format!("{base}.png"));
        if w.is_empty() {
            scatter(SVGBackend::new(&svg, (900, 560)).into_drawing_area(), c)?;
            scatter(BitMapBackend::new(&png, (900, 560)).into_drawing_area(), c)?;
        } else {
            let m = metrics()
                .into_iter()
                .find(|m| m.title == title)
                .expect("a charted metric");
            bars(
                SVGBackend::new(&svg, (1200, 520)).into_drawing_area(),
                c,
                &w,
                &m,
            )?;
            bars(
                BitMapBackend::new(&png, (1200, 520)).into_drawing_area(),
                c,
                &w,
                &m,
            )?;
        }
        files.push(svg);
        files.push(png);
    }
    Ok(files)
}
