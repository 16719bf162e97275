//! The CPU-time ESTIMATE: its arithmetic against a scripted /proc/stat, and its labelling.

mod common;

use std::time::{Duration, Instant};

use common::*;
use power::estimate::{clock_ticks_per_second, CpuEstimate};
use power::report::format_interval;
use power::sampler::{SamplerConfig, SamplerCore};
use power::{EnergySource, EstimateModel, Kind, Platform};

/// A /proc/stat with 4 CPUs whose aggregate line is
/// `[user, nice, system, idle, iowait, irq, softirq, steal, guest]`.
fn stat(f: [u64; 9]) -> String {
    let [user, nice, system, idle, iowait, irq, softirq, steal, guest] = f;
    format!(
        "cpu  {user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} {guest} 0\n\
         cpu0 0 0 0 0 0 0 0 0 0 0\ncpu1 0 0 0 0 0 0 0 0 0 0\ncpu2 0 0 0 0 0 0 0 0 0 0\n\
         cpu3 0 0 0 0 0 0 0 0 0 0\nintr 1\nctxt 2\n"
    )
}

#[test]
fn estimate_arithmetic_from_proc_stat() {
    let t = TempDir::new("est");
    write_atomic(
        &t.join("stat"),
        &stat([1000, 10, 500, 90_000, 100, 20, 30, 0, 0]),
    );
    let model = EstimateModel {
        idle_watts: 30.0,
        watts_per_busy_core: 7.5,
    };
    let mut e = CpuEstimate::open(&Platform::host().with_proc_root(t.path()), model).unwrap();
    assert_eq!(e.kind(), Kind::Estimate);
    assert_eq!(e.base_watts_hint(), Some(30.0));
    assert!(e.description().starts_with("ESTIMATE"));
    assert!(
        e.description().contains("4 logical CPUs"),
        "{}",
        e.description()
    );
    let t0 = Instant::now();
    assert_eq!(e.read(t0).unwrap(), vec![0.0]);
    // +250 busy ticks (user 200 of which guest 50, system 40, irq 5, softirq 5); idle, iowait and
    // steal do not count, and guest is not added a second time.
    write_atomic(
        &t.join("stat"),
        &stat([1200, 10, 540, 90_150, 130, 25, 35, 100, 50]),
    );
    let hz = clock_ticks_per_second();
    let v = e.read(t0 + Duration::from_secs(2)).unwrap();
    let expect = 30.0 * 2.0 + 7.5 * 250.0 / hz;
    assert!((v[0] - expect).abs() < 1e-9, "{} vs {expect}", v[0]);
}

#[test]
fn estimate_is_labelled_in_intervals_and_text() {
    let t = TempDir::new("est-label");
    write_atomic(&t.join("stat"), &stat([0, 0, 0, 100, 0, 0, 0, 0, 0]));
    let e = CpuEstimate::open(
        &Platform::host().with_proc_root(t.path()),
        EstimateModel {
            idle_watts: 12.0,
            watts_per_busy_core: 3.0,
        },
    )
    .unwrap();
    let mut core = SamplerCore::new(
        vec![Box::new(e)],
        SamplerConfig::every(Duration::from_millis(100)),
    )
    .unwrap();
    let t0 = Instant::now();
    let a = core.mark(t0).unwrap();
    // 4 s with 2 cores busy the whole time: 4 s * 2 cores * hz ticks.
    let hz = clock_ticks_per_second() as u64;
    write_atomic(
        &t.join("stat"),
        &stat([8 * hz, 0, 0, 100 + 8 * hz, 0, 0, 0, 0, 0]),
    );
    let b = core.mark(t0 + Duration::from_secs(4)).unwrap();
    let iv = core.between(&a, &b);
    assert_eq!(iv.kind, Kind::Estimate);
    let s = iv.primary().unwrap();
    assert_eq!(s.kind, Kind::Estimate);
    assert!((s.total_joules - (12.0 * 4.0 + 3.0 * 8.0)).abs() < 1e-9);
    assert!((s.mean_watts - 18.0).abs() < 1e-9);
    let json = serde_json::to_value(&iv).unwrap();
    assert_eq!(json["kind"], "estimate");
    assert_eq!(json["sources"][0]["kind"], "estimate");
    assert_eq!(json["sources"][0]["domains"][0]["kind"], "estimate");
    let text = format_interval(&iv, "sample");
    let numbered: Vec<&str> = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("cpu-estimate ") || l.starts_with("total ")
        })
        .collect();
    assert_eq!(numbered.len(), 2, "{text}");
    for line in numbered {
        assert!(line.contains("ESTIMATE"), "unlabelled line: {line}");
    }
    assert!(text.starts_with("ESTIMATE"), "{text}");
}

#[test]
fn invalid_model_is_rejected() {
    let err = CpuEstimate::open(
        &Platform::host(),
        EstimateModel {
            idle_watts: f64::INFINITY,
            watts_per_busy_core: 1.0,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("idle watts"), "{err}");
}
