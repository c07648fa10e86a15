//! `relay`: the impairment relay, by hand.
//!
//! ```text
//! cerv --offset +250ms &
//! relay --server 127.0.0.1:8081 --listen 127.0.0.1:9000 --scenario jitter &
//! fient 127.0.0.1:9000
//! ```
//!
//! Or set each direction: `--to-server delay=3ms --to-client delay=0.5ms`,
//! `--both delay=1ms,jitter=0.1ms,loss=20%`. Keys: delay, jitter (uniform
//! ±), normal (standard deviation), loss, dup, reorder (shares), hold (the
//! extra delay of a reordered datagram).

use clap::Parser;
use lab::relay::{Impairment, Relay};
use lab::scenario;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// A UDP relay on loopback that delays, drops, duplicates and reorders.
#[derive(Parser, Debug)]
#[command(name = "relay")]
struct Args {
    /// The server to relay to.
    #[arg(long, default_value = "127.0.0.1:8081")]
    server: SocketAddr,
    /// Where clients send (loopback only).
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// A named scenario: sym, asym, lossy, jitter, dup.
    #[arg(long, conflicts_with_all = ["both", "to_server", "to_client"])]
    scenario: Option<String>,
    /// The same impairment both ways.
    #[arg(long, value_name = "SPEC", conflicts_with_all = ["to_server", "to_client"])]
    both: Option<String>,
    /// Client to server.
    #[arg(long, value_name = "SPEC")]
    to_server: Option<String>,
    /// Server to client.
    #[arg(long, value_name = "SPEC")]
    to_client: Option<String>,
    /// Seed of the random fates.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop after this long (at most 24 h).
    #[arg(long, default_value = "1h")]
    duration: service::Nanos,
}

fn impairment(args: &Args) -> Result<Impairment, String> {
    if let Some(name) = &args.scenario {
        let s = scenario::named(name).ok_or_else(|| format!("unknown scenario '{name}'"))?;
        return s
            .impairment
            .ok_or_else(|| format!("scenario '{name}' has no relay (it is the direct path)"));
    }
    let parse = |spec: &Option<String>| {
        spec.as_deref()
            .map_or(Ok(Default::default()), scenario::parse_direction)
    };
    if let Some(both) = &args.both {
        return Ok(Impairment::symmetric(scenario::parse_direction(both)?));
    }
    Ok(Impairment {
        to_server: parse(&args.to_server)?,
        to_client: parse(&args.to_client)?,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let imp = match impairment(&args) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("relay: {e}");
            return ExitCode::from(2);
        }
    };
    if !args.listen.ip().is_loopback() || !args.server.ip().is_loopback() {
        eprintln!(
            "relay: loopback addresses only (got {} → {})",
            args.listen, args.server
        );
        return ExitCode::from(2);
    }
    let limit = args
        .duration
        .unsigned_duration()
        .min(Duration::from_secs(86_400));
    let relay = match Relay::start_on(args.listen, args.server, imp, args.seed) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("relay: cannot listen on {}: {e}", args.listen);
            return ExitCode::from(1);
        }
    };
    eprintln!(
        "relay: {} → {}; to server: {}; to client: {}; stopping after {:?} or on Ctrl-C",
        relay.addr(),
        args.server,
        imp.to_server,
        imp.to_client,
        limit
    );
    let started = Instant::now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    stop_on_signal(stop.clone());
    while started.elapsed() < limit && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = relay.stats();
    use std::sync::atomic::Ordering::Relaxed;
    for (name, d) in [("to server", &s.to_server), ("to client", &s.to_client)] {
        eprintln!(
            "relay: {name}: received {}, sent {}, lost {}, duplicated {}, reordered {}, latest send {:.1}µs late",
            d.received.load(Relaxed),
            d.sent.load(Relaxed),
            d.lost.load(Relaxed),
            d.duplicated.load(Relaxed),
            d.reordered.load(Relaxed),
            d.max_late_ns.load(Relaxed) as f64 / 1e3
        );
    }
    relay.stop();
    ExitCode::SUCCESS
}

/// Sets `flag` on SIGINT or SIGTERM.
fn stop_on_signal(flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    static FLAG: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
        std::sync::OnceLock::new();
    let _ = FLAG.set(flag);
    extern "C" fn on_signal(_: libc::c_int) {
        if let Some(f) = FLAG.get() {
            f.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    // SAFETY: the handler only does an atomic store.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}
