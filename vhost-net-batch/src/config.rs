//! What the operator asks for: VMs with a socket, a tap, queue pairs and a MAC; from command-line
//! flags for one VM or a TOML file (`[[vm]]` tables) for many. Everything is validated before
//! anything is opened.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer};
use thiserror::Error;

use crate::access::{group_id, Access, SocketMode, DEFAULT_MODE};
use crate::policy::{resolve_budget, EwmaRule, ModeSpec, PolicyConfig, PolicyError};
use crate::tap::validate_ifname;
use crate::tap_io::TapIoKind;

/// Most queue pairs per VM (one worker thread each).
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// Configuration errors; each names the VM and the field.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A MAC address that does not parse or is not a unicast address.
    #[error("bad MAC address {0:?}: expected six hex octets like 52:54:00:12:34:56, unicast (even first octet)")]
    BadMac(String),
    /// Queue pairs out of range.
    #[error("VM {vm:?}: queues must be between 1 and {MAX_QUEUE_PAIRS}, got {got}")]
    Queues {
        /// VM name.
        vm: String,
        /// Requested value.
        got: u16,
    },
    /// Bad VM name.
    #[error("bad VM name {0:?}: 1 to 64 characters from [A-Za-z0-9_.-]")]
    BadName(String),
    /// Bad tap name.
    #[error("VM {vm:?}: {source}")]
    BadTap {
        /// VM name.
        vm: String,
        /// Why.
        #[source]
        source: crate::tap::TapError,
    },
    /// Two VMs share a name, socket or tap.
    #[error("{what} {value:?} is used by more than one VM")]
    Duplicate {
        /// Which field.
        what: &'static str,
        /// The shared value.
        value: String,
    },
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema (unknown keys included).
    #[error("config file {path}: {msg}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// The parser's message.
        msg: String,
    },
    /// A bad batching setting.
    #[error("VM {vm:?}: {source}")]
    Policy {
        /// VM name.
        vm: String,
        /// Why.
        #[source]
        source: PolicyError,
    },
    /// `socket_group` names no group of this system.
    #[error("VM {vm:?}: no group named {group:?} (give a group name or a numeric gid)")]
    UnknownGroup {
        /// VM name.
        vm: String,
        /// The group asked for.
        group: String,
    },
    /// No VM configured.
    #[error("no VM configured: give --vm/--socket/--tap or --config FILE with [[vm]] tables")]
    Empty,
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::BadMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() || out[0] & 1 != 0 {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl MacAddr {
    /// A stable locally administered address derived from a VM name.
    pub fn for_name(name: &str) -> Self {
        // FNV-1a: stable across runs and platforms.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_le_bytes();
        MacAddr([0x52, 0x54, 0x00, b[0], b[1], b[2]])
    }
}

fn one() -> u16 {
    1
}

/// One VM served by the daemon: the one settings struct, read from the command line (one VM,
/// `serve --vm NAME --socket PATH --tap NAME …`) and from TOML (`[[vm]]` tables, the same names
/// with `name` for `--vm`), so a new setting is one field here.
#[derive(Debug, Clone, PartialEq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
#[group(id = "one_vm", multiple = true)]
pub struct VmConfig {
    /// VM name, used in logs, metrics and the control interface ([A-Za-z0-9_.-], up to 64).
    #[arg(long = "vm", value_name = "NAME")]
    pub name: String,
    /// vhost-user socket path to listen on.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Tap interface to create or attach.
    #[arg(long, value_name = "NAME")]
    pub tap: String,
    /// Queue pairs (one worker thread each), 1 to 16.
    #[arg(long, value_name = "N", default_value_t = 1)]
    #[serde(default = "one")]
    pub queues: u16,
    /// The guest's MAC address (give QEMU the same with `-device virtio-net-pci,mac=`); derived
    /// from the name when absent.
    #[arg(long)]
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Batching mode: off, fixed:US or adaptive:US (default adaptive with the budget).
    #[arg(long, value_name = "MODE")]
    #[serde(default)]
    pub mode: Option<ModeSpec>,
    /// The VM's buffer budget: the largest delay in µs (default 500).
    #[arg(long, value_name = "US")]
    #[serde(default)]
    pub budget_us: Option<u32>,
    /// How the send share p* follows the traffic: `fast` (default: EWMAs of the packet rates
    /// every 50 ms, follows a change within ~0.4 s) or `paper` (the paper's EWMA of the send
    /// ratio every 5 s).
    #[arg(long, value_name = "RULE")]
    #[serde(default)]
    pub policy: Option<EwmaRule>,
    /// EWMA smoothing factor α in [0, 1) (default 0.75).
    #[arg(long, value_name = "A")]
    #[serde(default)]
    pub alpha: Option<f64>,
    /// EWMA update interval in ms (default 100 for `fast`, 5000 for `paper`).
    #[arg(long, value_name = "MS")]
    #[serde(default)]
    pub update_ms: Option<u32>,
    /// Packet rate (both directions, per second) below which nothing is delayed (default 1000;
    /// 0 delays at any rate, for tests and experiments).
    #[arg(long, value_name = "N")]
    #[serde(default)]
    pub rate_floor_pps: Option<u32>,
    /// A direction is delayed only if its rate brings at least this many frames per delay
    /// period (default 1; 0 to 64).
    #[arg(long, value_name = "F")]
    #[serde(default)]
    pub period_frames: Option<f64>,
    /// `adaptive` delays only a VM that, measured without delays, sends at least this many
    /// notifications (interrupts + kicks) per period T (default 1 with `--policy fast`, 0 =
    /// no check with `--policy paper`; 0 to 64).
    #[arg(long, value_name = "N")]
    #[serde(default)]
    pub notify_per_period: Option<f64>,
    /// The vhost-user socket's permission bits, octal (default 0600: the daemon's user only).
    #[arg(long, value_name = "MODE")]
    #[serde(default)]
    pub socket_mode: Option<SocketMode>,
    /// A group (name or gid) given the vhost-user socket; its members may connect (QEMU
    /// running as another user of that group).
    #[arg(long, value_name = "GROUP")]
    #[serde(default)]
    pub socket_group: Option<String>,
    /// How frames go to and come from the tap: `uring` (default: each TX step's frames in one
    /// `io_uring` submission, RX frames read ahead in batches through it, falling back to
    /// system calls where `io_uring` is unavailable) or `syscalls` (one `writev` or `readv` per
    /// frame).
    #[arg(long, value_name = "IO")]
    #[serde(default)]
    pub tap_io: Option<TapIoKind>,
}

impl VmConfig {
    /// The configured MAC, or the one derived from the name.
    pub fn mac(&self) -> MacAddr {
        self.mac.unwrap_or_else(|| MacAddr::for_name(&self.name))
    }

    /// A VM with default batching settings.
    pub fn new(name: &str, socket: &Path, tap: &str, queues: u16, mac: Option<MacAddr>) -> Self {
        VmConfig {
            name: name.into(),
            socket: socket.into(),
            tap: tap.into(),
            queues,
            mac,
            mode: None,
            budget_us: None,
            policy: None,
            alpha: None,
            update_ms: None,
            rate_floor_pps: None,
            period_frames: None,
            notify_per_period: None,
            socket_mode: None,
            socket_group: None,
            tap_io: None,
        }
    }

    /// The batching policy configuration these settings give.
    pub fn policy(&self) -> Result<PolicyConfig, ConfigError> {
        let err = |source| ConfigError::Policy {
            vm: self.name.clone(),
            source,
        };
        let spec = self.mode.unwrap_or(ModeSpec {
            kind: crate::policy::ModeKind::Adaptive,
            budget_us: None,
        });
        let (mode, budget_us) = resolve_budget(spec, self.budget_us).map_err(err)?;
        let d = PolicyConfig::default();
        let rule = self.policy.unwrap_or(d.rule);
        let cfg = PolicyConfig {
            mode,
            budget_us,
            rule,
            alpha: self.alpha.unwrap_or(d.alpha),
            update_ms: self.update_ms.unwrap_or(rule.default_update_ms()),
            rate_floor_pps: self.rate_floor_pps.unwrap_or(d.rate_floor_pps),
            period_frames: self.period_frames.unwrap_or(d.period_frames),
            notify_per_period: self
                .notify_per_period
                .unwrap_or(rule.default_notify_per_period()),
            ..d
        };
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    /// Who may use the VM's vhost-user socket.
    pub fn access(&self) -> Result<Access, ConfigError> {
        let group = match &self.socket_group {
            None => None,
            Some(g) => Some(group_id(g).ok_or_else(|| ConfigError::UnknownGroup {
                vm: self.name.clone(),
                group: g.clone(),
            })?),
        };
        Ok(Access {
            mode: self.socket_mode.map_or(DEFAULT_MODE, |m| m.0),
            group,
        })
    }

    /// Checks one VM's fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !name_ok {
            return Err(ConfigError::BadName(self.name.clone()));
        }
        if self.queues == 0 || self.queues > MAX_QUEUE_PAIRS {
            return Err(ConfigError::Queues {
                vm: self.name.clone(),
                got: self.queues,
            });
        }
        validate_ifname(&self.tap).map_err(|source| ConfigError::BadTap {
            vm: self.name.clone(),
            source,
        })?;
        self.access()?;
        self.policy().map(|_| ())
    }
}

/// The TOML file: `[[vm]]` tables.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The VMs.
    #[serde(default)]
    pub vm: Vec<VmConfig>,
}

impl FileConfig {
    /// Parses TOML text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Vec<VmConfig>, ConfigError> {
        let f: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        validate_all(&f.vm)?;
        Ok(f.vm)
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Vec<VmConfig>, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

/// Checks every VM and that no two share a name, socket or tap.
pub fn validate_all(vms: &[VmConfig]) -> Result<(), ConfigError> {
    if vms.is_empty() {
        return Err(ConfigError::Empty);
    }
    let mut names = HashSet::new();
    let mut sockets = HashSet::new();
    let mut taps = HashSet::new();
    for vm in vms {
        vm.validate()?;
        if !names.insert(&vm.name) {
            return Err(ConfigError::Duplicate {
                what: "name",
                value: vm.name.clone(),
            });
        }
        if !sockets.insert(&vm.socket) {
            return Err(ConfigError::Duplicate {
                what: "socket",
                value: vm.socket.display().to_string(),
            });
        }
        if !taps.insert(&vm.tap) {
            return Err(ConfigError::Duplicate {
                what: "tap",
                value: vm.tap.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> VmConfig {
        VmConfig::new(
            name,
            Path::new(&format!("/tmp/{name}.sock")),
            &format!("t{name}"),
            1,
            None,
        )
    }

    #[test]
    fn batching_settings_from_toml_and_their_errors() {
        let ok = FileConfig::parse(
            "[[vm]]\nname='a'\nsocket='/tmp/a'\ntap='ta'\nmode='fixed:250'\nalpha=0.5\nupdate_ms=100\n",
            Path::new("x.toml"),
        )
        .unwrap();
        let p = ok[0].policy().unwrap();
        assert_eq!(p.mode, crate::policy::ModeKind::Fixed);
        assert_eq!((p.budget_us, p.alpha, p.update_ms), (250, 0.5, 100));
        let d = vm("d").policy().unwrap();
        assert_eq!(d.mode, crate::policy::ModeKind::Adaptive);
        assert_eq!((d.rule, d.update_ms), (EwmaRule::Fast, 50));
        // The paper's rule brings its own interval unless one is given.
        let paper = FileConfig::parse(
            "[[vm]]\nname='a'\nsocket='/tmp/a'\ntap='ta'\npolicy='paper'\nperiod_frames=0.5\n",
            Path::new("x.toml"),
        )
        .unwrap()[0]
            .policy()
            .unwrap();
        assert_eq!(
            (
                paper.rule,
                paper.update_ms,
                paper.period_frames,
                paper.notify_per_period
            ),
            (EwmaRule::Paper, 5000, 0.5, 0.0)
        );
        assert_eq!(d.notify_per_period, 1.0);
        assert_eq!(
            vm("d").tap_io,
            None,
            "the default is left to the device (uring)"
        );
        let sys = FileConfig::parse(
            "[[vm]]\nname='a'\nsocket='/tmp/a'\ntap='ta'\ntap_io='syscalls'\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(sys[0].tap_io, Some(TapIoKind::Syscalls));
        for (bad, want) in [
            ("policy='slow'", "unknown variant"),
            ("tap_io='aio'", "unknown variant"),
            ("period_frames=100.0", "period frames"),
            ("notify_per_period=-1.0", "notifications per period"),
            ("mode='turbo'", "unknown mode"),
            ("mode='adaptive:1000'\nbudget_us=500", "give one of them"),
            ("alpha=1.5", "alpha"),
            ("update_ms=1", "update interval"),
            ("budget_us=0", "budget"),
        ] {
            let text = format!("[[vm]]\nname='a'\nsocket='/tmp/a'\ntap='ta'\n{bad}\n");
            let e = FileConfig::parse(&text, Path::new("x.toml"))
                .and_then(|v| validate_all(&v))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            "52:54:00:12:34:5f".parse::<MacAddr>().unwrap().0,
            [0x52, 0x54, 0, 0x12, 0x34, 0x5f]
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "zz:54:00:12:34:56",
            "01:00:5e:00:00:01",
            "5:54:00:12:34:56",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let m = MacAddr::for_name("vm1");
        assert_eq!(m, MacAddr::for_name("vm1"));
        assert_eq!(m.0[0] & 1, 0);
        assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m);
    }

    #[test]
    fn toml_many_vms() {
        let text = r#"
            [[vm]]
            name = "a"
            socket = "/tmp/a.sock"
            tap = "vnbA"
            queues = 2
            mac = "52:54:00:00:00:0a"

            [[vm]]
            name = "b"
            socket = "/tmp/b.sock"
            tap = "vnbB"
        "#;
        let vms = FileConfig::parse(text, Path::new("x.toml")).unwrap();
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0].queues, 2);
        assert_eq!(vms[1].queues, 1);
        assert_eq!(vms[0].mac().to_string(), "52:54:00:00:00:0a");
    }

    #[test]
    fn toml_rejects_unknown_keys_and_bad_values() {
        let unknown = "[[vm]]\nname = \"a\"\nsocket = \"/s\"\ntap = \"t\"\nqueus = 2\n";
        let e = FileConfig::parse(unknown, Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("queus"), "{e}");
        let top = "bogus = 1\n";
        assert!(FileConfig::parse(top, Path::new("x.toml")).is_err());
        let badmac = "[[vm]]\nname = \"a\"\nsocket = \"/s\"\ntap = \"t\"\nmac = \"nope\"\n";
        assert!(FileConfig::parse(badmac, Path::new("x.toml")).is_err());
        assert!(matches!(
            FileConfig::parse("", Path::new("x.toml")),
            Err(ConfigError::Empty)
        ));
    }

    #[test]
    fn validation() {
        assert!(validate_all(&[vm("a"), vm("b")]).is_ok());
        let mut q0 = vm("a");
        q0.queues = 0;
        assert!(matches!(q0.validate(), Err(ConfigError::Queues { .. })));
        q0.queues = MAX_QUEUE_PAIRS + 1;
        assert!(matches!(q0.validate(), Err(ConfigError::Queues { .. })));
        let mut dup = vm("b");
        dup.socket = vm("a").socket;
        assert!(matches!(
            validate_all(&[vm("a"), dup]),
            Err(ConfigError::Duplicate { what: "socket", .. })
        ));
        assert!(matches!(
            validate_all(&[vm("a"), vm("a")]),
            Err(ConfigError::Duplicate { .. })
        ));
        assert!(matches!(
            vm("bad name").validate(),
            Err(ConfigError::BadName(_))
        ));
        let mut longtap = vm("c");
        longtap.tap = "a-very-long-tap-name".into();
        assert!(matches!(
            longtap.validate(),
            Err(ConfigError::BadTap { .. })
        ));
    }
}
