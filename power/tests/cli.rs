//! The `vnb-power` binary: `list` and `sample` on this machine, replayed trees, wall sources, and
//! argument errors.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn vnb_power(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vnb-power"))
        .args(args)
        .env_remove("VNB_IDLE_WATTS")
        .env_remove("VNB_WATTS_PER_CORE")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "stderr: {}", stderr(o));
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// `list` rows as (source, usable, reason).
fn rows(text: &str) -> Vec<(String, bool, String)> {
    text.lines()
        .map(|l| {
            let mut it = l.splitn(2, ' ');
            let src = it.next().unwrap().to_string();
            let rest = it.next().unwrap().trim_start();
            let (usable, reason) = rest.split_once(' ').unwrap();
            assert!(usable == "yes" || usable == "no", "bad line: {l}");
            (src, usable == "yes", reason.trim().to_string())
        })
        .collect()
}

#[test]
fn list_on_this_machine_says_why_rapl_is_absent() {
    let o = vnb_power(&["list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let r = rows(&text);
    let names: Vec<&str> = r.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(
        names,
        ["powercap", "perf", "msr", "hwmon", "ipmi", "meter", "estimate", "auto"]
    );
    for (_, _, reason) in &r {
        assert!(!reason.is_empty());
    }
    let estimate = &r[6];
    assert!(estimate.1, "the estimate must always be usable: {text}");
    assert!(estimate.2.contains("ESTIMATE"));
    let rapl_here = Path::new("/sys/class/powercap").exists()
        || Path::new("/sys/bus/event_source/devices/power").exists()
        || Path::new("/dev/cpu/0/msr").exists();
    if !rapl_here {
        // This development machine (a VM without RAPL).
        for (name, usable, reason) in &r[0..3] {
            assert!(!usable, "{name} must not be usable here: {reason}");
            assert!(reason.contains("does not exist"), "{name}: {reason}");
        }
        assert!(r[7].2.starts_with("RAPL absent"), "{}", r[7].2);
        assert!(r[7].2.contains("ESTIMATE"));
    }
}

#[test]
fn list_in_a_vm_without_any_source_is_explicit() {
    let empty = TempDir::new("cli-empty");
    let e = empty.path().to_str().unwrap();
    let vm = fixture("proc/vm");
    let o = vnb_power(&[
        "list",
        "--sysfs-root",
        e,
        "--dev-root",
        e,
        "--proc-root",
        vm.to_str().unwrap(),
        "--ipmitool",
        "/nonexistent/ipmitool",
    ]);
    let r = rows(&stdout(&o));
    for (name, usable, reason) in &r[0..3] {
        assert!(!usable);
        assert!(reason.contains("virtual machine"), "{name}: {reason}");
    }
    assert!(r[0].2.contains("modprobe intel_rapl_msr"), "{}", r[0].2);
    assert!(r[2].2.contains("modprobe msr"), "{}", r[2].2);
    assert!(r[4].2.contains("VMs have no BMC"), "{}", r[4].2);
    assert!(r[7].2.contains("RAPL absent") && r[7].2.contains("virtual machine"));
    // JSON form.
    let o = vnb_power(&["list", "--json", "--sysfs-root", e, "--dev-root", e]);
    let v = json(&o);
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 8);
    assert_eq!(arr[0]["source"], "powercap");
    assert_eq!(arr[0]["usable"], false);
    assert_eq!(arr[6]["source"], "estimate");
    assert_eq!(arr[6]["kind"], "estimate");
}

#[test]
fn sample_estimate_works_here() {
    let o = vnb_power(&[
        "sample",
        "--source",
        "estimate",
        "--duration",
        "1",
        "--interval",
        "100",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.starts_with("ESTIMATE"), "{text}");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("cpu-estimate "))
        .unwrap_or_else(|| panic!("no cpu-estimate line: {text}"));
    assert!(line.contains("ESTIMATE"), "{line}");
    let f: Vec<&str> = line.split_whitespace().collect();
    let joules: f64 = f[1].parse().unwrap();
    let watts: f64 = f[2].parse().unwrap();
    let cpus = fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count() as f64;
    assert!(
        (40.0..=40.0 + 5.0 * cpus + 0.5).contains(&watts),
        "mean {watts} W outside the model's range"
    );
    assert!(
        (0.95..=1.2).contains(&(joules / watts)),
        "{joules} J / {watts} W"
    );
    let head = text.lines().nth(1).unwrap();
    // The measured duration: 1 s plus however late this busy machine woke the sampler.
    let secs: f64 = head
        .strip_prefix("sample: ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.trim_end_matches('s').parse().ok())
        .unwrap_or_else(|| panic!("no duration in {head:?}"));
    assert!((1.0..1.5).contains(&secs), "{head}");
}

#[test]
fn sample_estimate_json_with_model_flags_and_env() {
    let t = TempDir::new("cli-est");
    write_atomic(
        &t.join("stat"),
        "cpu  1 0 1 100 0 0 0 0 0 0\ncpu0 1 0 1 100 0 0 0 0 0 0\n",
    );
    let p = t.path().to_str().unwrap();
    let o = vnb_power(&[
        "sample",
        "--source",
        "estimate",
        "--duration",
        "0.3",
        "--interval",
        "50",
        "--json",
        "--proc-root",
        p,
        "--idle-watts",
        "33",
        "--watts-per-core",
        "0",
    ]);
    let v = json(&o);
    assert_eq!(v["kind"], "estimate");
    assert_eq!(v["mode"], "sample");
    assert_eq!(v["interval_ms"], 50);
    let s = &v["sources"][0];
    assert_eq!(s["source"], "estimate");
    assert_eq!(s["kind"], "estimate");
    assert_eq!(s["domains"][0]["domain"], "cpu-estimate");
    assert_eq!(s["domains"][0]["kind"], "estimate");
    let w = s["mean_watts"].as_f64().unwrap();
    assert!((w - 33.0).abs() < 1e-6, "{w}");
    let d = v["duration_s"].as_f64().unwrap();
    assert!((s["total_joules"].as_f64().unwrap() - 33.0 * d).abs() < 1e-6);
    // The model can also come from the environment.
    let o = Command::new(env!("CARGO_BIN_EXE_vnb-power"))
        .args([
            "sample",
            "--source",
            "estimate",
            "--duration",
            "0.1",
            "--json",
            "--proc-root",
            p,
        ])
        .env("VNB_IDLE_WATTS", "21.5")
        .env("VNB_WATTS_PER_CORE", "0")
        .output()
        .unwrap();
    let v = json(&o);
    assert!((v["sources"][0]["mean_watts"].as_f64().unwrap() - 21.5).abs() < 1e-6);
    // baseline mode is labelled as such
    let o = vnb_power(&[
        "baseline",
        "--source",
        "estimate",
        "--duration",
        "0.1",
        "--proc-root",
        p,
    ]);
    assert!(stdout(&o).contains("idle baseline: "), "{}", stdout(&o));
}

#[test]
fn bad_arguments_fail_clearly() {
    let cases: &[(&[&str], &str)] = &[
        (&["sample"], "--duration"),
        (&["sample", "--duration", "0"], "duration must be > 0"),
        (&["sample", "--duration", "abc"], "not a number of seconds"),
        (
            &["sample", "--duration", "1", "--interval", "0"],
            "--interval",
        ),
        (
            &["sample", "--duration", "1", "--source", "rapl"],
            "unknown source 'rapl'",
        ),
        (
            &["sample", "--duration", "1", "--idle-watts", "-3"],
            "watts must be",
        ),
        (&["sample", "--duration", "-2"], "duration must be > 0"),
        (&["frobnicate"], "unrecognized subcommand"),
        (&[], "Usage"),
    ];
    for (args, want) in cases {
        let o = vnb_power(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    let o = vnb_power(&[
        "sample",
        "--duration",
        "0.1",
        "--source",
        "powercap",
        "--sysfs-root",
        "/nonexistent/vnb",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("powercap: not present"),
        "{}",
        stderr(&o)
    );
    let o = vnb_power(&["sample", "--duration", "0.1", "--source", "meter"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--meter-cmd"), "{}", stderr(&o));
    let o = vnb_power(&[
        "sample",
        "--duration",
        "0.1",
        "--source",
        "estimate,estimate",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("given twice"), "{}", stderr(&o));
}

#[test]
fn static_replay_is_reported_as_stuck() {
    let t = fixture_copy("intel-2pkg");
    let o = vnb_power(&[
        "sample",
        "--source",
        "powercap",
        "--duration",
        "0.1",
        "--sysfs-root",
        t.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("did not advance"), "{}", stderr(&o));
}

#[test]
fn replayed_powercap_tree_with_advancing_wrapping_counters() {
    let t = fixture_copy("intel-2pkg");
    let root = t.path().to_path_buf();
    // psys wraps every 1 J; the writer adds 2 mJ every >= 2 ms (at most 1 W).
    write_atomic(
        &root.join("class/powercap/intel-rapl:1/max_energy_range_uj"),
        "999999\n",
    );
    set_energy_uj(&root, "intel-rapl:1", 900_000);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, root) = (Arc::clone(&stop), Arc::clone(&written), root.clone());
        thread::spawn(move || {
            let mut v = 900_000u64;
            let mut pkg = 1_234_567_890u64;
            while !stop.load(Ordering::Relaxed) {
                v = (v + 2_000) % 1_000_000;
                pkg += 1_000;
                set_energy_uj(&root, "intel-rapl:1", v);
                set_energy_uj(&root, "intel-rapl:0", pkg);
                written.fetch_add(2_000, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    thread::sleep(Duration::from_millis(20));
    let before = written.load(Ordering::Relaxed);
    let o = vnb_power(&[
        "sample",
        "--source",
        "powercap",
        "--duration",
        "1.5",
        "--interval",
        "20",
        "--json",
        "--sysfs-root",
        root.to_str().unwrap(),
    ]);
    let after = written.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let v = json(&o);
    assert_eq!(v["kind"], "measurement");
    let s = &v["sources"][0];
    assert_eq!(s["source"], "powercap");
    let doms = s["domains"].as_array().unwrap();
    assert_eq!(doms.len(), 9);
    let psys = doms.iter().find(|d| d["domain"] == "psys").unwrap();
    assert_eq!(psys["in_total"], true);
    let j = psys["joules"].as_f64().unwrap();
    let max_j = (after - before) as f64 * 1e-6;
    assert!(
        j > 0.0 && j <= max_j + 1e-9,
        "psys {j} J, writer wrote {max_j} J"
    );
    assert_eq!(s["total_joules"].as_f64().unwrap(), j, "total is psys only");
    let w = s["mean_watts"].as_f64().unwrap();
    assert!(
        w > 0.01 && w <= 1.02,
        "psys mean {w} W: a lost or doubled wrap would show here"
    );
    let p0 = doms.iter().find(|d| d["domain"] == "package-0").unwrap();
    assert!(
        (p0["joules"].as_f64().unwrap() - j / 2.0).abs() < 0.01,
        "{p0}"
    );
    for d in doms {
        assert!(d["joules"].as_f64().unwrap() >= 0.0, "{d}");
    }
}

#[test]
fn ipmi_and_meter_through_the_binary() {
    let t = TempDir::new("cli-ipmi");
    let script = t.join("ipmitool");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\ncat '{}'\n",
            fixture("ipmitool/dcmi-activated.txt").display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let dev = t.join("dev");
    fs::create_dir_all(&dev).unwrap();
    fs::write(dev.join("ipmi0"), "").unwrap();
    let o = vnb_power(&[
        "sample",
        "--source",
        "ipmi",
        "--duration",
        "0.4",
        "--interval",
        "100",
        "--json",
        "--ipmitool",
        script.to_str().unwrap(),
        "--dev-root",
        dev.to_str().unwrap(),
    ]);
    let v = json(&o);
    let s = &v["sources"][0];
    assert_eq!(
        (s["source"].as_str(), s["kind"].as_str()),
        (Some("ipmi"), Some("measurement"))
    );
    assert_eq!(s["domains"][0]["domain"], "wall");
    assert!(
        (s["mean_watts"].as_f64().unwrap() - 220.0).abs() < 1e-9,
        "{s}"
    );

    // auto without RAPL: the ESTIMATE first, then the meter.
    let empty = TempDir::new("cli-auto");
    let e = empty.path().to_str().unwrap();
    let o = vnb_power(&[
        "sample",
        "--source",
        "auto",
        "--duration",
        "0.3",
        "--interval",
        "50",
        "--json",
        "--meter-cmd",
        "echo 57.5 W",
        "--sysfs-root",
        e,
        "--dev-root",
        e,
    ]);
    let v = json(&o);
    assert_eq!(v["kind"], "estimate");
    assert_eq!(v["sources"][0]["source"], "estimate");
    assert_eq!(v["sources"][1]["source"], "meter");
    assert_eq!(v["sources"][1]["kind"], "measurement");
    assert!((v["sources"][1]["mean_watts"].as_f64().unwrap() - 57.5).abs() < 1e-9);
}
