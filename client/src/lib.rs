//! fient, the client, as a library: the binary is a thin shell around
//! [`run`].
//!
//! - [`cli`]: the command line, validated into a [`cli::Plan`].
//! - [`daemon`]: what the daemon keeps for `fient status`, the metrics,
//!   the shared-memory clock and the drift file.
//! - [`status`]: `fient status`, the daemon's view in tables.
//! - [`report`]: the human and `--json` renderings of one sync.
//! - [`watch`]: `--watch`, a sync every interval, and with `--slew` the
//!   discipline of the clock.
//! - [`Exit`]: the exit codes, decided in one place.

pub mod cli;
pub mod daemon;
pub mod report;
pub mod status;
pub mod watch;

use service::clock::{Clock, ClockError, SystemClock};
use service::discipline;
use service::ensemble::{Ensemble, EnsembleError};
use service::source::SourceOptions;
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

/// Resolves the servers and opens them.
async fn open(plan: &cli::Plan, clock: Arc<dyn Clock>) -> Result<Ensemble, Failure> {
    let options = SourceOptions {
        stamping: plan.stamping,
        key: plan.key.clone(),
        poll: plan.poll,
        tls: plan.tls.clone(),
        nts_tls: plan.nts_tls.clone(),
    };
    Ensemble::open(&plan.servers, clock, options, plan.select)
        .await
        .map_err(|e| match e {
            EnsembleError::Address(_) | EnsembleError::Empty | EnsembleError::TooMany(_) => {
                Failure::new(Exit::Usage, e)
            }
            EnsembleError::Open(..) => Failure::new(Exit::NoAnswer, e),
        })
}

/// Whether the run reports one source in detail (one server named, not a
/// pool), as fient always has, rather than a table of sources.
fn single(plan: &cli::Plan, ensemble: &Ensemble) -> bool {
    plan.servers.len() == 1 && !plan.servers[0].pool && ensemble.members().len() == 1
}

/// Runs one invocation against `clock`, writing results to `out`: one
/// sync of every server, or with `--watch` one every interval until
/// `shutdown` completes. Errors are returned, not printed.
pub async fn run(
    plan: &cli::Plan,
    clock: Arc<dyn Clock>,
    out: &mut (dyn Write + Send),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Failure> {
    let ensemble = open(plan, clock.clone()).await?;
    if let Some(interval) = plan.watch {
        return watch_as_daemon(plan, &ensemble, clock, interval, out, shutdown).await;
    }
    let round = ensemble.sync(&plan.options).await;
    let single = single(plan, &ensemble);
    let written = |r: std::io::Result<()>| {
        r.map_err(|e| {
            Failure::new(
                Exit::NoAnswer,
                anyhow::anyhow!("cannot write the report: {e}"),
            )
        })
    };
    let Some(combined) = round.combined() else {
        if plan.json {
            written(report::write_round_json(
                out, &ensemble, &round, None, single,
            ))?;
        } else if !single {
            written(report::write_round_human(out, &ensemble, &round, None))?;
        }
        let why = round
            .failure(&ensemble.names())
            .unwrap_or_else(|| "no answer".into());
        return Err(Failure::new(Exit::NoAnswer, anyhow::anyhow!(why)));
    };

    let offset = combined.offset;
    let decided = match plan.correction {
        cli::Correction::None => discipline::Action::None,
        cli::Correction::Step => discipline::Action::Step(offset),
        cli::Correction::Slew => {
            // One sync: the discipline's step-or-slew rule, no frequency.
            let mut d = discipline::Discipline::new(plan.discipline, 0);
            d.update(combined.reference, offset, service::Nanos::ZERO)
                .action
        }
    };
    let (action, error) = apply(&*clock, decided, None);

    let report = round.results.first().and_then(|r| r.as_ref().ok());
    written(match (plan.json, single, report) {
        (false, true, Some(report)) => report::write_human(out, report, action),
        (false, _, _) => report::write_round_human(out, &ensemble, &round, Some(action)),
        (true, _, _) => report::write_round_json(out, &ensemble, &round, Some(action), single),
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

/// `--watch`, with what the daemon publishes around it: the control
/// socket for `fient status`, the metrics, the shared-memory segment.
async fn watch_as_daemon(
    plan: &cli::Plan,
    ensemble: &Ensemble,
    clock: Arc<dyn Clock>,
    polling: cli::Polling,
    out: &mut (dyn Write + Send),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Failure> {
    let daemon = Arc::new(daemon::Daemon::new(
        ensemble,
        plan.daemon.clone(),
        plan.discipline.correct,
        plan.options.params.max_drift_ppm,
    )?);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stopped.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = Vec::new();
    if let Some(path) = &plan.daemon.control_socket {
        let socket = service::control::ControlSocket::bind(path)
            .await
            .map_err(|e| Failure::new(Exit::Usage, e))?;
        let d = daemon.clone();
        tasks.push(tokio::spawn(socket.serve(
            move || service::control::DaemonStatus::Fient(Box::new(d.status())),
            stopped(),
        )));
    }
    if let Some(at) = plan.daemon.metrics_listen {
        let listener = tokio::net::TcpListener::bind(at).await.map_err(|e| {
            let exit = if e.kind() == std::io::ErrorKind::PermissionDenied {
                Exit::Permission
            } else {
                Exit::NoAnswer
            };
            Failure::new(exit, anyhow::anyhow!("cannot serve metrics on {at}: {e}"))
        })?;
        if let Ok(at) = listener.local_addr() {
            tracing::info!("serving metrics on http://{at}/metrics");
        }
        let d = daemon.clone();
        tasks.push(tokio::spawn(service::metrics::serve(
            listener,
            Arc::new(move || service::metrics::render_fient(&d.metrics())),
            stopped(),
        )));
    }
    // SIGHUP would end the process by default; fient has nothing to read
    // again (its configuration is its command line), so it says so.
    let mut hangups = service::signals::hangups();
    let hangup_notes = async move {
        if let Some(h) = hangups.as_mut() {
            while h.recv().await.is_some() {
                tracing::warn!(
                    "SIGHUP: fient has nothing to reload; restart it to change its options"
                );
            }
        }
        std::future::pending::<()>().await
    };
    let _ = service::systemd::ready();
    let watching = watch::run(plan, ensemble, &daemon, clock, polling, out, async {
        shutdown.await;
        let _ = service::systemd::stopping();
    });
    let outcome = tokio::select! {
        outcome = watching => outcome,
        () = hangup_notes => Ok(()),
        () = service::systemd::feed_watchdog() => Ok(()),
    };
    daemon.stop();
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }
    outcome
}

/// The clock `fient` reads and, with `--set`, steps.
pub fn system_clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}
