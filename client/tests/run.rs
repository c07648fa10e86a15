//! `fient`'s library run against an in-process server, with a settable test
//! clock standing in for the system clock.

use clap::Parser;
use client::cli::Args;
use client::{Exit, run};
use server::{Config, Server};
use service::clock::{Adjustment, Clock, OffsetClock, SystemClock};
use service::time::Nanos;
use std::sync::Arc;

async fn start_server(offset: Nanos) -> (String, server::Running) {
    let running = Server::spawn(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        offset,
        ..Config::default()
    })
    .await
    .unwrap();
    (running.addr.to_string(), running)
}

fn plan(args: &[&str]) -> client::cli::Plan {
    let mut argv = vec!["fient"];
    argv.extend_from_slice(args);
    Args::try_parse_from(argv).unwrap().plan().unwrap()
}

#[tokio::test]
async fn set_steps_the_clock_by_the_measured_offset() {
    let (addr, _stop) = start_server(Nanos::ZERO).await;
    // This clock is 250 ms behind the server (which runs on the system clock).
    let clock = Arc::new(OffsetClock::new(SystemClock, Nanos::from_millis(-250)));
    let mut out = Vec::new();
    run(
        &plan(&[&addr, "--set"]),
        clock.clone(),
        &mut out,
        std::future::pending(),
    )
    .await
    .expect("run");
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("clock ") && l.contains("stepped by +2")),
        "{text}"
    );

    let steps = clock.adjustments();
    let [Adjustment::Step(by)] = steps[..] else {
        panic!("expected one step, got {steps:?}");
    };
    assert!((by.as_nanos() - 250_000_000).abs() < 5_000_000, "{by}");
    // Now the clock agrees with the server within the measurement error.
    let left = SystemClock.now().diff_i128(clock.now()).abs();
    assert!(left < 5_000_000, "{left} ns left after the step");

    // Reporting alone changes nothing.
    let mut out = Vec::new();
    run(
        &plan(&[&addr, "--json"]),
        clock.clone(),
        &mut out,
        std::future::pending(),
    )
    .await
    .expect("run");
    assert_eq!(clock.adjustments().len(), 1);
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains(r#""clock":{"action":"none"}"#), "{text}");
}

#[tokio::test]
async fn a_clock_that_cannot_be_set_is_a_clean_error() {
    let (addr, _stop) = start_server(Nanos::from_millis(5)).await;
    // A skewed clock refuses to step: the report is still written.
    let clock: Arc<dyn Clock> = Arc::new(service::SkewedClock::new(SystemClock, Nanos::ZERO));
    let mut out = Vec::new();
    let failure = run(
        &plan(&[&addr, "--set", "--json"]),
        clock,
        &mut out,
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert_eq!(failure.exit, Exit::NoAnswer);
    assert!(
        failure.error.to_string().contains("cannot step"),
        "{}",
        failure.error
    );
    assert!(
        String::from_utf8(out)
            .unwrap()
            .contains(r#""action":"refused""#)
    );
}

#[tokio::test]
async fn set_and_slew_work_over_ntp_too() {
    let running = Server::spawn(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ntp_listen: vec!["127.0.0.1:0".parse().unwrap()],
        ntp: service::transport::face::NtpFace {
            local_stratum: Some(1),
            ..Default::default()
        },
        ..Config::default()
    })
    .await
    .unwrap();
    let target = format!("ntp://{}", running.ntp_addrs[0]);
    // --set: one step by the measured offset (the server runs on the
    // system clock; this clock is 250 ms behind it).
    let clock = Arc::new(OffsetClock::new(SystemClock, Nanos::from_millis(-250)));
    let mut out = Vec::new();
    run(
        &plan(&[&target, "--set"]),
        clock.clone(),
        &mut out,
        std::future::pending(),
    )
    .await
    .expect("run");
    let [Adjustment::Step(by)] = clock.adjustments()[..] else {
        panic!("expected one step, got {:?}", clock.adjustments());
    };
    assert!((by.as_nanos() - 250_000_000).abs() < 5_000_000, "{by}");
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("server ntp://"), "{text}");

    // --slew: 30 ms is under the step threshold, so it is slewed.
    let clock = Arc::new(OffsetClock::new(SystemClock, Nanos::from_millis(-30)));
    let mut out = Vec::new();
    run(
        &plan(&[&target, "--slew", "--json"]),
        clock.clone(),
        &mut out,
        std::future::pending(),
    )
    .await
    .expect("run");
    let [Adjustment::Slew(by)] = clock.adjustments()[..] else {
        panic!("expected one slew, got {:?}", clock.adjustments());
    };
    assert!((by.as_nanos() - 30_000_000).abs() < 5_000_000, "{by}");
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains(r#""protocol":"ntp""#), "{text}");
}
