//! Wall power from the BMC: `ipmitool dcmi power reading` (DCMI "Get Power Reading").
//!
//! Typical output (ipmitool 1.8.x):
//!
//! ```text
//!     Instantaneous power reading:                   220 Watts
//!     Minimum during sampling period:                 72 Watts
//!     Maximum during sampling period:                348 Watts
//!     Average power reading over sample period:      206 Watts
//!     IPMI timestamp:                           Tue Mar  5 10:20:30 2024
//!     Sampling period:                          00000005 Seconds.
//!     Power reading state is:                   activated
//! ```
//!
//! The instantaneous reading is used as the power of domain `wall`; the sampler integrates it. BMCs
//! typically refresh it about once a second and one ipmitool call takes tens to hundreds of
//! milliseconds, so sample IPMI at 1 s or slower and measure runs of tens of seconds.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use crate::error::PowerError;
use crate::platform::Platform;
use crate::source::{DomainInfo, EnergySource};
use crate::wall::{find_program, run_with_timeout, COMMAND_TIMEOUT};

const NAME: &str = "ipmi";

/// The default ipmitool command (local BMC through `/dev/ipmi0`).
pub const DEFAULT_IPMITOOL: &str = "ipmitool";

/// A parsed DCMI power reading.
#[derive(Debug, Clone, PartialEq)]
pub struct DcmiReading {
    /// Instantaneous power, watts.
    pub instantaneous_w: f64,
    /// Minimum during the sampling period, watts.
    pub minimum_w: Option<f64>,
    /// Maximum during the sampling period, watts.
    pub maximum_w: Option<f64>,
    /// Average over the sampling period, watts.
    pub average_w: Option<f64>,
    /// The BMC's sampling period, seconds.
    pub sampling_period_s: Option<f64>,
    /// `Power reading state is: activated` (`Some(true)`) or `deactivated`.
    pub active: Option<bool>,
}

fn leading_number(text: &str) -> Option<f64> {
    let t = text.trim();
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    t[..end].parse().ok()
}

/// Parse the output of `ipmitool dcmi power reading`.
pub fn parse_dcmi_power_reading(text: &str) -> Result<DcmiReading, String> {
    let mut r = DcmiReading {
        instantaneous_w: f64::NAN,
        minimum_w: None,
        maximum_w: None,
        average_w: None,
        sampling_period_s: None,
        active: None,
    };
    let mut have_inst = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let key = key.trim().to_ascii_lowercase();
        let value = value.trim();
        if key.starts_with("instantaneous power reading") {
            let w = leading_number(value)
                .ok_or_else(|| format!("no number in instantaneous reading '{value}'"))?;
            r.instantaneous_w = w;
            have_inst = true;
        } else if key.starts_with("minimum during sampling period") {
            r.minimum_w = leading_number(value);
        } else if key.starts_with("maximum during sampling period") {
            r.maximum_w = leading_number(value);
        } else if key.starts_with("average power reading") {
            r.average_w = leading_number(value);
        } else if key.starts_with("sampling period") {
            r.sampling_period_s = leading_number(value);
        } else if key.starts_with("power reading state") {
            let v = value.to_ascii_lowercase();
            r.active = Some(v.starts_with("activated"));
        }
    }
    if !have_inst {
        let first = text.lines().map(str::trim).find(|l| !l.is_empty());
        return Err(match first {
            Some(l) => format!("no 'Instantaneous power reading' line (output starts: '{l}')"),
            None => "empty output".to_string(),
        });
    }
    Ok(r)
}

/// The IPMI DCMI wall power reader.
#[derive(Debug)]
pub struct IpmiDcmi {
    argv: Vec<String>,
    domains: Vec<DomainInfo>,
    warnings: Vec<String>,
    last: Option<DcmiReading>,
}

impl IpmiDcmi {
    /// Check that ipmitool and a BMC are there, and take one reading.
    ///
    /// `ipmitool` is the program plus optional interface arguments (for a remote BMC, for example
    /// `ipmitool -I lanplus -H bmc.example -U admin -E`); `dcmi power reading` is appended.
    pub fn open(platform: &Platform, ipmitool: &str) -> Result<Self, PowerError> {
        let mut argv: Vec<String> = ipmitool.split_whitespace().map(str::to_string).collect();
        if argv.is_empty() {
            return Err(PowerError::Config("empty ipmitool command".into()));
        }
        let vm = platform
            .vm_note()
            .map(|_| " This is a virtual machine: VMs have no BMC.")
            .unwrap_or("");
        if find_program(&argv[0]).is_none() {
            return Err(PowerError::not_present(
                NAME,
                format!(
                    "'{}' not found: install ipmitool (`apt install ipmitool`) or pass --ipmitool \
                     PATH.{vm}",
                    argv[0]
                ),
            ));
        }
        let remote = argv.iter().any(|a| a == "-H");
        if !remote {
            let devs: Vec<PathBuf> = ["ipmi0", "ipmi/0", "ipmidev/0"]
                .iter()
                .map(|d| platform.dev(d))
                .collect();
            if !devs.iter().any(|d| d.exists()) {
                return Err(PowerError::not_present(
                    NAME,
                    format!(
                        "no local BMC device ({} absent): load the IPMI drivers (`sudo modprobe \
                         ipmi_si ipmi_devintf`) on a server with a BMC, or read a remote BMC with \
                         --ipmitool 'ipmitool -I lanplus -H HOST -U USER -E'.{vm}",
                        devs[0].display()
                    ),
                ));
            }
        }
        argv.extend(["dcmi", "power", "reading"].map(str::to_string));
        let mut s = IpmiDcmi {
            argv,
            domains: vec![DomainInfo::power("wall", true)],
            warnings: Vec::new(),
            last: None,
        };
        let r = s.query()?;
        if r.active == Some(false) && r.instantaneous_w == 0.0 {
            return Err(PowerError::not_present(
                NAME,
                "the BMC reports power reading state 'deactivated' and 0 W: this BMC does not \
                 measure power",
            ));
        }
        if r.active == Some(false) {
            s.warnings
                .push("BMC power reading state is 'deactivated': readings may be stale".into());
        }
        Ok(s)
    }

    /// Run the command once and parse it.
    pub fn query(&mut self) -> Result<DcmiReading, PowerError> {
        let cmdline = self.argv.join(" ");
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..]);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT).map_err(|e| PowerError::Command {
            source_name: NAME.into(),
            command: cmdline.clone(),
            detail: e.to_string(),
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let said = if stderr.trim().is_empty() {
                stdout.trim()
            } else {
                stderr.trim()
            };
            return Err(PowerError::Command {
                source_name: NAME.into(),
                command: cmdline,
                detail: format!("{}: {said}", out.status),
            });
        }
        let r = parse_dcmi_power_reading(&stdout)
            .map_err(|e| PowerError::parse(NAME, cmdline.clone(), e))?;
        self.last = Some(r.clone());
        Ok(r)
    }

    /// The last reading.
    pub fn last(&self) -> Option<&DcmiReading> {
        self.last.as_ref()
    }
}

impl EnergySource for IpmiDcmi {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> String {
        format!("wall power from `{}` (DCMI)", self.argv.join(" "))
    }

    fn domains(&self) -> &[DomainInfo] {
        &self.domains
    }

    fn read(&mut self, _now: Instant) -> Result<Vec<f64>, PowerError> {
        Ok(vec![self.query()?.instantaneous_w])
    }

    fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
}
