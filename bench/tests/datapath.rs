//! `vnb-bench datapath` through real parts: DPDK testpmd as the frontend, our backend in two
//! modes and again as an external template, real taps in namespaces; the report must hold
//! every configuration with figures that add up. Bad arguments are refused before anything
//! starts.

mod common;

use std::process::Command;

use common::{require_cmd, vnb_backend, vnb_bench};

#[test]
fn datapath_campaign_measures_every_configuration() {
    require_cmd("dpdk-testpmd", "the Debian package dpdk");
    let exe = vnb_bench();
    let vnb = vnb_backend();
    let out = std::env::temp_dir().join(format!("vnb-bench-dp-test-{}", std::process::id()));
    let run = Command::new(&exe)
        .args([
            "datapath",
            "--modes",
            "off,adaptive:1000",
            "--external",
            &format!(
                "self={} serve --vm ext --socket {{socket}} --tap {{tap}} --mac {{mac}} --mode off --log warn",
                vnb.display()
            ),
            "--floor",
            "batch,multishot",
            "--reps",
            "1",
            "--duration",
            "2",
            "--warmup",
            "2",
            "--out",
        ])
        .arg(&out)
        .env("VNB_BIN", &vnb)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "vnb-bench datapath failed:\n{stderr}");
    assert!(stderr.contains("[8/8]"), "progress lines: {stderr}");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(
        json["configs"],
        serde_json::json!([
            "off",
            "adaptive:1000",
            "ext:self",
            "floor:batch",
            "floor:multishot"
        ])
    );
    assert_eq!(json["directions"], serde_json::json!(["tx", "rx"]));
    assert_eq!(json["rx_load"], "full", "the default RX load");
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(
        runs.len(),
        8,
        "3 configurations × 2 directions, 2 bare tap readers on rx"
    );
    for floor in ["floor:batch", "floor:multishot"] {
        assert!(
            runs.iter()
                .any(|r| r["config"] == floor && r["direction"] == "rx"),
            "no rx run of {floor}"
        );
    }
    for r in runs {
        let what = format!("{} {}", r["direction"], r["config"]);
        assert!(r["error"].is_null(), "{what}: {}", r["error"]);
        let n = |k: &str| r[k].as_u64().unwrap();
        let (offered, total, window, delivered) =
            (n("offered"), n("moved_total"), n("moved"), n("delivered"));
        // Even a debug backend moves well over 10 k frames per second on TX. On RX at full
        // load it shares a CPU with a flood at a higher priority and gets about a tenth of it.
        let least = if r["direction"] == "rx" {
            2_000
        } else {
            20_000
        };
        assert!(window > least, "{what}: {window} frames in the window");
        // The tap's counters include the few frames the kernel sends on link-up.
        assert!(
            window <= total && total <= offered + 100,
            "{what}: window {window}, whole run {total}, offered {offered}"
        );
        // Nothing the backend took is lost on the way to the far end (a bare reader's far end
        // is its own count).
        assert!(
            delivered * 10 >= total * 9 && delivered <= total + 100,
            "{what}: moved {total}, delivered {delivered}"
        );
        let (secs, cpu) = (
            r["seconds"].as_f64().unwrap(),
            r["backend_cpu_s"].as_f64().unwrap(),
        );
        assert!(
            secs >= 1.9 && cpu > 0.0 && cpu <= secs * 1.2,
            "{what}: {secs} s, {cpu} CPU-s"
        );
        // At full load the frames never run out: the backend seldom sleeps.
        let waits = n("backend_waits");
        if r["direction"] == "rx" {
            assert!(
                waits * 10 < window,
                "{what}: the backend slept {waits} times for {window} frames at full load"
            );
        }
        let pps = r["pps"].as_f64().unwrap();
        assert!((pps - window as f64 / secs).abs() < 1.0, "{what}: {pps}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for want in [
        "## tx: ",
        "## rx: ",
        "| off | 1 |",
        "| adaptive:1000 | 1 |",
        "| ext:self | 1 |",
        "| floor:batch | 1 |",
        "| floor:multishot | 1 |",
        "`floor:HOW` rows are no backend",
        "1.000 (1.000–1.000)",
        "RX load: `full`",
        "Rerun:",
    ] {
        assert!(md.contains(want), "report.md lacks {want:?}:\n{md}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn datapath_refuses_bad_arguments_before_starting() {
    for (args, want) in [
        (&["--modes", "qemu-tap"][..], "not a vhost-user backend"),
        (&["--modes", "fast"][..], "unknown configuration"),
        (&["--external", "x=no-socket-placeholder"][..], "{socket}"),
        (&["--reps", "0"][..], "at least 1"),
        (&["--directions", "up"][..], "unknown direction"),
        (&["--frame-len", "9000"][..], "60 to 1514"),
        (&["--rx-load", "medium"][..], "unknown RX load"),
        (&["--floor", "uring"][..], "unknown floor reader"),
        (
            &["--floor", "batch", "--directions", "tx"][..],
            "add rx to --directions",
        ),
    ] {
        let out = Command::new(vnb_bench())
            .arg("datapath")
            .args(args)
            .args(["--out", "/nonexistent/never-written"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(!std::path::Path::new("/nonexistent/never-written").exists());
}
