//! Runs the cargo-fuzz targets of `vhost-net-batch/fuzz` (`datapath`, `shim`) for a bounded time
//! each (20 s, plus the build the first time): each must build with AddressSanitizer, actually
//! execute thousands of inputs, and find no crash. cargo-fuzz needs nightly features; on the
//! stable toolchain they are unlocked with RUSTC_BOOTSTRAP=1, and the stable toolchain ships the
//! sanitizer runtime (a third test checks the sanitizer really is on). `make fuzz` runs the
//! targets for 10^6 inputs each.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// Seconds each target runs.
const SECONDS: u32 = 20;

/// One fuzz build or run at a time: they share the build directory and two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `cargo fuzz` with the environment every run here needs.
fn cargo_fuzz() -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let version = Command::new(&cargo).args(["fuzz", "--version"]).output();
    assert!(
        matches!(&version, Ok(o) if o.status.success()),
        "cargo-fuzz is missing: install it with `cargo install cargo-fuzz --locked --version 0.13.2` (ci/setup.sh does)"
    );
    let mut c = Command::new(&cargo);
    c.current_dir(crate_dir())
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", crate_dir().join("../target/fuzz-vnb"))
        .arg("fuzz");
    c
}

/// The last lines of a process's stderr.
fn tail(out: &Output) -> String {
    let log = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vnb-fuzz-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn build(target: &str) {
    let out = cargo_fuzz()
        .args(["build", target, "--sanitizer", "address"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the fuzz target {target} did not build:\n{}",
        tail(&out)
    );
}

/// Runs `target` for `SECONDS` and checks it ran at least `min_runs` inputs without a crash.
fn fuzz(target: &str, min_runs: u64) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    build(target);
    // New inputs and crash files go to scratch directories; the committed seeds are only read.
    let corpus = Scratch::new(target);
    let artifacts = Scratch::new(&format!("{target}-artifacts"));
    let out = cargo_fuzz()
        .args(["run", target, "--sanitizer", "address"])
        .arg(&corpus.0)
        .arg(crate_dir().join("fuzz/corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={SECONDS}"))
        .args(["-max_len=8192", "-timeout=10", "-print_final_stats=1"])
        .arg(format!("-artifact_prefix={}/", artifacts.0.display()))
        .output()
        .unwrap();
    let tail = tail(&out);
    assert!(
        out.status.success(),
        "the fuzz target {target} failed or found a crash:\n{tail}"
    );
    let log = String::from_utf8_lossy(&out.stderr);
    let runs: u64 = log
        .lines()
        .find_map(|l| {
            l.strip_prefix("Done ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("no 'Done N runs' line from libFuzzer:\n{tail}"));
    println!("{target}: libFuzzer executed {runs} inputs in {SECONDS} s");
    assert!(
        runs >= min_runs,
        "the fuzz target {target} hardly ran: {runs} inputs in {SECONDS} s (expected {min_runs}+)\n{tail}"
    );
}

#[test]
fn fuzz_the_data_path_for_a_bounded_time() {
    // About 500 inputs/s on an idle core (each drives up to 48 operations on 256 KiB of guest
    // memory, checked after each one).
    fuzz("datapath", 2_000);
}

#[test]
fn fuzz_the_shim_parser_for_a_bounded_time() {
    // About 3,000 inputs/s on an idle core.
    fuzz("shim", 10_000);
}

#[test]
fn the_fuzz_build_has_address_sanitizer() {
    // The datapath target reads past a heap buffer when asked to: the sanitizer must stop it.
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    build("datapath");
    let artifacts = Scratch::new("asan-artifacts");
    let out = cargo_fuzz()
        .args(["run", "datapath", "--sanitizer", "address"])
        .arg(crate_dir().join("fuzz/corpus/datapath/basic"))
        .arg("--")
        .arg(format!("-artifact_prefix={}/", artifacts.0.display()))
        .env("VNB_FUZZ_ASAN_SELFTEST", "1")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && log.contains("ERROR: AddressSanitizer: heap-buffer-overflow"),
        "an out-of-bounds read went unnoticed: the fuzz build lacks AddressSanitizer\n{}",
        tail(&out)
    );
}
