//! powercap replay: recorded sysfs trees copied to a temp dir, counters advanced and wrapped by
//! rewriting `energy_uj`, root-only `energy_uj` through an unprivileged file reader.

mod common;

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use power::platform::FileReader;
use power::rapl::powercap::Powercap;
use power::sampler::{SamplerConfig, SamplerCore};
use power::{EnergySource, Platform, PowerError};

fn domains(src: &dyn EnergySource) -> Vec<(String, bool)> {
    src.domains()
        .iter()
        .map(|d| (d.name.clone(), d.in_total))
        .collect()
}

fn zone_of(pc: &Powercap, domain: &str) -> String {
    pc.zones()
        .iter()
        .find(|z| z.domain == domain)
        .unwrap()
        .dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn intel_zones_are_found_by_name_and_psys_is_the_total() {
    let t = fixture_copy("intel-2pkg");
    let pc = Powercap::open(&Platform::host().with_sys_root(t.path())).unwrap();
    let expect: Vec<(String, bool)> = [
        ("package-0", false),
        ("core-0", false),
        ("uncore-0", false),
        ("dram-0", false),
        ("psys", true),
        ("package-1", false),
        ("core-1", false),
        ("uncore-1", false),
        ("dram-1", false),
    ]
    .iter()
    .map(|(n, t)| (n.to_string(), *t))
    .collect();
    assert_eq!(domains(&pc), expect);
    // package-1's subzones are in a different index order: matched by name, not index.
    assert_eq!(zone_of(&pc, "dram-1"), "intel-rapl:2:0");
    assert_eq!(zone_of(&pc, "core-1"), "intel-rapl:2:1");
    assert_eq!(zone_of(&pc, "dram-0"), "intel-rapl:0:2");
    assert_eq!(zone_of(&pc, "package-1"), "intel-rapl:2");
    // The MMIO duplicate of package-0 is not read a second time.
    assert_eq!(zone_of(&pc, "package-0"), "intel-rapl:0");
    assert!(pc
        .zones()
        .iter()
        .all(|z| !z.dir.to_string_lossy().contains("mmio")));
}

#[test]
fn without_psys_the_total_is_packages_plus_dram() {
    let t = fixture_copy("intel-2pkg");
    fs::remove_dir_all(t.join("class/powercap/intel-rapl:1")).unwrap();
    let pc = Powercap::open(&Platform::host().with_sys_root(t.path())).unwrap();
    let in_total: Vec<String> = domains(&pc)
        .into_iter()
        .filter(|(_, t)| *t)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(in_total, vec!["package-0", "dram-0", "package-1", "dram-1"]);
}

#[test]
fn counters_advance_and_wrap() {
    let t = fixture_copy("intel-2pkg");
    let root = t.path();
    let range_dram: u64 = 65_712_999_613;
    // Put dram-1 (intel-rapl:2:0) just below its wrap point before opening.
    set_energy_uj(root, "intel-rapl:2:0", range_dram - 500);
    let mut pc = Powercap::open(&Platform::host().with_sys_root(root)).unwrap();
    let idx = |name: &str| pc.domains().iter().position(|d| d.name == name).unwrap();
    let (p0, d1, psys) = (idx("package-0"), idx("dram-1"), idx("psys"));
    let t0 = Instant::now();
    let v0 = pc.read(t0).unwrap();
    set_energy_uj(root, "intel-rapl:0", 1_234_567_890 + 2_500_000);
    set_energy_uj(root, "intel-rapl:2:0", 1500); // wrapped: 500 + 1 (the 0 step) + 1500
    set_energy_uj(root, "intel-rapl:1", 9_876_543_210 + 7_000_000);
    let v1 = pc.read(t0 + Duration::from_secs(1)).unwrap();
    assert!((v1[p0] - v0[p0] - 2.5).abs() < 1e-9, "{}", v1[p0] - v0[p0]);
    assert!(
        (v1[d1] - v0[d1] - 0.002_001).abs() < 1e-12,
        "{}",
        v1[d1] - v0[d1]
    );
    assert!((v1[psys] - v0[psys] - 7.0).abs() < 1e-9);
    assert!(pc.take_warnings().iter().all(|w| !w.contains("half")));
    // A jump of more than half the range is reported.
    set_energy_uj(root, "intel-rapl:0", 1_234_567_890 + 200_000_000_000);
    pc.read(t0 + Duration::from_secs(2)).unwrap();
    let w = pc.take_warnings();
    assert!(
        w.iter()
            .any(|w| w.contains("package-0") && w.contains("half")),
        "{w:?}"
    );
}

#[test]
fn sampler_totals_over_replayed_tree() {
    let t = fixture_copy("intel-2pkg");
    let root = t.path().to_path_buf();
    // psys +3 J, package-0 +2 J, package-1 +1 J over 2 s in 20 steps; psys starts 1 J below its
    // wrap point (max_energy_range_uj 262143328850), so it wraps on the way.
    let psys_start: u64 = 262_143_328_850 - 1_000_000;
    set_energy_uj(&root, "intel-rapl:1", psys_start);
    let pc = Powercap::open(&Platform::host().with_sys_root(&root)).unwrap();
    let mut core = SamplerCore::new(
        vec![Box::new(pc)],
        SamplerConfig::every(Duration::from_millis(100)),
    )
    .unwrap();
    let t0 = Instant::now();
    let a = core.mark(t0 + Duration::from_millis(1)).unwrap();
    for i in 1..=20u64 {
        let psys = (psys_start + i * 150_000) % 262_143_328_851;
        set_energy_uj(&root, "intel-rapl:1", psys);
        set_energy_uj(&root, "intel-rapl:0", 1_234_567_890 + i * 100_000);
        set_energy_uj(&root, "intel-rapl:2", 2_234_567_890 + i * 50_000);
        core.poll(t0 + Duration::from_millis(1 + 100 * i)).unwrap();
    }
    let b = core.mark(t0 + Duration::from_millis(2001)).unwrap();
    let iv = core.between(&a, &b);
    let s = iv.primary().unwrap();
    assert_eq!(s.kind, power::Kind::Measurement);
    assert!(
        (s.total_joules - 3.0).abs() < 1e-9,
        "total {}",
        s.total_joules
    );
    assert!((s.mean_watts - 1.5).abs() < 1e-9);
    assert!((s.domain("package-0").unwrap().joules - 2.0).abs() < 1e-9);
    assert!((s.domain("package-1").unwrap().joules - 1.0).abs() < 1e-9);
    assert_eq!(s.domain("dram-0").unwrap().joules, 0.0);
}

#[test]
fn amd_package_and_core() {
    let t = fixture_copy("amd-1pkg");
    let mut pc = Powercap::open(&Platform::host().with_sys_root(t.path())).unwrap();
    assert_eq!(
        domains(&pc),
        vec![
            ("package-0".to_string(), true),
            ("core-0".to_string(), false)
        ]
    );
    let t0 = Instant::now();
    let v0 = pc.read(t0).unwrap();
    // package wraps at 65535999984 µJ.
    set_energy_uj(t.path(), "intel-rapl:0", 65_535_999_984);
    let v1 = pc.read(t0).unwrap();
    set_energy_uj(t.path(), "intel-rapl:0", 99);
    let v2 = pc.read(t0).unwrap();
    assert!((v1[0] - v0[0] - (65_535_999_984.0 - 51_234_567_890.0) * 1e-6).abs() < 1e-6);
    assert!((v2[0] - v1[0] - 100e-6).abs() < 1e-12, "{}", v2[0] - v1[0]);
}

#[test]
fn mmio_only_machine_uses_mmio_zone() {
    let t = fixture_copy("intel-2pkg");
    for e in fs::read_dir(t.join("class/powercap")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("intel-rapl:") {
            fs::remove_dir_all(e.path()).unwrap();
        }
    }
    let pc = Powercap::open(&Platform::host().with_sys_root(t.path())).unwrap();
    assert_eq!(domains(&pc), vec![("package-0".to_string(), true)]);
    assert_eq!(zone_of(&pc, "package-0"), "intel-rapl-mmio:0");
}

#[test]
fn missing_tree_is_not_present_and_says_why() {
    let t = TempDir::new("pc-empty");
    let vm_proc = fixture("proc/vm");
    let err = Powercap::open(
        &Platform::host()
            .with_sys_root(t.path())
            .with_proc_root(&vm_proc),
    )
    .unwrap_err();
    assert!(err.is_not_present(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("class/powercap does not exist"), "{msg}");
    assert!(msg.contains("virtual machine"), "{msg}");
    // Same without the hypervisor flag: the driver hint instead.
    let err = Powercap::open(
        &Platform::host()
            .with_sys_root(t.path())
            .with_proc_root(fixture("proc/intel-skx")),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("modprobe intel_rapl_msr"), "{err}");
    assert!(!err.contains("virtual machine"), "{err}");
}

/// What an unprivileged user could read: refuses files without the "other" read bit.
#[derive(Debug)]
struct UnprivilegedView;

impl FileReader for UnprivilegedView {
    fn read_to_string(&self, path: &Path) -> io::Result<String> {
        let mode = fs::metadata(path)?.permissions().mode();
        if mode & 0o004 == 0 {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        fs::read_to_string(path)
    }
}

fn make_root_only(root: &Path) {
    for e in fs::read_dir(root.join("class/powercap")).unwrap() {
        let f = e.unwrap().path().join("energy_uj");
        if f.exists() {
            fs::set_permissions(&f, fs::Permissions::from_mode(0o400)).unwrap();
        }
    }
}

#[test]
fn root_only_energy_uj_gives_actionable_permission_error() {
    let t = fixture_copy("intel-2pkg");
    // Control: with world-readable files the unprivileged view opens fine.
    for e in fs::read_dir(t.join("class/powercap")).unwrap() {
        let f = e.unwrap().path().join("energy_uj");
        if f.exists() {
            fs::set_permissions(&f, fs::Permissions::from_mode(0o444)).unwrap();
        }
    }
    let view = Platform::host()
        .with_sys_root(t.path())
        .with_reader(Arc::new(UnprivilegedView));
    Powercap::open(&view).expect("0444 files are readable");
    make_root_only(t.path());
    let err = Powercap::open(&view).unwrap_err();
    match &err {
        PowerError::PermissionDenied { path, hint, .. } => {
            assert!(path.ends_with("energy_uj"), "{path:?}");
            assert!(hint.contains("PLATYPUS"), "{hint}");
            assert!(hint.contains("CAP_DAC_READ_SEARCH"), "{hint}");
            assert!(hint.contains("chgrp power"), "{hint}");
            assert!(hint.contains("chmod"), "{hint}");
        }
        other => panic!("expected PermissionDenied, got {other}"),
    }
    // Root (the real reader) still reads the 0400 files.
    Powercap::open(&Platform::host().with_sys_root(t.path())).expect("root reads 0400");
}

#[test]
fn root_only_energy_uj_for_a_real_unprivileged_user() {
    assert!(
        is_root() && Path::new("/usr/bin/setpriv").exists(),
        "this test needs root and setpriv (util-linux) to switch to user nobody; run `make test` as root"
    );
    let t = fixture_copy("intel-2pkg");
    make_root_only(t.path());
    // Temp dirs are created 0700 by some umasks: let nobody traverse the tree.
    let mut p = t.path().to_path_buf();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    while let Some(parent) = p.parent() {
        if parent == std::env::temp_dir() || parent == Path::new("/") {
            break;
        }
        p = parent.to_path_buf();
    }
    let out = Command::new("/usr/bin/setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_vnb-power"))
        .args([
            "sample",
            "--source",
            "powercap",
            "--duration",
            "0.1",
            "--sysfs-root",
        ])
        .arg(t.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert!(stderr.contains("PLATYPUS"), "{stderr}");
    assert!(stderr.contains("energy_uj"), "{stderr}");
}
