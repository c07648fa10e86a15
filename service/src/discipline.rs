//! Keeping a clock right over time: what to do with each new offset. Pure:
//! the caller measures, asks, and applies the answer through the
//! [`crate::clock::Clock`] trait.
//!
//! Each sync measures θ, the server's clock minus ours. The discipline
//! answers with one of:
//!
//! - **step** when |θ| is above the step threshold (chrony's `makestep`),
//! - **slew** otherwise: the clock is corrected gradually, in whole
//!   microseconds (the kernel's unit) and at most [`MAX_SLEW`], replacing
//!   any slew still under way,
//! - **refuse** when |θ| is above the panic limit (ntpd's `panic`): such a
//!   jump is more likely a broken server than a broken clock, and a human
//!   should decide (`--force`). A refused offset changes nothing, not even
//!   the frequency estimate.
//!
//! and, once it has seen enough, a **frequency** correction: the clock's
//! own rate error, estimated from how θ moves between syncs once the
//! corrections already applied are added back. With the frequency right,
//! θ stops growing between syncs and the slews only mop up noise.
//!
//! The estimate is a least-squares line through the last few "natural"
//! offsets (θ plus every correction applied so far: what θ would be had we
//! never touched the clock); its slope is the clock's rate error. All of it
//! in integer nanoseconds and parts per billion.

use crate::time::{Nanos, Timestamp};
use std::collections::VecDeque;

/// The largest slew: what `adjtime` takes. Offsets larger than this must be
/// stepped, so the step threshold is at most this.
pub const MAX_SLEW: Nanos = Nanos::from_millis(500);

/// How the discipline behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DisciplineConfig {
    /// Correct the clock (`--slew`); if false, only report.
    pub correct: bool,
    /// Offsets above this are stepped, below it slewed (chrony's makestep:
    /// 0.1 s). Taken as at most [`MAX_SLEW`].
    pub step_threshold: Nanos,
    /// Offsets above this are refused unless `force`; `None` for no limit.
    pub max_correction: Option<Nanos>,
    /// Apply corrections above `max_correction` anyway.
    pub force: bool,
    /// Syncs the frequency estimate looks back over.
    pub window: usize,
}

impl Default for DisciplineConfig {
    fn default() -> Self {
        DisciplineConfig {
            correct: false,
            step_threshold: Nanos::from_millis(100),
            max_correction: Some(Nanos::from_secs(1000)),
            force: false,
            window: 8,
        }
    }
}

/// What to do about one offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing (reporting only).
    None,
    /// Step the clock by this much.
    Step(Nanos),
    /// Slew the clock by this much, replacing any slew under way.
    Slew(Nanos),
    /// Too large to correct without being told to.
    Refuse(Nanos),
}

/// The discipline's answer to one sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Update {
    /// The phase correction.
    pub action: Action,
    /// A new frequency correction to set, in ppb (positive: faster).
    pub set_frequency_ppb: Option<i64>,
    /// How fast the clock runs by itself against the server, in ppb
    /// (positive: fast), once at least three syncs are in.
    pub drift_ppb: Option<i64>,
}

#[derive(Clone, Copy, Debug)]
struct Point {
    at: i128,
    natural: i128,
}

/// The state carried from sync to sync.
#[derive(Clone, Debug)]
pub struct Discipline {
    config: DisciplineConfig,
    points: VecDeque<Point>,
    /// Phase corrections that have taken effect (steps, and the applied
    /// part of slews), in ns.
    applied: i128,
    /// The slew last asked for, in ns.
    slew_asked: i64,
    /// The frequency correction in force, ppb, and since when (local ns).
    frequency_ppb: i64,
    frequency_since: Option<i128>,
    /// The correction in force before the discipline started (left by
    /// another program, or an earlier run): corrections are counted from it.
    baseline_ppb: i64,
    /// ∫ frequency dt up to `frequency_since`, in ns.
    frequency_applied: i128,
}

/// The largest frequency correction set: ±500 ppm, the kernel's limit.
const MAX_PPB: i64 = crate::clock::MAX_FREQUENCY_PPB;

impl Discipline {
    /// A discipline with nothing seen yet, for a clock whose frequency
    /// correction is now `baseline_ppb` (ask the clock: the kernel keeps it
    /// across programs).
    pub fn new(config: DisciplineConfig, baseline_ppb: i64) -> Self {
        Discipline {
            config,
            points: VecDeque::with_capacity(config.window + 1),
            applied: 0,
            slew_asked: 0,
            frequency_ppb: baseline_ppb,
            frequency_since: None,
            frequency_applied: 0,
            baseline_ppb,
        }
    }

    /// The frequency correction in force, ppb.
    pub fn frequency_ppb(&self) -> i64 {
        self.frequency_ppb
    }

    /// ∫ (frequency − baseline) dt from the start to local time `at`, in
    /// ns: what our frequency corrections have moved the clock by.
    fn frequency_effect(&self, at: i128) -> i128 {
        let since = self.frequency_since.unwrap_or(at);
        let ours = i128::from(self.frequency_ppb - self.baseline_ppb);
        self.frequency_applied + (at - since).max(0) * ours / 1_000_000_000
    }

    /// Accounts for the slew asked for last time, of which `slew_left` was
    /// not applied (cancel it to learn that: `clock.slew(Nanos::ZERO)`).
    /// Called by [`update`](Self::update); call it first yourself to learn
    /// the [`correction`](Self::correction) in force, then pass a zero
    /// `slew_left` to `update`.
    pub fn settle(&mut self, slew_left: Nanos) {
        self.applied += i128::from(self.slew_asked - slew_left.as_nanos());
        self.slew_asked = 0;
    }

    /// Everything the discipline has done to the clock by local time `at`
    /// (steps, the applied part of slews, the effect of its frequency
    /// corrections): an offset measured then plus this is the offset had
    /// the clock never been touched (the frame [`crate::filter`] keeps
    /// its history in).
    pub fn correction(&self, at: Timestamp) -> Nanos {
        let c = self.applied + self.frequency_effect(i128::from(at.as_nanos()));
        Nanos::try_from_i128(c).unwrap_or(if c < 0 {
            Nanos::from_nanos(i64::MIN)
        } else {
            Nanos::MAX
        })
    }

    /// Takes the offset θ measured at local time `at` (server minus
    /// local) and `slew_left`, what remains now of the slew asked for last
    /// time: cancel it just before calling (`clock.slew(Nanos::ZERO)`
    /// returns it), so that what took effect is known exactly. Zero when
    /// reporting only. Returns what to do now.
    pub fn update(&mut self, at: Timestamp, offset: Nanos, slew_left: Nanos) -> Update {
        let at_ns = i128::from(at.as_nanos());
        self.settle(slew_left);
        let magnitude = offset.abs();
        if self.config.correct
            && let Some(limit) = self.config.max_correction
            && magnitude > limit
            && !self.config.force
        {
            // Most likely the server is wrong: keep it out of everything.
            return Update {
                action: Action::Refuse(offset),
                set_frequency_ppb: None,
                drift_ppb: self.slope_ppb().map(|slope| -slope),
            };
        }
        let natural = i128::from(offset.as_nanos()) + self.applied + self.frequency_effect(at_ns);
        self.points.push_back(Point { at: at_ns, natural });
        while self.points.len() > self.config.window.max(2) {
            self.points.pop_front();
        }
        // The natural offset falls as fast as the clock gains: its slope is
        // minus the drift (with the baseline correction in force).
        let drift_ppb = self.slope_ppb().map(|slope| -slope);

        if !self.config.correct {
            return Update {
                action: Action::None,
                set_frequency_ppb: None,
                drift_ppb,
            };
        }
        let threshold = self.config.step_threshold.min(MAX_SLEW);
        let action = if magnitude > threshold {
            Action::Step(offset)
        } else {
            // Whole microseconds (the nearest), as the kernel slews.
            let n = offset.as_nanos();
            let micros = (n + n.signum() * 500) / 1_000;
            Action::Slew(Nanos::from_micros(micros))
        };
        match action {
            Action::Step(by) => self.applied += i128::from(by.as_nanos()),
            Action::Slew(by) => self.slew_asked = by.as_nanos(),
            Action::None | Action::Refuse(_) => {}
        }
        // Cancel the drift: run the clock as much slower as it runs fast.
        let set_frequency_ppb =
            drift_ppb.map(|drift| (self.baseline_ppb - drift).clamp(-MAX_PPB, MAX_PPB));
        if let Some(ppb) = set_frequency_ppb {
            self.frequency_applied = self.frequency_effect(at_ns);
            self.frequency_since = Some(at_ns);
            self.frequency_ppb = ppb;
        }
        Update {
            action,
            set_frequency_ppb,
            drift_ppb,
        }
    }

    /// The least-squares slope of the natural offsets, in ppb, from at
    /// least three syncs spread over at least a millisecond.
    fn slope_ppb(&self) -> Option<i64> {
        let n = self.points.len() as i128;
        if n < 3 {
            return None;
        }
        let mean_t = self.points.iter().map(|p| p.at).sum::<i128>() / n;
        let mean_v = self.points.iter().map(|p| p.natural).sum::<i128>() / n;
        let (mut sxy, mut sxx) = (0i128, 0i128);
        for p in &self.points {
            let dt = p.at - mean_t;
            sxy += dt * (p.natural - mean_v);
            sxx += dt * dt;
        }
        let span = self.points.back()?.at - self.points.front()?.at;
        if span < 1_000_000 || sxx == 0 {
            return None;
        }
        let ppb = sxy.checked_mul(1_000_000_000)? / sxx;
        i64::try_from(ppb).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock, SimulatedClock};
    use rand::{RngExt, SeedableRng};
    use std::sync::Arc;

    const S: i64 = 1_000_000_000;

    /// One sync of `d` on `clock`, as the watch loop does it: cancel the slew
    /// under way to learn what is left, decide, apply.
    fn sync_once(
        d: &mut Discipline,
        clock: &SimulatedClock<Arc<ManualClock>>,
        measured: Nanos,
        correct: bool,
    ) -> Update {
        let slew_left = if correct {
            clock.slew(Nanos::ZERO).unwrap()
        } else {
            Nanos::ZERO
        };
        let u = d.update(clock.now(), measured, slew_left);
        match u.action {
            Action::Step(by) => clock.step(by).unwrap(),
            Action::Slew(by) => assert_eq!(clock.slew(by).unwrap(), Nanos::ZERO),
            Action::None | Action::Refuse(_) => {}
        }
        if let Some(ppb) = u.set_frequency_ppb {
            clock.set_frequency(ppb).unwrap();
        }
        u
    }

    /// Runs a discipline against a simulated clock for `syncs` syncs every
    /// `interval` seconds of true time, measuring θ with up to `noise` ns of
    /// error. Returns the clock and the updates.
    fn run(
        config: DisciplineConfig,
        offset: Nanos,
        drift_ppb: i64,
        interval: i64,
        syncs: usize,
        noise: i64,
    ) -> (SimulatedClock<Arc<ManualClock>>, Vec<Update>) {
        let truth = Arc::new(ManualClock::new(Timestamp::from_nanos(1_800_000_000 * S)));
        let clock = SimulatedClock::new(truth.clone(), offset, drift_ppb);
        let mut discipline = Discipline::new(config, clock.frequency_ppb());
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut updates = Vec::new();
        for _ in 0..syncs {
            let error = if noise > 0 {
                rng.random_range(-noise..=noise)
            } else {
                0
            };
            let measured = Nanos::from_nanos(-clock.error().as_nanos() + error);
            updates.push(sync_once(&mut discipline, &clock, measured, config.correct));
            truth.advance(Nanos::from_nanos(interval * S));
        }
        (clock, updates)
    }

    fn slewing() -> DisciplineConfig {
        DisciplineConfig {
            correct: true,
            ..DisciplineConfig::default()
        }
    }

    #[test]
    fn reporting_only_never_touches_the_clock_and_measures_the_drift() {
        let (clock, updates) = run(
            DisciplineConfig::default(),
            Nanos::from_millis(3),
            40_000,
            2,
            12,
            0,
        );
        assert!(clock.adjustments().is_empty());
        assert!(
            updates
                .iter()
                .all(|u| u.action == Action::None && u.set_frequency_ppb.is_none())
        );
        assert_eq!(updates[1].drift_ppb, None);
        // Exact but for the clock's own rate error in measuring the interval.
        let drift = updates.last().unwrap().drift_ppb.unwrap();
        assert!((drift - 40_000).abs() <= 5, "{drift}");
    }

    #[test]
    fn a_drifting_clock_converges_without_a_step() {
        // 2 ms off and 50 ppm fast, measured to ±2 µs, a sync every 2 s.
        let (clock, updates) = run(slewing(), Nanos::from_millis(2), 50_000, 2, 40, 2_000);
        assert!(!clock.was_stepped());
        // Within 10 µs of the truth, and the frequency within 2 ppm.
        assert!(
            clock.error().abs() < Nanos::from_micros(10),
            "{}",
            clock.error()
        );
        assert!(
            clock.rate_error_ppb().abs() < 2_000,
            "{}",
            clock.rate_error_ppb()
        );
        let drift = updates.last().unwrap().drift_ppb.unwrap();
        assert!((drift - 50_000).abs() < 2_000, "{drift}");
    }

    #[test]
    fn convergence_is_fast() {
        // Noise-free: how many syncs until within 1 µs and 0.5 ppm?
        let (clock, updates) = run(slewing(), Nanos::from_micros(800), -120_000, 1, 12, 0);
        assert!(
            clock.error().abs() < Nanos::from_micros(1),
            "{}",
            clock.error()
        );
        assert!(
            clock.rate_error_ppb().abs() < 500,
            "{}",
            clock.rate_error_ppb()
        );
        let first = updates[2].set_frequency_ppb.unwrap();
        assert!((first - 120_000).abs() <= 100, "{first}");
    }

    #[test]
    fn large_offsets_are_stepped_and_huge_ones_refused() {
        let (clock, updates) = run(slewing(), Nanos::from_millis(-250), 0, 2, 3, 0);
        assert_eq!(updates[0].action, Action::Step(Nanos::from_millis(250)));
        assert!(matches!(updates[1].action, Action::Slew(_)));
        assert!(clock.error().abs() < Nanos::from_micros(1));

        let huge = Nanos::from_secs(-2000);
        let (clock, updates) = run(slewing(), huge, 0, 2, 2, 0);
        assert_eq!(updates[0].action, Action::Refuse(Nanos::from_secs(2000)));
        assert_eq!(clock.error(), huge);
        let forced = DisciplineConfig {
            force: true,
            ..slewing()
        };
        let (clock, _) = run(forced, huge, 0, 2, 2, 0);
        assert_eq!(clock.error(), Nanos::ZERO);
    }

    #[test]
    fn a_slew_still_under_way_is_accounted_for() {
        // 50 ms takes 100 s at 500 ppm: many syncs see it half done. The
        // drift estimate must not mistake the slewing for drift.
        let (clock, updates) = run(slewing(), Nanos::from_millis(50), 20_000, 2, 60, 0);
        assert!(!clock.was_stepped());
        let drift = updates.last().unwrap().drift_ppb.unwrap();
        assert!((drift - 20_000).abs() < 200, "{drift}");
        assert!(
            clock.error().abs() < Nanos::from_micros(20),
            "{}",
            clock.error()
        );
    }

    #[test]
    fn refused_offsets_change_nothing_not_even_the_frequency() {
        // Honest syncs first, then a server that jumps 2000 s for good.
        let truth = Arc::new(ManualClock::new(Timestamp::from_nanos(1_800_000_000 * S)));
        let clock = SimulatedClock::new(truth.clone(), Nanos::ZERO, 30_000);
        let mut d = Discipline::new(slewing(), 0);
        let mut frequencies = Vec::new();
        for i in 0..12 {
            let jump = if i >= 6 { 2_000 * S } else { 0 };
            let measured = Nanos::from_nanos(-clock.error().as_nanos() + jump);
            let u = sync_once(&mut d, &clock, measured, true);
            if i >= 6 {
                assert_eq!(u.action, Action::Refuse(measured));
                assert_eq!(u.set_frequency_ppb, None);
            }
            frequencies.push(clock.frequency_ppb());
            truth.advance(Nanos::from_secs(16));
        }
        assert!(
            frequencies[6..].iter().all(|&f| f == frequencies[5]),
            "{frequencies:?}"
        );
        assert!((frequencies[5] + 30_000).abs() < 100, "{frequencies:?}");
    }

    #[test]
    fn slews_are_whole_microseconds_and_big_offsets_steps() {
        let config = DisciplineConfig {
            step_threshold: Nanos::from_secs(2),
            ..slewing()
        };
        let mut d = Discipline::new(config, 0);
        let t = Timestamp::from_nanos(1_800_000_000 * S);
        let mut slew = |n| d.update(t, Nanos::from_nanos(n), Nanos::ZERO).action;
        assert_eq!(slew(1_499), Action::Slew(Nanos::from_micros(1)));
        assert_eq!(slew(1_500), Action::Slew(Nanos::from_micros(2)));
        assert_eq!(slew(-499), Action::Slew(Nanos::ZERO));
        assert_eq!(slew(-501), Action::Slew(Nanos::from_micros(-1)));
        // A threshold above what adjtime takes is held to 0.5 s.
        assert_eq!(
            d.update(t, Nanos::from_millis(1_500), Nanos::ZERO).action,
            Action::Step(Nanos::from_millis(1_500))
        );
    }

    #[test]
    fn a_frequency_already_in_force_is_the_baseline() {
        // Another program left +80 ppm in the kernel; the clock's nature is
        // -20 ppm, so it runs 60 ppm fast. The discipline must end at +20.
        let truth = Arc::new(ManualClock::new(Timestamp::from_nanos(1_800_000_000 * S)));
        let clock = SimulatedClock::new(truth.clone(), Nanos::ZERO, -20_000);
        clock.set_frequency(80_000).unwrap();
        let mut d = Discipline::new(slewing(), clock.frequency_ppb());
        for _ in 0..10 {
            let measured = Nanos::from_nanos(-clock.error().as_nanos());
            sync_once(&mut d, &clock, measured, true);
            truth.advance(Nanos::from_secs(2));
        }
        assert!(
            (clock.frequency_ppb() - 20_000).abs() < 100,
            "{}",
            clock.frequency_ppb()
        );
        assert!(clock.rate_error_ppb().abs() < 100);
    }

    #[test]
    fn the_frequency_correction_is_bounded() {
        let (clock, _) = run(slewing(), Nanos::ZERO, 900_000, 1, 6, 0);
        assert_eq!(clock.frequency_ppb(), -MAX_PPB);
    }
}
