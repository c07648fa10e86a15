//! End to end: authenticated time with pre-shared keys, real binaries.

use lab::{Cerv, bin, fient, json, run};
use std::process::Command;
use std::time::Duration;

/// A key file holding one fresh key made by `cerv --generate-key`.
fn key_file(dir: &tempfile::TempDir, name: &str, id: u32) -> String {
    let out = run(
        Command::new(bin("cerv")).args(["--generate-key", &id.to_string()]),
        Duration::from_secs(10),
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let line = out.stdout.trim();
    assert!(line.starts_with(&format!("{id} ")) && line.len() == id.to_string().len() + 65);
    let path = dir.path().join(name);
    std::fs::write(&path, format!("# made by the test\n{line}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path.display().to_string()
}

#[test]
fn the_right_key_syncs_and_any_other_gets_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let good = key_file(&dir, "good.keys", 5);
    let other = key_file(&dir, "other.keys", 5);
    let server = Cerv::start(&["--offset", "+40ms", "--key-file", &good]);
    let target = server.target();

    let ok = fient(&[&target, "--json", "--key-file", &good]);
    assert_eq!(ok.code(), Some(0), "{}", ok.stderr);
    let doc = json(&ok.stdout);
    let (offset, bound) = (
        doc["offset_ns"].as_i64().unwrap(),
        doc["error_bound_ns"].as_i64().unwrap(),
    );
    assert!((offset - 40_000_000).abs() <= bound, "{doc}");
    assert!(
        !ok.stderr.contains("readable by other users"),
        "{}",
        ok.stderr
    );

    for args in [
        vec![target.as_str(), "--key-file", &other, "--timeout", "200ms"],
        vec![target.as_str(), "--timeout", "200ms"],
    ] {
        let out = fient(&args);
        assert_eq!(out.code(), Some(1), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr
                .starts_with(&format!("fient: no answer from {target}")),
            "{}",
            out.stderr
        );
        if args.contains(&"--key-file") {
            assert!(
                out.stderr.contains("authentication may have failed"),
                "{}",
                out.stderr
            );
        }
        assert!(out.elapsed < Duration::from_secs(3), "{:?}", out.elapsed);
    }
    let (_, log) = server.stop();
    let stats = log
        .lines()
        .find(|l| l.contains("server stopped"))
        .unwrap_or_default();
    assert!(stats.contains("auth failed"), "{log}");
}

#[test]
fn bad_key_files_are_usage_errors_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.keys");
    std::fs::write(&bad, "1 not-hex\n").unwrap();
    let bad = bad.display().to_string();
    let missing = dir.path().join("missing.keys").display().to_string();
    for path in [&bad, &missing] {
        let out = fient(&["127.0.0.1:9", "--key-file", path]);
        assert_eq!(out.code(), Some(2), "{}", out.stderr);
        assert!(
            out.stderr.starts_with("fient: ") && out.stderr.contains(path.as_str()),
            "{}",
            out.stderr
        );
        let out = run(
            Command::new(bin("cerv")).args(["--listen", "127.0.0.1:0", "--key-file", path]),
            Duration::from_secs(10),
        );
        assert_eq!(out.code(), Some(2), "{}", out.stderr);
        assert!(out.stderr.contains(path.as_str()), "{}", out.stderr);
    }
    let out = fient(&["127.0.0.1:9", "--key-file", &bad]);
    assert!(
        out.stderr.contains("line 1: secret must be 64 hex digits"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_key_file_others_can_read_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let path = key_file(&dir, "open.keys", 2);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let server = Cerv::start(&["--key-file", &path]);
    let out = fient(&[&server.target(), "--key-file", &path]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("readable by other users"),
        "{}",
        out.stderr
    );
    assert!(server.log().contains("readable by other users"));
}

/// SIGHUP reads the key file again: a key taken out stops working, the one
/// put in works, over UDP and TCP alike, and a file that does not load
/// keeps the keys in force.
#[test]
fn a_hangup_rereads_the_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let old = key_file(&dir, "old.keys", 1);
    let new = key_file(&dir, "new.keys", 2);
    let served = dir.path().join("served.keys");
    std::fs::copy(&old, &served).unwrap();
    let server = Cerv::start(&[
        "--key-file",
        served.to_str().unwrap(),
        "--tcp-listen",
        "127.0.0.1:0",
    ]);
    let targets = [server.target(), server.tcp_target()];
    let syncs = |key: &str| {
        targets
            .iter()
            .map(|t| fient(&[t, "--key-file", key, "--timeout", "300ms"]).code() == Some(0))
            .collect::<Vec<_>>()
    };
    let hangup = || {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGHUP) };
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(syncs(&old), [true, true]);
    assert_eq!(syncs(&new), [false, false]);

    std::fs::copy(&new, &served).unwrap();
    hangup();
    assert_eq!(syncs(&new), [true, true], "the new key works after SIGHUP");
    assert_eq!(syncs(&old), [false, false], "the old one no longer does");

    std::fs::write(&served, "2 not-hex\n").unwrap();
    hangup();
    assert_eq!(
        syncs(&new),
        [true, true],
        "a bad file keeps the keys in force"
    );
    let (status, log) = server.stop();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
    assert!(log.contains("reloaded the key file"), "{log}");
    assert!(
        log.contains("line 1: secret must be 64 hex digits"),
        "{log}"
    );
}
