//! What time is it, and how sure are we? A clock kept in step with a cerv
//! server in the background, answering with an interval.
//!
//! ```text
//! cargo run -p server --bin cerv -- --offset +250ms &
//! cargo run -p service --example synced_clock -- 127.0.0.1:8081
//! ```

use service::Timestamp;
use service::synced::{Status, SyncedClock, SyncedClockConfig};
use std::net::SocketAddr;
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".into())
        .parse()?;
    let config = SyncedClockConfig {
        interval: Duration::from_secs(1),
        stale_after: Duration::from_secs(4),
        ..SyncedClockConfig::default()
    };
    let clock = SyncedClock::start(server, config).await?;
    if !clock.wait_synchronized(Duration::from_secs(5)).await {
        return Err(format!("no sync with {server}: {:?}", clock.last_error()).into());
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
        if now.status == Status::Stale {
            println!(
                "  the server has not answered for a while: {:?}",
                clock.last_error()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}
