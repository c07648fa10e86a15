//! fient, the client, as a library: the binary is a thin shell around
//! [`run`].
//!
//! - [`cli`]: the command line, validated into a [`cli::Plan`].
//! - [`report`]: the human and `--json` renderings of one sync.
//! - [`watch`]: `--watch`, a sync every interval, and with `--slew` the
//!   discipline of the clock.
//! - [`Exit`]: the exit codes, decided in one place.

pub mod cli;
pub mod report;
pub mod watch;

use service::clock::{Clock, ClockError, SystemClock};
use service::discipline;
use service::source::{Source, SourceOptions, SourceSpec, SyncError};
use std::io::Write;
use std::sync::Arc;

/// The exit codes of `fient`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Synchronised (and, with `--set`, the clock was set).
    Synced = 0,
    /// No usable answer: unreachable server, every probe lost, answers that
    /// contradict each other.
    NoAnswer = 1,
    /// Bad usage or an address that does not resolve.
    Usage = 2,
    /// Not allowed to set the clock.
    Permission = 77,
}

/// A failure with its exit code and one-line message.
#[derive(Debug)]
pub struct Failure {
    /// How the process ends.
    pub exit: Exit,
    /// What to print after `fient: `.
    pub error: anyhow::Error,
}

impl Failure {
    fn new(exit: Exit, error: impl Into<anyhow::Error>) -> Self {
        Failure {
            exit,
            error: error.into(),
        }
    }
}

/// What fient did to the clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockAction {
    /// Report only.
    None,
    /// The clock was stepped by this much.
    Stepped(service::Nanos),
    /// A gradual correction by this much was started.
    Slewed(service::Nanos),
    /// The offset is beyond `--max-correction`: nothing was changed.
    TooLarge(service::Nanos),
    /// Changing the clock was refused (permission); nothing changed.
    Refused,
}

/// Applies what the discipline decided to `clock`; returns what was done
/// and the error that stopped it, if any.
pub fn apply(
    clock: &dyn Clock,
    action: discipline::Action,
    frequency_ppb: Option<i64>,
) -> (ClockAction, Option<ClockError>) {
    use discipline::Action;
    let done = match action {
        Action::None => Ok(ClockAction::None),
        Action::Step(by) => clock.step(by).map(|()| ClockAction::Stepped(by)),
        Action::Slew(by) => clock.slew(by).map(|_| ClockAction::Slewed(by)),
        Action::Refuse(by) => Ok(ClockAction::TooLarge(by)),
    };
    let done = done.and_then(|action| match frequency_ppb {
        Some(ppb) => clock.set_frequency(ppb).map(|()| action),
        None => Ok(action),
    });
    match done {
        Ok(action) => (action, None),
        Err(e) => (ClockAction::Refused, Some(e)),
    }
}

/// The failure a clock error means: 77 for permission, 1 otherwise.
fn clock_failure(e: ClockError) -> Failure {
    match e {
        e @ ClockError::PermissionDenied { .. } => Failure::new(Exit::Permission, e),
        e => Failure::new(Exit::NoAnswer, e),
    }
}

/// Resolves the server and opens the source.
async fn connect(plan: &cli::Plan, clock: Arc<dyn Clock>) -> Result<Source, Failure> {
    let spec: &SourceSpec = &plan.server;
    let server = spec
        .resolve()
        .await
        .map_err(|e| Failure::new(Exit::Usage, e))?;
    let options = SourceOptions {
        stamping: plan.stamping,
        key: plan.key.clone(),
        poll: plan.poll,
        tls: plan.tls.clone(),
    };
    Source::open(spec.clone(), server, clock, options)
        .await
        .map_err(|e| {
            Failure::new(
                Exit::NoAnswer,
                anyhow::anyhow!("cannot open a socket toward {server}: {e}"),
            )
        })
}

/// Runs one invocation against `clock`, writing results to `out`: one
/// sync, or with `--watch` a sync every interval until `shutdown`
/// completes. Errors are returned, not printed.
pub async fn run(
    plan: &cli::Plan,
    clock: Arc<dyn Clock>,
    out: &mut (dyn Write + Send),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Failure> {
    let source = connect(plan, clock.clone()).await?;
    if let Some(interval) = plan.watch {
        return watch::run(plan, &source, clock, interval, out, shutdown).await;
    }
    let report = match source.sync(&plan.options).await {
        Ok(report) => report,
        Err(e) => {
            if plan.json {
                report::write_json_error(out, &source, &e)
                    .map_err(|e| Failure::new(Exit::NoAnswer, e))?;
            }
            return Err(match e {
                SyncError::NoAnswer(_)
                | SyncError::Estimate { .. }
                | SyncError::Connect { .. }
                | SyncError::Tampered { .. } => Failure::new(Exit::NoAnswer, e),
            });
        }
    };

    let offset = report.estimate.offset;
    let decided = match plan.correction {
        cli::Correction::None => discipline::Action::None,
        cli::Correction::Step => discipline::Action::Step(offset),
        cli::Correction::Slew => {
            // One sync: the discipline's step-or-slew rule, no frequency.
            let mut d = discipline::Discipline::new(plan.discipline, 0);
            d.update(report.local_time(), offset, service::Nanos::ZERO)
                .action
        }
    };
    let (action, error) = apply(&*clock, decided, None);

    let rendered = if plan.json {
        report::write_json(out, &report, action)
    } else {
        report::write_human(out, &report, action)
    };
    rendered.map_err(|e| {
        Failure::new(
            Exit::NoAnswer,
            anyhow::anyhow!("cannot write the report: {e}"),
        )
    })?;

    match (error, action) {
        (Some(e), _) => Err(clock_failure(e)),
        (None, ClockAction::TooLarge(by)) => Err(Failure::new(
            Exit::NoAnswer,
            anyhow::anyhow!(
                "offset {by:+} is beyond --max-correction; the clock was not changed (add --force to correct it anyway)"
            ),
        )),
        (None, _) => Ok(()),
    }
}

/// The clock `fient` reads and, with `--set`, steps.
pub fn system_clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}
