//! Offline comparison of offset estimators on recorded runs.
//!
//! The default estimator of fient is chosen by measurement: record runs with
//! `cargo run --release --bin lab -- --runs 60 --dump`, then
//! `cargo run --release --example estimators -- target/lab/runs.jsonl`
//! prints, per scenario and candidate, the median |error| and median bound
//! over the very same samples. Every candidate's bound is honest by
//! construction (the estimate is kept inside the intersection of the
//! exchanges' intervals, and the bound reaches its far edge), so the
//! comparison is about accuracy and tightness only.

use service::Timestamp;
use service::sync::{self, Estimator, NowExchange, Sample, SyncParams};
use std::collections::BTreeMap;

const TRUTH: i64 = 250_000_000;

fn ts(v: &serde_json::Value, k: &str) -> Timestamp {
    Timestamp::from_nanos(v[k].as_i64().unwrap_or(0))
}

/// Errors and bounds of one candidate in one scenario, nanoseconds.
type Figures = (Vec<i64>, Vec<i64>);

/// A candidate: from the samples and the intersection [lo, hi], an estimate.
type Candidate = fn(&[Sample], i64, i64) -> i64;

fn offsets(samples: &[Sample]) -> Vec<i64> {
    samples.iter().map(|s| s.offset().as_nanos()).collect()
}

fn mean(v: &[i64]) -> i64 {
    (v.iter().map(|&x| x as i128).sum::<i128>() / v.len().max(1) as i128) as i64
}

fn median(v: &mut [i64]) -> i64 {
    v.sort();
    if v.is_empty() {
        0
    } else {
        v[(v.len() - 1) / 2]
    }
}

fn midpoint(_: &[Sample], lo: i64, hi: i64) -> i64 {
    lo + (hi - lo) / 2
}

fn mean_all(s: &[Sample], _: i64, _: i64) -> i64 {
    mean(&offsets(s))
}

fn filtered(s: &[Sample], factor: i64) -> Vec<i64> {
    let min = s.iter().map(|x| x.rtt().as_nanos()).min().unwrap_or(0);
    s.iter()
        .filter(|x| x.rtt().as_nanos() <= min * factor + 20_000)
        .map(|x| x.offset().as_nanos())
        .collect()
}

fn mean_filtered3(s: &[Sample], _: i64, _: i64) -> i64 {
    mean(&filtered(s, 3))
}

fn mean_filtered2(s: &[Sample], _: i64, _: i64) -> i64 {
    mean(&filtered(s, 2))
}

fn median_all(s: &[Sample], _: i64, _: i64) -> i64 {
    median(&mut offsets(s))
}

fn weighted(s: &[Sample], _: i64, _: i64) -> i64 {
    let (mut num, mut den) = (0f64, 0f64);
    for x in s {
        let rtt = x.rtt().as_nanos().max(1_000) as f64;
        let w = 1.0 / (rtt * rtt);
        num += w * x.offset().as_nanos() as f64;
        den += w;
    }
    (num / den) as i64
}

fn mid_and_mean(s: &[Sample], lo: i64, hi: i64) -> i64 {
    let m = mean(&offsets(s)).clamp(lo, hi);
    (m + midpoint(s, lo, hi)) / 2
}

fn mid_and_median(s: &[Sample], lo: i64, hi: i64) -> i64 {
    let m = median(&mut offsets(s)).clamp(lo, hi);
    (m + midpoint(s, lo, hi)) / 2
}

fn mid_and_filtered(s: &[Sample], lo: i64, hi: i64) -> i64 {
    let m = mean(&filtered(s, 2)).clamp(lo, hi);
    (m + midpoint(s, lo, hi)) / 2
}

fn median_with_mid(s: &[Sample], lo: i64, hi: i64) -> i64 {
    let mut v = offsets(s);
    v.push(midpoint(s, lo, hi));
    median(&mut v)
}

fn blend(s: &[Sample], lo: i64, hi: i64, mid_weight: i64) -> i64 {
    let m = median(&mut offsets(s)).clamp(lo, hi);
    (m * (4 - mid_weight) + midpoint(s, lo, hi) * mid_weight) / 4
}

/// Each sample's interval clipped to the intersection, and the midpoints
/// of what is left: a wide (noisy) sample collapses to the intersection's
/// midpoint.
fn clipped_midpoints(s: &[Sample], lo: i64, hi: i64) -> Vec<i64> {
    s.iter()
        .map(|x| {
            let o = x.offset().as_nanos();
            let half = x.rtt().as_nanos() / 2;
            let (a, b) = ((o - half).max(lo), (o + half).min(hi));
            a + (b - a) / 2
        })
        .collect()
}

fn clipped_midpoints_median(s: &[Sample], lo: i64, hi: i64) -> i64 {
    median(&mut clipped_midpoints(s, lo, hi))
}

fn clipped_midpoints_mean(s: &[Sample], lo: i64, hi: i64) -> i64 {
    mean(&clipped_midpoints(s, lo, hi))
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/lab/runs.jsonl".into());
    let text = std::fs::read_to_string(&path).expect("read the dump");
    let candidates: [(&str, Candidate); 15] = [
        ("3/4 midpoint + 1/4 median", |s, lo, hi| blend(s, lo, hi, 3)),
        ("1/4 midpoint + 3/4 median", |s, lo, hi| blend(s, lo, hi, 1)),
        ("median of clipped midpoints", clipped_midpoints_median),
        ("mean of clipped midpoints", clipped_midpoints_mean),
        ("(midpoint + median) / 2", mid_and_median),
        ("(midpoint + mean rtt ≤ 2×min) / 2", mid_and_filtered),
        ("median of offsets and midpoint", median_with_mid),
        ("midpoint (intersection)", midpoint),
        ("mean of all", mean_all),
        ("mean, rtt ≤ 3×min (combined)", mean_filtered3),
        ("mean, rtt ≤ 2×min", mean_filtered2),
        ("median", median_all),
        ("weighted 1/rtt²", weighted),
        ("(midpoint + mean) / 2", mid_and_mean),
        ("min-rtt sample", |s, _, _| {
            sync::min_rtt_sample(s).map_or(0, |(_, x)| x.offset().as_nanos())
        }),
    ];
    // scenario -> candidate -> (errors, bounds)
    let mut table: BTreeMap<String, BTreeMap<&str, Figures>> = BTreeMap::new();
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line).expect("json line");
        let scenario = row["scenario"].as_str().unwrap_or("?").to_string();
        let run = &row["run"];
        let samples: Vec<Sample> = run["probes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Sample::new(ts(p, "ts1"), ts(p, "ts2"), ts(p, "ts3"), ts(p, "ts4")).ok()
            })
            .collect();
        let now = (!run["now"].is_null())
            .then(|| {
                NowExchange::new(
                    ts(&run["now"], "sent"),
                    ts(&run["now"], "server_time"),
                    ts(&run["now"], "received"),
                )
                .ok()
            })
            .flatten();
        let Ok(x) = sync::estimate(
            &samples,
            now.as_ref(),
            Estimator::Intersection,
            &SyncParams::default(),
        ) else {
            continue;
        };
        let (lo, hi) = (x.low.as_nanos(), x.high.as_nanos());
        for (name, f) in candidates {
            let e = f(&samples, lo, hi).clamp(lo, hi);
            let bound = (e - lo).max(hi - e);
            let entry = table
                .entry(scenario.clone())
                .or_default()
                .entry(name)
                .or_default();
            entry.0.push(e - TRUTH);
            entry.1.push(bound);
        }
    }
    println!(
        "| scenario | estimator | median abs error (µs) | median error (µs) | median bound (µs) |"
    );
    println!("|---|---|---|---|---|");
    for (scenario, rows) in &table {
        for (name, _) in candidates {
            let (errs, bounds) = &rows[name];
            let mut abs: Vec<i64> = errs.iter().map(|e| e.abs()).collect();
            let mut signed = errs.clone();
            let mut b = bounds.clone();
            println!(
                "| {scenario} | {name} | {:.1} | {:.1} | {:.1} |",
                median(&mut abs) as f64 / 1e3,
                median(&mut signed) as f64 / 1e3,
                median(&mut b) as f64 / 1e3
            );
        }
    }
}
