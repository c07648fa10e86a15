//! `--watch` against an in-process server, with a simulated clock standing
//! in for the system clock: the discipline must converge, and the watch
//! must ride out a server that goes away.

use clap::Parser;
use client::cli::Args;
use server::{Config, Server};
use service::clock::{Clock, OffsetClock, SimulatedClock, SystemClock};
use service::time::{Nanos, Timestamp};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

async fn serve(listen: SocketAddr) -> server::Running {
    Server::spawn(Config {
        listen,
        ..Config::default()
    })
    .await
    .unwrap()
}

fn plan(args: &[&str]) -> client::cli::Plan {
    let mut argv = vec!["fient"];
    argv.extend_from_slice(args);
    Args::try_parse_from(argv).unwrap().plan().unwrap()
}

fn lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slewing_converges_a_drifting_clock_without_a_step() {
    let server = serve("127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;
    // 400 µs ahead and 150 ppm fast.
    let clock = Arc::new(SimulatedClock::new(
        SystemClock,
        Nanos::from_micros(400),
        150_000,
    ));
    let mut out = Vec::new();
    let p = plan(&[
        &addr.to_string(),
        "--watch",
        "100ms",
        "--count",
        "40",
        "--slew",
        "--json",
    ]);
    client::run(&p, clock.clone(), &mut out, std::future::pending())
        .await
        .expect("watch");
    let lines = lines(&out);
    assert_eq!(lines.len(), 40);
    assert!(
        lines
            .iter()
            .all(|l| l["status"] == "synced" && l["action"] == "slewed"),
        "{lines:?}"
    );
    assert!(!clock.was_stepped());
    // The clock ends within 20 µs of the server, its rate within 5 ppm.
    assert!(
        clock.error().abs() < Nanos::from_micros(20),
        "{}",
        clock.error()
    );
    assert!(
        clock.rate_error_ppb().abs() < 5_000,
        "{} ppb",
        clock.rate_error_ppb()
    );
    let drift = lines.last().unwrap()["drift_ppm"].as_f64().unwrap();
    assert!((drift - 150.0).abs() < 5.0, "{drift}");
    // Converged: the offset stays within 20 µs from some sync on.
    let settled = lines
        .iter()
        .rposition(|l| l["offset_ns"].as_i64().unwrap().abs() > 20_000)
        .map_or(0, |i| i + 1);
    eprintln!(
        "converged after {settled} syncs of 100 ms; final error {}, rate error {} ppb, drift estimate {drift} ppm",
        clock.error(),
        clock.rate_error_ppb()
    );
    assert!(settled < 30, "not settled: {lines:?}");
}

/// The watch's output, readable while the watch is still writing it.
#[derive(Clone, Default)]
struct SharedOut(Arc<Mutex<Vec<u8>>>);

impl Write for SharedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedOut {
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (at most 20 s) until the complete lines written so far
    /// satisfy `done`.
    async fn until(&self, what: &str, done: impl Fn(&[serde_json::Value]) -> bool) {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let bytes = self.bytes();
            let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            if done(&lines(&bytes[..end])) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "waited 20 s for {what}: {}",
                String::from_utf8_lossy(&bytes)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn status(l: &serde_json::Value) -> &str {
    l["status"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporting_only_measures_the_drift_and_rides_out_an_absent_server() {
    let server = serve("127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;
    let clock = Arc::new(SimulatedClock::new(
        SystemClock,
        Nanos::from_millis(-2),
        -80_000,
    ));
    let p = plan(&[
        &addr.to_string(),
        "--watch",
        "50ms",
        "--count",
        "30",
        "--json",
        "--timeout",
        "50ms",
    ]);
    let shared = SharedOut::default();
    let watcher = {
        let clock = clock.clone();
        let mut out = shared.clone();
        tokio::spawn(async move { client::run(&p, clock, &mut out, std::future::pending()).await })
    };
    // The server goes away after a few syncs and comes back once the watch
    // has reported that it is gone: driven by what the watch writes, not
    // by sleeps, so a loaded machine cannot make the outage fall between
    // two syncs (a sync that has heard the server before keeps asking for
    // its whole budget, and under load that can outlast a fixed outage).
    shared.until("four syncs", |l| l.len() >= 4).await;
    server.stop().await;
    shared
        .until("a miss", |l| l.iter().any(|l| status(l) == "no_answer"))
        .await;
    let _back = serve(addr).await;
    watcher.await.unwrap().expect("watch");
    let out = shared.bytes();
    let lines = lines(&out);
    assert_eq!(lines.len(), 30);
    assert!(
        clock.adjustments().is_empty(),
        "reporting must not touch the clock"
    );
    let statuses: Vec<&str> = lines.iter().map(status).collect();
    let first_miss = statuses
        .iter()
        .position(|s| *s == "no_answer")
        .expect("a miss");
    let back = statuses.iter().rposition(|s| *s == "no_answer").unwrap() + 1;
    assert!(first_miss > 3 && back < 30, "{statuses:?}");
    // The wait grows while the server is away.
    let waits: Vec<u64> = lines
        .iter()
        .filter_map(|l| l["next_try_ms"].as_u64())
        .collect();
    assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
    // After it, the rate is measured again. The filter's frequency is
    // within the uncertainty it states; the discipline's drift, a least-
    // squares slope over its last 8 syncs (0.4 s at this interval), to
    // within 10 ppm: on a loaded machine a sample delayed by a couple of
    // microseconds moves that slope by about 5 ppm.
    let last = lines.last().unwrap();
    let frequency = last["frequency_ppm"].as_f64().unwrap();
    let uncertainty = last["frequency_uncertainty_ppm"].as_f64().unwrap();
    assert!((frequency + 80.0).abs() <= uncertainty, "{last}");
    let drift = last["drift_ppm"].as_f64().unwrap();
    assert!((drift + 80.0).abs() < 10.0, "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_step_is_followed_within_five_polls() {
    // The server's clock is ours until it jumps 10 ms ahead, mid-watch.
    let server_clock = Arc::new(OffsetClock::new(SystemClock, Nanos::ZERO));
    let server = Server::spawn(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        clock: Some(server_clock.clone()),
        ..Config::default()
    })
    .await
    .unwrap();
    let p = plan(&[
        &server.addr.to_string(),
        "--watch",
        "100ms",
        "--count",
        "30",
        "--json",
    ]);
    let watcher = tokio::spawn(async move {
        let mut out = Vec::new();
        client::run(&p, Arc::new(SystemClock), &mut out, std::future::pending())
            .await
            .map(|()| out)
    });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let stepped_at = SystemClock.now();
    server_clock.step(Nanos::from_millis(10)).unwrap();
    let out = watcher.await.unwrap().expect("watch");
    let lines = lines(&out);
    assert_eq!(lines.len(), 30);
    // Lines (by the local time their offset refers to) before and after
    // the step; a sync under way at the step itself is left out.
    let at = |l: &serde_json::Value| -> Timestamp { l["time"].as_str().unwrap().parse().unwrap() };
    let margin = 20_000_000;
    let before: Vec<_> = lines
        .iter()
        .filter(|l| stepped_at.diff_i128(at(l)) > margin)
        .collect();
    let after: Vec<(usize, &serde_json::Value)> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| at(l).diff_i128(stepped_at) > margin)
        .collect();
    assert!(
        before.len() >= 8 && after.len() >= 10,
        "{} before, {} after",
        before.len(),
        after.len()
    );
    let off = |l: &serde_json::Value| l["offset_ns"].as_i64().unwrap();
    let bound = |l: &serde_json::Value| l["error_bound_ns"].as_i64().unwrap();
    for l in &before {
        assert!(off(l).abs() <= bound(l), "before the step: {l}");
    }
    // Followed: within 5 polls the estimate is the new truth, and stays.
    let truth = 10_000_000;
    let followed = after
        .iter()
        .position(|(_, l)| (off(l) - truth).abs() < 50_000)
        .expect("never followed");
    assert!(
        followed < 5,
        "followed only after {followed} polls: {lines:?}"
    );
    for (_, l) in &after[followed..] {
        assert!((off(l) - truth).abs() < 50_000, "{l}");
    }
    // The step is seen, and no bound after it excludes the new truth for
    // more than those polls.
    assert!(
        after
            .iter()
            .take(3)
            .any(|(_, l)| l["step_detected"] == true),
        "{lines:?}"
    );
    let wrong: Vec<usize> = after
        .iter()
        .filter(|(_, l)| (off(l) - truth).abs() > bound(l))
        .map(|(i, _)| *i)
        .collect();
    assert!(
        wrong.len() < 5,
        "bounds that excluded the truth: lines {wrong:?}"
    );
    eprintln!(
        "step followed after {followed} polls; bounds excluding the truth after it: {}",
        wrong.len()
    );
}

/// The drift file: a disciplined watch writes the clock's frequency error
/// there, and the next one (a restart) sets the correction from it before
/// its first sync, instead of learning the crystal again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_starts_from_the_drift_file() {
    let server = serve("127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let drift = dir.path().join("drift");
    let args = |count: &'static str| {
        plan(&[
            &addr,
            "--watch",
            "100ms",
            "--count",
            count,
            "--slew",
            "--json",
            "--drift-file",
            drift.to_str().unwrap(),
        ])
    };
    // 150 ppm fast, no drift file yet: learnt over the syncs, written down.
    let first = Arc::new(SimulatedClock::new(SystemClock, Nanos::ZERO, 150_000));
    client::run(
        &args("30"),
        first.clone(),
        &mut Vec::new(),
        std::future::pending(),
    )
    .await
    .expect("first watch");
    let text = std::fs::read_to_string(&drift).expect("the drift file was written");
    let saved: f64 = text.split_whitespace().next().unwrap().parse().unwrap();
    assert!((saved - 150.0).abs() < 5.0, "{text}");

    // The same crystal after a restart: corrected from the first sync on.
    let second = Arc::new(SimulatedClock::new(SystemClock, Nanos::ZERO, 150_000));
    assert_eq!(second.frequency().unwrap(), 0);
    client::run(
        &args("1"),
        second.clone(),
        &mut Vec::new(),
        std::future::pending(),
    )
    .await
    .expect("second watch");
    let set = second.frequency().unwrap();
    assert_eq!(set, -(saved * 1e3).round() as i64, "set from the file");
    assert!(
        second.rate_error_ppb().abs() < 5_000,
        "runs right at once: {} ppb",
        second.rate_error_ppb()
    );
}
