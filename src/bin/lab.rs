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
//! ```text
//! cargo run --release --bin lab -- --runs 20
//! cargo run --release --bin lab -- --runs 100 --scenario lan --scenario sym --scenario asym --wires udp,tcp,tls
//! cargo run --release --bin lab -- --several --runs 50
//! ```

use clap::Parser;
use lab::accuracy::{self, Run, Summary};
use lab::{plot, scenario};
use service::source::Wire;
use std::io::Write;
use std::path::PathBuf;

/// The accuracy benchmark.
#[derive(Parser, Debug)]
#[command(name = "lab")]
struct Args {
    /// Runs per scenario (1 to 1000).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Only these scenarios (lan, sym, asym, lossy, jitter, dup); all if none.
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,
    /// Seed of the first run; run i uses seed + i.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the scattergrams (and the dump).
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
