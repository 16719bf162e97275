//! `vnb-bench`, the benchmark harness (iperf, HTTP, tbench, latency sweeps with power and
//! reports). Placeholder: the harness is built by the benchmark issue; until then the workspace
//! keeps the fixed top-level layout of DESIGN.md §2 and this crate has nothing to test.
