//! The energy-latency trade-off of a campaign: per workload, one point per configuration (the
//! medians over repetitions of a cost per GB and of the RTT under load), which points are on
//! the Pareto front, and which configurations dominate a given one.
//!
//! A point dominates another when it is no worse on both axes and better on at least one. The
//! medians of three noisy repetitions can order two close points either way, so every verdict
//! carries the margins it rests on.

use serde::Serialize;

use crate::figures::{metric, summary};
use crate::model::Campaign;

/// The two views of the trade-off: measured CPU time against the tail, and the (estimated or
/// measured) energy against the median RTT.
pub const VIEWS: [(&str, &str); 2] = [("CPU-s/GB", "RTT p99 ms"), ("J/GB", "RTT p50 ms")];

/// One configuration's point.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// The configuration.
    pub config: String,
    /// Median cost per GB.
    pub cost: f64,
    /// Median RTT under load, ms.
    pub rtt: f64,
    /// Smallest and largest cost over the repetitions.
    pub cost_range: (f64, f64),
    /// Smallest and largest RTT over the repetitions.
    pub rtt_range: (f64, f64),
    /// Whether no other point dominates it.
    pub on_front: bool,
}

impl Point {
    /// Whether `self` dominates `o`: no worse on both axes, better on one.
    pub fn dominates(&self, o: &Point) -> bool {
        self.cost <= o.cost && self.rtt <= o.rtt && (self.cost < o.cost || self.rtt < o.rtt)
    }
}

/// The points of `workload` in the view `(cost metric, RTT metric)`, fronts marked; configs
/// without both figures are left out.
pub fn points(c: &Campaign, workload: &str, view: (&str, &str)) -> Vec<Point> {
    let (cost_m, rtt_m) = (metric(view.0), metric(view.1));
    let mut pts: Vec<Point> = c
        .configs
        .iter()
        .filter_map(|cf| {
            let cost = summary(c, cf, workload, &cost_m)?;
            let rtt = summary(c, cf, workload, &rtt_m)?;
            Some(Point {
                config: cf.clone(),
                cost: cost.median,
                rtt: rtt.median,
                cost_range: (cost.min, cost.max),
                rtt_range: (rtt.min, rtt.max),
                on_front: true,
            })
        })
        .collect();
    let snapshot = pts.clone();
    for p in &mut pts {
        p.on_front = !snapshot.iter().any(|o| o.dominates(p));
    }
    pts
}

/// The configurations whose points dominate `config`'s, each with how much cheaper (share of
/// the cost) and how much lower its RTT (ms) it is.
pub fn dominators<'a>(pts: &'a [Point], config: &str) -> Vec<(&'a Point, f64, f64)> {
    let Some(me) = pts.iter().find(|p| p.config == config) else {
        return Vec::new();
    };
    pts.iter()
        .filter(|o| o.dominates(me))
        .map(|o| (o, 1.0 - o.cost / me.cost, me.rtt - o.rtt))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RunResult;

    fn run(config: &str, rep: u32, cpu_gb: f64, p99: f64) -> RunResult {
        RunResult {
            config: config.into(),
            workload: "w".into(),
            rep,
            cpu_s_per_gb: Some(cpu_gb),
            rtt_p99_ms: Some(p99),
            ..Default::default()
        }
    }

    #[test]
    fn fronts_and_dominators_follow_the_medians() {
        let runs = vec![
            run("off", 1, 10.0, 1.0),
            run("off", 2, 12.0, 1.2),
            run("off", 3, 11.0, 0.9),
            // Cheaper, slower: on the front.
            run("adaptive:500", 1, 8.0, 2.0),
            run("adaptive:500", 2, 7.0, 2.2),
            run("adaptive:500", 3, 9.0, 1.8),
            // Cheaper and faster than adaptive:500 by its medians: dominates it.
            run("fixed:250", 1, 6.0, 1.5),
            run("fixed:250", 2, 6.5, 1.6),
            run("fixed:250", 3, 30.0, 1.4),
            // No latency figure: left out.
            RunResult {
                config: "qemu-tap".into(),
                workload: "w".into(),
                cpu_s_per_gb: Some(1.0),
                ..Default::default()
            },
        ];
        let c = Campaign {
            configs: ["off", "adaptive:500", "fixed:250", "qemu-tap"]
                .map(String::from)
                .to_vec(),
            runs,
            ..Default::default()
        };
        let pts = points(&c, "w", VIEWS[0]);
        assert_eq!(pts.len(), 3);
        let get = |n: &str| pts.iter().find(|p| p.config == n).unwrap();
        assert_eq!((get("off").cost, get("off").rtt), (11.0, 1.0));
        assert_eq!(get("fixed:250").cost_range, (6.0, 30.0));
        assert!(get("off").on_front && get("fixed:250").on_front);
        assert!(!get("adaptive:500").on_front);
        let d = dominators(&pts, "adaptive:500");
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0.config, "fixed:250");
        assert!((d[0].1 - (1.0 - 6.5 / 8.0)).abs() < 1e-9);
        assert!((d[0].2 - 0.5).abs() < 1e-9);
        assert!(dominators(&pts, "off").is_empty());
        assert!(dominators(&pts, "nope").is_empty());
    }
}
