//! hwmon power and energy sensors (`/sys/class/hwmon/hwmonN`).
//!
//! Read: `powerN_input` (µW; `powerN_average` when a chip has no `_input`, as `acpi_power_meter` does)
//! and `energyN_input` (µJ, cumulative). A channel that has both is read as energy. Each sensor is a
//! domain named `<chip>-<label>` (label from `<sensor>_label`, else the file stem).
//!
//! Totals: the sum of every sensor except CPU-internal ones (`amd_energy`, `zenpower`, `fam15h_power`:
//! they are inside what a wall sensor sees) and output-side PSU channels (labels `pout*` or containing
//! `output`, which are inside the PSU's input power). Every sensor is still listed on its own.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::Instant;

use crate::counter::WrapCounter;
use crate::error::PowerError;
use crate::platform::Platform;
use crate::source::{DomainInfo, EnergySource, Quantity};

const NAME: &str = "hwmon";

/// Chips that measure the CPU, not the wall: listed, never added to the total.
pub const CPU_INTERNAL_CHIPS: [&str; 3] = ["amd_energy", "zenpower", "fam15h_power"];

#[derive(Debug)]
struct Sensor {
    path: PathBuf,
    acc: Option<WrapCounter>,
}

/// The hwmon reader.
#[derive(Debug)]
pub struct Hwmon {
    platform: Platform,
    sensors: Vec<Sensor>,
    domains: Vec<DomainInfo>,
}

fn sanitize(s: &str) -> String {
    s.trim()
        .chars()
        .map(|c| {
            if c.is_whitespace() || c == '/' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Split `power1_input` into (`power`, 1, `input`).
fn parse_sensor_file(name: &str) -> Option<(&'static str, u32, &'static str)> {
    let (kind, rest) = if let Some(r) = name.strip_prefix("power") {
        ("power", r)
    } else if let Some(r) = name.strip_prefix("energy") {
        ("energy", r)
    } else {
        return None;
    };
    let (idx, suffix) = rest.split_once('_')?;
    let idx: u32 = idx.parse().ok()?;
    let suffix = match suffix {
        "input" => "input",
        "average" => "average",
        _ => return None,
    };
    Some((kind, idx, suffix))
}

impl Hwmon {
    /// Find every power/energy sensor under `<sys_root>/class/hwmon`.
    pub fn open(platform: &Platform) -> Result<Self, PowerError> {
        let base = platform.sys("class/hwmon");
        let mut chips: Vec<PathBuf> = match fs::read_dir(&base) {
            Ok(e) => e.flatten().map(|e| e.path()).collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(PowerError::not_present(
                    NAME,
                    format!(
                        "{} does not exist (no hwmon drivers loaded; power sensors come from \
                         acpi_power_meter, PMBus power supplies or BMC drivers, which virtual \
                         machines do not have)",
                        base.display()
                    ),
                ))
            }
            Err(e) => return Err(PowerError::io(NAME, base, e)),
        };
        chips.sort();
        let mut sensors = Vec::new();
        let mut domains: Vec<DomainInfo> = Vec::new();
        for chip_dir in chips {
            let chip = platform
                .read_trimmed(&chip_dir.join("name"))
                .unwrap_or_else(|_| {
                    chip_dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                });
            let Ok(entries) = fs::read_dir(&chip_dir) else {
                continue;
            };
            // (kind, idx) -> suffix chosen
            let mut channels: BTreeMap<(u32, &'static str), &'static str> = BTreeMap::new();
            for e in entries.flatten() {
                let fname = e.file_name();
                let Some((kind, idx, suffix)) = fname.to_str().and_then(parse_sensor_file) else {
                    continue;
                };
                if kind == "energy" && suffix != "input" {
                    continue;
                }
                let slot = channels.entry((idx, kind)).or_insert(suffix);
                if suffix == "input" {
                    *slot = "input";
                }
            }
            let energy_idx: Vec<u32> = channels
                .keys()
                .filter(|(_, k)| *k == "energy")
                .map(|(i, _)| *i)
                .collect();
            let cpu_internal = CPU_INTERNAL_CHIPS.contains(&chip.as_str());
            for ((idx, kind), suffix) in channels {
                if kind == "power" && energy_idx.contains(&idx) {
                    continue;
                }
                let stem = format!("{kind}{idx}");
                let label = platform
                    .read_trimmed(&chip_dir.join(format!("{stem}_label")))
                    .unwrap_or_else(|_| stem.clone());
                let lower = label.to_ascii_lowercase();
                let in_total =
                    !cpu_internal && !lower.starts_with("pout") && !lower.contains("output");
                let mut name = format!("{}-{}", sanitize(&chip), sanitize(&label));
                if domains.iter().any(|d| d.name == name) {
                    name = format!(
                        "{name}@{}",
                        chip_dir.file_name().unwrap_or_default().to_string_lossy()
                    );
                }
                let path = chip_dir.join(format!("{stem}_{suffix}"));
                let (info, acc) = if kind == "energy" {
                    (
                        DomainInfo::energy(name, in_total),
                        Some(WrapCounter::bits64()),
                    )
                } else {
                    (DomainInfo::power(name, in_total), None)
                };
                domains.push(info);
                sensors.push(Sensor { path, acc });
            }
        }
        // ACPI's power_meter reads the whole system at the wall; PSU input sensors (PMBus `pin`)
        // read the same power from the other side. With both, the total is the meter's alone
        // (the PSU sensors stay visible as their own domains).
        if domains
            .iter()
            .any(|d| d.in_total && d.name.starts_with("power_meter-"))
        {
            for d in &mut domains {
                if !d.name.starts_with("power_meter-") {
                    d.in_total = false;
                }
            }
        }
        if sensors.is_empty() {
            return Err(PowerError::not_present(
                NAME,
                format!(
                    "no hwmon sensor with power*_input, power*_average or energy*_input under {} \
                     (virtual machines have none)",
                    base.display()
                ),
            ));
        }
        let mut h = Hwmon {
            platform: platform.clone(),
            sensors,
            domains,
        };
        h.read(Instant::now())?;
        Ok(h)
    }
}

impl EnergySource for Hwmon {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> String {
        let names: Vec<String> = self
            .domains
            .iter()
            .map(|d| {
                format!(
                    "{}{}",
                    d.name,
                    if d.quantity == Quantity::Power {
                        " (W)"
                    } else {
                        " (J)"
                    }
                )
            })
            .collect();
        format!(
            "hwmon sensors under {}: {}",
            self.platform.sys("class/hwmon").display(),
            names.join(", ")
        )
    }

    fn domains(&self) -> &[DomainInfo] {
        &self.domains
    }

    fn read(&mut self, _now: Instant) -> Result<Vec<f64>, PowerError> {
        let mut out = Vec::with_capacity(self.sensors.len());
        for s in &mut self.sensors {
            let text = self.platform.read_trimmed(&s.path).map_err(|e| {
                if e.kind() == io::ErrorKind::PermissionDenied {
                    PowerError::PermissionDenied {
                        source_name: NAME.into(),
                        path: s.path.clone(),
                        hint: "run as root, or make the sensor readable (chgrp/chmod g+r via a \
                               udev rule)"
                            .into(),
                    }
                } else {
                    PowerError::io(NAME, &s.path, e)
                }
            })?;
            let v: u64 = text.parse().map_err(|e| {
                PowerError::parse(NAME, s.path.display().to_string(), format!("{e}: '{text}'"))
            })?;
            match &mut s.acc {
                Some(acc) => {
                    acc.update(v);
                    out.push(acc.total() as f64 * 1e-6);
                }
                None => out.push(v as f64 * 1e-6),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensor_file_names() {
        assert_eq!(
            parse_sensor_file("power1_input"),
            Some(("power", 1, "input"))
        );
        assert_eq!(
            parse_sensor_file("energy12_input"),
            Some(("energy", 12, "input"))
        );
        assert_eq!(
            parse_sensor_file("power2_average"),
            Some(("power", 2, "average"))
        );
        assert_eq!(parse_sensor_file("power1_label"), None);
        assert_eq!(parse_sensor_file("temp1_input"), None);
    }
}
