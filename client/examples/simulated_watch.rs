//! `fient --watch --slew` on a simulated clock: watch the discipline pull a
//! clock that is off and drifting into line with a server, without root
//! and without touching this machine's clock.
//!
//! ```text
//! cargo run --release -p server --bin cerv &
//! cargo run --release -p client --example simulated_watch -- 127.0.0.1:8081 --watch 200ms --count 30
//! ```
//!
//! The simulated clock starts 3 ms ahead of the system clock and runs
//! 150 ppm fast; every other argument is fient's.

use clap::Parser;
use client::cli::Args;
use service::clock::{SimulatedClock, SystemClock};
use service::time::Nanos;
use std::sync::Arc;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut argv: Vec<String> = std::env::args().collect();
    argv.push("--slew".into());
    let plan = match Args::try_parse_from(&argv)
        .map_err(|e| e.to_string())
        .and_then(|a| a.plan().map_err(|e| e.to_string()))
    {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("simulated_watch: {e}");
            std::process::exit(2);
        }
    };
    let clock = Arc::new(SimulatedClock::new(
        SystemClock,
        Nanos::from_millis(3),
        150_000,
    ));
    println!(
        "simulated clock: {:+} from the system clock, running +150.000 ppm fast",
        clock.error()
    );
    let mut out = std::io::stdout();
    if let Err(f) = client::run(&plan, clock.clone(), &mut out, std::future::pending()).await {
        eprintln!("simulated_watch: {:#}", f.error);
    }
    println!(
        "simulated clock now: {:+} from the system clock (the server's skew, if it has one), rate error {}",
        clock.error(),
        client::watch::ppm(clock.rate_error_ppb())
    );
}
