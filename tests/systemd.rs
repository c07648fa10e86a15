//! The systemd units in deploy/systemd, as systemd reads them:
//! `systemd-analyze verify` finds nothing to say about either, with
//! `ExecStart=` pointed at this build's binaries (verify checks that the
//! program exists), and `systemd-analyze security` rates both well
//! hardened.
//!
//! Offline, in a container with no running manager, `verify` needs:
//! `--man=no` (no man pages to look up; we name none anyway),
//! `--generators=no` (running the host's generators is beside the point
//! and prints about the host), `--recursive-errors=no` (only our units
//! count, not whatever the host has installed that they name, such as
//! network-online.target or the units fient conflicts with). `verify`
//! exits 0 on unknown keys and bad values, only warning on stderr, so the
//! test wants stderr empty too.

use lab::peers::TempDir;
use lab::{bin, run};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// `systemd-analyze`, or `None` (after saying so) to skip; fails instead
/// when `CERV_REQUIRE_PEERS=1`, as a missing peer does.
fn systemd_analyze(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("systemd-analyze"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let msg = format!("{test}: systemd-analyze not found (Debian package systemd)");
        if std::env::var("CERV_REQUIRE_PEERS").is_ok_and(|v| v == "1") {
            panic!("{msg}, and CERV_REQUIRE_PEERS=1");
        }
        eprintln!("SKIPPED {msg}");
    }
    found
}

fn unit(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/systemd")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `text` with its `ExecStart=/usr/local/bin/NAME` pointing at `program`.
fn with_program(text: &str, name: &str, program: &Path) -> String {
    let installed = format!("ExecStart=/usr/local/bin/{name} ");
    assert_eq!(
        text.matches(&installed).count(),
        1,
        "{name}.service should start /usr/local/bin/{name} once"
    );
    text.replace(&installed, &format!("ExecStart={} ", program.display()))
}

/// Both units, runnable here, in a directory of their own.
fn units_here() -> (TempDir, Vec<PathBuf>) {
    let dir = TempDir::new("cerv-units");
    let mut paths = Vec::new();
    for name in ["cerv", "fient"] {
        let text = with_program(&unit(&format!("{name}.service")), name, &bin(name));
        let path = dir.path().join(format!("{name}.service"));
        std::fs::write(&path, text).expect("write unit");
        paths.push(path);
    }
    (dir, paths)
}

fn verify(analyze: &Path, units: &[PathBuf]) -> lab::Finished {
    run(
        Command::new(analyze)
            .args([
                "verify",
                "--man=no",
                "--generators=no",
                "--recursive-errors=no",
            ])
            .args(units),
        Duration::from_secs(60),
    )
}

#[test]
fn systemd_analyze_verify_finds_nothing_to_say() {
    let Some(analyze) = systemd_analyze("systemd_analyze_verify_finds_nothing_to_say") else {
        return;
    };
    let (_dir, units) = units_here();
    let out = verify(&analyze, &units);
    assert_eq!(
        (out.code(), out.stdout.trim(), out.stderr.trim()),
        (Some(0), "", ""),
        "systemd-analyze verify {units:?}"
    );
}

/// The check above could pass by checking nothing: here it catches a
/// missing program and an unknown key (which, depending on the options,
/// may only be warned about, with exit code 0).
#[test]
fn systemd_analyze_verify_would_complain() {
    let Some(analyze) = systemd_analyze("systemd_analyze_verify_would_complain") else {
        return;
    };
    let dir = TempDir::new("cerv-units-bad");
    let missing = dir.path().join("cerv.service");
    let text = with_program(
        &unit("cerv.service"),
        "cerv",
        &dir.path().join("no-such-cerv"),
    );
    std::fs::write(&missing, text).expect("write unit");
    let out = verify(&analyze, std::slice::from_ref(&missing));
    assert_ne!(out.code(), Some(0), "{}", out.stderr);
    assert!(out.stderr.contains("not executable"), "{}", out.stderr);

    let unknown = dir.path().join("fient.service");
    let text = with_program(&unit("fient.service"), "fient", &bin("fient"))
        .replace("[Service]\n", "[Service]\nProtectClocks=yes\n");
    std::fs::write(&unknown, text).expect("write unit");
    let out = verify(&analyze, std::slice::from_ref(&unknown));
    assert!(out.stderr.contains("Unknown key"), "{}", out.stderr);
}

/// `systemd-analyze security` scores exposure from 0 (locked down) to 10;
/// both units stay at or below 2.5 ("OK"), so a hardening line lost on
/// the way shows here.
#[test]
fn systemd_analyze_security_rates_both_units_ok() {
    let Some(analyze) = systemd_analyze("systemd_analyze_security_rates_both_units_ok") else {
        return;
    };
    let (_dir, units) = units_here();
    for unit in &units {
        let out = run(
            Command::new(&analyze)
                .args(["security", "--offline=yes", "--threshold=25", "--no-pager"])
                .arg(unit),
            Duration::from_secs(60),
        );
        assert_eq!(
            out.code(),
            Some(0),
            "{}: exposure above 2.5\n{}{}",
            unit.display(),
            out.stdout,
            out.stderr
        );
        assert!(
            out.stdout.contains("Overall exposure level"),
            "{}",
            out.stdout
        );
    }
}

/// What a service manager hears from `program` run with `args`: the
/// notifications on a socket of our own, as systemd would pass it
/// (`NOTIFY_SOCKET`, `WATCHDOG_USEC`); `script` acts on the process
/// (signals) and says when enough has been heard.
fn notifications(
    program: &str,
    args: &[&str],
    script: impl Fn(u32, &[String]) -> bool,
) -> (Vec<String>, Option<i32>) {
    use std::os::unix::net::UnixDatagram;
    let dir = TempDir::new("cerv-notify");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut child = Command::new(bin(program))
        .args(args)
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "300000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut heard = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    let mut code = None;
    loop {
        if let Ok(n) = socket.recv(&mut buf) {
            heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        if let Ok(Some(status)) = child.try_wait() {
            code = status.code();
            // What it said on its way out.
            while let Ok(n) = socket.recv(&mut buf) {
                heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        script(child.id(), &heard);
    }
    (heard, code)
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Type=notify and the watchdog, as cerv speaks them: READY=1 once
/// listening, WATCHDOG=1 at half the timeout, RELOADING=1 then READY=1 on
/// SIGHUP, STOPPING=1 on SIGTERM.
#[test]
fn cerv_tells_systemd_ready_reloading_stopping_and_feeds_the_watchdog() {
    let sent_hup = std::sync::atomic::AtomicBool::new(false);
    let sent_term = std::sync::atomic::AtomicBool::new(false);
    let (heard, code) = notifications("cerv", &["--listen", "127.0.0.1:0"], |pid, heard| {
        use std::sync::atomic::Ordering::Relaxed;
        let count = |what: &str| heard.iter().filter(|m| m.contains(what)).count();
        if count("READY=1") >= 1 && count("WATCHDOG=1") >= 2 && !sent_hup.swap(true, Relaxed) {
            signal(pid, libc::SIGHUP);
        }
        if count("RELOADING=1") >= 1 && count("READY=1") >= 2 && !sent_term.swap(true, Relaxed) {
            signal(pid, libc::SIGTERM);
        }
        false
    });
    assert_eq!(code, Some(0), "{heard:?}");
    let first = |what: &str| heard.iter().position(|m| m.contains(what));
    let ready = first("READY=1").expect("READY=1");
    let reloading = first("RELOADING=1").expect("RELOADING=1");
    let stopping = first("STOPPING=1").expect("STOPPING=1");
    assert!(ready < reloading && reloading < stopping, "{heard:?}");
    assert!(
        heard[reloading..stopping]
            .iter()
            .any(|m| m.contains("READY=1")),
        "ready again after the reload: {heard:?}"
    );
    assert!(heard[reloading].contains("MONOTONIC_USEC="), "{heard:?}");
    assert!(heard.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2);
    assert!(
        heard
            .iter()
            .any(|m| m.starts_with("STATUS=serving on 127.0.0.1:")),
        "{heard:?}"
    );
}

/// fient: READY=1 once watching, STATUS= with each round's result, the
/// watchdog fed, STOPPING=1 on SIGTERM; SIGHUP does not kill it.
#[test]
fn fient_tells_systemd_its_state_and_survives_a_hangup() {
    let server = lab::Cerv::start(&[]);
    let sent_hup = std::sync::atomic::AtomicBool::new(false);
    let sent_term = std::sync::atomic::AtomicBool::new(false);
    let target = server.target();
    let (heard, code) = notifications(
        "fient",
        &[&target, "--watch", "200ms", "--probes", "2"],
        |pid, heard| {
            use std::sync::atomic::Ordering::Relaxed;
            let synced = heard.iter().filter(|m| m.contains("STATUS=synced")).count();
            if synced >= 1 && !sent_hup.swap(true, Relaxed) {
                signal(pid, libc::SIGHUP);
            }
            if synced >= 3 && !sent_term.swap(true, Relaxed) {
                signal(pid, libc::SIGTERM);
            }
            false
        },
    );
    assert_eq!(code, Some(0), "{heard:?}");
    assert!(heard.iter().any(|m| m == "READY=1"), "{heard:?}");
    assert!(heard.iter().any(|m| m.contains("WATCHDOG=1")), "{heard:?}");
    assert!(heard.iter().any(|m| m.contains("STOPPING=1")), "{heard:?}");
    let status = heard
        .iter()
        .find(|m| m.starts_with("STATUS=synced: offset "))
        .expect("a STATUS line");
    assert!(status.contains(" of 1 agree"), "{status}");
}
