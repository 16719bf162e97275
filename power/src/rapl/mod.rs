//! RAPL (Running Average Power Limit) energy counters, three ways.
//!
//! * [`powercap`]: `/sys/class/powercap/intel-rapl*` zones, found by their `name` (never by index).
//! * [`perf`]: the perf_event `power` PMU, one system-wide counter per package.
//! * [`msr`]: the energy status registers via `/dev/cpu/N/msr`, Intel and AMD layouts.
//!
//! RAPL covers the CPU package(s), and on some parts DRAM and the platform (`psys`); it does not see
//! disks, NICs, fans or the power supply's losses: use a [wall source](crate::wall) for those.
//!
//! Totals never double count: `core` (PP0) and `uncore` (PP1, the integrated GPU on clients) are parts
//! of `package`, so a source's total is `psys` when the platform domain exists, otherwise the sum of
//! every `package-N` and `dram-N`.

pub mod hints;
pub mod msr;
pub mod perf;
pub mod powercap;

/// The kind of a RAPL domain, independent of how it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RaplDomain {
    /// A whole CPU package (socket).
    Package,
    /// PP0: the cores of a package.
    Core,
    /// PP1: the uncore / integrated graphics of a package.
    Uncore,
    /// DRAM attached to a package.
    Dram,
    /// The platform (`psys`), covering the SoC and more.
    Psys,
}

impl RaplDomain {
    /// Domain name for package `pkg` as used in reports: `package-0`, `core-0`, `uncore-0`,
    /// `dram-0`, `psys`.
    pub fn name(self, pkg: u32) -> String {
        match self {
            RaplDomain::Package => format!("package-{pkg}"),
            RaplDomain::Core => format!("core-{pkg}"),
            RaplDomain::Uncore => format!("uncore-{pkg}"),
            RaplDomain::Dram => format!("dram-{pkg}"),
            RaplDomain::Psys => {
                if pkg == 0 {
                    "psys".to_string()
                } else {
                    format!("psys-{pkg}")
                }
            }
        }
    }
}

/// Which domains go into the total: `psys` if any, else packages and DRAM. One flag per input.
pub fn in_total_flags(domains: &[RaplDomain]) -> Vec<bool> {
    let has_psys = domains.contains(&RaplDomain::Psys);
    domains
        .iter()
        .map(|d| {
            if has_psys {
                *d == RaplDomain::Psys
            } else {
                matches!(d, RaplDomain::Package | RaplDomain::Dram)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_do_not_double_count() {
        use RaplDomain::*;
        assert_eq!(
            in_total_flags(&[Package, Core, Uncore, Dram]),
            vec![true, false, false, true]
        );
        assert_eq!(
            in_total_flags(&[Package, Core, Psys, Dram]),
            vec![false, false, true, false]
        );
    }
}
