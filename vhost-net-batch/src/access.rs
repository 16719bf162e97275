//! Who may use the daemon's sockets.
//!
//! A socket is created with an explicit mode: the umask is held at `0177` around `bind`, so the
//! file never exists with a wider mode than 0600, and is then set to the mode asked for (0600 by
//! default) and, optionally, given to a group. Every connection's peer (`SO_PEERCRED`) must
//! then be root, the daemon's own user, or a member of that group; anyone else is turned away
//! even if the mode let them connect.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Mutex;

/// The default mode of the sockets: the daemon's user only.
pub const DEFAULT_MODE: u32 = 0o600;

/// Who may connect to one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The socket file's permission bits.
    pub mode: u32,
    /// A group given the socket (and admitted by the peer check).
    pub group: Option<u32>,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            mode: DEFAULT_MODE,
            group: None,
        }
    }
}

/// A socket mode as written: octal permission bits, `0600` or `600` (at most `0777`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl std::str::FromStr for SocketMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u32::from_str_radix(s, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .map(SocketMode)
            .ok_or_else(|| {
                format!("bad socket mode {s:?}: give octal permission bits like 0600 or 0660")
            })
    }
}

impl<'de> serde::Deserialize<'de> for SocketMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The credentials of a socket's peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Its process.
    pub pid: u32,
    /// Its effective user.
    pub uid: u32,
    /// Its effective group.
    pub gid: u32,
}

/// The peer's credentials (`SO_PEERCRED`).
pub fn peer_cred(s: &UnixStream) -> io::Result<PeerCred> {
    // SAFETY: ucred is plain integers; all-zero is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes a ucred of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid.max(0) as u32,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The supplementary groups of process `pid` (`Groups:` of `/proc/PID/status`).
fn groups_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Groups:").map(|g| {
                    g.split_whitespace()
                        .filter_map(|v| v.parse().ok())
                        .collect()
                })
            })
        })
        .unwrap_or_default()
}

/// Serializes our changes of the process-wide umask.
static UMASK: Mutex<()> = Mutex::new(());

impl Access {
    /// Binds `path` with this access: created 0600 under a `0177` umask, then given the mode
    /// and group.
    pub fn bind(&self, path: &Path) -> io::Result<UnixListener> {
        let listener = {
            let _g = UMASK.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: umask only changes the process's file creation mask; restored below.
            let old = unsafe { libc::umask(0o177) };
            let r = UnixListener::bind(path);
            // SAFETY: as above.
            unsafe { libc::umask(old) };
            r?
        };
        if let Some(gid) = self.group {
            std::os::unix::fs::chown(path, None, Some(gid))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(self.mode))?;
        Ok(listener)
    }

    /// Whether `peer` may use the socket: root, the daemon's user, or a member of the group.
    pub fn allows(&self, peer: &PeerCred) -> bool {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        peer.uid == 0
            || peer.uid == me
            || self
                .group
                .is_some_and(|g| peer.gid == g || groups_of(peer.pid).contains(&g))
    }
}

/// The id of group `name` (or a numeric gid as is).
pub fn group_id(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse() {
        return Some(gid);
    }
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a zeroed group and buffer for getgrnam_r, which fills them; `res` says whether
    // it found the group.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16384];
        let mut res: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut res);
        (rc == 0 && !res.is_null()).then_some(grp.gr_gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_get_their_mode_and_peers_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let a = Access::default();
        let l = a.bind(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let c = UnixStream::connect(&p).unwrap();
        let (s, _) = l.accept().unwrap();
        let me = peer_cred(&s).unwrap();
        assert_eq!(me.pid, std::process::id());
        assert!(a.allows(&me));
        let stranger = PeerCred {
            pid: 1,
            uid: 65534,
            gid: 65534,
        };
        assert!(!a.allows(&stranger));
        assert!(Access {
            mode: 0o660,
            group: Some(65534)
        }
        .allows(&stranger));
        drop(c);
        let p2 = dir.path().join("g.sock");
        let g = Access {
            mode: 0o660,
            group: group_id("nogroup").or(Some(65534)),
        };
        g.bind(&p2).unwrap();
        let meta = std::fs::metadata(&p2).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), g.group.unwrap());
        assert_eq!(group_id("root"), Some(0));
        assert_eq!("0660".parse::<SocketMode>(), Ok(SocketMode(0o660)));
        assert_eq!("600".parse::<SocketMode>(), Ok(SocketMode(0o600)));
        for bad in ["", "0800", "1777", "rw"] {
            assert!(bad.parse::<SocketMode>().is_err(), "{bad}");
        }
        assert_eq!(group_id("vnb-no-such-group"), None);
    }
}
