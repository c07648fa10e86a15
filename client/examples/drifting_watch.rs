//! `fient --watch` on a simulated clock that drifts and wanders, report
//! only: the clock a filter over syncs must follow, with its true error
//! printed beside every answer. `lab --watch` runs it for its drifting
//! run.
//!
//! ```text
//! cargo run --release -p server --bin cerv -- --offset +250ms &
//! cargo run --release -p client --example drifting_watch -- \
//!     --drift-ppm 50 --wander 0.01 --server-offset +250ms -- 127.0.0.1:8081 --watch 2s --json
//! ```
//!
//! The simulated clock starts on the system clock and runs `--drift-ppm`
//! fast; every 100 ms its rate takes a step of a random walk, normal with
//! a standard deviation of `--wander` ppm per √s (so `wander · √0.1` per
//! step: 0.0032 ppm at the default 0.01), drawn from `--seed`. At the
//! default, the rate wanders about 0.11 ppm in two minutes and the time
//! about 8 µs beyond the straight drift: a crystal in a room whose
//! temperature moves a little. Nothing ever corrects the clock: `--slew`
//! and `--set` are refused.
//!
//! Every `--json` line gains, computed at the line's own reference instant
//! (its `time`, read on the simulated clock) rather than when it is
//! printed:
//!
//! - `clock_error_ns`: the simulated clock minus the system clock;
//! - `clock_drift_ppm`: how fast it runs against the system clock now, the
//!   truth for fient's `drift_ppm`;
//! - with `--server-offset`, `truth_ns`: the offset fient should find, the
//!   server's offset from the system clock minus `clock_error_ns`.
//!
//! [`SimulatedClock::error_at`] carries the clock's error back from the
//! moment of printing to the reference instant at the rate in force, which
//! is exact to the nanosecond unless a 100 ms rate step fell in between,
//! and then off by a few picoseconds.
//!
//! Exit codes are fient's.

use clap::Parser;
use client::cli::{Args, Correction};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use service::clock::{SimulatedClock, SystemClock};
use service::time::{Nanos, Timestamp};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

/// How often the simulated clock's rate takes a step of its random walk.
const WANDER_STEP: Duration = Duration::from_millis(100);

/// fient's watch on a drifting, wandering simulated clock; report only.
#[derive(Parser, Debug)]
#[command(name = "drifting_watch")]
struct Opts {
    /// How fast the simulated clock runs at the start, ppm (negative:
    /// slow).
    #[arg(long, default_value_t = 50.0, allow_hyphen_values = true)]
    drift_ppm: f64,
    /// The random walk of the rate, ppm per √s (0: a steady drift).
    #[arg(long, default_value_t = 0.01)]
    wander: f64,
    /// Seed of the random walk.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The server's offset from the system clock (cerv's `--offset`), to
    /// print `truth_ns` on each line.
    #[arg(long, allow_hyphen_values = true)]
    server_offset: Option<Nanos>,
    /// fient's arguments, after `--`.
    #[arg(last = true, required = true)]
    fient: Vec<String>,
}

/// A writer that passes fient's output through, adding the truth to every
/// JSON line that has a `time`.
struct WithTruth<W> {
    out: W,
    clock: Arc<SimulatedClock<SystemClock>>,
    server_offset: Option<Nanos>,
    pending: Vec<u8>,
}

impl<W: Write> WithTruth<W> {
    fn emit(&mut self, line: &[u8]) -> std::io::Result<()> {
        let time = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("time")?.as_str()?.parse::<Timestamp>().ok());
        match (time, line.strip_suffix(b"}")) {
            (Some(time), Some(open)) => {
                let error = self.clock.error_at(time);
                let drift = self.clock.rate_error_ppb();
                self.out.write_all(open)?;
                write!(
                    self.out,
                    ",\"clock_error_ns\":{},\"clock_drift_ppm\":{}",
                    error.as_nanos(),
                    drift as f64 / 1e3
                )?;
                if let Some(offset) = self.server_offset {
                    let truth = offset.as_nanos() - error.as_nanos();
                    write!(self.out, ",\"truth_ns\":{truth}")?;
                }
                self.out.write_all(b"}\n")
            }
            _ => {
                self.out.write_all(line)?;
                self.out.write_all(b"\n")
            }
        }
    }
}

impl<W: Write> Write for WithTruth<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.emit(&line[..end])?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// One normal draw (Box–Muller), from two uniform ones.
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn fail(why: impl std::fmt::Display, code: i32) -> ! {
    eprintln!("drifting_watch: {why}");
    std::process::exit(code)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let opts = Opts::parse();
    if !opts.drift_ppm.is_finite() || opts.drift_ppm.abs() > 500.0 {
        fail(
            format!(
                "invalid --drift-ppm '{}': expected -500 to 500",
                opts.drift_ppm
            ),
            2,
        );
    }
    if !opts.wander.is_finite() || !(0.0..=10.0).contains(&opts.wander) {
        fail(
            format!("invalid --wander '{}': expected 0 to 10", opts.wander),
            2,
        );
    }
    let argv = std::iter::once("fient".to_string()).chain(opts.fient.iter().cloned());
    let plan = match Args::try_parse_from(argv)
        .map_err(|e| e.to_string())
        .and_then(|a| a.plan().map_err(|e| e.to_string()))
    {
        Ok(plan) => plan,
        Err(e) => fail(e, 2),
    };
    if plan.correction != Correction::None {
        fail("this example only reports: --slew and --set are refused", 2);
    }

    let start_ppb = (opts.drift_ppm * 1e3).round() as i64;
    let clock = Arc::new(SimulatedClock::new(SystemClock, Nanos::ZERO, start_ppb));
    // The random walk, one step every 100 ms for as long as the watch runs
    // (the task ends with the runtime).
    let wander = tokio::spawn({
        let clock = clock.clone();
        let step_ppb = opts.wander * 1e3 * WANDER_STEP.as_secs_f64().sqrt();
        let mut rng = StdRng::seed_from_u64(opts.seed);
        async move {
            let mut ppb = start_ppb as f64;
            let mut tick = tokio::time::interval(WANDER_STEP);
            tick.tick().await;
            loop {
                tick.tick().await;
                ppb = (ppb + step_ppb * normal(&mut rng)).clamp(-500_000.0, 500_000.0);
                clock.set_drift_ppb(ppb.round() as i64);
            }
        }
    });

    let mut out = WithTruth {
        out: std::io::stdout(),
        clock: clock.clone(),
        server_offset: opts.server_offset,
        pending: Vec::new(),
    };
    // Installed now, so a SIGTERM from the lab is never missed: it ends
    // the watch cleanly, with every line written.
    let signal = service::signals::on_signal();
    let shutdown = async move {
        signal.await;
    };
    let result = client::run(&plan, clock.clone(), &mut out, shutdown).await;
    wander.abort();
    let _ = out.flush();
    if let Err(f) = result {
        fail(format!("{:#}", f.error), f.exit as i32);
    }
}
