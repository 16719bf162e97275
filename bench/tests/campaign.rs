//! A quick campaign through the real pipeline (guest image, namespaces, our backend in two
//! modes, QEMU guests, iperf3 and ping, the power estimate) into a report, checked for every
//! expected row and column and for sane figures.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{require_cmd, vnb_backend, vnb_bench};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn quick_campaign_produces_a_complete_sane_report() {
    for (cmd, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("iperf3", "iperf3"),
        ("ping", "iputils-ping"),
    ] {
        require_cmd(cmd, pkg);
    }
    let img = Command::new(repo().join("ci/guest/build-image.sh"))
        .output()
        .unwrap();
    assert!(
        img.status.success(),
        "{}",
        String::from_utf8_lossy(&img.stderr)
    );
    let exe = vnb_bench();
    let vnb = vnb_backend();
    let out = std::env::temp_dir().join(format!("vnb-bench-test-{}", std::process::id()));
    let run = Command::new(&exe)
        .args([
            "run",
            "--modes",
            "off,adaptive:1000",
            "--workloads",
            "iperf-rx,http,tbench,rr,rr-load",
            "--reps",
            "1",
            "--duration",
            // tbench's 100 clients need a few seconds to start on a TCG guest: at 2 s it
            // finishes nothing (which the runner reports as an error).
            "5",
            "--power-source",
            "estimate",
            // Our own backend again, as an external template: exercises that path.
            "--external",
            &format!(
                "self={} serve --vm ext --socket {{socket}} --tap {{tap}} --mac {{mac}} --mode off --log warn",
                vnb.display()
            ),
            "--out",
        ])
        .arg(&out)
        .env("VNB_BIN", &vnb)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "vnb-bench failed:\n{stderr}");
    assert!(stderr.contains("[18/18]"), "progress lines: {stderr}");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 18, "3 configurations × (idle + 5 workloads)");
    for r in runs {
        let what = format!("{} / {}", r["config"], r["workload"]);
        assert!(r["error"].is_null(), "{what}: {}", r["error"]);
        assert!(r["qemu_cpu_s"].as_f64().unwrap() > 0.0, "{what}");
        assert!(r["watts"].as_f64().unwrap() > 0.0, "{what}");
        assert_eq!(r["energy_kind"], "estimate");
        let domains = r["domains"].as_array().unwrap();
        assert!(
            domains.iter().any(
                |d| d["name"] == "estimate/cpu-estimate" && d["joules"].as_f64().unwrap() > 0.0
            ),
            "{what}: per-domain energy {domains:?}"
        );
        let packets = r["guest_packets"].as_u64().unwrap();
        let irq = r["guest_irqs_per_s"].as_f64().unwrap() * r["seconds"].as_f64().unwrap();
        if r["workload"] != "idle" {
            assert!(packets > 100, "{what}: {packets} packets");
            // Interrupts are bounded by packets (NAPI never takes more than one per packet
            // here), and some arrive.
            assert!(
                irq > 0.0 && irq <= 1.5 * packets as f64,
                "{what}: {irq} irqs, {packets} packets"
            );
            if r["config"] != "ext:self" {
                assert!(r["kicks_per_s"].as_f64().is_some(), "{what}");
            }
            assert!(r["backend_cpu_s"].as_f64().is_some(), "{what}");
        }
        match r["workload"].as_str().unwrap() {
            "iperf-rx" => assert!(r["throughput_mbps"].as_f64().unwrap() > 10.0, "{what}"),
            // 100 clients x 20 MB: in 5 s few downloads finish; the bytes moved count.
            "http" => assert!(r["throughput_mbps"].as_f64().unwrap() > 1.0, "{what}"),
            "tbench" => assert!(r["throughput_mbps"].as_f64().unwrap() > 0.0, "{what}"),
            "rr-load" => {
                assert!(r["throughput_mbps"].as_f64().unwrap() > 1.0, "{what}");
                let p50 = r["rtt_p50_ms"].as_f64().unwrap();
                let p99 = r["rtt_p99_ms"].as_f64().unwrap();
                assert!(p50 > 0.0 && p99 >= p50, "{what}: {p50} {p99}");
            }
            "rr" => {
                let p50 = r["rtt_p50_ms"].as_f64().unwrap();
                let p99 = r["rtt_p99_ms"].as_f64().unwrap();
                assert!(p50 > 0.0 && p99 >= p50, "{what}: {p50} {p99}");
            }
            _ => {}
        }
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for want in [
        "Rerun with:",
        "## idle",
        "## iperf-rx",
        "## rr",
        "## http",
        "## tbench",
        "## rr-load",
        "requests/s",
        "| off |",
        "| adaptive:1000 |",
        "| ext:self |",
        "throughput Mb/s",
        "RTT p99 ms",
        "guest irq/s",
        "kicks/s",
        "watts",
        "J/GB",
        "ESTIMATE",
    ] {
        assert!(md.contains(want), "report.md lacks {want:?}:\n{md}");
    }
    for chart in [
        "iperf-rx-throughput-Mb-s",
        "iperf-rx-guest-irq-s",
        "iperf-rx-watts",
        "rr-latency-vs-energy",
    ] {
        for ext in ["svg", "png"] {
            let p = out.join(format!("charts/{chart}.{ext}"));
            assert!(
                std::fs::metadata(&p)
                    .map(|m| m.len() > 1000)
                    .unwrap_or(false),
                "{} missing",
                p.display()
            );
        }
    }
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 19);
    assert!(csv.lines().next().unwrap().contains(",domains,"));
    // The rerun command pastes back: the external template is one quoted word.
    assert!(md.contains("--external 'self="), "{md}");
    // Energy charts say the energy is an estimate.
    let svg = std::fs::read_to_string(out.join("charts/iperf-rx-watts.svg")).unwrap();
    assert!(
        svg.contains("ESTIMATE"),
        "the watts chart does not say ESTIMATE"
    );
    // `report` rewrites the same report from results.json.
    std::fs::remove_file(out.join("report.md")).unwrap();
    let rep = Command::new(&exe).arg("report").arg(&out).status().unwrap();
    assert!(rep.success());
    assert_eq!(std::fs::read_to_string(out.join("report.md")).unwrap(), md);
    let _ = std::fs::remove_dir_all(&out);
}
