//! The default policy adapts within a second, end to end: the `mix` workload (guest→host TCP
//! bulk, host→guest TCP bulk, ping-pong, twice) through real guests over our backend, once with
//! the default rule and once with the paper's, the policy sampled every 100 ms. Every direction
//! change asks `p*` to move; with the default rule it must be half way there within 0.5 s of
//! the traffic (median within 0.3 s), and from a second after each phase's traffic flowed, TCP's
//! ramp included, stay close to the traffic's share of the last half second (mean distance
//! 0.04, never more than 0.12). The paper's 5 s rule is run beside it: its figures are printed
//! (the contrast the report shows), and it must track at least three times worse, which shows
//! the measure tells a slow rule from a fast one.
//!
//! The policy is not judged at 90 % of the way to the phase's share: TCP's share in a receive
//! phase slides by a fifth of the step while the receiver leaves quick-ACK mode, so one noisy
//! sample touches the 90 % line long before the share settles there, and a policy that follows
//! the traffic exactly was measured 1.2-1.4 s "behind" in 4 of about 20 runs. That figure is
//! still printed.

mod common;

use std::path::PathBuf;
use std::process::Command;

use bench::adaptation;
use bench::model::{Campaign, RunResult};
use common::{require_cmd, vnb_backend, vnb_bench};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn secs(t: Option<f64>) -> String {
    t.map_or("-".into(), |t| format!("{t:.1} s"))
}

fn share(e: Option<f64>) -> String {
    e.map_or("-".into(), |e| format!("{e:.3}"))
}

/// Mean tracking error over a run's phases (every phase has samples a second after its
/// traffic flowed: phases last 5 s).
fn mean_tracking(r: &RunResult, figures: &str) -> f64 {
    let errors: Vec<f64> = adaptation::fit(r)
        .iter()
        .map(|f| {
            f.tracking_error.unwrap_or_else(|| {
                panic!(
                    "{}: no tracking figure for {}:\n{figures}",
                    r.config, f.name
                )
            })
        })
        .collect();
    errors.iter().sum::<f64>() / errors.len() as f64
}

#[test]
fn the_default_policy_follows_each_direction_change_within_about_a_second() {
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
    let out = std::env::temp_dir().join(format!("vnb-bench-mix-{}", std::process::id()));
    let run = Command::new(vnb_bench())
        .args([
            "run",
            "--modes",
            "adaptive:500,adaptive:500@paper",
            "--workloads",
            "mix",
            "--mix-phase-s",
            "5",
            "--reps",
            "1",
            "--duration",
            "1",
            "--power-source",
            "estimate",
            "--out",
        ])
        .arg(&out)
        .env("VNB_BIN", vnb_backend())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "vnb-bench failed:\n{stderr}");
    let camp: Campaign =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let mut figures = String::new();
    for config in ["adaptive:500", "adaptive:500@paper"] {
        let r = camp
            .runs
            .iter()
            .find(|r| r.config == config && r.workload == "mix")
            .unwrap_or_else(|| panic!("no mix run of {config}"));
        assert!(r.error.is_none(), "{config}: {:?}", r.error);
        assert_eq!(r.phases.len(), 6, "{config}: two cycles of three phases");
        assert!(
            r.series.len() > 200,
            "{config}: {} samples in {} s",
            r.series.len(),
            r.seconds
        );
        for f in adaptation::fit(r) {
            figures.push_str(&format!(
                "{config} {:<9} at {:>5.1} s: share {:.2}, p* from {:.2}, delay {}, tracking error {} (max {}), 90 % rise {}, 90 % lag {}, mean error {:.2}\n",
                f.name,
                f.start_s,
                f.share,
                f.p_start,
                secs(f.delay_s),
                share(f.tracking_error),
                share(f.tracking_error_max),
                secs(f.rise_s),
                secs(f.lag_s),
                f.mean_error
            ));
        }
    }
    print!("{figures}");
    let _ = std::fs::write(repo().join("target/e2e-mix-figures.txt"), &figures);
    let fast = camp
        .runs
        .iter()
        .find(|r| r.config == "adaptive:500" && r.workload == "mix")
        .unwrap();
    // The first phase is the run's start, not a change of direction (p* starts from whatever
    // the guest's boot left, and TCP opens its window): delays are judged on the changes.
    let first = fast.phases[0].t_s;
    let steps: Vec<_> = adaptation::fit(fast)
        .into_iter()
        .filter(|f| f.step && f.start_s > first)
        .collect();
    // TCP bulk each way and ping-pong differ in their send share: the policy must move.
    assert!(
        steps.len() >= 3,
        "too few direction changes to judge:\n{figures}"
    );
    // The policy's delay half way, from the sample where the traffic's share covered half the
    // way (TCP's ramp left out). The rule alone takes 0.15 s; samples come every 100 ms;
    // measured 0.0-0.2 s.
    let mut delays: Vec<f64> = steps
        .iter()
        .map(|f| f.delay_s.unwrap_or(f64::INFINITY))
        .collect();
    for (f, delay) in steps.iter().zip(&delays) {
        assert!(
            *delay <= 0.5,
            "the default policy was {delay} s behind the traffic half way into the {} phase at {:.1} s:\n{figures}",
            f.name,
            f.start_s
        );
    }
    delays.sort_by(f64::total_cmp);
    let median = delays[delays.len() / 2];
    assert!(
        median <= 0.3,
        "the default policy's median delay is {median} s:\n{figures}"
    );
    // Every phase, the first included: a second after the traffic flowed, p* follows it
    // (measured: means up to 0.013, largest distance 0.039).
    for f in adaptation::fit(fast) {
        let (mean, max) = (
            f.tracking_error.unwrap_or(f64::INFINITY),
            f.tracking_error_max.unwrap_or(f64::INFINITY),
        );
        assert!(
            mean <= 0.04 && max <= 0.12,
            "the default policy was {mean} from the traffic's share on average (at most {max}) in the {} phase at {:.1} s:\n{figures}",
            f.name,
            f.start_s
        );
    }
    // The paper's rule measured 0.09-0.20 per phase, the default's 0.000-0.013.
    let paper = camp
        .runs
        .iter()
        .find(|r| r.config == "adaptive:500@paper" && r.workload == "mix")
        .unwrap();
    let (fast_err, paper_err) = (
        mean_tracking(fast, &figures),
        mean_tracking(paper, &figures),
    );
    assert!(
        paper_err > 3.0 * fast_err,
        "the paper's rule tracked the traffic within {paper_err:.3}, the default within {fast_err:.3}: the measure does not tell them apart:\n{figures}"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Adaptation (mix)"), "{md}");
    assert!(out.join("charts/mix-policy.png").exists());
    let _ = std::fs::remove_dir_all(&out);
}
