//! What several crates of vhost-net-batch share, kept small and free of the rust-vmm stack so
//! that the static guest tools can use it too:
//!
//! - [`mode`]: the batching-mode grammar (`off`, `fixed:US`, `adaptive:US`), one parser for the
//!   backend's `--mode`, the control socket and the bench's configurations;
//! - [`procfs`]: CPU time and context switches of processes and threads, from `/proc`;
//! - [`packet`]: a raw `AF_PACKET` socket on one interface (guest tools, tests, bench).

pub mod mode;
pub mod packet;
pub mod procfs;
