//! An external meter: any shell command that prints the current wall power in watts.
//!
//! The command runs with `sh -c` at every read; its standard output must contain a number, optionally
//! followed by `W` (`123.4`, `123.4 W`, `power: 123.4W`). The last number on the output is used.
//! Typical commands query a smart plug or a lab power meter's CLI.

use std::process::Command;
use std::time::Instant;

use crate::error::PowerError;
use crate::source::{DomainInfo, EnergySource};
use crate::wall::{run_with_timeout, COMMAND_TIMEOUT};

const NAME: &str = "meter";

/// Take the last number (optionally suffixed `W`/`w`/`watts`) on a meter command's output.
pub fn parse_watts(text: &str) -> Result<f64, String> {
    let mut last = None;
    for token in text.split(|c: char| c.is_whitespace() || c == ',' || c == ':' || c == '=') {
        let t = token.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        if t.is_empty() {
            continue;
        }
        if let Ok(v) = t.parse::<f64>() {
            last = Some(v);
        }
    }
    let v = last.ok_or_else(|| {
        format!(
            "no number in the meter output '{}'",
            text.trim().chars().take(80).collect::<String>()
        )
    })?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("meter printed {v}, not a power in watts"));
    }
    Ok(v)
}

/// The external meter command.
#[derive(Debug)]
pub struct ExternalMeter {
    command: String,
    domains: Vec<DomainInfo>,
}

impl ExternalMeter {
    /// Use `command` (run with `sh -c`), checking that it prints watts now.
    pub fn open(command: &str) -> Result<Self, PowerError> {
        if command.trim().is_empty() {
            return Err(PowerError::Config("empty meter command".into()));
        }
        let mut m = ExternalMeter {
            command: command.to_string(),
            domains: vec![DomainInfo::power("wall", true)],
        };
        m.watts()?;
        Ok(m)
    }

    /// Run the command once.
    pub fn watts(&mut self) -> Result<f64, PowerError> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(&self.command);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT).map_err(|e| PowerError::Command {
            source_name: NAME.into(),
            command: self.command.clone(),
            detail: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(PowerError::Command {
                source_name: NAME.into(),
                command: self.command.clone(),
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        parse_watts(&String::from_utf8_lossy(&out.stdout))
            .map_err(|e| PowerError::parse(NAME, self.command.clone(), e))
    }
}

impl EnergySource for ExternalMeter {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> String {
        format!("wall power in watts printed by `{}`", self.command)
    }

    fn domains(&self) -> &[DomainInfo] {
        &self.domains
    }

    fn read(&mut self, _now: Instant) -> Result<Vec<f64>, PowerError> {
        Ok(vec![self.watts()?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watts_formats() {
        assert_eq!(parse_watts("123.4\n").unwrap(), 123.4);
        assert_eq!(parse_watts("123.4 W").unwrap(), 123.4);
        assert_eq!(parse_watts("power: 57W").unwrap(), 57.0);
        assert_eq!(
            parse_watts("voltage=230V current=0.5A power=115W").unwrap(),
            115.0
        );
        assert!(parse_watts("n/a").is_err());
        assert!(parse_watts("").is_err());
        assert!(parse_watts("-5").is_err());
    }
}
