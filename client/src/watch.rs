//! `fient --watch INTERVAL`: a sync every interval, one line each.
//!
//! Without `--slew` it only reports: the offset, its bound, and the local
//! clock's frequency error estimated from how the offset moves from sync
//! to sync. With `--slew` it disciplines the clock through the
//! [`Clock`] trait: each offset is slewed away (or stepped, above the
//! threshold), and once three syncs are in, the frequency is corrected so
//! that the clock stops drifting between syncs (see
//! [`service::discipline`]).
//!
//! A server that does not answer is reported and asked again later, the
//! wait doubling up to 64 intervals (quadrupling after a Kiss-o'-Death
//! RATE); a DENY or RSTR ends the watch (exit 1). Ctrl-C or SIGTERM ends
//! it cleanly (exit 0), as does `--count`.

use crate::{ClockAction, Exit, Failure, apply, clock_failure, report};
use serde::Serialize;
use service::clock::Clock;
use service::discipline::Discipline;
use service::source::{Source, SyncReport, spread};
use service::time::Nanos;
use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

/// The longest wait between tries while the server is away.
const MAX_BACKOFF: u32 = 64;

/// `+41.203 ppm` from parts per billion, without going through a float.
pub fn ppm(ppb: i64) -> String {
    let sign = if ppb < 0 { '-' } else { '+' };
    let m = ppb.unsigned_abs();
    format!("{sign}{}.{:03} ppm", m / 1_000, m % 1_000)
}

/// One line of `--watch --json`.
#[derive(Serialize)]
struct WatchLine<'a> {
    schema: u32,
    time: String,
    server: String,
    protocol: &'static str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_bound_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drift_ppm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_correction_ppm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correction_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    samples_used: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    samples_lost: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_try_ms: Option<u128>,
}

fn action_parts(action: ClockAction) -> (&'static str, Option<i64>) {
    match action {
        ClockAction::None => ("none", None),
        ClockAction::Stepped(by) => ("stepped", Some(by.as_nanos())),
        ClockAction::Slewed(by) => ("slewed", Some(by.as_nanos())),
        ClockAction::TooLarge(by) => ("too_large", Some(by.as_nanos())),
        ClockAction::Refused => ("refused", None),
    }
}

/// Writes the line of one successful sync.
fn write_synced(
    out: &mut dyn Write,
    json: bool,
    report: &SyncReport,
    drift_ppb: Option<i64>,
    correction_ppb: Option<i64>,
    action: ClockAction,
) -> std::io::Result<()> {
    let e = &report.estimate;
    if json {
        let (name, amount) = action_parts(action);
        let line = WatchLine {
            schema: report::JSON_SCHEMA_VERSION,
            time: report.local_time().to_string(),
            server: report.server.to_string(),
            protocol: report.wire.scheme(),
            status: "synced",
            offset_ns: Some(e.offset.as_nanos()),
            error_bound_ns: Some(e.bound().as_nanos()),
            drift_ppm: drift_ppb.map(|p| p as f64 / 1e3),
            frequency_correction_ppm: correction_ppb.map(|p| p as f64 / 1e3),
            action: Some(name),
            correction_ns: amount,
            samples_used: Some(report.samples.len()),
            samples_lost: Some(report.lost),
            error: None,
            next_try_ms: None,
        };
        serde_json::to_writer(&mut *out, &line)?;
        writeln!(out)?;
    } else {
        write!(
            out,
            "{}  offset {:+#} ± {}",
            report.local_time(),
            e.offset,
            e.bound()
        )?;
        match drift_ppb {
            Some(d) => write!(out, "  drift {}", ppm(d))?,
            None => write!(out, "  drift (measuring)")?,
        }
        if let Some(what) = report::describe_action(action) {
            write!(out, "  {what}")?;
        }
        writeln!(
            out,
            "  ({} samples, {} lost)",
            report.samples.len(),
            report.lost
        )?;
    }
    out.flush()
}

/// Writes the line of a sync that got no answer.
fn write_missed(
    out: &mut dyn Write,
    json: bool,
    at: service::Timestamp,
    source: &Source,
    error: &str,
    next: Duration,
) -> std::io::Result<()> {
    if json {
        let line = WatchLine {
            schema: report::JSON_SCHEMA_VERSION,
            time: at.to_string(),
            server: source.server().to_string(),
            protocol: source.wire().scheme(),
            status: "no_answer",
            offset_ns: None,
            error_bound_ns: None,
            drift_ppm: None,
            frequency_correction_ppm: None,
            action: None,
            correction_ns: None,
            samples_used: None,
            samples_lost: None,
            error: Some(error),
            next_try_ms: Some(next.as_millis()),
        };
        serde_json::to_writer(&mut *out, &line)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{at}  {error}; next try in {:.1}s", next.as_secs_f64())?;
    }
    out.flush()
}

/// The watch loop; see the module documentation.
pub async fn run(
    plan: &crate::cli::Plan,
    source: &Source,
    clock: Arc<dyn Clock>,
    interval: Duration,
    out: &mut (dyn Write + Send),
    shutdown: impl Future<Output = ()>,
) -> Result<(), Failure> {
    let written = |r: std::io::Result<()>| {
        r.map_err(|e| {
            Failure::new(
                Exit::NoAnswer,
                anyhow::anyhow!("cannot write the report: {e}"),
            )
        })
    };
    let correcting = plan.discipline.correct;
    let baseline = if correcting {
        clock.frequency().map_err(clock_failure)?
    } else {
        0
    };
    let mut discipline = Discipline::new(plan.discipline, baseline);
    let mut wait = interval;
    let mut syncs = 0u64;
    tokio::pin!(shutdown);
    loop {
        let outcome = tokio::select! {
            () = &mut shutdown => return Ok(()),
            outcome = source.sync(&plan.options) => outcome,
        };
        match outcome {
            Ok(report) => {
                // Cancel the slew under way to learn how much of it is left:
                // the discipline needs to know what took effect.
                let slew_left = if correcting {
                    clock.slew(Nanos::ZERO).map_err(clock_failure)?
                } else {
                    Nanos::ZERO
                };
                let update =
                    discipline.update(report.local_time(), report.estimate.offset, slew_left);
                let (action, error) = apply(&*clock, update.action, update.set_frequency_ppb);
                let correction = correcting.then(|| discipline.frequency_ppb());
                written(write_synced(
                    out,
                    plan.json,
                    &report,
                    update.drift_ppb,
                    correction,
                    action,
                ))?;
                if let Some(e) = error {
                    return Err(clock_failure(e));
                }
                wait = interval;
            }
            Err(e) => {
                // A server that asks us to slow down gets four times the
                // wait at once; one that denies us is asked no more.
                let factor = if e.kiss().is_some() { 4 } else { 2 };
                wait = (wait * factor).min(interval * MAX_BACKOFF);
                written(write_missed(
                    out,
                    plan.json,
                    clock.now(),
                    source,
                    &e.to_string(),
                    wait,
                ))?;
                if let Some(kiss) = source.stopped_by() {
                    return Err(Failure::new(
                        Exit::NoAnswer,
                        anyhow::anyhow!("{}: {kiss}; no longer asking it", source.name()),
                    ));
                }
            }
        }
        syncs += 1;
        if plan.count > 0 && syncs >= plan.count {
            return Ok(());
        }
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(spread(wait)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppm_formats_exactly() {
        assert_eq!(ppm(41_203), "+41.203 ppm");
        assert_eq!(ppm(-5), "-0.005 ppm");
        assert_eq!(ppm(0), "+0.000 ppm");
        assert_eq!(ppm(-500_000), "-500.000 ppm");
    }
}
