//! Measuring accuracy over time: `fient --watch --json` (report only) for
//! minutes, through the relay, against `cerv --offset +250ms`, every line
//! compared with the truth.
//!
//! Three kinds of run, each on fresh processes:
//!
//! - [`watch_scenario`]: the real `fient` on the system clock; the truth is
//!   a constant, [`TRUTH_NS`].
//! - [`watch_drifting`]: the example `drifting_watch`, fient's watch on a
//!   simulated clock that runs [`DRIFT_PPM`] fast and wanders by a random
//!   walk of [`WANDER_PPM_PER_SQRT_S`], on the jitter path; each line
//!   carries its own truth (`truth_ns`, taken at the line's reference
//!   instant).
//! - [`watch_step`]: two servers, +250 ms and +260 ms, behind one relay
//!   that switches from the first to the second halfway through: a server
//!   whose time jumps by [`STEP_NS`].
//!
//! [`summarise`] and [`step_summary`] are pure functions of the lines.

use crate::accuracy::{TRUTH_NS, median};
use crate::harness::{self, Cerv, Finished};
use crate::relay::{Direction, Impairment, Relay};
use crate::scenario::{self, Scenario};
use service::clock::{Clock, SystemClock};
use service::time::{Nanos, Timestamp};
use std::process::Command;
use std::time::{Duration, Instant};

/// The drifting run's clock runs this fast at the start, ppm.
pub const DRIFT_PPM: f64 = 50.0;
/// The drifting run's rate wanders by a random walk of this many ppm per
/// √s: about 0.11 ppm over two minutes, and about 8 µs of time beyond the
/// straight drift (a crystal in a room whose temperature moves a little).
pub const WANDER_PPM_PER_SQRT_S: f64 = 0.01;
/// The step test's jump: the second server's offset minus the first's.
pub const STEP_NS: i64 = 10_000_000;
/// A step is followed once the error is back within twice its usual
/// spread of where it sat before the step, and never asked to be closer
/// than this, 1 % of the step: two cervs on the same path can differ by a
/// few tens of microseconds (seen on `sym`), and how closely the estimate
/// then settles is what convergence measures, not the step test.
pub const FOLLOW_FLOOR_NS: i64 = STEP_NS / 100;
/// How long a watch may take to stop after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(10);

/// How long to watch, and how often fient syncs.
#[derive(Clone, Debug)]
pub struct WatchPlan {
    /// The whole run.
    pub duration: Duration,
    /// fient's `--watch` interval.
    pub interval: Duration,
    /// Seed of the relay (and of the drifting clock's wander).
    pub seed: u64,
    /// More arguments for fient, after the watch's own.
    pub fient_extra: Vec<String>,
}

impl WatchPlan {
    /// fient's arguments after the server: the watch, JSON, and a
    /// `--count` that the run cannot reach (fient waits at least 0.9
    /// interval between syncs) but that bounds it should the stop fail.
    fn fient_args(&self) -> Vec<String> {
        let most = self.duration.as_secs_f64() / (0.9 * self.interval.as_secs_f64());
        let interval = Nanos::try_from_i128(self.interval.as_nanos() as i128).unwrap_or(Nanos::MAX);
        let mut args = vec![
            "--watch".into(),
            format!("{interval:#}"),
            "--json".into(),
            "--count".into(),
            (most.ceil() as u64 + 2).to_string(),
        ];
        args.extend(self.fient_extra.iter().cloned());
        args
    }
}

/// One line of the watch, against the truth.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    /// Seconds since fient started, at the line's reference instant.
    pub t: f64,
    /// The line answered (`status` is `synced`).
    pub synced: bool,
    /// `offset_ns` minus the truth.
    pub error_ns: i64,
    /// `error_bound_ns`.
    pub bound_ns: i64,
    /// The truth lay within offset ± bound.
    pub held: bool,
    /// `step_detected`, if the line has it.
    pub step_detected: Option<bool>,
    /// `samples_lost`.
    pub lost: u64,
    /// fient's `drift_ppm`, and the truth for it when known.
    pub drift_ppm: Option<f64>,
    /// The simulated clock's true rate error (`clock_drift_ppm`).
    pub true_drift_ppm: Option<f64>,
}

/// Where each line's truth comes from.
#[derive(Clone, Copy, Debug)]
pub enum Truth {
    /// The same for every line.
    Fixed(i64),
    /// `before` for lines whose reference instant precedes `at`, `after`
    /// from then on.
    Step {
        /// Before the switch.
        before: i64,
        /// From the switch on.
        after: i64,
        /// The switch, on the system clock.
        at: Timestamp,
    },
    /// The line's own `truth_ns`.
    PerLine,
}

/// Parses the lines of `fient --watch --json`; `start` is when fient
/// started, on the clock its `time` is read on. Lines that are not JSON,
/// have no `time`, or lack their truth are skipped.
pub fn parse_lines(stdout: &str, start: Timestamp, truth: Truth) -> Vec<Line> {
    stdout
        .lines()
        .filter_map(|text| {
            let v: serde_json::Value = serde_json::from_str(text).ok()?;
            let time: Timestamp = v.get("time")?.as_str()?.parse().ok()?;
            let truth_ns = match truth {
                Truth::Fixed(ns) => ns,
                Truth::Step { before, after, at } => {
                    if time < at {
                        before
                    } else {
                        after
                    }
                }
                Truth::PerLine => v.get("truth_ns")?.as_i64()?,
            };
            let synced = v["status"] == "synced";
            let offset = v["offset_ns"].as_i64();
            let bound = v["error_bound_ns"].as_i64();
            let (synced, error_ns, bound_ns) = match (synced, offset, bound) {
                (true, Some(o), Some(b)) => (true, o - truth_ns, b),
                _ => (false, 0, 0),
            };
            Some(Line {
                t: time.diff_i128(start) as f64 / 1e9,
                synced,
                error_ns,
                bound_ns,
                held: synced && error_ns.abs() <= bound_ns,
                step_detected: v.get("step_detected").and_then(|s| s.as_bool()),
                lost: v["samples_lost"].as_u64().unwrap_or(0),
                drift_ppm: v["drift_ppm"].as_f64(),
                true_drift_ppm: v["clock_drift_ppm"].as_f64(),
            })
        })
        .collect()
}

/// One watch, start to stop.
#[derive(Debug)]
pub struct WatchRun {
    /// The scenario's name.
    pub name: String,
    /// What it shows.
    pub about: String,
    /// Every line, in order.
    pub lines: Vec<Line>,
    /// The second half begins here, seconds since the start.
    pub half: f64,
    /// When the relay switched servers, seconds since the start.
    pub step_at: Option<f64>,
    /// How the process ended, and what it wrote.
    pub finished: Finished,
    /// What the relay and cerv counted, for runs that went wrong.
    pub notes: Vec<String>,
}

impl WatchRun {
    /// fient ended as asked (SIGTERM or `--count`) with exit 0.
    pub fn ended_well(&self) -> bool {
        self.finished.code() == Some(0)
    }
}

/// Sleeps until `deadline`, in short bounded naps.
fn sleep_until(deadline: Instant) {
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        std::thread::sleep(left.min(Duration::from_millis(200)));
    }
}

/// Starts a relay for `scenario` toward `server`; a scenario without one
/// (lan) gets a clean relay only when `always`.
fn relay_for(
    scenario: &Scenario,
    server: std::net::SocketAddr,
    seed: u64,
    always: bool,
) -> Option<Relay> {
    let impairment = match (scenario.impairment, always) {
        (Some(imp), _) => imp,
        (None, true) => Impairment::symmetric(Direction::CLEAN),
        (None, false) => return None,
    };
    Some(Relay::start(server, impairment, seed).expect("relay"))
}

/// Runs `cmd` for the plan's duration, calling `midway` at half time (the
/// step test's switch), and stops it.
fn watch_for(
    cmd: &mut Command,
    plan: &WatchPlan,
    midway: impl FnOnce() -> Option<Timestamp>,
) -> (Finished, Timestamp, Option<Timestamp>) {
    let start = SystemClock.now();
    let started = Instant::now();
    let running = harness::spawn(cmd);
    sleep_until(started + plan.duration / 2);
    let switched = midway();
    sleep_until(started + plan.duration);
    (running.stop(GRACE), start, switched)
}

fn seconds(since: Timestamp, at: Timestamp) -> f64 {
    at.diff_i128(since) as f64 / 1e9
}

/// The relay's counters, one line.
fn relay_note(relay: &Relay) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let s = relay.stats();
    let d = |d: &crate::relay::DirectionStats| {
        format!(
            "received {}, sent {}, lost {}, duplicated {}, reordered {}, latest send {} µs late",
            d.received.load(Relaxed),
            d.sent.load(Relaxed),
            d.lost.load(Relaxed),
            d.duplicated.load(Relaxed),
            d.reordered.load(Relaxed),
            d.max_late_ns.load(Relaxed) / 1_000,
        )
    };
    format!(
        "relay to {}: to the server {}; to the client {}",
        relay.server(),
        d(&s.to_server),
        d(&s.to_client)
    )
}

/// Stops cerv and keeps how it ended, when it was told to (a signal from
/// someone else shows as a second one), its final counters and any
/// warning, one per line.
fn cerv_notes(cerv: Cerv) -> Vec<String> {
    let addr = cerv.addr;
    let pid = cerv.pid();
    let asked = SystemClock.now();
    let (status, log) = cerv.stop();
    let mut notes = vec![format!(
        "cerv {addr} (pid {pid}) asked to stop at {asked}, ended with {status:?}"
    )];
    notes.extend(
        log.lines()
            .filter(|l| {
                ["WARN", "ERROR", "server stopped", "shutting down"]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .map(|l| format!("cerv {addr}: {l}")),
    );
    notes
}

/// `fient SERVER --watch INTERVAL --json` through the relay for `scenario`
/// against a fresh `cerv --offset +250ms --rate-limit 0`.
pub fn watch_scenario(scenario: &Scenario, plan: &WatchPlan) -> WatchRun {
    let cerv = Cerv::start(&["--offset", "+250ms", "--rate-limit", "0"]);
    let relay = relay_for(scenario, cerv.addr, plan.seed, false);
    let target = relay.as_ref().map_or(cerv.addr, Relay::addr).to_string();
    let (finished, start, _) = watch_for(
        Command::new(harness::bin("fient"))
            .arg(&target)
            .args(plan.fient_args()),
        plan,
        || None,
    );
    let mut notes: Vec<String> = relay.iter().map(relay_note).collect();
    drop(relay);
    notes.extend(cerv_notes(cerv));
    WatchRun {
        name: scenario.name.to_string(),
        about: scenario.about.to_string(),
        lines: parse_lines(&finished.stdout, start, Truth::Fixed(TRUTH_NS)),
        half: plan.duration.as_secs_f64() / 2.0,
        step_at: None,
        finished,
        notes,
    }
}

/// The drifting run: the `drifting_watch` example (fient's watch on a
/// simulated clock, [`DRIFT_PPM`] fast, wandering by
/// [`WANDER_PPM_PER_SQRT_S`], report only) on the jitter path.
pub fn watch_drifting(plan: &WatchPlan) -> WatchRun {
    let jitter = scenario::named("jitter").expect("the jitter scenario");
    let example = harness::client_example("drifting_watch");
    let cerv = Cerv::start(&["--offset", "+250ms", "--rate-limit", "0"]);
    let relay = relay_for(&jitter, cerv.addr, plan.seed, true);
    let target = relay.as_ref().map_or(cerv.addr, Relay::addr).to_string();
    let (finished, start, _) = watch_for(
        Command::new(example)
            .args(["--drift-ppm", &DRIFT_PPM.to_string()])
            .args(["--wander", &WANDER_PPM_PER_SQRT_S.to_string()])
            .args(["--seed", &plan.seed.to_string()])
            .args(["--server-offset", "+250ms", "--"])
            .arg(&target)
            .args(plan.fient_args()),
        plan,
        || None,
    );
    let mut notes: Vec<String> = relay.iter().map(relay_note).collect();
    drop(relay);
    notes.extend(cerv_notes(cerv));
    WatchRun {
        name: "drifting".to_string(),
        about: format!(
            "a clock {DRIFT_PPM:+} ppm fast, wandering {WANDER_PPM_PER_SQRT_S} ppm/√s, on the jitter path"
        ),
        lines: parse_lines(&finished.stdout, start, Truth::PerLine),
        half: plan.duration.as_secs_f64() / 2.0,
        step_at: None,
        finished,
        notes,
    }
}

/// The step test on `scenario`'s path: two cervs, +250 ms and +260 ms,
/// behind one relay (a clean one for lan) that switches to the second at
/// half time.
pub fn watch_step(scenario: &Scenario, plan: &WatchPlan) -> WatchRun {
    let first = Cerv::start(&["--offset", "+250ms", "--rate-limit", "0"]);
    let second = Cerv::start(&["--offset", "+260ms", "--rate-limit", "0"]);
    let relay = relay_for(scenario, first.addr, plan.seed, true).expect("a relay");
    let (finished, start, switched) = watch_for(
        Command::new(harness::bin("fient"))
            .arg(relay.addr().to_string())
            .args(plan.fient_args()),
        plan,
        || {
            relay.retarget(second.addr).expect("retarget the relay");
            Some(SystemClock.now())
        },
    );
    let mut notes = vec![relay_note(&relay)];
    drop(relay);
    notes.extend(cerv_notes(first));
    notes.extend(cerv_notes(second));
    let at = switched.expect("switched");
    let truth = Truth::Step {
        before: TRUTH_NS,
        after: TRUTH_NS + STEP_NS,
        at,
    };
    WatchRun {
        name: scenario.name.to_string(),
        about: format!(
            "{}; the server's time jumps 10 ms at half time",
            scenario.about
        ),
        lines: parse_lines(&finished.stdout, start, truth),
        half: plan.duration.as_secs_f64() / 2.0,
        step_at: Some(seconds(start, at)),
        finished,
        notes,
    }
}

/// One watch's figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WatchSummary {
    /// Lines written.
    pub lines: usize,
    /// Lines with an answer.
    pub synced: usize,
    /// Median |error| of the answers in the second half, ns.
    pub median_abs_error_ns: Option<i64>,
    /// Median bound of the answers in the second half, ns.
    pub median_bound_ns: Option<i64>,
    /// Largest |error| in the second half, ns.
    pub max_abs_error_ns: Option<i64>,
    /// Answers whose bound held the truth.
    pub held: usize,
    /// Answers flagged `step_detected`; `None` when no line has the field.
    pub flagged: Option<usize>,
    /// Answers not flagged, and of those, the ones whose bound held.
    pub outside: usize,
    /// See `outside`.
    pub held_outside: usize,
    /// Seconds from the start until |error| stays under twice the
    /// second half's median; `None` if the last answer is above it.
    pub converged: Option<f64>,
    /// Samples lost, over all lines.
    pub lost: u64,
    /// Median |drift_ppm − true drift| in the second half, when both are
    /// known (the drifting run).
    pub drift_error_ppm: Option<f64>,
}

/// The figures of a watch whose second half starts at `half` seconds.
pub fn summarise(lines: &[Line], half: f64) -> WatchSummary {
    let answers: Vec<&Line> = lines.iter().filter(|l| l.synced).collect();
    let late: Vec<&Line> = answers.iter().copied().filter(|l| l.t >= half).collect();
    let abs: Vec<i64> = late.iter().map(|l| l.error_ns.abs()).collect();
    let bounds: Vec<i64> = late.iter().map(|l| l.bound_ns).collect();
    let median_abs = median(&abs);
    let converged = median_abs.and_then(|m| {
        let limit = (2 * m).max(1);
        let last_bad = answers.iter().rposition(|l| l.error_ns.abs() >= limit);
        match last_bad {
            None => answers.first().map(|l| l.t),
            Some(i) => answers.get(i + 1).map(|l| l.t),
        }
    });
    let any_flag = lines.iter().any(|l| l.step_detected.is_some());
    let outside: Vec<&Line> = answers
        .iter()
        .copied()
        .filter(|l| l.step_detected != Some(true))
        .collect();
    // Medians of f64 through integer parts per billion.
    let drift_errors: Vec<i64> = late
        .iter()
        .filter_map(|l| Some(((l.drift_ppm? - l.true_drift_ppm?).abs() * 1e3).round() as i64))
        .collect();
    WatchSummary {
        lines: lines.len(),
        synced: answers.len(),
        median_abs_error_ns: median_abs,
        median_bound_ns: median(&bounds),
        max_abs_error_ns: abs.iter().copied().max(),
        held: answers.iter().filter(|l| l.held).count(),
        flagged: any_flag.then(|| answers.len() - outside.len()),
        outside: outside.len(),
        held_outside: outside.iter().filter(|l| l.held).count(),
        converged,
        lost: lines.iter().map(|l| l.lost).sum(),
        drift_error_ppm: median(&drift_errors).map(|ppb| ppb as f64 / 1e3),
    }
}

/// What the step test found.
#[derive(Clone, Debug, PartialEq)]
pub struct StepSummary {
    /// Where the error sat before the step: its median (not zero where
    /// the path is asymmetric).
    pub bias_ns: i64,
    /// An answer within this of the bias follows the step: twice the
    /// median distance from it before the step, at least
    /// [`FOLLOW_FLOOR_NS`].
    pub threshold_ns: i64,
    /// Lines after the switch up to and including the first answer that
    /// follows (1: the first line after the switch already does); `None`
    /// if none does.
    pub polls_to_follow: Option<usize>,
    /// Answers before the switch whose bound missed the truth.
    pub failed_before: usize,
    /// Answers from the switch on whose bound missed the truth...
    pub failed_after: usize,
    /// ...and of those, the ones flagged `step_detected`.
    pub failed_after_flagged: usize,
    /// Answers within five lines after the switch whose bound missed.
    pub failed_around: usize,
}

/// The step test's figures, for a switch at `at` seconds.
pub fn step_summary(lines: &[Line], at: f64) -> StepSummary {
    let (before, after): (Vec<&Line>, Vec<&Line>) = lines.iter().partition(|l| l.t < at);
    let errors: Vec<i64> = before
        .iter()
        .filter(|l| l.synced)
        .map(|l| l.error_ns)
        .collect();
    let bias_ns = median(&errors).unwrap_or(0);
    let spread: Vec<i64> = errors.iter().map(|e| (e - bias_ns).abs()).collect();
    let threshold_ns = median(&spread)
        .map_or(FOLLOW_FLOOR_NS, |m| 2 * m)
        .max(FOLLOW_FLOOR_NS);
    let missed = |l: &&&Line| l.synced && !l.held;
    StepSummary {
        bias_ns,
        threshold_ns,
        polls_to_follow: after
            .iter()
            .position(|l| l.synced && (l.error_ns - bias_ns).abs() < threshold_ns)
            .map(|i| i + 1),
        failed_before: before.iter().filter(missed).count(),
        failed_after: after.iter().filter(missed).count(),
        failed_after_flagged: after
            .iter()
            .filter(missed)
            .filter(|l| l.step_detected == Some(true))
            .count(),
        failed_around: after.iter().take(5).filter(missed).count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(t: f64, error_ns: i64, bound_ns: i64) -> Line {
        Line {
            t,
            synced: true,
            error_ns,
            bound_ns,
            held: error_ns.abs() <= bound_ns,
            step_detected: None,
            lost: 0,
            drift_ppm: None,
            true_drift_ppm: None,
        }
    }

    #[test]
    fn lines_parse_against_each_kind_of_truth() {
        let start: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let text = concat!(
            r#"{"schema":1,"time":"2026-01-01T00:00:02Z","status":"synced","offset_ns":250000100,"error_bound_ns":90,"samples_used":5,"samples_lost":1,"truth_ns":250000000}"#,
            "\n",
            "not json\n",
            r#"{"schema":1,"time":"2026-01-01T00:00:04Z","status":"no_answer","error":"no answer","next_try_ms":4000}"#,
            "\n",
            r#"{"schema":1,"time":"2026-01-01T00:00:06Z","status":"synced","offset_ns":260000050,"error_bound_ns":100,"step_detected":true,"drift_ppm":50.5,"clock_drift_ppm":50.0}"#,
            "\n",
        );
        let fixed = parse_lines(text, start, Truth::Fixed(250_000_000));
        assert_eq!(fixed.len(), 3);
        assert_eq!(
            (fixed[0].t, fixed[0].error_ns, fixed[0].held),
            (2.0, 100, false)
        );
        assert_eq!(fixed[0].lost, 1);
        assert!(!fixed[1].synced && !fixed[1].held);
        assert_eq!(fixed[2].error_ns, 10_000_050);
        assert_eq!(fixed[2].step_detected, Some(true));
        assert_eq!(
            (fixed[2].drift_ppm, fixed[2].true_drift_ppm),
            (Some(50.5), Some(50.0))
        );

        let at: Timestamp = "2026-01-01T00:00:05Z".parse().unwrap();
        let step = Truth::Step {
            before: 250_000_000,
            after: 260_000_000,
            at,
        };
        let stepped = parse_lines(text, start, step);
        assert_eq!(stepped[0].error_ns, 100);
        assert_eq!(stepped[2].error_ns, 50);
        assert!(stepped[2].held);

        // Only the first line carries its truth.
        let own = parse_lines(text, start, Truth::PerLine);
        assert_eq!(own.len(), 1);
        assert_eq!(own[0].error_ns, 100);
    }

    #[test]
    fn convergence_is_when_the_error_stays_under_twice_the_final_median() {
        // Second half (t >= 5): errors 10, 10, 10, 10 -> median 10, limit 20.
        let lines: Vec<Line> = [(1.0, 500), (2.0, 15), (3.0, 40), (4.0, 19), (5.0, 10)]
            .into_iter()
            .chain([(6.0, 10), (7.0, -10), (8.0, 10)])
            .map(|(t, e)| line(t, e, 30))
            .collect();
        let s = summarise(&lines, 5.0);
        assert_eq!(s.median_abs_error_ns, Some(10));
        assert_eq!(s.max_abs_error_ns, Some(10));
        assert_eq!(s.converged, Some(4.0));
        assert_eq!((s.held, s.synced, s.lines), (6, 8, 8));
        assert_eq!(s.flagged, None);
        assert_eq!((s.held_outside, s.outside), (6, 8));

        // The last answer above the limit: it never settled.
        let mut unsettled = lines.clone();
        unsettled.push(line(9.0, 25, 30));
        assert_eq!(summarise(&unsettled, 5.0).converged, None);

        // Settled from the first answer.
        let calm: Vec<Line> = (0..6).map(|i| line(i as f64, 10, 30)).collect();
        assert_eq!(summarise(&calm, 3.0).converged, Some(0.0));
        assert_eq!(summarise(&[], 3.0), WatchSummary::default());
    }

    #[test]
    fn flagged_lines_are_left_out_of_the_second_share() {
        let mut lines: Vec<Line> = (0..4).map(|i| line(i as f64, 10, 30)).collect();
        lines[1] = Line {
            step_detected: Some(true),
            ..line(1.0, 50, 30)
        };
        lines[2].step_detected = Some(false);
        let s = summarise(&lines, 2.0);
        assert_eq!(s.flagged, Some(1));
        assert_eq!((s.held, s.synced), (3, 4));
        assert_eq!((s.held_outside, s.outside), (3, 3));
    }

    #[test]
    fn a_step_is_followed_when_the_error_is_back_under_the_threshold() {
        // Before: errors ±80 µs around 0 -> threshold 160 µs. After the
        // switch at t = 10: the first two answers still read the old time.
        let lines = vec![
            line(6.0, 80_000, 500_000),
            line(8.0, -80_000, 500_000),
            line(9.0, 0, 500_000),
            line(10.5, -10_000_000, 500_000),
            Line {
                synced: false,
                held: false,
                ..line(12.0, 0, 0)
            },
            line(14.0, -5_000_000, 500_000),
            line(16.0, 150_000, 500_000),
            line(18.0, 10_000, 500_000),
        ];
        let s = step_summary(&lines, 10.0);
        assert_eq!((s.bias_ns, s.threshold_ns), (0, 160_000));
        assert_eq!(s.polls_to_follow, Some(4));
        assert_eq!(
            (s.failed_before, s.failed_after, s.failed_around),
            (0, 2, 2)
        );
        assert_eq!(s.failed_after_flagged, 0);
        // A quiet path: the floor.
        let quiet = vec![line(1.0, 100, 1_000), line(3.0, 90_000, 100_000)];
        let s = step_summary(&quiet, 2.0);
        assert_eq!(s.threshold_ns, FOLLOW_FLOOR_NS);
        assert_eq!(s.polls_to_follow, Some(1));
        // An asymmetric path: back near its bias of 1.25 ms, not near 0.
        let asym = vec![
            line(1.0, 1_250_000, 2_000_000),
            line(3.0, 1_248_000, 2_000_000),
            line(5.0, 1_252_000, 2_000_000),
            line(7.0, 3_000_000, 2_000_000),
            line(9.0, 1_251_000, 2_000_000),
        ];
        let s = step_summary(&asym, 6.0);
        assert_eq!((s.bias_ns, s.threshold_ns), (1_250_000, FOLLOW_FLOOR_NS));
        assert_eq!(s.polls_to_follow, Some(2));
    }

    #[test]
    fn fient_is_asked_for_a_bounded_json_watch() {
        let plan = WatchPlan {
            duration: Duration::from_secs(120),
            interval: Duration::from_secs(2),
            seed: 1,
            fient_extra: vec!["--probes".into(), "8".into()],
        };
        assert_eq!(
            plan.fient_args(),
            [
                "--watch",
                "2.000000000s",
                "--json",
                "--count",
                "69",
                "--probes",
                "8"
            ]
        );
    }
}
