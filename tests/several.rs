//! Several servers at once, end to end: the real `fient` against several
//! real `cerv`s, some of them lying, silent or far away.

use lab::relay::{Direction, Impairment, Relay};
use lab::{Cerv, fient, json};
use std::time::Duration;

const MS: i64 = 1_000_000;

fn int(v: &serde_json::Value, k: &str) -> i64 {
    v[k].as_i64()
        .unwrap_or_else(|| panic!("{k} missing or not an integer in {v}"))
}

/// The `sources` entry named `name`.
fn source<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["sources"]
        .as_array()
        .expect("sources")
        .iter()
        .find(|s| s["source"] == name)
        .unwrap_or_else(|| panic!("no source {name} in {doc}"))
}

#[test]
fn three_honest_servers_outvote_a_liar() {
    let honest: Vec<Cerv> = (0..3)
        .map(|_| Cerv::start(&["--offset", "+250ms"]))
        .collect();
    let liar = Cerv::start(&["--offset", "+1250ms"]);
    let mut args: Vec<String> = honest.iter().map(Cerv::target).collect();
    args.push(liar.target());
    args.push("--json".into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = fient(&argv);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let doc = json(&out.stdout);
    assert_eq!(doc["status"], "synced");
    assert_eq!((int(&doc, "answered"), int(&doc, "agreeing")), (4, 3));
    assert_eq!(int(&doc, "needed"), 3);
    assert_eq!(source(&doc, &liar.target())["status"], "falseticker");
    let (offset, bound) = (int(&doc, "offset_ns"), int(&doc, "error_bound_ns"));
    assert!((offset - 250 * MS).abs() <= bound, "{doc}");
    // Within the honest servers' own bounds (the combined interval is no
    // wider than what any one of them allows, here).
    let widest_honest = honest
        .iter()
        .map(|c| int(source(&doc, &c.target()), "error_bound_ns"))
        .max()
        .unwrap();
    assert!(
        bound <= 2 * widest_honest,
        "{bound} vs {widest_honest}: {doc}"
    );
    for c in &honest {
        let status = &source(&doc, &c.target())["status"];
        assert!(status == "selected" || status == "agrees", "{status}");
    }

    // The human table says the same.
    let human = fient(&argv[..argv.len() - 1]);
    assert_eq!(human.code(), Some(0));
    let liar_row = human
        .stdout
        .lines()
        .find(|l| l.contains(&liar.target()))
        .expect("a row for the liar");
    assert!(
        liar_row.starts_with('x') && liar_row.ends_with("falseticker"),
        "{liar_row}"
    );
    assert!(
        human
            .stdout
            .contains("(3 of 4 agree, 3 needed; weighted-mean)"),
        "{}",
        human.stdout
    );
}

#[test]
fn two_against_two_is_no_answer() {
    let servers: Vec<Cerv> = ["+0ms", "+0ms", "+1s", "+1s"]
        .iter()
        .map(|o| Cerv::start(&["--offset", o]))
        .collect();
    let targets: Vec<String> = servers.iter().map(Cerv::target).collect();
    let mut argv: Vec<&str> = targets.iter().map(String::as_str).collect();
    let human = fient(&argv);
    assert_eq!(human.code(), Some(1), "{}", human.stdout);
    // Both groups are shown, in the table and in the error.
    assert_eq!(
        human.stdout.matches("no majority (group 1)").count(),
        2,
        "{}",
        human.stdout
    );
    assert_eq!(
        human.stdout.matches("no majority (group 2)").count(),
        2,
        "{}",
        human.stdout
    );
    assert!(
        human
            .stderr
            .contains("the sources disagree: 3 of the 4 that answered must agree, at most 2 do"),
        "{}",
        human.stderr
    );
    assert!(human.stderr.contains(" against "), "{}", human.stderr);

    argv.push("--json");
    let out = fient(&argv);
    assert_eq!(out.code(), Some(1));
    let doc = json(&out.stdout);
    assert_eq!(doc["status"], "no_majority");
    assert!(doc["offset_ns"].is_null());
    let groups: Vec<i64> = doc["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| int(s, "group"))
        .collect();
    assert_eq!(groups.iter().filter(|&&g| g == 1).count(), 2);
    assert_eq!(groups.iter().filter(|&&g| g == 2).count(), 2);
}

#[test]
fn a_dead_server_costs_one_timeout_and_is_reported() {
    let a = Cerv::start(&["--offset", "+5ms"]);
    let b = Cerv::start(&["--offset", "+5ms"]);
    // A port nothing answers on, without an ICMP refusal either: a UDP
    // socket we hold open and never read.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead = silent.local_addr().unwrap().to_string();
    let out = fient(&[
        &a.target(),
        &b.target(),
        &dead,
        "--json",
        "--timeout",
        "300ms",
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let doc = json(&out.stdout);
    assert_eq!((int(&doc, "answered"), int(&doc, "agreeing")), (2, 2));
    let d = source(&doc, &dead);
    assert_eq!(d["status"], "no_answer");
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("every request timed out"),
        "{d}"
    );
    // Asked at once: the dead one costs its own give-up time (two
    // timeouts), not the sum of everyone's.
    let elapsed = Duration::from_nanos(int(&doc, "elapsed_ns") as u64);
    assert!(
        elapsed < Duration::from_millis(2 * 300 + 250),
        "{elapsed:?}"
    );
    assert!(elapsed >= Duration::from_millis(2 * 300), "{elapsed:?}");
}

#[test]
fn mixed_wires_agree_and_combine() {
    let udp = Cerv::start(&["--offset", "-70ms"]);
    let ntp = Cerv::start(&[
        "--offset",
        "-70ms",
        "--ntp-listen",
        "127.0.0.1:0",
        "--ntp-stratum",
        "2",
    ]);
    let tcp = Cerv::start(&["--offset", "-70ms", "--tcp-listen", "127.0.0.1:0"]);
    let tcp_target = format!("tcp://{}", tcp_addr(&tcp));
    let out = fient(&[&udp.target(), &ntp.ntp_target(), &tcp_target, "--json"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let doc = json(&out.stdout);
    assert_eq!(int(&doc, "agreeing"), 3, "{doc}");
    let protocols: Vec<&str> = doc["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["protocol"].as_str().unwrap())
        .collect();
    assert_eq!(protocols, ["cerv", "ntp", "tcp"]);
    assert_eq!(source(&doc, &ntp.ntp_target())["stratum"], 2);
    let (offset, bound) = (int(&doc, "offset_ns"), int(&doc, "error_bound_ns"));
    assert!((offset + 70 * MS).abs() <= bound, "{doc}");
}

/// The TCP address of a cerv started with `--tcp-listen`, from its log.
fn tcp_addr(cerv: &Cerv) -> String {
    cerv.log()
        .lines()
        .find_map(|l| l.split("serving tcp on ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("cerv logs its TCP address")
        .to_string()
}

#[test]
fn a_wide_source_weighs_less_than_a_tight_one() {
    // Every server runs on this machine's clock, +250 ms. One is asked
    // directly (a bound of microseconds); two others through relays with
    // 3 ms out and 0.5 ms back, whose estimates are off by 1.25 ms (half
    // the asymmetry) inside bounds of about 1.75 ms. With three sources
    // two must agree, so the majority allows the two wide ones' whole
    // overlap: where in it the answer lands is up to the combining rule.
    let tight = Cerv::start(&["--offset", "+250ms"]);
    let far = Cerv::start(&["--offset", "+250ms"]);
    let asymmetric = Impairment {
        to_server: Direction::delay(Duration::from_millis(3)),
        to_client: Direction::delay(Duration::from_micros(500)),
    };
    let relays: Vec<Relay> = (0..2)
        .map(|seed| Relay::start(far.addr, asymmetric, seed).expect("relay"))
        .collect();
    let far_targets: Vec<String> = relays.iter().map(|r| r.addr().to_string()).collect();
    for (combine, near_tight) in [("weighted-mean", true), ("midpoint", false)] {
        let out = fient(&[
            &tight.target(),
            &far_targets[0],
            &far_targets[1],
            "--json",
            "--combine",
            combine,
        ]);
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        let doc = json(&out.stdout);
        assert_eq!(int(&doc, "agreeing"), 3, "{doc}");
        let combined = int(&doc, "offset_ns");
        let tight_offset = int(source(&doc, &tight.target()), "offset_ns");
        let far_offset = int(source(&doc, &far_targets[0]), "offset_ns");
        assert!((far_offset - tight_offset).abs() > 500_000, "{doc}");
        // Weighted by 1/bound², the tight source (µs) outweighs the wide
        // ones (ms) a million to one.
        let toward_tight = (combined - tight_offset).abs() < (far_offset - tight_offset).abs() / 20;
        assert_eq!(toward_tight, near_tight, "{combine}: {doc}");
        assert!(
            (combined - 250 * MS).abs() <= int(&doc, "error_bound_ns"),
            "{doc}"
        );
    }
}

#[test]
fn a_watch_reports_a_source_that_falls_silent_once() {
    let a = Cerv::start(&["--offset", "+5ms"]);
    let b = Cerv::start(&["--offset", "+5ms"]);
    let c = Cerv::start(&["--offset", "+5ms"]);
    let gone = c.target();
    let args: Vec<String> = [
        &a.target(),
        &b.target(),
        &gone,
        "--watch",
        "100ms",
        "--count",
        "20",
        "--timeout",
        "50ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let watcher = std::thread::spawn(move || {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        fient(&argv)
    });
    std::thread::sleep(Duration::from_millis(700));
    let (_, _) = c.stop();
    let out = watcher.join().unwrap();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let changes: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains(&format!(" {gone}: ")))
        .collect();
    assert_eq!(changes.len(), 1, "{}", out.stdout);
    assert!(changes[0].contains("no answer (was "), "{}", changes[0]);
    // Every round still synced from the two that answer.
    let synced = out
        .stdout
        .lines()
        .filter(|l| l.contains("(2 of 2 agree)") || l.contains("(3 of 3 agree)"))
        .count();
    assert_eq!(synced, 20, "{}", out.stdout);
}
