//! Helpers shared by the integration tests: temporary trees, fixture paths, atomic rewrites.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!(
            "vnb-power-{tag}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `power/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// Recursively copy a directory tree.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    fs::create_dir_all(dst)?;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let to = dst.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &to)?;
        } else {
            fs::copy(entry.path(), &to)?;
        }
    }
    Ok(())
}

/// A copy of a fixture tree in a fresh temp dir.
pub fn fixture_copy(name: &str) -> TempDir {
    let t = TempDir::new(name);
    copy_tree(&fixture(name), t.path()).unwrap();
    t
}

/// Replace a file's content atomically (write a sibling, rename), so concurrent readers see either
/// the old or the new value, never an empty file.
pub fn write_atomic(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp-write");
    fs::write(&tmp, content).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Set a powercap zone's `energy_uj` in a copied tree.
pub fn set_energy_uj(root: &Path, zone: &str, value: u64) {
    write_atomic(
        &root.join(format!("class/powercap/{zone}/energy_uj")),
        &format!("{value}\n"),
    );
}

/// Read a recorded `cpu msr value` register file.
pub fn load_regs(path: &Path) -> HashMap<(u32, u32), u64> {
    let mut m = HashMap::new();
    for line in fs::read_to_string(path).unwrap().lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
        m.insert((f[0].parse().unwrap(), hex(f[1]) as u32), hex(f[2]));
    }
    m
}

/// True when running as root (some tests switch to an unprivileged user).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
