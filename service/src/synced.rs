//! [`SyncedClock`]: "what time is it, and how sure are you?" for programs
//! that embed a time service, the way Spanner's TrueTime or AWS ClockBound
//! answer: an interval, not a point.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use service::synced::{SyncedClock, SyncedClockConfig};
//!
//! let clock = SyncedClock::start("127.0.0.1:8081".parse().unwrap(), SyncedClockConfig::default()).await?;
//! let now = clock.now();
//! println!("between {} and {} ({:?})", now.earliest, now.latest, now.status);
//! # Ok(())
//! # }
//! ```
//!
//! A background task syncs with one server every `interval`. Each sync
//! confines the server's clock, as seen from a local clock, to an interval
//! that holds the truth (the honest bound of [`crate::sync`]). Between
//! syncs the local clock may drift from the server's by at most
//! `max_drift_ppm`, so each interval widens by that rate times its age.
//! [`SyncedClock::now`] intersects the intervals of the last few syncs, all
//! carried to the present: the answer holds the true server time as long
//! as the drift assumption does, and grows wider, not wrong, while the
//! server is away.
//!
//! Elapsed time is measured on [`MonotonicClock`] by default: the raw
//! hardware clock, which no step or slew of the system clock (by fient, or
//! anyone) can disturb. For the same reason the default configuration
//! stamps replies in user space: the kernel's receive timestamps are on
//! the system clock, and carrying one over to the monotonic clock would let
//! a step of the system clock in between move it. A user-space stamp is a
//! few microseconds late, which only widens the interval.

use crate::clock::{Clock, MonotonicClock};
use crate::source::{Source, SourceOptions, SourceSpec, SyncOptions, SyncReport, Wire, spread};
use crate::sync::Estimator;
use crate::time::{Nanos, Timestamp};
use crate::transport::socket::Stamping;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a [`SyncedClock`] works.
#[derive(Clone, Debug)]
pub struct SyncedClockConfig {
    /// How often to sync (with ±10 % spread, so that many clients do not
    /// all ask at once).
    pub interval: Duration,
    /// The most the local clock may drift from the server's, in parts per
    /// million. 50 ppm covers an ordinary crystal; the interval is honest
    /// only if the clock keeps within it.
    pub max_drift_ppm: u32,
    /// With no successful sync for this long, the status is `Stale`.
    pub stale_after: Duration,
    /// How many past syncs are intersected.
    pub keep: usize,
    /// How each sync is run.
    pub sync: SyncOptions,
    /// Timestamps and key of the connection.
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
    /// No sync has succeeded yet: the interval is unbounded.
    Unsynchronized,
    /// A sync succeeded within `stale_after`.
    Synchronized,
    /// The last success is older than `stale_after`: still honest, but
    /// wider by the drift allowance of every second since.
    Stale,
}

/// The server's time now, somewhere in `[earliest, latest]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeInterval {
    /// The earliest the server's clock can read now.
    pub earliest: Timestamp,
    /// The latest it can read now.
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

/// What one sync said: at local time `at`, server minus local was in
/// `[low, high]`.
#[derive(Clone, Copy, Debug)]
struct Anchor {
    at: Timestamp,
    low: Nanos,
    high: Nanos,
}

#[derive(Default)]
struct State {
    anchors: VecDeque<Anchor>,
    last_success: Option<Timestamp>,
    last_error: Option<String>,
}

/// The answer from the anchors at local time `now`: the intersection of
/// every anchor's interval, each widened by the drift allowed since it was
/// taken; the newest alone if they contradict each other (the server's
/// clock was stepped, say). Pure.
fn interval_at(anchors: &VecDeque<Anchor>, now: Timestamp, ppm: u32) -> Option<(i128, i128)> {
    let project = |a: &Anchor| {
        let age = now.diff_i128(a.at).max(0);
        let widen = (age * i128::from(ppm) + 999_999) / 1_000_000;
        (
            i128::from(now.as_nanos()) + i128::from(a.low.as_nanos()) - widen,
            i128::from(now.as_nanos()) + i128::from(a.high.as_nanos()) + widen,
        )
    };
    let newest = project(anchors.back()?);
    let both = anchors
        .iter()
        .map(project)
        .fold(newest, |(lo, hi), (l, h)| (lo.max(l), hi.min(h)));
    Some(if both.0 <= both.1 { both } else { newest })
}

/// A clock kept in step with a time server in the background, answering
/// with an interval that holds the server's time.
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
    /// Starts syncing with `server` in a task on the current Tokio runtime,
    /// measuring with [`MonotonicClock`].
    pub async fn start(server: SocketAddr, config: SyncedClockConfig) -> io::Result<SyncedClock> {
        Self::start_with_clock(server, Arc::new(MonotonicClock::new()), config).await
    }

    /// Like [`start`](Self::start), with another local clock (a simulated
    /// one, in tests).
    pub async fn start_with_clock(
        server: SocketAddr,
        clock: Arc<dyn Clock>,
        config: SyncedClockConfig,
    ) -> io::Result<SyncedClock> {
        let mut config = config;
        // Each sync must allow at least the drift the answers assume.
        let params = &mut config.sync.params;
        params.max_drift_ppm = params.max_drift_ppm.max(config.max_drift_ppm);
        let spec = SourceSpec::new(Wire::Cerv, server);
        let client = Source::open(spec, server, clock.clone(), config.client.clone()).await?;
        let state = Arc::new(Mutex::new(State::default()));
        let task = tokio::spawn(keep_in_sync(
            client,
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

    /// The server's time now, as an interval.
    pub fn now(&self) -> TimeInterval {
        let state = lock(&self.state);
        let now = self.clock.now();
        let Some((lo, hi)) = interval_at(&state.anchors, now, self.config.max_drift_ppm) else {
            return TimeInterval {
                earliest: Timestamp::from_nanos(i64::MIN),
                latest: Timestamp::from_nanos(i64::MAX),
                status: Status::Unsynchronized,
            };
        };
        let stale = state
            .last_success
            .is_none_or(|at| now.diff_i128(at) > self.config.stale_after.as_nanos() as i128);
        let clamp =
            |v: i128| Timestamp::from_nanos(v.clamp(i64::MIN.into(), i64::MAX.into()) as i64);
        TimeInterval {
            earliest: clamp(lo),
            latest: clamp(hi),
            status: if stale {
                Status::Stale
            } else {
                Status::Synchronized
            },
        }
    }

    /// True if `t` has certainly passed on the server's clock (TrueTime's
    /// `after`): even the earliest it can be now is later.
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

    /// Why the last sync failed, if it did.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.state).last_error.clone()
    }

    /// Waits until the first sync succeeds, at most `limit`; true if it did.
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

/// The anchor a sync gives: the tightest interval of the report (every
/// estimator's interval holds the truth; the intersection's is smallest).
fn anchor_of(report: &SyncReport) -> Anchor {
    let e = report
        .estimate_of(Estimator::Intersection)
        .unwrap_or(&report.estimate);
    Anchor {
        at: e.reference,
        low: e.low,
        high: e.high,
    }
}

/// The background task: sync every interval (backing off, up to 64 times
/// the interval, while the server does not answer), until dropped.
async fn keep_in_sync(
    client: Source,
    clock: Arc<dyn Clock>,
    state: Arc<Mutex<State>>,
    config: SyncedClockConfig,
) {
    let mut wait = config.interval;
    loop {
        match client.sync(&config.sync).await {
            Ok(report) => {
                let mut s = lock(&state);
                s.anchors.push_back(anchor_of(&report));
                while s.anchors.len() > config.keep.max(1) {
                    s.anchors.pop_front();
                }
                s.last_success = Some(clock.now());
                s.last_error = None;
                wait = config.interval;
            }
            Err(e) => {
                tracing::debug!(error = %e, "sync failed; backing off");
                lock(&state).last_error = Some(e.to_string());
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

    fn anchor(at: i64, low: i64, high: i64) -> Anchor {
        Anchor {
            at: ts(at),
            low: Nanos::from_nanos(low),
            high: Nanos::from_nanos(high),
        }
    }

    #[test]
    fn an_anchor_widens_with_age() {
        let anchors = VecDeque::from([anchor(0, 100, 300)]);
        // 50 ppm over 1 s: 50 µs each side.
        let (lo, hi) = interval_at(&anchors, ts(1_000_000_000), 50).unwrap();
        assert_eq!(lo, i128::from(ts(1_000_000_000).as_nanos()) + 100 - 50_000);
        assert_eq!(hi, i128::from(ts(1_000_000_000).as_nanos()) + 300 + 50_000);
        assert!(interval_at(&VecDeque::new(), ts(0), 50).is_none());
    }

    #[test]
    fn anchors_intersect_and_a_contradiction_falls_back_to_the_newest() {
        let anchors = VecDeque::from([anchor(0, -1_000, 1_000), anchor(0, 0, 5_000)]);
        let (lo, hi) = interval_at(&anchors, ts(0), 0).unwrap();
        assert_eq!(
            (
                lo - i128::from(ts(0).as_nanos()),
                hi - i128::from(ts(0).as_nanos())
            ),
            (0, 1_000)
        );
        let stepped = VecDeque::from([anchor(0, -1_000, 1_000), anchor(0, 9_000, 10_000)]);
        let (lo, _) = interval_at(&stepped, ts(0), 0).unwrap();
        assert_eq!(lo - i128::from(ts(0).as_nanos()), 9_000);
    }
}
