//! The sampler: a thread that reads the chosen sources every N ms, and marks between which a benchmark
//! reads joules and mean watts per domain.
//!
//! ```no_run
//! use std::time::Duration;
//! use power::sampler::{Sampler, SamplerConfig};
//! use power::registry::{open_sources, SourceKind, SourceOptions};
//!
//! let sources = open_sources(&[SourceKind::Auto], &SourceOptions::default())?;
//! let sampler = Sampler::start(sources, SamplerConfig::every(Duration::from_millis(200)))?;
//! let idle = sampler.baseline(Duration::from_secs(5))?;          // machine idle
//! let a = sampler.mark()?;
//! // … run one configuration of the benchmark …
//! let b = sampler.mark()?;
//! let run = sampler.between(&a, &b);
//! let primary = run.primary().unwrap();
//! println!("{} W ({}), {} W above idle", primary.mean_watts, primary.kind,
//!          primary.mean_watts - idle.watts(&primary.source).unwrap_or(0.0));
//! sampler.stop();
//! # Ok::<(), power::PowerError>(())
//! ```
//!
//! Why a thread: hardware counters wrap (RAPL's 32-bit registers in tens of minutes, sooner at high
//! power or with coarse units), and power-only sources must be integrated. The thread reads often
//! enough that every wrap is seen, so a mark taken an hour after the previous one is still right.
//! Timestamps are monotonic ([`Instant`]). A [`Mark`] itself triggers a read, so an interval ends
//! exactly at its mark, not at the last periodic read.
//!
//! [`SamplerCore`] is the same logic without the thread, driven with explicit times by tests.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::PowerError;
use crate::periodic::{lock, BackgroundThread, StopSignal};
use crate::source::{DomainInfo, EnergySource, Kind, Quantity};

/// Sampler settings.
#[derive(Debug, Clone, Copy)]
pub struct SamplerConfig {
    /// Time between periodic reads.
    pub interval: Duration,
    /// An energy counter that has not changed for this long is reported as stuck.
    pub stuck_after: Duration,
}

impl SamplerConfig {
    /// Read every `interval`; stuck after `max(2 s, 10 × interval)`.
    pub fn every(interval: Duration) -> Self {
        SamplerConfig {
            interval,
            stuck_after: (interval * 10).max(Duration::from_secs(2)),
        }
    }
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self::every(Duration::from_millis(100))
    }
}

#[derive(Debug, Clone)]
struct DomainState {
    info: DomainInfo,
    /// Joules since the sampler's first read.
    cum_j: f64,
    /// Energy domains: the source's value at the first read, and at the last read.
    origin: Option<f64>,
    last_raw: Option<f64>,
    /// Power domains: the last watts and when.
    last_power: Option<(Instant, f64)>,
    first_change: Option<Instant>,
    last_change: Option<Instant>,
    changes: u64,
}

struct SourceState {
    src: Box<dyn EnergySource>,
    meta: SourceMeta,
    domains: Vec<DomainState>,
}

/// What a source is, fixed for the sampler's lifetime.
#[derive(Debug, Clone, Serialize)]
pub struct SourceMeta {
    /// Source name.
    pub source: String,
    /// Measurement or estimate.
    pub kind: Kind,
    /// What it reads.
    pub description: String,
    /// Its domains.
    pub domains: Vec<DomainInfo>,
    /// The source's own idea of idle power (the estimate's idle watts).
    pub base_watts_hint: Option<f64>,
}

/// A point in time with the cumulative joules of every domain (taken by [`Sampler::mark`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    /// Monotonic time of the read.
    pub at: Instant,
    /// Reads done by the sampler up to and including this one.
    pub reads: u64,
    /// Cumulative joules since the sampler started, per source and domain.
    pub joules: Vec<Vec<f64>>,
}

/// Energy of one domain over an interval.
#[derive(Debug, Clone, Serialize)]
pub struct DomainEnergy {
    /// Domain name.
    pub domain: String,
    /// Measurement or estimate (same as its source).
    pub kind: Kind,
    /// Counter (`energy`) or integrated power gauge (`power`).
    pub quantity: Quantity,
    /// Whether it is part of the source's total.
    pub in_total: bool,
    /// Joules over the interval.
    pub joules: f64,
    /// Mean watts over the interval.
    pub mean_watts: f64,
}

/// Energy of one source over an interval.
#[derive(Debug, Clone, Serialize)]
pub struct SourceEnergy {
    /// Source name.
    pub source: String,
    /// Measurement or estimate.
    pub kind: Kind,
    /// What it reads.
    pub description: String,
    /// Per domain.
    pub domains: Vec<DomainEnergy>,
    /// Sum of the in-total domains, joules.
    pub total_joules: f64,
    /// Mean watts of the in-total domains.
    pub mean_watts: f64,
}

impl SourceEnergy {
    /// One domain by name.
    pub fn domain(&self, name: &str) -> Option<&DomainEnergy> {
        self.domains.iter().find(|d| d.domain == name)
    }
}

/// Joules and mean watts per source and domain between two marks.
#[derive(Debug, Clone, Serialize)]
pub struct Interval {
    /// The primary (first) source's kind: `estimate` if the headline numbers are modelled.
    pub kind: Kind,
    /// Start, seconds since the sampler started.
    pub start_s: f64,
    /// Length, seconds.
    pub duration_s: f64,
    /// Sampler reads within the interval (periodic plus the closing mark).
    pub reads: u64,
    /// Per source; the first one is the primary source.
    pub sources: Vec<SourceEnergy>,
    /// Stuck or slow counters, suspicious jumps, failed reads.
    pub warnings: Vec<String>,
}

impl Interval {
    /// The primary source (the RAPL reader, or the estimate without RAPL).
    pub fn primary(&self) -> Option<&SourceEnergy> {
        self.sources.first()
    }

    /// A source by name.
    pub fn source(&self, name: &str) -> Option<&SourceEnergy> {
        self.sources.iter().find(|s| s.source == name)
    }

    /// The primary source's total joules.
    pub fn total_joules(&self) -> Option<f64> {
        self.primary().map(|s| s.total_joules)
    }

    /// The primary source's mean watts.
    pub fn mean_watts(&self) -> Option<f64> {
        self.primary().map(|s| s.mean_watts)
    }

    /// Split each source's total into the idle part (baseline watts × duration, capped at the total)
    /// and the active part above it.
    pub fn base_and_active(&self, baseline: &Baseline) -> Vec<BaseActive> {
        self.sources
            .iter()
            .map(|s| {
                let base_w = baseline.watts(&s.source).unwrap_or(0.0);
                let (base_joules, active_joules) =
                    split_base(s.total_joules, base_w, self.duration_s);
                BaseActive {
                    source: s.source.clone(),
                    kind: s.kind,
                    base_joules,
                    active_joules,
                }
            })
            .collect()
    }
}

/// `(base, active)` joules: base = `base_watts × duration` capped to `[0, total]`.
pub fn split_base(total_j: f64, base_watts: f64, duration_s: f64) -> (f64, f64) {
    let total = total_j.max(0.0);
    let base = (base_watts * duration_s).clamp(0.0, total);
    (base, total - base)
}

/// One source's interval energy split into idle and active parts.
#[derive(Debug, Clone, Serialize)]
pub struct BaseActive {
    /// Source name.
    pub source: String,
    /// Measurement or estimate.
    pub kind: Kind,
    /// The idle (base) part, joules.
    pub base_joules: f64,
    /// Everything above idle, joules.
    pub active_joules: f64,
}

/// An idle baseline: mean watts per source and domain while nothing ran.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    /// The measured interval.
    pub interval: Interval,
}

impl Baseline {
    /// Wrap an interval measured while the machine was idle.
    pub fn from_interval(interval: Interval) -> Self {
        Baseline { interval }
    }

    /// A source's idle watts (its in-total domains).
    pub fn watts(&self, source: &str) -> Option<f64> {
        self.interval.source(source).map(|s| s.mean_watts)
    }

    /// One domain's idle watts.
    pub fn domain_watts(&self, source: &str, domain: &str) -> Option<f64> {
        self.interval
            .source(source)?
            .domain(domain)
            .map(|d| d.mean_watts)
    }
}

const MAX_WARNINGS: usize = 64;

/// The sampler's logic without its thread: read sources at given times, take marks, compute intervals.
pub struct SamplerCore {
    sources: Vec<SourceState>,
    config: SamplerConfig,
    started: Option<Instant>,
    last_poll: Option<Instant>,
    reads: u64,
    failed_reads: u64,
    warnings: Vec<String>,
}

impl SamplerCore {
    /// Take ownership of the sources. Nothing is read until [`SamplerCore::poll`].
    pub fn new(
        sources: Vec<Box<dyn EnergySource>>,
        config: SamplerConfig,
    ) -> Result<Self, PowerError> {
        if sources.is_empty() {
            return Err(PowerError::Config(
                "the sampler needs at least one source".into(),
            ));
        }
        if config.interval.is_zero() {
            return Err(PowerError::Config(
                "the sampling interval must be > 0".into(),
            ));
        }
        let sources = sources
            .into_iter()
            .map(|src| {
                let meta = SourceMeta {
                    source: src.name().to_string(),
                    kind: src.kind(),
                    description: src.description(),
                    domains: src.domains().to_vec(),
                    base_watts_hint: src.base_watts_hint(),
                };
                let domains = meta
                    .domains
                    .iter()
                    .map(|info| DomainState {
                        info: info.clone(),
                        cum_j: 0.0,
                        origin: None,
                        last_raw: None,
                        last_power: None,
                        first_change: None,
                        last_change: None,
                        changes: 0,
                    })
                    .collect();
                SourceState { src, meta, domains }
            })
            .collect();
        Ok(SamplerCore {
            sources,
            config,
            started: None,
            last_poll: None,
            reads: 0,
            failed_reads: 0,
            warnings: Vec::new(),
        })
    }

    /// The sources' fixed descriptions.
    pub fn meta(&self) -> Vec<SourceMeta> {
        self.sources.iter().map(|s| s.meta.clone()).collect()
    }

    fn warn(&mut self, w: String) {
        if !self.warnings.contains(&w) && self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(w);
        }
    }

    /// Read every source once at `now` and accumulate. Times must not go backwards.
    pub fn poll(&mut self, now: Instant) -> Result<(), PowerError> {
        // Never let time run backwards: a caller's late-stamped read counts as the last one.
        let now = match self.last_poll {
            Some(last) if now < last => last,
            _ => now,
        };
        self.last_poll = Some(now);
        self.started.get_or_insert(now);
        // Read everything first so a failing source leaves no domain half-updated.
        let mut values = Vec::with_capacity(self.sources.len());
        for s in &mut self.sources {
            let v = s.src.read(now)?;
            if v.len() != s.domains.len() {
                return Err(PowerError::Config(format!(
                    "source {} returned {} values for {} domains",
                    s.meta.source,
                    v.len(),
                    s.domains.len()
                )));
            }
            values.push(v);
        }
        let mut new_warnings = Vec::new();
        for (s, v) in self.sources.iter_mut().zip(values) {
            new_warnings.extend(
                s.src
                    .take_warnings()
                    .into_iter()
                    .map(|w| format!("{}: {w}", s.meta.source)),
            );
            for (d, x) in s.domains.iter_mut().zip(v) {
                match d.info.quantity {
                    Quantity::Energy => {
                        let origin = *d.origin.get_or_insert(x);
                        if let Some(prev) = d.last_raw {
                            if x != prev {
                                d.changes += 1;
                                d.first_change.get_or_insert(now);
                                d.last_change = Some(now);
                            }
                            if x < prev {
                                new_warnings.push(format!(
                                    "{}: {} went backwards ({prev} J -> {x} J)",
                                    s.meta.source, d.info.name
                                ));
                            }
                        }
                        d.last_raw = Some(x);
                        d.cum_j = x - origin;
                    }
                    Quantity::Power => {
                        if let Some((t, w)) = d.last_power {
                            let dt = now.saturating_duration_since(t).as_secs_f64();
                            d.cum_j += 0.5 * (w + x) * dt;
                        }
                        d.last_power = Some((now, x));
                    }
                }
            }
        }
        for w in new_warnings {
            self.warn(w);
        }
        self.reads += 1;
        Ok(())
    }

    /// Record a failed periodic read (the thread keeps going).
    fn note_failure(&mut self, e: &PowerError) {
        self.failed_reads += 1;
        self.warn(format!("a periodic read failed: {e}"));
    }

    /// Read at `now` and return a mark.
    pub fn mark(&mut self, now: Instant) -> Result<Mark, PowerError> {
        self.poll(now)?;
        let at = self.last_poll.unwrap_or(now);
        Ok(self.snapshot(at))
    }

    fn snapshot(&self, now: Instant) -> Mark {
        Mark {
            at: now,
            reads: self.reads,
            joules: self
                .sources
                .iter()
                .map(|s| s.domains.iter().map(|d| d.cum_j).collect())
                .collect(),
        }
    }

    /// Stuck and slow counters as of `now` (energy domains of measurement sources).
    pub fn health(&self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        let Some(started) = self.started else {
            return out;
        };
        let interval = self.config.interval;
        for s in &self.sources {
            if s.meta.kind != Kind::Measurement {
                continue;
            }
            for d in &s.domains {
                if d.info.quantity != Quantity::Energy {
                    continue;
                }
                let since = d.last_change.unwrap_or(started);
                let quiet = now.saturating_duration_since(since);
                if quiet >= self.config.stuck_after {
                    out.push(format!(
                        "{}: counter {} has not advanced for {:.1} s: it is stuck (firmware or \
                         hypervisor not updating it){}",
                        s.meta.source,
                        d.info.name,
                        quiet.as_secs_f64(),
                        if d.info.in_total {
                            ""
                        } else {
                            ", or that part of the chip is unused (an idle GPU's uncore, say)"
                        }
                    ));
                    continue;
                }
                if d.changes >= 3 {
                    if let (Some(a), Some(b)) = (d.first_change, d.last_change) {
                        let period = b.saturating_duration_since(a) / (d.changes - 1) as u32;
                        if period > interval.mul_f64(2.5) && period > Duration::from_millis(50) {
                            out.push(format!(
                                "{}: counter {} updates only every ~{} ms while sampling every {} \
                                 ms: it is too slow for this interval, per-interval values are \
                                 coarse; use --interval {} or more and longer runs",
                                s.meta.source,
                                d.info.name,
                                period.as_millis(),
                                interval.as_millis(),
                                period.as_millis()
                            ));
                        }
                    }
                }
            }
        }
        out
    }

    /// Joules and mean watts between two marks of this sampler.
    pub fn between(&self, a: &Mark, b: &Mark) -> Interval {
        let meta = self.meta();
        let mut warnings = self.warnings.clone();
        warnings.extend(self.health(b.at.max(a.at)));
        if self.failed_reads > 0 {
            warnings.push(format!("{} periodic reads failed", self.failed_reads));
        }
        interval_between(&meta, self.started.unwrap_or(a.at), a, b, warnings)
    }
}

/// Build an [`Interval`] from two marks and the sources' descriptions.
pub fn interval_between(
    meta: &[SourceMeta],
    started: Instant,
    a: &Mark,
    b: &Mark,
    warnings: Vec<String>,
) -> Interval {
    let (a, b) = if b.at < a.at { (b, a) } else { (a, b) };
    let duration_s = b.at.saturating_duration_since(a.at).as_secs_f64();
    let per_s = |j: f64| {
        if duration_s > 0.0 {
            j / duration_s
        } else {
            0.0
        }
    };
    let sources: Vec<SourceEnergy> = meta
        .iter()
        .enumerate()
        .map(|(si, m)| {
            let domains: Vec<DomainEnergy> = m
                .domains
                .iter()
                .enumerate()
                .map(|(di, d)| {
                    let j0 = a
                        .joules
                        .get(si)
                        .and_then(|v| v.get(di))
                        .copied()
                        .unwrap_or(0.0);
                    let j1 = b
                        .joules
                        .get(si)
                        .and_then(|v| v.get(di))
                        .copied()
                        .unwrap_or(0.0);
                    let joules = j1 - j0;
                    DomainEnergy {
                        domain: d.name.clone(),
                        kind: m.kind,
                        quantity: d.quantity,
                        in_total: d.in_total,
                        joules,
                        mean_watts: per_s(joules),
                    }
                })
                .collect();
            let total_joules = domains
                .iter()
                .filter(|d| d.in_total)
                .map(|d| d.joules)
                .sum();
            SourceEnergy {
                source: m.source.clone(),
                kind: m.kind,
                description: m.description.clone(),
                domains,
                total_joules,
                mean_watts: per_s(total_joules),
            }
        })
        .collect();
    Interval {
        kind: sources.first().map(|s| s.kind).unwrap_or(Kind::Estimate),
        start_s: a.at.saturating_duration_since(started).as_secs_f64(),
        duration_s,
        reads: b.reads.saturating_sub(a.reads),
        sources,
        warnings,
    }
}

struct Shared {
    core: Mutex<SamplerCore>,
}

/// The running sampler: a thread reading every source every `interval`.
pub struct Sampler {
    shared: Arc<Shared>,
    meta: Vec<SourceMeta>,
    thread: BackgroundThread,
    config: SamplerConfig,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("meta", &self.meta)
            .field("config", &self.config)
            .finish()
    }
}

impl Sampler {
    /// Read every source once (errors surface here, not in the thread), then start the thread.
    pub fn start(
        sources: Vec<Box<dyn EnergySource>>,
        config: SamplerConfig,
    ) -> Result<Sampler, PowerError> {
        let mut core = SamplerCore::new(sources, config)?;
        core.poll(Instant::now())?;
        let meta = core.meta();
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
        });
        let th_shared = Arc::clone(&shared);
        let thread = BackgroundThread::spawn("vnb-power-sampler", move |stop| {
            run(&th_shared, config.interval, stop)
        })
        .map_err(|e| PowerError::Config(format!("cannot start the sampler thread: {e}")))?;
        Ok(Sampler {
            shared,
            meta,
            thread,
            config,
        })
    }

    /// The sources being read (the first is the primary one).
    pub fn sources(&self) -> &[SourceMeta] {
        &self.meta
    }

    /// The primary source's kind.
    pub fn kind(&self) -> Kind {
        self.meta.first().map(|m| m.kind).unwrap_or(Kind::Estimate)
    }

    /// The configuration.
    pub fn config(&self) -> SamplerConfig {
        self.config
    }

    /// Read now and return a mark.
    pub fn mark(&self) -> Result<Mark, PowerError> {
        lock(&self.shared.core).mark(Instant::now())
    }

    /// Joules and mean watts per source and domain between two marks.
    pub fn between(&self, a: &Mark, b: &Mark) -> Interval {
        lock(&self.shared.core).between(a, b)
    }

    /// Mark, wait `duration`, mark: one interval.
    pub fn measure(&self, duration: Duration) -> Result<Interval, PowerError> {
        let a = self.mark()?;
        thread::sleep(duration);
        let b = self.mark()?;
        Ok(self.between(&a, &b))
    }

    /// Measure an idle baseline over `duration` (the caller makes sure nothing runs).
    pub fn baseline(&self, duration: Duration) -> Result<Baseline, PowerError> {
        Ok(Baseline::from_interval(self.measure(duration)?))
    }

    /// Stuck/slow counters and other warnings as of now.
    pub fn warnings(&self) -> Vec<String> {
        let core = lock(&self.shared.core);
        let mut w = core.warnings.clone();
        w.extend(core.health(Instant::now()));
        w
    }

    /// Stop the thread and wait for it.
    pub fn stop(self) {
        self.thread.stop();
    }
}

fn run(shared: &Shared, interval: Duration, stop: &StopSignal) {
    let mut next = Instant::now() + interval;
    loop {
        if stop.wait_until(next) {
            return;
        }
        // The time is taken under the lock: a mark() from another thread may have read in
        // between, and a read stamped earlier than the one before it would look like a counter
        // going backwards (a spurious wrap for a wrapping counter).
        let now = {
            let mut core = lock(&shared.core);
            let now = Instant::now();
            if let Err(e) = core.poll(now) {
                tracing::warn!("power sampler: {e}");
                core.note_failure(&e);
            }
            now
        };
        next += interval;
        if next <= now {
            next = now + interval;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Energy counter that reports `watts × t` (in joules) plus a power gauge of `watts`.
    struct Linear {
        t0: Option<Instant>,
        watts: f64,
        domains: Vec<DomainInfo>,
    }

    impl EnergySource for Linear {
        fn name(&self) -> &str {
            "linear"
        }
        fn description(&self) -> String {
            "test".into()
        }
        fn domains(&self) -> &[DomainInfo] {
            &self.domains
        }
        fn read(&mut self, now: Instant) -> Result<Vec<f64>, PowerError> {
            let t0 = *self.t0.get_or_insert(now);
            let t = now.duration_since(t0).as_secs_f64();
            Ok(vec![1000.0 + self.watts * t, self.watts, 5.0])
        }
    }

    /// A core over one [`Linear`] source of `watts` (domains counter, gauge, frozen), read
    /// every 100 ms.
    fn linear_core(watts: f64) -> SamplerCore {
        let src = Linear {
            t0: None,
            watts,
            domains: vec![
                DomainInfo::energy("counter", true),
                DomainInfo::power("gauge", false),
                DomainInfo::energy("frozen", false),
            ],
        };
        SamplerCore::new(
            vec![Box::new(src)],
            SamplerConfig::every(Duration::from_millis(100)),
        )
        .unwrap()
    }

    #[test]
    fn energy_and_power_domains_agree() {
        let mut core = linear_core(12.0);
        let t0 = Instant::now();
        core.poll(t0).unwrap();
        let a = core.mark(t0 + Duration::from_millis(500)).unwrap();
        for i in 6..30 {
            core.poll(t0 + Duration::from_millis(100 * i)).unwrap();
        }
        let b = core.mark(t0 + Duration::from_millis(3500)).unwrap();
        let iv = core.between(&a, &b);
        assert!((iv.duration_s - 3.0).abs() < 1e-9);
        let s = iv.primary().unwrap();
        assert!((s.domain("counter").unwrap().joules - 36.0).abs() < 1e-9);
        assert!((s.domain("gauge").unwrap().joules - 36.0).abs() < 1e-9);
        assert!(
            (s.total_joules - 36.0).abs() < 1e-9,
            "gauge is not in total"
        );
        assert!((s.mean_watts - 12.0).abs() < 1e-9);
        assert_eq!(iv.reads, 25);
        // "frozen" never changed for 3.5 s > stuck_after (2 s).
        assert!(
            iv.warnings
                .iter()
                .any(|w| w.contains("frozen") && w.contains("stuck")),
            "{:?}",
            iv.warnings
        );
        assert!(!iv.warnings.iter().any(|w| w.contains("counter counter")));
    }

    #[test]
    fn a_read_stamped_before_the_last_one_does_not_go_backwards() {
        // Two threads (the sampler's and a mark()) can race: the second read must not be
        // stamped earlier than the first, or a wrapping counter would count a whole spurious wrap.
        let mut core = linear_core(10.0);
        let t0 = Instant::now();
        let a = core.mark(t0).unwrap();
        core.poll(t0 + Duration::from_millis(200)).unwrap();
        let b = core.mark(t0 + Duration::from_millis(150)).unwrap();
        assert_eq!(b.at, t0 + Duration::from_millis(200));
        let iv = core.between(&a, &b);
        assert!(
            !iv.warnings.iter().any(|w| w.contains("backwards")),
            "{:?}",
            iv.warnings
        );
        let s = iv.primary().unwrap();
        assert!((s.domain("counter").unwrap().joules - 2.0).abs() < 1e-9);
    }

    #[test]
    fn zero_interval_is_not_nan() {
        let (base, active) = split_base(10.0, 20.0, 1.0);
        assert_eq!((base, active), (10.0, 0.0));
        let (base, active) = split_base(10.0, 4.0, 1.0);
        assert_eq!((base, active), (4.0, 6.0));
    }
}
