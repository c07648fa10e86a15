//! The filter over syncs: what a source's history says, better than any one
//! burst. Pure: the caller feeds it each sync's samples and asks.
//!
//! A daemon sees many bursts. Each sample confines the offset (server
//! minus local) at its moment to an honest interval `[ts3 − ts4, ts2 − ts1]`
//! (widened by the server's root distance). Over minutes the offset moves
//! (the two clocks run at slightly different rates), so samples of
//! different ages are not directly comparable. Two estimates are kept:
//!
//! - **The bound: honest whatever happens.** Every sample's interval is
//!   widened by `max_drift × age` (the most two clocks can drift apart
//!   since) and the intersection taken, as [`crate::sync`] does within one
//!   burst. This holds whenever the drift assumption does; it needs no
//!   model of the frequency. If the intersection is empty (the server
//!   stepped, or the assumption failed), the newest burst's own interval
//!   is the bound.
//! - **The estimate: set membership.** Over a window of recent syncs the
//!   offset is a line `θ(t) = θ_now − f·age` (a frequency `f` constant
//!   over the window, give or take a small wander allowance). The lines
//!   that pass through every sample's interval form a convex region in
//!   `(θ_now, f)`; the estimate is the middle of the values `θ_now` takes
//!   over it, and the frequency the middle of its `f`. It is a linear
//!   program in two unknowns, solved exactly: for each `f`, `θ_now` lies
//!   between `A_lo(f) = max(lo_i + f·age_i)` and `A_hi(f) = min(hi_i +
//!   f·age_i)`; the feasible `f` are where `A_hi − A_lo ≥ 0` (a concave
//!   function, so an interval found by search).
//!
//! Why this and not a regression over the quietest samples (chrony) or a
//! Kalman filter (ntpd-rs): on a jittery path few exchanges are quiet both
//! ways, but many are quiet one way. A fast trip out pins the upper edge of
//! its interval to the truth; a fast trip back, in another exchange, pins
//! the lower edge. A regression over offsets cannot use that (each offset
//! carries half of the other way's delay); the intervals do, and a popcorn
//! spike only makes one interval wide, never wrong. The lab measures the
//! difference (`lab --watch`, README).
//!
//! **Steps.** A server restarted with another time (or a path that
//! changed) shows as samples that fit no line through the history. When
//! the newest sync does not fit, it is held apart (the estimate comes from
//! the history) and flagged; when a second one in a row does not fit the
//! history either, but fits with the first, the history is dropped: the
//! filter never averages across a step. In the sync that shows a step the
//! bound is the newest burst's own (the intersection across the step is
//! empty or excludes too much: see [`Estimate::step_detected`]).
//!
//! **Frames.** All offsets here are in the *natural* frame: what they would
//! be had the local clock never been corrected. A caller that steps or
//! slews the clock passes the total correction applied so far with each
//! sync, and gets estimates back in the clock's present frame.

use crate::sync::Sample;
use crate::time::{Nanos, Timestamp};
use std::collections::VecDeque;

/// How the filter behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterConfig {
    /// Syncs kept in the window.
    pub window: usize,
    /// The most two clocks may drift apart, parts per million: the honest
    /// bound's only assumption (as [`crate::sync::SyncParams`]).
    pub max_drift_ppm: u32,
    /// How far the frequency may wander over the window, in parts per
    /// billion: each sample's interval is widened by this times its age
    /// for the estimate (not the bound), so a clock whose rate drifts a
    /// little still fits one line.
    pub wander_ppb: u32,
}

impl Default for FilterConfig {
    /// 32 syncs (a minute at 2 s, half an hour at a minute), 100 ppm,
    /// 20 ppb of wander.
    fn default() -> Self {
        FilterConfig {
            window: 32,
            max_drift_ppm: 100,
            wander_ppb: 20,
        }
    }
}

/// What the filter says now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// The local time it refers to (the newest sample's arrival).
    pub reference: Timestamp,
    /// The estimated offset, server minus local, in the present frame.
    pub offset: Nanos,
    /// The honest interval's lower end.
    pub low: Nanos,
    /// The honest interval's upper end.
    pub high: Nanos,
    /// The frequency of the offset (its change per second), parts per
    /// billion: the local clock runs slow by this much (fast, if
    /// negative). `None` until two syncs are far enough apart to say.
    pub frequency_ppb: Option<i64>,
    /// How far the true frequency may be from it, ppb.
    pub frequency_uncertainty_ppb: Option<i64>,
    /// Samples in the window.
    pub samples: usize,
    /// Syncs in the window.
    pub syncs: usize,
    /// Half the range of offsets the model allows now (not a bound: the
    /// model assumes the frequency steady), when it fits.
    pub spread: Option<Nanos>,
    /// How wide the newest sync's own interval is, against the median of
    /// the window's: above 2, the path has got noisier.
    pub noise_ratio_percent: u32,
    /// The newest sync does not fit the history: a step, held apart (or,
    /// if confirmed, the history was dropped).
    pub step_detected: bool,
}

impl Estimate {
    /// The farthest the truth can be from `offset`.
    pub fn bound(&self) -> Nanos {
        let d = self
            .offset
            .as_nanos()
            .abs_diff(self.low.as_nanos())
            .max(self.offset.as_nanos().abs_diff(self.high.as_nanos()));
        Nanos::from_nanos(d.min(i64::MAX as u64) as i64)
    }

    /// Whether `offset` lies in the honest interval.
    pub fn contains(&self, offset: Nanos) -> bool {
        self.low <= offset && offset <= self.high
    }
}

/// One sample in the natural frame: its interval at local time `at`.
#[derive(Clone, Copy, Debug)]
struct Point {
    /// Local time (ns since the epoch) the interval refers to: the arrival.
    at: i128,
    /// The interval, natural frame, ns.
    lo: i128,
    hi: i128,
    /// The exchange's duration (ts4 − ts1): drift within it widens too.
    span: i128,
}

/// One sync's samples.
#[derive(Clone, Debug)]
struct Sync {
    points: Vec<Point>,
}

/// The filter of one source.
#[derive(Clone, Debug)]
pub struct Filter {
    config: FilterConfig,
    history: VecDeque<Sync>,
    /// A sync that did not fit the history, held apart.
    suspect: Option<Sync>,
    /// The correction applied to the clock so far (present = natural −
    /// correction).
    correction: i128,
}

/// The widest frequency the estimate considers, ppm: twice what the kernel
/// corrects.
const MAX_FREQUENCY_PPM: i128 = 1_000;

/// Parts per trillion in one ppb: frequencies are searched in ppt so that
/// the integer search is fine enough for long windows.
const PPT_PER_PPB: i128 = 1_000;
const PPT: i128 = 1_000_000_000_000;

/// `ceil(age × ppb / 1e9)` for a non-negative age.
fn allowance_ppb(age: i128, ppb: i128) -> i128 {
    (age.max(0) * ppb + 999_999_999) / 1_000_000_000
}

/// `value × ppt / 1e12`, rounded toward minus infinity.
fn scale_ppt(value: i128, ppt: i128) -> i128 {
    (value * ppt).div_euclid(PPT)
}

impl Filter {
    /// An empty filter.
    pub fn new(config: FilterConfig) -> Self {
        Filter {
            config,
            history: VecDeque::with_capacity(config.window + 1),
            suspect: None,
            correction: 0,
        }
    }

    /// Forgets everything (the clock was stepped by someone else, say).
    pub fn reset(&mut self) {
        self.history.clear();
        self.suspect = None;
    }

    /// Samples in the window.
    pub fn len(&self) -> usize {
        self.history.iter().map(|s| s.points.len()).sum()
    }

    /// True before the first sync.
    pub fn is_empty(&self) -> bool {
        self.history.is_empty()
    }

    fn to_sync(&self, samples: &[Sample], correction: i128) -> Sync {
        let points = samples
            .iter()
            .filter_map(|s| {
                let (lo, hi) = s.interval(Nanos::ZERO);
                (lo <= hi).then(|| Point {
                    at: i128::from(s.ts4().as_nanos()),
                    lo: lo + correction,
                    hi: hi + correction,
                    span: s.ts4().diff_i128(s.ts1()).max(0),
                })
            })
            .collect();
        Sync { points }
    }

    /// Takes one sync's samples, made while the clock's total correction
    /// (steps and slews applied so far) was `correction`, and says what
    /// the history says now. `None` when there are no usable samples yet.
    pub fn update(&mut self, samples: &[Sample], correction: Nanos) -> Option<Estimate> {
        self.correction = i128::from(correction.as_nanos());
        let sync = self.to_sync(samples, self.correction);
        if sync.points.is_empty() {
            return self.estimate();
        }
        let fits = |history: &VecDeque<Sync>, extra: &[&Sync]| {
            let points: Vec<Point> = history
                .iter()
                .flat_map(|s| s.points.iter().copied())
                .chain(extra.iter().flat_map(|s| s.points.iter().copied()))
                .collect();
            let now = points.iter().map(|p| p.at).max().unwrap_or(0);
            solve(&points, now, &self.config).is_some()
        };
        let mut step = false;
        if self.history.is_empty() || fits(&self.history, &[&sync]) {
            self.suspect = None;
            self.history.push_back(sync);
        } else {
            step = true;
            match self.suspect.take() {
                // Two in a row that do not fit the history, but fit each
                // other: the server (or the path) changed. Drop the past.
                Some(first) if fits(&VecDeque::from([first.clone()]), &[&sync]) => {
                    self.history.clear();
                    self.history.push_back(first);
                    self.history.push_back(sync);
                }
                // The first that does not fit (or two that do not fit each
                // other either): hold it apart, and wait for the next.
                _ => self.suspect = Some(sync),
            }
        }
        while self.history.len() > self.config.window.max(1) {
            self.history.pop_front();
        }
        self.estimate().map(|e| Estimate {
            step_detected: step,
            ..e
        })
    }

    /// What the history says, without a new sync.
    pub fn estimate(&self) -> Option<Estimate> {
        let points: Vec<Point> = self
            .history
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .collect();
        let newest = self
            .suspect
            .as_ref()
            .and_then(|s| s.points.iter().map(|p| p.at).max())
            .into_iter()
            .chain(points.iter().map(|p| p.at))
            .max()?;
        let ppm = i128::from(self.config.max_drift_ppm) * 1_000;
        // The honest bound: every sample (the suspect's too: it is honest
        // about the server as it is now), widened by the drift since.
        let all = points
            .iter()
            .chain(self.suspect.iter().flat_map(|s| s.points.iter()));
        let widened = |p: &Point| {
            let w = allowance_ppb(newest - p.at + p.span, ppm);
            (p.lo - w, p.hi + w)
        };
        let (mut lo, mut hi) = all
            .map(widened)
            .fold((i128::MIN, i128::MAX), |(l, h), (a, b)| {
                (l.max(a), h.min(b))
            });
        if lo > hi {
            // A contradiction: a step, or the drift assumption failed. The
            // newest sync alone is still honest.
            let latest = self.suspect.as_ref().or(self.history.back())?;
            (lo, hi) = latest
                .points
                .iter()
                .map(widened)
                .fold((i128::MIN, i128::MAX), |(l, h), (a, b)| {
                    (l.max(a), h.min(b))
                });
            if lo > hi {
                return None;
            }
        }
        // The estimate: set membership over the history (the suspect held
        // apart), clamped into the honest interval.
        let solved = solve(&points, newest, &self.config);
        let (offset, frequency) = match solved {
            Some(s) => (s.center, Some(s)),
            None => ((lo + hi).div_euclid(2), None),
        };
        let offset = offset.clamp(lo, hi);
        let present = |v: i128| {
            Nanos::from_nanos((v - self.correction).clamp(i64::MIN.into(), i64::MAX.into()) as i64)
        };
        // A frequency is known only once the window spans some time.
        let spread = points.iter().map(|p| p.at).min().map_or(0, |t| newest - t);
        let frequency = frequency.filter(|_| spread >= 1_000_000_000);
        let widths: Vec<i128> = self.history.iter().filter_map(sync_width).collect();
        let noise_ratio_percent = match (self.history.back().and_then(sync_width), median(&widths))
        {
            (Some(newest), Some(m)) if m > 0 => (newest * 100 / m).clamp(0, u32::MAX.into()) as u32,
            _ => 100,
        };
        Some(Estimate {
            reference: Timestamp::from_nanos(newest.clamp(i64::MIN.into(), i64::MAX.into()) as i64),
            offset: present(offset),
            low: present(lo),
            high: present(hi),
            frequency_ppb: frequency.map(|s| (s.f_center / PPT_PER_PPB) as i64),
            // Every feasible frequency lies within this of the one given.
            frequency_uncertainty_ppb: frequency.map(|s| {
                let reach = (s.f_high - s.f_center).max(s.f_center - s.f_low);
                (reach + PPT_PER_PPB - 1).div_euclid(PPT_PER_PPB) as i64
            }),
            samples: points.len(),
            syncs: self.history.len(),
            spread: solved
                .map(|s| Nanos::from_nanos(((s.high - s.low) / 2).min(i64::MAX.into()) as i64)),
            noise_ratio_percent,
            step_detected: self.suspect.is_some(),
        })
    }
}

/// The width of a sync's tightest interval.
fn sync_width(sync: &Sync) -> Option<i128> {
    sync.points.iter().map(|p| p.hi - p.lo).min()
}

fn median(values: &[i128]) -> Option<i128> {
    let mut v = values.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// Drift over a poll interval that counts as nothing: below it, any real
/// network's own noise dominates.
pub const SETTLED: Nanos = Nanos::from_micros(10);

/// The interval before the next sync, for `--watch auto`: between `min`
/// and `max`, changing at most twofold each time, as chrony moves between
/// its minpoll and maxpoll:
///
/// - **faster** (down to `min`) while the filter converges (fewer than 8
///   syncs in its window, or a step just seen), and halved when the path
///   gets noisier (the newest sync's interval more than twice the
///   window's median);
/// - **slower** (doubled, up to `max`) when the model is settled: the
///   drift the frequency's uncertainty allows over twice the interval
///   stays under the model's own spread or [`SETTLED`], whichever is
///   larger, so polling less loses little;
/// - otherwise unchanged.
pub fn next_interval(
    current: std::time::Duration,
    estimate: Option<&Estimate>,
    min: std::time::Duration,
    max: std::time::Duration,
) -> std::time::Duration {
    use std::time::Duration;
    let clamp = |d: Duration| d.clamp(min, max.max(min));
    let Some(e) = estimate else {
        return min;
    };
    if e.syncs < 8 || e.step_detected {
        return clamp(current / 2);
    }
    if e.noise_ratio_percent > 200 {
        return clamp(current / 2);
    }
    match (e.frequency_uncertainty_ppb, e.spread) {
        (Some(f), Some(spread)) => {
            let next = current * 2;
            let drift = i128::from(f) * next.as_nanos() as i128 / 1_000_000_000;
            if drift <= i128::from(spread.max(SETTLED).as_nanos()) {
                clamp(next)
            } else {
                clamp(current)
            }
        }
        _ => clamp(current),
    }
}

/// The set-membership solution at `now`: the range of offsets the lines
/// through every (wander-widened) interval take at `now`, and the range of
/// their frequencies, in ppt; and the deepest line, the one with the most
/// room on both sides (its offset now and its frequency).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Solution {
    low: i128,
    high: i128,
    f_low: i128,
    f_high: i128,
    center: i128,
    f_center: i128,
}

/// Solves the two-unknown linear program over `points` (see the module
/// documentation). `None` if no line fits them all.
fn solve(points: &[Point], now: i128, config: &FilterConfig) -> Option<Solution> {
    if points.is_empty() {
        return None;
    }
    let wander = i128::from(config.wander_ppb);
    // Each constraint: θ_now ∈ [lo + f·age − s, hi + f·age + s].
    let constraints: Vec<(i128, i128, i128)> = points
        .iter()
        .map(|p| {
            let age = (now - p.at).max(0);
            let s = allowance_ppb(age + p.span, wander);
            (age, p.lo - s, p.hi + s)
        })
        .collect();
    let a_lo = |f: i128| {
        constraints
            .iter()
            .map(|&(age, lo, _)| lo + scale_ppt(age, f))
            .max()
            .unwrap_or(i128::MIN)
    };
    let a_hi = |f: i128| {
        constraints
            .iter()
            .map(|&(age, _, hi)| hi + scale_ppt(age, f) + 1)
            .min()
            .unwrap_or(i128::MAX)
    };
    let gap = |f: i128| a_hi(f) - a_lo(f);
    // Any frequency a clock can have (the estimate is not bound by the
    // bound's drift assumption: a clock worse than assumed is still
    // followed, though its bound is then no longer a promise).
    let limit = MAX_FREQUENCY_PPM * 1_000 * PPT_PER_PPB;
    // The widest point of the feasible band (gap is concave).
    let best = ternary_max(-limit, limit, gap);
    if gap(best) < 0 {
        return None;
    }
    // The feasible frequencies: where the gap is not negative.
    let f_low = first_true(-limit, best, |f| gap(f) >= 0);
    let f_high = last_true(best, limit, |f| gap(f) >= 0);
    // The offsets now: A_lo is convex, A_hi concave.
    let low = a_lo(ternary_max(f_low, f_high, |f| -a_lo(f)));
    let high = a_hi(ternary_max(f_low, f_high, a_hi)) - 1;
    Some(Solution {
        low,
        high: high.max(low),
        f_low,
        f_high,
        center: (a_lo(best) + a_hi(best) - 1).div_euclid(2),
        f_center: best,
    })
}

/// The argument in `[lo, hi]` where the concave `g` is greatest.
fn ternary_max(mut lo: i128, mut hi: i128, g: impl Fn(i128) -> i128) -> i128 {
    while hi - lo > 2 {
        let m1 = lo + (hi - lo) / 3;
        let m2 = hi - (hi - lo) / 3;
        if g(m1) < g(m2) {
            lo = m1 + 1;
        } else {
            hi = m2;
        }
    }
    (lo..=hi).max_by_key(|&f| g(f)).unwrap_or(lo)
}

/// The least `x` in `[lo, hi]` with `p(x)`, given `p(hi)` and that `p` is
/// false then true.
fn first_true(mut lo: i128, mut hi: i128, p: impl Fn(i128) -> bool) -> i128 {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if p(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    hi
}

/// The greatest `x` in `[lo, hi]` with `p(x)`, given `p(lo)` and that `p`
/// is true then false.
fn last_true(mut lo: i128, mut hi: i128, p: impl Fn(i128) -> bool) -> i128 {
    while lo < hi {
        let mid = lo + (hi - lo + 1) / 2;
        if p(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: i64 = 1_790_000_000_000_000_000;

    /// An exchange at local time `start` against a server whose offset at
    /// that moment is `theta`, with one-way delays `out` and `back`.
    fn exchange(start: i64, theta: i64, out: i64, back: i64) -> Sample {
        let ts1 = T0 + start;
        let ts2 = ts1 + theta + out;
        let ts3 = ts2 + 1_000;
        let ts4 = ts3 - theta + back;
        Sample::new(
            Timestamp::from_nanos(ts1),
            Timestamp::from_nanos(ts2),
            Timestamp::from_nanos(ts3),
            Timestamp::from_nanos(ts4),
        )
        .unwrap()
    }

    fn config() -> FilterConfig {
        FilterConfig::default()
    }

    /// A deterministic "random" delay in [0, max): a small LCG.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, max: i64) -> i64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) % max as u64) as i64
        }
    }

    #[test]
    fn one_sync_is_its_own_intersection() {
        let mut f = Filter::new(config());
        let samples = [exchange(0, 500, 100, 300), exchange(10_000, 500, 200, 100)];
        let e = f.update(&samples, Nanos::ZERO).unwrap();
        assert!(e.contains(Nanos::from_nanos(500)));
        assert!(e.bound() <= Nanos::from_nanos(300), "{e:?}");
        assert_eq!(e.samples, 2);
        assert_eq!(e.frequency_ppb, None, "one sync spans no time");
        assert!(!e.step_detected);
    }

    #[test]
    fn one_way_quiet_trips_pin_the_truth_over_syncs() {
        // Every exchange is quiet one way only (0 delay out, 2 ms back, or
        // the other way round): each interval is 2 ms wide, but their
        // edges meet at the truth.
        let mut f = Filter::new(config());
        let theta = 7_000;
        let mut e = None;
        for k in 0..10i64 {
            let t = k * 2_000_000_000;
            let samples = [
                exchange(t, theta, 0, 2_000_000),
                exchange(t + 5_000_000, theta, 2_000_000, 0),
            ];
            e = f.update(&samples, Nanos::ZERO);
        }
        let e = e.unwrap();
        assert!((e.offset.as_nanos() - theta).abs() < 1_000, "{e:?}");
        assert!(e.contains(Nanos::from_nanos(theta)));
        assert!(e.frequency_ppb.unwrap().abs() < 100, "{e:?}");
    }

    #[test]
    fn a_drifting_clock_is_followed_and_its_frequency_found() {
        // The offset falls by 50 µs a second (the local clock runs 50 ppm
        // fast); jittery delays.
        let mut f = Filter::new(config());
        let mut rng = Lcg(7);
        let mut last = None;
        for k in 0..40i64 {
            let t = k * 2_000_000_000;
            let samples: Vec<Sample> = (0..5)
                .map(|i| {
                    let start = t + i * 3_000_000;
                    let theta = 250_000_000 - start / 20_000;
                    exchange(start, theta, rng.next(3_000_000), rng.next(3_000_000))
                })
                .collect();
            last = f.update(&samples, Nanos::ZERO);
            let e = last.unwrap();
            let now = e.reference.as_nanos() - T0;
            let truth = 250_000_000 - now / 20_000;
            assert!(
                e.contains(Nanos::from_nanos(truth)),
                "sync {k}: {e:?} truth {truth}"
            );
        }
        let e = last.unwrap();
        let now = e.reference.as_nanos() - T0;
        let truth = 250_000_000 - now / 20_000;
        // Uniform delays up to 3 ms rarely make a quiet trip: tens of µs
        // (the lab measures the realistic paths).
        assert!(
            (e.offset.as_nanos() - truth).abs() < 60_000,
            "{e:?} vs {truth}"
        );
        let f_ppb = e.frequency_ppb.unwrap();
        let uncertainty = e.frequency_uncertainty_ppb.unwrap();
        assert!(
            (f_ppb + 50_000).abs() <= uncertainty,
            "frequency {f_ppb} ± {uncertainty} ppb"
        );
        assert!(uncertainty < 10_000, "{uncertainty}");
    }

    #[test]
    fn a_step_is_held_apart_then_followed() {
        let mut f = Filter::new(config());
        let quiet = |t: i64, theta: i64| {
            [
                exchange(t, theta, 1_000, 1_200),
                exchange(t + 10_000, theta, 900, 1_100),
            ]
        };
        for k in 0..10 {
            f.update(&quiet(k * 2_000_000_000, 0), Nanos::ZERO);
        }
        // The server steps by 10 ms.
        let e = f
            .update(&quiet(20_000_000_000, 10_000_000), Nanos::ZERO)
            .unwrap();
        assert!(e.step_detected);
        // The bound is the newest sync's own: it holds the new truth.
        assert!(e.contains(Nanos::from_nanos(10_000_000)), "{e:?}");
        let e = f
            .update(&quiet(22_000_000_000, 10_000_000), Nanos::ZERO)
            .unwrap();
        assert!(e.step_detected);
        assert!((e.offset.as_nanos() - 10_000_000).abs() < 2_000, "{e:?}");
        assert_eq!(e.samples, 4, "the history before the step is gone");
        let e = f
            .update(&quiet(24_000_000_000, 10_000_000), Nanos::ZERO)
            .unwrap();
        assert!(!e.step_detected);
        assert!(e.contains(Nanos::from_nanos(10_000_000)));
    }

    #[test]
    fn a_single_outlier_sync_does_not_reset_the_history() {
        let mut f = Filter::new(config());
        let quiet = |t: i64, theta: i64| [exchange(t, theta, 1_000, 1_200)];
        for k in 0..10 {
            f.update(&quiet(k * 2_000_000_000, 0), Nanos::ZERO);
        }
        let before = f.len();
        f.update(&quiet(20_000_000_000, 5_000_000), Nanos::ZERO)
            .unwrap();
        // Back to normal: the odd one is forgotten, the history kept.
        let e = f.update(&quiet(22_000_000_000, 0), Nanos::ZERO).unwrap();
        assert!(!e.step_detected);
        assert_eq!(f.len(), before + 1);
        assert!(e.contains(Nanos::ZERO));
    }

    #[test]
    fn corrections_are_carried_across() {
        // The clock is stepped by +1 ms between syncs: the offset seen
        // drops by 1 ms, and the filter, told of the step, keeps its
        // history and answers in the new frame.
        let mut f = Filter::new(config());
        for k in 0..5 {
            f.update(
                &[exchange(k * 2_000_000_000, 3_000_000, 1_000, 1_000)],
                Nanos::ZERO,
            );
        }
        let e = f
            .update(
                &[exchange(10_000_000_000, 2_000_000, 1_000, 1_000)],
                Nanos::from_millis(1),
            )
            .unwrap();
        assert!(!e.step_detected, "{e:?}");
        assert_eq!(f.len(), 6);
        assert!(e.contains(Nanos::from_millis(2)), "{e:?}");
    }

    #[test]
    fn polling_speeds_up_to_converge_and_slows_when_settled() {
        use std::time::Duration;
        let (min, max) = (Duration::from_secs(2), Duration::from_secs(64));
        assert_eq!(next_interval(Duration::from_secs(16), None, min, max), min);
        let mut f = Filter::new(config());
        let quiet = |t: i64| {
            [
                exchange(t, 0, 1_000, 1_000),
                exchange(t + 10_000, 0, 900, 1_100),
            ]
        };
        let mut interval = Duration::from_secs(8);
        let mut t = 0i64;
        let mut seen = Vec::new();
        for _ in 0..20 {
            let e = f.update(&quiet(t), Nanos::ZERO);
            interval = next_interval(interval, e.as_ref(), min, max);
            seen.push(interval);
            t += interval.as_nanos() as i64;
        }
        // First it hurries (down to the minimum), then it relaxes to the
        // maximum on a quiet path, never more than doubling at once.
        assert_eq!(seen[2], min, "{seen:?}");
        assert_eq!(*seen.last().unwrap(), max, "{seen:?}");
        assert!(seen.windows(2).all(|w| w[1] <= w[0] * 2), "{seen:?}");
        // A noisy sync halves it.
        let noisy = [exchange(t, 0, 3_000_000, 2_000_000)];
        let e = f.update(&noisy, Nanos::ZERO).unwrap();
        assert!(e.noise_ratio_percent > 200, "{e:?}");
        assert_eq!(next_interval(max, Some(&e), min, max), max / 2);
    }

    #[test]
    fn the_frequency_search_helpers() {
        assert_eq!(ternary_max(-100, 100, |x| -(x - 17) * (x - 17)), 17);
        assert_eq!(first_true(-50, 50, |x| x >= 3), 3);
        assert_eq!(last_true(-50, 50, |x| x <= -4), -4);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn the_bound_holds_for_any_delays_and_drift(
            theta in -1_000_000_000i64..1_000_000_000,
            ppb in -100_000i64..=100_000,
            delays in prop::collection::vec((0..5_000_000i64, 0..5_000_000i64, 0..3_000_000_000i64), 1..40),
        ) {
            // The server's offset moves by `ppb` (within the 100 ppm the
            // bound assumes); at every sync the honest interval holds the
            // truth at its reference instant.
            let mut f = Filter::new(config());
            let mut t = 0i64;
            for (out, back, gap) in delays {
                let truth_at = |x: i64| theta + (x as i128 * ppb as i128 / 1_000_000_000) as i64;
                let ts1 = t;
                let arrive = ts1 + out;
                let leave = arrive + 1_000;
                let ts4 = leave + back;
                let s = Sample::new(
                    Timestamp::from_nanos(T0 + ts1),
                    Timestamp::from_nanos(T0 + arrive + truth_at(arrive)),
                    Timestamp::from_nanos(T0 + leave + truth_at(leave)),
                    Timestamp::from_nanos(T0 + ts4),
                ).unwrap();
                let e = f.update(&[s], Nanos::ZERO).unwrap();
                let truth = truth_at(ts4);
                // One nanosecond for the integer model of drift.
                prop_assert!(e.low.as_nanos() - 1 <= truth && truth <= e.high.as_nanos() + 1,
                    "truth {truth}, {e:?}");
                prop_assert!(e.contains(e.offset));
                t = ts4 + gap;
            }
        }
    }
}
