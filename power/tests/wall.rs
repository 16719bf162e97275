//! Wall power sources: hwmon sensors from recorded trees, ipmitool outputs, the meter command.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;
use power::sampler::{SamplerConfig, SamplerCore};
use power::wall::hwmon::Hwmon;
use power::wall::ipmi::{parse_dcmi_power_reading, IpmiDcmi};
use power::wall::meter::ExternalMeter;
use power::{EnergySource, Platform, Quantity};

fn read_fixture(rel: &str) -> String {
    fs::read_to_string(fixture(rel)).unwrap()
}

#[test]
fn hwmon_power_sensors_and_totals() {
    let t = fixture_copy("intel-2pkg");
    let mut h = Hwmon::open(&Platform::host().with_sys_root(t.path())).unwrap();
    let d: Vec<(String, Quantity, bool)> = h
        .domains()
        .iter()
        .map(|d| (d.name.clone(), d.quantity, d.in_total))
        .collect();
    assert_eq!(
        d,
        vec![
            ("power_meter-power1".to_string(), Quantity::Power, true),
            ("pmbus-pin".to_string(), Quantity::Power, false),
            ("pmbus-pout1".to_string(), Quantity::Power, false),
        ]
    );
    assert_eq!(h.read(Instant::now()).unwrap(), vec![187.0, 201.5, 180.25]);
    // Integrated by the sampler: 201.5 W then 221.5 W for 2 s → trapezoid.
    let mut core = SamplerCore::new(
        vec![Box::new(h)],
        SamplerConfig::every(Duration::from_secs(1)),
    )
    .unwrap();
    let t0 = Instant::now();
    let a = core.mark(t0).unwrap();
    write_atomic(&t.join("class/hwmon/hwmon1/power1_input"), "221500000\n");
    let b = core.mark(t0 + Duration::from_secs(2)).unwrap();
    let iv = core.between(&a, &b);
    let s = iv.primary().unwrap();
    assert!((s.domain("pmbus-pin").unwrap().joules - (201.5 + 221.5)).abs() < 1e-9);
    assert!((s.domain("power_meter-power1").unwrap().joules - 374.0).abs() < 1e-9);
    // Both read the wall: the total is the ACPI meter's, not the sum (no double counting).
    assert!((s.total_joules - 374.0).abs() < 1e-9, "{}", s.total_joules);
}

#[test]
fn hwmon_energy_counters_and_cpu_internal_chips() {
    let t = fixture_copy("amd-1pkg");
    let mut h = Hwmon::open(&Platform::host().with_sys_root(t.path())).unwrap();
    let d: Vec<(String, Quantity, bool)> = h
        .domains()
        .iter()
        .map(|d| (d.name.clone(), d.quantity, d.in_total))
        .collect();
    assert_eq!(
        d,
        vec![
            ("amd_energy-Ecore000".to_string(), Quantity::Energy, false),
            ("amd_energy-Ecore001".to_string(), Quantity::Energy, false),
            ("amd_energy-Esocket0".to_string(), Quantity::Energy, false),
        ]
    );
    let a = h.read(Instant::now()).unwrap();
    write_atomic(&t.join("class/hwmon/hwmon0/energy3_input"), "12500000\n");
    let b = h.read(Instant::now()).unwrap();
    assert!((b[2] - a[2] - 3.5).abs() < 1e-12);
}

#[test]
fn hwmon_absent() {
    let t = TempDir::new("hwmon-none");
    let err = Hwmon::open(&Platform::host().with_sys_root(t.path())).unwrap_err();
    assert!(err.is_not_present());
    assert!(
        err.to_string().contains("class/hwmon does not exist"),
        "{err}"
    );
}

#[test]
fn ipmitool_outputs_parse() {
    let r = parse_dcmi_power_reading(&read_fixture("ipmitool/dcmi-activated.txt")).unwrap();
    assert_eq!(r.instantaneous_w, 220.0);
    assert_eq!(r.minimum_w, Some(72.0));
    assert_eq!(r.maximum_w, Some(348.0));
    assert_eq!(r.average_w, Some(206.0));
    assert_eq!(r.sampling_period_s, Some(5.0));
    assert_eq!(r.active, Some(true));
    let r = parse_dcmi_power_reading(&read_fixture("ipmitool/dcmi-1s-period.txt")).unwrap();
    assert_eq!((r.instantaneous_w, r.sampling_period_s), (147.0, Some(1.0)));
    let r = parse_dcmi_power_reading(&read_fixture("ipmitool/dcmi-deactivated.txt")).unwrap();
    assert_eq!((r.instantaneous_w, r.active), (0.0, Some(false)));
    let err = parse_dcmi_power_reading(&read_fixture("ipmitool/dcmi-unsupported.txt")).unwrap_err();
    assert!(err.contains("Invalid command (c1)"), "{err}");
    assert!(parse_dcmi_power_reading("").is_err());
}

/// A fake ipmitool (a shell script printing a recorded output) and a fake /dev with `ipmi0`.
fn fake_ipmitool(t: &TempDir, output_fixture: &str, exit: i32) -> (String, std::path::PathBuf) {
    let script = t.join("ipmitool");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$*\" = \"dcmi power reading\" ] || {{ echo \"bad args: $*\" >&2; exit 9; }}\ncat '{}'\nexit {exit}\n",
            fixture(output_fixture).display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let dev = t.join("dev");
    fs::create_dir_all(&dev).unwrap();
    fs::write(dev.join("ipmi0"), "").unwrap();
    (script.to_string_lossy().into_owned(), dev)
}

#[test]
fn ipmi_source_runs_the_command() {
    let t = TempDir::new("ipmi");
    let (tool, dev) = fake_ipmitool(&t, "ipmitool/dcmi-activated.txt", 0);
    let p = Platform::host().with_dev_root(&dev);
    let mut s = IpmiDcmi::open(&p, &tool).unwrap();
    assert_eq!(s.read(Instant::now()).unwrap(), vec![220.0]);
    assert_eq!(s.domains()[0].name, "wall");
    // No BMC device: not present, and it says what to load.
    let err = IpmiDcmi::open(&Platform::host().with_dev_root(t.path()), &tool).unwrap_err();
    assert!(err.is_not_present());
    assert!(err.to_string().contains("ipmi_devintf"), "{err}");
    // A remote BMC (-H) does not need the local device; extra arguments are passed through.
    let (tool2, _) = fake_ipmitool(&t, "ipmitool/dcmi-activated.txt", 0);
    let err = IpmiDcmi::open(
        &Platform::host().with_dev_root(t.path()),
        &format!("{tool2} -H bmc"),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("bad args: -H bmc dcmi power reading"),
        "{err}"
    );
}

#[test]
fn ipmi_failures_are_clear() {
    let t = TempDir::new("ipmi-bad");
    let (tool, dev) = fake_ipmitool(&t, "ipmitool/dcmi-unsupported.txt", 1);
    let p = Platform::host().with_dev_root(&dev);
    let err = IpmiDcmi::open(&p, &tool).unwrap_err().to_string();
    assert!(err.contains("failed"), "{err}");
    assert!(err.contains("Invalid command (c1)"), "{err}");
    let t2 = TempDir::new("ipmi-deact");
    let (tool, dev) = fake_ipmitool(&t2, "ipmitool/dcmi-deactivated.txt", 0);
    let err = IpmiDcmi::open(&Platform::host().with_dev_root(&dev), &tool).unwrap_err();
    assert!(err.to_string().contains("deactivated"), "{err}");
    let err = IpmiDcmi::open(&p, "/nonexistent/ipmitool").unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
}

#[test]
fn meter_command() {
    let mut m = ExternalMeter::open("echo 'power: 57.5 W'").unwrap();
    assert_eq!(m.read(Instant::now()).unwrap(), vec![57.5]);
    assert!(ExternalMeter::open("echo n/a").is_err());
    let err = ExternalMeter::open("exit 3").unwrap_err().to_string();
    assert!(err.contains("exit status: 3"), "{err}");
}
