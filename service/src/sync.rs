//! The clock math: pure functions over timestamps, no I/O.
//!
//! One exchange gives four readings (see `DESIGN.md`):
//!
//! ```text
//!   client  ts1 ──request──▶ ts2  server
//!   client  ts4 ◀──reply──── ts3  server
//! ```
//!
//! If the server's clock is ahead of the client's by θ and the messages take
//! `d_out` and `d_back`, then `ts2 = ts1 + θ + d_out` and
//! `ts4 = ts3 - θ + d_back`. Since neither delay is negative (nor below a
//! known minimum transfer time `min`), every exchange confines θ to
//!
//! ```text
//!   ts3 - ts4 + min  ≤  θ  ≤  ts2 - ts1 - min
//! ```
//!
//! an interval whose midpoint is the classic offset
//! `((ts2 - ts1) + (ts3 - ts4)) / 2` and whose half-width is
//! `rtt/2 - min`, with `rtt = (ts4 - ts1) - (ts3 - ts2)`: Cristian's bound.
//! The bounds reported here are computed from those exact endpoints, so they
//! hold whatever the asymmetry, and they are widened by the largest drift the
//! two clocks may have between the exchange and the moment the answer refers
//! to. All arithmetic is integer nanoseconds, in `i128` where sums could
//! overflow an `i64`.

use crate::time::{Nanos, OutOfRange, Timestamp};
use std::fmt;
use std::str::FromStr;

/// One probe exchange: the four timestamps, checked for consistency, and
/// how far the server's clock may be from its own reference (its root
/// distance; zero for a server that is the reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    ts1: Timestamp,
    ts2: Timestamp,
    ts3: Timestamp,
    ts4: Timestamp,
    root_distance: Nanos,
}

/// Why four timestamps do not make a usable sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    /// The client's clock read earlier at receipt than at sending.
    #[error("reply stamped before its request was sent (ts4 < ts1)")]
    ClientClockWentBack,
    /// The server claims to have sent before it received.
    #[error("server sent before it received (ts3 < ts2)")]
    ServerClockWentBack,
    /// The server claims more processing time than the whole round trip.
    #[error("server processing longer than the round trip (negative rtt)")]
    NegativeRoundTrip,
    /// A difference is too large for the arithmetic.
    #[error("timestamps too far apart")]
    OutOfRange,
}

impl From<OutOfRange> for SampleError {
    fn from(_: OutOfRange) -> Self {
        SampleError::OutOfRange
    }
}

impl Sample {
    /// Checks and builds a sample from one exchange's four timestamps.
    pub fn new(
        ts1: Timestamp,
        ts2: Timestamp,
        ts3: Timestamp,
        ts4: Timestamp,
    ) -> Result<Sample, SampleError> {
        if ts4 < ts1 {
            return Err(SampleError::ClientClockWentBack);
        }
        if ts3 < ts2 {
            return Err(SampleError::ServerClockWentBack);
        }
        let rtt = ts4.diff_i128(ts1) - ts3.diff_i128(ts2);
        if rtt < 0 {
            return Err(SampleError::NegativeRoundTrip);
        }
        // Every derived figure must fit an i64 of nanoseconds.
        Nanos::try_from_i128(rtt)?;
        Nanos::try_from_i128(ts2.diff_i128(ts1))?;
        Nanos::try_from_i128(ts3.diff_i128(ts4))?;
        Ok(Sample {
            ts1,
            ts2,
            ts3,
            ts4,
            root_distance: Nanos::ZERO,
        })
    }

    /// The same exchange with a server whose clock may be `root_distance`
    /// from its reference (an NTP server's root delay / 2 + root
    /// dispersion): its interval widens by that much on each side, so
    /// every bound made from it holds for the reference, not just for the
    /// server. Negative values count as zero.
    pub fn with_root_distance(self, root_distance: Nanos) -> Sample {
        Sample {
            root_distance: root_distance.max(Nanos::ZERO),
            ..self
        }
    }

    /// The server's root distance (zero unless set).
    pub fn root_distance(&self) -> Nanos {
        self.root_distance
    }

    /// The offsets this exchange allows, `[ts3 − ts4 + min, ts2 − ts1 −
    /// min]` widened by the root distance, exact; empty (`lo > hi`) when
    /// the round trip was shorter than twice `min_transfer`.
    pub fn interval(&self, min_transfer: Nanos) -> (i128, i128) {
        let i = self.raw_interval(min_transfer);
        (i.lo, i.hi)
    }

    /// Client clock when the request left.
    pub fn ts1(&self) -> Timestamp {
        self.ts1
    }
    /// Server clock when the request arrived.
    pub fn ts2(&self) -> Timestamp {
        self.ts2
    }
    /// Server clock when the reply left.
    pub fn ts3(&self) -> Timestamp {
        self.ts3
    }
    /// Client clock when the reply arrived.
    pub fn ts4(&self) -> Timestamp {
        self.ts4
    }

    /// Round trip on the wire: `(ts4 - ts1) - (ts3 - ts2)`, server time removed.
    pub fn rtt(&self) -> Nanos {
        Nanos::from_nanos(self.rtt_i128() as i64)
    }

    fn rtt_i128(&self) -> i128 {
        self.ts4.diff_i128(self.ts1) - self.ts3.diff_i128(self.ts2)
    }

    /// Time the server spent between receipt and reply: `ts3 - ts2`.
    pub fn server_time(&self) -> Nanos {
        Nanos::try_from_i128(self.ts3.diff_i128(self.ts2)).unwrap_or(Nanos::MAX)
    }

    /// One-way delay, `rtt / 2` (rounded toward zero): the seeds' figure.
    pub fn delay(&self) -> Nanos {
        Nanos::from_nanos((self.rtt_i128() / 2) as i64)
    }

    /// Offset of the server's clock from the client's:
    /// `((ts2 - ts1) + (ts3 - ts4)) / 2`, rounded to nearest.
    pub fn offset(&self) -> Nanos {
        let sum = self.ts2.diff_i128(self.ts1) + self.ts3.diff_i128(self.ts4);
        Nanos::from_nanos(div_round(sum, 2) as i64)
    }

    /// The offsets this exchange allows, given the minimum one-way transfer
    /// time, before any drift widening. Empty (`lo > hi`) when the round
    /// trip was shorter than twice `min_transfer`.
    fn raw_interval(&self, min_transfer: Nanos) -> Interval {
        let min = i128::from(min_transfer.as_nanos());
        Interval {
            lo: self.ts3.diff_i128(self.ts4) + min,
            hi: self.ts2.diff_i128(self.ts1) - min,
        }
        .widen(i128::from(self.root_distance.as_nanos()))
    }
}

/// The `now()` exchange: the client's clock around the call, and the server
/// time it returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NowExchange {
    /// Client clock just before the call.
    pub sent: Timestamp,
    /// The server's answer.
    pub server_time: Timestamp,
    /// Client clock when the answer arrived.
    pub received: Timestamp,
    /// The server's root distance (see [`Sample::with_root_distance`]).
    pub root_distance: Nanos,
}

impl NowExchange {
    /// Checks the exchange for consistency.
    pub fn new(
        sent: Timestamp,
        server_time: Timestamp,
        received: Timestamp,
    ) -> Result<NowExchange, SampleError> {
        if received < sent {
            return Err(SampleError::ClientClockWentBack);
        }
        Nanos::try_from_i128(server_time.diff_i128(sent))?;
        Nanos::try_from_i128(server_time.diff_i128(received))?;
        Ok(NowExchange {
            sent,
            server_time,
            received,
            root_distance: Nanos::ZERO,
        })
    }

    /// The whole round trip of the call, server time included.
    pub fn rtt(&self) -> Nanos {
        Nanos::try_from_i128(self.received.diff_i128(self.sent)).unwrap_or(Nanos::MAX)
    }

    /// The server read its clock at some client time between `sent` and
    /// `received`, so the offset lies between `server_time - received` and
    /// `server_time - sent` (narrowed by the minimum transfer time each way).
    fn raw_interval(&self, min_transfer: Nanos) -> Interval {
        let min = i128::from(min_transfer.as_nanos());
        Interval {
            lo: self.server_time.diff_i128(self.received) + min,
            hi: self.server_time.diff_i128(self.sent) - min,
        }
        .widen(i128::from(self.root_distance.max(Nanos::ZERO).as_nanos()))
    }
}

/// What the estimate may assume about the path and the clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncParams {
    /// The least time a message can take one way. Zero (the default) assumes
    /// nothing; a larger value tightens the bound but makes it dishonest if
    /// the path is ever faster.
    pub min_transfer: Nanos,
    /// The largest rate difference between the two clocks, in parts per
    /// million. Each exchange's interval is widened by this rate times its
    /// age, so that combining exchanges taken at different moments stays
    /// honest. 100 ppm covers two ordinary crystal clocks at ±50 ppm.
    pub max_drift_ppm: u32,
}

impl Default for SyncParams {
    fn default() -> Self {
        SyncParams {
            min_transfer: Nanos::ZERO,
            max_drift_ppm: 100,
        }
    }
}

/// How the samples become one offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Estimator {
    /// The seeds' flow: the server's `now()` plus the mean one-way delay of
    /// the probes. Its bound comes from the `now()` call's round trip.
    MeanDelay,
    /// The offset of the sample with the smallest round trip, whose
    /// interval is the narrowest (NTP's clock filter, Cristian's minimum
    /// transfer time).
    MinRtt,
    /// The midpoint of the intersection of every exchange's interval: each
    /// exchange confines the offset to an interval, so all of them together
    /// confine it to their intersection, and its midpoint is the estimate
    /// whose worst-case error (and so whose bound) is least.
    Intersection,
    /// Halfway between the intersection's midpoint and the median of the
    /// samples' offsets (brought inside the intersection). The midpoint rests on
    /// the two quietest one-way trips only; the median on every sample, but
    /// not on any one outlier. Blending them errs less than either under
    /// jitter, and the bound (to the intersection's far edge) stays honest.
    /// The default, chosen by measurement: see `examples/estimators.rs` and
    /// the README's accuracy section.
    MidMedian,
}

impl Estimator {
    /// Every estimator, in the order reports list them.
    pub const ALL: [Estimator; 4] = [
        Estimator::MidMedian,
        Estimator::Intersection,
        Estimator::MinRtt,
        Estimator::MeanDelay,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Estimator::MeanDelay => "mean-delay",
            Estimator::MinRtt => "min-rtt",
            Estimator::Intersection => "intersection",
            Estimator::MidMedian => "mid-median",
        }
    }
}

impl fmt::Display for Estimator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Estimator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Estimator::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Estimator::ALL.iter().map(|e| e.name()).collect();
                format!(
                    "unknown estimator '{s}': expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// An offset with an honest bound: the true offset lies in `[low, high]`,
/// and `offset ± bound` covers that interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// Which estimator produced it.
    pub estimator: Estimator,
    /// Best guess of server minus client.
    pub offset: Nanos,
    /// Least offset consistent with the exchanges.
    pub low: Nanos,
    /// Greatest offset consistent with the exchanges.
    pub high: Nanos,
    /// The local time the offset refers to (drift widening is measured to it).
    pub reference: Timestamp,
}

impl Estimate {
    /// The error bound: the farthest the truth can be from `offset`.
    pub fn bound(&self) -> Nanos {
        let below = self.offset.as_nanos().abs_diff(self.low.as_nanos());
        let above = self.offset.as_nanos().abs_diff(self.high.as_nanos());
        Nanos::from_nanos(i64::try_from(below.max(above)).unwrap_or(i64::MAX))
    }

    /// Whether `offset` lies within the bound of this estimate.
    pub fn contains(&self, offset: Nanos) -> bool {
        self.low <= offset && offset <= self.high
    }
}

/// Why no estimate could be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EstimateError {
    /// Nothing was measured.
    #[error("no samples")]
    NoSamples,
    /// `mean-delay` needs the `now()` exchange, which was lost.
    #[error("the now() call got no answer, so the mean-delay estimate is unavailable")]
    NoNowExchange,
    /// The exchanges contradict each other: no single offset satisfies them
    /// all (a clock stepped mid-sync, the minimum transfer time is set too
    /// high, or the server is not telling the truth).
    #[error("the exchanges contradict each other (no offset fits them all)")]
    Inconsistent,
    /// A result did not fit the arithmetic.
    #[error("offset out of range")]
    OutOfRange,
}

/// A closed interval of offsets in exact nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Interval {
    lo: i128,
    hi: i128,
}

impl Interval {
    fn widen(self, by: i128) -> Interval {
        Interval {
            lo: self.lo - by,
            hi: self.hi + by,
        }
    }
    fn intersect(self, other: Interval) -> Interval {
        Interval {
            lo: self.lo.max(other.lo),
            hi: self.hi.min(other.hi),
        }
    }
    fn is_empty(self) -> bool {
        self.lo > self.hi
    }
    fn midpoint(self) -> i128 {
        div_round(self.lo + self.hi, 2)
    }
}

/// Division rounding half away from zero (exact for even sums).
pub(crate) fn div_round(n: i128, d: i128) -> i128 {
    let q = n / d;
    let r = n % d;
    if 2 * r.abs() >= d.abs() {
        q + n.signum() * d.signum()
    } else {
        q
    }
}

/// `ceil(age * ppm / 1e6)`: the most two clocks drifting apart at `ppm`
/// can separate in `age`.
pub(crate) fn drift_allowance(age: i128, ppm: u32) -> i128 {
    let num = age.max(0) * i128::from(ppm);
    (num + 999_999) / 1_000_000
}

/// Mean one-way delay over the samples: `Σ rtt / (2n)`, rounded.
pub fn mean_delay(samples: &[Sample]) -> Option<Nanos> {
    if samples.is_empty() {
        return None;
    }
    let sum: i128 = samples.iter().map(Sample::rtt_i128).sum();
    Some(Nanos::from_nanos(
        div_round(sum, 2 * samples.len() as i128) as i64
    ))
}

/// The sample with the smallest round trip (the latest, on ties: it has
/// drifted least).
pub fn min_rtt_sample(samples: &[Sample]) -> Option<(usize, &Sample)> {
    samples
        .iter()
        .enumerate()
        .min_by_key(|(i, s)| (s.rtt_i128(), std::cmp::Reverse(*i)))
}

/// Twice the median of the samples' offsets (the mean of the two middle ones
/// for an even count), exact.
fn twice_median_offset(samples: &[Sample]) -> Option<i128> {
    let mut twice: Vec<i128> = samples
        .iter()
        .map(|s| s.ts2.diff_i128(s.ts1) + s.ts3.diff_i128(s.ts4))
        .collect();
    twice.sort_unstable();
    let n = twice.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(twice[n / 2]),
        _ => Some(div_round(twice[n / 2 - 1] + twice[n / 2], 2)),
    }
}

/// Computes the offset estimate from the probes and the `now()` exchange.
pub fn estimate(
    samples: &[Sample],
    now: Option<&NowExchange>,
    estimator: Estimator,
    params: &SyncParams,
) -> Result<Estimate, EstimateError> {
    // The instant the answer refers to: the latest client reading.
    let reference = samples
        .iter()
        .map(|s| s.ts4)
        .chain(now.map(|n| n.received))
        .max()
        .ok_or(EstimateError::NoSamples)?;
    let ppm = params.max_drift_ppm;
    let sample_interval = |s: &Sample| {
        s.raw_interval(params.min_transfer)
            .widen(drift_allowance(reference.diff_i128(s.ts1), ppm))
    };
    let now_interval = now.map(|n| {
        n.raw_interval(params.min_transfer)
            .widen(drift_allowance(reference.diff_i128(n.sent), ppm))
    });

    let (offset, interval) = match estimator {
        Estimator::MeanDelay => {
            let n = now.ok_or(EstimateError::NoNowExchange)?;
            let interval = now_interval.ok_or(EstimateError::NoNowExchange)?;
            let delay = mean_delay(samples).ok_or(EstimateError::NoSamples)?;
            // Client time := server time + delay, at the moment the answer
            // arrived; the offset is what that moves the clock by.
            let offset = n.server_time.diff_i128(n.received) + i128::from(delay.as_nanos());
            (offset, interval)
        }
        Estimator::MinRtt => {
            let (_, best) = min_rtt_sample(samples).ok_or(EstimateError::NoSamples)?;
            let interval = sample_interval(best);
            (interval.midpoint(), interval)
        }
        Estimator::Intersection | Estimator::MidMedian => {
            let all = samples.iter().map(sample_interval).chain(now_interval);
            let intersection = all
                .reduce(Interval::intersect)
                .ok_or(EstimateError::NoSamples)?;
            if intersection.is_empty() {
                return Err(EstimateError::Inconsistent);
            }
            let midpoint = intersection.midpoint();
            let offset = match (estimator, twice_median_offset(samples)) {
                (Estimator::MidMedian, Some(twice_median)) => {
                    // A median outside the intersection is known to be
                    // wrong: bring it to the nearest edge first, then go
                    // halfway toward the midpoint (which stays inside).
                    let twice_lo = 2 * intersection.lo;
                    let twice_hi = 2 * intersection.hi;
                    let twice_median = twice_median.clamp(twice_lo, twice_hi);
                    div_round(2 * midpoint + twice_median, 4)
                }
                _ => midpoint,
            };
            (offset, intersection)
        }
    };
    if interval.is_empty() {
        return Err(EstimateError::Inconsistent);
    }
    let to_nanos = |v: i128| Nanos::try_from_i128(v).map_err(|_| EstimateError::OutOfRange);
    Ok(Estimate {
        estimator,
        offset: to_nanos(offset)?,
        low: to_nanos(interval.lo)?,
        high: to_nanos(interval.hi)?,
        reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: i64 = 1_790_000_000_000_000_000;

    fn ts(n: i64) -> Timestamp {
        Timestamp::from_nanos(T0 + n)
    }

    /// An exchange on a path with the given delays against a server whose
    /// clock is `theta` ahead, starting at client time `start`.
    fn exchange(start: i64, theta: i64, d_out: i64, server: i64, d_back: i64) -> Sample {
        let ts1 = start;
        let ts2 = ts1 + theta + d_out;
        let ts3 = ts2 + server;
        let ts4 = ts3 - theta + d_back;
        Sample::new(ts(ts1), ts(ts2), ts(ts3), ts(ts4)).unwrap()
    }

    fn no_drift() -> SyncParams {
        SyncParams {
            min_transfer: Nanos::ZERO,
            max_drift_ppm: 0,
        }
    }

    #[test]
    fn zero_delay_gives_exact_offset_and_zero_bound() {
        let s = exchange(0, 1_000, 0, 0, 0);
        assert_eq!(s.rtt(), Nanos::ZERO);
        assert_eq!(s.delay(), Nanos::ZERO);
        assert_eq!(s.offset(), Nanos::from_nanos(1_000));
        let e = estimate(&[s], None, Estimator::MinRtt, &no_drift()).unwrap();
        assert_eq!(
            (e.offset, e.bound()),
            (Nanos::from_nanos(1_000), Nanos::ZERO)
        );
    }

    #[test]
    fn the_seeds_formulas() {
        // ts1=100, ts2=1150, ts3=1160, ts4=230 with θ=1000, out 50, back 70.
        let s = exchange(100, 1_000, 50, 10, 70);
        assert_eq!(
            (s.ts1(), s.ts2(), s.ts3(), s.ts4()),
            (ts(100), ts(1_150), ts(1_160), ts(230))
        );
        assert_eq!(s.rtt(), Nanos::from_nanos(120));
        assert_eq!(s.delay(), Nanos::from_nanos(60));
        assert_eq!(s.server_time(), Nanos::from_nanos(10));
        // ((1150-100) + (1160-230)) / 2 = (1050 + 930) / 2 = 990: off by half
        // the asymmetry (20/2).
        assert_eq!(s.offset(), Nanos::from_nanos(990));
    }

    #[test]
    fn negative_offset_a_client_ahead() {
        let s = exchange(0, -250_000_000, 40_000, 5_000, 40_000);
        assert_eq!(s.offset(), Nanos::from_millis(-250));
        assert_eq!(s.rtt(), Nanos::from_micros(80));
    }

    #[test]
    fn client_250ms_behind_measures_plus_250ms() {
        let s = exchange(0, 250_000_000, 30_000, 2_000, 30_000);
        let e = estimate(&[s], None, Estimator::MinRtt, &no_drift()).unwrap();
        assert_eq!(e.offset, Nanos::from_millis(250));
        assert_eq!(e.bound(), Nanos::from_micros(30));
    }

    #[test]
    fn server_processing_time_is_removed() {
        let quick = exchange(0, 777, 100, 0, 100);
        let slow = exchange(0, 777, 100, 20_000_000, 100);
        assert_eq!(quick.offset(), slow.offset());
        assert_eq!(quick.rtt(), slow.rtt());
    }

    #[test]
    fn odd_nanoseconds_keep_the_bound_honest() {
        // rtt = 3 ns: the interval [θ-2, θ+1] is not centred on an integer.
        let s = exchange(0, 10, 1, 0, 2);
        let e = estimate(&[s], None, Estimator::MinRtt, &no_drift()).unwrap();
        assert!(e.contains(Nanos::from_nanos(10)));
        assert!(e.bound() >= Nanos::from_nanos(1));
    }

    #[test]
    fn invalid_exchanges_are_rejected() {
        assert_eq!(
            Sample::new(ts(10), ts(0), ts(0), ts(9)),
            Err(SampleError::ClientClockWentBack)
        );
        assert_eq!(
            Sample::new(ts(0), ts(5), ts(4), ts(9)),
            Err(SampleError::ServerClockWentBack)
        );
        assert_eq!(
            Sample::new(ts(0), ts(0), ts(100), ts(10)),
            Err(SampleError::NegativeRoundTrip)
        );
        let far = Sample::new(
            Timestamp::from_nanos(i64::MIN),
            Timestamp::from_nanos(i64::MAX),
            Timestamp::from_nanos(i64::MAX),
            Timestamp::from_nanos(i64::MIN + 1),
        );
        assert_eq!(far, Err(SampleError::OutOfRange));
    }

    #[test]
    fn no_samples_is_an_error() {
        assert_eq!(
            estimate(&[], None, Estimator::MinRtt, &SyncParams::default()),
            Err(EstimateError::NoSamples)
        );
        assert_eq!(mean_delay(&[]), None);
    }

    #[test]
    fn mean_delay_is_the_seeds_figure() {
        let samples = [
            exchange(0, 0, 100, 7, 100),
            exchange(1_000, 0, 300, 7, 300),
            exchange(2_000, 0, 200, 7, 201),
        ];
        // rtts 200, 600, 401 → delays 100, 300, 200.5 → mean 1201/6 = 200.17.
        assert_eq!(mean_delay(&samples), Some(Nanos::from_nanos(200)));
    }

    #[test]
    fn mean_delay_estimator_is_server_time_plus_delay() {
        let theta = 5_000_000;
        let samples = [exchange(0, theta, 1_000, 0, 1_000); 3];
        // now(): sent at 10_000, server reads at client 11_000, arrives 12_000.
        let now = NowExchange::new(ts(10_000), ts(11_000 + theta), ts(12_000)).unwrap();
        let e = estimate(&samples, Some(&now), Estimator::MeanDelay, &no_drift()).unwrap();
        // synchronized = server time + 1000 at local 12_000 → offset θ exactly.
        assert_eq!(e.offset, Nanos::from_nanos(theta));
        assert!(e.contains(Nanos::from_nanos(theta)));
        assert_eq!(e.bound(), Nanos::from_nanos(1_000));
        assert_eq!(
            estimate(&samples, None, Estimator::MeanDelay, &no_drift()),
            Err(EstimateError::NoNowExchange)
        );
    }

    #[test]
    fn mean_delay_bound_holds_when_now_is_slow() {
        // Probes say 1 µs each way; now() took 20 ms on the server. The
        // server stamped its reply at the very end, so the estimate is good,
        // but the bound must still admit a stamp anywhere in the call.
        let theta = -3_000;
        let samples = [exchange(0, theta, 1_000, 0, 1_000)];
        let now = NowExchange::new(ts(0), ts(20_001_000 + theta), ts(20_002_000)).unwrap();
        let e = estimate(&samples, Some(&now), Estimator::MeanDelay, &no_drift()).unwrap();
        assert_eq!(e.offset, Nanos::from_nanos(theta));
        assert!(e.bound() >= Nanos::from_micros(20_000));
    }

    #[test]
    fn min_rtt_picks_the_quiet_sample() {
        let samples = [
            exchange(0, 500, 5_000, 0, 100),
            exchange(10_000, 500, 50, 0, 60),
            exchange(20_000, 500, 900, 0, 3_000),
        ];
        assert_eq!(min_rtt_sample(&samples).map(|(i, _)| i), Some(1));
        let e = estimate(&samples, None, Estimator::MinRtt, &no_drift()).unwrap();
        assert_eq!(e.offset, Nanos::from_nanos(495));
        assert_eq!(e.bound(), Nanos::from_nanos(55));
    }

    #[test]
    fn intersection_narrows_the_bound() {
        // One sample slow out, one slow back: together they pin θ.
        let samples = [
            exchange(0, 1_000, 5_000, 0, 10),
            exchange(20_000, 1_000, 10, 0, 5_000),
        ];
        let e = estimate(&samples, None, Estimator::Intersection, &no_drift()).unwrap();
        assert!(e.contains(Nanos::from_nanos(1_000)));
        assert_eq!(e.bound(), Nanos::from_nanos(10));
        let min = estimate(&samples, None, Estimator::MinRtt, &no_drift()).unwrap();
        assert!(min.bound() > e.bound());
    }

    #[test]
    fn mid_median_lies_between_midpoint_and_median() {
        // Intervals [θ-300, θ+100], [θ-100, θ+200], [θ-200, θ+400]: the
        // intersection is θ ± 100, midpoint θ; the offsets are θ-100, θ+50
        // and θ+100, median θ+50; the blend is θ+25.
        let samples = [
            exchange(0, 1_000, 100, 0, 300),
            exchange(10_000, 1_000, 200, 0, 100),
            exchange(20_000, 1_000, 400, 0, 200),
        ];
        let i = estimate(&samples, None, Estimator::Intersection, &no_drift()).unwrap();
        let m = estimate(&samples, None, Estimator::MidMedian, &no_drift()).unwrap();
        assert_eq!(i.offset, Nanos::from_nanos(1_000));
        assert_eq!(m.offset, Nanos::from_nanos(1_025));
        assert_eq!((m.low, m.high), (i.low, i.high));
        assert_eq!(m.bound(), Nanos::from_nanos(125));

        // A median outside the intersection is brought to its edge first:
        // intersection [900, 1100], median 1950 → 1100, blend 1050.
        let skewed = [
            exchange(0, 1_000, 100, 0, 3_000),
            exchange(10_000, 1_000, 2_000, 0, 100),
            exchange(20_000, 1_000, 3_000, 0, 200),
        ];
        let m = estimate(&skewed, None, Estimator::MidMedian, &no_drift()).unwrap();
        assert_eq!(
            (m.low, m.high),
            (Nanos::from_nanos(900), Nanos::from_nanos(1_100))
        );
        assert_eq!(m.offset, Nanos::from_nanos(1_050));
        assert!(m.contains(Nanos::from_nanos(1_000)));
    }

    #[test]
    fn contradictory_exchanges_are_reported() {
        let a = exchange(0, 0, 10, 0, 10);
        let b = exchange(100, 1_000_000, 10, 0, 10); // the server stepped
        assert_eq!(
            estimate(&[a, b], None, Estimator::Intersection, &no_drift()),
            Err(EstimateError::Inconsistent)
        );
        // One sample alone is never inconsistent.
        assert!(estimate(&[b], None, Estimator::MinRtt, &no_drift()).is_ok());
    }

    #[test]
    fn min_transfer_tightens_and_can_contradict() {
        let s = exchange(0, 0, 1_000, 0, 1_000);
        let p = SyncParams {
            min_transfer: Nanos::from_nanos(800),
            max_drift_ppm: 0,
        };
        let e = estimate(&[s], None, Estimator::MinRtt, &p).unwrap();
        assert_eq!(e.bound(), Nanos::from_nanos(200));
        let too_high = SyncParams {
            min_transfer: Nanos::from_nanos(1_001),
            max_drift_ppm: 0,
        };
        assert_eq!(
            estimate(&[s], None, Estimator::MinRtt, &too_high),
            Err(EstimateError::Inconsistent)
        );
    }

    #[test]
    fn drift_widens_old_samples() {
        // 100 ppm over 1 s of age adds 100 µs.
        let old = exchange(0, 0, 0, 0, 0);
        let young = exchange(1_000_000_000, 0, 0, 0, 0);
        let p = SyncParams {
            min_transfer: Nanos::ZERO,
            max_drift_ppm: 100,
        };
        let e = estimate(&[old, young], None, Estimator::MinRtt, &p).unwrap();
        assert_eq!(e.bound(), Nanos::ZERO); // the young one is chosen, age 0
        let e = estimate(&[old, young], None, Estimator::Intersection, &p).unwrap();
        assert_eq!(e.bound(), Nanos::ZERO);
        let e = estimate(&[old], None, Estimator::MinRtt, &p).unwrap();
        assert_eq!(e.reference, ts(0));
        let e = estimate(
            &[old],
            Some(&NowExchange::new(ts(999_999_999), ts(1_000_000_000), ts(1_000_000_000)).unwrap()),
            Estimator::MinRtt,
            &p,
        )
        .unwrap();
        assert_eq!(e.bound(), Nanos::from_micros(100));
    }

    #[test]
    fn root_distance_widens_every_interval() {
        // θ = 1000, 100 ns each way; the server is within 5 µs of its
        // reference.
        let s = exchange(0, 1_000, 100, 0, 100).with_root_distance(Nanos::from_micros(5));
        assert_eq!(s.offset(), Nanos::from_nanos(1_000));
        for estimator in [
            Estimator::MinRtt,
            Estimator::Intersection,
            Estimator::MidMedian,
        ] {
            let e = estimate(&[s, s], None, estimator, &no_drift()).unwrap();
            assert_eq!(e.bound(), Nanos::from_nanos(5_100), "{estimator}");
        }
        // The reference may be 5 µs from the server: still inside.
        let e = estimate(&[s], None, Estimator::MinRtt, &no_drift()).unwrap();
        assert!(e.contains(Nanos::from_nanos(1_000 + 5_000)));
        assert_eq!(
            s.with_root_distance(Nanos::from_nanos(-3)).root_distance(),
            Nanos::ZERO
        );
    }

    #[test]
    fn estimator_names_round_trip() {
        for e in Estimator::ALL {
            assert_eq!(e.name().parse::<Estimator>(), Ok(e));
        }
        let err = "best".parse::<Estimator>().unwrap_err();
        assert!(err.contains("'best'") && err.contains("min-rtt"), "{err}");
    }

    #[test]
    fn rounding_is_half_away_from_zero() {
        assert_eq!(div_round(5, 2), 3);
        assert_eq!(div_round(-5, 2), -3);
        assert_eq!(div_round(4, 2), 2);
        assert_eq!(div_round(-1, 2), -1);
        assert_eq!(div_round(1, 3), 0);
        assert_eq!(drift_allowance(1, 1), 1);
        assert_eq!(drift_allowance(0, 100), 0);
        assert_eq!(drift_allowance(-5, 100), 0);
    }

    /// A path: per exchange, delays out and back, server time, and a gap.
    fn path() -> impl Strategy<Value = Vec<(i64, i64, i64, i64)>> {
        prop::collection::vec(
            (
                0..50_000_000i64,
                0..50_000_000i64,
                0..30_000_000i64,
                0..100_000_000i64,
            ),
            1..12,
        )
    }

    fn run(theta: i64, path: &[(i64, i64, i64, i64)]) -> Vec<Sample> {
        let mut start = 0;
        path.iter()
            .map(|&(out, back, server, gap)| {
                let s = exchange(start, theta, out, server, back);
                start = s.ts4().as_nanos() - T0 + gap;
                s
            })
            .collect()
    }

    proptest! {
        #[test]
        fn symmetric_delay_gives_the_exact_offset(
            theta in -1_000_000_000_000i64..1_000_000_000_000,
            d in 0..1_000_000_000i64,
            server in 0..1_000_000_000i64,
        ) {
            let s = exchange(0, theta, d, server, d);
            prop_assert_eq!(s.offset(), Nanos::from_nanos(theta));
            prop_assert_eq!(s.delay(), Nanos::from_nanos(d));
        }

        #[test]
        fn offset_error_is_half_the_asymmetry(
            theta in -1_000_000_000_000i64..1_000_000_000_000,
            out in 0..1_000_000_000i64,
            back in 0..1_000_000_000i64,
        ) {
            let s = exchange(0, theta, out, 0, back);
            let err = s.offset().as_nanos() - theta;
            prop_assert!((2 * err - (out - back)).abs() <= 1);
        }

        #[test]
        fn server_time_never_moves_the_estimate(
            theta in -1_000_000_000i64..1_000_000_000,
            out in 0..1_000_000i64,
            back in 0..1_000_000i64,
            server in 0..1_000_000_000i64,
        ) {
            let a = exchange(0, theta, out, 0, back);
            let b = exchange(0, theta, out, server, back);
            prop_assert_eq!(a.offset(), b.offset());
            prop_assert_eq!(a.rtt(), b.rtt());
        }

        #[test]
        fn every_estimator_bound_contains_the_truth(
            theta in -10_000_000_000i64..10_000_000_000,
            path in path(),
            now_out in 0..50_000_000i64,
            now_server in 0..30_000_000i64,
            now_back in 0..50_000_000i64,
        ) {
            let samples = run(theta, &path);
            let start = samples.last().unwrap().ts4().as_nanos() - T0 + 1_000;
            let server_read = start + now_out + now_server;
            let now = NowExchange::new(
                ts(start),
                ts(server_read + theta),
                ts(server_read + now_back),
            ).unwrap();
            for estimator in Estimator::ALL {
                for p in [no_drift(), SyncParams::default()] {
                    let e = estimate(&samples, Some(&now), estimator, &p).unwrap();
                    prop_assert!(e.contains(Nanos::from_nanos(theta)), "{estimator}: {e:?}");
                    prop_assert!(
                        (e.offset.as_nanos() - theta).unsigned_abs()
                            <= e.bound().as_nanos() as u64
                    );
                }
            }
        }

        #[test]
        fn the_bound_holds_while_clocks_drift(
            theta in -1_000_000_000i64..1_000_000_000,
            ppm in -100i64..=100,
            path in path(),
        ) {
            // The server's clock runs `ppm` fast: θ grows with time. The
            // truth is θ at the reference instant (the last receipt).
            let mut samples = Vec::new();
            let mut start = 0i64;
            for &(out, back, server, gap) in &path {
                let at = |t: i64| theta + t * ppm / 1_000_000;
                let ts1 = start;
                let arrive = ts1 + out;
                let leave = arrive + server;
                let ts4 = leave + back;
                samples.push(Sample::new(ts(ts1), ts(arrive + at(arrive)), ts(leave + at(leave)), ts(ts4)).unwrap());
                start = ts4 + gap;
            }
            let last = samples.last().unwrap().ts4().as_nanos() - T0;
            let truth = theta + last * ppm / 1_000_000;
            for estimator in [Estimator::MinRtt, Estimator::Intersection, Estimator::MidMedian] {
                let e = estimate(&samples, None, estimator, &SyncParams::default()).unwrap();
                // One nanosecond of slack for the integer model of drift.
                prop_assert!(e.low.as_nanos() - 1 <= truth && truth <= e.high.as_nanos() + 1,
                    "{estimator}: truth {truth}, {e:?}");
            }
        }

        #[test]
        fn intersection_is_never_wider_than_min_rtt(
            theta in -1_000_000_000i64..1_000_000_000,
            path in path(),
        ) {
            let samples = run(theta, &path);
            let i = estimate(&samples, None, Estimator::Intersection, &no_drift()).unwrap();
            let m = estimate(&samples, None, Estimator::MinRtt, &no_drift()).unwrap();
            prop_assert!(i.high.as_nanos() - i.low.as_nanos() <= m.high.as_nanos() - m.low.as_nanos());
        }
    }
}
