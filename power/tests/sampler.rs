//! The sampler over scripted sources: exact arithmetic with explicit times, the thread keeping a
//! fast-wrapping counter right, a replayed powercap tree wrapping under a live writer, baselines.

mod common;

use std::collections::VecDeque;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use power::counter::WrapCounter;
use power::rapl::powercap::Powercap;
use power::sampler::{SamplerConfig, SamplerCore};
use power::{DomainInfo, EnergySource, Kind, Platform, PowerError, Sampler};

/// Returns scripted values, one vector per read; an empty vector means "fail this read".
struct Scripted {
    name: &'static str,
    domains: Vec<DomainInfo>,
    script: VecDeque<Vec<f64>>,
}

impl EnergySource for Scripted {
    fn name(&self) -> &str {
        self.name
    }
    fn description(&self) -> String {
        "scripted".into()
    }
    fn domains(&self) -> &[DomainInfo] {
        &self.domains
    }
    fn read(&mut self, _now: Instant) -> Result<Vec<f64>, PowerError> {
        let v = self.script.pop_front().expect("script exhausted");
        if v.is_empty() {
            return Err(PowerError::not_present(self.name, "scripted failure"));
        }
        Ok(v)
    }
}

#[test]
fn scripted_energy_and_power_between_marks() {
    let rapl = Scripted {
        name: "rapl-script",
        domains: vec![
            DomainInfo::energy("package-0", true),
            DomainInfo::energy("core-0", false),
        ],
        // cumulative joules at reads 0..=4
        script: VecDeque::from(vec![
            vec![100.0, 50.0],
            vec![110.0, 55.0],
            vec![125.0, 61.0],
            vec![],
            vec![160.0, 80.0],
        ]),
    };
    let wall = Scripted {
        name: "wall-script",
        domains: vec![DomainInfo::power("wall", true)],
        script: VecDeque::from(vec![
            vec![100.0],
            vec![120.0],
            vec![80.0],
            vec![0.0],
            vec![90.0],
        ]),
    };
    let mut core = SamplerCore::new(
        vec![Box::new(rapl), Box::new(wall)],
        SamplerConfig::every(Duration::from_millis(500)),
    )
    .unwrap();
    let t0 = Instant::now();
    let s = |ms: u64| t0 + Duration::from_millis(ms);
    let a = core.mark(s(0)).unwrap();
    core.poll(s(1000)).unwrap();
    let m = core.mark(s(2000)).unwrap();
    // Read 3 fails in the first source: nothing is updated, the error surfaces.
    assert!(core.poll(s(2500)).is_err());
    let b = core.mark(s(4000)).unwrap();

    let first = core.between(&a, &m);
    let r = first.source("rapl-script").unwrap();
    assert_eq!(r.total_joules, 25.0);
    assert_eq!(r.mean_watts, 12.5);
    assert_eq!(r.domain("core-0").unwrap().joules, 11.0);
    let w = first.source("wall-script").unwrap();
    // trapezoid: (100+120)/2*1 + (120+80)/2*1 = 210 J
    assert_eq!(w.total_joules, 210.0);
    assert_eq!(w.mean_watts, 105.0);
    assert_eq!(first.reads, 2);

    let whole = core.between(&a, &b);
    assert_eq!(whole.duration_s, 4.0);
    assert_eq!(whole.source("rapl-script").unwrap().total_joules, 60.0);
    // The failed poll stopped at the first source, so the wall source's next value (0 W) is read at
    // 4 s: 210 + (80+0)/2*2 = 290 J.
    assert_eq!(whole.source("wall-script").unwrap().total_joules, 290.0);
    assert_eq!(whole.kind, Kind::Measurement);
    // Marks in reverse order give the same interval.
    assert_eq!(core.between(&b, &a).duration_s, 4.0);
}

/// A raw counter of `modulus` counts of `unit` joules that advances at `watts`, read through a
/// WrapCounter as every hardware source does.
struct FastWrap {
    t0: Instant,
    watts: f64,
    unit: f64,
    modulus: u64,
    acc: WrapCounter,
    domains: Vec<DomainInfo>,
}

impl FastWrap {
    fn new(watts: f64, unit: f64, modulus: u64) -> Self {
        FastWrap {
            t0: Instant::now(),
            watts,
            unit,
            modulus,
            acc: WrapCounter::new(u128::from(modulus)),
            domains: vec![DomainInfo::energy("package-0", true)],
        }
    }
}

impl EnergySource for FastWrap {
    fn name(&self) -> &str {
        "fastwrap"
    }
    fn description(&self) -> String {
        "fast wrapping counter".into()
    }
    fn domains(&self) -> &[DomainInfo] {
        &self.domains
    }
    fn read(&mut self, now: Instant) -> Result<Vec<f64>, PowerError> {
        let t = now.saturating_duration_since(self.t0).as_secs_f64();
        let raw = ((self.watts * t / self.unit) as u64) % self.modulus;
        self.acc.update(raw);
        Ok(vec![self.acc.total() as f64 * self.unit])
    }
}

#[test]
fn thread_keeps_a_fast_wrapping_counter_right() {
    // 50 W in 1 mJ counts wrapping every 20 000 counts: a wrap every 0.4 s.
    let src = FastWrap::new(50.0, 1e-3, 20_000);
    let sampler = Sampler::start(
        vec![Box::new(src)],
        SamplerConfig::every(Duration::from_millis(5)),
    )
    .unwrap();
    let a = sampler.mark().unwrap();
    thread::sleep(Duration::from_millis(1000));
    let b = sampler.mark().unwrap();
    let iv = sampler.between(&a, &b);
    sampler.stop();
    let j = iv.total_joules().unwrap();
    let expect = 50.0 * (b.at - a.at).as_secs_f64();
    assert!((j - expect).abs() < 3e-3, "got {j} J, expected {expect} J");
    assert!(iv.reads >= 20, "the thread read only {} times", iv.reads);

    // Without the thread (two reads 1 s apart) the same counter loses its wraps.
    let mut core = SamplerCore::new(
        vec![Box::new(FastWrap::new(50.0, 1e-3, 20_000))],
        SamplerConfig::every(Duration::from_millis(5)),
    )
    .unwrap();
    let t0 = Instant::now();
    let a = core.mark(t0).unwrap();
    let b = core.mark(t0 + Duration::from_millis(1000)).unwrap();
    let wrong = core.between(&a, &b).total_joules().unwrap();
    assert!((wrong - 50.0).abs() > 1.0, "{wrong}");
}

#[test]
fn replayed_powercap_wraps_under_a_live_writer() {
    // package-0 of the AMD tree with a tiny range (1 J), advanced by a writer thread 20 mJ at a
    // time: 150 steps = 3 J = 3 wraps. The sampler must see every wrap.
    let t = fixture_copy("amd-1pkg");
    let root = t.path().to_path_buf();
    write_atomic(
        &root.join("class/powercap/intel-rapl:0/max_energy_range_uj"),
        "999999\n",
    );
    set_energy_uj(&root, "intel-rapl:0", 0);
    let pc = Powercap::open(&Platform::host().with_sys_root(&root)).unwrap();
    let sampler = Sampler::start(
        vec![Box::new(pc)],
        SamplerConfig::every(Duration::from_millis(5)),
    )
    .unwrap();
    let a = sampler.mark().unwrap();
    thread::scope(|scope| {
        scope.spawn(|| {
            let mut v: u64 = 0;
            for i in 0..150 {
                v = (v + 20_000) % 1_000_000;
                set_energy_uj(&root, "intel-rapl:0", v);
                set_energy_uj(&root, "intel-rapl:0:0", 31_234_567_890 + v);
                // The background thread reads every 5 ms, but a loaded machine can stall it
                // for longer than half a wrap (25 steps). A mark from this thread every 200 mJ
                // bounds the gap between reads whatever the scheduler does (and races the
                // background reads, as marks do in real use).
                if i % 10 == 9 {
                    sampler.mark().unwrap();
                }
                thread::sleep(Duration::from_millis(2));
            }
        });
    });
    let b = sampler.mark().unwrap();
    let iv = sampler.between(&a, &b);
    sampler.stop();
    let s = iv.primary().unwrap();
    assert!(
        (s.total_joules - 3.0).abs() < 1e-9,
        "total {} J, warnings {:?}",
        s.total_joules,
        iv.warnings
    );
    assert_eq!(s.source, "powercap");
}

#[test]
fn baseline_and_active_split() {
    let sampler = Sampler::start(
        vec![Box::new(FastWrap::new(30.0, 1e-6, 1 << 32))],
        SamplerConfig::every(Duration::from_millis(10)),
    )
    .unwrap();
    let base = sampler.baseline(Duration::from_millis(100)).unwrap();
    let w = base.watts("fastwrap").unwrap();
    assert!((w - 30.0).abs() < 0.1, "{w}");
    assert!((base.domain_watts("fastwrap", "package-0").unwrap() - 30.0).abs() < 0.1);
    let iv = sampler.measure(Duration::from_millis(50)).unwrap();
    let split = iv.base_and_active(&base);
    let s = &split[0];
    let total = iv.total_joules().unwrap();
    assert!((s.base_joules + s.active_joules - total).abs() < 1e-12);
    // Same power as the baseline: (almost) everything is base.
    assert!(s.active_joules < 0.01 * total + 1e-3, "{s:?}");
    assert!(sampler.warnings().is_empty(), "{:?}", sampler.warnings());
    sampler.stop();
}

#[test]
fn slow_counter_is_reported() {
    // A counter that only updates every 300 ms (6 reads), sampled every 50 ms.
    let mut script = VecDeque::new();
    for i in 0..40u64 {
        script.push_back(vec![(i / 6) as f64]);
    }
    let src = Scripted {
        name: "slow",
        domains: vec![DomainInfo::energy("package-0", true)],
        script,
    };
    let mut core = SamplerCore::new(
        vec![Box::new(src)],
        SamplerConfig::every(Duration::from_millis(50)),
    )
    .unwrap();
    let t0 = Instant::now();
    let a = core.mark(t0).unwrap();
    for i in 1..39 {
        core.poll(t0 + Duration::from_millis(50 * i)).unwrap();
    }
    let b = core.mark(t0 + Duration::from_millis(50 * 39)).unwrap();
    let iv = core.between(&a, &b);
    assert!(
        iv.warnings
            .iter()
            .any(|w| w.contains("updates only every ~300 ms") && w.contains("too slow")),
        "{:?}",
        iv.warnings
    );
}
