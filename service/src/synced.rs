//! [`SyncedClock`]: "what time is it, and how sure are you?" for programs
//! that embed a time service, the way Spanner's TrueTime or AWS ClockBound
//! answer: an interval, not a point.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use service::synced::{SyncedClock, SyncedClockConfig};
//!
//! let sources = ["127.0.0.1:8081".parse()?, "ntp://127.0.0.1:12300".parse()?];
//! let clock = SyncedClock::start_sources(&sources, SyncedClockConfig::default()).await?;
//! let now = clock.now();
//! println!("between {} and {} ({:?})", now.earliest, now.latest, now.status);
//! # Ok(())
//! # }
//! ```
//!
//! A background task syncs with every source each `interval`, keeps each
//! source's history in a [`crate::filter`] and combines the sources that
//! agree ([`crate::ensemble`]). Each round gives an interval, at a local
//! time, that holds the true time if a majority of the sources are honest
//! and the clocks drift apart no faster than `max_drift_ppm`; the filter
//! narrows it with history (every past sample's interval, widened by the
//! drift since, still confines the present). Between rounds the interval
//! widens by that rate times its age, so [`SyncedClock::now`] grows wider,
//! not wrong, while the sources are away.
//!
//! Elapsed time is measured on [`MonotonicClock`] by default: the raw
//! hardware clock, which no step or slew of the system clock (by fient, or
//! anyone) can disturb. For the same reason the default configuration
//! stamps replies in user space: the kernel's receive timestamps are on
//! the system clock, and carrying one over to the monotonic clock would let
//! a step of the system clock in between move it. A user-space stamp is a
//! few microseconds late, which only widens the interval.

use crate::clock::{Clock, MonotonicClock};
use crate::ensemble::{Ensemble, EnsembleError, Filters};
use crate::filter::FilterConfig;
use crate::select::SelectParams;
use crate::source::{SourceOptions, SourceSpec, SyncOptions, Wire, spread};
use crate::time::{Nanos, Timestamp};
use crate::transport::socket::Stamping;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a [`SyncedClock`] works.
#[derive(Clone, Debug)]
pub struct SyncedClockConfig {
    /// How often to sync (with ±10 % spread, so that many clients do not
    /// all ask at once).
    pub interval: Duration,
    /// The most the local clock may drift from the servers', in parts per
    /// million. 50 ppm covers an ordinary crystal; the interval is honest
    /// only if the clock keeps within it.
    pub max_drift_ppm: u32,
    /// With no successful round for this long, the status is `Stale`.
    pub stale_after: Duration,
    /// How many past syncs each source's filter keeps.
    pub keep: usize,
    /// How several sources are selected and combined (`min_agree`, ...);
    /// its drift is raised to `max_drift_ppm`.
    pub select: SelectParams,
    /// How each sync is run.
    pub sync: SyncOptions,
    /// Timestamps and key of the connections.
    pub client: SourceOptions,
}

impl Default for SyncedClockConfig {
    /// Every 16 s, 50 ppm, stale after 64 s, 8 syncs kept; receive
    /// timestamps read in user space (see [`SyncedClock`] for why).
    fn default() -> Self {
        SyncedClockConfig {
            interval: Duration::from_secs(16),
            max_drift_ppm: 50,
            stale_after: Duration::from_secs(64),
            keep: 8,
            select: SelectParams::default(),
            sync: SyncOptions::default(),
            client: SourceOptions {
                stamping: Stamping::User,
                ..SourceOptions::default()
            },
        }
    }
}

/// How much to trust an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// No round has succeeded yet: the interval is unbounded.
    Unsynchronized,
    /// A round succeeded within `stale_after`.
    Synchronized,
    /// The last success is older than `stale_after`: still honest, but
    /// wider by the drift allowance of every second since.
    Stale,
    /// The sources answer but no longer agree (no majority): the interval
    /// is carried, widening, from the last round in which they did.
    Disagreement,
}

/// The true time now, somewhere in `[earliest, latest]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeInterval {
    /// The earliest the true time can be now.
    pub earliest: Timestamp,
    /// The latest it can be now.
    pub latest: Timestamp,
    /// How fresh the knowledge is.
    pub status: Status,
}

impl TimeInterval {
    /// `latest - earliest`.
    pub fn width(&self) -> Nanos {
        Nanos::try_from_i128(self.latest.diff_i128(self.earliest)).unwrap_or(Nanos::MAX)
    }

    /// Whether `t` lies inside.
    pub fn contains(&self, t: Timestamp) -> bool {
        self.earliest <= t && t <= self.latest
    }
}

/// What one round said: at local time `at`, true time minus local was in
/// `[low, high]`.
#[derive(Clone, Copy, Debug)]
struct Anchor {
    at: Timestamp,
    low: Nanos,
    high: Nanos,
}

#[derive(Default)]
struct State {
    anchor: Option<Anchor>,
    last_success: Option<Timestamp>,
    disagreement: bool,
    last_error: Option<String>,
}

/// The interval an anchor gives at local time `now`: widened by the drift
/// allowed since it was taken. Pure.
fn interval_at(anchor: &Anchor, now: Timestamp, ppm: u32) -> (i128, i128) {
    let age = now.diff_i128(anchor.at).max(0);
    let widen = (age * i128::from(ppm) + 999_999) / 1_000_000;
    (
        i128::from(now.as_nanos()) + i128::from(anchor.low.as_nanos()) - widen,
        i128::from(now.as_nanos()) + i128::from(anchor.high.as_nanos()) + widen,
    )
}

/// A clock kept in step with time servers in the background, answering
/// with an interval that holds the true time.
pub struct SyncedClock {
    clock: Arc<dyn Clock>,
    state: Arc<Mutex<State>>,
    config: SyncedClockConfig,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SyncedClock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl SyncedClock {
    /// Starts syncing with one cerv server in a task on the current Tokio
    /// runtime, measuring with [`MonotonicClock`].
    pub async fn start(
        server: SocketAddr,
        config: SyncedClockConfig,
    ) -> Result<SyncedClock, EnsembleError> {
        Self::start_with_clock(server, Arc::new(MonotonicClock::new()), config).await
    }

    /// Like [`start`](Self::start), with another local clock (a simulated
    /// one, in tests).
    pub async fn start_with_clock(
        server: SocketAddr,
        clock: Arc<dyn Clock>,
        config: SyncedClockConfig,
    ) -> Result<SyncedClock, EnsembleError> {
        Self::start_sources_with_clock(&[SourceSpec::new(Wire::Cerv, server)], clock, config).await
    }

    /// Starts syncing with several sources (any wires, pools too),
    /// measuring with [`MonotonicClock`].
    pub async fn start_sources(
        sources: &[SourceSpec],
        config: SyncedClockConfig,
    ) -> Result<SyncedClock, EnsembleError> {
        Self::start_sources_with_clock(sources, Arc::new(MonotonicClock::new()), config).await
    }

    /// Like [`start_sources`](Self::start_sources), with another local
    /// clock.
    pub async fn start_sources_with_clock(
        sources: &[SourceSpec],
        clock: Arc<dyn Clock>,
        config: SyncedClockConfig,
    ) -> Result<SyncedClock, EnsembleError> {
        let mut config = config;
        // Every sync, selection and filter must allow at least the drift
        // the answers assume.
        let ppm = &mut config.sync.params.max_drift_ppm;
        *ppm = (*ppm).max(config.max_drift_ppm);
        config.select.max_drift_ppm = config.select.max_drift_ppm.max(config.max_drift_ppm);
        let ensemble =
            Ensemble::open(sources, clock.clone(), config.client.clone(), config.select).await?;
        let state = Arc::new(Mutex::new(State::default()));
        let task = tokio::spawn(keep_in_sync(
            ensemble,
            clock.clone(),
            state.clone(),
            config.clone(),
        ));
        Ok(SyncedClock {
            clock,
            state,
            config,
            task,
        })
    }

    /// The true time now, as an interval.
    pub fn now(&self) -> TimeInterval {
        let state = lock(&self.state);
        let now = self.clock.now();
        let Some(anchor) = state.anchor else {
            return TimeInterval {
                earliest: Timestamp::from_nanos(i64::MIN),
                latest: Timestamp::from_nanos(i64::MAX),
                status: Status::Unsynchronized,
            };
        };
        let (lo, hi) = interval_at(&anchor, now, self.config.max_drift_ppm);
        let stale = state
            .last_success
            .is_none_or(|at| now.diff_i128(at) > self.config.stale_after.as_nanos() as i128);
        let clamp =
            |v: i128| Timestamp::from_nanos(v.clamp(i64::MIN.into(), i64::MAX.into()) as i64);
        TimeInterval {
            earliest: clamp(lo),
            latest: clamp(hi),
            status: match (stale, state.disagreement) {
                (true, _) => Status::Stale,
                (false, true) => Status::Disagreement,
                (false, false) => Status::Synchronized,
            },
        }
    }

    /// True if `t` has certainly passed (TrueTime's `after`): even the
    /// earliest the time can be now is later.
    pub fn after(&self, t: Timestamp) -> bool {
        self.now().earliest > t
    }

    /// True if `t` has certainly not come yet (TrueTime's `before`): even
    /// the latest it can be now is earlier.
    pub fn before(&self, t: Timestamp) -> bool {
        self.now().latest < t
    }

    /// The status alone.
    pub fn status(&self) -> Status {
        self.now().status
    }

    /// Why the last round failed, if it did.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.state).last_error.clone()
    }

    /// Waits until the first round succeeds, at most `limit`; true if it
    /// did.
    pub async fn wait_synchronized(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if self.status() == Status::Synchronized {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}

/// The background task: a round every interval (backing off, up to 64
/// times the interval, while no answer comes), until dropped.
async fn keep_in_sync(
    ensemble: Ensemble,
    clock: Arc<dyn Clock>,
    state: Arc<Mutex<State>>,
    config: SyncedClockConfig,
) {
    let mut filters = Filters::new(
        &ensemble,
        FilterConfig {
            window: config.keep.max(1),
            max_drift_ppm: config.max_drift_ppm,
            ..FilterConfig::default()
        },
    );
    let names = ensemble.names();
    let mut wait = config.interval;
    loop {
        let round = ensemble.sync(&config.sync).await;
        // This clock is never corrected: the filter's frame is its own.
        let round = filters.apply(&ensemble, round, Nanos::ZERO);
        match round.combined() {
            Some(c) => {
                let mut s = lock(&state);
                s.anchor = Some(Anchor {
                    at: c.reference,
                    low: c.low,
                    high: c.high,
                });
                s.last_success = Some(clock.now());
                s.disagreement = false;
                s.last_error = None;
                wait = config.interval;
            }
            None => {
                let why = round.failure(&names).unwrap_or_else(|| "no answer".into());
                tracing::debug!(error = %why, "round failed; backing off");
                let mut s = lock(&state);
                s.disagreement = round.answered() > 0;
                s.last_error = Some(why);
                wait = (wait * 2).min(config.interval * 64);
            }
        }
        tokio::time::sleep(spread(wait)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(n: i64) -> Timestamp {
        Timestamp::from_nanos(1_800_000_000_000_000_000 + n)
    }

    #[test]
    fn an_anchor_widens_with_age() {
        let anchor = Anchor {
            at: ts(0),
            low: Nanos::from_nanos(100),
            high: Nanos::from_nanos(300),
        };
        // 50 ppm over 1 s: 50 µs each side.
        let (lo, hi) = interval_at(&anchor, ts(1_000_000_000), 50);
        assert_eq!(lo, i128::from(ts(1_000_000_000).as_nanos()) + 100 - 50_000);
        assert_eq!(hi, i128::from(ts(1_000_000_000).as_nanos()) + 300 + 50_000);
        // No time back: an anchor "from the future" is not narrowed.
        let (lo, hi) = interval_at(&anchor, ts(-5), 50);
        assert_eq!(hi - lo, 200);
    }
}
