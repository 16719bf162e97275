//! The batching-mode grammar (docs/design.md §4): `off`, `fixed[:US]`, `adaptive[:US]`, where US
//! is the buffer budget in microseconds. The backend's `--mode`, the control socket's `set` and
//! the bench's configurations all parse it here.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// Largest budget accepted (100 ms): beyond that TCP's own timers start to misfire.
pub const MAX_BUDGET_US: u32 = 100_000;

/// How a VM's notifications are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeKind {
    /// Notify at once: the unmodified baseline.
    Off,
    /// Both directions delayed by the budget.
    Fixed,
    /// Delays split by the EWMA of the send share.
    Adaptive,
}

impl ModeKind {
    /// The name in the grammar.
    pub fn name(self) -> &'static str {
        match self {
            ModeKind::Off => "off",
            ModeKind::Fixed => "fixed",
            ModeKind::Adaptive => "adaptive",
        }
    }
}

/// A mode as written: `off`, `fixed[:US]`, `adaptive[:US]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModeSpec {
    /// The kind.
    pub kind: ModeKind,
    /// The budget given with the mode (`:US`), if any.
    pub budget_us: Option<u32>,
}

/// A mode string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ModeError {
    /// Not `off`, `fixed[:US]` or `adaptive[:US]`.
    #[error("unknown mode {0:?}: use off, fixed:US or adaptive:US (US = microseconds)")]
    Unknown(String),
    /// The microseconds after the colon are not a number in range.
    #[error("bad budget in mode {0:?}: give microseconds between 1 and {MAX_BUDGET_US}")]
    Budget(String),
}

impl FromStr for ModeSpec {
    type Err = ModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, us) = match s.split_once(':') {
            Some((n, u)) => (n, Some(u)),
            None => (s, None),
        };
        let kind = match name {
            "off" => ModeKind::Off,
            "fixed" => ModeKind::Fixed,
            "adaptive" => ModeKind::Adaptive,
            _ => return Err(ModeError::Unknown(s.into())),
        };
        let budget_us = match us {
            None => None,
            Some(_) if kind == ModeKind::Off => return Err(ModeError::Unknown(s.into())),
            Some(u) => match u.parse::<u32>() {
                Ok(v) if (1..=MAX_BUDGET_US).contains(&v) => Some(v),
                _ => return Err(ModeError::Budget(s.into())),
            },
        };
        Ok(ModeSpec { kind, budget_us })
    }
}

impl fmt::Display for ModeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.budget_us {
            Some(us) => write!(f, "{}:{us}", self.kind.name()),
            None => f.write_str(self.kind.name()),
        }
    }
}

impl Serialize for ModeSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ModeSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        let m: ModeSpec = "adaptive:1000".parse().unwrap();
        assert_eq!(m.kind, ModeKind::Adaptive);
        assert_eq!(m.budget_us, Some(1000));
        assert_eq!(m.to_string(), "adaptive:1000");
        assert_eq!("off".parse::<ModeSpec>().unwrap().kind, ModeKind::Off);
        assert_eq!("fixed".parse::<ModeSpec>().unwrap().budget_us, None);
        for bad in [
            "",
            "on",
            "off:5",
            "fixed:",
            "fixed:0",
            "adaptive:x",
            "adaptive:100001",
            "adaptive:-5",
        ] {
            assert!(bad.parse::<ModeSpec>().is_err(), "{bad:?} accepted");
        }
    }
}
