//! fient, the client, as a library: the binary is a thin shell around
//! [`run`].
//!
//! - [`cli`]: the command line, validated into a [`cli::Plan`].
//! - [`address`]: turning `host[:port]` into a socket address, with errors
//!   that name the input.
//! - [`report`]: the human and `--json` renderings of one sync.
//! - [`Exit`]: the exit codes, decided in one place.

pub mod address;
pub mod cli;
pub mod report;

use service::client::{SyncError, TimeClient};
use service::clock::{Clock, ClockError, SystemClock};
use service::transport::client::ClientOptions;
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

/// What `--set` did to the clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockAction {
    /// Report only (no `--set`).
    None,
    /// The clock was stepped by this much.
    Stepped(service::Nanos),
    /// Setting the clock was refused; nothing changed.
    Refused,
}

/// Runs one invocation against `clock`, writing results to `out`: sync,
/// optionally step the clock, render. Errors are returned, not printed.
pub async fn run(
    plan: &cli::Plan,
    clock: Arc<dyn Clock>,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let server = address::resolve(&plan.server)
        .await
        .map_err(|e| Failure::new(Exit::Usage, e))?;
    let options = ClientOptions {
        stamping: plan.stamping,
        key: plan.key.clone(),
    };
    let client = TimeClient::connect_with(server, clock.clone(), options)
        .await
        .map_err(|e| {
            Failure::new(
                Exit::NoAnswer,
                anyhow::anyhow!("cannot open a socket toward {server}: {e}"),
            )
        })?;
    let report = match client.sync(&plan.options).await {
        Ok(report) => report,
        Err(e) => {
            if plan.json {
                report::write_json_error(out, server, &e)
                    .map_err(|e| Failure::new(Exit::NoAnswer, e))?;
            }
            return Err(match e {
                SyncError::NoAnswer(_) | SyncError::Estimate { .. } => {
                    Failure::new(Exit::NoAnswer, e)
                }
            });
        }
    };

    let mut step_error = None;
    let action = if plan.set {
        match clock.step(report.estimate.offset) {
            Ok(()) => ClockAction::Stepped(report.estimate.offset),
            Err(e) => {
                step_error = Some(e);
                ClockAction::Refused
            }
        }
    } else {
        ClockAction::None
    };

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

    match step_error {
        None => Ok(()),
        Some(e @ ClockError::PermissionDenied { .. }) => Err(Failure::new(Exit::Permission, e)),
        Some(e) => Err(Failure::new(Exit::NoAnswer, e)),
    }
}

/// The clock `fient` reads and, with `--set`, steps.
pub fn system_clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}
