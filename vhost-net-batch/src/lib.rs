//! vhost-net-batch: a vhost-user virtio-net backend for stock QEMU.
//!
//! Layout:
//! - [`config`]: what an operator asks for (one VM by flags, many by TOML), validated;
//! - [`tap`]: the host side, a tap with `IFF_VNET_HDR`;
//! - [`datapath`]: moving frames between virtqueues and the tap (mechanism, no policy);
//! - [`device`]: the virtio-net device model and its queue-pair workers;
//! - [`shim`]: the message-level shim that makes stock QEMU's connect sequence acceptable;
//! - [`server`]: per-VM sockets, connections and reconnects;
//! - [`metrics`]: counters per VM and queue pair.

pub mod batching;
pub mod config;
pub mod control;
pub mod datapath;
pub mod device;
pub mod metrics;
pub mod ops;
pub mod policy;
pub mod server;
pub mod shim;
pub mod tap;
pub mod timer;
