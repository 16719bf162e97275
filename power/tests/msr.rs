//! MSR RAPL: unit decoding and energy accumulation against recorded register values (Intel server,
//! Intel client, AMD), 32-bit wrap, and the real `/dev/cpu/N/msr` pread path on sparse files.

mod common;

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::*;
use power::platform::{CpuInfo, CpuVendor};
use power::rapl::msr::*;
use power::{EnergySource, Platform};

/// Recorded registers; missing ones answer EIO like a CPU without that MSR.
#[derive(Clone)]
struct Recorded(Arc<Mutex<HashMap<(u32, u32), u64>>>);

impl Recorded {
    fn load(name: &str) -> Self {
        Recorded(Arc::new(Mutex::new(load_regs(&fixture(&format!(
            "msr/{name}"
        ))))))
    }
    fn add(&self, cpu: u32, msr: u32, counts: u64) {
        let mut m = self.0.lock().unwrap();
        let v = m.get_mut(&(cpu, msr)).unwrap();
        let hi = *v & 0xFFFF_FFFF_0000_0000;
        *v = hi | ((*v + counts) & 0xFFFF_FFFF);
    }
    fn set(&self, cpu: u32, msr: u32, value: u64) {
        self.0.lock().unwrap().insert((cpu, msr), value);
    }
}

impl MsrAccess for Recorded {
    fn read_msr(&mut self, cpu: u32, msr: u32) -> io::Result<u64> {
        self.0
            .lock()
            .unwrap()
            .get(&(cpu, msr))
            .copied()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))
    }
    fn path(&self, cpu: u32) -> PathBuf {
        PathBuf::from(format!("recorded/cpu/{cpu}/msr"))
    }
}

fn names(src: &dyn EnergySource) -> Vec<(String, bool)> {
    src.domains()
        .iter()
        .map(|d| (d.name.clone(), d.in_total))
        .collect()
}

fn delta(a: &[f64], b: &[f64], src: &dyn EnergySource, name: &str) -> f64 {
    let i = src.domains().iter().position(|d| d.name == name).unwrap();
    b[i] - a[i]
}

#[test]
fn recorded_unit_registers_decode() {
    let intel = load_regs(&fixture("msr/intel-skylake-sp.regs"));
    let u = decode_units(intel[&(0, INTEL_RAPL_POWER_UNIT)]);
    assert_eq!(u.esu, 14);
    assert_eq!(u.energy_j, 1.0 / 16384.0);
    assert_eq!(u.power_w, 0.125);
    assert_eq!(u.time_s, 1.0 / 1024.0);
    let amd = load_regs(&fixture("msr/amd-zen2.regs"));
    let u = decode_units(amd[&(0, AMD_RAPL_POWER_UNIT)]);
    assert_eq!(u.esu, 16);
    assert_eq!(u.energy_j, 1.0 / 65536.0);
    let client = load_regs(&fixture("msr/intel-skylake-client.regs"));
    assert_eq!(
        energy_count(client[&(0, INTEL_PLATFORM_ENERGY_STATUS)]),
        0x0506_0708
    );
}

#[test]
fn intel_server_two_packages_with_dram_unit_and_wrap() {
    let p = Platform::host()
        .with_sys_root(fixture("intel-2pkg"))
        .with_proc_root(fixture("proc/intel-skx"));
    let cpu = p.cpu_info().unwrap();
    assert_eq!(
        (cpu.vendor.clone(), cpu.family, cpu.model),
        (CpuVendor::Intel, 6, 0x55)
    );
    let regs = Recorded::load("intel-skylake-sp.regs");
    let mut m = MsrRapl::open_with(&p, &cpu, Box::new(regs.clone())).unwrap();
    let want: Vec<(String, bool)> = [
        ("package-0", true),
        ("core-0", false),
        ("dram-0", true),
        ("package-1", true),
        ("core-1", false),
        ("dram-1", true),
    ]
    .iter()
    .map(|(n, t)| (n.to_string(), *t))
    .collect();
    assert_eq!(names(&m), want, "PP1 and psys answer EIO and are skipped");
    assert_eq!(m.units().len(), 2);
    let now = Instant::now();
    let a = m.read(now).unwrap();
    regs.add(0, INTEL_PKG_ENERGY_STATUS, 16_384); // 1 J at 2^-14 J
    regs.add(0, INTEL_DRAM_ENERGY_STATUS, 1_000); // 15.3 mJ at the fixed DRAM unit
    regs.add(4, INTEL_PKG_ENERGY_STATUS, 0x2000); // 0xfffff000 -> 0x00001000: wraps, 0.5 J
    regs.add(4, INTEL_PP0_ENERGY_STATUS, 8_192);
    let b = m.read(now).unwrap();
    assert!((delta(&a, &b, &m, "package-0") - 1.0).abs() < 1e-12);
    assert!((delta(&a, &b, &m, "dram-0") - 0.0153).abs() < 1e-12);
    assert!((delta(&a, &b, &m, "package-1") - 0.5).abs() < 1e-12);
    assert!((delta(&a, &b, &m, "core-1") - 0.5).abs() < 1e-12);
    assert_eq!(delta(&a, &b, &m, "core-0"), 0.0);
    assert!(m.take_warnings().is_empty());
}

#[test]
fn intel_client_psys_is_the_total_and_reserved_bits_are_ignored() {
    let empty = TempDir::new("msr-client"); // no topology: one package on CPU 0
    let p = Platform::host().with_sys_root(empty.path());
    let cpu = CpuInfo {
        vendor: CpuVendor::Intel,
        family: 6,
        model: 0x5E,
        hypervisor: false,
        rapl_flag: false,
    };
    let regs = Recorded::load("intel-skylake-client.regs");
    let mut m = MsrRapl::open_with(&p, &cpu, Box::new(regs.clone())).unwrap();
    let want: Vec<(String, bool)> = [
        ("package-0", false),
        ("core-0", false),
        ("uncore-0", false),
        ("dram-0", false),
        ("psys", true),
    ]
    .iter()
    .map(|(n, t)| (n.to_string(), *t))
    .collect();
    assert_eq!(names(&m), want);
    let now = Instant::now();
    let a = m.read(now).unwrap();
    // Upper (reserved) bits change together with a 1 J step in psys: only the low 32 bits count.
    regs.set(
        0,
        INTEL_PLATFORM_ENERGY_STATUS,
        0xbeef_0000_0506_0708 + 16_384,
    );
    regs.add(0, INTEL_PP1_ENERGY_STATUS, 4_096);
    let b = m.read(now).unwrap();
    assert!((delta(&a, &b, &m, "psys") - 1.0).abs() < 1e-12);
    assert!((delta(&a, &b, &m, "uncore-0") - 0.25).abs() < 1e-12);
    // DRAM of a client part uses the ordinary unit.
    regs.add(0, INTEL_DRAM_ENERGY_STATUS, 16_384);
    let c = m.read(now).unwrap();
    assert!((delta(&b, &c, &m, "dram-0") - 1.0).abs() < 1e-12);
}

#[test]
fn amd_package_and_summed_per_core_registers() {
    let p = Platform::host()
        .with_sys_root(fixture("amd-1pkg"))
        .with_proc_root(fixture("proc/amd-zen2"));
    let cpu = p.cpu_info().unwrap();
    assert_eq!(cpu.vendor, CpuVendor::Amd);
    let regs = Recorded::load("amd-zen2.regs");
    let mut m = MsrRapl::open_with(&p, &cpu, Box::new(regs.clone())).unwrap();
    assert_eq!(
        names(&m),
        vec![
            ("package-0".to_string(), true),
            ("core-0".to_string(), false)
        ]
    );
    let now = Instant::now();
    let a = m.read(now).unwrap();
    regs.add(0, AMD_PKG_ENERGY_STATUS, 131_072); // 2 J at 2^-16 J (0xc0ffee00 + 0x20000: no wrap)
    regs.add(0, AMD_CORE_ENERGY_STATUS, 65_536); // core 0: 1 J
    regs.add(1, AMD_CORE_ENERGY_STATUS, 32_768); // core 1: 0.5 J
    let b = m.read(now).unwrap();
    assert!((delta(&a, &b, &m, "package-0") - 2.0).abs() < 1e-12);
    assert!((delta(&a, &b, &m, "core-0") - 1.5).abs() < 1e-12);
    // Wrap the package register several times in steps below half the range.
    for _ in 0..5 {
        regs.add(0, AMD_PKG_ENERGY_STATUS, 0x7000_0000);
        m.read(now).unwrap();
    }
    let c = m.read(now).unwrap();
    let expect = 5.0 * f64::from(0x7000_0000u32) / 65_536.0;
    assert!((delta(&b, &c, &m, "package-0") - expect).abs() < 1e-6);
}

#[test]
fn unknown_vendor_and_missing_unit_register() {
    let p = Platform::host().with_proc_root(fixture("proc/vm"));
    let other = CpuInfo {
        vendor: CpuVendor::Other("CentaurHauls".into()),
        family: 6,
        model: 15,
        hypervisor: false,
        rapl_flag: false,
    };
    let empty = Recorded(Arc::new(Mutex::new(HashMap::new())));
    let err = MsrRapl::open_with(&p, &other, Box::new(empty.clone())).unwrap_err();
    assert!(err.to_string().contains("CentaurHauls"), "{err}");
    let vm_cpu = p.cpu_info().unwrap();
    let err = MsrRapl::open_with(&p, &vm_cpu, Box::new(empty)).unwrap_err();
    assert!(err.is_not_present());
    let msg = err.to_string();
    assert!(msg.contains("0xc0010299"), "{msg}");
    assert!(msg.contains("virtual machine"), "{msg}");
}

fn write_reg(dev: &Path, cpu: u32, msr: u32, value: u64) {
    let path = dev.join(format!("cpu/{cpu}/msr"));
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap();
    f.write_all_at(&value.to_le_bytes(), u64::from(msr))
        .unwrap();
}

#[test]
fn dev_cpu_msr_pread_on_sparse_files() {
    // The device reads 8 bytes at offset = MSR number. A sparse file with the recorded values at those
    // offsets exercises the same pread path. (Only for the Intel registers, which are at least 8 apart;
    // AMD's 0xC0010299..0xC001029B are adjacent and would overlap in a file.)
    let t = TempDir::new("msr-dev");
    let dev = t.join("dev");
    for ((cpu, msr), v) in load_regs(&fixture("msr/intel-skylake-sp.regs")) {
        write_reg(&dev, cpu, msr, v);
    }
    let p = Platform::host()
        .with_sys_root(fixture("intel-2pkg"))
        .with_proc_root(fixture("proc/intel-skx"))
        .with_dev_root(&dev);
    let mut m = MsrRapl::open(&p).unwrap();
    assert!(
        m.description().contains("61.035 uJ/count"),
        "{}",
        m.description()
    );
    assert_eq!(m.domains().len(), 6);
    let now = Instant::now();
    let a = m.read(now).unwrap();
    write_reg(&dev, 0, INTEL_PKG_ENERGY_STATUS, 0x4a3b_1c2d + 16_384 * 3);
    write_reg(&dev, 4, INTEL_PKG_ENERGY_STATUS, 0x0000_0fff); // wrapped from 0xfffff000
    let b = m.read(now).unwrap();
    assert!((delta(&a, &b, &m, "package-0") - 3.0).abs() < 1e-12);
    assert!((delta(&a, &b, &m, "package-1") - 8191.0 / 16_384.0).abs() < 1e-12);
}

#[test]
fn missing_device_says_modprobe() {
    let t = TempDir::new("msr-nodev");
    let p = Platform::host()
        .with_sys_root(fixture("amd-1pkg"))
        .with_proc_root(fixture("proc/amd-zen2"))
        .with_dev_root(t.path());
    let err = MsrRapl::open(&p).unwrap_err();
    assert!(err.is_not_present());
    assert!(err.to_string().contains("modprobe msr"), "{err}");
}

#[test]
fn unprivileged_user_gets_capability_hint() {
    assert!(
        is_root() && Path::new("/usr/bin/setpriv").exists(),
        "this test needs root and setpriv (util-linux) to switch to user nobody; run `make test` as root"
    );
    let t = TempDir::new("msr-perm");
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let dev = t.join("dev");
    for ((cpu, msr), v) in load_regs(&fixture("msr/intel-skylake-sp.regs")) {
        write_reg(&dev, cpu, msr, v);
    }
    for cpu in [0, 4] {
        fs::set_permissions(
            dev.join(format!("cpu/{cpu}/msr")),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
    let out = Command::new("/usr/bin/setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_vnb-power"))
        .args(["sample", "--source", "msr", "--duration", "0.1"])
        .arg("--dev-root")
        .arg(&dev)
        .arg("--sysfs-root")
        .arg(fixture("intel-2pkg"))
        .arg("--proc-root")
        .arg(fixture("proc/intel-skx"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert!(stderr.contains("CAP_SYS_RAWIO"), "{stderr}");
}
