//! The lab's several-servers scenario (`lab --several`): four NTP
//! servers on this host, two honest and direct, one honest behind the
//! jitter path, one lying by a second. The truth is an offset of 0 (every
//! server reads this host's clock, the liar adds +1 s), so each answer's
//! error is its offset.
//!
//! Measured, in the same run: fient with each way of combining the
//! agreeing sources (`--combine`), and `chronyd -Q` given the same four
//! servers (when chrony is there), as the anchor.

use crate::accuracy::{Run, median, parse_run};
use crate::harness::{Cerv, bin, run};
use crate::peers::{Peer, chronyd_query};
use crate::relay::{Direction, Impairment, Jitter, Relay};
use std::process::Command;
use std::time::{Duration, Instant};

/// How much the liar lies.
pub const LIE: &str = "+1s";

/// The four servers, running.
pub struct Four {
    servers: Vec<Cerv>,
    relay: Relay,
}

impl Four {
    /// Starts them; `seed` seeds the jitter path.
    pub fn start(seed: u64) -> std::io::Result<Four> {
        let ntp = |extra: &[&str]| {
            let mut args = vec!["--ntp-listen", "127.0.0.1:0", "--ntp-stratum", "1"];
            args.extend_from_slice(extra);
            Cerv::start(&args)
        };
        let servers = vec![ntp(&[]), ntp(&[]), ntp(&[]), ntp(&["--offset", LIE])];
        let jitter = Direction::delay(Duration::from_millis(2))
            .jitter(Jitter::Normal(Duration::from_micros(1500)));
        let relay = Relay::start(servers[2].ntp_addrs[0], Impairment::symmetric(jitter), seed)?;
        Ok(Four { servers, relay })
    }

    /// The four as NTP addresses: A and B direct, C through the jitter
    /// relay, D the liar.
    pub fn addrs(&self) -> Vec<std::net::SocketAddr> {
        vec![
            self.servers[0].ntp_addrs[0],
            self.servers[1].ntp_addrs[0],
            self.relay.addr(),
            self.servers[3].ntp_addrs[0],
        ]
    }

    /// The four as fient sources.
    pub fn sources(&self) -> Vec<String> {
        self.addrs().iter().map(|a| format!("ntp://{a}")).collect()
    }
}

/// One fient run over the four, combining with `combine`; also whether the
/// liar (the fourth source) was named a falseticker.
pub fn fient_run(four: &Four, combine: &str, extra: &[&str]) -> (Run, bool) {
    let mut cmd = Command::new(bin("fient"));
    cmd.args(four.sources())
        .args(["--json", "--combine", combine])
        .args(extra);
    let finished = run(&mut cmd, Duration::from_secs(30));
    let run = parse_run(&finished, 0);
    let doc: serde_json::Value = serde_json::from_str(finished.stdout.trim()).unwrap_or_default();
    let flagged = doc["sources"][3]["status"] == "falseticker";
    (run, flagged)
}

/// What one `chronyd -Q` run said: its error (it prints no bound) and how
/// long it took.
#[derive(Clone, Copy, Debug)]
pub struct ChronyRun {
    /// "System clock wrong by X seconds": X, in ns (the truth is 0).
    pub error_ns: Option<i64>,
    /// The whole process.
    pub wall: Duration,
}

/// One `chronyd -Q` over the same four, polling as fast as it allows (every
/// 1/16 s, four samples each) so that it is not made slow by its defaults.
pub fn chronyd_run(chronyd: &std::path::Path, four: &Four) -> ChronyRun {
    let mut conf = String::from("port 0\n");
    for a in four.addrs() {
        conf.push_str(&format!(
            "server {} port {} iburst minpoll -4 maxpoll -4 maxsamples 4\n",
            a.ip(),
            a.port()
        ));
    }
    let started = Instant::now();
    let out = chronyd_query(chronyd, &conf, Duration::from_secs(20));
    let wall = started.elapsed();
    let all = format!("{}{}", out.stdout, out.stderr);
    let error_ns = all
        .split("System clock wrong by ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        // "wrong by X": the clock is X behind the servers, an offset of +X.
        .map(|s| (s * 1e9).round() as i64);
    ChronyRun { error_ns, wall }
}

/// A line of the report's table.
pub struct Row {
    /// Who answered: `fient --combine NAME` or `chronyd -Q`.
    pub method: String,
    /// Runs made, and how many gave an answer.
    pub runs: usize,
    /// Runs that answered.
    pub answered: usize,
    /// Median |error| and the largest, ns.
    pub median_abs_error_ns: i64,
    /// The largest |error|, ns.
    pub max_abs_error_ns: i64,
    /// Median bound, ns (`None`: the method states none).
    pub median_bound_ns: Option<i64>,
    /// Runs whose bound held the truth.
    pub contained: Option<usize>,
    /// Runs that named the liar a falseticker.
    pub flagged: Option<usize>,
    /// Median time to answer.
    pub median_wall: Duration,
}

/// Summarises fient runs.
pub fn fient_row(combine: &str, runs: &[(Run, bool)]) -> Row {
    let ok: Vec<&Run> = runs.iter().map(|(r, _)| r).filter(|r| r.synced).collect();
    let abs: Vec<i64> = ok.iter().map(|r| r.error_ns.abs()).collect();
    let bounds: Vec<i64> = ok.iter().map(|r| r.bound_ns).collect();
    let walls: Vec<Duration> = runs.iter().map(|(r, _)| r.wall).collect();
    Row {
        method: format!("fient --combine {combine}"),
        runs: runs.len(),
        answered: ok.len(),
        median_abs_error_ns: median(&abs).unwrap_or(0),
        max_abs_error_ns: abs.iter().copied().max().unwrap_or(0),
        median_bound_ns: Some(median(&bounds).unwrap_or(0)),
        contained: Some(ok.iter().filter(|r| r.contained).count()),
        flagged: Some(runs.iter().filter(|(_, f)| *f).count()),
        median_wall: median(&walls).unwrap_or_default(),
    }
}

/// Summarises chronyd runs.
pub fn chrony_row(runs: &[ChronyRun]) -> Row {
    let abs: Vec<i64> = runs
        .iter()
        .filter_map(|r| r.error_ns)
        .map(i64::abs)
        .collect();
    let walls: Vec<Duration> = runs.iter().map(|r| r.wall).collect();
    Row {
        method: "chronyd -Q".into(),
        runs: runs.len(),
        answered: abs.len(),
        median_abs_error_ns: median(&abs).unwrap_or(0),
        max_abs_error_ns: abs.iter().copied().max().unwrap_or(0),
        median_bound_ns: None,
        contained: None,
        flagged: None,
        median_wall: median(&walls).unwrap_or_default(),
    }
}

/// The table's header.
pub const HEADER: &str = "| method | answered | median abs error (µs) | max abs error (µs) | median bound (µs) | bound contains truth | liar named falseticker | median time to answer (ms) |\n|---|---|---|---|---|---|---|---|";

impl Row {
    /// The row, in Markdown.
    pub fn markdown(&self) -> String {
        let us = |ns: i64| format!("{:.1}", ns as f64 / 1e3);
        let of =
            |n: Option<usize>| n.map_or("n/a".to_string(), |n| format!("{n}/{}", self.answered));
        format!(
            "| {} | {}/{} | {} | {} | {} | {} | {} | {:.1} |",
            self.method,
            self.answered,
            self.runs,
            us(self.median_abs_error_ns),
            us(self.max_abs_error_ns),
            self.median_bound_ns.map_or("n/a".into(), us),
            of(self.contained),
            self.flagged
                .map_or("n/a".to_string(), |n| format!("{n}/{}", self.runs)),
            self.median_wall.as_secs_f64() * 1e3,
        )
    }
}

/// Runs the scenario: `runs` of fient per way of combining, interleaved,
/// and as many of `chronyd -Q` when chrony is found. Returns the rows.
pub fn measure(runs: usize, seed: u64, fient_args: &[&str]) -> std::io::Result<Vec<Row>> {
    let four = Four::start(seed)?;
    let combines = ["weighted-mean", "midpoint", "best"];
    let mut fient: Vec<Vec<(Run, bool)>> = vec![Vec::new(); combines.len()];
    let chronyd = Peer::Chronyd.find();
    let mut chrony = Vec::new();
    for i in 0..runs {
        // Interleaved: each method sees the same spells of load.
        for (c, name) in combines.iter().enumerate() {
            fient[c].push(fient_run(&four, name, fient_args));
        }
        if let Some(chronyd) = &chronyd {
            chrony.push(chronyd_run(chronyd, &four));
        }
        if (i + 1) % 10 == 0 {
            eprintln!("several: {} of {runs} runs", i + 1);
        }
    }
    let mut rows: Vec<Row> = combines
        .iter()
        .zip(&fient)
        .map(|(name, runs)| fient_row(name, runs))
        .collect();
    if chronyd.is_some() {
        rows.push(chrony_row(&chrony));
    } else {
        eprintln!(
            "several: chronyd not found (Debian package chrony, unpacked by .ci/peers); no anchor"
        );
    }
    Ok(rows)
}
