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
//! - [`SimulatedClock`] follows another clock at a rate off by a chosen
//!   drift, and takes steps, slews (spread out at 500 ppm, as the kernel
//!   does) and frequency corrections: the clock the discipline tests drive.
//! - [`MonotonicClock`] is `CLOCK_MONOTONIC_RAW` placed on the calendar:
//!   it never jumps and no one else's corrections reach it, which is what
//!   [`crate::synced::SyncedClock`] measures elapsed time with.

use crate::time::{Nanos, Timestamp};
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

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

    /// Corrects the clock by `by` gradually, without a jump, replacing
    /// any gradual correction still under way (as `adjtime` does); returns
    /// the part of that earlier correction that was not yet applied.
    fn slew(&self, by: Nanos) -> Result<Nanos, ClockError> {
        let _ = by;
        Err(ClockError::Unsupported { op: "slew" })
    }

    /// Sets the clock's frequency correction: positive makes it run faster,
    /// in parts per billion of its natural rate.
    fn set_frequency(&self, ppb: i64) -> Result<(), ClockError> {
        let _ = ppb;
        Err(ClockError::Unsupported {
            op: "adjust the frequency of",
        })
    }

    /// The frequency correction in force, ppb (zero for clocks that have
    /// none). Reading it needs no privilege.
    fn frequency(&self) -> Result<i64, ClockError> {
        Ok(0)
    }
}

/// What the kernel says about the system clock (`adjtimex`, read only):
/// whether a time daemon keeps it synchronised, a pending leap second,
/// and the kernel's bound on its error. A server reports these to its
/// clients, so it must not claim more than the kernel does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelClock {
    /// Synchronised: `STA_UNSYNC` clear and the state not `TIME_ERROR`
    /// (chrony, ntpd and fient clear the flag while they discipline the
    /// clock; it is set at boot and after `maxerror` reaches 16 s).
    pub synchronized: bool,
    /// A leap second is announced for the end of the day (`STA_INS` or
    /// `STA_DEL`).
    pub leap: crate::ntp::Leap,
    /// The kernel's maximum error (`maxerror`): set by the daemon, then
    /// grown by the kernel at 500 ppm until set again.
    pub max_error: Nanos,
    /// The kernel's estimated error (`esterror`).
    pub est_error: Nanos,
}

/// Reads the kernel's view of the system clock. Needs no privilege.
pub fn kernel_clock() -> Result<KernelClock, ClockError> {
    sys::kernel_clock()
}

/// The fastest a slew corrects: 500 ppm, the kernel's rate for `adjtime`.
pub const SLEW_RATE_PPB: i64 = 500_000;
/// The largest frequency correction the kernel takes: ±500 ppm.
pub const MAX_FREQUENCY_PPB: i64 = 500_000;

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

/// A shared or borrowed clock is that clock.
macro_rules! forward_clock {
    ($($ty:ty),*) => {$(
        impl<C: Clock + ?Sized> Clock for $ty {
            fn now(&self) -> Timestamp {
                (**self).now()
            }
            fn at_system_time(&self, system: Timestamp) -> Timestamp {
                (**self).at_system_time(system)
            }
            fn step(&self, by: Nanos) -> Result<(), ClockError> {
                (**self).step(by)
            }
            fn slew(&self, by: Nanos) -> Result<Nanos, ClockError> {
                (**self).slew(by)
            }
            fn set_frequency(&self, ppb: i64) -> Result<(), ClockError> {
                (**self).set_frequency(ppb)
            }
            fn frequency(&self) -> Result<i64, ClockError> {
                (**self).frequency()
            }
        }
    )*};
}

forward_clock!(std::sync::Arc<C>, &C);

/// The machine's real-time clock (`CLOCK_REALTIME`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        sys::realtime_now()
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

    /// Slews `CLOCK_REALTIME` with `adjtimex(ADJ_OFFSET_SINGLESHOT)`, the
    /// call behind `adjtime`: at most ±0.5 s, applied at 500 ppm, replacing
    /// what was under way.
    fn slew(&self, by: Nanos) -> Result<Nanos, ClockError> {
        sys::slew_realtime(by)
    }

    /// Sets the kernel's frequency correction (`adjtimex(ADJ_FREQUENCY)`),
    /// within ±500 ppm.
    fn set_frequency(&self, ppb: i64) -> Result<(), ClockError> {
        sys::set_frequency(ppb)
    }

    /// The kernel's frequency correction now (`adjtimex` reading only).
    fn frequency(&self) -> Result<i64, ClockError> {
        sys::frequency()
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use super::{ClockError, MAX_FREQUENCY_PPB};
    use crate::time::{Nanos, Timestamp};

    /// `CLOCK_REALTIME` read straight from the vDSO: the server reads it
    /// for every batch and every request, and `SystemTime`'s way (a
    /// duration since the epoch, then a 128-bit count) costs more than the
    /// reading. Out of range only after the year 2262.
    pub fn realtime_now() -> Timestamp {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for the call to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
        let nanos = ts
            .tv_sec
            .checked_mul(1_000_000_000)
            .and_then(|n| n.checked_add(ts.tv_nsec));
        Timestamp::from_nanos(nanos.unwrap_or(if ts.tv_sec < 0 { i64::MIN } else { i64::MAX }))
    }

    fn adjtimex(op: &'static str, tx: &mut libc::timex) -> Result<(), ClockError> {
        // SAFETY: `tx` is a valid, initialised timex that outlives the call.
        let rc = unsafe { libc::adjtimex(tx) };
        if rc == -1 {
            let err = std::io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => ClockError::PermissionDenied { op },
                _ => ClockError::Os { op, source: err },
            });
        }
        Ok(())
    }

    pub fn slew_realtime(by: Nanos) -> Result<Nanos, ClockError> {
        // Microseconds, within the half second adjtime is made for.
        let micros = (by.as_nanos() / 1_000).clamp(-500_000, 500_000);
        // SAFETY: `timex` is plain data; zeroed is a valid value.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        tx.modes = libc::ADJ_OFFSET_SINGLESHOT;
        tx.offset = micros as libc::c_long;
        adjtimex("slew", &mut tx)?;
        // The kernel hands back what was left of the previous adjustment.
        Ok(Nanos::from_micros(tx.offset as i64))
    }

    pub fn set_frequency(ppb: i64) -> Result<(), ClockError> {
        let ppb = ppb.clamp(-MAX_FREQUENCY_PPB, MAX_FREQUENCY_PPB);
        // SAFETY: `timex` is plain data; zeroed is a valid value.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        tx.modes = libc::ADJ_FREQUENCY;
        // The kernel takes ppm with a 16-bit binary fraction.
        tx.freq = (ppb * 65_536 / 1_000) as libc::c_long;
        adjtimex("adjust the frequency of", &mut tx)
    }

    pub fn frequency() -> Result<i64, ClockError> {
        // SAFETY: `timex` is plain data; zeroed is a valid value.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        // modes = 0: read only, no privilege needed.
        adjtimex("read the frequency of", &mut tx)?;
        Ok(tx.freq as i64 * 1_000 / 65_536)
    }

    pub fn kernel_clock() -> Result<super::KernelClock, ClockError> {
        use crate::ntp::Leap;
        // SAFETY: `timex` is plain data; zeroed is a valid value.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        // SAFETY: `tx` is a valid, initialised timex; modes = 0 only reads.
        let state = unsafe { libc::adjtimex(&mut tx) };
        if state == -1 {
            return Err(ClockError::Os {
                op: "read the state of",
                source: std::io::Error::last_os_error(),
            });
        }
        let leap = if tx.status & libc::STA_INS != 0 {
            Leap::AddSecond
        } else if tx.status & libc::STA_DEL != 0 {
            Leap::DeleteSecond
        } else {
            Leap::None
        };
        Ok(super::KernelClock {
            synchronized: state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0,
            leap,
            max_error: Nanos::from_micros(tx.maxerror as i64),
            est_error: Nanos::from_micros(tx.esterror as i64),
        })
    }

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
    use crate::time::{Nanos, Timestamp};

    pub fn realtime_now() -> Timestamp {
        Timestamp::from_system_time(std::time::SystemTime::now())
            .unwrap_or(Timestamp::from_nanos(i64::MAX))
    }

    pub fn kernel_clock() -> Result<super::KernelClock, ClockError> {
        Err(ClockError::Unsupported {
            op: "read the state of",
        })
    }
    pub fn step_realtime(_by: Nanos) -> Result<(), ClockError> {
        Err(ClockError::Unsupported { op: "step" })
    }
    pub fn slew_realtime(_by: Nanos) -> Result<Nanos, ClockError> {
        Err(ClockError::Unsupported { op: "slew" })
    }
    pub fn set_frequency(_ppb: i64) -> Result<(), ClockError> {
        Err(ClockError::Unsupported {
            op: "adjust the frequency of",
        })
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
    /// A frequency correction of this many parts per billion.
    Frequency(i64),
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
    fn slew(&self, by: Nanos) -> Result<Nanos, ClockError> {
        self.record(Adjustment::Slew(by));
        self.advance(by);
        Ok(Nanos::ZERO)
    }
    fn set_frequency(&self, ppb: i64) -> Result<(), ClockError> {
        self.record(Adjustment::Frequency(ppb));
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
    fn slew(&self, by: Nanos) -> Result<Nanos, ClockError> {
        self.adjust(Adjustment::Slew(by), by);
        Ok(Nanos::ZERO)
    }
    fn set_frequency(&self, ppb: i64) -> Result<(), ClockError> {
        lock(&self.adjustments).push(Adjustment::Frequency(ppb));
        Ok(())
    }
}

/// A clock that follows another (the reference) at a rate off by a natural
/// drift, and that steps, slews and frequency corrections act on the way
/// the kernel's do: a step at once, a slew spread out at
/// [`SLEW_RATE_PPB`] and replaced by the next, a frequency correction
/// from now on. For tests of clock discipline: the reference is the truth,
/// and [`SimulatedClock::error`] says how far this clock is from it.
#[derive(Debug)]
pub struct SimulatedClock<C> {
    reference: C,
    state: Mutex<Simulation>,
}

#[derive(Debug, Clone)]
struct Simulation {
    /// The reference's reading when the state below was last brought up
    /// to date.
    at: Timestamp,
    /// This clock's reading then.
    reads: Timestamp,
    /// How much faster than the reference the clock runs by nature, ppb.
    drift_ppb: i64,
    /// The frequency correction in force, ppb.
    frequency_ppb: i64,
    /// What is left of the slew under way.
    slewing: i64,
    adjustments: Vec<Adjustment>,
}

impl Simulation {
    /// The state `elapsed` nanoseconds of reference time later.
    fn advanced(&self, elapsed: i64) -> Simulation {
        let elapsed = elapsed.max(0);
        let rate = i128::from(self.drift_ppb + self.frequency_ppb);
        let drifted = i128::from(elapsed) * rate / 1_000_000_000;
        let slew_room = i128::from(elapsed) * i128::from(SLEW_RATE_PPB) / 1_000_000_000;
        let slewed = i128::from(self.slewing).clamp(-slew_room, slew_room);
        let mut next = self.clone();
        next.at = self.at.saturating_add(Nanos::from_nanos(elapsed));
        next.reads = self.reads.saturating_add(Nanos::from_nanos(
            (i128::from(elapsed) + drifted + slewed) as i64,
        ));
        next.slewing = self.slewing - slewed as i64;
        next
    }
}

impl<C: Clock> SimulatedClock<C> {
    /// A clock reading `offset` ahead of `reference` and running
    /// `drift_ppb` parts per billion fast (slow, if negative).
    pub fn new(reference: C, offset: Nanos, drift_ppb: i64) -> Self {
        let at = reference.now();
        SimulatedClock {
            state: Mutex::new(Simulation {
                at,
                reads: at.saturating_add(offset),
                drift_ppb,
                frequency_ppb: 0,
                slewing: 0,
                adjustments: Vec::new(),
            }),
            reference,
        }
    }

    /// The state as of the reference's reading now, saved.
    fn current(&self) -> std::sync::MutexGuard<'_, Simulation> {
        let now = self.reference.now();
        let mut state = lock(&self.state);
        let elapsed = now.diff_i128(state.at).clamp(0, i128::from(i64::MAX)) as i64;
        *state = state.advanced(elapsed);
        state
    }

    /// This clock minus the reference, now: the error a discipline should
    /// drive to zero.
    pub fn error(&self) -> Nanos {
        let state = self.current();
        Nanos::from_nanos(state.reads.diff_i128(state.at) as i64)
    }

    /// How fast this clock runs against the reference now, with the
    /// correction in force, in ppb.
    pub fn rate_error_ppb(&self) -> i64 {
        let state = self.current();
        state.drift_ppb + state.frequency_ppb
    }

    /// The frequency correction in force, ppb.
    pub fn frequency_ppb(&self) -> i64 {
        self.current().frequency_ppb
    }

    /// Changes how fast the clock runs by nature, from now on (the time
    /// already run keeps the old rate): a crystal's wander, played out by
    /// calling this every so often. The frequency correction is untouched.
    pub fn set_drift_ppb(&self, drift_ppb: i64) {
        self.current().drift_ppb = drift_ppb;
    }

    /// This clock minus the reference at the moment this clock read
    /// `reading`: the error now, carried back (or forward) over the
    /// elapsed reading at the rate in force. Exact to the nanosecond while
    /// that rate has held since `reading` and no slew is under way; a
    /// watch that only reports uses it to know the truth at each answer's
    /// reference instant, however late the answer is printed.
    pub fn error_at(&self, reading: Timestamp) -> Nanos {
        let state = self.current();
        let rate = i128::from(state.drift_ppb + state.frequency_ppb);
        let since = state.reads.diff_i128(reading);
        // `since` of this clock is since·1e9/(1e9 + rate) of the
        // reference: the error grew by the difference.
        let grown = since * rate / (1_000_000_000 + rate);
        let error_now = state.reads.diff_i128(state.at);
        Nanos::try_from_i128(error_now - grown).unwrap_or(Nanos::MAX)
    }

    /// Every correction asked of this clock, oldest first.
    pub fn adjustments(&self) -> Vec<Adjustment> {
        self.current().adjustments.clone()
    }

    /// Whether anything ever stepped this clock.
    pub fn was_stepped(&self) -> bool {
        self.current()
            .adjustments
            .iter()
            .any(|a| matches!(a, Adjustment::Step(_)))
    }
}

impl<C: Clock> Clock for SimulatedClock<C> {
    fn now(&self) -> Timestamp {
        self.current().reads
    }
    fn step(&self, by: Nanos) -> Result<(), ClockError> {
        let mut state = self.current();
        state.reads = state.reads.saturating_add(by);
        state.adjustments.push(Adjustment::Step(by));
        Ok(())
    }
    /// As the kernel's `adjtime`: whole microseconds, at most ±0.5 s.
    fn slew(&self, by: Nanos) -> Result<Nanos, ClockError> {
        let mut state = self.current();
        let left = Nanos::from_nanos(state.slewing);
        let micros = (by.as_nanos() / 1_000).clamp(-500_000, 500_000);
        state.slewing = micros * 1_000;
        state.adjustments.push(Adjustment::Slew(by));
        Ok(left)
    }
    fn frequency(&self) -> Result<i64, ClockError> {
        Ok(self.current().frequency_ppb)
    }
    fn set_frequency(&self, ppb: i64) -> Result<(), ClockError> {
        let mut state = self.current();
        state.frequency_ppb = ppb.clamp(-MAX_FREQUENCY_PPB, MAX_FREQUENCY_PPB);
        state.adjustments.push(Adjustment::Frequency(ppb));
        Ok(())
    }
}

/// `CLOCK_MONOTONIC_RAW`, placed on the calendar where the system clock
/// was when this value was made. It never jumps, and neither steps, slews
/// nor frequency corrections of the system clock reach it: its only error
/// is the hardware's own drift. It cannot be set.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    /// Calendar time minus raw monotonic time, at creation.
    base: i128,
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl MonotonicClock {
    /// Reads both clocks once to place the monotonic one on the calendar.
    pub fn new() -> Self {
        let raw = Self::raw();
        let real = SystemClock.now().as_nanos() as i128;
        MonotonicClock { base: real - raw }
    }

    fn raw() -> i128 {
        // SAFETY: a zeroed timespec is valid, and clock_gettime only writes
        // into it.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: valid clock id and pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_nanos((self.base + Self::raw()).clamp(0, i128::from(i64::MAX)) as i64)
    }
}

/// Locks a mutex, taking the data even if a panicking test poisoned it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

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
    fn simulated_clock_drifts_steps_and_slews() {
        let truth = std::sync::Arc::new(ManualClock::new(Timestamp::from_nanos(1_000_000_000_000)));
        let sim = SimulatedClock::new(truth.clone(), Nanos::from_millis(2), 100_000); // +100 ppm
        assert_eq!(sim.error(), Nanos::from_millis(2));
        truth.advance(Nanos::from_secs(10)); // 100 ppm over 10 s: +1 ms
        assert_eq!(sim.error(), Nanos::from_millis(3));
        sim.step(Nanos::from_millis(-3)).unwrap();
        assert_eq!(sim.error(), Nanos::ZERO);
        // Cancel the drift, then slew 1 ms: 500 ppm takes 2 s.
        sim.set_frequency(-100_000).unwrap();
        assert_eq!(sim.slew(Nanos::from_millis(1)).unwrap(), Nanos::ZERO);
        truth.advance(Nanos::from_secs(1));
        assert_eq!(sim.error(), Nanos::from_micros(500));
        // A new slew replaces the rest of the old one, and says what was left.
        assert_eq!(
            sim.slew(Nanos::from_micros(-200)).unwrap(),
            Nanos::from_micros(500)
        );
        truth.advance(Nanos::from_secs(10));
        assert_eq!(sim.error(), Nanos::from_micros(300));
        assert_eq!(sim.rate_error_ppb(), 0);
        assert_eq!(
            sim.adjustments(),
            vec![
                Adjustment::Step(Nanos::from_millis(-3)),
                Adjustment::Frequency(-100_000),
                Adjustment::Slew(Nanos::from_millis(1)),
                Adjustment::Slew(Nanos::from_micros(-200)),
            ]
        );
    }

    #[test]
    fn simulated_drift_changes_from_now_on_and_errors_carry_back() {
        let truth = std::sync::Arc::new(ManualClock::new(Timestamp::from_nanos(1_000_000_000_000)));
        let sim = SimulatedClock::new(truth.clone(), Nanos::from_millis(2), 100_000); // +100 ppm
        truth.advance(Nanos::from_secs(10));
        let reading = sim.now();
        assert_eq!(sim.error(), Nanos::from_millis(3));
        truth.advance(Nanos::from_secs(10));
        assert_eq!(sim.error(), Nanos::from_millis(4));
        // 10.001 s of this clock's time back at 100 ppm: 1 ms less error.
        assert_eq!(sim.error_at(reading), Nanos::from_millis(3));
        // The time run keeps its rate; the new one holds from now.
        sim.set_drift_ppb(-100_000);
        assert_eq!(sim.error(), Nanos::from_millis(4));
        let reading = sim.now();
        truth.advance(Nanos::from_secs(10));
        assert_eq!(sim.error(), Nanos::from_millis(3));
        assert_eq!(sim.error_at(reading), Nanos::from_millis(4));
        assert_eq!(sim.rate_error_ppb(), -100_000);
        // A reading still to come carries forward the same way.
        let later = sim.now().saturating_add(Nanos::from_nanos(9_999_000_000));
        assert_eq!(sim.error_at(later), Nanos::from_millis(2));
    }

    #[test]
    fn the_system_frequency_can_be_read_by_anyone() {
        let ppb = SystemClock.frequency().expect("reading needs no privilege");
        assert!(ppb.abs() <= MAX_FREQUENCY_PPB, "{ppb}");
    }

    #[test]
    fn monotonic_clock_sits_on_the_calendar_and_moves() {
        let mono = MonotonicClock::new();
        let a = mono.now();
        let gap = SystemClock.now().diff_i128(a).abs();
        assert!(gap < 50_000_000, "{gap} ns from the system clock");
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(mono.now().diff_i128(a) >= 2_000_000);
        assert!(matches!(
            mono.step(Nanos::ZERO),
            Err(ClockError::Unsupported { .. })
        ));
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
