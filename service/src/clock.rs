//! The [`Clock`] seam: everything that reads or changes a clock goes through it.
//!
//! - [`SystemClock`] is the machine's `CLOCK_REALTIME`. Reading it is free;
//!   stepping it needs `CAP_SYS_TIME` and fails with
//!   [`ClockError::PermissionDenied`] otherwise, changing nothing.
//! - [`SkewedClock`] reads another clock plus a fixed offset: a server run with
//!   `--offset` uses it so that a test on one machine has a known truth.
//! - [`ManualClock`] only moves when told to, and records every step and slew
//!   asked of it, so clock-setting code is tested without touching the
//!   machine's clock.
//! - [`OffsetClock`] follows another clock plus an offset that steps and
//!   slews change (and record): a settable clock that still moves, for
//!   tests that exchange real packets.

use crate::time::{Nanos, Timestamp};
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::SystemTime;

/// A source of time that can, if it allows, be corrected.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time on this clock.
    fn now(&self) -> Timestamp;

    /// This clock's reading at the moment the system clock read `system`:
    /// how a kernel timestamp (taken on the system clock) is carried over
    /// to this clock. The default reads both clocks now and carries the
    /// age across; clocks that are a fixed function of the system clock
    /// override it exactly.
    fn at_system_time(&self, system: Timestamp) -> Timestamp {
        let age = SystemClock.now().diff_i128(system);
        let age = Nanos::try_from_i128(age).unwrap_or(Nanos::MAX);
        self.now().saturating_add(-age)
    }

    /// Jumps the clock by `by` at once. Clocks that cannot be set return
    /// [`ClockError::Unsupported`].
    fn step(&self, by: Nanos) -> Result<(), ClockError> {
        let _ = by;
        Err(ClockError::Unsupported { op: "step" })
    }

    /// Corrects the clock by `by` gradually, without a jump.
    fn slew(&self, by: Nanos) -> Result<(), ClockError> {
        let _ = by;
        Err(ClockError::Unsupported { op: "slew" })
    }
}

/// Why a clock could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    /// The process lacks the privilege (on Linux, `CAP_SYS_TIME`).
    #[error("permission denied: cannot {op} the system clock (needs root or CAP_SYS_TIME)")]
    PermissionDenied {
        /// The operation refused.
        op: &'static str,
    },
    /// This clock cannot be changed at all.
    #[error("this clock cannot {op}")]
    Unsupported {
        /// The operation asked for.
        op: &'static str,
    },
    /// The operating system refused for another reason.
    #[error("cannot {op} the system clock: {source}")]
    Os {
        /// The operation refused.
        op: &'static str,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
    fn at_system_time(&self, system: Timestamp) -> Timestamp {
        (**self).at_system_time(system)
    }
    fn step(&self, by: Nanos) -> Result<(), ClockError> {
        (**self).step(by)
    }
    fn slew(&self, by: Nanos) -> Result<(), ClockError> {
        (**self).slew(by)
    }
}

impl<C: Clock + ?Sized> Clock for &C {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
    fn at_system_time(&self, system: Timestamp) -> Timestamp {
        (**self).at_system_time(system)
    }
    fn step(&self, by: Nanos) -> Result<(), ClockError> {
        (**self).step(by)
    }
    fn slew(&self, by: Nanos) -> Result<(), ClockError> {
        (**self).slew(by)
    }
}

/// The machine's real-time clock (`CLOCK_REALTIME`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        // Out of range only after the year 2262.
        Timestamp::from_system_time(SystemTime::now()).unwrap_or(Timestamp::from_nanos(i64::MAX))
    }

    fn at_system_time(&self, system: Timestamp) -> Timestamp {
        system
    }

    /// Steps `CLOCK_REALTIME` by `by` in one system call
    /// (`clock_adjtime` with `ADJ_SETOFFSET`), so no time passes between
    /// reading and writing the clock.
    fn step(&self, by: Nanos) -> Result<(), ClockError> {
        sys::step_realtime(by)
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use super::ClockError;
    use crate::time::Nanos;

    pub fn step_realtime(by: Nanos) -> Result<(), ClockError> {
        let nanos = by.as_nanos();
        // ADJ_SETOFFSET with ADJ_NANO takes seconds plus a non-negative
        // nanosecond part below one second, so -1.5 s is (-2 s, 0.5e9 ns).
        let secs = nanos.div_euclid(1_000_000_000);
        let subsec = nanos.rem_euclid(1_000_000_000);
        // SAFETY: `timex` is plain data; zeroed is a valid value.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        tx.modes = libc::ADJ_SETOFFSET | libc::ADJ_NANO;
        tx.time.tv_sec = secs as libc::time_t;
        tx.time.tv_usec = subsec as libc::suseconds_t;
        // SAFETY: `tx` is a valid, initialised timex that outlives the call.
        let rc = unsafe { libc::clock_adjtime(libc::CLOCK_REALTIME, &mut tx) };
        if rc == -1 {
            let err = std::io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    ClockError::PermissionDenied { op: "step" }
                }
                _ => ClockError::Os {
                    op: "step",
                    source: err,
                },
            });
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use super::ClockError;
    use crate::time::Nanos;

    pub fn step_realtime(_by: Nanos) -> Result<(), ClockError> {
        Err(ClockError::Unsupported { op: "step" })
    }
}

/// Another clock plus a fixed offset. Cannot be set.
#[derive(Debug, Clone)]
pub struct SkewedClock<C> {
    inner: C,
    offset: Nanos,
}

impl<C: Clock> SkewedClock<C> {
    /// A clock that reads `offset` ahead of `inner` (behind, if negative).
    pub fn new(inner: C, offset: Nanos) -> Self {
        SkewedClock { inner, offset }
    }

    /// The fixed offset from the inner clock.
    pub fn offset(&self) -> Nanos {
        self.offset
    }
}

impl<C: Clock> Clock for SkewedClock<C> {
    fn now(&self) -> Timestamp {
        self.inner.now().saturating_add(self.offset)
    }
    fn at_system_time(&self, system: Timestamp) -> Timestamp {
        self.inner
            .at_system_time(system)
            .saturating_add(self.offset)
    }
}

/// A clock that moves only when told to: for tests.
///
/// [`Clock::step`] moves it at once; [`Clock::slew`] is recorded and applied
/// at once too (a test clock has no kernel to spread it out). Every
/// correction is kept in [`ManualClock::adjustments`] so tests can check
/// what was asked.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicI64,
    adjustments: Mutex<Vec<Adjustment>>,
}

/// A correction asked of a [`ManualClock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adjustment {
    /// A jump by this much.
    Step(Nanos),
    /// A gradual correction by this much.
    Slew(Nanos),
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            now: AtomicI64::new(start.as_nanos()),
            adjustments: Mutex::new(Vec::new()),
        }
    }

    /// Sets the reading.
    pub fn set(&self, to: Timestamp) {
        self.now.store(to.as_nanos(), Ordering::SeqCst);
    }

    /// Moves the reading forward (or back, if negative).
    pub fn advance(&self, by: Nanos) {
        self.now.fetch_add(by.as_nanos(), Ordering::SeqCst);
    }

    /// The corrections asked of this clock so far, oldest first.
    pub fn adjustments(&self) -> Vec<Adjustment> {
        lock(&self.adjustments).clone()
    }

    fn record(&self, adjustment: Adjustment) {
        lock(&self.adjustments).push(adjustment);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_nanos(self.now.load(Ordering::SeqCst))
    }
    fn step(&self, by: Nanos) -> Result<(), ClockError> {
        self.record(Adjustment::Step(by));
        self.advance(by);
        Ok(())
    }
    fn slew(&self, by: Nanos) -> Result<(), ClockError> {
        self.record(Adjustment::Slew(by));
        self.advance(by);
        Ok(())
    }
}

/// Another clock plus an adjustable offset: for tests that need a clock
/// which moves in real time and can be set. Steps and slews change the
/// offset at once and are recorded like [`ManualClock`]'s.
#[derive(Debug)]
pub struct OffsetClock<C> {
    inner: C,
    offset: AtomicI64,
    adjustments: Mutex<Vec<Adjustment>>,
}

impl<C: Clock> OffsetClock<C> {
    /// A clock reading `offset` ahead of `inner`.
    pub fn new(inner: C, offset: Nanos) -> Self {
        OffsetClock {
            inner,
            offset: AtomicI64::new(offset.as_nanos()),
            adjustments: Mutex::new(Vec::new()),
        }
    }

    /// The current offset from the inner clock.
    pub fn offset(&self) -> Nanos {
        Nanos::from_nanos(self.offset.load(Ordering::SeqCst))
    }

    /// The corrections asked of this clock so far, oldest first.
    pub fn adjustments(&self) -> Vec<Adjustment> {
        lock(&self.adjustments).clone()
    }

    fn adjust(&self, adjustment: Adjustment, by: Nanos) {
        lock(&self.adjustments).push(adjustment);
        self.offset.fetch_add(by.as_nanos(), Ordering::SeqCst);
    }
}

impl<C: Clock> Clock for OffsetClock<C> {
    fn now(&self) -> Timestamp {
        self.inner.now().saturating_add(self.offset())
    }
    fn at_system_time(&self, system: Timestamp) -> Timestamp {
        self.inner
            .at_system_time(system)
            .saturating_add(self.offset())
    }
    fn step(&self, by: Nanos) -> Result<(), ClockError> {
        self.adjust(Adjustment::Step(by), by);
        Ok(())
    }
    fn slew(&self, by: Nanos) -> Result<(), ClockError> {
        self.adjust(Adjustment::Slew(by), by);
        Ok(())
    }
}

/// Locks a mutex, taking the data even if a panicking test poisoned it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_reads_the_present() {
        let before = SystemTime::now();
        let t = SystemClock.now();
        let after = SystemTime::now();
        assert!(Timestamp::from_system_time(before).unwrap() <= t);
        assert!(t <= Timestamp::from_system_time(after).unwrap());
        // Sanity: after 2020 and before 2100.
        assert!(t.as_nanos() > 1_577_836_800_000_000_000);
        assert!(t.as_nanos() < 4_102_444_800_000_000_000);
    }

    #[test]
    fn skewed_clock_adds_its_offset() {
        let base = ManualClock::new(Timestamp::from_nanos(1_000));
        let skewed = SkewedClock::new(&base, Nanos::from_nanos(-250));
        assert_eq!(skewed.now(), Timestamp::from_nanos(750));
        base.advance(Nanos::from_nanos(10));
        assert_eq!(skewed.now(), Timestamp::from_nanos(760));
        assert!(matches!(
            skewed.step(Nanos::from_nanos(1)),
            Err(ClockError::Unsupported { op: "step" })
        ));
    }

    #[test]
    fn offset_clock_moves_and_can_be_set() {
        let c = OffsetClock::new(SystemClock, Nanos::from_secs(-10));
        let reading = c.now();
        let lag = SystemClock.now().diff_i128(reading);
        assert!((10_000_000_000..10_100_000_000).contains(&lag), "{lag}");
        c.step(Nanos::from_secs(10)).unwrap();
        assert_eq!(c.offset(), Nanos::ZERO);
        assert_eq!(
            c.adjustments(),
            vec![Adjustment::Step(Nanos::from_secs(10))]
        );
    }

    #[test]
    fn manual_clock_records_corrections() {
        let c = ManualClock::new(Timestamp::EPOCH);
        c.step(Nanos::from_millis(250)).unwrap();
        c.slew(Nanos::from_micros(-3)).unwrap();
        assert_eq!(c.now(), Timestamp::from_nanos(250_000_000 - 3_000));
        assert_eq!(
            c.adjustments(),
            vec![
                Adjustment::Step(Nanos::from_millis(250)),
                Adjustment::Slew(Nanos::from_micros(-3))
            ]
        );
    }
}
