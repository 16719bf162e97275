//! The bench's one error type.

use std::io;
use std::path::PathBuf;
use std::process::Command;

use thiserror::Error;

/// Why a campaign, a run or a report failed; each variant says what went wrong where.
#[derive(Debug, Error)]
pub enum BenchError {
    /// A command ran and failed.
    #[error("{cmd} failed ({status}): {output}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// What it printed.
        output: String,
    },
    /// A command could not be started.
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    File {
        /// Which.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A tool printed something that cannot be read as a result.
    #[error("{tool}: {msg}")]
    Output {
        /// The tool (iperf3, ab, tbench, testpmd, …).
        tool: &'static str,
        /// What is wrong with its output.
        msg: String,
    },
    /// A workload ran but gave no usable measurement.
    #[error("{0}")]
    Workload(String),
    /// A namespace, backend, frontend or guest did not come up.
    #[error("{0}")]
    Setup(String),
    /// Bad input: flags, a plan, a configuration or workload name.
    #[error("{0}")]
    Input(String),
    /// A chart could not be drawn.
    #[error("chart {name}: {msg}")]
    Chart {
        /// The chart.
        name: String,
        /// What failed.
        msg: String,
    },
    /// The power sampler.
    #[error("power: {0}")]
    Power(#[from] power::PowerError),
    /// A results or plan file that does not parse.
    #[error("{}: {msg}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        msg: String,
    },
    /// The backend's control socket.
    #[error("control socket: {0}")]
    Control(#[from] vhost_net_batch::control_socket::ControlError),
}

/// Results of the bench.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;

impl BenchError {
    /// A file error on `path`.
    pub fn file(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> BenchError {
        let path = path.into();
        move |source| BenchError::File { path, source }
    }
}

/// Runs `cmd` and returns its standard output, or an error with everything it printed.
pub fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|source| BenchError::Spawn {
        cmd: format!("{cmd:?}"),
        source,
    })?;
    if !out.status.success() {
        return Err(BenchError::Command {
            cmd: format!("{cmd:?}"),
            status: out.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
