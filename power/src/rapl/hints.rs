//! Actionable explanations for the usual ways RAPL is unavailable.

use std::path::Path;

use crate::platform::Platform;

/// Why `energy_uj` could not be read, and what would help.
///
/// Since Linux 5.10 (and the stable backports of November 2020) `energy_uj` is mode 0400 root:
/// the PLATYPUS attack (CVE-2020-8694) recovered secrets from fine-grained RAPL readings.
pub fn powercap_permission_hint(path: &Path) -> String {
    format!(
        "energy_uj is readable by root only since the 2020 PLATYPUS fix (CVE-2020-8694, Linux 5.10 \
         and stable kernels). Either run as root; or give the binary CAP_DAC_READ_SEARCH \
         (`sudo setcap cap_dac_read_search+ep $(command -v vnb-power)`); or make the counters \
         readable by a group: `sudo groupadd -f power; sudo chgrp power {dir}/energy_uj; \
         sudo chmod g+r {dir}/energy_uj` for every zone and add the user to group 'power' \
         (`sudo chmod o+r` opens it to everyone and re-opens the PLATYPUS side channel). sysfs \
         modes reset at boot: persist them with a udev rule or systemd-tmpfiles",
        dir = path
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "/sys/class/powercap/intel-rapl:*".into())
    )
}

/// Why a system-wide perf event could not be opened, and what would help.
pub fn perf_permission_hint(paranoid: Option<i64>) -> String {
    let level = paranoid
        .map(|p| format!("kernel.perf_event_paranoid is {p}; "))
        .unwrap_or_default();
    format!(
        "{level}the RAPL 'power' PMU only counts system-wide (per CPU, all processes), which needs \
         CAP_PERFMON (Linux 5.8+) or CAP_SYS_ADMIN, or kernel.perf_event_paranoid <= 0. Either run as \
         root; or `sudo setcap cap_perfmon+ep $(command -v vnb-power)`; or \
         `sudo sysctl kernel.perf_event_paranoid=0` (affects every user)"
    )
}

/// Why `/dev/cpu/N/msr` could not be opened or read, and what would help.
pub fn msr_permission_hint(path: &Path) -> String {
    format!(
        "{} is mode 0600 root and the msr driver also demands CAP_SYS_RAWIO. Either run as root; or \
         `sudo setcap cap_sys_rawio,cap_dac_override+ep $(command -v vnb-power)` (or chgrp/chmod g+r \
         the device nodes for a group, which still needs CAP_SYS_RAWIO); the powercap source needs \
         fewer privileges",
        path.display()
    )
}

/// What is missing, the driver hint, and (in a VM) why the hint will not help.
pub fn absent(platform: &Platform, missing: &str, driver_hint: &str) -> String {
    match platform.vm_note() {
        Some(vm) => format!("{missing}; {driver_hint}; but {vm}"),
        None => format!("{missing}; {driver_hint}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_hints_name_the_fixes() {
        let h = powercap_permission_hint(Path::new("/sys/class/powercap/intel-rapl:0/energy_uj"));
        assert!(h.contains("PLATYPUS"));
        assert!(h.contains("CAP_DAC_READ_SEARCH"));
        assert!(h.contains("chgrp power /sys/class/powercap/intel-rapl:0/energy_uj"));
        assert!(perf_permission_hint(Some(2)).contains("CAP_PERFMON"));
        assert!(perf_permission_hint(Some(2)).contains("paranoid is 2"));
        assert!(msr_permission_hint(Path::new("/dev/cpu/0/msr")).contains("CAP_SYS_RAWIO"));
    }
}
