//! What the fient daemon keeps between rounds for others to see: the
//! status behind `fient status` and the metrics, the shared-memory clock
//! segment, and the drift file.
//!
//! The watch loop calls [`Daemon::record`] once a round; everything here
//! reads from what it recorded.

use crate::{Exit, Failure};
use service::control::{ClientStatus, SourceRow, Tracking};
use service::ensemble::{Combined, Ensemble, Round};
use service::filter;
use service::ntp::Leap;
use service::shm::{self, ClockPair, ShmSnapshot, ShmWriter};
use service::synced::Status;
use service::time::Nanos;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The largest frequency a drift file may hold, ppm: the kernel's limit.
const MAX_DRIFT_FILE_PPM: f64 = 500.0;

/// What the daemon publishes besides its report lines.
#[derive(Clone, Debug, Default)]
pub struct DaemonPlan {
    /// Keep the frequency estimate here across restarts.
    pub drift_file: Option<PathBuf>,
    /// Answer `fient status` on this Unix socket.
    pub control_socket: Option<PathBuf>,
    /// Publish the interval to this shared-memory segment.
    pub shm: Option<PathBuf>,
    /// Serve Prometheus metrics here.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// A drift file's content: the clock's own frequency error, ppm (positive:
/// fast), and its uncertainty, like chrony's drift file (whose first
/// figure is the correction, the opposite sign).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Drift {
    /// The clock's frequency error, ppm, positive when it runs fast.
    pub frequency_ppm: f64,
    /// How far the truth may be from it, ppm.
    pub uncertainty_ppm: f64,
}

impl Drift {
    /// Parses a drift file: `<frequency ppm> <uncertainty ppm>` on the
    /// first line that is not a `#` comment.
    pub fn parse(text: &str) -> Result<Drift, String> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or("it is empty")?;
        let mut fields = line.split_whitespace();
        let number = |f: Option<&str>, what: &str| -> Result<f64, String> {
            let f = f.ok_or(format!("no {what}"))?;
            f.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or(format!("the {what} '{f}' is not a number"))
        };
        let frequency_ppm = number(fields.next(), "frequency")?;
        let uncertainty_ppm = number(fields.next(), "uncertainty")?;
        if fields.next().is_some() {
            return Err("more than two figures on its line".into());
        }
        if frequency_ppm.abs() > MAX_DRIFT_FILE_PPM {
            return Err(format!(
                "a frequency of {frequency_ppm} ppm is beyond the kernel's ±500 ppm"
            ));
        }
        if !(0.0..=MAX_DRIFT_FILE_PPM).contains(&uncertainty_ppm) {
            return Err(format!(
                "an uncertainty of {uncertainty_ppm} ppm is not between 0 and 500"
            ));
        }
        Ok(Drift {
            frequency_ppm,
            uncertainty_ppm,
        })
    }

    /// The file's text.
    pub fn render(&self) -> String {
        format!(
            "{:+.3} {:.3}\n# fient drift file: this clock's frequency error in ppm (positive: it runs fast) and its uncertainty\n",
            self.frequency_ppm, self.uncertainty_ppm
        )
    }

    /// Reads `path`: `None` (with a warning logged) when it is missing or
    /// cannot be used; a fresh start, not a failure.
    pub fn load(path: &Path) -> Option<Drift> {
        match std::fs::read_to_string(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(
                    "cannot read drift file '{}': {e}; starting without a frequency estimate",
                    path.display()
                );
                None
            }
            Ok(text) => match Drift::parse(&text) {
                Ok(d) => Some(d),
                Err(why) => {
                    tracing::warn!(
                        "ignoring drift file '{}': {why}; starting without a frequency estimate",
                        path.display()
                    );
                    None
                }
            },
        }
    }

    /// Writes `path` atomically: a temporary file beside it, flushed to
    /// disk, renamed over it. A reader (or a crash) sees the old file or
    /// the new one, never a mix.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = path
            .file_name()
            .map_or_else(|| "drift".into(), |n| n.to_string_lossy().into_owned());
        let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let written = (|| {
            let mut f = std::fs::File::create(&temp)?;
            f.write_all(self.render().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&temp, path)?;
            // The rename itself, on disk.
            std::fs::File::open(dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written
    }
}

/// One source's state between rounds.
#[derive(Clone, Debug, Default)]
struct SourceState {
    row: SourceRow,
    last_answer: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    tracking: Option<(Tracking, Instant)>,
    sources: Vec<SourceState>,
    syncs: BTreeMap<String, u64>,
    next_poll: Duration,
    last_snapshot: Option<ShmSnapshot>,
    drift: Option<Drift>,
    drift_saved: Option<Drift>,
    /// The kernel's frequency correction when the watch started, ppb: the
    /// filter measures the clock's rate with it in force.
    baseline_ppb: i64,
}

/// The daemon's shared state: written by the watch loop, read by the
/// control socket and the metrics.
pub struct Daemon {
    started: Instant,
    correcting: bool,
    max_drift_ppm: u32,
    plan: DaemonPlan,
    inner: Mutex<Inner>,
    shm: Option<Mutex<ShmWriter>>,
}

/// What the watch loop did to the clock this round, for the segment: a
/// step moves every offset at once, a slew over the next while.
#[derive(Clone, Copy, Debug, Default)]
pub struct Applied {
    /// Stepped by this much.
    pub step: Nanos,
    /// A slew of this much started.
    pub slew: Nanos,
}

impl Daemon {
    /// Sets up what `plan` asks for: the segment is opened (and marked
    /// unsynchronised until the first round) and the drift file read.
    pub fn new(
        ensemble: &Ensemble,
        plan: DaemonPlan,
        correcting: bool,
        max_drift_ppm: u32,
    ) -> Result<Daemon, Failure> {
        let shm = match &plan.shm {
            None => None,
            Some(path) => {
                let mut writer = ShmWriter::create(path).map_err(|e| {
                    Failure::new(
                        if e.kind() == std::io::ErrorKind::PermissionDenied {
                            Exit::Permission
                        } else {
                            Exit::Usage
                        },
                        anyhow::anyhow!("cannot publish to '{}': {e}", path.display()),
                    )
                })?;
                writer.write(&ShmSnapshot::unsynchronized());
                Some(Mutex::new(writer))
            }
        };
        let drift = plan.drift_file.as_deref().and_then(Drift::load);
        let sources = ensemble
            .members()
            .iter()
            .map(|m| SourceState {
                row: SourceRow {
                    name: m.name(),
                    wire: m.source.wire().scheme().to_string(),
                    status: "not_yet_asked".into(),
                    ..SourceRow::default()
                },
                last_answer: None,
            })
            .collect();
        Ok(Daemon {
            started: Instant::now(),
            correcting,
            max_drift_ppm,
            plan,
            inner: Mutex::new(Inner {
                sources,
                drift,
                drift_saved: drift,
                ..Inner::default()
            }),
            shm,
        })
    }

    /// Tells the daemon the frequency correction in force as the watch
    /// starts (ppb, positive: faster), which the filter's rate includes.
    pub fn set_baseline(&self, ppb: i64) {
        self.lock().baseline_ppb = ppb;
    }

    /// What the drift file said at start, if it could be used.
    pub fn drift_at_start(&self) -> Option<Drift> {
        self.lock().drift_saved
    }

    /// The plan.
    pub fn plan(&self) -> &DaemonPlan {
        &self.plan
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a round: its sources, the combined answer (if one formed)
    /// and the filter's view, the frequency correction in force
    /// (`--slew`), what was done to the clock, and when the next round is.
    pub fn record(
        &self,
        ensemble: &Ensemble,
        round: &Round,
        view: Option<&filter::Estimate>,
        correction_ppb: Option<i64>,
        applied: Applied,
        next: Duration,
    ) {
        let now = Instant::now();
        let combined = round.combined();
        let mut inner = self.lock();
        inner.next_poll = next;
        let outcome = match (&combined, round.answered()) {
            (Some(_), _) => "synced",
            (None, 0) => "no_answer",
            (None, _) => "no_majority",
        };
        *inner.syncs.entry(outcome.into()).or_default() += 1;
        for (i, member) in ensemble.members().iter().enumerate() {
            let status = round.status(i);
            let state = &mut inner.sources[i];
            state.row.name = member.name();
            state.row.status = status.name().into();
            state.row.reach = (state.row.reach << 1) | u8::from(status.answered());
            match &round.results[i] {
                Ok(report) => {
                    state.last_answer = Some(now);
                    let filtered = round.filtered(i);
                    state.row.offset_ns = Some(
                        filtered
                            .map_or(report.estimate.offset, |f| f.offset)
                            .as_nanos(),
                    );
                    state.row.bound_ns = Some(
                        filtered
                            .map_or(report.estimate.bound(), filter::Estimate::bound)
                            .as_nanos(),
                    );
                    state.row.rtt_ns = Some(report.min_rtt.as_nanos());
                    state.row.stratum = report.server_state.map(|s| s.stratum);
                    state.row.samples = filtered.map(|f| f.samples);
                    state.row.error = None;
                }
                Err(e) => state.row.error = Some(e.to_string()),
            }
        }
        let agreeing: Vec<usize> = (0..round.results.len())
            .filter(|&i| {
                use service::ensemble::Status as S;
                matches!(round.status(i), S::Selected | S::Agrees)
            })
            .collect();
        let states: Vec<_> = agreeing
            .iter()
            .filter_map(|&i| round.results[i].as_ref().ok()?.server_state)
            .collect();
        let leap = if states.is_empty() {
            None
        } else if states.iter().all(|s| s.leap == Leap::AddSecond) {
            Some(Leap::AddSecond)
        } else if states.iter().all(|s| s.leap == Leap::DeleteSecond) {
            Some(Leap::DeleteSecond)
        } else {
            Some(Leap::None)
        };
        // The filter's frequency is the offset's slope: a clock running
        // fast sees the offset fall. It runs at its own error plus the
        // correction in force at the start (the filter adds back ours).
        let baseline = inner.baseline_ppb;
        let measured = view.and_then(|v| {
            Some(Drift {
                frequency_ppm: (-v.frequency_ppb? - baseline) as f64 / 1e3,
                uncertainty_ppm: v.frequency_uncertainty_ppb.unwrap_or(0) as f64 / 1e3,
            })
        });
        if measured.is_some() {
            inner.drift = measured;
        }
        let (frequency, from) = match (measured, inner.drift) {
            (Some(m), _) => (Some(m), "filter"),
            (None, Some(d)) => (Some(d), "drift_file"),
            (None, None) => (None, ""),
        };
        match &combined {
            Some(c) => {
                let tracking = Tracking {
                    reference: agreeing
                        .iter()
                        .map(|&i| ensemble.members()[i].name())
                        .collect(),
                    reference_time: c.reference.to_string(),
                    offset_ns: c.offset.as_nanos(),
                    bound_ns: c.bound().as_nanos(),
                    max_drift_ppm: self.max_drift_ppm,
                    frequency_ppm: frequency.map(|d| d.frequency_ppm),
                    frequency_uncertainty_ppm: frequency.map(|d| d.uncertainty_ppm),
                    frequency_from: frequency.map(|_| from.to_string()),
                    frequency_correction_ppm: correction_ppb.map(|p| p as f64 / 1e3),
                    leap: match leap {
                        None => "unknown",
                        Some(Leap::AddSecond) => "insert",
                        Some(Leap::DeleteSecond) => "delete",
                        Some(_) => "normal",
                    }
                    .into(),
                    stratum: states.iter().map(|s| s.stratum.saturating_add(1)).min(),
                    agreeing: c.agreeing,
                    answered: c.answered,
                    ..Tracking::default()
                };
                let _ = service::systemd::status(&format!(
                    "synced: offset {:+} ± {}, {} of {} agree",
                    c.offset,
                    c.bound(),
                    c.agreeing,
                    c.answered
                ));
                inner.tracking = Some((tracking, now));
                let snapshot = self.snapshot_for(c, applied, leap, next);
                inner.last_snapshot = Some(snapshot);
                self.publish(&snapshot);
            }
            None => {
                let _ = service::systemd::status(&format!("{outcome}: running free"));
                // Running free: what was published goes on aging, marked
                // stale, and is kept alive for the next try.
                if let Some(mut s) = inner.last_snapshot {
                    s.status = Status::Stale;
                    s.void_after_mono = shm::mono_now().saturating_add(valid_for(next).as_nanos());
                    inner.last_snapshot = Some(s);
                    self.publish(&s);
                }
            }
        }
        if let (Some(path), Some(d)) = (&self.plan.drift_file, measured)
            && inner.drift_saved.is_none_or(|s| {
                (s.frequency_ppm - d.frequency_ppm).abs() >= 0.001
                    || (s.uncertainty_ppm - d.uncertainty_ppm).abs() >= 0.001
            })
        {
            match d.save(path) {
                Ok(()) => inner.drift_saved = Some(d),
                Err(e) => tracing::warn!("cannot write drift file '{}': {e}", path.display()),
            }
        }
    }

    /// The segment's snapshot for a combined answer: the interval moved
    /// from the reference instant to now (widened by the drift allowed
    /// over the gap), by the step just made, and widened by the slew just
    /// started (the aging clock runs at the slewed rate until it is done).
    fn snapshot_for(
        &self,
        c: &Combined,
        applied: Applied,
        leap: Option<Leap>,
        next: Duration,
    ) -> ShmSnapshot {
        let at = ClockPair::read();
        let gap = at
            .real
            .as_nanos()
            .saturating_sub(c.reference.as_nanos())
            .unsigned_abs();
        let widen = Nanos::from_nanos(
            (u128::from(gap) * u128::from(self.max_drift_ppm)).div_ceil(1_000_000) as i64,
        );
        let slew = applied.slew.as_nanos();
        let low = c
            .low
            .saturating_sub(applied.step)
            .saturating_sub(widen)
            .saturating_sub(Nanos::from_nanos(slew.max(0)));
        let high = c
            .high
            .saturating_sub(applied.step)
            .saturating_add(widen)
            .saturating_sub(Nanos::from_nanos(slew.min(0)));
        let mut s = ShmSnapshot::synchronized(
            at,
            low,
            high,
            self.max_drift_ppm.saturating_mul(1_000),
            valid_for(next),
        );
        s.leap = match leap {
            Some(Leap::AddSecond) => shm::Leap::Insert,
            Some(Leap::DeleteSecond) => shm::Leap::Delete,
            _ => shm::Leap::None,
        };
        s
    }

    fn publish(&self, snapshot: &ShmSnapshot) {
        if let Some(w) = &self.shm {
            w.lock().unwrap_or_else(|e| e.into_inner()).write(snapshot);
        }
    }

    /// Marks the segment stale at shutdown: readers keep an honest,
    /// widening interval, and know no one keeps it up.
    pub fn stop(&self) {
        let mut inner = self.lock();
        if let Some(mut s) = inner.last_snapshot {
            s.status = Status::Stale;
            inner.last_snapshot = Some(s);
            self.publish(&s);
        }
    }

    /// What `fient status` shows, now.
    pub fn status(&self) -> ClientStatus {
        let inner = self.lock();
        let age = |at: Instant| at.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        ClientStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_ns: age(self.started),
            correcting: self.correcting,
            tracking: inner.tracking.as_ref().map(|(t, at)| {
                let elapsed = at.elapsed();
                Tracking {
                    age_ns: age(*at),
                    bound_now_ns: service::control::bound_after(
                        Nanos::from_nanos(t.bound_ns),
                        elapsed,
                        self.max_drift_ppm,
                    )
                    .as_nanos(),
                    ..t.clone()
                }
            }),
            sources: inner
                .sources
                .iter()
                .map(|s| SourceRow {
                    last_answer_age_ns: s.last_answer.map(age),
                    ..s.row.clone()
                })
                .collect(),
            syncs: inner.syncs.clone(),
            next_poll_ns: inner.next_poll.as_nanos().min(u128::from(u64::MAX)) as u64,
            shm: self.plan.shm.clone(),
            drift_file: self.plan.drift_file.clone(),
        }
    }
}

impl Daemon {
    /// The Prometheus view now: the same figures as [`status`](Self::status).
    pub fn metrics(&self) -> service::metrics::FientMetrics {
        use service::metrics::{CombinedMetrics, FientMetrics, SourceMetrics};
        let s = self.status();
        let secs = |ns: i64| ns as f64 / 1e9;
        FientMetrics {
            sources: s
                .sources
                .iter()
                .map(|r| SourceMetrics {
                    name: r.name.clone(),
                    wire: r.wire.clone(),
                    status: r.status.clone(),
                    offset_seconds: r.offset_ns.map(secs),
                    bound_seconds: r.bound_ns.map(secs),
                    rtt_seconds: r.rtt_ns.map(secs),
                    reachability: r.reach,
                    stratum: r.stratum,
                })
                .collect(),
            combined: s.tracking.as_ref().map(|t| CombinedMetrics {
                offset_seconds: secs(t.offset_ns),
                bound_seconds: secs(t.bound_now_ns),
                agreeing: t.agreeing,
                answered: t.answered,
            }),
            syncs: ["synced", "no_answer", "no_majority"]
                .iter()
                .map(|k| (k.to_string(), s.syncs.get(*k).copied().unwrap_or(0)))
                .collect(),
            last_sync_age: s.tracking.as_ref().map(|t| Duration::from_nanos(t.age_ns)),
            frequency_ppm: s.tracking.as_ref().and_then(|t| t.frequency_ppm),
        }
    }
}

/// How long a published snapshot stays valid without news: the writer
/// is late after twice the interval and half a minute more.
fn valid_for(next: Duration) -> Nanos {
    Nanos::from_nanos(
        (next * 2 + Duration::from_secs(30))
            .as_nanos()
            .min(i64::MAX as u128) as i64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_files_round_trip_and_bad_ones_say_why() {
        let d = Drift {
            frequency_ppm: -41.203,
            uncertainty_ppm: 0.05,
        };
        assert_eq!(Drift::parse(&d.render()), Ok(d));
        assert_eq!(
            Drift::parse("# comment\n\n  12.5   0.25 \n"),
            Ok(Drift {
                frequency_ppm: 12.5,
                uncertainty_ppm: 0.25
            })
        );
        for (text, why) in [
            ("", "empty"),
            ("# only a comment\n", "empty"),
            ("12.5\n", "no uncertainty"),
            ("fast 1\n", "'fast' is not a number"),
            ("NaN 1\n", "not a number"),
            ("600 1\n", "beyond the kernel"),
            ("1 -1\n", "not between"),
            ("1 2 3\n", "more than two"),
        ] {
            let e = Drift::parse(text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_drift_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fient.drift");
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(Drift::load(&path), None, "a bad file is a fresh start");
        let d = Drift {
            frequency_ppm: 3.5,
            uncertainty_ppm: 0.1,
        };
        d.save(&path).unwrap();
        assert_eq!(Drift::load(&path), Some(d));
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
        let e = d.save(&dir.path().join("no/such/dir/drift")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(Drift::load(&dir.path().join("missing")), None);
    }
}
