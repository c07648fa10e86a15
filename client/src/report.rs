//! Two renderings of one sync: a table for people, one JSON object for
//! programs. Both are built from the same [`SyncReport`]; the JSON schema is
//! documented in the README and checked by the end-to-end tests.

use crate::ClockAction;
use serde::Serialize;
use service::ensemble::{Ensemble, Round, Status};
use service::ntp::ServerState;
use service::source::{SyncError, SyncReport};
use service::sync::Estimator;
use service::time::{Nanos, Timestamp};
use std::collections::BTreeMap;
use std::io::{self, Write};

/// Version of the JSON document; bumped on incompatible changes.
pub const JSON_SCHEMA_VERSION: u32 = 1;

/// One probe exchange in the JSON report.
#[derive(Serialize)]
struct JsonProbe {
    ts1: i64,
    ts2: i64,
    ts3: i64,
    ts4: i64,
    rtt_ns: i64,
    delay_ns: i64,
    offset_ns: i64,
}

#[derive(Serialize)]
struct JsonNow {
    sent: i64,
    server_time: i64,
    received: i64,
    rtt_ns: i64,
}

#[derive(Serialize)]
struct JsonEstimate {
    offset_ns: i64,
    error_bound_ns: i64,
    offset_low_ns: i64,
    offset_high_ns: i64,
}

#[derive(Serialize)]
struct JsonClock {
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    step_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slew_ns: Option<i64>,
}

/// The `clock` member of the JSON documents.
fn json_clock(action: ClockAction) -> JsonClock {
    let (name, step, slew) = match action {
        ClockAction::None => ("none", None, None),
        ClockAction::Stepped(by) => ("stepped", Some(by.as_nanos()), None),
        ClockAction::Slewed(by) => ("slewed", None, Some(by.as_nanos())),
        ClockAction::TooLarge(_) => ("too_large", None, None),
        ClockAction::Refused => ("refused", None, None),
    };
    JsonClock {
        action: name,
        step_ns: step,
        slew_ns: slew,
    }
}

/// How the human report says what was done to the clock.
pub fn describe_action(action: ClockAction) -> Option<String> {
    match action {
        ClockAction::None => None,
        ClockAction::Stepped(by) => Some(format!("stepped by {by:+#}")),
        ClockAction::Slewed(by) => Some(format!("slewing by {by:+#}")),
        ClockAction::TooLarge(by) => {
            Some(format!("not changed ({by:+} is beyond --max-correction)"))
        }
        ClockAction::Refused => Some("not changed".into()),
    }
}

/// What an NTP server said of its clock, flattened into the report.
#[derive(Serialize)]
struct JsonServerClock {
    stratum: u8,
    reference_id: String,
    leap: &'static str,
    root_delay_ns: i64,
    root_dispersion_ns: i64,
}

fn json_server_clock(state: &Option<ServerState>) -> Option<JsonServerClock> {
    state.map(|s| JsonServerClock {
        stratum: s.stratum,
        reference_id: s.reference_id.display(s.stratum),
        leap: s.leap.name(),
        root_delay_ns: s.root_delay.as_nanos(),
        root_dispersion_ns: s.root_dispersion.as_nanos(),
    })
}

/// The `--json` document.
#[derive(Serialize)]
struct JsonReport {
    schema: u32,
    status: &'static str,
    server: String,
    protocol: &'static str,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    server_clock: Option<JsonServerClock>,
    estimator: &'static str,
    offset_ns: i64,
    error_bound_ns: i64,
    offset_low_ns: i64,
    offset_high_ns: i64,
    mean_delay_ns: i64,
    min_rtt_ns: i64,
    samples_used: usize,
    samples_lost: u32,
    samples_rejected: u32,
    local_time: String,
    server_time: Option<String>,
    synchronized_time: String,
    elapsed_ns: i64,
    probes: Vec<JsonProbe>,
    now: Option<JsonNow>,
    estimates: BTreeMap<&'static str, JsonEstimate>,
    clock: JsonClock,
    sources: Vec<JsonSource>,
}

/// The `--json` document for a failed sync of one source.
#[derive(Serialize)]
struct JsonFailure {
    schema: u32,
    status: &'static str,
    server: String,
    protocol: &'static str,
    error: String,
    sources: Vec<JsonSource>,
}

/// One source in the `sources` array.
#[derive(Serialize)]
struct JsonSource {
    source: String,
    server: String,
    protocol: &'static str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<usize>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    server_clock: Option<JsonServerClock>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_bound_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset_low_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset_high_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_rtt_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    samples_used: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    samples_lost: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The `--json` document of several sources (or a pool).
#[derive(Serialize)]
struct JsonRound {
    schema: u32,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_bound_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset_low_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset_high_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    local_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    synchronized_time: Option<String>,
    answered: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    agreeing: Option<usize>,
    needed: usize,
    combine: &'static str,
    elapsed_ns: i64,
    sources: Vec<JsonSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    clock: Option<JsonClock>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Each source of a round, as the `sources` array lists them.
fn json_sources(ensemble: &Ensemble, round: &Round) -> Vec<JsonSource> {
    ensemble
        .members()
        .iter()
        .zip(&round.results)
        .enumerate()
        .map(|(i, (member, result))| {
            let status = round.status(i);
            let report = result.as_ref().ok();
            let e = report.map(|r| r.estimate);
            JsonSource {
                source: member.name(),
                server: member.source.server().to_string(),
                protocol: member.source.wire().scheme(),
                status: status.name(),
                group: match status {
                    Status::NoMajority(g) => Some(g),
                    _ => None,
                },
                server_clock: report.and_then(|r| json_server_clock(&r.server_state)),
                offset_ns: e.map(|e| e.offset.as_nanos()),
                error_bound_ns: e.map(|e| e.bound().as_nanos()),
                offset_low_ns: e.map(|e| e.low.as_nanos()),
                offset_high_ns: e.map(|e| e.high.as_nanos()),
                min_rtt_ns: report.map(|r| r.min_rtt.as_nanos()),
                samples_used: report.map(|r| r.samples.len()),
                samples_lost: report.map(|r| r.lost),
                error: result.as_ref().err().map(ToString::to_string),
            }
        })
        .collect()
}

fn json_estimate(e: &service::sync::Estimate) -> JsonEstimate {
    JsonEstimate {
        offset_ns: e.offset.as_nanos(),
        error_bound_ns: e.bound().as_nanos(),
        offset_low_ns: e.low.as_nanos(),
        offset_high_ns: e.high.as_nanos(),
    }
}

/// Writes a round as one line of JSON: for one source, its full report
/// (and the `sources` array); for several, the combined answer and each
/// source's figures and status. `action` is `None` when there is no
/// answer.
pub fn write_round_json(
    out: &mut dyn Write,
    ensemble: &Ensemble,
    round: &Round,
    action: Option<ClockAction>,
    single: bool,
) -> io::Result<()> {
    let sources = json_sources(ensemble, round);
    match (single, round.results.first(), action) {
        (true, Some(Ok(report)), Some(action)) => write_json(out, report, action, sources),
        (true, Some(Err(e)), _) => {
            let member = &ensemble.members()[0];
            let doc = JsonFailure {
                schema: JSON_SCHEMA_VERSION,
                status: failure_status(e),
                server: member.source.server().to_string(),
                protocol: member.source.wire().scheme(),
                error: e.to_string(),
                sources,
            };
            serde_json::to_writer(&mut *out, &doc)?;
            writeln!(out)
        }
        _ => {
            let combined = round.combined();
            let needed = match &round.selection {
                Ok(sel) => sel.needed,
                Err(service::select::SelectError::NoMajority { needed, .. }) => *needed,
                Err(_) => 0,
            };
            let status = match (&combined, round.answered()) {
                (Some(_), _) => "synced",
                (None, 0) => "no_answer",
                (None, _) => "no_majority",
            };
            let doc = JsonRound {
                schema: JSON_SCHEMA_VERSION,
                status,
                offset_ns: combined.map(|c| c.offset.as_nanos()),
                error_bound_ns: combined.map(|c| c.bound().as_nanos()),
                offset_low_ns: combined.map(|c| c.low.as_nanos()),
                offset_high_ns: combined.map(|c| c.high.as_nanos()),
                local_time: combined.map(|c| c.reference.to_string()),
                synchronized_time: combined.map(|c| c.synchronized_time().to_string()),
                answered: round.answered(),
                agreeing: combined.map(|c| c.agreeing),
                needed,
                combine: ensemble.params().combine.name(),
                elapsed_ns: Nanos::from_duration(round.elapsed).as_nanos(),
                sources,
                clock: action.map(json_clock),
                error: round.failure(&ensemble.names()),
            };
            serde_json::to_writer(&mut *out, &doc)?;
            writeln!(out)
        }
    }
}

/// Writes one source's report as one line of JSON.
fn write_json(
    out: &mut dyn Write,
    report: &SyncReport,
    action: ClockAction,
    sources: Vec<JsonSource>,
) -> io::Result<()> {
    let e = &report.estimate;
    let doc = JsonReport {
        schema: JSON_SCHEMA_VERSION,
        status: "synced",
        server: report.server.to_string(),
        protocol: report.wire.scheme(),
        server_clock: json_server_clock(&report.server_state),
        estimator: e.estimator.name(),
        offset_ns: e.offset.as_nanos(),
        error_bound_ns: e.bound().as_nanos(),
        offset_low_ns: e.low.as_nanos(),
        offset_high_ns: e.high.as_nanos(),
        mean_delay_ns: report.mean_delay.as_nanos(),
        min_rtt_ns: report.min_rtt.as_nanos(),
        samples_used: report.samples.len(),
        samples_lost: report.lost,
        samples_rejected: report.rejected,
        local_time: report.local_time().to_string(),
        server_time: report.now.map(|n| n.server_time.to_string()),
        synchronized_time: report.synchronized_time().to_string(),
        elapsed_ns: Nanos::from_duration(report.elapsed).as_nanos(),
        probes: report
            .samples
            .iter()
            .map(|s| JsonProbe {
                ts1: s.ts1().as_nanos(),
                ts2: s.ts2().as_nanos(),
                ts3: s.ts3().as_nanos(),
                ts4: s.ts4().as_nanos(),
                rtt_ns: s.rtt().as_nanos(),
                delay_ns: s.delay().as_nanos(),
                offset_ns: s.offset().as_nanos(),
            })
            .collect(),
        now: report.now.map(|n| JsonNow {
            sent: n.sent.as_nanos(),
            server_time: n.server_time.as_nanos(),
            received: n.received.as_nanos(),
            rtt_ns: n.rtt().as_nanos(),
        }),
        estimates: report
            .estimates
            .iter()
            .map(|e| (e.estimator.name(), json_estimate(e)))
            .collect(),
        clock: json_clock(action),
        sources,
    };
    serde_json::to_writer(&mut *out, &doc)?;
    writeln!(out)
}

/// The `status` of a failed sync: `no_answer`, `connect_failed`,
/// `tampered`, `rate_limited`, `denied`, `unsynchronized` or
/// `inconsistent`.
pub fn failure_status(error: &SyncError) -> &'static str {
    match (error, error.kiss()) {
        (_, Some(k)) if k.stops() => "denied",
        (_, Some(_)) => "rate_limited",
        (SyncError::NoAnswer(_), None) if error.unsynchronized() => "unsynchronized",
        (SyncError::NoAnswer(_), None) => "no_answer",
        (SyncError::Connect { .. }, None) => "connect_failed",
        (SyncError::Tampered { .. }, None) => "tampered",
        (SyncError::Estimate { .. }, None) => "inconsistent",
    }
}

/// Writes the human report: each probe, the seeds' figures, the estimate.
pub fn write_human(
    out: &mut dyn Write,
    report: &SyncReport,
    action: ClockAction,
) -> io::Result<()> {
    let e = &report.estimate;
    writeln!(
        out,
        "server {}{}: {} samples used, {} lost{}, in {:.1}ms",
        match report.wire {
            service::source::Wire::Cerv => String::new(),
            wire => format!("{wire}://"),
        },
        report.server,
        report.samples.len(),
        report.lost,
        if report.rejected > 0 {
            format!(", {} rejected", report.rejected)
        } else {
            String::new()
        },
        report.elapsed.as_secs_f64() * 1e3,
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "  #  {:<18}  {:<18}  {:<18}  {:<18}  {:>11}  {:>11}  {:>15}",
        "ts1 (local)", "ts2 (server)", "ts3 (server)", "ts4 (local)", "rtt", "delay", "offset"
    )?;
    for (i, s) in report.samples.iter().enumerate() {
        writeln!(
            out,
            "{:>3}  {}  {}  {}  {}  {:>11}  {:>11}  {:>15}",
            i + 1,
            s.ts1().time_of_day(),
            s.ts2().time_of_day(),
            s.ts3().time_of_day(),
            s.ts4().time_of_day(),
            s.rtt().to_string(),
            s.delay().to_string(),
            format!("{:+#}", s.offset()),
        )?;
    }
    writeln!(out)?;
    let line =
        |out: &mut dyn Write, label: &str, value: String| writeln!(out, "{label:<19} {value}");
    line(out, "mean one-way delay", report.mean_delay.to_string())?;
    line(out, "local time", report.local_time().to_string())?;
    match (report.now, report.flow_time()) {
        (Some(now), Some(flow)) => {
            line(
                out,
                "server time",
                format!("{}  (now(), rtt {})", now.server_time, now.rtt()),
            )?;
            line(out, "server + delay", format!("{flow}  (the classic flow)"))?;
            if report.wire.is_stream()
                && let Some((time, error)) = report.cristian()
            {
                line(
                    out,
                    "Cristian",
                    format!(
                        "{time}  (server time + rtt/2, error ±(rtt/2 − min) = ±{error}, min {})",
                        report.params.min_transfer
                    ),
                )?;
            }
        }
        _ => line(
            out,
            "server time",
            "unknown (the now() call got no answer)".into(),
        )?,
    }
    line(out, "synchronized time", stamp(report.synchronized_time()))?;
    if let Some(s) = report.server_state {
        line(
            out,
            "server clock",
            format!(
                "stratum {}, reference {}, leap {}, root delay {}, root dispersion {}, precision {} (all inside the bound)",
                s.stratum,
                s.reference_id.display(s.stratum),
                s.leap.name(),
                s.root_delay,
                s.root_dispersion,
                s.uncertainty().saturating_sub(s.root_distance())
            ),
        )?;
    }
    line(
        out,
        "offset",
        format!(
            "{:+#} ± {}  (server minus local, {})",
            e.offset,
            e.bound(),
            e.estimator
        ),
    )?;
    let others: Vec<String> = Estimator::ALL
        .into_iter()
        .filter(|&x| x != e.estimator)
        .filter_map(|x| report.estimate_of(x))
        .map(|o| format!("{} {:+#} ± {}", o.estimator, o.offset, o.bound()))
        .collect();
    if !others.is_empty() {
        line(out, "other estimators", others.join(", "))?;
    }
    if let Some(what) = describe_action(action) {
        line(out, "clock", what)?;
    }
    Ok(())
}

/// Writes a round for people: one row per source, then the combined
/// answer (or why there is none). `action` is `None` when there is no
/// answer.
pub fn write_round_human(
    out: &mut dyn Write,
    ensemble: &Ensemble,
    round: &Round,
    action: Option<ClockAction>,
) -> io::Result<()> {
    let names = ensemble.names();
    let width = names
        .iter()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(6)
        .max(6);
    writeln!(
        out,
        "{} sources, {} answered, in {:.1}ms",
        names.len(),
        round.answered(),
        round.elapsed.as_secs_f64() * 1e3
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "  {:<width$}  {:<4}  {:>17}  {:>11}  {:>11}  {:>7}  status",
        "source", "wire", "offset", "bound", "rtt", "samples"
    )?;
    for (i, (name, result)) in names.iter().zip(&round.results).enumerate() {
        let status = round.status(i);
        let mark = match status {
            Status::Selected => '*',
            Status::Agrees => '+',
            Status::Falseticker => 'x',
            Status::NoMajority(_) => '?',
            _ => ' ',
        };
        let wire = ensemble.members()[i].source.wire().scheme();
        match result {
            Ok(r) => writeln!(
                out,
                "{mark} {name:<width$}  {wire:<4}  {:>17}  {:>11}  {:>11}  {:>3}/{:<3}  {status}",
                format!("{:+#}", r.estimate.offset),
                format!("±{}", r.estimate.bound()),
                r.min_rtt.to_string(),
                r.samples.len(),
                r.lost,
            )?,
            Err(e) => writeln!(
                out,
                "{mark} {name:<width$}  {wire:<4}  {:>17}  {:>11}  {:>11}  {:>7}  {status}: {e}",
                "-", "-", "-", "-"
            )?,
        }
    }
    writeln!(out)?;
    let line =
        |out: &mut dyn Write, label: &str, value: String| writeln!(out, "{label:<19} {value}");
    match round.combined() {
        Some(c) => {
            line(
                out,
                "combined",
                format!(
                    "{:+#} ± {}  ({} of {} agree, {} needed; {})",
                    c.offset,
                    c.bound(),
                    c.agreeing,
                    c.answered,
                    c.needed,
                    ensemble.params().combine
                ),
            )?;
            line(out, "local time", c.reference.to_string())?;
            line(out, "synchronized time", stamp(c.synchronized_time()))?;
        }
        None => line(
            out,
            "combined",
            format!(
                "none: {}",
                round.failure(&names).unwrap_or_else(|| "no answer".into())
            ),
        )?,
    }
    if let Some(what) = action.and_then(describe_action) {
        line(out, "clock", what)?;
    }
    Ok(())
}

fn stamp(t: Timestamp) -> String {
    t.to_string()
}
