//! End to end: `fient --watch` and `--slew` with the real binaries. The
//! discipline itself is tested on simulated clocks (client/tests/watch.rs);
//! here the real system clock is only read, or refused.

use lab::{Cerv, bin, fient, json, run, without_clock_privilege};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn watch_reports_one_json_line_per_sync() {
    let server = Cerv::start(&["--offset", "+20ms"]);
    let out = fient(&[
        &server.target(),
        "--watch",
        "100ms",
        "--count",
        "5",
        "--json",
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let lines: Vec<_> = out.stdout.lines().map(json).collect();
    assert_eq!(lines.len(), 5);
    for l in &lines {
        assert_eq!(l["status"], "synced");
        assert_eq!(l["action"], "none");
        let (offset, bound) = (
            l["offset_ns"].as_i64().unwrap(),
            l["error_bound_ns"].as_i64().unwrap(),
        );
        assert!((offset - 20_000_000).abs() <= bound, "{l}");
    }
    // From the third sync on, the drift of this machine's clock against
    // itself (cerv runs on the same clock) is measured: about zero.
    let drift = lines[4]["drift_ppm"]
        .as_f64()
        .expect("drift after three syncs");
    assert!(drift.abs() < 100.0, "{drift}");
    assert!(
        out.elapsed > Duration::from_millis(350),
        "syncs are spaced: {:?}",
        out.elapsed
    );
}

#[test]
fn sigterm_ends_a_watch_cleanly() {
    let server = Cerv::start(&[]);
    let mut child = Command::new(bin("fient"))
        .args([&server.target(), "--watch", "50ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fient");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        let line = lines.next().expect("a line").expect("read");
        assert!(
            line.contains("offset +") || line.contains("offset -"),
            "{line}"
        );
    }
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "fient did not stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn slewing_without_permission_exits_77() {
    let prefix = without_clock_privilege();
    let server = Cerv::start(&[]);
    let fient_path = bin("fient").display().to_string();
    for extra in [
        &["--slew"][..],
        &["--slew", "--watch", "100ms", "--count", "3"][..],
    ] {
        let mut argv = prefix.clone();
        argv.push(fient_path.clone());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).arg(server.target()).args(extra);
        let out = run(&mut cmd, Duration::from_secs(30));
        assert_eq!(out.code(), Some(77), "{extra:?}: {}", out.stderr);
        assert!(out.stderr.contains("permission denied"), "{}", out.stderr);
        assert!(!out.stderr.contains("panicked"));
    }
}
