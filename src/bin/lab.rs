//! `lab`: the accuracy benchmark.
//!
//! Runs the real `fient` against the real `cerv --offset +250ms`, through
//! the impairment relay, N times per scenario, and prints per scenario the
//! median and largest error, the median bound, how often the bound
//! contained the truth, the median time to answer (the whole fient
//! process) and the samples lost; then the same figures for every
//! estimator, computed from the same runs. Draws one wedge scattergram per
//! scenario as SVG.
//!
//! ```text
//! cargo run --release --bin lab -- --runs 20
//! ```

use clap::Parser;
use lab::accuracy::{self, Run, Summary};
use lab::{plot, scenario};
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
    /// to show what kernel timestamps gain.
    #[arg(long)]
    compare_stamping: bool,
    /// Write every fient JSON document, one per line, to OUT/runs.jsonl.
    #[arg(long)]
    dump: bool,
    /// Extra arguments for every fient run (after --).
    #[arg(last = true)]
    fient_args: Vec<String>,
}

fn us(ns: i64) -> String {
    format!("{:.1}", ns as f64 / 1e3)
}

fn row(name: &str, s: &Summary) -> String {
    format!(
        "| {name} | {} | {} | {} | {}/{} | {} | {:.1} | {} | {}/{} |",
        us(s.median_abs_error_ns),
        us(s.median_error_ns),
        us(s.max_abs_error_ns),
        s.contained,
        s.measured,
        us(s.median_bound_ns),
        s.median_wall.as_secs_f64() * 1e3,
        s.lost,
        s.synced,
        s.runs,
    )
}

const HEADER: &str = "| scenario | median abs error (µs) | median error (µs) | max abs error (µs) | bound contains truth | median bound (µs) | median time to answer (ms) | requests lost | synced |\n|---|---|---|---|---|---|---|---|---|";

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
    let mut dump = if args.dump {
        Some(std::fs::File::create(args.out.join("runs.jsonl"))?)
    } else {
        None
    };

    let mut all: Vec<(String, Vec<Run>)> = Vec::new();
    for s in &chosen {
        eprintln!("{}: {} ({} runs)", s.name, s.about, args.runs);
        let runs = accuracy::measure(s, args.runs, args.seed, &fient_args);
        if let Some(f) = dump.as_mut() {
            for r in &runs {
                writeln!(
                    f,
                    "{{\"scenario\":\"{}\",\"run\":{}}}",
                    s.name,
                    r.raw.trim()
                )?;
            }
        }
        let path = args.out.join(format!("wedge-{}.svg", s.name));
        let title = format!("{}: {} ({} runs)", s.name, s.about, args.runs);
        plot::wedge(&path, &title, &runs)?;
        all.push((s.name.to_string(), runs));
    }
    if args.compare_stamping {
        let lan = scenario::named("lan").ok_or("no lan scenario")?;
        let mut user_args = fient_args.clone();
        user_args.extend(["--timestamping", "user"]);
        let runs = accuracy::measure_with(
            &lan,
            args.runs,
            args.seed,
            &user_args,
            &["--timestamping", "user"],
        );
        all.push(("lan, user-space stamps".to_string(), runs));
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
