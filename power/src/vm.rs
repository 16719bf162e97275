//! Per-VM energy: split each interval's energy into an idle (base) part and an active part, and
//! apportion both to the VMs.
//!
//! # The split (after Lang, *Energy Accounting for Virtual Machines*, Diplomarbeit, Universität Karlsruhe)
//!
//! Lang breaks every device's consumption into **base cost**, "the minimum power consumption of the
//! device; the amount of energy the device needs even if it is idle", which "cannot be influenced by
//! the operating system", and **access cost**, "the additional energy consumption that is caused by
//! clients using the device" (§3.3). Access cost is charged to whoever caused it; base cost is
//! apportioned "to the virtual machines, for example by dividing it equally between them" (§3.3.2),
//! which is what his CPU accountant does (`idle_energy /= (max_domain - min_domain + 1)`, §4) and what
//! his disk accountant does (`idle_energy /= client_count`).
//!
//! This module follows that design:
//!
//! * **base** = idle watts × interval length, capped at the interval's energy. Idle watts come from an
//!   idle baseline measured with [`Sampler::baseline`](crate::sampler::Sampler::baseline), or for the
//!   estimate from its configured idle watts. The base part is divided **evenly** among the registered
//!   VMs: idle power is paid for keeping the machine on for all of them, and no VM's activity changes
//!   it, so charging it by activity would make a busy VM pay for its idle neighbours' share.
//! * **active** = the rest. It is apportioned by **CPU time**: the increase of `utime + stime` of each
//!   VM's processes (`/proc/PID/stat`, which includes threads that already exited — use it for the
//!   QEMU process) and threads (`/proc/PID/task/TID/stat` — use it for the backend's worker threads of
//!   that VM). If no VM used CPU in an interval, the active part is split evenly too.
//!
//! So the VMs' shares always add up to the interval's energy. Energy that other host processes
//! cause is thereby charged to the VMs in proportion to their CPU time; give every task that works
//! for a VM (vCPU threads are inside the QEMU process; add the backend's worker thread ids) and do not
//! give the same thread to two VMs.
//!
//! For a backend, [`VmEnergyMeter`] runs this every period over a [`Sampler`] and answers
//! [`VmEnergyHandle::energy_uj`] (µJ since the VM was registered; `u64::MAX` when unknown).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::error::PowerError;
use crate::periodic::{lock, BackgroundThread};
use crate::sampler::{Mark, Sampler};
use crate::source::Kind;

/// A task whose CPU time is charged to a VM: a whole process (`/proc/PID/stat`, all its threads,
/// exited ones included) or one thread (`/proc/PID/task/TID/stat`).
pub use vnb_common::procfs::Task;

/// The tasks of one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmTasks {
    /// Processes and threads whose CPU time counts for this VM.
    pub tasks: Vec<Task>,
}

impl VmTasks {
    /// No tasks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a whole process (for example QEMU).
    pub fn with_process(mut self, pid: u32) -> Self {
        self.tasks.push(Task::Process(pid));
        self
    }

    /// Add one thread (for example a backend worker thread serving this VM).
    pub fn with_thread(mut self, pid: u32, tid: u32) -> Self {
        self.tasks.push(Task::Thread { pid, tid });
        self
    }
}

/// Read a task's `utime + stime` in clock ticks under `proc_root`.
pub fn task_cpu_ticks(proc_root: &Path, task: Task) -> io::Result<u64> {
    task.cpu_ticks(proc_root)
}

/// One VM's part of an interval's energy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Share {
    /// Its slice of the idle (base) energy, joules.
    pub base_joules: f64,
    /// Its slice of the active energy, joules.
    pub active_joules: f64,
}

impl Share {
    /// Base plus active.
    pub fn total(&self) -> f64 {
        self.base_joules + self.active_joules
    }
}

/// Split `total_j` among VMs: `base_j` (capped to `[0, total]`) evenly, the rest in proportion to
/// `cpu` (any unit; evenly if all are zero). The shares add up to `max(total_j, 0)`.
pub fn apportion(total_j: f64, base_j: f64, cpu: &[f64]) -> Vec<Share> {
    let n = cpu.len();
    if n == 0 {
        return Vec::new();
    }
    let total = if total_j.is_finite() {
        total_j.max(0.0)
    } else {
        0.0
    };
    let base = if base_j.is_finite() {
        base_j.clamp(0.0, total)
    } else {
        0.0
    };
    let active = total - base;
    let sum_cpu: f64 = cpu.iter().map(|c| c.max(0.0)).sum();
    cpu.iter()
        .map(|&c| Share {
            base_joules: base / n as f64,
            active_joules: if sum_cpu > 0.0 {
                active * c.max(0.0) / sum_cpu
            } else {
                active / n as f64
            },
        })
        .collect()
}

/// A VM's energy so far.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmEnergy {
    /// VM name.
    pub name: String,
    /// Base (idle) part, µJ.
    pub base_uj: u64,
    /// Active part, µJ.
    pub active_uj: u64,
    /// Base plus active, µJ.
    pub total_uj: u64,
    /// CPU time charged, seconds.
    pub cpu_seconds: f64,
}

#[derive(Debug, Clone)]
struct VmAccount {
    tasks: VmTasks,
    last: HashMap<Task, u64>,
    base_j: f64,
    active_j: f64,
    cpu_ticks: u64,
}

fn to_uj(j: f64) -> u64 {
    let uj = (j * 1e6).round();
    if uj.is_finite() && uj >= 0.0 {
        uj.min(u64::MAX as f64 - 1.0) as u64
    } else {
        0
    }
}

/// Keeps each VM's cumulative base and active energy.
#[derive(Debug, Clone)]
pub struct VmEnergyAccountant {
    proc_root: PathBuf,
    hz: f64,
    vms: BTreeMap<String, VmAccount>,
}

impl VmEnergyAccountant {
    /// Read task CPU times under `proc_root` (normally `/proc`).
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        VmEnergyAccountant {
            proc_root: proc_root.into(),
            hz: vnb_common::procfs::clock_ticks_per_second(),
            vms: BTreeMap::new(),
        }
    }

    fn read_ticks(&self, tasks: &VmTasks) -> HashMap<Task, u64> {
        tasks
            .tasks
            .iter()
            .filter_map(|&t| task_cpu_ticks(&self.proc_root, t).ok().map(|v| (t, v)))
            .collect()
    }

    /// Register a VM (or restart its account). Its CPU time counts from now.
    pub fn add_vm(&mut self, name: &str, tasks: VmTasks) {
        let last = self.read_ticks(&tasks);
        self.vms.insert(
            name.to_string(),
            VmAccount {
                tasks,
                last,
                base_j: 0.0,
                active_j: 0.0,
                cpu_ticks: 0,
            },
        );
    }

    /// Replace a VM's tasks, keeping its energy so far. False when the VM is unknown.
    pub fn set_tasks(&mut self, name: &str, tasks: VmTasks) -> bool {
        let fresh = self.read_ticks(&tasks);
        let Some(vm) = self.vms.get_mut(name) else {
            return false;
        };
        // Keep the previous reading of tasks that stay, so their time since then still counts.
        let mut last = HashMap::new();
        for (t, v) in fresh {
            last.insert(t, vm.last.get(&t).copied().unwrap_or(v));
        }
        vm.tasks = tasks;
        vm.last = last;
        true
    }

    /// Forget a VM; returns its final energy.
    pub fn remove_vm(&mut self, name: &str) -> Option<VmEnergy> {
        let e = self.energy(name);
        self.vms.remove(name);
        e
    }

    /// Names of the registered VMs.
    pub fn vm_names(&self) -> Vec<String> {
        self.vms.keys().cloned().collect()
    }

    /// Charge one interval: read every VM's CPU time increase since the last call, split `total_j`
    /// with `base_j` as the idle part. Returns each VM's share of this interval.
    pub fn account(&mut self, total_j: f64, base_j: f64) -> Vec<(String, Share)> {
        let mut deltas = Vec::with_capacity(self.vms.len());
        let proc_root = self.proc_root.clone();
        for vm in self.vms.values_mut() {
            let mut delta = 0u64;
            let mut last = HashMap::new();
            for &t in &vm.tasks.tasks {
                let Ok(now) = task_cpu_ticks(&proc_root, t) else {
                    continue; // gone (exited): its time since the last read is lost
                };
                if let Some(prev) = vm.last.get(&t) {
                    delta += now.saturating_sub(*prev);
                }
                last.insert(t, now);
            }
            vm.last = last;
            deltas.push(delta);
        }
        let cpu: Vec<f64> = deltas.iter().map(|&d| d as f64).collect();
        let shares = apportion(total_j, base_j, &cpu);
        let mut out = Vec::with_capacity(shares.len());
        for ((name, vm), (share, delta)) in self.vms.iter_mut().zip(shares.into_iter().zip(deltas))
        {
            vm.base_j += share.base_joules;
            vm.active_j += share.active_joules;
            vm.cpu_ticks += delta;
            out.push((name.clone(), share));
        }
        out
    }

    /// A VM's energy so far.
    pub fn energy(&self, name: &str) -> Option<VmEnergy> {
        let vm = self.vms.get(name)?;
        Some(VmEnergy {
            name: name.to_string(),
            base_uj: to_uj(vm.base_j),
            active_uj: to_uj(vm.active_j),
            total_uj: to_uj(vm.base_j + vm.active_j),
            cpu_seconds: vm.cpu_ticks as f64 / self.hz,
        })
    }

    /// A VM's energy in µJ since it was registered; `u64::MAX` when the VM is unknown.
    pub fn energy_uj(&self, name: &str) -> u64 {
        self.energy(name).map(|e| e.total_uj).unwrap_or(u64::MAX)
    }

    /// Every VM's energy.
    pub fn all(&self) -> Vec<VmEnergy> {
        self.vms.keys().filter_map(|n| self.energy(n)).collect()
    }
}

/// Settings of a [`VmEnergyMeter`].
#[derive(Debug, Clone)]
pub struct MeterConfig {
    /// How often energy is apportioned.
    pub period: Duration,
    /// Idle watts of the primary source; `None` = the source's own hint (the estimate's idle watts),
    /// else 0 (everything counts as active). Measure it with
    /// [`Sampler::baseline`](crate::sampler::Sampler::baseline) on an idle machine.
    pub base_watts: Option<f64>,
    /// Where `PID/stat` files are (normally `/proc`).
    pub proc_root: PathBuf,
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            period: Duration::from_secs(1),
            base_watts: None,
            proc_root: PathBuf::from("/proc"),
        }
    }
}

/// Totals of what the meter has apportioned.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MeterStatus {
    /// Apportioning steps done.
    pub periods: u64,
    /// Joules apportioned to VMs (intervals with no VM registered are not counted).
    pub accounted_joules: f64,
    /// Seconds covered by those intervals.
    pub accounted_seconds: f64,
    /// The last error reading the sources, if the last step failed.
    pub last_error: Option<String>,
}

struct MeterState {
    acct: VmEnergyAccountant,
    prev: Mark,
    status: MeterStatus,
}

struct MeterShared {
    sampler: Sampler,
    state: Mutex<MeterState>,
    /// Held while a step reads the sources and apportions: steps never interleave.
    step: Mutex<()>,
    base_watts: f64,
}

impl MeterShared {
    fn step(&self) -> Result<(), PowerError> {
        // Reading the sources can take as long as a meter command's timeout: it happens under
        // the step lock only, never under the state lock that readers of the VMs' energy (a
        // guest's control reply, the metrics) take.
        let _one_step = lock(&self.step);
        let now = self.sampler.mark();
        let mut st = lock(&self.state);
        let now = match now {
            Ok(m) => m,
            Err(e) => {
                st.status.last_error = Some(e.to_string());
                return Err(e);
            }
        };
        let iv = self.sampler.between(&st.prev, &now);
        st.prev = now;
        let total = iv.total_joules().unwrap_or(0.0);
        let base = self.base_watts * iv.duration_s;
        let has_vms = !st.acct.vms.is_empty();
        st.acct.account(total, base);
        st.status.periods += 1;
        st.status.last_error = None;
        if has_vms {
            st.status.accounted_joules += total.max(0.0);
            st.status.accounted_seconds += iv.duration_s;
        }
        Ok(())
    }
}

/// Apportions the sampler's energy to VMs every period, in a thread.
pub struct VmEnergyMeter {
    shared: Arc<MeterShared>,
    thread: BackgroundThread,
}

/// A cheap, cloneable handle a backend keeps to register VMs and read their energy.
#[derive(Clone)]
pub struct VmEnergyHandle {
    shared: Arc<MeterShared>,
}

impl std::fmt::Debug for VmEnergyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmEnergyHandle")
            .field("kind", &self.kind())
            .field("base_watts", &self.shared.base_watts)
            .finish()
    }
}

impl std::fmt::Debug for VmEnergyMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmEnergyMeter")
            .field("handle", &self.handle())
            .finish()
    }
}

impl VmEnergyMeter {
    /// Start apportioning `sampler`'s primary source every `config.period`.
    pub fn start(sampler: Sampler, config: MeterConfig) -> Result<Self, PowerError> {
        if config.period.is_zero() {
            return Err(PowerError::Config("the meter period must be > 0".into()));
        }
        let base_watts = config
            .base_watts
            .or_else(|| sampler.sources().first().and_then(|m| m.base_watts_hint))
            .unwrap_or(0.0);
        if !base_watts.is_finite() || base_watts < 0.0 {
            return Err(PowerError::Config(format!(
                "base watts must be >= 0, got {base_watts}"
            )));
        }
        let prev = sampler.mark()?;
        let shared = Arc::new(MeterShared {
            sampler,
            state: Mutex::new(MeterState {
                acct: VmEnergyAccountant::new(config.proc_root),
                prev,
                status: MeterStatus::default(),
            }),
            step: Mutex::new(()),
            base_watts,
        });
        let th = Arc::clone(&shared);
        let period = config.period;
        let thread = BackgroundThread::spawn("vnb-power-vm-meter", move |stop| {
            while !stop.wait_until(std::time::Instant::now() + period) {
                if let Err(e) = th.step() {
                    tracing::warn!("per-VM energy: {e}");
                }
            }
        })
        .map_err(|e| PowerError::Config(format!("cannot start the meter thread: {e}")))?;
        Ok(VmEnergyMeter { shared, thread })
    }

    /// A handle for the backend.
    pub fn handle(&self) -> VmEnergyHandle {
        VmEnergyHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Stop the meter thread (the sampler stops when the last handle is dropped).
    pub fn stop(self) {
        self.thread.stop();
    }
}

impl VmEnergyHandle {
    /// Register a VM; its energy counts from the next period boundary (at most one period early).
    pub fn register_vm(&self, name: &str, tasks: VmTasks) {
        lock(&self.shared.state).acct.add_vm(name, tasks);
    }

    /// Replace a VM's tasks (a worker thread started, QEMU reconnected with a new pid).
    pub fn set_tasks(&self, name: &str, tasks: VmTasks) -> bool {
        lock(&self.shared.state).acct.set_tasks(name, tasks)
    }

    /// Forget a VM; returns its final energy.
    pub fn unregister_vm(&self, name: &str) -> Option<VmEnergy> {
        lock(&self.shared.state).acct.remove_vm(name)
    }

    /// The VM's apportioned energy in µJ since it was registered; `u64::MAX` when unknown (no such
    /// VM, or the last read of the power source failed).
    pub fn energy_uj(&self, name: &str) -> u64 {
        let st = lock(&self.shared.state);
        if st.status.last_error.is_some() {
            return u64::MAX;
        }
        st.acct.energy_uj(name)
    }

    /// One VM's energy with its base/active split.
    pub fn energy(&self, name: &str) -> Option<VmEnergy> {
        lock(&self.shared.state).acct.energy(name)
    }

    /// Every VM's energy.
    pub fn all(&self) -> Vec<VmEnergy> {
        lock(&self.shared.state).acct.all()
    }

    /// Apportion now instead of waiting for the period.
    pub fn flush(&self) -> Result<(), PowerError> {
        self.shared.step()
    }

    /// Whether the numbers are measured or ESTIMATED (label them accordingly).
    pub fn kind(&self) -> Kind {
        self.shared.sampler.kind()
    }

    /// The idle watts used for the base part.
    pub fn base_watts(&self) -> f64 {
        self.shared.base_watts
    }

    /// What has been apportioned so far.
    pub fn status(&self) -> MeterStatus {
        lock(&self.shared.state).status.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apportion_sums_to_total() {
        let shares = apportion(100.0, 40.0, &[3.0, 1.0, 0.0, 6.0]);
        let sum: f64 = shares.iter().map(Share::total).sum();
        assert!((sum - 100.0).abs() < 1e-9);
        for s in &shares {
            assert!((s.base_joules - 10.0).abs() < 1e-12);
        }
        assert!((shares[0].active_joules - 18.0).abs() < 1e-9);
        assert!((shares[1].active_joules - 6.0).abs() < 1e-9);
        assert_eq!(shares[2].active_joules, 0.0);
        assert!((shares[3].active_joules - 36.0).abs() < 1e-9);
    }

    #[test]
    fn apportion_edge_cases() {
        assert!(apportion(5.0, 1.0, &[]).is_empty());
        // Base larger than total: everything is base, split evenly.
        let s = apportion(10.0, 50.0, &[1.0, 9.0]);
        assert_eq!(
            s[0],
            Share {
                base_joules: 5.0,
                active_joules: 0.0
            }
        );
        // No CPU used: active split evenly.
        let s = apportion(10.0, 4.0, &[0.0, 0.0]);
        assert_eq!(
            s[1],
            Share {
                base_joules: 2.0,
                active_joules: 3.0
            }
        );
        // Negative or NaN inputs never produce negative energy.
        let s = apportion(-3.0, 1.0, &[1.0]);
        assert_eq!(s[0].total(), 0.0);
        let s = apportion(f64::NAN, 1.0, &[1.0]);
        assert_eq!(s[0].total(), 0.0);
    }
}
