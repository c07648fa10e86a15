//! Two renderings of one sync: a table for people, one JSON object for
//! programs. Both are built from the same [`SyncReport`]; the JSON schema is
//! documented in the README and checked by the end-to-end tests.

use crate::ClockAction;
use serde::Serialize;
use service::ntp::ServerState;
use service::source::{Source, SyncError, SyncReport};
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
}

/// The `--json` document for a failed sync.
#[derive(Serialize)]
struct JsonFailure {
    schema: u32,
    status: &'static str,
    server: String,
    protocol: &'static str,
    error: String,
}

fn json_estimate(e: &service::sync::Estimate) -> JsonEstimate {
    JsonEstimate {
        offset_ns: e.offset.as_nanos(),
        error_bound_ns: e.bound().as_nanos(),
        offset_low_ns: e.low.as_nanos(),
        offset_high_ns: e.high.as_nanos(),
    }
}

/// Writes the report as one line of JSON.
pub fn write_json(out: &mut dyn Write, report: &SyncReport, action: ClockAction) -> io::Result<()> {
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
    };
    serde_json::to_writer(&mut *out, &doc)?;
    writeln!(out)
}

/// Writes the JSON document of a failed sync.
pub fn write_json_error(out: &mut dyn Write, source: &Source, error: &SyncError) -> io::Result<()> {
    let doc = JsonFailure {
        schema: JSON_SCHEMA_VERSION,
        status: failure_status(error),
        server: source.server().to_string(),
        protocol: source.wire().scheme(),
        error: error.to_string(),
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

fn stamp(t: Timestamp) -> String {
    t.to_string()
}
