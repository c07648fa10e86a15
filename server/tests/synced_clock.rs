//! SyncedClock against a real server: the interval must hold the server's
//! true time while the local clock drifts and while the server is away.

use server::{Config, Server};
use service::clock::{Clock, SimulatedClock, SystemClock};
use service::source::SyncOptions;
use service::synced::{Status, SyncedClock, SyncedClockConfig};
use service::time::{Nanos, Timestamp};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const SKEW_MS: i64 = 30;

async fn serve(listen: SocketAddr) -> server::Running {
    Server::spawn(Config {
        listen,
        offset: Nanos::from_millis(SKEW_MS),
        ..Config::default()
    })
    .await
    .expect("bind")
}

/// The server's true time: the system clock plus the skew.
fn truth() -> Timestamp {
    SystemClock
        .now()
        .saturating_add(Nanos::from_millis(SKEW_MS))
}

/// Checks, for `span`, that every answer holds the truth; returns the
/// widest interval seen and the statuses met.
async fn watch(synced: &SyncedClock, span: Duration) -> (Nanos, Vec<Status>) {
    let deadline = tokio::time::Instant::now() + span;
    let mut widest = Nanos::ZERO;
    let mut statuses = Vec::new();
    while tokio::time::Instant::now() < deadline {
        let before = truth();
        let now = synced.now();
        let after = truth();
        // The truth at the moment of the call lies between the readings.
        assert!(
            now.earliest <= after && before <= now.latest,
            "truth [{before}, {after}] outside [{}, {}] ({:?})",
            now.earliest,
            now.latest,
            now.status
        );
        // TrueTime's promises, through the API (which reads the clock
        // again, a moment later: hence the 50 ms margins). A time ahead of
        // the truth has not certainly passed, one behind it has not
        // certainly not come; one further back than the interval is wide
        // has certainly passed, one further ahead has certainly not come.
        let margin = Nanos::from_millis(50);
        let wide = now.width().saturating_add(margin);
        assert!(!synced.after(truth().saturating_add(margin)));
        assert!(!synced.before(truth().saturating_add(-margin)));
        assert!(synced.after(truth().saturating_add(-wide)));
        assert!(synced.before(truth().saturating_add(wide)));
        widest = widest.max(now.width());
        if statuses.last() != Some(&now.status) {
            statuses.push(now.status);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (widest, statuses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interval_holds_the_truth_while_drifting_and_while_the_server_is_away() {
    let server = serve("127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;
    // 7 ms behind and 40 ppm fast: within the 50 ppm the clock assumes.
    let local = Arc::new(SimulatedClock::new(
        SystemClock,
        Nanos::from_millis(-7),
        40_000,
    ));
    let config = SyncedClockConfig {
        interval: Duration::from_millis(100),
        stale_after: Duration::from_millis(400),
        sync: SyncOptions {
            timeout: Duration::from_millis(100),
            ..SyncOptions::default()
        },
        ..SyncedClockConfig::default()
    };
    let synced = SyncedClock::start_with_clock(addr, local, config)
        .await
        .unwrap();
    assert_eq!(synced.status(), Status::Unsynchronized);
    assert!(!synced.after(Timestamp::from_nanos(i64::MIN + 1)));
    assert!(!synced.before(Timestamp::from_nanos(i64::MAX)));
    assert!(synced.wait_synchronized(Duration::from_secs(3)).await);

    let (synced_width, statuses) = watch(&synced, Duration::from_millis(1500)).await;
    assert_eq!(statuses, [Status::Synchronized]);
    assert!(synced_width < Nanos::from_millis(2), "{synced_width}");

    // The server goes away: answers go stale and widen, and stay honest.
    server.stop().await;
    let (away_width, statuses) = watch(&synced, Duration::from_millis(1500)).await;
    assert_eq!(statuses, [Status::Synchronized, Status::Stale]);
    assert!(away_width > synced_width);
    assert!(synced.last_error().is_some());

    // It comes back on the same address: synchronized again, narrow again.
    let back_again = serve(addr).await;
    let mut back = false;
    for _ in 0..600 {
        if synced.status() == Status::Synchronized {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(back, "never resynchronized: {:?}", synced.last_error());
    let (width, _) = watch(&synced, Duration::from_millis(300)).await;
    assert!(width < away_width);
    eprintln!(
        "widest interval: {synced_width} synchronized, {away_width} after 1.5 s away, {width} back"
    );
    back_again.stop().await;
}
