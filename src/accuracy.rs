//! Measuring accuracy: run the real `fient` against the real `cerv`, whose
//! clock is skewed by a known amount, through the relay, many times, over
//! UDP, TCP or TLS ([`measure_wire`]).

use crate::certs::TestCerts;
use crate::harness::{self, Cerv};
use crate::relay::Relay;
use crate::scenario::Scenario;
use service::source::Wire;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

/// The true offset every run must find: cerv is started with this skew.
pub const TRUTH_NS: i64 = 250_000_000;

/// What one `fient` run said.
#[derive(Clone, Debug)]
pub struct Run {
    /// fient exited 0.
    pub synced: bool,
    /// Estimate minus truth, for the chosen estimator.
    pub error_ns: i64,
    /// The stated bound.
    pub bound_ns: i64,
    /// The truth lay inside `[offset_low, offset_high]`.
    pub contained: bool,
    /// The whole process, start to exit.
    pub wall: Duration,
    /// Requests that got no answer.
    pub lost: u64,
    /// Each probe: (rtt, offset error), nanoseconds.
    pub probes: Vec<(i64, i64)>,
    /// Time from the start of the sync to its first probe: the connection
    /// and its TLS handshake on a stream wire, next to nothing on UDP.
    /// From fient's own clock readings: `elapsed_ns` less the span from
    /// the first probe's ts1 to the last reply.
    pub setup_ns: Option<i64>,
    /// Every estimator: (error, bound, contained).
    pub estimates: BTreeMap<String, (i64, i64, bool)>,
    /// stderr, for failures.
    pub stderr: String,
    /// The JSON document as printed.
    pub raw: String,
}

fn int(v: &serde_json::Value, k: &str) -> i64 {
    v[k].as_i64().unwrap_or(0)
}

/// Parses one `fient --json` run.
pub fn parse_run(finished: &harness::Finished, truth_ns: i64) -> Run {
    let synced = finished.code() == Some(0);
    let doc: serde_json::Value = serde_json::from_str(finished.stdout.trim()).unwrap_or_default();
    let contained_in = |e: &serde_json::Value| {
        int(e, "offset_low_ns") <= truth_ns && truth_ns <= int(e, "offset_high_ns")
    };
    let probes = doc["probes"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| (int(p, "rtt_ns"), int(p, "offset_ns") - truth_ns))
                .collect()
        })
        .unwrap_or_default();
    let estimates = doc["estimates"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(name, e)| {
                    (
                        name.clone(),
                        (
                            int(e, "offset_ns") - truth_ns,
                            int(e, "error_bound_ns"),
                            contained_in(e),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let first_ts1 = doc["probes"][0]["ts1"].as_i64();
    let last = doc["now"]["received"]
        .as_i64()
        .or_else(|| doc["probes"].as_array()?.last()?["ts4"].as_i64());
    let setup_ns = match (doc["elapsed_ns"].as_i64(), first_ts1, last) {
        (Some(elapsed), Some(first), Some(last)) => Some(elapsed - (last - first)),
        _ => None,
    };
    Run {
        synced,
        setup_ns,
        error_ns: int(&doc, "offset_ns") - truth_ns,
        bound_ns: int(&doc, "error_bound_ns"),
        contained: synced && contained_in(&doc),
        wall: finished.elapsed,
        lost: doc["samples_lost"].as_u64().unwrap_or(0),
        probes,
        estimates,
        stderr: finished.stderr.clone(),
        raw: if doc.is_null() {
            "null".into()
        } else {
            finished.stdout.trim().to_string()
        },
    }
}

/// Runs `fient` `runs` times against a fresh `cerv --offset +250ms`, through
/// a relay set up for `scenario` (a new seed each run).
pub fn measure(scenario: &Scenario, runs: usize, seed: u64, fient_args: &[&str]) -> Vec<Run> {
    measure_with(scenario, runs, seed, fient_args, &[])
}

/// Like [`measure`], with extra arguments for `cerv`.
pub fn measure_with(
    scenario: &Scenario,
    runs: usize,
    seed: u64,
    fient_args: &[&str],
    cerv_args: &[&str],
) -> Vec<Run> {
    measure_wire(scenario, Wire::Cerv, runs, seed, fient_args, cerv_args)
}

/// The name the lab gives a wire: `udp` for cerv's datagrams, else its
/// scheme.
pub fn wire_name(wire: Wire) -> &'static str {
    match wire {
        Wire::Cerv => "udp",
        other => other.scheme(),
    }
}

/// Whether `scenario` means the same on `wire`: a stream relay delays
/// (with jitter) but cannot lose, duplicate or reorder bytes.
pub fn fits(scenario: &Scenario, wire: Wire) -> bool {
    let clean =
        |d: &crate::relay::Direction| d.loss == 0.0 && d.duplicate == 0.0 && d.reorder == 0.0;
    !wire.is_stream()
        || scenario
            .impairment
            .is_none_or(|i| clean(&i.to_server) && clean(&i.to_client))
}

/// Like [`measure_with`], over `wire`: cerv's UDP wire, or TCP, or TLS
/// (with a test certificate, fient given its CA), each through the relay
/// of its kind.
pub fn measure_wire(
    scenario: &Scenario,
    wire: Wire,
    runs: usize,
    seed: u64,
    fient_args: &[&str],
    cerv_args: &[&str],
) -> Vec<Run> {
    // Every run comes from 127.0.0.1, hundreds a second: no rate limit.
    let mut args: Vec<String> = ["--offset", "+250ms", "--rate-limit", "0"]
        .map(String::from)
        .to_vec();
    let certs = (wire == Wire::Tls).then(TestCerts::generate);
    match (&certs, wire) {
        (_, Wire::Tcp) => args.extend(["--tcp-listen".into(), "127.0.0.1:0".into()]),
        (Some(c), Wire::Tls) => args.extend([
            "--tls-listen".into(),
            "127.0.0.1:0".into(),
            "--tls-cert".into(),
            c.good.cert.display().to_string(),
            "--tls-key".into(),
            c.good.key.display().to_string(),
        ]),
        _ => {}
    }
    args.extend(cerv_args.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cerv = Cerv::start(&args);
    let server = match wire {
        Wire::Cerv | Wire::Ntp => cerv.addr,
        stream => cerv.stream_addr(stream),
    };
    let fient = harness::bin("fient");
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs {
        let seed = seed.wrapping_add(i as u64);
        let relay = scenario.impairment.map(|imp| {
            if wire.is_stream() {
                Relay::start_stream(server, imp, seed).expect("relay")
            } else {
                Relay::start(server, imp, seed).expect("relay")
            }
        });
        let addr = relay.as_ref().map_or(server, Relay::addr);
        let target = match wire {
            Wire::Cerv | Wire::Ntp => addr.to_string(),
            // The certificate is for localhost and 127.0.0.1.
            stream => format!("{stream}://{addr}"),
        };
        let mut cmd = Command::new(&fient);
        cmd.arg(&target).arg("--json").args(fient_args);
        if let Some(c) = &certs {
            cmd.arg("--ca").arg(&c.ca);
        }
        let finished = harness::run(&mut cmd, Duration::from_secs(30));
        out.push(parse_run(&finished, TRUTH_NS));
        drop(relay);
    }
    out
}

/// The median of a list (the lower middle for even lengths).
pub fn median<T: Copy + Ord>(values: &[T]) -> Option<T> {
    let mut v = values.to_vec();
    v.sort();
    v.get(v.len().saturating_sub(1) / 2).copied()
}

/// One scenario's figures for one estimator.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Runs made.
    pub runs: usize,
    /// Runs that synced.
    pub synced: usize,
    /// Runs where this estimator gave an answer (`mean-delay` needs the
    /// `now()` call, which loss can take away).
    pub measured: usize,
    /// Median |error| over synced runs, ns.
    pub median_abs_error_ns: i64,
    /// Median signed error, ns (shows bias, such as half the asymmetry).
    pub median_error_ns: i64,
    /// Largest |error|, ns.
    pub max_abs_error_ns: i64,
    /// Median bound, ns.
    pub median_bound_ns: i64,
    /// Runs whose bound contained the truth.
    pub contained: usize,
    /// Median wall time of the whole fient process.
    pub median_wall: Duration,
    /// Median round trip of the probes (all probes of synced runs), ns.
    pub median_rtt_ns: i64,
    /// Median time from the start of a sync to its first probe, ns.
    pub median_setup_ns: i64,
    /// Requests lost, over all runs.
    pub lost: u64,
}

/// Summarises runs using the estimator fient reported as its answer
/// (`None`) or one of the others by name.
pub fn summarise(runs: &[Run], estimator: Option<&str>) -> Summary {
    let figures: Vec<(i64, i64, bool)> = runs
        .iter()
        .filter(|r| r.synced)
        .filter_map(|r| match estimator {
            None => Some((r.error_ns, r.bound_ns, r.contained)),
            Some(name) => r.estimates.get(name).copied(),
        })
        .collect();
    let abs: Vec<i64> = figures.iter().map(|f| f.0.abs()).collect();
    let signed: Vec<i64> = figures.iter().map(|f| f.0).collect();
    let bounds: Vec<i64> = figures.iter().map(|f| f.1).collect();
    let walls: Vec<Duration> = runs.iter().map(|r| r.wall).collect();
    let synced = || runs.iter().filter(|r| r.synced);
    let rtts: Vec<i64> = synced()
        .flat_map(|r| r.probes.iter().map(|p| p.0))
        .collect();
    let setups: Vec<i64> = synced().filter_map(|r| r.setup_ns).collect();
    Summary {
        runs: runs.len(),
        synced: runs.iter().filter(|r| r.synced).count(),
        measured: figures.len(),
        median_abs_error_ns: median(&abs).unwrap_or(0),
        median_error_ns: median(&signed).unwrap_or(0),
        max_abs_error_ns: abs.iter().copied().max().unwrap_or(0),
        median_bound_ns: median(&bounds).unwrap_or(0),
        contained: figures.iter().filter(|f| f.2).count(),
        median_wall: median(&walls).unwrap_or_default(),
        median_rtt_ns: median(&rtts).unwrap_or(0),
        median_setup_ns: median(&setups).unwrap_or(0),
        lost: runs.iter().map(|r| r.lost).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3, 1, 2]), Some(2));
        assert_eq!(median(&[4, 1, 3, 2]), Some(2));
        assert_eq!(median::<i64>(&[]), None);
    }
}
