//! perf_event `power` PMU: the sysfs description from recorded trees, the counter plan (one counter
//! per package, psys once), and the perf_event_open/read path itself on a software event.

mod common;

use std::thread;
use std::time::Duration;

use common::*;
use power::rapl::perf::{plan_counters, read_power_pmu, PerfCounter, PerfRapl};
use power::rapl::RaplDomain;
use power::Platform;

#[test]
fn intel_pmu_description() {
    let p = Platform::host().with_sys_root(fixture("intel-2pkg"));
    let pmu = read_power_pmu(&p).unwrap();
    assert_eq!(pmu.pmu_type, 23);
    assert_eq!(pmu.cpus, vec![0, 4]);
    let names: Vec<(&str, u64)> = pmu
        .events
        .iter()
        .map(|e| (e.name.as_str(), e.config))
        .collect();
    assert_eq!(
        names,
        vec![
            ("energy-cores", 1),
            ("energy-gpu", 4),
            ("energy-pkg", 2),
            ("energy-psys", 5),
            ("energy-ram", 3)
        ]
    );
    for e in &pmu.events {
        assert_eq!(e.scale, 1.0 / 4_294_967_296.0); // the file says 2.3283064365386962890625e-10 = 2^-32 J
        assert_eq!(e.unit, "Joules");
    }
    // One counter per package and event, psys (platform-wide) only once.
    let plan = plan_counters(&pmu, &p);
    let got: Vec<(u32, u32, String)> = plan
        .iter()
        .map(|(pkg, cpu, ev)| (*pkg, *cpu, ev.domain.name(*pkg)))
        .collect();
    let want: Vec<(u32, u32, String)> = vec![
        (0, 0, "package-0".into()),
        (0, 0, "core-0".into()),
        (0, 0, "uncore-0".into()),
        (0, 0, "dram-0".into()),
        (0, 0, "psys".into()),
        (1, 4, "package-1".into()),
        (1, 4, "core-1".into()),
        (1, 4, "uncore-1".into()),
        (1, 4, "dram-1".into()),
    ];
    assert_eq!(got, want);
    assert_eq!(
        plan.iter()
            .filter(|(_, _, e)| e.domain == RaplDomain::Psys)
            .count(),
        1
    );
}

#[test]
fn amd_pmu_has_package_only() {
    let p = Platform::host().with_sys_root(fixture("amd-1pkg"));
    let pmu = read_power_pmu(&p).unwrap();
    assert_eq!(pmu.pmu_type, 24);
    assert_eq!(pmu.cpus, vec![0]);
    assert_eq!(pmu.events.len(), 1);
    assert_eq!(pmu.events[0].domain, RaplDomain::Package);
}

#[test]
fn bad_scale_is_rejected() {
    let t = fixture_copy("amd-1pkg");
    write_atomic(
        &t.join("bus/event_source/devices/power/events/energy-pkg.scale"),
        "zero\n",
    );
    let err = read_power_pmu(&Platform::host().with_sys_root(t.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("energy-pkg.scale"), "{err}");
}

#[test]
fn missing_pmu_is_not_present() {
    let t = TempDir::new("perf-empty");
    let err = PerfRapl::open(
        &Platform::host()
            .with_sys_root(t.path())
            .with_proc_root(fixture("proc/vm")),
    )
    .unwrap_err();
    assert!(err.is_not_present());
    let msg = err.to_string();
    assert!(msg.contains("devices/power does not exist"), "{msg}");
    assert!(msg.contains("virtual machine"), "{msg}");
}

#[test]
fn replayed_pmu_whose_type_the_kernel_lacks_is_not_present() {
    // Type 23 is the recorded machine's dynamic PMU number; this kernel has no such PMU (or it is
    // another one that rejects config 2 on cpu 0 system-wide): either way it must not be usable.
    let err = PerfRapl::open(&Platform::host().with_sys_root(fixture("amd-1pkg")));
    match err {
        Err(e) => assert!(
            e.is_not_present() || e.is_permission_denied(),
            "unexpected error {e}"
        ),
        Ok(_) => assert!(
            std::path::Path::new("/sys/bus/event_source/devices/power").exists(),
            "a replayed PMU type must not open on a machine without RAPL"
        ),
    }
}

#[test]
fn perf_event_open_and_read_work_on_a_software_event() {
    // PERF_TYPE_SOFTWARE (1) / PERF_COUNT_SW_CPU_CLOCK (0), system-wide on CPU 0: the same syscall,
    // attribute layout and read path as the RAPL counters, on an event every kernel has.
    let mut c = match PerfCounter::open(1, 0, 0) {
        Ok(c) => c,
        Err(e) if !is_root() => {
            panic!("system-wide perf events need privileges: run `make test` as root ({e})")
        }
        Err(e) => panic!("perf_event_open failed as root: {e}"),
    };
    let a = c.read().unwrap();
    thread::sleep(Duration::from_millis(20));
    let b = c.read().unwrap();
    // cpu-clock counts nanoseconds of CPU 0; over 20 ms it must have advanced (idle or not, the
    // system-wide cpu-clock counts wall time on that CPU).
    assert!(b > a, "cpu-clock did not advance: {a} -> {b}");
    assert!(b - a < 10_000_000_000, "implausible advance {}", b - a);
}
