//! What time is it, and how sure are we? A clock kept in step with time
//! servers in the background, answering with an interval.
//!
//! ```text
//! cargo run -p server --bin cerv -- --offset +250ms --ntp-listen 127.0.0.1:12300 --ntp-stratum 1 &
//! cargo run -p service --example synced_clock -- 127.0.0.1:8081 ntp://127.0.0.1:12300
//! ```

use service::Timestamp;
use service::source::SourceSpec;
use service::synced::{Status, SyncedClock, SyncedClockConfig};
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut sources: Vec<SourceSpec> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    if sources.is_empty() {
        sources.push("127.0.0.1:8081".parse()?);
    }
    let config = SyncedClockConfig {
        interval: Duration::from_secs(1),
        stale_after: Duration::from_secs(4),
        ..SyncedClockConfig::default()
    };
    let clock = SyncedClock::start_sources(&sources, config).await?;
    if !clock.wait_synchronized(Duration::from_secs(5)).await {
        return Err(format!("no sync: {:?}", clock.last_error()).into());
    }
    // A commit-wait, Spanner style: pick a timestamp, then wait until it
    // has certainly passed everywhere before making it visible.
    let commit: Timestamp = clock.now().latest;
    while !clock.after(commit) {
        tokio::time::sleep(Duration::from_micros(50)).await;
    }
    println!("commit timestamp {commit} has certainly passed");

    for _ in 0..5 {
        let now = clock.now();
        println!(
            "{:?}: between {} and {} (width {})",
            now.status,
            now.earliest,
            now.latest,
            now.width()
        );
        if matches!(now.status, Status::Stale | Status::Disagreement) {
            println!("  {:?}", clock.last_error());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}
