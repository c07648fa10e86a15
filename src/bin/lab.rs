//! `lab`: the accuracy benchmark.
//!
//! Runs the real `fient` against the real `cerv --offset +250ms`, through
//! the impairment relay, N times per scenario, and prints per scenario the
//! median and largest error, the median bound, how often the bound
//! contained the truth, the median time to answer (the whole fient
//! process), the samples lost, the median probe round trip and the time
//! before the first probe (the connection and TLS handshake, on a stream
//! wire); then the same figures for every estimator, computed from the
//! same runs. `--wires udp,tcp,tls` measures each scenario on each wire.
//! Draws one wedge scattergram per scenario (and wire) as SVG.
//!
//! With `--watch DURATION` it measures over time instead: `fient --watch
//! INTERVAL --json` (report only) through the relay for DURATION per
//! scenario, plus a drifting simulated clock on the jitter path, and
//! prints per scenario the median |error| over the second half, the share
//! of answers whose bound held (outside detected steps too), the time
//! until the error stays under twice that median, and an SVG of error and
//! bound over time. `--step` makes the server's time jump 10 ms halfway
//! instead (see [`lab::watch`]).
//!
//! ```text
//! cargo run --release --bin lab -- --runs 20
//! cargo run --release --bin lab -- --runs 100 --scenario lan --scenario sym --scenario asym --wires udp,tcp,tls
//! cargo run --release --bin lab -- --several --runs 50
//! cargo run --release --bin lab -- --watch 2m --interval 2s
//! cargo run --release --bin lab -- --watch 2m --step --scenario jitter
//! ```

use clap::Parser;
use lab::accuracy::{self, Run, Summary};
use lab::watch::{self, WatchPlan, WatchRun, WatchSummary};
use lab::{plot, scenario};
use service::source::Wire;
use service::time::Nanos;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The accuracy benchmark.
#[derive(Parser, Debug)]
#[command(name = "lab")]
struct Args {
    /// Runs per scenario (1 to 1000).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Only these scenarios (lan, sym, asym, lossy, jitter, dup, and with
    /// --watch drifting); all if none.
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,
    /// Seed of the first run; run i uses seed + i.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Measure over time: watch each scenario this long (2m, say), as
    /// fient --watch INTERVAL --json, report only.
    #[arg(long, value_name = "DURATION", conflicts_with_all = ["runs", "compare_stamping", "dump"])]
    watch: Option<Nanos>,
    /// With --watch: fient's interval between syncs.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "2s",
        requires = "watch"
    )]
    interval: Nanos,
    /// With --watch: the step test instead; the server's time jumps 10 ms
    /// halfway through (two cervs behind a relay that switches).
    #[arg(long, requires = "watch")]
    step: bool,
    /// Where to write the drawings (and the dump).
    #[arg(long, default_value = "target/lab")]
    out: PathBuf,
    /// Also run the lan scenario with user-space timestamps on both sides,
    /// to show what kernel timestamps gain (on every wire of --wires).
    #[arg(long)]
    compare_stamping: bool,
    /// The wires to measure each scenario on: udp (cerv's datagrams), tcp,
    /// tls. Stream wires run only the scenarios a stream can have (delay
    /// and jitter: lan, sym, asym).
    #[arg(long, value_delimiter = ',', default_value = "udp", value_parser = parse_wire)]
    wires: Vec<Wire>,
    /// Instead of the scenarios: four NTP servers (two direct, one behind
    /// the jitter path, one lying by 1 s), fient with each --combine and
    /// chronyd -Q given the same four.
    #[arg(long)]
    several: bool,
    /// Write every fient JSON document, one per line, to OUT/runs.jsonl.
    #[arg(long)]
    dump: bool,
    /// Extra arguments for every fient run (after --).
    #[arg(last = true)]
    fient_args: Vec<String>,
}

fn parse_wire(name: &str) -> Result<Wire, String> {
    match name {
        "udp" => Ok(Wire::Cerv),
        "tcp" => Ok(Wire::Tcp),
        "tls" => Ok(Wire::Tls),
        other => Err(format!("unknown wire '{other}': expected udp, tcp or tls")),
    }
}

fn us(ns: i64) -> String {
    format!("{:.1}", ns as f64 / 1e3)
}

fn row(name: &str, s: &Summary) -> String {
    format!(
        "| {name} | {} | {} | {} | {}/{} | {} | {:.1} | {} | {} | {:.3} | {}/{} |",
        us(s.median_abs_error_ns),
        us(s.median_error_ns),
        us(s.max_abs_error_ns),
        s.contained,
        s.measured,
        us(s.median_bound_ns),
        s.median_wall.as_secs_f64() * 1e3,
        s.lost,
        us(s.median_rtt_ns),
        s.median_setup_ns as f64 / 1e6,
        s.synced,
        s.runs,
    )
}

const HEADER: &str = "| scenario | median abs error (µs) | median error (µs) | max abs error (µs) | bound contains truth | median bound (µs) | median time to answer (ms) | requests lost | median probe rtt (µs) | median setup before the first probe (ms) | synced |\n|---|---|---|---|---|---|---|---|---|---|---|";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(duration) = args.watch {
        return watch_main(&args, duration);
    }
    if !(1..=1000).contains(&args.runs) {
        return Err(format!("invalid --runs '{}': expected 1 to 1000", args.runs).into());
    }
    let mut chosen = Vec::new();
    for name in &args.scenarios {
        chosen.push(scenario::named(name).ok_or_else(|| format!("unknown scenario '{name}'"))?);
    }
    if chosen.is_empty() {
        chosen = scenario::all();
    }
    std::fs::create_dir_all(&args.out)?;
    let fient_args: Vec<&str> = args.fient_args.iter().map(String::as_str).collect();
    if args.several {
        eprintln!(
            "several: 4 NTP servers, one lying by {}, one behind 2 ms ± 1.5 ms ({} runs)",
            lab::several::LIE,
            args.runs
        );
        let rows = lab::several::measure(args.runs, args.seed, &fient_args)?;
        println!("{}", lab::several::HEADER);
        for r in rows {
            println!("{}", r.markdown());
        }
        return Ok(());
    }
    let mut dump = if args.dump {
        Some(std::fs::File::create(args.out.join("runs.jsonl"))?)
    } else {
        None
    };

    let mut all: Vec<(String, Vec<Run>)> = Vec::new();
    // Only udp: the names and files of before.
    let only_udp = args.wires == [Wire::Cerv];
    let label = |scenario: &str, wire: Wire| {
        if only_udp {
            scenario.to_string()
        } else {
            format!("{scenario} / {}", accuracy::wire_name(wire))
        }
    };
    for s in &chosen {
        for &wire in &args.wires {
            if !accuracy::fits(s, wire) {
                eprintln!(
                    "{}: not on {} (a stream has no loss, duplicates or reordering)",
                    s.name,
                    accuracy::wire_name(wire)
                );
                continue;
            }
            let name = label(s.name, wire);
            eprintln!("{name}: {} ({} runs)", s.about, args.runs);
            let runs = accuracy::measure_wire(s, wire, args.runs, args.seed, &fient_args, &[]);
            if let Some(f) = dump.as_mut() {
                for r in &runs {
                    writeln!(
                        f,
                        "{{\"scenario\":\"{}\",\"wire\":\"{}\",\"run\":{}}}",
                        s.name,
                        accuracy::wire_name(wire),
                        r.raw.trim()
                    )?;
                }
            }
            let file = if only_udp {
                format!("wedge-{}.svg", s.name)
            } else {
                format!("wedge-{}-{}.svg", s.name, accuracy::wire_name(wire))
            };
            let title = format!("{name}: {} ({} runs)", s.about, args.runs);
            plot::wedge(&args.out.join(file), &title, &runs)?;
            all.push((name, runs));
        }
    }
    if args.compare_stamping {
        let lan = scenario::named("lan").ok_or("no lan scenario")?;
        let mut user_args = fient_args.clone();
        user_args.extend(["--timestamping", "user"]);
        for &wire in &args.wires {
            let runs = accuracy::measure_wire(
                &lan,
                wire,
                args.runs,
                args.seed,
                &user_args,
                &["--timestamping", "user"],
            );
            all.push((format!("{}, user-space stamps", label("lan", wire)), runs));
        }
    }

    println!("{HEADER}");
    for (name, runs) in &all {
        println!("{}", row(name, &accuracy::summarise(runs, None)));
    }
    println!();
    println!("Every estimator on the same runs:");
    println!();
    println!("{HEADER}");
    for (name, runs) in &all {
        for e in ["mid-median", "intersection", "min-rtt", "mean-delay"] {
            println!(
                "{}",
                row(
                    &format!("{name} / {e}"),
                    &accuracy::summarise(runs, Some(e))
                )
            );
        }
    }
    for (name, runs) in &all {
        for r in runs.iter().filter(|r| !r.synced) {
            eprintln!("{name}: a run failed: {}", r.stderr.trim());
        }
    }
    eprintln!("scattergrams in {}", args.out.display());
    Ok(())
}

/// Microseconds to about three significant digits: 0.31, 9.84, 187.
fn us3(ns: i64) -> String {
    let v = ns as f64 / 1e3;
    match v.abs() {
        a if a < 10.0 => format!("{v:.2}"),
        a if a < 100.0 => format!("{v:.1}"),
        _ => format!("{v:.0}"),
    }
}

fn share(part: usize, whole: usize) -> String {
    if whole == 0 {
        return "—".into();
    }
    format!(
        "{:.0} % ({part}/{whole})",
        100.0 * part as f64 / whole as f64
    )
}

const WATCH_HEADER: &str = "| scenario | answers | median abs error, 2nd half (µs) | max abs error, 2nd half (µs) | median bound, 2nd half (µs) | bound held | bound held outside detected steps | converged under 2× median (s) | samples lost |\n|---|---|---|---|---|---|---|---|---|";

fn watch_row(name: &str, s: &WatchSummary) -> String {
    let opt = |v: Option<i64>| v.map_or("—".into(), us3);
    let outside = match s.flagged {
        None => format!("{} (no step_detected)", share(s.held_outside, s.outside)),
        Some(n) => format!("{} ({n} flagged)", share(s.held_outside, s.outside)),
    };
    format!(
        "| {name} | {}/{} | {} | {} | {} | {} | {outside} | {} | {} |",
        s.synced,
        s.lines,
        opt(s.median_abs_error_ns),
        opt(s.max_abs_error_ns),
        opt(s.median_bound_ns),
        share(s.held, s.synced),
        s.converged.map_or("never".into(), |t| format!("{t:.0}")),
        s.lost,
    )
}

const STEP_HEADER: &str = "| scenario | polls until it follows | error before (µs) | follow threshold (µs) | bound missed, 5 lines after the step | bound missed after the step (flagged) | bound missed before the step |\n|---|---|---|---|---|---|---|";

/// `lab --watch`: see the crate documentation of `lab::watch`.
fn watch_main(args: &Args, duration: Nanos) -> Result<(), Box<dyn std::error::Error>> {
    let interval = args.interval;
    if !(Nanos::from_millis(10)..=Nanos::from_secs(86_400)).contains(&interval) {
        return Err(format!("invalid --interval '{interval}': expected 10ms to 24h").into());
    }
    if duration < Nanos::from_nanos(interval.as_nanos().saturating_mul(4))
        || duration > Nanos::from_secs(86_400)
    {
        return Err(format!(
            "invalid --watch '{duration}': expected at least 4 intervals and at most 24h"
        )
        .into());
    }
    // Never a watch that changes this machine's clock.
    if let Some(bad) = args
        .fient_args
        .iter()
        .find(|a| ["--slew", "--set"].contains(&a.as_str()))
    {
        return Err(format!("lab --watch only reports: '{bad}' is refused").into());
    }
    let plan = WatchPlan {
        duration: duration.unsigned_duration(),
        interval: interval.unsigned_duration(),
        seed: args.seed,
        fient_extra: args.fient_args.clone(),
    };
    let mut chosen = Vec::new();
    let mut drifting = args.scenarios.is_empty() && !args.step;
    for name in &args.scenarios {
        if name == "drifting" {
            if args.step {
                return Err("the step test runs on the network scenarios, not 'drifting'".into());
            }
            drifting = true;
            continue;
        }
        chosen.push(scenario::named(name).ok_or_else(|| format!("unknown scenario '{name}'"))?);
    }
    if args.scenarios.is_empty() {
        chosen = scenario::all();
    }
    std::fs::create_dir_all(&args.out)?;

    let minutes = plan.duration.as_secs_f64() / 60.0;
    let runs = chosen.len() + usize::from(drifting);
    eprintln!(
        "watching {runs} scenario(s) for {minutes:.1} min each, every {interval}: about {:.0} min",
        minutes * runs as f64
    );
    let prefix = if args.step { "watch-step" } else { "watch" };
    let mut all: Vec<(WatchRun, WatchSummary)> = Vec::new();
    let mut record = |run: WatchRun| -> Result<(), Box<dyn std::error::Error>> {
        let summary = watch::summarise(&run.lines, run.half);
        save(&args.out, prefix, &run, &summary)?;
        all.push((run, summary));
        Ok(())
    };
    for s in &chosen {
        eprintln!("{}: {}", s.name, s.about);
        record(if args.step {
            watch::watch_step(s, &plan)
        } else {
            watch::watch_scenario(s, &plan)
        })?;
    }
    if drifting {
        eprintln!("drifting: the drifting_watch example on the jitter path");
        record(watch::watch_drifting(&plan))?;
    }

    println!("{WATCH_HEADER}");
    for (run, summary) in &all {
        println!("{}", watch_row(&run.name, summary));
    }
    for (run, summary) in &all {
        if let Some(ppm) = summary.drift_error_ppm {
            println!();
            println!(
                "{}: fient's drift_ppm is off the clock's true rate by a median {ppm:.3} ppm over the second half",
                run.name
            );
        }
    }
    if args.step {
        println!();
        println!("{STEP_HEADER}");
        for (run, _) in &all {
            let Some(at) = run.step_at else { continue };
            let s = watch::step_summary(&run.lines, at);
            println!(
                "| {} | {} | {} | ±{} | {} | {} ({}) | {} |",
                run.name,
                s.polls_to_follow.map_or("never".into(), |n| n.to_string()),
                us3(s.bias_ns),
                us3(s.threshold_ns),
                s.failed_around,
                s.failed_after,
                s.failed_after_flagged,
                s.failed_before,
            );
        }
    }
    for (run, summary) in &all {
        if !run.ended_well() {
            eprintln!(
                "{}: the watch ended badly ({:?}): {}",
                run.name,
                run.finished.code(),
                run.finished.stderr.trim()
            );
        }
        if !run.ended_well() || summary.synced < summary.lines {
            eprintln!(
                "{}: {} of {} lines without an answer",
                run.name,
                summary.lines - summary.synced,
                summary.lines
            );
            for note in &run.notes {
                eprintln!("{}: {note}", run.name);
            }
        }
    }
    eprintln!(
        "drawings and every line in {}/{prefix}-*",
        args.out.display()
    );
    Ok(())
}

/// Writes a watch's lines as printed (`PREFIX-NAME.jsonl`) and its
/// drawing (`PREFIX-NAME.svg`).
fn save(
    out: &Path,
    prefix: &str,
    run: &WatchRun,
    summary: &WatchSummary,
) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::write(
        out.join(format!("{prefix}-{}.jsonl", run.name)),
        &run.finished.stdout,
    )?;
    let title = format!("{}: {}", run.name, run.about);
    plot::watch(
        &out.join(format!("{prefix}-{}.svg", run.name)),
        &title,
        run,
        summary,
    )
}
