//! End to end: every bad input ends with one clear line and the documented
//! exit code, never a panic or a hang.

use lab::{Cerv, bin, fient, json, run, without_clock_privilege};
use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

/// One line on stderr, starting with the program's name, and no panic.
fn assert_one_line(stderr: &str, program: &str, needle: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with(&format!("{program}: ")), "{stderr}");
    assert!(lines[0].contains(needle), "'{needle}' not in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A loopback port with nothing listening (bound, then released).
fn closed_port() -> String {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").to_string()
}

#[test]
fn bad_addresses_exit_2_naming_the_input() {
    for (addr, needle) in [
        (
            "127.0.0.1:99999",
            "cannot resolve server address '127.0.0.1:99999': invalid port",
        ),
        ("localhost:http", "invalid port 'http'"),
        ("127.0.0.1:0", "port 0"),
        ("a b", "invalid host name"),
    ] {
        let out = fient(&[addr]);
        assert_eq!(out.code(), Some(2), "{addr}: {}", out.stderr);
        assert_one_line(&out.stderr, "fient", needle);
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn bad_options_exit_2() {
    for args in [
        &["--probes", "0"][..],
        &["--timeout", "forever"][..],
        &["--estimator", "guess"][..],
        &["--no-such-flag"][..],
    ] {
        let out = fient(args);
        assert_eq!(out.code(), Some(2), "{args:?}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"));
    }
}

#[test]
fn a_stopped_server_means_exit_1_within_the_time_bound() {
    let server = Cerv::start(&[]);
    let target = server.target();
    drop(server); // killed: the port is closed now
    let out = fient(&[&target, "--timeout", "300ms"]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert_one_line(&out.stderr, "fient", &format!("no answer from {target}"));
    // Two probes' budgets at most, plus process start-up.
    assert!(
        out.elapsed < Duration::from_millis(2 * 300 + 1_000),
        "{:?}",
        out.elapsed
    );
}

#[test]
fn a_refused_port_is_explained() {
    let target = closed_port();
    let out = fient(&[&target, "--timeout", "200ms"]);
    assert_eq!(out.code(), Some(1));
    assert_one_line(&out.stderr, "fient", "connection refused");
}

#[test]
fn a_silent_server_means_exit_1_within_the_time_bound() {
    // A socket that reads and never answers: every request times out.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let target = silent.local_addr().expect("addr").to_string();
    let out = fient(&[&target, "--timeout", "250ms", "--json"]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert_one_line(&out.stderr, "fient", "every request timed out");
    let doc = json(&out.stdout);
    assert_eq!(doc["status"], "no_answer");
    assert!(
        out.elapsed < Duration::from_millis(2 * 250 + 1_000),
        "{:?}",
        out.elapsed
    );
}

#[test]
fn a_server_speaking_another_protocol_is_named() {
    // Echoes every datagram back: not a cerv reply.
    let echo = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let target = echo.local_addr().expect("addr").to_string();
    echo.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let echoer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = echo.recv_from(&mut buf) {
                    let _ = echo.send_to(&buf[..n], from);
                }
            }
        })
    };
    let out = fient(&[&target, "--timeout", "200ms"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = echoer.join();
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert_one_line(&out.stderr, "fient", "is this a cerv server?");
}

#[test]
fn a_busy_port_exits_1_and_a_bad_listen_address_2() {
    let first = Cerv::start(&[]);
    let out = run(
        Command::new(bin("cerv")).args(["--listen", &first.target()]),
        Duration::from_secs(10),
    );
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert_one_line(&out.stderr, "cerv", "address already in use");

    for (listen, needle) in [
        ("nowhere", "invalid --listen address 'nowhere'"),
        (
            "127.0.0.1:70000",
            "invalid --listen address '127.0.0.1:70000'",
        ),
    ] {
        let out = run(
            Command::new(bin("cerv")).args(["--listen", listen]),
            Duration::from_secs(10),
        );
        assert_eq!(out.code(), Some(2), "{listen}: {}", out.stderr);
        assert_one_line(&out.stderr, "cerv", needle);
    }
    let out = run(
        Command::new(bin("cerv")).args(["--offset", "soon"]),
        Duration::from_secs(10),
    );
    assert_eq!(out.code(), Some(2));
}

#[test]
fn cerv_stops_cleanly_on_sigterm() {
    let server = Cerv::start(&[]);
    let (status, log) = server.stop();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
    assert!(log.contains("server stopped"), "{log}");
}

#[test]
fn help_documents_exit_codes() {
    for program in ["cerv", "fient"] {
        let out = run(
            Command::new(bin(program)).arg("--help"),
            Duration::from_secs(10),
        );
        assert_eq!(out.code(), Some(0));
        assert!(
            out.stdout.contains("Exit codes:"),
            "{program}: {}",
            out.stdout
        );
        assert!(out.stdout.contains("77"));
    }
}

#[test]
fn set_without_permission_exits_77_and_changes_nothing() {
    let prefix = without_clock_privilege();
    // No skew: even if the sandbox were somehow defeated, the step would be
    // a few microseconds, not a visible jump on a shared machine.
    let server = Cerv::start(&[]);
    let fient_path = bin("fient");
    let mut argv: Vec<String> = prefix.clone();
    argv.push(fient_path.display().to_string());
    let target = server.target();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .args([target.as_str(), "--set", "--json"]);
    let out = run(&mut cmd, Duration::from_secs(30));
    assert_eq!(out.code(), Some(77), "prefix {prefix:?}: {}", out.stderr);
    assert_one_line(&out.stderr, "fient", "permission denied");
    let doc = json(&out.stdout);
    assert_eq!(doc["clock"]["action"], "refused");
    assert_eq!(doc["status"], "synced");
}
