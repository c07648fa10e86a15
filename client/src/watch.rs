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
//! With several servers, each round asks them all at once and the clock
//! follows their combined answer, never a falseticker's. A source whose
//! status changes (it falls silent, starts lying, comes back) is reported
//! in a line of its own, once, when it changes.
//!
//! Each source keeps a history of its syncs ([`service::filter`]): the
//! offset reported is the filter's (set membership over the window,
//! inside the honest interval of every sample widened by drift), with the
//! frequency it finds and a flag when a step is seen. `--watch auto`
//! chooses the interval as [`service::filter::next_interval`] says.
//!
//! A round with no answer is reported and tried again later, the wait
//! doubling up to 64 intervals (quadrupling after a Kiss-o'-Death RATE);
//! when every source has denied us (DENY, RSTR) the watch ends (exit 1).
//! Ctrl-C or SIGTERM ends it cleanly (exit 0), as does `--count`.

use crate::cli::Polling;
use crate::daemon::{Applied, Daemon};
use crate::{ClockAction, Exit, Failure, apply, clock_failure, report};
use serde::Serialize;
use service::clock::Clock;
use service::discipline::Discipline;
use service::ensemble::{Combined, Ensemble, Filters, Round, Status};
use service::filter::{self, FilterConfig};
use service::source::spread;
use service::time::{Nanos, Timestamp};
use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

/// `+41.203 ppm` from parts per billion, without going through a float.
pub fn ppm(ppb: i64) -> String {
    let sign = if ppb < 0 { '-' } else { '+' };
    let m = ppb.unsigned_abs();
    format!("{sign}{}.{:03} ppm", m / 1_000, m % 1_000)
}

/// A source's status in a `--watch --json` line.
#[derive(Serialize)]
struct WatchSource {
    source: String,
    status: &'static str,
}

/// One line of `--watch --json`.
#[derive(Serialize, Default)]
struct WatchLine {
    schema: u32,
    time: String,
    /// One source: its address.
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<&'static str>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_bound_ns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drift_ppm: Option<f64>,
    /// The filter's view: the local clock's frequency error (positive
    /// when fast), its uncertainty, the samples it rests on, and whether
    /// the newest sync shows a step.
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_ppm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_uncertainty_ppm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    samples_in_window: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    step_detected: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_poll_ms: Option<u128>,
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
    /// Several sources: how many answered and agreed.
    #[serde(skip_serializing_if = "Option::is_none")]
    answered: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agreeing: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sources: Option<Vec<WatchSource>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
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

/// What one line says, whichever form it takes.
struct Line<'a> {
    single: bool,
    ensemble: &'a Ensemble,
    round: &'a Round,
}

impl Line<'_> {
    /// The fields every line of this round shares.
    fn base(&self, time: Timestamp, status: &'static str) -> WatchLine {
        let member = &self.ensemble.members()[0];
        let (server, protocol) = if self.single {
            (
                Some(member.source.server().to_string()),
                Some(member.source.wire().scheme()),
            )
        } else {
            (None, None)
        };
        let sources = (!self.single).then(|| {
            self.ensemble
                .members()
                .iter()
                .enumerate()
                .map(|(i, m)| WatchSource {
                    source: m.name(),
                    status: self.round.status(i).name(),
                })
                .collect()
        });
        WatchLine {
            schema: report::JSON_SCHEMA_VERSION,
            time: time.to_string(),
            server,
            protocol,
            status,
            answered: (!self.single).then(|| self.round.answered()),
            sources,
            ..WatchLine::default()
        }
    }

    /// Samples used and lost over the sources that answered.
    fn samples(&self) -> (usize, u32) {
        self.round
            .results
            .iter()
            .flatten()
            .fold((0, 0), |(u, l), r| (u + r.samples.len(), l + r.lost))
    }

    /// The filter's view of the round.
    fn filter(&self) -> Option<&filter::Estimate> {
        if self.single {
            self.round.filtered(0)
        } else {
            self.round.selected_filter()
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn synced(
        &self,
        out: &mut dyn Write,
        json: bool,
        c: &Combined,
        drift_ppb: Option<i64>,
        correction_ppb: Option<i64>,
        action: ClockAction,
        next: Duration,
    ) -> std::io::Result<()> {
        let (used, lost) = self.samples();
        let view = self.filter();
        // The filter's frequency is the offset's slope: a clock running
        // fast sees the offset fall.
        let frequency = view.and_then(|v| v.frequency_ppb).map(|f| -f);
        if json {
            let (name, amount) = action_parts(action);
            let line = WatchLine {
                frequency_ppm: frequency.map(|f| f as f64 / 1e3),
                frequency_uncertainty_ppm: view
                    .and_then(|v| v.frequency_uncertainty_ppb)
                    .map(|f| f as f64 / 1e3),
                samples_in_window: view.map(|v| v.samples),
                step_detected: view.map(|v| v.step_detected),
                next_poll_ms: Some(next.as_millis()),
                offset_ns: Some(c.offset.as_nanos()),
                error_bound_ns: Some(c.bound().as_nanos()),
                drift_ppm: drift_ppb.map(|p| p as f64 / 1e3),
                frequency_correction_ppm: correction_ppb.map(|p| p as f64 / 1e3),
                action: Some(name),
                correction_ns: amount,
                samples_used: Some(used),
                samples_lost: Some(lost),
                agreeing: (!self.single).then_some(c.agreeing),
                ..self.base(c.reference, "synced")
            };
            serde_json::to_writer(&mut *out, &line)?;
            writeln!(out)?;
        } else {
            write!(
                out,
                "{}  offset {:+#} ± {}",
                c.reference,
                c.offset,
                c.bound()
            )?;
            if !self.single {
                write!(out, "  ({} of {} agree)", c.agreeing, c.answered)?;
            }
            match (frequency, drift_ppb) {
                (Some(f), _) => write!(
                    out,
                    "  frequency {} ± {:.3}",
                    ppm(f),
                    view.and_then(|v| v.frequency_uncertainty_ppb).unwrap_or(0) as f64 / 1e3
                )?,
                (None, Some(d)) => write!(out, "  drift {}", ppm(d))?,
                (None, None) => write!(out, "  drift (measuring)")?,
            }
            if view.is_some_and(|v| v.step_detected) {
                write!(out, "  step seen")?;
            }
            if let Some(what) = report::describe_action(action) {
                write!(out, "  {what}")?;
            }
            writeln!(out, "  ({used} samples, {lost} lost)")?;
        }
        out.flush()
    }

    fn missed(
        &self,
        out: &mut dyn Write,
        json: bool,
        at: Timestamp,
        error: &str,
        next: Duration,
    ) -> std::io::Result<()> {
        if json {
            let status = match self.round.answered() {
                0 => "no_answer",
                _ => "no_majority",
            };
            let line = WatchLine {
                error: Some(error.to_string()),
                next_try_ms: Some(next.as_millis()),
                ..self.base(at, status)
            };
            serde_json::to_writer(&mut *out, &line)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{at}  {error}; next try in {:.1}s", next.as_secs_f64())?;
        }
        out.flush()
    }
}

/// The watch loop; see the module documentation.
pub async fn run(
    plan: &crate::cli::Plan,
    ensemble: &Ensemble,
    daemon: &Daemon,
    clock: Arc<dyn Clock>,
    polling: Polling,
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
    let single = crate::single(plan, ensemble);
    let names = ensemble.names();
    let correcting = plan.discipline.correct;
    let baseline = if correcting {
        match daemon.drift_at_start() {
            // Start from what the drift file says the clock needs.
            Some(d) => {
                let ppb = (-d.frequency_ppm * 1e3).round() as i64;
                clock.set_frequency(ppb).map_err(clock_failure)?;
                ppb
            }
            None => clock.frequency().map_err(clock_failure)?,
        }
    } else {
        // Read only to know what the measured rate includes; 0 if the
        // clock will not say.
        clock.frequency().unwrap_or(0)
    };
    daemon.set_baseline(baseline);
    let mut discipline = Discipline::new(plan.discipline, baseline);
    let mut filters = Filters::new(
        ensemble,
        FilterConfig {
            max_drift_ppm: plan.options.params.max_drift_ppm,
            ..FilterConfig::default()
        },
    );
    let mut interval = polling.first();
    let mut wait = interval;
    let mut syncs = 0u64;
    let mut last_status: Vec<Option<Status>> = vec![None; names.len()];
    tokio::pin!(shutdown);
    loop {
        let round = tokio::select! {
            () = &mut shutdown => return Ok(()),
            round = ensemble.sync(&plan.options) => round,
        };
        // Cancel the slew under way to learn how much of it is left: the
        // discipline needs to know what took effect, and the filter what
        // the clock's correction was while the samples were taken.
        let slew_left = if correcting {
            clock.slew(Nanos::ZERO).map_err(clock_failure)?
        } else {
            Nanos::ZERO
        };
        discipline.settle(slew_left);
        let round = filters.apply(ensemble, round, discipline.correction(clock.now()));
        let line = Line {
            single,
            ensemble,
            round: &round,
        };
        if !single && !plan.json {
            written(report_changes(
                out,
                &round,
                &names,
                &mut last_status,
                clock.now(),
            ))?;
        }
        match round.combined() {
            Some(c) => {
                let update = discipline.update(c.reference, c.offset, Nanos::ZERO);
                let (action, error) = apply(&*clock, update.action, update.set_frequency_ppb);
                let correction = correcting.then(|| discipline.frequency_ppb());
                let applied = match action {
                    ClockAction::Stepped(by) => Applied {
                        step: by,
                        ..Applied::default()
                    },
                    ClockAction::Slewed(by) => Applied {
                        slew: by,
                        ..Applied::default()
                    },
                    _ => Applied::default(),
                };
                interval = match polling {
                    Polling::Every(d) => d,
                    Polling::Auto { min, max } => {
                        filter::next_interval(interval, line.filter(), min, max)
                    }
                };
                wait = interval;
                daemon.record(ensemble, &round, line.filter(), correction, applied, wait);
                written(line.synced(
                    out,
                    plan.json,
                    &c,
                    update.drift_ppb,
                    correction,
                    action,
                    wait,
                ))?;
                if let Some(e) = error {
                    return Err(clock_failure(e));
                }
            }
            None => {
                // A server that asks us to slow down gets four times the
                // wait at once; one that denies us is asked no more.
                let rate_limited = (0..names.len()).any(|i| round.status(i) == Status::RateLimited);
                let factor = if rate_limited { 4 } else { 2 };
                wait = (wait * factor).min(polling.longest());
                daemon.record(ensemble, &round, None, None, Applied::default(), wait);
                let why = round.failure(&names).unwrap_or_else(|| "no answer".into());
                written(line.missed(out, plan.json, clock.now(), &why, wait))?;
                if ensemble
                    .members()
                    .iter()
                    .all(|m| m.source.stopped_by().is_some())
                {
                    return Err(Failure::new(
                        Exit::NoAnswer,
                        anyhow::anyhow!("every server denies us access; no longer asking"),
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

/// Writes a line for each source whose status changed since the last
/// round (on the first round, for each that does not agree).
fn report_changes(
    out: &mut dyn Write,
    round: &Round,
    names: &[String],
    last: &mut [Option<Status>],
    at: Timestamp,
) -> std::io::Result<()> {
    for (i, name) in names.iter().enumerate() {
        let now = round.status(i);
        let agreeing = |s: Status| matches!(s, Status::Selected | Status::Agrees);
        let changed = match last[i] {
            None => !agreeing(now),
            // Selected and agrees trade places as bounds vary: not news.
            Some(before) => before != now && !(agreeing(before) && agreeing(now)),
        };
        if changed {
            match (last[i], &round.results[i]) {
                (Some(before), Err(e)) => writeln!(out, "{at}  {name}: {now} (was {before}): {e}")?,
                (Some(before), Ok(_)) => writeln!(out, "{at}  {name}: {now} (was {before})")?,
                (None, Err(e)) => writeln!(out, "{at}  {name}: {now}: {e}")?,
                (None, Ok(_)) => writeln!(out, "{at}  {name}: {now}")?,
            }
        }
        last[i] = Some(now);
    }
    Ok(())
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
