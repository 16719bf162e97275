//! Per-VM energy: base evenly, active by CPU time, shares summing to the total; the meter a backend
//! runs; and CPU time read from the real /proc for real threads.

mod common;

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use power::vm::{task_cpu_ticks, Task, VmEnergyAccountant};
use power::{
    DomainInfo, EnergySource, EstimateModel, MeterConfig, Platform, PowerError, Sampler,
    SamplerConfig, VmEnergyMeter, VmTasks,
};

/// Write a `stat` file with the given utime and stime (fields 14 and 15).
fn write_stat(proc_root: &Path, rel: &str, utime: u64, stime: u64) {
    let path = proc_root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    write_atomic(
        &path,
        &format!(
            "4242 (qemu-system-x86 (vm a)) S 1 4242 4242 0 -1 4194560 100 0 0 0 {utime} {stime} 0 0 \
             20 0 9 0 100 1000 200 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n"
        ),
    );
}

fn two_vm_proc() -> TempDir {
    let t = TempDir::new("vm-proc");
    write_stat(t.path(), "100/stat", 1000, 500);
    write_stat(t.path(), "300/task/301/stat", 50, 50);
    write_stat(t.path(), "200/stat", 2000, 0);
    t
}

fn vm_a() -> VmTasks {
    VmTasks::new().with_process(100).with_thread(300, 301)
}

fn vm_b() -> VmTasks {
    VmTasks::new().with_process(200)
}

#[test]
fn accountant_splits_base_evenly_and_active_by_cpu() {
    let p = two_vm_proc();
    let mut acct = VmEnergyAccountant::new(p.path());
    acct.add_vm("a", vm_a());
    acct.add_vm("b", vm_b());
    assert_eq!(acct.energy_uj("a"), 0);
    assert_eq!(acct.energy_uj("nope"), u64::MAX);
    // a: QEMU +20 ticks, its backend worker thread +10; b: +10.
    write_stat(p.path(), "100/stat", 1015, 505);
    write_stat(p.path(), "300/task/301/stat", 60, 50);
    write_stat(p.path(), "200/stat", 2010, 0);
    let shares = acct.account(10.0, 4.0);
    let sum: f64 = shares.iter().map(|(_, s)| s.total()).sum();
    assert!((sum - 10.0).abs() < 1e-12);
    let a = acct.energy("a").unwrap();
    let b = acct.energy("b").unwrap();
    assert_eq!(
        (a.base_uj, a.active_uj, a.total_uj),
        (2_000_000, 4_500_000, 6_500_000)
    );
    assert_eq!(
        (b.base_uj, b.active_uj, b.total_uj),
        (2_000_000, 1_500_000, 3_500_000)
    );
    // An interval without any VM CPU time: active split evenly too. Totals keep adding up.
    acct.account(6.0, 2.0);
    assert_eq!(acct.energy_uj("a") + acct.energy_uj("b"), 16_000_000);
    assert_eq!(acct.energy_uj("a"), 6_500_000 + 3_000_000);
    // The thread exits: its stat is gone; the rest still counts, nothing panics.
    fs::remove_dir_all(p.join("300")).unwrap();
    write_stat(p.path(), "100/stat", 1025, 505);
    acct.account(1.0, 0.0);
    assert_eq!(acct.energy_uj("a"), 9_500_000 + 1_000_000);
    // Changing tasks keeps the energy; removing returns the final numbers.
    assert!(acct.set_tasks("b", VmTasks::new().with_process(200).with_process(999)));
    assert_eq!(acct.energy_uj("b"), 3_500_000 + 3_000_000);
    let gone = acct.remove_vm("b").unwrap();
    assert_eq!(gone.total_uj, 6_500_000);
    assert_eq!(acct.energy_uj("b"), u64::MAX);
}

/// Constant power from time (a scripted measurement source).
struct Constant {
    t0: Instant,
    watts: f64,
    domains: Vec<DomainInfo>,
}

impl EnergySource for Constant {
    fn name(&self) -> &str {
        "constant"
    }
    fn description(&self) -> String {
        "scripted constant power".into()
    }
    fn domains(&self) -> &[DomainInfo] {
        &self.domains
    }
    fn read(&mut self, now: Instant) -> Result<Vec<f64>, PowerError> {
        Ok(vec![
            self.watts * now.saturating_duration_since(self.t0).as_secs_f64(),
        ])
    }
}

/// A source whose reads hang while `stuck` is set (a meter command waiting for its timeout).
struct Hanging {
    t0: Instant,
    stuck: Arc<AtomicBool>,
    domains: Vec<DomainInfo>,
}

impl EnergySource for Hanging {
    fn name(&self) -> &str {
        "hanging"
    }
    fn description(&self) -> String {
        "reads hang while told to".into()
    }
    fn domains(&self) -> &[DomainInfo] {
        &self.domains
    }
    fn read(&mut self, now: Instant) -> Result<Vec<f64>, PowerError> {
        while self.stuck.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(5));
        }
        Ok(vec![
            50.0 * now.saturating_duration_since(self.t0).as_secs_f64(),
        ])
    }
}

#[test]
fn a_hung_source_never_blocks_readers_of_a_vms_energy() {
    let p = two_vm_proc();
    let stuck = Arc::new(AtomicBool::new(false));
    let sampler = Sampler::start(
        vec![Box::new(Hanging {
            t0: Instant::now(),
            stuck: stuck.clone(),
            domains: vec![DomainInfo::energy("wall", true)],
        })],
        SamplerConfig::every(Duration::from_secs(3600)),
    )
    .unwrap();
    let meter = VmEnergyMeter::start(
        sampler,
        MeterConfig {
            period: Duration::from_secs(3600),
            base_watts: Some(0.0),
            proc_root: p.path().to_path_buf(),
        },
    )
    .unwrap();
    let h = meter.handle();
    h.register_vm("a", vm_a());
    h.flush().unwrap();
    let before = h.energy_uj("a");
    stuck.store(true, Ordering::Relaxed);
    // A step now waits for the source, as a meter command does until its timeout.
    let stepping = {
        let h = h.clone();
        thread::spawn(move || h.flush())
    };
    thread::sleep(Duration::from_millis(50));
    // Readers (a guest's control reply, the metrics) answer at once with what is known.
    let (tx, rx) = mpsc::channel();
    {
        let h = h.clone();
        thread::spawn(move || {
            let _ = tx.send((h.energy_uj("a"), h.status().periods));
        });
    }
    let got = rx.recv_timeout(Duration::from_millis(500));
    stuck.store(false, Ordering::Relaxed);
    let (e, _) = got.expect("energy_uj waited for the hung source");
    assert_eq!(e, before);
    stepping.join().unwrap().unwrap();
    meter.stop();
}

#[test]
fn meter_apportions_and_sums_to_the_total() {
    let p = two_vm_proc();
    let sampler = Sampler::start(
        vec![Box::new(Constant {
            t0: Instant::now(),
            watts: 40.0,
            domains: vec![DomainInfo::energy("package-0", true)],
        })],
        SamplerConfig::every(Duration::from_millis(10)),
    )
    .unwrap();
    let meter = VmEnergyMeter::start(
        sampler,
        MeterConfig {
            period: Duration::from_secs(3600), // only explicit flushes in this test
            base_watts: Some(10.0),
            proc_root: p.path().to_path_buf(),
        },
    )
    .unwrap();
    let h = meter.handle();
    assert_eq!(h.kind(), power::Kind::Measurement);
    assert_eq!(h.base_watts(), 10.0);
    h.register_vm("a", vm_a());
    h.register_vm("b", vm_b());
    // First period: no VM used CPU since registration, so its active part is split evenly.
    h.flush().unwrap();
    let (a1, b1) = (h.energy("a").unwrap(), h.energy("b").unwrap());
    assert_eq!(a1.total_uj.abs_diff(b1.total_uj), 0);
    let before = h.status();
    thread::sleep(Duration::from_millis(100));
    // Second period: a's QEMU +30 ticks, b +10.
    write_stat(p.path(), "100/stat", 1030, 500);
    write_stat(p.path(), "200/stat", 2010, 0);
    h.flush().unwrap();
    let st = h.status();
    let dj = st.accounted_joules - before.accounted_joules;
    let ds = st.accounted_seconds - before.accounted_seconds;
    assert!((dj - 40.0 * ds).abs() < 1e-6, "{dj} J over {ds} s");
    let (a2, b2) = (h.energy("a").unwrap(), h.energy("b").unwrap());
    // Base: 10 W × period, half each.
    let base_each = (a2.base_uj - a1.base_uj) as f64;
    assert_eq!(a2.base_uj - a1.base_uj, b2.base_uj - b1.base_uj);
    assert!(
        (base_each - 10.0 * ds / 2.0 * 1e6).abs() <= 1.0,
        "{base_each}"
    );
    // Active: 3:1 by CPU time.
    let act_a = (a2.active_uj - a1.active_uj) as f64;
    let act_b = (b2.active_uj - b1.active_uj) as f64;
    assert!((act_a - 3.0 * act_b).abs() <= 4.0, "{act_a} vs {act_b}");
    assert!((act_a + act_b - 30.0 * ds * 1e6).abs() <= 2.0);
    // The VMs' shares add up to what was measured.
    let total_uj: u64 = h.all().iter().map(|v| v.total_uj).sum();
    assert!(
        (total_uj as f64 - st.accounted_joules * 1e6).abs() <= 2.0,
        "VMs {total_uj} µJ vs accounted {} J",
        st.accounted_joules
    );
    assert_eq!(h.energy_uj("a") + h.energy_uj("b"), total_uj);
    assert_eq!(h.energy_uj("unknown"), u64::MAX);
    meter.stop();
}

#[test]
fn meter_over_the_estimate_uses_its_idle_watts_as_base() {
    let t = TempDir::new("vm-est");
    write_atomic(
        &t.join("stat"),
        "cpu  1 0 1 100 0 0 0 0 0 0\ncpu0 1 0 1 100 0 0 0 0 0 0\n",
    );
    let src = power::estimate::CpuEstimate::open(
        &Platform::host().with_proc_root(t.path()),
        EstimateModel {
            idle_watts: 25.0,
            watts_per_busy_core: 5.0,
        },
    )
    .unwrap();
    let sampler = Sampler::start(
        vec![Box::new(src)],
        SamplerConfig::every(Duration::from_millis(20)),
    )
    .unwrap();
    let meter = VmEnergyMeter::start(
        sampler,
        MeterConfig {
            period: Duration::from_millis(30),
            base_watts: None,
            proc_root: t.path().to_path_buf(),
        },
    )
    .unwrap();
    let h = meter.handle();
    assert_eq!(h.kind(), power::Kind::Estimate);
    assert_eq!(h.base_watts(), 25.0);
    h.register_vm("only", VmTasks::new().with_process(1));
    // A few periods run by the meter thread (waited for, not assumed, on a busy machine);
    // then the meter stops, so status and energy are read from the same, final state.
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while h.status().periods < 2 && std::time::Instant::now() < end {
        thread::sleep(Duration::from_millis(30));
    }
    drop(meter);
    let st = h.status();
    assert!(st.periods >= 2, "{st:?}");
    let e = h.energy("only").unwrap();
    // No CPU used (static stat): everything is base = idle watts × time, all to the one VM.
    assert_eq!(e.active_uj, 0);
    assert!(
        (e.base_uj as f64 - st.accounted_joules * 1e6).abs() <= 1.0,
        "{e:?} {st:?}"
    );
    assert!((st.accounted_joules - 25.0 * st.accounted_seconds).abs() < 1e-6);
}

#[test]
fn real_threads_cpu_time_from_proc() {
    // A busy thread and a sleeping one in this process; the busy one must get the active energy.
    let pid = std::process::id();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let busy = {
        let stop = Arc::clone(&stop);
        let tx = tx.clone();
        thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let mut x = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                std::hint::black_box(x);
            }
        })
    };
    let idle = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let (t1, t2) = (rx.recv().unwrap(), rx.recv().unwrap());
    let proc_root = Path::new("/proc");
    let mut acct = VmEnergyAccountant::new(proc_root);
    // Which tid is which is not known from the channel order: find the busy one after the run.
    acct.add_vm("t1", VmTasks::new().with_thread(pid, t1));
    acct.add_vm("t2", VmTasks::new().with_thread(pid, t2));
    let start1 = task_cpu_ticks(proc_root, Task::Thread { pid, tid: t1 }).unwrap();
    let start2 = task_cpu_ticks(proc_root, Task::Thread { pid, tid: t2 }).unwrap();
    // At least 5 ticks (50 ms) of CPU for the busy thread: 300 ms on a quiet machine, longer
    // when other work shares the cores.
    let ticks = |tid, start| task_cpu_ticks(proc_root, Task::Thread { pid, tid }).unwrap() - start;
    thread::sleep(Duration::from_millis(300));
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while ticks(t1, start1).max(ticks(t2, start2)) < 5 && std::time::Instant::now() < end {
        thread::sleep(Duration::from_millis(50));
    }
    let d1 = ticks(t1, start1);
    let d2 = ticks(t2, start2);
    acct.account(1.0, 0.0);
    stop.store(true, Ordering::Relaxed);
    busy.join().unwrap();
    idle.join().unwrap();
    let (busy_vm, idle_vm) = if d1 > d2 { ("t1", "t2") } else { ("t2", "t1") };
    assert!(
        d1.max(d2) >= 5,
        "the busy thread used {} ticks in 300 ms",
        d1.max(d2)
    );
    assert!(
        acct.energy_uj(busy_vm) > acct.energy_uj(idle_vm),
        "busy {} µJ vs idle {} µJ",
        acct.energy_uj(busy_vm),
        acct.energy_uj(idle_vm)
    );
    assert_eq!(acct.energy_uj(busy_vm) + acct.energy_uj(idle_vm), 1_000_000);
    // The whole process includes both threads.
    assert!(task_cpu_ticks(proc_root, Task::Process(pid)).unwrap() >= d1.max(d2));
}
