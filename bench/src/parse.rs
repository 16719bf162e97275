//! Parsers of the workload tools' output.

use crate::error::{BenchError, Result};

fn bad(tool: &'static str, msg: impl Into<String>) -> BenchError {
    BenchError::Output {
        tool,
        msg: msg.into(),
    }
}

/// Received throughput in Mb/s from an iperf3 `-J` report (TCP: `sum_received`; UDP: `sum`
/// minus the lost share). Errors carry iperf3's own error text when it has one.
pub fn iperf3_mbps(json: &str) -> Result<f64> {
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| bad("iperf3", format!("output is not JSON: {e}")))?;
    if let Some(e) = v["error"].as_str() {
        return Err(bad("iperf3", e));
    }
    let end = &v["end"];
    if let Some(b) = end["sum_received"]["bits_per_second"].as_f64() {
        return Ok(b / 1e6);
    }
    let s = &end["sum"];
    match s["bits_per_second"].as_f64() {
        Some(b) => Ok(b * (1.0 - s["lost_percent"].as_f64().unwrap_or(0.0) / 100.0) / 1e6),
        None => Err(bad("iperf3", "report has no end.sum_received or end.sum")),
    }
}

/// What `ab` reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AbResult {
    /// Completed requests.
    pub complete: u64,
    /// Failed requests.
    pub failed: u64,
    /// Requests per second (mean).
    pub rps: f64,
    /// Transfer rate in Mb/s.
    pub mbps: f64,
}

fn after<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .map(str::trim)
}

fn first_number(s: &str) -> Option<f64> {
    s.split_whitespace().next()?.parse().ok()
}

/// Parses ApacheBench's report.
pub fn ab(text: &str) -> Result<AbResult> {
    let num = |label: &str| {
        after(text, label)
            .and_then(first_number)
            .ok_or_else(|| bad("ab", format!("output lacks {label:?}")))
    };
    let complete = num("Complete requests:")? as u64;
    let failed = num("Failed requests:")? as u64;
    if complete > 0 {
        return Ok(AbResult {
            complete,
            failed,
            rps: num("Requests per second:")?,
            // KB/s (1024 bytes) to Mb/s.
            mbps: num("Transfer rate:")? * 1024.0 * 8.0 / 1e6,
        });
    }
    // No request finished within -t (100 clients x 20 MB take longer than a short run): ab
    // prints no rates then, but its byte count includes the partial downloads.
    let secs = num("Time taken for tests:")?;
    let bytes = num("Total transferred:")?;
    if secs <= 0.0 || bytes <= 0.0 {
        return Err(bad("ab", "moved no data"));
    }
    Ok(AbResult {
        complete,
        failed,
        rps: 0.0,
        mbps: bytes * 8.0 / secs / 1e6,
    })
}

/// Round-trip times in ms from `ping` output (`time=0.123 ms` per reply).
pub fn ping_rtts_ms(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| {
            let t = l.split("time=").nth(1)?;
            t.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// tbench's final throughput in MB/s.
pub fn tbench_mbs(text: &str) -> Result<f64> {
    text.lines()
        .rev()
        .find_map(|l| {
            let t = l.trim_start().strip_prefix("Throughput ")?;
            first_number(t)
        })
        .ok_or_else(|| bad("tbench", "output has no 'Throughput N MB/sec' line"))
}

/// The (busy, total) CPU ticks of the aggregate `cpu` line of `/proc/stat` in `text`; busy is
/// everything but idle and iowait.
pub fn proc_stat_busy(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// Sum of the interrupts of the lines of `/proc/interrupts` whose name contains `dev`.
pub fn interrupts(text: &str, dev: &str) -> u64 {
    text.lines()
        .filter(|l| l.contains(dev))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .take_while(|t| t.chars().all(|c| c.is_ascii_digit()))
                .filter_map(|t| t.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_cpu_from_proc_stat() {
        let t = "  1: 5 x\ncpu  100 5 50 800 20 3 2 0 0 0\ncpu0 100 5 50 800 20 3 2 0 0 0\n";
        assert_eq!(proc_stat_busy(t), Some((160, 980)));
        assert_eq!(proc_stat_busy("nothing"), None);
    }

    #[test]
    fn iperf3_tcp_udp_and_errors() {
        let tcp = r#"{"end":{"sum_sent":{"bits_per_second":2e9},"sum_received":{"bits_per_second":1.5e9}}}"#;
        assert_eq!(iperf3_mbps(tcp).unwrap(), 1500.0);
        let udp = r#"{"end":{"sum":{"bits_per_second":1e8,"lost_percent":10.0}}}"#;
        assert!((iperf3_mbps(udp).unwrap() - 90.0).abs() < 1e-9);
        let err = r#"{"start":{},"error":"unable to connect to server: Connection refused"}"#;
        assert!(iperf3_mbps(err)
            .unwrap_err()
            .to_string()
            .contains("Connection refused"));
        assert!(iperf3_mbps("garbage").is_err());
        assert!(iperf3_mbps("{}").is_err());
    }

    #[test]
    fn ab_report() {
        let t = "Concurrency Level:      100\nTime taken for tests:   5.001 seconds\nComplete requests:      40\nFailed requests:        0\nTotal transferred:      838872640 bytes\nRequests per second:    8.00 [#/sec] (mean)\nTransfer rate:          163806.44 [Kbytes/sec] received\n";
        let r = ab(t).unwrap();
        assert_eq!((r.complete, r.failed), (40, 0));
        assert_eq!(r.rps, 8.0);
        assert!((r.mbps - 1341.9).abs() < 0.1, "{}", r.mbps);
        // Nothing complete within -t: rates from the partial bytes.
        let t = "Time taken for tests:   5.000 seconds\nComplete requests:      0\nFailed requests:        0\nTotal transferred:      250000000 bytes\n";
        let r = ab(t).unwrap();
        assert_eq!((r.complete, r.rps), (0, 0.0));
        assert!((r.mbps - 400.0).abs() < 1e-9, "{}", r.mbps);
        assert!(ab("Time taken for tests: 5 seconds\nComplete requests: 0\nFailed requests: 0\nTotal transferred: 0 bytes\n")
            .unwrap_err()
            .to_string()
            .contains("no data"));
        assert!(ab("Complete requests: 3\n")
            .unwrap_err()
            .to_string()
            .contains("Failed requests"));
    }

    #[test]
    fn ping_and_tbench_and_interrupts() {
        let p = "64 bytes from 10.0.0.2: icmp_seq=1 ttl=64 time=0.412 ms\n64 bytes from 10.0.0.2: icmp_seq=2 ttl=64 time=1.5 ms\n--- stats ---\nrtt min/avg/max/mdev = 0.412/0.956/1.500/0.544 ms\n";
        assert_eq!(ping_rtts_ms(p), vec![0.412, 1.5]);
        let t = "  100    1234   55.12 MB/sec  warmup   1 sec\nThroughput 61.2345 MB/sec  100 clients  100 procs  max_latency=101.2 ms\n";
        assert_eq!(tbench_mbs(t).unwrap(), 61.2345);
        assert!(tbench_mbs("nothing").is_err());
        let irq = "           CPU0       CPU1\n 24:        100        20   PCI-MSIX-0000:00:03.0   1-edge      virtio1-input.0\n 25:          5          0   PCI-MSIX-0000:00:03.0   2-edge      virtio1-output.0\n 26:          9          9   PCI-MSIX   0-edge      virtio0-config\n";
        assert_eq!(interrupts(irq, "virtio1-"), 125);
    }
}
