//! The one error type of the crate.
//!
//! Every variant names the source (`powercap`, `perf`, `msr`, …) and carries a message an operator can act
//! on: what is missing, why (for example "this is a virtual machine"), and what would fix it.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while finding, opening or reading a power source.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    /// The source does not exist on this machine (no driver, no device, a VM, …).
    #[error("{source_name}: not present: {reason}")]
    NotPresent {
        /// Source name (`powercap`, `perf`, `msr`, `hwmon`, `ipmi`, `meter`, `estimate`).
        source_name: String,
        /// What is missing and why, with what to do about it.
        reason: String,
    },
    /// The source exists but this process may not read it.
    #[error("{source_name}: permission denied reading {path}: {hint}")]
    PermissionDenied {
        /// Source name.
        source_name: String,
        /// The file or device that could not be read.
        path: PathBuf,
        /// Which capability, group or chmod would help.
        hint: String,
    },
    /// A counter that should advance did not, or advances too slowly to be useful.
    #[error("{source_name}: counter {domain}: {detail}")]
    Counter {
        /// Source name.
        source_name: String,
        /// Domain (`package-0`, `dram-1`, …).
        domain: String,
        /// What was observed and what to do.
        detail: String,
    },
    /// Any other I/O error on a file or device.
    #[error("{source_name}: {path}: {err}")]
    Io {
        /// Source name.
        source_name: String,
        /// The file or device.
        path: PathBuf,
        /// The underlying error.
        #[source]
        err: io::Error,
    },
    /// A file or command output could not be parsed.
    #[error("{source_name}: cannot parse {what}: {detail}")]
    Parse {
        /// Source name.
        source_name: String,
        /// What was being parsed (a path or a command).
        what: String,
        /// What was wrong with it.
        detail: String,
    },
    /// An external command (ipmitool, meter command) failed.
    #[error("{source_name}: command `{command}` failed: {detail}")]
    Command {
        /// Source name.
        source_name: String,
        /// The command line.
        command: String,
        /// Exit status and stderr, or the spawn error.
        detail: String,
    },
    /// Invalid configuration or arguments.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl PowerError {
    /// Convenience constructor for [`PowerError::NotPresent`].
    pub fn not_present(source_name: &str, reason: impl Into<String>) -> Self {
        PowerError::NotPresent {
            source_name: source_name.to_string(),
            reason: reason.into(),
        }
    }

    /// Convenience constructor for [`PowerError::Parse`].
    pub fn parse(source_name: &str, what: impl Into<String>, detail: impl Into<String>) -> Self {
        PowerError::Parse {
            source_name: source_name.to_string(),
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// Convenience constructor for [`PowerError::Io`].
    pub fn io(source_name: &str, path: impl Into<PathBuf>, err: io::Error) -> Self {
        PowerError::Io {
            source_name: source_name.to_string(),
            path: path.into(),
            err,
        }
    }

    /// True for [`PowerError::PermissionDenied`].
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, PowerError::PermissionDenied { .. })
    }

    /// True for [`PowerError::NotPresent`].
    pub fn is_not_present(&self) -> bool {
        matches!(self, PowerError::NotPresent { .. })
    }
}
