//! Plain-text rendering of intervals and source lists (JSON is the types' `Serialize`).
//!
//! Estimated numbers carry the word ESTIMATE on every line that shows them.

use std::fmt::Write as _;

use crate::registry::Availability;
use crate::sampler::Interval;
use crate::source::Kind;

fn tag(kind: Kind) -> &'static str {
    match kind {
        Kind::Estimate => "  ESTIMATE",
        Kind::Measurement => "",
    }
}

/// Render an interval as a table per source. `title` heads it (e.g. `sample` or `idle baseline`).
pub fn format_interval(iv: &Interval, title: &str) -> String {
    let mut s = String::new();
    if iv.kind == Kind::Estimate {
        let _ = writeln!(
            s,
            "ESTIMATE: the headline numbers come from a CPU-time model, not a measurement"
        );
    }
    let _ = writeln!(s, "{title}: {:.3} s, {} reads", iv.duration_s, iv.reads);
    for src in &iv.sources {
        let label = match src.kind {
            Kind::Estimate => "ESTIMATE",
            Kind::Measurement => "measurement",
        };
        let _ = writeln!(s, "source {} ({label}): {}", src.source, src.description);
        let _ = writeln!(
            s,
            "  {:<28} {:>14} {:>11}  in total",
            "domain", "joules", "mean W"
        );
        for d in &src.domains {
            let _ = writeln!(
                s,
                "  {:<28} {:>14.6} {:>11.3}  {:<8}{}",
                d.domain,
                d.joules,
                d.mean_watts,
                if d.in_total { "yes" } else { "no" },
                tag(d.kind)
            );
        }
        let _ = writeln!(
            s,
            "  {:<28} {:>14.6} {:>11.3}  {:<8}{}",
            "total",
            src.total_joules,
            src.mean_watts,
            "",
            tag(src.kind)
        );
    }
    for w in &iv.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    s
}

/// Render `vnb-power list`: one line per source — name, usable yes/no, reason.
pub fn format_list(rows: &[Availability]) -> String {
    let mut s = String::new();
    for r in rows {
        let _ = writeln!(
            s,
            "{:<9} {:<3} {}",
            r.source.as_str(),
            if r.usable { "yes" } else { "no" },
            r.reason
        );
    }
    s
}
