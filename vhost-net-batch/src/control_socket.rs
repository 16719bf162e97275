//! The operator's control socket (docs/design.md §6): `--control PATH`, mode 0600, one JSON
//! request per line and one JSON reply per line. `vhost-net-batch ctl` and the bench are its
//! clients; both sides use the typed [`Request`] and replies ([`ListReply`], [`StatsReply`])
//! defined here.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::access::{peer_cred, Access};
use crate::control::ControlCounts;
use crate::metrics::{QueueSnapshot, VmCounters};
use crate::policy::{resolve_budget, ModeKind, ModeSpec, PolicyError, PolicyView};
use crate::server::VmSlot;

/// A request on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// The VMs and their batching settings.
    List,
    /// One VM's counters and policy state.
    Stats {
        /// VM name.
        vm: String,
    },
    /// Changes a VM's mode and/or budget at run time.
    Set {
        /// `off`, `fixed[:US]`, `adaptive[:US]`; unchanged if absent.
        #[serde(default)]
        mode: Option<ModeSpec>,
        /// Budget in µs; unchanged if absent.
        #[serde(default)]
        budget_us: Option<u32>,
        /// VM name.
        vm: String,
    },
}

/// One VM in a [`ListReply`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmSummary {
    /// VM name.
    pub vm: String,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// Its tap.
    pub tap: String,
    /// Queue pairs.
    pub queues: u16,
    /// Batching mode.
    pub mode: ModeKind,
    /// The operator's budget, µs.
    pub budget_us: u32,
    /// Effective T, µs.
    pub t_us: u32,
    /// Configured RX delay, µs.
    pub rx_delay_us: u32,
    /// Configured TX delay, µs.
    pub tx_delay_us: u32,
    /// `p*`.
    pub send_ratio: f64,
    /// Above the rate floor (delays apply).
    pub active: bool,
}

/// The answer to [`Request::List`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListReply {
    /// Every VM the daemon serves.
    pub vms: Vec<VmSummary>,
}

/// The answer to [`Request::Stats`] and [`Request::Set`]: one VM's settings, policy state and
/// counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatsReply {
    /// VM name.
    pub vm: String,
    /// Batching mode.
    pub mode: ModeKind,
    /// The operator's budget, µs.
    pub budget_us: u32,
    /// The policy's state.
    pub policy: PolicyView,
    /// Control-frame counters.
    pub control: ControlCounts,
    /// Energy apportioned since the frontend attached, µJ (power sampling on).
    pub energy_uj: Option<u64>,
    /// `measurement` or `estimate` (power sampling on).
    pub energy_kind: Option<String>,
    /// Frontend connections accepted.
    pub connections: u64,
    /// VM-wide counters (connections, refused peers, panics, memory faults).
    pub vm_counters: VmCounters,
    /// Counters summed over queue pairs.
    pub total: QueueSnapshot,
    /// Counters per queue pair.
    pub queues: Vec<QueueSnapshot>,
}

/// One reply line: `{"ok":true,"result":…}` or `{"ok":false,"error":"…"}`.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope<T> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Why a request failed, on either side of the socket.
#[derive(Debug, Error)]
pub enum ControlError {
    /// No VM of that name.
    #[error("no VM named {name:?} (VMs: {known})")]
    NoSuchVm {
        /// The name asked for.
        name: String,
        /// The names served, comma-separated.
        known: String,
    },
    /// `set` without anything to set.
    #[error("set needs --mode and/or --budget-us")]
    NothingToSet,
    /// A bad mode or budget.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The control socket could not be created.
    #[error("control socket {path}: {source}")]
    Listen {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The client could not connect.
    #[error("cannot connect to the control socket {path}: {source} (is `vhost-net-batch serve --control {path}` running, and may you open it? it is mode 0600)")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Socket I/O failed mid-request.
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    /// The reply is not what this client understands.
    #[error("bad reply from the daemon: {0}")]
    BadReply(#[from] serde_json::Error),
    /// The daemon refused the request.
    #[error("{0}")]
    Daemon(String),
}

/// The VMs a daemon serves, for the operator interfaces.
#[derive(Clone)]
pub struct Vms(pub Vec<Arc<VmSlot>>);

impl std::fmt::Debug for Vms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|s| &s.config().name))
            .finish()
    }
}

impl Vms {
    fn find(&self, name: &str) -> Result<&Arc<VmSlot>, ControlError> {
        self.0
            .iter()
            .find(|s| s.config().name == name)
            .ok_or_else(|| ControlError::NoSuchVm {
                name: name.to_string(),
                known: self
                    .0
                    .iter()
                    .map(|s| s.config().name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// A VM's settings, counters and policy state.
    pub fn stats(&self, slot: &VmSlot) -> StatsReply {
        let b = slot.batching();
        let view = b.view();
        let m = slot.metrics();
        StatsReply {
            vm: slot.config().name.clone(),
            mode: view.config.mode,
            budget_us: view.config.budget_us,
            policy: view,
            control: b.control_counts(),
            energy_uj: b.energy_uj(),
            energy_kind: b.energy_kind(),
            connections: m.connections.load(std::sync::atomic::Ordering::Relaxed),
            vm_counters: m.vm_counters(),
            total: m.total(),
            queues: m.queues.iter().map(|q| q.snapshot()).collect(),
        }
    }

    /// Every VM's summary.
    pub fn list(&self) -> ListReply {
        ListReply {
            vms: self
                .0
                .iter()
                .map(|s| {
                    let v = s.batching().view();
                    let c = s.config();
                    VmSummary {
                        vm: c.name.clone(),
                        socket: c.socket.clone(),
                        tap: c.tap.clone(),
                        queues: c.queues,
                        mode: v.config.mode,
                        budget_us: v.config.budget_us,
                        t_us: v.t_us,
                        rx_delay_us: v.rx_delay_us,
                        tx_delay_us: v.tx_delay_us,
                        send_ratio: v.send_ratio,
                        active: v.active,
                    }
                })
                .collect(),
        }
    }

    /// Changes a VM's mode and/or budget; the VM's stats afterwards.
    pub fn set(
        &self,
        vm: &str,
        mode: Option<ModeSpec>,
        budget_us: Option<u32>,
    ) -> Result<StatsReply, ControlError> {
        let slot = self.find(vm)?;
        if mode.is_none() && budget_us.is_none() {
            return Err(ControlError::NothingToSet);
        }
        let cur = slot.batching().view().config;
        let spec = mode.unwrap_or(ModeSpec {
            kind: cur.mode,
            budget_us: None,
        });
        // A mode without `:US` keeps the current budget unless --budget-us gives one.
        let budget = budget_us.or(spec.budget_us.is_none().then_some(cur.budget_us));
        let (kind, budget) = resolve_budget(spec, budget)?;
        slot.batching().set_operator(kind, budget);
        tracing::info!(vm, mode = ?kind, budget_us = budget, "operator changed batching");
        Ok(self.stats(slot))
    }

    /// Answers one request with its reply as JSON.
    fn answer(&self, req: Request) -> Result<serde_json::Value, ControlError> {
        Ok(match req {
            Request::List => serde_json::to_value(self.list())?,
            Request::Stats { vm } => serde_json::to_value(self.stats(self.find(&vm)?))?,
            Request::Set {
                vm,
                mode,
                budget_us,
            } => serde_json::to_value(self.set(&vm, mode, budget_us)?)?,
        })
    }
}

/// Serves the control socket at `path` (0600) on a thread; requests are answered one per line.
pub fn serve_control(path: &Path, vms: Vms) -> Result<(), ControlError> {
    let listen = |source| ControlError::Listen {
        path: path.into(),
        source,
    };
    let listener = crate::server::bind_socket("control", path, &Access::default())
        .map_err(|e| listen(io::Error::new(io::ErrorKind::AddrInUse, e.to_string())))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_loop(listener, vms))
        .map_err(listen)?;
    Ok(())
}

fn accept_loop(listener: UnixListener, vms: Vms) {
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                match peer_cred(&s) {
                    Ok(peer) if Access::default().allows(&peer) => {}
                    peer => {
                        tracing::warn!(
                            ?peer,
                            "refused a control client: not root, not the daemon's user"
                        );
                        continue;
                    }
                }
                let vms = vms.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve_client(s, &vms) {
                            tracing::debug!(%e, "control client");
                        }
                    });
            }
            Err(e) => {
                tracing::warn!(%e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

fn serve_client(s: UnixStream, vms: &Vms) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut r).take(MAX_REQUEST as u64).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        let reply = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => match vms.answer(req) {
                Ok(v) => Envelope {
                    ok: true,
                    result: Some(v),
                    error: None,
                },
                Err(e) => Envelope {
                    ok: false,
                    result: None,
                    error: Some(e.to_string()),
                },
            },
            Err(e) => Envelope {
                ok: false,
                result: None,
                error: Some(format!("bad request: {e}")),
            },
        };
        writeln!(w, "{}", serde_json::to_string(&reply)?)?;
        if !line.ends_with('\n') {
            // Over-long or unterminated: answered, then the connection is closed.
            return Ok(());
        }
    }
}

/// Sends one request to a control socket and returns the daemon's typed result: a
/// [`ListReply`] for [`Request::List`], a [`StatsReply`] for the others.
pub fn request<T: DeserializeOwned>(path: &Path, req: &Request) -> Result<T, ControlError> {
    let s = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.into(),
        source,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = s.try_clone()?;
    writeln!(w, "{}", serde_json::to_string(req)?)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let env: Envelope<T> = serde_json::from_str(&line)?;
    match (env.ok, env.result) {
        (true, Some(r)) => Ok(r),
        _ => Err(ControlError::Daemon(
            env.error.unwrap_or_else(|| "unknown error".into()),
        )),
    }
}

/// A VM's stats from the daemon at `path`.
pub fn stats(path: &Path, vm: &str) -> Result<StatsReply, ControlError> {
    request(path, &Request::Stats { vm: vm.into() })
}
