//! Support for in-process tests: a private network namespace, guest memory in a memfd, virtqueues
//! laid out in it, and a packet socket on the tap.
#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_net_batch::config::VmConfig;
use vhost_net_batch::server::VmSlot;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod qemu;
#[allow(unused_imports)]
pub use qemu::QemuGuest;

/// Guest memory size.
pub const MEM_SIZE: usize = 16 << 20;
/// Queue size used by the tests.
pub const QSIZE: u16 = 256;
/// RX ring at 0, TX ring at 64 KiB, buffers from 1 MiB.
pub const RX_RING: u64 = 0;
/// TX ring base.
pub const TX_RING: u64 = 0x1_0000;
/// First buffer address.
pub const BUF: u64 = 0x10_0000;

/// Fails with a message saying what to install when a prerequisite is missing.
pub fn require_root_and_ip() {
    // SAFETY: getuid has no preconditions.
    assert_eq!(
        unsafe { libc::getuid() },
        0,
        "this test needs root (tap devices and network namespaces); run `make test` as root"
    );
    let ok = Command::new("ip")
        .arg("-V")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "`ip` not found: install iproute2 (ci/setup.sh does)");
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun missing: `modprobe tun`"
    );
}

/// A network namespace made for one test; deleted on drop.
pub struct Netns {
    /// Its name.
    pub name: String,
}

impl Netns {
    /// Creates `vnbt-<tag>-<pid>` and moves the calling thread into it.
    pub fn enter(tag: &str) -> Self {
        require_root_and_ip();
        let name = format!("vnbt-{tag}-{}", std::process::id());
        if std::path::Path::new(&format!("/var/run/netns/{name}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name} failed");
        let f = File::open(format!("/var/run/netns/{name}")).unwrap();
        // SAFETY: setns on a valid netns fd affects only the calling thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
        Netns { name }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Starts a VM slot (tap in the current thread's namespace) serving on its own thread.
pub fn start_slot(name: &str, tap: &str, sock: &std::path::Path) -> Arc<VmSlot> {
    start_slot_mq(name, tap, sock, 1)
}

/// As [`start_slot`] with `queues` queue pairs.
pub fn start_slot_mq(name: &str, tap: &str, sock: &std::path::Path, queues: u16) -> Arc<VmSlot> {
    let mut c = VmConfig::new(name, sock, tap, queues, None);
    if std::env::var("VNB_TEST_SYSCALLS").is_ok() {
        c.tap_io = Some(vhost_net_batch::tap_io::TapIoKind::Syscalls);
    }
    start_slot_cfg(c)
}

/// Opens a VM slot from a full configuration and serves it on a thread.
pub fn start_slot_cfg(cfg: VmConfig) -> Arc<VmSlot> {
    let name = cfg.name.clone();
    let slot = Arc::new(VmSlot::open(cfg).unwrap_or_else(|e| panic!("open VM slot {name}: {e}")));
    let s = slot.clone();
    std::thread::spawn(move || s.serve_forever());
    slot
}

/// Guest memory backed by a memfd, as QEMU's memory-backend-memfd.
pub fn guest_memory() -> GuestMemoryMmap<()> {
    guest_memory_with_file().1
}

/// As [`guest_memory`], with a handle on the memfd (a test can shrink it under the backend).
pub fn guest_memory_with_file() -> (File, GuestMemoryMmap<()>) {
    let file = memfd(c"vnb-guest", MEM_SIZE as u64);
    let handle = file.try_clone().unwrap();
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap();
    (handle, mem)
}

/// A close-on-exec memfd of `len` bytes, as QEMU hands over for guest memory or a dirty log.
pub fn memfd(name: &std::ffi::CStr, len: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: we own the new fd.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

/// A split-ring descriptor.
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Virtio features the test frontend acks.
pub fn test_features() -> u64 {
    (1u64 << 32) // VERSION_1
        | (1 << 15) // MRG_RXBUF
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// Where the used ring of `q` lies: right after its avail ring, 4-byte aligned.
/// virtio-queue's mock (0.18) reports one `size` bytes after the start of the avail ring's
/// entries instead of `2·size`, i.e. inside the avail ring from entry `size/2` on: a guest
/// posting more than half a ring there overwrites its own used index.
pub fn used_ring_of(q: &MockSplitQueue<'_, GuestMemoryMmap<()>>) -> GuestAddress {
    GuestAddress((q.avail_addr().0 + 6 + 2 * u64::from(QSIZE) + 3) & !3)
}

/// A configured frontend: memory table, two rings, call/kick eventfds.
pub struct Guest<'a> {
    pub fe: Frontend,
    pub mem: &'a GuestMemoryMmap<()>,
    pub rx: MockSplitQueue<'a, GuestMemoryMmap<()>>,
    pub tx: MockSplitQueue<'a, GuestMemoryMmap<()>>,
    pub kick: [EventFd; 2],
    pub call: [EventFd; 2],
}

impl<'a> Guest<'a> {
    /// Negotiates and sets up rings over `fe` (an already connected frontend). When
    /// `negotiate` is false the caller already did GET/SET_FEATURES and protocol features.
    pub fn setup(fe: Frontend, mem: &'a GuestMemoryMmap<()>, negotiate: bool) -> Self {
        Self::setup_features(fe, mem, negotiate, test_features())
    }

    /// As [`Guest::setup`], acking `features` (e.g. [`test_features`] plus RING_EVENT_IDX).
    pub fn setup_features(
        fe: Frontend,
        mem: &'a GuestMemoryMmap<()>,
        negotiate: bool,
        features: u64,
    ) -> Self {
        Self::setup_opts(fe, mem, negotiate, features, true)
    }

    /// As [`Guest::setup_features`]; with `enable_rings` false no `SET_VRING_ENABLE` is sent
    /// (the rings must have been enabled already, e.g. by a replayed early enable).
    pub fn setup_opts(
        mut fe: Frontend,
        mem: &'a GuestMemoryMmap<()>,
        negotiate: bool,
        features: u64,
        enable_rings: bool,
    ) -> Self {
        if negotiate {
            fe.set_owner().unwrap();
            let offered = fe.get_features().unwrap();
            assert_ne!(
                offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
                0
            );
            let proto = fe.get_protocol_features().unwrap();
            assert!(proto.contains(
                VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            ));
            fe.set_protocol_features(VhostUserProtocolFeatures::MQ)
                .unwrap();
        } else {
            // The frontend object only acks what it saw offered (QEMU re-reads features too).
            fe.get_features().unwrap();
        }
        fe.set_features(features).unwrap();
        let region = mem.iter().next().unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        fe.set_mem_table(&[info]).unwrap();
        let rx = MockSplitQueue::create(mem, GuestAddress(RX_RING), QSIZE);
        let tx = MockSplitQueue::create(mem, GuestAddress(TX_RING), QSIZE);
        let kick = [
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ];
        let call = [
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ];
        let host = region.as_ptr() as u64;
        for (i, q) in [&rx, &tx].into_iter().enumerate() {
            fe.set_vring_num(i, QSIZE).unwrap();
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: host + q.desc_table_addr().0,
                    used_ring_addr: host + used_ring_of(q).0,
                    avail_ring_addr: host + q.avail_addr().0,
                    log_addr: None,
                },
            )
            .unwrap();
            fe.set_vring_base(i, 0).unwrap();
            fe.set_vring_call(i, &call[i]).unwrap();
            fe.set_vring_kick(i, &kick[i]).unwrap();
            if enable_rings {
                fe.set_vring_enable(i, true).unwrap();
            }
        }
        Guest {
            fe,
            mem,
            rx,
            tx,
            kick,
            call,
        }
    }

    /// The used ring of queue `q` (0 RX, 1 TX).
    pub fn used_ring(&self, q: usize) -> GuestAddress {
        used_ring_of(if q == 0 { &self.rx } else { &self.tx })
    }

    /// A second handle on the frontend's socket (to see the backend close it).
    pub fn fe_socket(&self) -> std::os::unix::net::UnixStream {
        // SAFETY: the frontend's descriptor is valid while `self` lives; it is duplicated, so
        // the returned stream owns its own copy.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fe.as_raw_fd()) };
        std::os::unix::net::UnixStream::from(fd.try_clone_to_owned().unwrap())
    }

    /// Used ring entries (id, len) of queue `q` (0 RX, 1 TX).
    pub fn used(&self, q: usize) -> Vec<(u32, u32)> {
        let base = self.used_ring(q).0;
        let idx: u16 = self.mem.read_obj(GuestAddress(base + 2)).unwrap();
        (0..idx as u64)
            .map(|i| {
                let e = base + 4 + 8 * (i % QSIZE as u64);
                (
                    self.mem.read_obj(GuestAddress(e)).unwrap(),
                    self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
                )
            })
            .collect()
    }

    /// Waits until queue `q` has at least `n` used entries.
    pub fn wait_used(&self, q: usize, n: usize, timeout: Duration) -> Vec<(u32, u32)> {
        let end = Instant::now() + timeout;
        loop {
            let u = self.used(q);
            if u.len() >= n || Instant::now() > end {
                return u;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Puts `frame` (with a zero virtio-net header prepended) on the TX ring at descriptor `i`
    /// and kicks.
    pub fn send(&self, i: u16, frame: &[u8]) {
        let addr = BUF + 0x1_0000 * i as u64;
        let mut buf = vec![0u8; 12];
        buf.extend_from_slice(frame);
        self.mem.write_slice(&buf, GuestAddress(addr)).unwrap();
        self.tx
            .add_desc_chains(&[desc(addr, buf.len() as u32, 0, 0)], i)
            .unwrap();
        self.kick[1].write(1).unwrap();
    }

    /// As [`Guest::send`] without the kick (the device asked for none).
    pub fn send_nokick(&self, i: u16, frame: &[u8]) {
        let addr = BUF + 0x1_0000 * i as u64;
        let mut buf = vec![0u8; 12];
        buf.extend_from_slice(frame);
        self.mem.write_slice(&buf, GuestAddress(addr)).unwrap();
        self.tx
            .add_desc_chains(&[desc(addr, buf.len() as u32, 0, 0)], i)
            .unwrap();
    }

    /// As [`Guest::send_nokick`], then kicks only if the device's EVENT_IDX `avail_event`
    /// asks for it (what a Linux driver's `virtqueue_kick_prepare` does); returns whether it
    /// kicked.
    pub fn send_evidx(&self, i: u16, frame: &[u8]) -> bool {
        let old = self.avail_idx(1);
        self.send_nokick(i, frame);
        let new = self.avail_idx(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let event = self.avail_event(1);
        // vring_need_event(event, new, old)
        let kick = new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old);
        if kick {
            self.kick[1].write(1).unwrap();
        }
        kick
    }

    /// The `flags` field of queue `q`'s used ring (bit 0: the device wants no kicks).
    pub fn used_flags(&self, q: usize) -> u16 {
        let base = self.used_ring(q);
        self.mem.read_obj(base).unwrap()
    }

    /// EVENT_IDX: the device's `avail_event` of queue `q` (the avail index it wants a kick at).
    pub fn avail_event(&self, q: usize) -> u16 {
        let used = self.used_ring(q);
        self.mem
            .read_obj(GuestAddress(used.0 + 4 + 8 * QSIZE as u64))
            .unwrap()
    }

    /// The avail index of queue `q` (what the guest has published).
    pub fn avail_idx(&self, q: usize) -> u16 {
        let avail = if q == 0 {
            self.rx.avail_addr()
        } else {
            self.tx.avail_addr()
        };
        self.mem.read_obj(GuestAddress(avail.0 + 2)).unwrap()
    }

    /// EVENT_IDX: sets the guest's `used_event` of queue `q` (interrupt once the used index
    /// passes it).
    pub fn set_used_event(&self, q: usize, ev: u16) {
        let avail = if q == 0 {
            self.rx.avail_addr()
        } else {
            self.tx.avail_addr()
        };
        self.mem
            .write_obj(ev, GuestAddress(avail.0 + 4 + 2 * QSIZE as u64))
            .unwrap();
    }

    /// Posts `n` RX buffers of `len` bytes starting at descriptor `first` and kicks.
    pub fn post_rx(&self, first: u16, n: u16, len: u32) {
        let descs: Vec<_> = (0..n)
            .map(|k| desc(BUF + 0x80_0000 + 0x1_0000 * (first + k) as u64, len, 2, 0))
            .collect();
        self.rx.add_desc_chains(&descs, first).unwrap();
        self.kick[0].write(1).unwrap();
    }

    /// Bytes of the RX buffer of descriptor `i`.
    pub fn rx_buf(&self, i: u16, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(BUF + 0x80_0000 + 0x1_0000 * i as u64))
            .unwrap();
        v
    }
}

/// A raw packet socket bound to an interface in the current namespace, receiving everything.
pub struct PacketSocket(vnb_common::packet::PacketSocket);

impl PacketSocket {
    /// Opens and binds to `ifname`.
    pub fn bind(ifname: &str) -> Self {
        let s = vnb_common::packet::PacketSocket::open(ifname, vnb_common::packet::ETH_P_ALL)
            .unwrap_or_else(|e| panic!("packet socket on {ifname}: {e}"));
        PacketSocket(s)
    }

    /// Receives frames until one satisfies `pred` or `timeout` passes.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        pred: impl Fn(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        self.0
            .recv_until(timeout, |b| pred(b).then(|| b.to_vec()))
            .unwrap_or_else(|e| panic!("packet socket: {e}"))
    }

    /// Sends one frame out of the interface (into the tap, so towards the guest).
    pub fn send(&self, frame: &[u8]) {
        let n = self.0.send(frame).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, frame.len(), "short send");
    }
}

/// An Ethernet frame with a recognisable payload (local experimental EtherType 0x88B6).
pub fn test_frame(seq: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x52, 0x54, 0x00, 0xaa, 0xbb, seq]);
    f.extend_from_slice(&[0x88, 0xb6]);
    f.extend((0..len.saturating_sub(14)).map(|i| (i as u8) ^ seq));
    f
}

/// Open descriptors of this process.
pub fn fd_count() -> usize {
    vnb_common::procfs::own_fd_count().unwrap()
}

/// Threads of this process.
pub fn thread_count() -> usize {
    vnb_common::procfs::own_thread_count().unwrap()
}

/// A fresh temporary directory.
pub fn tempdir() -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    // Tests of one binary run in parallel threads: the clock alone can give two of them the same
    // name (seen in CI), so a process-wide counter makes it unique.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("vnb-test-{}-{n}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Repository root (the workspace).
pub fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Fails, saying what to install, when a command is missing.
pub fn require_cmd(cmd: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{cmd}` not found: install {package} (run ci/setup.sh as root)"
    );
}

/// Runs a command, failing the test with its output if it fails; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A namespace made with ci/netns.sh for out-of-process tests; everything in it is killed and
/// it is deleted on drop.
pub struct ScriptNetns {
    /// Its name.
    pub name: String,
    /// The namespace the thread that entered this one came from: the drop goes back there
    /// first, or the delete script would run inside the namespace it deletes and kill itself
    /// with the namespace's processes (which left `vnbhp*`/`vnbhx*` namespaces behind).
    home: std::sync::Mutex<Option<File>>,
}

impl ScriptNetns {
    /// Creates `vnb<tag><pid%10000>`.
    pub fn create(tag: &str) -> Self {
        require_root_and_ip();
        let name = format!("vnb{tag}{}", std::process::id() % 10000);
        run_ok(Command::new(repo().join("ci/netns.sh")).args(["create", &name]));
        ScriptNetns {
            name,
            home: std::sync::Mutex::new(None),
        }
    }

    /// Moves the calling thread into the namespace (to open packet sockets on its taps).
    pub fn enter(&self) {
        let home = File::open("/proc/thread-self/ns/net").unwrap();
        let mut saved = self.home.lock().unwrap_or_else(|e| e.into_inner());
        saved.get_or_insert(home);
        let f = File::open(format!("/var/run/netns/{}", self.name)).unwrap();
        // SAFETY: setns on a valid netns fd affects only the calling thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
    }

    /// `ip netns exec NS args...`
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }
}

impl Drop for ScriptNetns {
    fn drop(&mut self) {
        let home = self
            .home
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(home) = home {
            // SAFETY: setns on a valid netns fd affects only the calling thread (the one that
            // entered, in every test).
            unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) };
        }
        let _ = Command::new(repo().join("ci/netns.sh"))
            .args(["delete", &self.name])
            .status();
    }
}

/// A child process killed on drop.
pub struct Proc(pub std::process::Child);

impl Proc {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// User+system CPU seconds it has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// User+system CPU seconds of a process (all its threads); 0 once it is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    vnb_common::procfs::cpu_seconds(pid).unwrap_or(0.0)
}

/// Starts the backend binary in namespace `ns` for one VM; waits for its socket.
pub fn spawn_backend(
    ns: &ScriptNetns,
    vm: &str,
    sock: &std::path::Path,
    tap: &str,
    extra: &[&str],
) -> Proc {
    let _ = std::fs::remove_file(sock);
    let log = std::fs::File::create(sock.with_extension("log")).unwrap();
    // VNB_BACKEND_BIN runs another build (e.g. target/release) for figures worth quoting.
    let bin = std::env::var("VNB_BACKEND_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_vhost-net-batch").to_string());
    let child = ns
        .cmd(&[
            bin.as_str(),
            "serve",
            "--vm",
            vm,
            "--socket",
            sock.to_str().unwrap(),
            "--tap",
            tap,
        ])
        .args(extra)
        .stderr(log)
        .spawn()
        .unwrap();
    let p = Proc(child);
    let end = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            Instant::now() < end,
            "backend did not create {}; log: {}",
            sock.display(),
            std::fs::read_to_string(sock.with_extension("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}
