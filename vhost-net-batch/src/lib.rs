//! vhost-net-batch: a vhost-user virtio-net backend for stock QEMU that batches guest
//! notifications to save host energy. The design contract is `docs/design.md`.
//!
//! Layout, policy apart from mechanism:
//! - [`config`]: what an operator asks for per VM (flags for one, TOML for many), validated;
//! - [`policy`]: the batching policy, pure arithmetic over counters and a clock: delays, the
//!   EWMA, and every signalling decision and safety valve;
//! - [`batching`]: a VM's policy state shared by its workers and the operator interfaces;
//! - [`control`]: the guest's in-band control frames (validate, rate-limit, apply, reply);
//! - [`datapath`]: moving frames between virtqueues and the tap (mechanism, no policy);
//! - [`worker`]: one queue pair's worker: its steps, timers and events;
//! - [`device`]: the virtio-net device model served to one frontend connection;
//! - [`memguard`]: guest memory a frontend takes away ends its connection, not the process;
//! - [`shim`]: the message-level shim that makes stock QEMU's connect sequence acceptable;
//! - [`server`]: per-VM sockets, connections and reconnects;
//! - [`tap`], [`timer`]: the tap device and the workers' `timerfd`s;
//! - [`tap_io`], [`read_ahead`]: how a worker reads and writes its tap (many frames per call);
//! - [`metrics`]: counters per VM and queue pair;
//! - [`control_socket`], [`prometheus`], [`metrics_endpoint`]: the operator interfaces;
//! - [`access`]: socket modes, groups and the peer check of every connection.

pub mod access;
pub mod announce;
pub mod batching;
pub mod config;
pub mod control;
pub mod control_socket;
pub mod datapath;
pub mod device;
pub mod dirty_log;
pub mod memguard;
pub mod metrics;
pub mod metrics_endpoint;
pub mod policy;
pub mod prometheus;
pub mod read_ahead;
pub mod server;
pub mod shim;
pub mod tap;
pub mod tap_io;
pub mod timer;
pub mod vring;
pub mod worker;
