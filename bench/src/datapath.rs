//! `vnb-bench datapath`: what the backend's data path costs, without a VM in the way.
//!
//! DPDK's testpmd (`net_virtio_user`) polls its rings and never waits for an interrupt, so it
//! drives the backend as fast as the backend goes. Two directions, frames of `--frame-len`
//! bytes (64 by default):
//! - `tx`: testpmd `txonly` → backend → tap; counted on the tap (`rx_packets`);
//! - `rx`: a packet socket floods the tap → backend → testpmd `rxonly`; counted as the frames
//!   the backend read from the tap (`tx_packets`), checked against what testpmd received.
//!
//! The figures are frames per second and frames per backend CPU-second. Each configuration
//! runs in its own network namespace with a fresh backend; repetitions are interleaved (rep 1
//! of every configuration, then rep 2, …) so that a shared machine's drift spreads over all of
//! them, and each configuration is compared with the first one rep by rep.
//!
//! Comparing `off` with an older build (an external template) answers "does the batching
//! machinery cost anything when it is off?".

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::model::Backend;
use vnb_common::packet::PacketSocket;
use vnb_common::procfs;

use crate::backend::BackendSpec;
use crate::error::{sh, BenchError, Result};
use crate::stats::Summary;
use crate::tapfloor::{self, FloorCounts, FloorRead};

const TAP: &str = "vnbdp0";
const MAC: &str = "52:54:00:77:06:02";
const HOST_IP: &str = "10.77.6.1/24";
/// Frames the kernel itself sends on a tap that comes up (IPv6 neighbour and router
/// discovery) count in the tap's counters too.
const SLACK: u64 = 100;

/// Which way the frames go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Guest (testpmd) → tap: the backend's TX path.
    Tx,
    /// Tap → guest (testpmd): the backend's RX path.
    Rx,
}

impl Direction {
    /// `tx` or `rx`.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Tx => "tx",
            Direction::Rx => "rx",
        }
    }

    fn fwd_mode(self) -> &'static str {
        match self {
            Direction::Tx => "txonly",
            Direction::Rx => "rxonly",
        }
    }

    /// What the direction measures, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Direction::Tx => "testpmd txonly → backend → tap (the TX path)",
            Direction::Rx => "packet socket → tap → backend → testpmd rxonly (the RX path)",
        }
    }
}

/// How hard the RX flood pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RxLoad {
    /// More than any backend takes: the sender sends 64 frames per `sendmmsg` and runs at a
    /// higher priority (nice −10) than the backend it shares a CPU with, so the tap's queue
    /// stays full and drops the excess. The backend never waits for a frame: frames per
    /// backend CPU-second are the cost of a frame, as on the TX side.
    #[default]
    Full,
    /// As `full`, but the sender runs at the backend's priority: each gets about half the
    /// CPU, a backend drains the tap faster than the sender fills it and waits for the next
    /// frame thousands of times a second. Its cost per frame includes those waits, and how
    /// many frames each wake-up finds is the scheduler's choice (`backend_waits` records it;
    /// it differs between backends).
    Even,
    /// One `send` per frame at normal priority (every campaign before 2026-12-06's read-ahead
    /// one): the sender and the backend share a CPU, the backend is idle about half the time
    /// and its cost per frame includes the sleeps and wake-ups the arrival rate decides.
    Partial,
}

impl RxLoad {
    /// What the load means, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            RxLoad::Full => {
                "the flood offers more than the backend takes; it never waits for a frame"
            }
            RxLoad::Even => {
                "64 frames per send at the backend's priority on its CPU; the backend drains \
                 the tap and waits for frames"
            }
            RxLoad::Partial => {
                "one send per frame at normal priority; the backend idles about half the time"
            }
        }
    }

    /// `full` or `partial`.
    pub fn name(self) -> &'static str {
        match self {
            RxLoad::Full => "full",
            RxLoad::Even => "even",
            RxLoad::Partial => "partial",
        }
    }
}

impl std::str::FromStr for RxLoad {
    type Err = BenchError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(RxLoad::Full),
            "even" => Ok(RxLoad::Even),
            "partial" => Ok(RxLoad::Partial),
            _ => Err(BenchError::Input(format!(
                "unknown RX load {s:?}: use full, even or partial"
            ))),
        }
    }
}

/// Old campaigns' results (before `rx_load` was recorded) were measured at partial load.
fn partial() -> RxLoad {
    RxLoad::Partial
}

impl std::str::FromStr for Direction {
    type Err = BenchError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tx" => Ok(Direction::Tx),
            "rx" => Ok(Direction::Rx),
            _ => Err(BenchError::Input(format!(
                "unknown direction {s:?}: use tx or rx"
            ))),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct DatapathOptions {
    /// Configurations: ours in a mode, or external backends. The first is the reference.
    pub configs: Vec<Backend>,
    /// Directions, in order.
    pub directions: Vec<Direction>,
    /// Ethernet frame length, bytes (60 to 1514).
    pub frame_len: u16,
    /// How hard the RX flood pushes.
    pub rx_load: RxLoad,
    /// Repetitions per configuration.
    pub reps: u32,
    /// Measured seconds per run (after the warm-up).
    pub duration: u32,
    /// Seconds testpmd runs before the measurement starts.
    pub warmup: u32,
    /// The repository (for `ci/`).
    pub repo: PathBuf,
    /// The `vhost-net-batch` binary.
    pub vnb_bin: PathBuf,
    /// The command line, recorded for reruns.
    pub command: String,
    /// Scratch directory (sockets, logs).
    pub scratch: PathBuf,
    /// Bare tap readers run beside the configurations in direction `rx`, each repetition
    /// ([`crate::tapfloor`]; named `floor:HOW`).
    pub floor: Vec<FloorRead>,
}

/// One testpmd run against one configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatapathRun {
    /// The configuration's name.
    pub config: String,
    /// Which way the frames went.
    pub direction: Direction,
    /// Repetition, from 1.
    pub rep: u32,
    /// Length of the measured window, s.
    pub seconds: f64,
    /// Frames offered to the backend over the whole run (warm-up included): what testpmd
    /// sent (`tx`) or what the packet socket sent into the tap (`rx`).
    pub offered: u64,
    /// Frames the backend moved over the whole run, by the tap's counters: written to the
    /// tap (`tx`) or read from it (`rx`).
    pub moved_total: u64,
    /// Frames the backend moved in the measured window.
    pub moved: u64,
    /// Frames that arrived at the far end over the whole run: the tap (`tx`, the same as
    /// `moved_total`) or testpmd (`rx`).
    pub delivered: u64,
    /// Backend CPU time in the measured window, s.
    pub backend_cpu_s: f64,
    /// Times the backend's threads went to sleep in the measured window (voluntary context
    /// switches): near 0 when frames never run out, one per wake-up when they do. Not
    /// recorded before 2026-12-06's `even` campaign (0 there).
    #[serde(default)]
    pub backend_waits: u64,
    /// `moved / seconds`.
    pub pps: f64,
    /// `moved / backend_cpu_s`.
    pub per_cpu_s: f64,
    /// Why the run produced no figures.
    pub error: Option<String>,
}

/// What one run's measured window saw.
struct Window {
    /// Its length, s.
    seconds: f64,
    /// Frames moved in it.
    moved: u64,
    /// The backend's (or floor reader's) CPU time in it, s.
    cpu_s: f64,
    /// Its voluntary context switches in it.
    waits: u64,
}

impl Window {
    /// Measures `secs` (less when `stop` is set) of `rig`'s tap counter `stat` and of the
    /// `(CPU seconds, voluntary context switches)` that `cpu` reads.
    fn measure(
        rig: &Rig,
        stat: &str,
        stop: &AtomicBool,
        secs: u32,
        cpu: impl Fn() -> (f64, u64),
    ) -> Result<Window> {
        let snapshot = || (Instant::now(), rig.tap_stat(stat), cpu());
        let (t0, m0, (cpu0, waits0)) = snapshot();
        sleep_unless(stop, secs);
        let (t1, m1, (cpu1, waits1)) = snapshot();
        Ok(Window {
            seconds: (t1 - t0).as_secs_f64(),
            moved: m1?.saturating_sub(m0?),
            cpu_s: cpu1 - cpu0,
            waits: waits1.saturating_sub(waits0),
        })
    }
}

impl DatapathRun {
    /// The record of a run that ran: the whole run's `(offered, moved_total, delivered)`
    /// and its window; the rates follow from the window.
    fn measured(
        config: String,
        direction: Direction,
        rep: u32,
        (offered, moved_total, delivered): (u64, u64, u64),
        w: Window,
    ) -> Self {
        DatapathRun {
            config,
            direction,
            rep,
            seconds: w.seconds,
            offered,
            moved_total,
            moved: w.moved,
            delivered,
            backend_cpu_s: w.cpu_s,
            backend_waits: w.waits,
            pps: w.moved as f64 / w.seconds,
            per_cpu_s: if w.cpu_s > 0.0 {
                w.moved as f64 / w.cpu_s
            } else {
                0.0
            },
            error: None,
        }
    }
}

/// A whole `datapath` campaign.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatapathCampaign {
    /// The command that produced it.
    pub command: String,
    /// Configuration names, the reference first.
    pub configs: Vec<String>,
    /// Directions measured.
    pub directions: Vec<Direction>,
    /// Ethernet frame length, bytes.
    #[serde(default = "default_frame_len")]
    pub frame_len: u16,
    /// How hard the RX flood pushed.
    #[serde(default = "partial")]
    pub rx_load: RxLoad,
    /// Measured seconds per run.
    pub duration: u32,
    /// Every run, in the order run.
    pub runs: Vec<DatapathRun>,
    /// Ctrl-C cut the campaign short.
    pub interrupted: bool,
}

fn default_frame_len() -> u16 {
    64
}

/// The frame lengths `datapath` accepts: an Ethernet minimum to a standard MTU frame.
pub const FRAME_LENS: std::ops::RangeInclusive<u16> = 60..=1514;

/// The namespace, the backend and testpmd of one run; dropping it tears everything down.
struct Rig {
    repo: PathBuf,
    ns: String,
    backend: Option<Child>,
    testpmd: Option<Child>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for c in [self.testpmd.take(), self.backend.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(self.repo.join("ci/netns.sh"))
            .args(["delete", &self.ns])
            .stderr(Stdio::null())
            .status();
    }
}

impl Rig {
    /// A counter of the tap; `rx_packets` are frames the backend wrote, `tx_packets` frames it
    /// read.
    fn tap_stat(&self, stat: &str) -> Result<u64> {
        let path = format!("/sys/class/net/{TAP}/statistics/{stat}");
        let out = sh(Command::new("ip").args(["netns", "exec", &self.ns, "cat", &path]))?;
        out.trim().parse().map_err(|_| BenchError::Output {
            tool: "sysfs",
            msg: format!("{path} in {}: {out:?}", self.ns),
        })
    }

    fn backend_pid(&self) -> u32 {
        self.backend.as_ref().map_or(0, |c| c.id())
    }
}

/// Checks what testpmd needs before anything starts.
pub fn prerequisites() -> Result<()> {
    let found = Command::new("sh")
        .args(["-c", "command -v dpdk-testpmd >/dev/null"])
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        return Err(BenchError::Setup(
            "dpdk-testpmd not found: install the Debian package dpdk (ci/setup.sh)".into(),
        ));
    }
    let huge: u64 = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if huge < 128 {
        return Err(BenchError::Setup(format!(
            "DPDK needs at least 128 hugepages of 2 MiB, {huge} are reserved: run ci/setup.sh"
        )));
    }
    Ok(())
}

/// The number after `key` in testpmd's last accumulated statistics block.
pub fn testpmd_total(out: &str, key: &str) -> Option<u64> {
    let (_, block) = out.rsplit_once("Accumulated forward statistics")?;
    block
        .split(key)
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Frames the RX flood sends per `sendmmsg` at full load.
const FLOOD_BATCH: usize = 64;
/// The RX flood's nice value at full load.
const FULL_NICE: libc::c_int = -10;
/// The CPU the backend and the RX flood share at full load. testpmd (`-l 0-1`) forwards on
/// CPU 1 and keeps its main thread, mostly asleep, on CPU 0.
const SHARED_CPU: usize = 0;

/// Pins thread `tid` to `cpu`.
fn pin(tid: libc::pid_t, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is valid for the call.
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(BenchError::Setup(format!(
            "sched_setaffinity {tid} to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Pins every thread of process `pid` to `cpu`.
fn pin_process(pid: u32, cpu: usize) -> Result<()> {
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).map_err(BenchError::file(&dir))?;
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) {
            // A thread may have ended meanwhile.
            let _ = pin(tid, cpu);
        }
    }
    Ok(())
}

/// Moves the calling thread (only) into the network namespace `ns`.
fn enter_ns(ns: &str) -> Result<()> {
    let nsf = std::fs::File::open(format!("/var/run/netns/{ns}"))
        .map_err(BenchError::file(format!("/var/run/netns/{ns}")))?;
    // SAFETY: moves only this thread into the namespace; the fd is valid.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&nsf), libc::CLONE_NEWNET) } != 0 {
        return Err(BenchError::Setup(format!(
            "setns {ns}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Floods the tap with `len`-byte frames from a packet socket until `stop`; returns how many
/// the kernel took (the tap drops what its queue cannot hold). Runs on its own thread, which
/// enters the namespace `ns`.
fn flood(ns: &str, len: usize, load: RxLoad, stop: &AtomicBool) -> Result<u64> {
    enter_ns(ns)?;
    // Protocol 0: this socket sends only.
    let sock = PacketSocket::open(TAP, 0)
        .and_then(|s| {
            // Straight to the tap's queue: a full queue drops, the sender never waits.
            s.bypass_qdisc()?;
            Ok(s)
        })
        .map_err(|e| BenchError::Setup(format!("packet socket on {TAP} in {ns}: {e}")))?;
    // To the guest's MAC from a locally administered one; IEEE local experimental EtherType
    // 0x88b6 (0x88b5 is the control message's, which the backend drops from the tap).
    let mut frame = vec![0u8; len];
    frame[..6].copy_from_slice(&[0x52, 0x54, 0x00, 0x77, 0x06, 0x02]);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0x77, 0x06, 0x01]);
    frame[12..14].copy_from_slice(&[0x88, 0xb6]);
    let batch = match load {
        RxLoad::Partial => 1,
        RxLoad::Full | RxLoad::Even => {
            // This thread only: it shares the backend's CPU; at full load it must offer more
            // than any backend takes.
            // SAFETY: a syscall on this thread's id.
            let tid = unsafe { libc::gettid() };
            pin(tid, SHARED_CPU)?;
            let nice = if load == RxLoad::Full { FULL_NICE } else { 0 };
            // SAFETY: a syscall on this thread's id.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
                return Err(BenchError::Setup(format!(
                    "setpriority {nice} for the RX flood (needs root or CAP_SYS_NICE): {}",
                    std::io::Error::last_os_error()
                )));
            }
            FLOOD_BATCH
        }
    };
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let res = if batch == 1 {
            sock.send(&frame).map(|_| 1)
        } else {
            sock.send_copies(&frame, batch)
        };
        match res {
            Ok(n) => sent += n as u64,
            Err(vnb_common::packet::PacketError::Io(_, e))
                if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(e) => {
                return Err(BenchError::Workload(format!("send into {TAP}: {e}")));
            }
        }
    }
    Ok(sent)
}

fn run_one(
    opts: &DatapathOptions,
    cfg: &Backend,
    dir_kind: Direction,
    ci: usize,
    rep: u32,
    stop: &AtomicBool,
) -> Result<DatapathRun> {
    let tag = format!("{}c{ci}r{rep}", dir_kind.name());
    let ns = format!("vnbd{}{tag}", std::process::id() % 10000);
    let dir = opts
        .scratch
        .join(format!("{}-{tag}", cfg.name().replace(':', "_")));
    std::fs::create_dir_all(&dir).map_err(BenchError::file(&dir))?;
    sh(Command::new(opts.repo.join("ci/netns.sh")).args(["create", &ns]))?;
    let mut rig = Rig {
        repo: opts.repo.clone(),
        ns: ns.clone(),
        backend: None,
        testpmd: None,
    };
    let sock = dir.join("vm.sock");
    rig.backend = Some(
        BackendSpec {
            config: cfg,
            vnb_bin: &opts.vnb_bin,
            ns: &ns,
            vm: "dp",
            tap: TAP,
            mac: MAC,
            socket: &sock,
            control: None,
            log: dir.join("backend.log"),
        }
        .start()?,
    );
    sh(Command::new(opts.repo.join("ci/netns.sh")).args(["addr", &ns, TAP, HOST_IP]))?;

    // The tap's counters seen from the host: frames the backend wrote (`rx_packets`) or read
    // (`tx_packets`).
    let stat = match dir_kind {
        Direction::Tx => "rx_packets",
        Direction::Rx => "tx_packets",
    };
    let moved0 = rig.tap_stat(stat)?;
    let out_path = dir.join("testpmd.log");
    let out = std::fs::File::create(&out_path).map_err(BenchError::file(&out_path))?;
    let mut testpmd = Command::new("dpdk-testpmd");
    testpmd
        .args(["-l", "0-1", "--no-pci", "--single-file-segments"])
        .args(["-m", "256", "--file-prefix"])
        .arg(format!("vnbdp{}{tag}", std::process::id()))
        .arg("--vdev")
        .arg(format!("net_virtio_user0,path={},queues=1", sock.display()))
        .args([
            "--",
            "--forward-mode",
            dir_kind.fwd_mode(),
            "--stats-period",
            "1",
        ])
        .arg("--no-lsc-interrupt");
    if dir_kind == Direction::Tx {
        // The length of the frames testpmd builds.
        testpmd
            .arg("--tx-first")
            .arg(format!("--txpkts={}", opts.frame_len));
    }
    rig.testpmd = Some(
        testpmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(BenchError::file(&out_path))?)
            .stderr(out)
            .spawn()
            .map_err(|source| BenchError::Spawn {
                cmd: "dpdk-testpmd".into(),
                source,
            })?,
    );
    let sleep = |secs: u32| sleep_unless(stop, secs);
    let flood_stop = AtomicBool::new(false);
    // The backend shares the flood's CPU at full and even load.
    let shares_cpu = dir_kind == Direction::Rx && opts.rx_load != RxLoad::Partial;
    if shares_cpu {
        pin_process(rig.backend_pid(), SHARED_CPU)?;
    }
    let measured = std::thread::scope(|s| {
        let sender = (dir_kind == Direction::Rx).then(|| {
            // testpmd needs a moment to bring its port up before frames can land anywhere.
            sleep(1);
            s.spawn(|| flood(&ns, opts.frame_len.into(), opts.rx_load, &flood_stop))
        });
        let pid = rig.backend_pid();
        if shares_cpu {
            // Again once testpmd is connected: threads started for the connection exist now.
            let _ = pin_process(pid, SHARED_CPU);
        }
        sleep(opts.warmup);
        let cpu = || {
            (
                procfs::cpu_seconds(pid).unwrap_or(0.0),
                procfs::voluntary_context_switches(pid).unwrap_or(0),
            )
        };
        let window = Window::measure(&rig, stat, stop, opts.duration, cpu);
        flood_stop.store(true, Ordering::Relaxed);
        let offered = sender.map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(BenchError::Workload("the sender panicked".into())))
        });
        (window, offered)
    });
    let (window, flooded) = measured;
    let window = window?;
    let flooded = flooded.transpose()?;
    if stop.load(Ordering::Relaxed) {
        return Err(BenchError::Workload("interrupted".into()));
    }
    // Let the backend finish what is queued, then testpmd prints its totals on SIGINT and
    // exits. The tap is read first: a backend may end, and its tap go, with its frontend
    // (cloud-hypervisor's does).
    std::thread::sleep(Duration::from_millis(300));
    let moved_total = rig.tap_stat(stat)?.saturating_sub(moved0);
    let tp = rig.testpmd.as_mut().expect("testpmd started");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tp.id() as i32, libc::SIGINT) };
    let end = Instant::now() + Duration::from_secs(20);
    while tp.try_wait().ok().flatten().is_none() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log_text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let total = |key: &str| {
        testpmd_total(&log_text, key).ok_or_else(|| BenchError::Output {
            tool: "dpdk-testpmd",
            msg: format!("printed no {key} total:\n{log_text}"),
        })
    };
    let (offered, delivered) = match dir_kind {
        Direction::Tx => (total("TX-packets:")?, moved_total),
        Direction::Rx => (flooded.unwrap_or(0), total("RX-packets:")?),
    };
    let (moved, backend_cpu_s) = (window.moved, window.cpu_s);
    let mut run = DatapathRun::measured(
        cfg.name(),
        dir_kind,
        rep,
        (offered, moved_total, delivered),
        window,
    );
    if moved == 0 {
        run.error = Some(format!(
            "the backend moved no frame; testpmd said:\n{log_text}"
        ));
    } else if moved_total > offered + SLACK {
        run.error = Some(format!(
            "the backend moved {moved_total} frames but only {offered} were offered"
        ));
    } else if delivered > moved_total + SLACK || delivered < moved_total / 10 * 9 {
        // Frames the backend took from the tap must reach testpmd (a few may still be in
        // flight at the end; losing more would be the backend's fault).
        run.error = Some(format!(
            "the backend read {moved_total} frames from the tap but testpmd received {delivered}"
        ));
    } else if backend_cpu_s <= 0.0 {
        run.error = Some("the backend used no CPU time (is the pid right?)".into());
    }
    Ok(run)
}

/// Sleeps `secs`, or less when `stop` is set.
fn sleep_unless(stop: &AtomicBool, secs: u32) {
    let end = Instant::now() + Duration::from_secs(secs.into());
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One run of the bare tap reader `how` on the RX flood, where a backend would be: its own
/// namespace and tap (with the backend's virtio-net header), the same flood, the reader's
/// thread on the backend's CPU at full and even load; its thread's CPU time is the
/// "backend CPU". Nothing goes to a guest.
fn run_floor(
    opts: &DatapathOptions,
    how: FloorRead,
    ci: usize,
    rep: u32,
    stop: &AtomicBool,
) -> Result<DatapathRun> {
    let ns = format!("vnbd{}rxc{ci}r{rep}", std::process::id() % 10000);
    sh(Command::new(opts.repo.join("ci/netns.sh")).args(["create", &ns]))?;
    let rig = Rig {
        repo: opts.repo.clone(),
        ns: ns.clone(),
        backend: None,
        testpmd: None,
    };
    // Made from a thread in the namespace, which ends at once: the device stays with the fd.
    let tap = std::thread::scope(|s| {
        s.spawn(|| {
            enter_ns(&ns)?;
            let tap = vhost_net_batch::tap::Tap::open(TAP, 1)
                .map_err(|e| BenchError::Setup(format!("tap {TAP} in {ns}: {e}")))?;
            // What the backend sets with VIRTIO_NET_F_MRG_RXBUF / VERSION_1.
            tap.set_vnet_hdr_len(12)
                .map_err(|e| BenchError::Setup(format!("tap {TAP} in {ns}: {e}")))?;
            Ok::<_, BenchError>(tap)
        })
        .join()
        .unwrap_or_else(|_| Err(BenchError::Setup("opening the tap panicked".into())))
    })?;
    sh(Command::new(opts.repo.join("ci/netns.sh")).args(["addr", &ns, TAP, HOST_IP]))?;
    let moved0 = rig.tap_stat("tx_packets")?;
    let shares_cpu = opts.rx_load != RxLoad::Partial;
    let counts = FloorCounts::default();
    let reader_stop = AtomicBool::new(false);
    let flood_stop = AtomicBool::new(false);
    let pid = std::process::id();
    let fd = tap.queue_fd(0);
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let measured = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            let pinned = if shares_cpu {
                pin(tid, SHARED_CPU)
            } else {
                Ok(())
            };
            let _ = tid_tx.send(tid as u32);
            pinned?;
            tapfloor::read_until(fd, how, &reader_stop, &counts)
                .map_err(|e| BenchError::Workload(format!("the {} floor reader: {e}", how.name())))
        });
        let tid = tid_rx.recv().unwrap_or(0);
        let sender = s.spawn(|| flood(&ns, opts.frame_len.into(), opts.rx_load, &flood_stop));
        sleep_unless(stop, opts.warmup);
        let cpu = || {
            (
                procfs::thread_cpu_seconds(pid, tid).unwrap_or(0.0),
                procfs::thread_voluntary_context_switches(pid, tid).unwrap_or(0),
            )
        };
        let window = Window::measure(&rig, "tx_packets", stop, opts.duration, cpu);
        flood_stop.store(true, Ordering::Relaxed);
        let offered = sender
            .join()
            .unwrap_or_else(|_| Err(BenchError::Workload("the sender panicked".into())));
        // Let the reader take what is queued.
        std::thread::sleep(Duration::from_millis(300));
        reader_stop.store(true, Ordering::Relaxed);
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(BenchError::Workload("the floor reader panicked".into())));
        (window, offered, read)
    });
    let (window, offered, read) = measured;
    let moved_total = rig.tap_stat("tx_packets")?.saturating_sub(moved0);
    drop(tap);
    let (window, offered) = (window?, offered?);
    read?;
    if stop.load(Ordering::Relaxed) {
        return Err(BenchError::Workload("interrupted".into()));
    }
    let (moved, backend_cpu_s) = (window.moved, window.cpu_s);
    let delivered = counts.frames.load(Ordering::Relaxed);
    let mut run = DatapathRun::measured(
        how.config(),
        Direction::Rx,
        rep,
        (offered, moved_total, delivered),
        window,
    );
    if moved == 0 {
        run.error = Some("the floor reader read no frame".into());
    } else if delivered.abs_diff(moved_total) > SLACK {
        // The tap counts what it handed over; the reader counts what it got.
        run.error = Some(format!(
            "the tap handed over {moved_total} frames but the reader counted {delivered}"
        ));
    } else if backend_cpu_s <= 0.0 {
        run.error = Some("the floor reader used no CPU time".into());
    }
    Ok(run)
}

/// Runs the campaign: every direction, every configuration `reps` times, interleaved.
pub fn run(opts: &DatapathOptions, stop: &Arc<AtomicBool>) -> Result<DatapathCampaign> {
    if opts.configs.is_empty() || opts.directions.is_empty() {
        return Err(BenchError::Input(
            "no configuration or direction to run".into(),
        ));
    }
    if !FRAME_LENS.contains(&opts.frame_len) {
        return Err(BenchError::Input(format!(
            "--frame-len {}: give {} to {} bytes",
            opts.frame_len,
            FRAME_LENS.start(),
            FRAME_LENS.end()
        )));
    }
    if let Some(c) = opts
        .configs
        .iter()
        .find(|c| matches!(c, Backend::QemuTap { .. }))
    {
        return Err(BenchError::Input(format!(
            "{}: QEMU's own virtio-net is not a vhost-user backend; datapath takes ours or --external",
            c.name()
        )));
    }
    prerequisites()?;
    let mut camp = DatapathCampaign {
        command: opts.command.clone(),
        configs: opts.configs.iter().map(Backend::name).collect(),
        directions: opts.directions.clone(),
        frame_len: opts.frame_len,
        rx_load: opts.rx_load,
        duration: opts.duration,
        runs: Vec::new(),
        interrupted: false,
    };
    let floors = if opts.directions.contains(&Direction::Rx) {
        opts.floor.as_slice()
    } else {
        &[]
    };
    camp.configs.extend(floors.iter().map(|how| how.config()));
    let total = opts.reps as usize * (opts.configs.len() * opts.directions.len() + floors.len());
    // What one repetition runs in one direction: each configuration, then (RX) each floor.
    enum Item<'a> {
        Config(&'a Backend),
        Floor(FloorRead),
    }
    for rep in 1..=opts.reps {
        for &d in &opts.directions {
            let items = opts.configs.iter().map(Item::Config).chain(
                floors
                    .iter()
                    .filter(|_| d == Direction::Rx)
                    .map(|&how| Item::Floor(how)),
            );
            for (ci, item) in items.enumerate() {
                if stop.load(Ordering::Relaxed) {
                    camp.interrupted = true;
                    return Ok(camp);
                }
                let (r, name) = match item {
                    Item::Config(cfg) => (run_one(opts, cfg, d, ci, rep, stop), cfg.name()),
                    Item::Floor(how) => (run_floor(opts, how, ci, rep, stop), how.config()),
                };
                if stop.load(Ordering::Relaxed) {
                    camp.interrupted = true;
                    return Ok(camp);
                }
                let run = r.unwrap_or_else(|e| DatapathRun {
                    config: name,
                    direction: d,
                    rep,
                    seconds: 0.0,
                    offered: 0,
                    moved_total: 0,
                    moved: 0,
                    delivered: 0,
                    backend_cpu_s: 0.0,
                    backend_waits: 0,
                    pps: 0.0,
                    per_cpu_s: 0.0,
                    error: Some(e.to_string()),
                });
                eprintln!(
                    "[{}/{total}] {} {} rep {rep}: {}",
                    camp.runs.len() + 1,
                    d.name(),
                    run.config,
                    match &run.error {
                        None => format!(
                            "{:.0} pps, {:.0} packets per backend CPU-second",
                            run.pps, run.per_cpu_s
                        ),
                        Some(e) => format!("error: {}", e.lines().next().unwrap_or_default()),
                    }
                );
                camp.runs.push(run);
            }
        }
    }
    Ok(camp)
}

/// Per-repetition ratios of `config` to the reference (the first configuration) in direction
/// `d` for a figure.
pub fn paired_ratios(
    c: &DatapathCampaign,
    d: Direction,
    config: &str,
    figure: fn(&DatapathRun) -> f64,
) -> Vec<f64> {
    let Some(reference) = c.configs.first() else {
        return Vec::new();
    };
    let ok = |name: &str, rep: u32| {
        c.runs
            .iter()
            .find(|r| r.config == name && r.direction == d && r.rep == rep && r.error.is_none())
    };
    c.runs
        .iter()
        .filter(|r| r.config == config && r.direction == d && r.error.is_none())
        .filter_map(|r| {
            let base = figure(ok(reference, r.rep)?);
            (base > 0.0).then(|| figure(r) / base)
        })
        .collect()
}

fn summary_of(
    c: &DatapathCampaign,
    d: Direction,
    config: &str,
    figure: fn(&DatapathRun) -> f64,
) -> Option<Summary> {
    let v: Vec<f64> = c
        .runs
        .iter()
        .filter(|r| r.config == config && r.direction == d && r.error.is_none())
        .map(figure)
        .collect();
    Summary::of(&v)
}

/// The report, as Markdown.
pub fn markdown(c: &DatapathCampaign) -> String {
    let mut s = String::from("# vnb-bench datapath\n\n");
    s += &format!(
        "DPDK testpmd (net_virtio_user, {}-byte frames) as the frontend, no VM. ",
        c.frame_len
    );
    s += &format!(
        "{} s measured per run, repetitions interleaved; ratios are per repetition against `{}`.\n\n",
        c.duration,
        c.configs.first().map(String::as_str).unwrap_or("-")
    );
    if c.configs.iter().any(|n| n.starts_with("floor:")) {
        s += "`floor:HOW` rows are no backend: a thread of vnb-bench reads the flooded tap the \
              way HOW says and copies each frame into a buffer, with no virtio work at all \
              (`bench/src/tapfloor.rs`), on the backend's CPU. Their \"backend\" CPU is that \
              thread's: what any tap reader pays per frame.\n\n";
    }
    if c.interrupted {
        s += "**Interrupted**: the campaign was cut short; the runs below are complete.\n\n";
    }
    for &d in &c.directions {
        s += &format!("## {}: {}\n\n", d.name(), d.describe());
        if d == Direction::Rx {
            s += &format!(
                "RX load: `{}` ({}).\n\n",
                c.rx_load.name(),
                c.rx_load.describe()
            );
        }
        s += "| configuration | runs | pps (mean ± sd) | packets per backend CPU-s (mean ± sd) | backend CPU share | backend waits per 1000 frames | pps ratio (median, min–max) | per CPU-s ratio (median, min–max) |\n";
        s += "|---|---|---|---|---|---|---|---|\n";
        for name in &c.configs {
            let n_ok = c
                .runs
                .iter()
                .filter(|r| &r.config == name && r.direction == d && r.error.is_none())
                .count();
            let fmt_sum = |x: Option<Summary>| {
                x.map_or("-".to_string(), |x| {
                    format!("{:.0} ± {:.0}", x.mean, x.stddev)
                })
            };
            let share = summary_of(c, d, name, |r| r.backend_cpu_s / r.seconds)
                .map_or("-".to_string(), |x| format!("{:.0} %", x.mean * 100.0));
            let waits = summary_of(c, d, name, waits_per_1000)
                .map_or("-".to_string(), |x| format!("{:.1}", x.mean));
            let ratio = |f: fn(&DatapathRun) -> f64| {
                Summary::of(&paired_ratios(c, d, name, f)).map_or("-".to_string(), |x| {
                    format!("{:.3} ({:.3}–{:.3})", x.median, x.min, x.max)
                })
            };
            s += &format!(
                "| {name} | {n_ok} | {} | {} | {share} | {waits} | {} | {} |\n",
                fmt_sum(summary_of(c, d, name, |r| r.pps)),
                fmt_sum(summary_of(c, d, name, |r| r.per_cpu_s)),
                ratio(|r| r.pps),
                ratio(|r| r.per_cpu_s),
            );
        }
        s += "\n";
    }
    s += "## Runs\n\n| direction | configuration | rep | s | offered | moved (window) | moved (whole run) | delivered | backend CPU s | backend waits | pps | per CPU-s | error |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for r in &c.runs {
        s += &format!(
            "| {} | {} | {} | {:.1} | {} | {} | {} | {} | {:.2} | {} | {:.0} | {:.0} | {} |\n",
            r.direction.name(),
            r.config,
            r.rep,
            r.seconds,
            r.offered,
            r.moved,
            r.moved_total,
            r.delivered,
            r.backend_cpu_s,
            r.backend_waits,
            r.pps,
            r.per_cpu_s,
            r.error
                .as_deref()
                .map(|e| e.lines().next().unwrap_or_default().replace('|', "/"))
                .unwrap_or_default()
        );
    }
    s += &format!("\nRerun: `{}`\n", c.command);
    s
}

/// How often the backend went to sleep per 1000 frames it moved in the window.
fn waits_per_1000(r: &DatapathRun) -> f64 {
    if r.moved == 0 {
        0.0
    } else {
        r.backend_waits as f64 * 1000.0 / r.moved as f64
    }
}

/// Writes `report.md` and `results.json` into `dir`.
pub fn write_all(c: &DatapathCampaign, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(BenchError::file(dir))?;
    let json = serde_json::to_string_pretty(c).expect("a campaign serializes");
    for (name, text) in [("report.md", markdown(c)), ("results.json", json)] {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(BenchError::file(&p))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(config: &str, rep: u32, pps: f64, error: bool) -> DatapathRun {
        DatapathRun {
            config: config.into(),
            direction: Direction::Tx,
            rep,
            seconds: 1.0,
            offered: pps as u64,
            moved_total: pps as u64,
            moved: pps as u64,
            delivered: pps as u64,
            backend_cpu_s: 0.5,
            backend_waits: 10,
            pps,
            per_cpu_s: pps * 2.0,
            error: error.then(|| "x".into()),
        }
    }

    fn camp(runs: Vec<DatapathRun>) -> DatapathCampaign {
        DatapathCampaign {
            command: "vnb-bench datapath".into(),
            configs: vec!["off".into(), "ext:old".into()],
            directions: vec![Direction::Tx, Direction::Rx],
            frame_len: 64,
            rx_load: RxLoad::Full,
            duration: 1,
            runs,
            interrupted: false,
        }
    }

    #[test]
    fn ratios_pair_repetitions_and_leave_out_failed_runs() {
        let c = camp(vec![
            r("off", 1, 100.0, false),
            r("ext:old", 1, 110.0, false),
            r("off", 2, 200.0, false),
            r("ext:old", 2, 180.0, false),
            r("off", 3, 100.0, true),
            r("ext:old", 3, 100.0, false),
            r("off", 4, 100.0, false),
            r("ext:old", 4, 50.0, true),
        ]);
        let v = paired_ratios(&c, Direction::Tx, "ext:old", |r| r.pps);
        assert_eq!(v.len(), 2);
        assert!(
            (v[0] - 1.1).abs() < 1e-9 && (v[1] - 0.9).abs() < 1e-9,
            "{v:?}"
        );
        assert_eq!(
            paired_ratios(&c, Direction::Tx, "off", |r| r.pps),
            vec![1.0, 1.0, 1.0]
        );
        // Directions are never paired with each other.
        assert!(paired_ratios(&c, Direction::Rx, "ext:old", |r| r.pps).is_empty());
        let md = markdown(&c);
        assert!(md.contains("| ext:old | 3 | 130 ± 44 |"), "{md}");
        // 10 waits over 110, 180 and 100 frames.
        assert!(md.contains("| 50 % | 82.2 |"), "{md}");
        assert!(md.contains("1.000 (0.900–1.100)"), "{md}");
        assert!(md.contains("## tx: ") && md.contains("## rx: "), "{md}");
    }

    #[test]
    fn rx_loads_parse_and_name_themselves() {
        for load in [RxLoad::Full, RxLoad::Even, RxLoad::Partial] {
            assert_eq!(load.name().parse::<RxLoad>().unwrap(), load);
            let json = serde_json::to_string(&load).unwrap();
            assert_eq!(json, format!("\"{}\"", load.name()));
        }
        assert!("Full".parse::<RxLoad>().is_err());
        // A run recorded before waits were counted still reads.
        let mut v = serde_json::to_value(r("off", 1, 1.0, false)).unwrap();
        v.as_object_mut().unwrap().remove("backend_waits");
        let old: DatapathRun = serde_json::from_value(v).unwrap();
        assert_eq!(old.backend_waits, 0);
    }

    #[test]
    fn testpmd_totals_come_from_the_last_block() {
        let out = "Accumulated forward statistics\n TX-packets: 5 \nlater\n\
                   ---- Accumulated forward statistics for all ports ----\n\
                   RX-packets: 0 RX-dropped: 0\n TX-packets: 1234 TX-dropped: 0\n";
        assert_eq!(testpmd_total(out, "TX-packets:"), Some(1234));
        assert_eq!(testpmd_total("nothing", "TX-packets:"), None);
    }
}
