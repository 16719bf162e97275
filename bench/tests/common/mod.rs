//! What the bench's integration tests share: prerequisite checks that fail with what to
//! install, and the binaries under test.

use std::path::PathBuf;
use std::process::Command;

/// Fails the test, naming the package to install, when `cmd` is not on the PATH.
pub fn require_cmd(cmd: &str, pkg: &str) {
    assert!(
        Command::new("sh")
            .args(["-c", &format!("command -v {cmd} >/dev/null")])
            .status()
            .unwrap()
            .success(),
        "{cmd} missing: install {pkg} (ci/setup.sh)"
    );
}

/// The `vnb-bench` binary cargo built for this test.
pub fn vnb_bench() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vnb-bench"))
}

/// Our backend, built next to `vnb-bench`; fails the test when it is missing.
pub fn vnb_backend() -> PathBuf {
    let vnb = vnb_bench().parent().unwrap().join("vhost-net-batch");
    assert!(
        vnb.exists(),
        "{} missing: build the workspace first (cargo build --workspace)",
        vnb.display()
    );
    vnb
}
