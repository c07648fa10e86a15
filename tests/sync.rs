//! End to end: the real `cerv` and `fient` over loopback, measuring a
//! server whose clock is skewed by a known amount.

use lab::{Cerv, fient, json};
use std::net::UdpSocket;
use std::time::Duration;

const MS: i64 = 1_000_000;

/// Runs `fient --json` against `server`, checks it synced, returns the document.
fn sync_json(server: &Cerv, extra: &[&str]) -> serde_json::Value {
    let target = server.target();
    let mut args = vec![target.as_str(), "--json"];
    args.extend_from_slice(extra);
    let out = fient(&args);
    assert_eq!(out.code(), Some(0), "fient failed: {}", out.stderr);
    json(&out.stdout)
}

fn int(doc: &serde_json::Value, field: &str) -> i64 {
    doc[field]
        .as_i64()
        .unwrap_or_else(|| panic!("{field} missing or not an integer in {doc}"))
}

/// The offset is the truth within the stated bound, and the bound is tight.
fn assert_measures(doc: &serde_json::Value, truth_ns: i64, max_bound_ns: i64) {
    let offset = int(doc, "offset_ns");
    let bound = int(doc, "error_bound_ns");
    assert!(
        (offset - truth_ns).abs() <= bound,
        "offset {offset} ns is not within ±{bound} ns of the truth {truth_ns} ns: {doc}"
    );
    assert!(bound < max_bound_ns, "bound {bound} ns too wide: {doc}");
    assert!(int(doc, "offset_low_ns") <= truth_ns && truth_ns <= int(doc, "offset_high_ns"));
}

#[test]
fn measures_a_server_250ms_ahead() {
    for dispatch in ["inline", "channels"] {
        measures_250ms_ahead(dispatch);
    }
}

fn measures_250ms_ahead(dispatch: &str) {
    let server = Cerv::start(&["--offset", "+250ms", "--dispatch", dispatch]);
    let doc = sync_json(&server, &[]);
    assert_measures(&doc, 250 * MS, 5 * MS);
    assert_eq!(doc["status"], "synced");
    assert_eq!(doc["server"], server.target());
    assert_eq!(int(&doc, "samples_used"), 5);
    assert_eq!(doc["probes"].as_array().map(Vec::len), Some(5));
    // The seeds' figures are there and sane.
    assert!(int(&doc, "mean_delay_ns") >= 0);
    assert!(int(&doc, "min_rtt_ns") >= 0);
    assert!(int(&doc, "mean_delay_ns") * 2 >= int(&doc, "min_rtt_ns"));
    // Every estimator contains the truth.
    for (name, e) in doc["estimates"].as_object().expect("estimates") {
        let (o, b) = (int(e, "offset_ns"), int(e, "error_bound_ns"));
        assert!((o - 250 * MS).abs() <= b, "{name}: {e}");
    }
}

#[test]
fn measures_a_server_behind() {
    let server = Cerv::start(&["--offset", "-1.5s"]);
    let doc = sync_json(&server, &["--probes", "3"]);
    assert_measures(&doc, -1500 * MS, 5 * MS);
    assert_eq!(int(&doc, "samples_used"), 3);
}

#[test]
fn each_probe_satisfies_the_formulas() {
    let server = Cerv::start(&["--offset", "+250ms"]);
    let doc = sync_json(&server, &[]);
    for p in doc["probes"].as_array().expect("probes") {
        let (t1, t2, t3, t4) = (int(p, "ts1"), int(p, "ts2"), int(p, "ts3"), int(p, "ts4"));
        let rtt = (t4 - t1) - (t3 - t2);
        assert_eq!(int(p, "rtt_ns"), rtt);
        assert_eq!(int(p, "delay_ns"), rtt / 2);
        assert!(((t2 - t1) + (t3 - t4) - 2 * int(p, "offset_ns")).abs() <= 1);
        // Cristian: each sample alone is within rtt/2 of the truth.
        assert!((int(p, "offset_ns") - 250 * MS).abs() <= rtt / 2 + 1, "{p}");
    }
    // The classic flow: synchronized time is the server's now() plus the mean delay.
    let flow = fient(&[&server.target(), "--json", "--estimator", "mean-delay"]);
    let flow = json(&flow.stdout);
    let now = &flow["now"];
    let synced = int(now, "server_time") + int(&flow, "mean_delay_ns");
    let local = int(now, "received");
    assert_eq!(int(&flow, "offset_ns"), synced - local);
    assert_eq!(flow["estimator"], "mean-delay");
    assert_measures(&flow, 250 * MS, 5 * MS);
}

#[test]
fn processing_delay_does_not_move_the_offset() {
    for dispatch in ["inline", "channels"] {
        processing_delay_removed(dispatch);
    }
}

fn processing_delay_removed(dispatch: &str) {
    let server = Cerv::start(&[
        "--offset",
        "+250ms",
        "--processing-delay",
        "20ms",
        "--dispatch",
        dispatch,
    ]);
    let doc = sync_json(&server, &[]);
    assert_measures(&doc, 250 * MS, 5 * MS);
    for p in doc["probes"].as_array().expect("probes") {
        // The server really held each probe for 20 ms...
        assert!(int(p, "ts3") - int(p, "ts2") >= 20 * MS, "{p}");
        // ...and that time is not counted as network delay.
        assert!(int(p, "rtt_ns") < 5 * MS, "{p}");
    }
    // The classic flow's bound honestly includes now()'s 20 ms.
    let flow = sync_json(&server, &["--estimator", "mean-delay"]);
    assert_measures(&flow, 250 * MS, 30 * MS);
}

#[test]
fn two_clients_at_once_both_get_correct_answers() {
    let server = Cerv::start(&["--offset", "+42ms"]);
    let target = server.target();
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let target = target.clone();
            std::thread::spawn(move || fient(&[&target, "--json", "--probes", "20"]))
        })
        .collect();
    for h in handles {
        let out = h.join().expect("thread");
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        let doc = json(&out.stdout);
        assert_measures(&doc, 42 * MS, 5 * MS);
        assert_eq!(int(&doc, "samples_used"), 20);
    }
}

#[test]
fn garbage_and_oversized_datagrams_leave_it_answering() {
    let server = Cerv::start(&["--offset", "+7ms"]);
    // From another address than fient's: the junk also runs into its
    // source's rate limit, which must not touch other clients.
    let sock = UdpSocket::bind("127.0.0.2:0").expect("bind");
    sock.connect(server.addr).expect("connect");
    let mut valid = vec![b'c', b'f', 1, 1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f, 1];
    valid.resize(48, 0);
    let junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        b"hello".to_vec(),
        vec![0xff; 48],
        vec![0x55; 2000],     // oversized
        vec![b'c'; 65_000],   // far oversized
        valid[..20].to_vec(), // truncated, unpadded
        {
            let mut v = valid.clone();
            v[2] = 9; // another version
            v
        },
        {
            let mut v = valid.clone();
            v[3] = 3; // a response sent to a server
            v
        },
        {
            let mut v = valid.clone();
            v[47] = 1; // non-zero padding
            v
        },
    ];
    for _ in 0..50 {
        for d in &junk {
            let _ = sock.send(d);
        }
    }
    // An absurd deadline (the largest the wire holds) is clamped, not trusted.
    let _ = sock.send(&valid);
    std::thread::sleep(Duration::from_millis(100));
    let doc = sync_json(&server, &[]);
    assert_measures(&doc, 7 * MS, 5 * MS);

    let (status, log) = server.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "cerv did not stop cleanly: {log}"
    );
    let stats = log
        .lines()
        .find(|l| l.contains("server stopped"))
        .unwrap_or_else(|| panic!("no final stats in log: {log}"));
    for counter in ["oversized", "unpadded", "malformed"] {
        assert!(stats.contains(counter), "{counter} not counted: {stats}");
    }
}
