//! Per-VM slots: the vhost-user socket, one frontend connection at a time, and going back to
//! listening on the same path when the frontend leaves. Each slot runs on its own thread; a
//! failure in one VM's connection is logged and never touches another VM.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use thiserror::Error;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::access::{self, Access};
use crate::batching::VmBatching;
use crate::config::{ConfigError, VmConfig};
use crate::device::NetDevice;
use crate::metrics::VmMetrics;
use crate::shim;
use crate::tap::{Tap, TapError};

/// Errors setting up a VM slot; each names the VM and says what to do.
#[derive(Debug, Error)]
pub enum ServeError {
    /// Another process is listening on the socket path.
    #[error("VM {vm:?}: socket {path} is in use by another process (stop it or choose another --socket)")]
    SocketInUse {
        /// VM name.
        vm: String,
        /// Socket path.
        path: PathBuf,
    },
    /// The socket path exists and is not a socket.
    #[error("VM {vm:?}: {path} exists and is not a socket; remove it or choose another --socket")]
    NotASocket {
        /// VM name.
        vm: String,
        /// Socket path.
        path: PathBuf,
    },
    /// The socket could not be created.
    #[error("VM {vm:?}: cannot listen on {path}: {source} (check that the directory exists and is writable)")]
    Bind {
        /// VM name.
        vm: String,
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A bad setting.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The tap could not be opened.
    #[error("VM {vm:?}: {source}")]
    Tap {
        /// VM name.
        vm: String,
        /// Why.
        #[source]
        source: TapError,
    },
}

/// Errors of one frontend connection (logged; the slot goes back to listening).
#[derive(Debug, Error)]
pub enum ConnError {
    /// Creating the vhost-user daemon failed.
    #[error("cannot start the vhost-user handler: {0}")]
    Daemon(String),
    /// The internal socket between shim and handler failed.
    #[error("internal socket: {0}")]
    Internal(#[from] io::Error),
    /// The relay stopped on a protocol error.
    #[error("{0}")]
    Shim(#[from] shim::ShimError),
}

/// The pid of the process on the other end of a Unix socket.
fn peer_pid(s: &UnixStream) -> Option<u32> {
    access::peer_cred(s).ok().map(|c| c.pid).filter(|p| *p > 0)
}

/// Binds `path` for listening with `access`, replacing a stale socket but never a live one or
/// a non-socket.
pub fn bind_socket(vm: &str, path: &Path, access: &Access) -> Result<UnixListener, ServeError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServeError::NotASocket {
                vm: vm.into(),
                path: path.into(),
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServeError::SocketInUse {
                vm: vm.into(),
                path: path.into(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    access.bind(path).map_err(|source| ServeError::Bind {
        vm: vm.into(),
        path: path.into(),
        source,
    })
}

static PRIVATE_DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

/// Removes the private directory of internal sockets, if one was made (at shutdown).
pub fn remove_private_dir() {
    if let Some(d) = PRIVATE_DIR.get() {
        let _ = std::fs::remove_dir_all(d.path());
    }
}

/// A private 0700 directory for the shim's internal sockets, made once per process (in
/// `$XDG_RUNTIME_DIR` when it exists, else the temporary directory).
fn private_dir() -> io::Result<&'static Path> {
    if let Some(d) = PRIVATE_DIR.get() {
        return Ok(d.path());
    }
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new().prefix("vnb-").tempdir_in(base)?;
    Ok(PRIVATE_DIR.get_or_init(|| dir).path())
}

/// One VM: its tap, its socket and its counters; serves one frontend at a time, forever.
pub struct VmSlot {
    cfg: VmConfig,
    tap: Arc<Tap>,
    listener: UnixListener,
    access: Access,
    metrics: Arc<VmMetrics>,
    batching: Arc<VmBatching>,
    energy: Option<power::vm::VmEnergyHandle>,
    tasks: Arc<std::sync::Mutex<power::vm::VmTasks>>,
}

impl VmSlot {
    /// Opens the tap and binds the socket (socket last, so its presence means ready).
    pub fn open(cfg: VmConfig) -> Result<Self, ServeError> {
        let policy = cfg.policy()?;
        let access = cfg.access()?;
        let tap = Tap::open(&cfg.tap, cfg.queues).map_err(|source| ServeError::Tap {
            vm: cfg.name.clone(),
            source,
        })?;
        let listener = bind_socket(&cfg.name, &cfg.socket, &access)?;
        let metrics = Arc::new(VmMetrics::new(cfg.queues as usize));
        let batching = Arc::new(VmBatching::new(policy, crate::timer::now_ns(), &metrics));
        tracing::info!(
            vm = %cfg.name, socket = %cfg.socket.display(), tap = %cfg.tap,
            queues = cfg.queues, mac = %cfg.mac(), "VM ready for a frontend"
        );
        Ok(VmSlot {
            cfg,
            tap: Arc::new(tap),
            listener,
            access,
            metrics,
            batching,
            energy: None,
            tasks: Default::default(),
        })
    }

    /// The VM's configuration.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// Removes the VM's socket file (at shutdown).
    pub fn remove_socket(&self) {
        let _ = std::fs::remove_file(&self.cfg.socket);
    }

    /// The VM's counters.
    pub fn metrics(&self) -> &Arc<VmMetrics> {
        &self.metrics
    }

    /// Turns per-VM energy accounting on: the VM's QEMU process and the backend threads serving
    /// it are charged from each connection on; the figure appears in stats, metrics and the
    /// control replies' `energy_uj`.
    pub fn with_energy(mut self, handle: power::vm::VmEnergyHandle) -> Self {
        let name = self.cfg.name.clone();
        let h = handle.clone();
        self.batching.set_energy_source(
            Box::new(move || {
                let e = h.energy_uj(&name);
                (e != u64::MAX).then_some(e)
            }),
            &handle.kind().to_string(),
        );
        self.energy = Some(handle);
        self
    }

    /// The VM's batching state.
    pub fn batching(&self) -> &Arc<VmBatching> {
        &self.batching
    }

    /// Accepts frontends one after the other, forever.
    pub fn serve_forever(&self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if !self.admitted(&stream) {
                        continue;
                    }
                    self.metrics.connections.fetch_add(1, Relaxed);
                    self.charge_energy_to(&stream);
                    // A frontend reconnecting in a loop must not flood the log: one budget
                    // decision per connection covers its lines.
                    let loud = self.metrics.log.allow(crate::timer::now_ns()).is_some();
                    if loud {
                        tracing::info!(vm = %self.cfg.name, "frontend connected");
                    }
                    // A panic while serving one connection ends that connection, never the slot.
                    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.serve_connection(stream)
                    }));
                    match served {
                        Ok(Ok(())) if loud => {
                            tracing::info!(vm = %self.cfg.name, "frontend disconnected; listening again")
                        }
                        Ok(Ok(())) => {}
                        Ok(Err(e)) if loud => {
                            tracing::warn!(vm = %self.cfg.name, %e, "frontend connection ended with an error; listening again")
                        }
                        Ok(Err(_)) => {}
                        Err(_) => {
                            self.metrics.panics.fetch_add(1, Relaxed);
                            if loud {
                                tracing::error!(vm = %self.cfg.name, "serving the frontend panicked; listening again");
                            }
                        }
                    }
                    if loud {
                        let t = self.metrics.total();
                        tracing::info!(vm = %self.cfg.name, ?t, "counters");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(vm = %self.cfg.name, %e, "accept failed; retrying in 1 s");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        }
    }

    /// Whether the peer may use the VM's socket ([`Access::allows`]); a refused one is counted
    /// and its connection closed.
    fn admitted(&self, stream: &UnixStream) -> bool {
        match access::peer_cred(stream) {
            Ok(peer) if self.access.allows(&peer) => true,
            peer => {
                self.metrics.refused_peers.fetch_add(1, Relaxed);
                if self.metrics.log.allow(crate::timer::now_ns()).is_some() {
                    tracing::warn!(vm = %self.cfg.name, ?peer, "refused a frontend: not root, not the daemon's user, not in the socket's group");
                }
                false
            }
        }
    }

    /// Starts charging energy to this connection's frontend process (QEMU, by SO_PEERCRED) and
    /// the VM's worker threads, from zero.
    fn charge_energy_to(&self, stream: &UnixStream) {
        let Some(h) = &self.energy else { return };
        let mut tasks = power::vm::VmTasks::new();
        if let Some(pid) = peer_pid(stream) {
            tasks = tasks.with_process(pid);
        }
        h.unregister_vm(&self.cfg.name);
        h.register_vm(&self.cfg.name, tasks.clone());
        *self.tasks.lock().unwrap() = tasks;
    }

    /// A hook adding a worker thread serving this VM to its energy accounting.
    fn thread_hook(&self) -> Option<crate::device::ThreadHook> {
        let h = self.energy.clone()?;
        let tasks = self.tasks.clone();
        let name = self.cfg.name.clone();
        Some(Arc::new(move |tid| {
            let mut t = tasks.lock().unwrap();
            *t = std::mem::take(&mut *t).with_thread(std::process::id(), tid);
            h.set_tasks(&name, t.clone());
        }))
    }

    /// Serves one frontend connection until it closes. A fresh device (and vhost-user handler
    /// with its worker threads) per connection; all of it is gone when this returns.
    pub fn serve_connection(&self, frontend: UnixStream) -> Result<(), ConnError> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let device = Arc::new(NetDevice::new(
            &self.cfg.name,
            self.tap.clone(),
            mem.clone(),
            self.metrics.clone(),
            self.batching.clone(),
            self.cfg.tap_io.unwrap_or_default(),
        )?);
        self.batching.reset_guest();
        device.set_thread_hook(self.thread_hook());
        let result = self.run_daemon(&device, mem, &frontend);
        // Every worker thread has been joined: the exit eventfds are ours to close.
        device.close_exit_consumers();
        result
    }

    fn run_daemon(
        &self,
        device: &Arc<NetDevice>,
        mem: crate::device::GuestMem,
        frontend: &UnixStream,
    ) -> Result<(), ConnError> {
        let mut daemon = VhostUserDaemon::new(self.cfg.name.clone(), device.clone(), mem)
            .map_err(|e| ConnError::Daemon(e.to_string()))?;
        device
            .register_events(&daemon.get_epoll_handlers())
            .map_err(ConnError::Internal)?;
        let backend_side = self.connect_handler(&mut daemon)?;
        // Tap queues follow the guest's enabled queue pairs (ring 2i is pair i's RX ring).
        let tap = &self.tap;
        let vm = &self.cfg.name;
        let metrics = &self.metrics;
        let own_mac = self.cfg.mac().0;
        let limit = crate::metrics::LogLimiter::per_second(crate::announce::ANNOUNCE_PER_S);
        let relayed = shim::relay(
            frontend,
            &backend_side,
            device.stop_fd(),
            &mut |msg| {
                if let Some((ring, enabled)) = shim::vring_enable(msg) {
                    if ring % 2 == 0 {
                        if let Err(e) = tap.set_queue_enabled((ring / 2) as usize, enabled) {
                            tracing::warn!(%vm, ring, enabled, %e, "cannot follow the queue pair on the tap");
                        }
                    }
                }
            },
            // SEND_RARP, the only message the shim handles: the guest has just moved here.
            // Only the VM's own MAC is announced (another would point the segment's switches
            // at this tap for someone else's traffic), at most ANNOUNCE_PER_S a second.
            &mut |msg| {
                let now = crate::timer::now_ns();
                let refuse = |why: &str| {
                    metrics.announcements_refused.fetch_add(1, Relaxed);
                    if metrics.log.allow(now).is_some() {
                        tracing::warn!(%vm, why, "refused SEND_RARP");
                    }
                    false
                };
                let Some(mac) = crate::announce::rarp_mac(&msg.payload) else {
                    return refuse("no MAC address in the message");
                };
                if mac != own_mac {
                    return refuse(
                        "not the VM's MAC address (give the backend QEMU's MAC with --mac)",
                    );
                }
                if limit.allow(now).is_none() {
                    return refuse("more announcements than ANNOUNCE_PER_S in a second");
                }
                match tap.send_frame(&crate::announce::rarp_frame(mac)) {
                    Ok(()) => {
                        metrics.announcements.fetch_add(1, Relaxed);
                        if metrics.log.allow(now).is_some() {
                            tracing::info!(%vm, mac = %format_mac(mac), "announced the migrated guest (RARP)");
                        }
                        true
                    }
                    Err(e) => {
                        if metrics.log.allow(now).is_some() {
                            tracing::warn!(%vm, %e, "cannot announce the migrated guest");
                        }
                        false
                    }
                }
            },
        );
        // The next frontend starts with only pair 0, as this one did.
        if let Err(e) = self.tap.detach_extra_queues() {
            tracing::warn!(vm = %self.cfg.name, %e, "cannot detach the tap's extra queues");
        }
        let _ = backend_side.shutdown(std::net::Shutdown::Both);
        let _ = frontend.shutdown(std::net::Shutdown::Both);
        daemon.request_shutdown();
        if let Err(e) = daemon.wait() {
            tracing::debug!(vm = %self.cfg.name, %e, "vhost-user handler ended");
        }
        drop(daemon);
        relayed.map_err(ConnError::from)
    }

    /// Connects the crate's request handler to a fresh internal socket and returns our end.
    fn connect_handler(
        &self,
        daemon: &mut VhostUserDaemon<Arc<NetDevice>>,
    ) -> Result<UnixStream, ConnError> {
        // Unique in the process, whatever the VM names.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Relaxed);
        let path = private_dir()?.join(format!(
            "{}-{}-{seq}.sock",
            self.cfg.name,
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let inner = UnixListener::bind(&path)?;
        let started = daemon.start_client(path.to_str().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "non-UTF-8 runtime directory")
        })?);
        let accepted = started
            .map_err(|e| ConnError::Daemon(e.to_string()))
            .and_then(|()| Ok(inner.accept()?.0));
        let _ = std::fs::remove_file(&path);
        let stream = accepted?;
        // Only this process may be on the other end.
        if peer_pid(&stream) != Some(std::process::id()) {
            return Err(ConnError::Internal(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "unexpected peer on the internal handler socket",
            )));
        }
        Ok(stream)
    }
}

/// `mac` as colon-separated hex.
fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}
