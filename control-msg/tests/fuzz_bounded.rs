//! Runs the `cargo fuzz` target of the parser for a bounded time (about 15 s plus the build):
//! it must build, actually execute inputs, and find no crash. cargo-fuzz needs nightly
//! features; on a stable toolchain they are unlocked with RUSTC_BOOTSTRAP=1 and the fuzzer runs
//! without a sanitizer (the parser has no unsafe code; the target checks the canonical
//! re-encoding).

use std::path::Path;
use std::process::Command;

#[test]
fn fuzz_the_parser_for_a_bounded_time() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let version = Command::new(&cargo).args(["fuzz", "--version"]).output();
    assert!(
        matches!(&version, Ok(o) if o.status.success()),
        "cargo-fuzz is missing: install it with `cargo install cargo-fuzz --locked` (ci/setup.sh does)"
    );
    // New inputs go to a scratch corpus; the committed seeds are only read.
    let scratch = std::env::temp_dir().join(format!("vnb-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let target = crate_dir.join("../target/fuzz");
    let out = Command::new(&cargo)
        .current_dir(crate_dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", &target)
        .args(["fuzz", "run", "parse_frame", "--sanitizer", "none"])
        .arg(&scratch)
        .arg(crate_dir.join("fuzz/corpus/parse_frame"))
        .args(["--", "-max_total_time=15", "-print_final_stats=1"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&scratch);
    let log = String::from_utf8_lossy(&out.stderr);
    let tail: String = log
        .lines()
        .rev()
        .take(30)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        out.status.success(),
        "the fuzzer failed or found a crash:\n{tail}"
    );
    let runs: u64 = log
        .lines()
        .find_map(|l| {
            l.strip_prefix("Done ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("no 'Done N runs' line from libFuzzer:\n{tail}"));
    println!("libFuzzer executed {runs} inputs");
    assert!(runs > 1000, "the fuzzer hardly ran: {runs} inputs\n{tail}");
}
