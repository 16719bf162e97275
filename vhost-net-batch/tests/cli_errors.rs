//! Bad operator input gets a clear error and a non-zero exit, and changes nothing.

mod common;

use std::process::Output;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-net-batch");

fn serve(ns: &ScriptNetns, args: &[&str]) -> Output {
    let mut c = ns.cmd(&[BIN, "serve"]);
    c.args(args).output().unwrap()
}

fn assert_fails(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
}

#[test]
fn bad_arguments_and_config_are_rejected() {
    let ns = ScriptNetns::create("cli");
    let dir = tempdir();
    let sock = dir.join("a.sock");
    let s = sock.to_str().unwrap();
    assert_fails(
        &serve(
            &ns,
            &[
                "--vm",
                "a",
                "--socket",
                s,
                "--tap",
                "vnbc0",
                "--mac",
                "zz:00:00:00:00:01",
            ],
        ),
        "bad MAC",
    );
    assert_fails(
        &serve(
            &ns,
            &[
                "--vm",
                "a",
                "--socket",
                s,
                "--tap",
                "vnbc0",
                "--mac",
                "01:00:5e:00:00:01",
            ],
        ),
        "unicast",
    );
    assert_fails(
        &serve(
            &ns,
            &[
                "--vm", "a", "--socket", s, "--tap", "vnbc0", "--queues", "0",
            ],
        ),
        "queues must be between 1 and 16",
    );
    assert_fails(
        &serve(
            &ns,
            &[
                "--vm", "a", "--socket", s, "--tap", "vnbc0", "--queues", "17",
            ],
        ),
        "queues must be between 1 and 16",
    );
    assert_fails(
        &serve(
            &ns,
            &["--vm", "a", "--socket", s, "--tap", "this-name-is-too-long"],
        ),
        "invalid tap name",
    );
    assert_fails(&serve(&ns, &["--vm", "a", "--tap", "vnbc0"]), "--socket");
    let cfg = dir.join("vms.toml");
    std::fs::write(
        &cfg,
        format!("[[vm]]\nname = \"a\"\nsocket = \"{s}\"\ntap = \"vnbc0\"\nqueus = 2\n"),
    )
    .unwrap();
    assert_fails(&serve(&ns, &["--config", cfg.to_str().unwrap()]), "queus");
    assert_fails(
        &serve(
            &ns,
            &["--config", dir.join("missing.toml").to_str().unwrap()],
        ),
        "cannot read config file",
    );
    let one = ["--vm", "a", "--socket", s, "--tap", "vnbc0"];
    for (extra, needle) in [
        (&["--mode", "turbo"][..], "unknown mode"),
        (
            &["--mode", "adaptive:1000", "--budget-us", "500"][..],
            "give one of them",
        ),
        (&["--mode", "fixed:0"][..], "bad budget"),
        (&["--alpha", "1.0"][..], "alpha"),
        (&["--update-ms", "1"][..], "update interval"),
        (&["--period-frames", "65"][..], "period frames"),
        (
            &["--notify-per-period", "65"][..],
            "notifications per period",
        ),
        (
            &["--tap-io", "aio"][..],
            "invalid value 'aio' for '--tap-io",
        ),
        (&["--power-source", "bogus"][..], "unknown source"),
        (
            &["--power-source", "estimate", "--power-idle-watts", "-3"][..],
            "--power-idle-watts must be a finite number of watts",
        ),
        (
            &["--power-source", "estimate", "--power-base-watts", "NaN"][..],
            "--power-base-watts must be a finite number of watts",
        ),
        (
            &["--power-idle-watts", "30"][..],
            "--power-idle-watts configures per-VM energy accounting: give --power-source too",
        ),
    ] {
        let mut args = one.to_vec();
        args.extend_from_slice(extra);
        assert_fails(&serve(&ns, &args), needle);
    }
    // ctl against a daemon that is not there, and bad ctl arguments.
    let ctl = |args: &[&str]| {
        std::process::Command::new(BIN)
            .arg("ctl")
            .args(args)
            .output()
            .unwrap()
    };
    let nosock = dir.join("none.sock");
    let ns_path = nosock.to_str().unwrap();
    assert_fails(
        &ctl(&["--control", ns_path, "list"]),
        "cannot connect to the control socket",
    );
    assert_fails(
        &ctl(&["--control", ns_path, "set", "a"]),
        "--mode and/or --budget-us",
    );
    assert_fails(
        &ctl(&["--control", ns_path, "set", "a", "--mode", "nope"]),
        "unknown mode",
    );
    // Nothing was created by the failed starts.
    assert!(!sock.exists());
    let links = run_ok(&mut ns.cmd(&["ip", "-br", "link"]));
    assert!(!links.contains("vnbc0"), "{links}");
}

#[test]
fn socket_problems_are_reported() {
    let ns = ScriptNetns::create("sk");
    let dir = tempdir();
    let sock = dir.join("a.sock");
    let _first = spawn_backend(&ns, "a", &sock, "vnbs0", &[]);
    // A second VM "b" started on `socket`.
    let serve_b = |socket: &std::path::Path| {
        serve(
            &ns,
            &[
                "--vm",
                "b",
                "--socket",
                socket.to_str().unwrap(),
                "--tap",
                "vnbs1",
            ],
        )
    };
    assert_fails(&serve_b(&sock), "in use by another process");
    let nodir = dir.join("no/such/dir/b.sock");
    assert_fails(&serve_b(&nodir), "cannot listen on");
    let file = dir.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    assert_fails(&serve_b(&file), "is not a socket");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"x",
        "the file was left alone"
    );
}

#[test]
fn missing_capability_is_named() {
    require_cmd("setpriv", "util-linux");
    let ns = ScriptNetns::create("cap");
    let dir = tempdir();
    let sock = dir.join("a.sock");
    let out = ns
        .cmd(&[
            "setpriv",
            "--bounding-set",
            "-net_admin",
            "--inh-caps",
            "-net_admin",
            "--",
            BIN,
            "serve",
        ])
        .args([
            "--vm",
            "a",
            "--socket",
            sock.to_str().unwrap(),
            "--tap",
            "vnbcap0",
        ])
        .output()
        .unwrap();
    assert_fails(&out, "CAP_NET_ADMIN");
}

#[test]
fn sigterm_removes_the_socket() {
    let ns = ScriptNetns::create("sig");
    let dir = tempdir();
    let sock = dir.join("a.sock");
    let mut p = spawn_backend(&ns, "a", &sock, "vnbsig0", &[]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
    let st = p.0.wait().unwrap();
    assert!(st.success(), "{st}");
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn config_file_serves_several_vms_in_one_process() {
    let ns = ScriptNetns::create("mv");
    let dir = tempdir();
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let cfg = dir.join("vms.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[vm]]\nname = \"a\"\nsocket = \"{}\"\ntap = \"vnbmva\"\n\n[[vm]]\nname = \"b\"\nsocket = \"{}\"\ntap = \"vnbmvb\"\nqueues = 2\nmac = \"52:54:00:00:00:0b\"\n",
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    let mut p = Proc(
        ns.cmd(&[BIN, "serve", "--config", cfg.to_str().unwrap()])
            .spawn()
            .unwrap(),
    );
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !(a.exists() && b.exists()) && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(a.exists() && b.exists(), "both VM sockets are served");
    let links = run_ok(&mut ns.cmd(&["ip", "-d", "link"]));
    assert!(
        links.contains("vnbmva") && links.contains("vnbmvb"),
        "{links}"
    );
    // One VM's frontend failing leaves the other alone: b has a live frontend; a's sends a
    // malformed message (a header claiming a 1 GiB payload) and is dropped; b still answers
    // on its connection, and a takes a new frontend.
    use std::io::{Read, Write};
    use vhost::vhost_user::Frontend;
    use vhost::VhostBackend;
    let fb = Frontend::connect(&b, 4).unwrap();
    fb.set_owner().unwrap();
    let features = fb.get_features().unwrap();
    let mut bad = std::os::unix::net::UnixStream::connect(&a).unwrap();
    bad.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&1u32.to_le_bytes()); // GET_FEATURES
    hdr.extend_from_slice(&1u32.to_le_bytes()); // version 1
    hdr.extend_from_slice(&(1u32 << 30).to_le_bytes());
    bad.write_all(&hdr).unwrap();
    let mut buf = [0u8; 64];
    match bad.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("a malformed message must end that VM's connection, got {other:?}"),
    }
    assert_eq!(fb.get_features().unwrap(), features, "VM b kept serving");
    let fa = Frontend::connect(&a, 2).unwrap();
    fa.set_owner().unwrap();
    assert_ne!(fa.get_features().unwrap(), 0, "VM a took a new frontend");
    drop((fa, fb));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
    assert!(p.0.wait().unwrap().success());
    assert!(!a.exists() && !b.exists());
}
