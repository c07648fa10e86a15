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
