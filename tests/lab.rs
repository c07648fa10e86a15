//! The lab's properties, end to end: the real binaries through the
//! impairment relay. The tight figures live in the `lab` benchmark; these
//! checks hold with margins that do not flake on a busy 2-core machine.

use lab::accuracy::{self, Run};
use lab::relay::{Direction, Impairment, Relay};
use lab::scenario;
use lab::{Cerv, fient, json};
use service::source::Wire;
use std::time::Duration;

const RUNS: usize = 3;

fn measure(name: &str) -> Vec<Run> {
    let s = scenario::named(name).expect("scenario");
    accuracy::measure(&s, RUNS, 7, &[])
}

/// Every run synced, every bound held, and no sample lies outside
/// Cristian's wedge (a reply matched to the wrong request would).
fn assert_honest(name: &str, runs: &[Run]) {
    for r in runs {
        assert!(r.synced, "{name}: a run failed: {}", r.stderr);
        assert!(r.contained, "{name}: the bound missed the truth: {}", r.raw);
        for (estimator, &(_, _, contained)) in &r.estimates {
            assert!(
                contained,
                "{name}/{estimator}: the bound missed the truth: {}",
                r.raw
            );
        }
        for &(rtt, err) in &r.probes {
            assert!(
                err.abs() <= rtt / 2 + 1,
                "{name}: sample outside the wedge: {}",
                r.raw
            );
        }
    }
}

#[test]
fn symmetric_delay_is_removed() {
    let runs = measure("sym");
    assert_honest("sym", &runs);
    for r in &runs {
        // 1 ms ± 0.1 ms each way: the bound is about 1 ms, the error far less.
        assert!(r.bound_ns < 1_500_000, "{}", r.raw);
        assert!(r.error_ns.abs() < 300_000, "{}", r.raw);
    }
}

#[test]
fn asymmetry_shows_as_half_its_size_inside_the_bound() {
    let runs = measure("asym");
    assert_honest("asym", &runs);
    for r in &runs {
        // 3 ms out, 0.5 ms back: any two-way method reads 1.25 ms high.
        assert!((r.error_ns - 1_250_000).abs() < 300_000, "{}", r.raw);
    }
}

#[test]
fn loss_is_survived_every_time() {
    let runs = measure("lossy");
    assert_honest("lossy", &runs);
    let lost: u64 = runs.iter().map(|r| r.lost).sum();
    assert!(lost > 0, "20 % loss each way, yet nothing was lost");
    for r in &runs {
        // Far inside the documented worst case of (probes + 1) x timeout.
        assert!(r.wall < Duration::from_secs(2), "{:?}", r.wall);
    }
}

#[test]
fn jitter_keeps_the_bound_honest() {
    let runs = measure("jitter");
    assert_honest("jitter", &runs);
}

#[test]
fn duplicated_and_reordered_datagrams_are_harmless() {
    let runs = measure("dup");
    assert_honest("dup", &runs);
}

#[test]
fn every_datagram_lost_is_a_clean_failure() {
    let cerv = Cerv::start(&[]);
    let blackhole = Impairment::symmetric(Direction::CLEAN.loss(1.0));
    let relay = Relay::start(cerv.addr, blackhole, 1).expect("relay");
    let out = fient(&[&relay.addr().to_string(), "--json", "--timeout", "200ms"]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert_eq!(json(&out.stdout)["status"], "no_answer");
    assert!(out.elapsed < Duration::from_secs(3));
}

#[test]
fn tcp_and_tls_through_the_stream_relay_stay_honest() {
    for wire in [Wire::Tcp, Wire::Tls] {
        for name in ["sym", "asym"] {
            let s = scenario::named(name).expect("scenario");
            let runs = accuracy::measure_wire(&s, wire, 2, 7, &[], &[]);
            let label = format!("{name} over {wire}");
            assert_honest(&label, &runs);
            for r in &runs {
                // The relay's delay is in every probe (at least 1.8 ms
                // both ways); the connection and its handshake came before
                // the first (the lab's table compares their sizes).
                for &(rtt, _) in &r.probes {
                    assert!(rtt > 1_700_000, "{label}: a probe of {rtt} ns: {}", r.raw);
                }
                assert!(r.setup_ns.is_some(), "{label}: {}", r.raw);
            }
            if name == "asym" {
                for r in &runs {
                    assert!(
                        (r.error_ns - 1_250_000).abs() < 300_000,
                        "{label}: {}",
                        r.raw
                    );
                }
            }
        }
    }
}

#[test]
fn stream_wires_refuse_scenarios_they_cannot_have() {
    for name in ["lossy", "dup"] {
        let s = scenario::named(name).expect("scenario");
        assert!(accuracy::fits(&s, Wire::Cerv));
        assert!(!accuracy::fits(&s, Wire::Tcp), "{name}");
    }
    for name in ["lan", "sym", "asym", "jitter"] {
        let s = scenario::named(name).expect("scenario");
        assert!(accuracy::fits(&s, Wire::Tls), "{name}");
    }
}
