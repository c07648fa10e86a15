//! NTP both ways, against programs no one here wrote: ntpdig and chronyd
//! ask cerv, fient asks chronyd. The peers come from `.ci/peers`; a test
//! whose peer is missing says so and passes without running, unless
//! `CERV_REQUIRE_PEERS=1` (see `lab::peers`).
//!
//! chronyd runs only with `-x` (never touches the clock) or `-Q` (asks
//! only), on ports of its own, and is killed when the test ends.

use lab::peers::{Chronyd, Peer, chronyd_query, faketime_env, free_udp_port};
use lab::{Cerv, fient, json, run};
use std::process::Command;
use std::time::Duration;

const MS: f64 = 1e-3;

/// A cerv whose NTP face answers on `ntp` with a known skew, vouching
/// for its (undisciplined) clock as stratum 1.
fn cerv_ntp(ntp: &str, offset: &str) -> Cerv {
    Cerv::start(&[
        "--offset",
        offset,
        "--ntp-listen",
        ntp,
        "--ntp-stratum",
        "1",
    ])
}

#[test]
fn ntpdig_measures_cerv() {
    let Some(ntpdig) = Peer::Ntpdig.require("ntpdig_measures_cerv") else {
        return;
    };
    // ntpdig asks port 123 only: give cerv an address of its own there
    // (any 127/8 address is this machine's loopback).
    let ip = format!(
        "127.0.{}.{}",
        100 + std::process::id() % 100,
        1 + std::process::id() % 200
    );
    let cerv = cerv_ntp(&format!("{ip}:123"), "+250ms");
    let out = run(
        Command::new(&ntpdig).args(["-j", "-t", "2", &ip]),
        Duration::from_secs(15),
    );
    assert_eq!(out.code(), Some(0), "ntpdig: {}{}", out.stdout, out.stderr);
    let doc = json(&out.stdout);
    let offset = doc["offset"].as_f64().expect("offset");
    let precision = doc["precision"].as_f64().expect("precision");
    eprintln!("ntpdig: {}", out.stdout.trim());
    // ntpdig prints microseconds; its own error bound is `precision`.
    assert!(
        (offset - 250.0 * MS).abs() <= precision + 20e-6,
        "ntpdig says {offset} s ± {precision}, cerv is 250 ms ahead"
    );
    assert_eq!(doc["stratum"], 1);
    assert_eq!(doc["leap"], "no-leap");
    drop(cerv);
}

#[test]
fn ntpdig_refuses_an_unsynchronised_cerv() {
    let Some(ntpdig) = Peer::Ntpdig.require("ntpdig_refuses_an_unsynchronised_cerv") else {
        return;
    };
    // Without --ntp-stratum, a clock the kernel calls unsynchronised is
    // served as such (this machine's kernel clock is undisciplined; where
    // a daemon disciplines it, the test only checks that ntpdig answers).
    let kernel = service::clock::kernel_clock().expect("adjtimex");
    let ip = format!(
        "127.0.{}.{}",
        1 + std::process::id() % 99,
        1 + std::process::id() % 200
    );
    let cerv = Cerv::start(&["--ntp-listen", &format!("{ip}:123")]);
    let out = run(
        Command::new(&ntpdig).args(["-j", "-t", "1", &ip]),
        Duration::from_secs(15),
    );
    if kernel.synchronized {
        assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    } else {
        assert_ne!(
            out.code(),
            Some(0),
            "ntpdig accepted an unsynchronised server: {}",
            out.stdout
        );
    }
    drop(cerv);
}

#[test]
fn chronyd_query_measures_cerv() {
    let Some(chronyd) = Peer::Chronyd.require("chronyd_query_measures_cerv") else {
        return;
    };
    let cerv = cerv_ntp("127.0.0.1:0", "+250ms");
    let ntp = cerv.ntp_addrs[0];
    let conf = format!(
        "server {} port {} iburst minpoll -4 maxpoll -4 maxsamples 4\nport 0\n",
        ntp.ip(),
        ntp.port()
    );
    let out = chronyd_query(&chronyd, &conf, Duration::from_secs(15));
    let all = format!("{}{}", out.stdout, out.stderr);
    eprintln!("chronyd -Q: {}", all.trim());
    // "System clock wrong by 0.249991 seconds (ignored)"
    let wrong_by: f64 = all
        .split("System clock wrong by ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no measurement in chronyd's output: {all}"));
    assert!(
        (wrong_by - 250.0 * MS).abs() < 0.5 * MS,
        "chronyd -Q says {wrong_by} s, cerv is 250 ms ahead"
    );
}

#[test]
fn a_chronyd_daemon_selects_cerv() {
    let (Some(chronyd), Some(chronyc)) = (
        Peer::Chronyd.require("a_chronyd_daemon_selects_cerv"),
        Peer::Chronyc.require("a_chronyd_daemon_selects_cerv"),
    ) else {
        return;
    };
    let cerv = cerv_ntp("127.0.0.1:0", "+250ms");
    let ntp = cerv.ntp_addrs[0];
    let conf = format!(
        "server {} port {} iburst minpoll -4 maxpoll -4\nport 0\n",
        ntp.ip(),
        ntp.port()
    );
    let daemon = Chronyd::start(&chronyd, Some(chronyc), &conf, &[]);
    // `chronyc -c sources`: mode, state, name, stratum, poll, reach,
    // last rx, last offset, offset, error. State '*' is the selected one.
    let (selected, sources) = daemon.wait_for(&["-c", "sources"], Duration::from_secs(20), |out| {
        out.lines().any(|l| l.split(',').nth(1) == Some("*"))
    });
    eprintln!("chronyc sources: {sources}\nchronyd log: {}", daemon.log());
    assert!(selected, "chronyd did not select cerv: {sources}");
    let line = sources
        .lines()
        .find(|l| l.split(',').nth(1) == Some("*"))
        .unwrap_or_default();
    let fields: Vec<&str> = line.split(',').collect();
    assert_eq!(fields[2], ntp.ip().to_string());
    // With -x chronyd folds what it measured into its own idea of the
    // time, so its samples soon read near zero; its tracking keeps the
    // whole: the system clock is 0.25 s slow of NTP time.
    assert_tracks_250ms_slow(&daemon);
}

/// Checks `chronyc -c tracking`: the system time field (the fifth: seconds,
/// negative when the system clock is slow) says 0.25 s slow.
fn assert_tracks_250ms_slow(daemon: &Chronyd) {
    let tracking = daemon.chronyc(&["-c", "tracking"]);
    let fields: Vec<&str> = tracking.stdout.trim().split(',').collect();
    let system_time: f64 = fields
        .get(4)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no system time in {}", tracking.stdout));
    assert!(
        (system_time.abs() - 250.0 * MS).abs() < 1.0 * MS,
        "chronyd's system time is {system_time} s off NTP time: {}",
        tracking.stdout
    );
}

#[test]
fn fient_measures_a_chronyd_server() {
    let (Some(chronyd), Some(faketime)) = (
        Peer::Chronyd.require("fient_measures_a_chronyd_server"),
        Peer::Faketime.require("fient_measures_a_chronyd_server"),
    ) else {
        return;
    };
    let port = free_udp_port("127.0.0.1");
    // A chronyd server 1.5 s ahead (libfaketime), vouching for its clock.
    let conf = format!(
        "port {port}\nbindaddress 127.0.0.1\nallow 127.0.0.1\nlocal stratum 1\nacquisitionport 0\n"
    );
    let daemon = Chronyd::start(&chronyd, None, &conf, &faketime_env(&faketime, "+1.5"));
    assert!(
        daemon.wait_for_log("chronyd version", Duration::from_secs(10)),
        "chronyd did not start: {}",
        daemon.log()
    );
    let target = format!("ntp://127.0.0.1:{port}");
    // It may take a moment to bind: retry a few times.
    let mut out = fient(&[&target, "--json"]);
    for _ in 0..20 {
        if out.code() == Some(0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
        out = fient(&[&target, "--json"]);
    }
    assert_eq!(
        out.code(),
        Some(0),
        "fient: {}\nchronyd: {}",
        out.stderr,
        daemon.log()
    );
    let doc = json(&out.stdout);
    eprintln!("fient vs chronyd: {}", out.stdout.trim());
    let offset = doc["offset_ns"].as_i64().unwrap();
    let bound = doc["error_bound_ns"].as_i64().unwrap();
    assert!(
        (offset - 1_500_000_000).abs() <= bound,
        "offset {offset} ns is not 1.5 s within ±{bound} ns"
    );
    assert!(
        bound < 1_000_000,
        "bound {bound} ns is not a loopback bound"
    );
    assert_eq!(doc["protocol"], "ntp");
    assert_eq!(doc["stratum"], 1);
    assert!(doc["root_dispersion_ns"].as_i64().is_some());
    let text = fient(&[&target]);
    assert_eq!(text.code(), Some(0), "{}", text.stderr);
    assert!(
        text.stdout.contains("server clock        stratum 1"),
        "{}",
        text.stdout
    );
}

#[test]
fn fient_speaks_ntp_to_cerv_in_every_mode() {
    let cerv = cerv_ntp("127.0.0.1:0", "-40ms");
    let target = cerv.ntp_target();
    let out = fient(&[&target, "--json"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let doc = json(&out.stdout);
    let (offset, bound) = (
        doc["offset_ns"].as_i64().unwrap(),
        doc["error_bound_ns"].as_i64().unwrap(),
    );
    assert!((offset + 40_000_000).abs() <= bound, "{doc}");
    assert_eq!(doc["protocol"], "ntp");
    assert_eq!(doc["samples_used"], 5);
    assert_eq!(doc["stratum"], 1);
    assert_eq!(doc["reference_id"], "127.127.1.1");
    assert_eq!(doc["leap"], "none");
    // The classic flow maps onto an NTP exchange.
    assert!(doc["server_time"].is_string(), "{doc}");
    assert!(doc["estimates"]["mean-delay"].is_object(), "{doc}");

    let watch = fient(&[&target, "--watch", "100ms", "--count", "3", "--json"]);
    assert_eq!(watch.code(), Some(0), "{}", watch.stderr);
    let lines: Vec<serde_json::Value> = watch.stdout.lines().map(json).collect();
    assert_eq!(lines.len(), 3);
    for line in &lines {
        assert_eq!(line["status"], "synced");
        assert_eq!(line["protocol"], "ntp");
        let (o, b) = (
            line["offset_ns"].as_i64().unwrap(),
            line["error_bound_ns"].as_i64().unwrap(),
        );
        assert!((o + 40_000_000).abs() <= b, "{line}");
    }
}

#[test]
fn fient_reports_an_unsynchronised_ntp_server() {
    let kernel = service::clock::kernel_clock().expect("adjtimex");
    if kernel.synchronized {
        eprintln!("SKIPPED: this machine's kernel clock is synchronised");
        return;
    }
    let cerv = Cerv::start(&["--ntp-listen", "127.0.0.1:0"]);
    let out = fient(&[&cerv.ntp_target(), "--json"]);
    assert_eq!(out.code(), Some(1), "{}", out.stdout);
    let doc = json(&out.stdout);
    assert_eq!(doc["status"], "unsynchronized");
    let human = fient(&[&cerv.ntp_target()]);
    assert!(
        human
            .stderr
            .contains("not synchronised (leap 3, stratum 16)"),
        "{}",
        human.stderr
    );
    // It answered at once: one request, no waiting for timeouts.
    assert!(
        human.elapsed < Duration::from_millis(400),
        "{:?}",
        human.elapsed
    );
}
