//! Selection: which of several time sources to believe, and the one answer
//! they give together. Pure, like [`crate::sync`]: the caller syncs with
//! each server, then hands the results here.
//!
//! Each source that answered gives a [`Candidate`]: its estimate of the
//! offset (server minus local) and an interval `[low, high]` that holds the
//! true offset *if that source is honest* (the caller has already widened
//! it by the server's own distance from its reference), measured at local
//! time `at`. A source can be wrong in ways no single exchange reveals: a
//! server whose clock is off, or one that lies. Several sources reveal it,
//! because honest intervals all hold the same truth and so overlap. The
//! rules, in order:
//!
//! 1. **One instant.** The candidates come from concurrent syncs, so their
//!    `at` differ (by a second or so). Each is brought to the common
//!    reference `max(at)` (over the valid candidates) by widening its
//!    interval on both sides by `ceil(age × max_drift_ppm / 10⁶)`, the same
//!    drift allowance the sync math uses: over `age` the two clocks may have
//!    drifted apart that much.
//! 2. **A majority.** `needed = max(n/2 + 1, min_agree)`, where `n` counts
//!    every candidate, valid or not: a strict majority of the sources that
//!    answered, raised by `--min-agree`. A clock moved by a minority is worse
//!    than no sync.
//! 3. **Coverage.** A sweep over the interval endpoints (Marzullo's) finds
//!    the set S of offsets covered by at least `needed` intervals. The
//!    intervals are closed: one ending at x and one starting at x share x.
//!    If S is empty there is no answer: [`SelectError::NoMajority`] lists the
//!    groups of sources that do agree among themselves, for display.
//! 4. **The hull.** The answer's interval is `[min S, max S]`. Why the hull,
//!    and not the intersection of the largest group, which would be
//!    tighter: if at least `needed` intervals hold the truth, the truth is
//!    covered `needed` times, so it lies in S, and so in the hull, whichever
//!    sources are the honest ones. The largest group's intersection can
//!    exclude the truth when liars overlap the edge of an honest group: the
//!    point most covered is then where liars and honest sources meet, not
//!    where the truth is. The promise is the one a majority can keep: the
//!    interval holds whenever at least `needed` sources are honest,
//!    whichever they are.
//! 5. **Truechimers** are the candidates whose interval meets the hull; the
//!    rest are falsetickers. At least `needed` candidates meet it (any point
//!    of S is covered `needed` times).
//! 6. **Combining** the truechimers' offsets into one, by [`Combine`]: a
//!    weighted mean (weights `1/bound²`, each source's bound taken to the
//!    reference instant), the hull's midpoint, or the best source's offset.
//!    The mean is exact integer arithmetic (weights `floor(2^20 · b_min² /
//!    b²)`, offsets taken from the hull's midpoint, one rounding half away
//!    from zero at the end), so it too is independent of order. Whatever the
//!    rule, the estimate is then brought inside the hull, so it never leaves
//!    what the majority allows.
//! 7. **Verdicts**, in chrony's terms: the best truechimer is
//!    [`Verdict::Selected`] (`*`), the other truechimers
//!    [`Verdict::Agrees`] (`+`), the rest [`Verdict::Falseticker`] (`x`).
//!    The best is the one with the smallest bound, then the narrowest
//!    interval, then the smallest offset, so that the answer does not depend
//!    on the order the sources are listed in.
//! 8. **Overflow.** Candidates may carry any `i64`, and drift widening can
//!    push an interval past what an `i64` holds; the math is in `i128` and
//!    the answer saturates when it comes back to [`Nanos`]. Nothing panics.
//!
//! A candidate that contradicts itself (`low > high`, or an offset outside
//! its own interval) is invalid: it covers nothing, is a falseticker, and
//! plays no part in choosing the reference instant. It still counts among
//! the `n` that answered, so garbage never lowers the majority needed.

use crate::sync::{Estimate, div_round, drift_allowance};
use crate::time::{Nanos, Timestamp};
use std::fmt;
use std::str::FromStr;

/// One source's answer: an offset and the interval that holds the truth if
/// the source is honest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// The local time the offset refers to.
    pub at: Timestamp,
    /// The source's best guess of server minus local.
    pub offset: Nanos,
    /// The least offset consistent with the source, its distance from its
    /// own reference included.
    pub low: Nanos,
    /// The greatest offset consistent with the source.
    pub high: Nanos,
}

impl Candidate {
    /// Whether the candidate is consistent with itself: a non-empty
    /// interval that holds its own offset. Invalid candidates are
    /// falsetickers that cover nothing.
    pub fn is_valid(&self) -> bool {
        self.low <= self.offset && self.offset <= self.high
    }
}

impl From<Estimate> for Candidate {
    /// One sync's estimate as a candidate. A server with a reference of its
    /// own (an NTP server's root distance) must be widened by the caller.
    fn from(e: Estimate) -> Candidate {
        Candidate {
            at: e.reference,
            offset: e.offset,
            low: e.low,
            high: e.high,
        }
    }
}

/// How the truechimers' offsets become one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Combine {
    /// The mean of the offsets, weighted by `1/bound²`: a source twice as
    /// tight counts four times as much, as an inverse-variance mean would if
    /// the bounds were standard deviations. Uses every truechimer while
    /// trusting the tight ones most.
    #[default]
    WeightedMean,
    /// The hull's midpoint: the estimate whose worst-case error, and so
    /// whose bound, is least.
    Midpoint,
    /// The offset of the best truechimer (the [`Verdict::Selected`] one):
    /// what one good source says, unaveraged.
    Best,
}

impl Combine {
    /// Every rule, in the order reports list them.
    pub const ALL: [Combine; 3] = [Combine::WeightedMean, Combine::Midpoint, Combine::Best];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Combine::WeightedMean => "weighted-mean",
            Combine::Midpoint => "midpoint",
            Combine::Best => "best",
        }
    }
}

impl fmt::Display for Combine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Combine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Combine::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Combine::ALL.iter().map(|c| c.name()).collect();
                format!(
                    "unknown combining rule '{s}': expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// What selection may assume, and how it combines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectParams {
    /// The fewest sources that must agree, whatever the majority
    /// (`--min-agree`). The majority of those that answered is needed in
    /// any case; this only raises the floor, for example to refuse an answer
    /// resting on one source when three were asked and two did not answer.
    pub min_agree: usize,
    /// The largest rate difference between the local clock and a server's,
    /// in parts per million, used to bring every candidate to the same
    /// instant. 100 ppm covers two ordinary crystals at ±50 ppm, as in
    /// [`crate::sync::SyncParams`].
    pub max_drift_ppm: u32,
    /// How the truechimers' offsets become one.
    pub combine: Combine,
}

impl Default for SelectParams {
    fn default() -> Self {
        SelectParams {
            min_agree: 1,
            max_drift_ppm: 100,
            combine: Combine::default(),
        }
    }
}

/// What selection thinks of one candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The best truechimer: smallest bound (chrony's `*`).
    Selected,
    /// A truechimer: its interval meets the majority's (chrony's `+`).
    Agrees,
    /// Its interval misses the majority's, or it contradicts itself
    /// (chrony's `x`).
    Falseticker,
}

impl Verdict {
    /// The one-character mark chrony's `sources` uses for the same verdict.
    pub fn symbol(self) -> char {
        match self {
            Verdict::Selected => '*',
            Verdict::Agrees => '+',
            Verdict::Falseticker => 'x',
        }
    }
}

/// The sources' joint answer: the true offset lies in `[low, high]` at
/// local time `reference` whenever at least `needed` sources are honest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// One verdict per candidate, in the order they were given.
    pub verdicts: Vec<Verdict>,
    /// The instant the answer refers to: the latest candidate's `at`.
    pub reference: Timestamp,
    /// The combined estimate of server minus local.
    pub offset: Nanos,
    /// The least offset the majority allows.
    pub low: Nanos,
    /// The greatest offset the majority allows.
    pub high: Nanos,
    /// How many candidates are truechimers (`Selected` or `Agrees`).
    pub agreeing: usize,
    /// How many had to agree.
    pub needed: usize,
}

impl Selection {
    /// The error bound: the farthest the truth can be from `offset`.
    pub fn bound(&self) -> Nanos {
        let below = self.offset.as_nanos().abs_diff(self.low.as_nanos());
        let above = self.offset.as_nanos().abs_diff(self.high.as_nanos());
        Nanos::from_nanos(i64::try_from(below.max(above)).unwrap_or(i64::MAX))
    }

    /// Whether `offset` lies within the answer's interval.
    pub fn contains(&self, offset: Nanos) -> bool {
        self.low <= offset && offset <= self.high
    }
}

/// Why the sources give no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// No source answered.
    #[error("no time source answered")]
    NoCandidates,
    /// No offset is allowed by `needed` sources.
    #[error("the time sources disagree: {needed} must agree, at most {largest} do")]
    NoMajority {
        /// How many had to agree.
        needed: usize,
        /// The size of the largest group that agrees.
        largest: usize,
        /// The groups of sources that agree among themselves, for display:
        /// maximal sets of candidate indices whose intervals share a point,
        /// each in increasing order, largest group first (ties: the group
        /// whose indices come first). Invalid candidates are in none.
        groups: Vec<Vec<usize>>,
    },
}

/// Picks the truechimers among the candidates and combines them; see the
/// module documentation for the rules.
pub fn select(candidates: &[Candidate], params: &SelectParams) -> Result<Selection, SelectError> {
    if candidates.is_empty() {
        return Err(SelectError::NoCandidates);
    }
    let needed = (candidates.len() / 2 + 1).max(params.min_agree);
    let valid = || candidates.iter().enumerate().filter(|(_, c)| c.is_valid());
    let reference = valid().map(|(_, c)| c.at).max();
    let sources: Vec<Widened> = match reference {
        Some(reference) => valid()
            .map(|(index, c)| Widened::new(index, c, reference, params.max_drift_ppm))
            .collect(),
        None => Vec::new(),
    };
    let no_majority = |sources: &[Widened]| {
        let groups = agreeing_groups(sources);
        SelectError::NoMajority {
            needed,
            largest: groups.first().map_or(0, Vec::len),
            groups,
        }
    };
    let (Some(reference), Some((low, high))) = (reference, majority_hull(&sources, needed)) else {
        return Err(no_majority(&sources));
    };

    let truechimers: Vec<&Widened> = sources
        .iter()
        .filter(|w| w.lo <= high && low <= w.hi)
        .collect();
    // Never empty: the hull's ends are covered by `needed` ≥ 1 intervals.
    let Some(best) = truechimers.iter().min_by_key(|w| w.rank()) else {
        return Err(no_majority(&sources));
    };
    let midpoint = div_round(low + high, 2);
    let estimate = match params.combine {
        Combine::WeightedMean => weighted_mean(&truechimers, midpoint),
        Combine::Midpoint => midpoint,
        Combine::Best => best.offset,
    }
    .clamp(low, high);

    let mut verdicts = vec![Verdict::Falseticker; candidates.len()];
    for w in &truechimers {
        verdicts[w.index] = Verdict::Agrees;
    }
    verdicts[best.index] = Verdict::Selected;
    Ok(Selection {
        verdicts,
        reference,
        offset: saturate(estimate),
        low: saturate(low),
        high: saturate(high),
        agreeing: truechimers.len(),
        needed,
    })
}

/// A valid candidate brought to the reference instant, in exact `i128`
/// nanoseconds (widening can take it past an `i64`).
#[derive(Clone, Copy, Debug)]
struct Widened {
    index: usize,
    at: Timestamp,
    offset: i128,
    lo: i128,
    hi: i128,
}

impl Widened {
    fn new(index: usize, c: &Candidate, reference: Timestamp, ppm: u32) -> Widened {
        let by = drift_allowance(reference.diff_i128(c.at), ppm);
        Widened {
            index,
            at: c.at,
            offset: i128::from(c.offset.as_nanos()),
            lo: i128::from(c.low.as_nanos()) - by,
            hi: i128::from(c.high.as_nanos()) + by,
        }
    }

    /// The farthest the truth can be from this source's offset.
    fn bound(&self) -> i128 {
        (self.offset - self.lo).max(self.hi - self.offset)
    }

    /// The order of preference: smallest bound, then narrowest interval,
    /// then smallest offset. The rest of the key (lower end, then `at`)
    /// pins the candidate down completely, so only exact duplicates fall
    /// through to the index, and which of two identical candidates is
    /// `Selected` changes nothing else.
    fn rank(&self) -> (i128, i128, i128, i128, Timestamp, usize) {
        (
            self.bound(),
            self.hi - self.lo,
            self.offset,
            self.lo,
            self.at,
            self.index,
        )
    }
}

/// `[min S, max S]`, where S is the set of offsets inside at least `needed`
/// of the intervals, or `None` if S is empty.
///
/// Coverage changes only at endpoints, and a point's coverage is at least
/// that of the open stretch on either side of it, so S starts at some
/// interval's lower end and stops at some upper end. Starts sort before ends
/// at the same offset (`false < true`), which makes the intervals closed.
fn majority_hull(sources: &[Widened], needed: usize) -> Option<(i128, i128)> {
    let mut events: Vec<(i128, bool)> = sources
        .iter()
        .flat_map(|w| [(w.lo, false), (w.hi, true)])
        .collect();
    events.sort_unstable();
    let (mut covered, mut first, mut last) = (0usize, None, None);
    for (x, is_end) in events {
        if is_end {
            // Never below zero: an interval's end sorts after its start.
            if covered >= needed {
                last = Some(x);
            }
            covered -= 1;
        } else {
            covered += 1;
            if covered >= needed && first.is_none() {
                first = Some(x);
            }
        }
    }
    Some((first?, last?))
}

/// The maximal groups of sources whose intervals share a point, largest
/// first (ties: lexicographic order of the sorted indices).
///
/// For intervals, sharing a point pairwise is sharing one point together
/// (Helly), and the maximal groups are exactly the sets open at the sweep's
/// peaks: wherever an end follows a start. Each peak's set is maximal
/// (anything else ended before its last start or starts after its first
/// end). A later peak's set lacks the interval that ended at an earlier
/// peak and holds one that started after it, so no group repeats or
/// contains another.
fn agreeing_groups(sources: &[Widened]) -> Vec<Vec<usize>> {
    let mut events: Vec<(i128, bool, usize)> = sources
        .iter()
        .flat_map(|w| [(w.lo, false, w.index), (w.hi, true, w.index)])
        .collect();
    events.sort_unstable();
    let mut open: Vec<usize> = Vec::new();
    let mut rising = false;
    let mut groups = Vec::new();
    for (_, is_end, index) in events {
        if is_end {
            if rising {
                let mut group = open.clone();
                group.sort_unstable();
                groups.push(group);
                rising = false;
            }
            open.retain(|&i| i != index);
        } else {
            open.push(index);
            rising = true;
        }
    }
    groups.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    groups
}

/// Scale of the weights: the best source weighs `2^WEIGHT_BITS` and every
/// other `floor(2^20 · b_min² / b²)`. Flooring errs by less than a
/// millionth of the best source's weight per source, far below anything
/// the bounds could tell apart; a source whose bound is more than 1024
/// times the best's weighs nothing.
const WEIGHT_BITS: u32 = 20;

/// Bounds are capped here for weighting so that a bound's square fits a
/// `u128` with a bit to spare (the long division doubles its remainder).
/// Only absurd sources, already weightless, are affected.
const MAX_WEIGHTED_BOUND: i128 = 1 << 63;

/// Offsets enter the mean relative to the hull's midpoint and capped at
/// this, so that each weighted term stays below `2^83` and no realistic
/// number of terms can overflow an `i128`. Only absurd offsets (more than
/// 146 years from the midpoint) are affected, and the estimate is brought
/// inside the hull afterwards anyway.
const MAX_DELTA: i128 = 1 << 62;

/// `midpoint + Σ wᵢ·(offsetᵢ − midpoint) / Σ wᵢ`, with
/// `wᵢ = floor(2^20 · b_min² / bᵢ²)`: exact integers, rounded half away
/// from zero once at the end, so the sum does not depend on the order of
/// the sources.
fn weighted_mean(truechimers: &[&Widened], midpoint: i128) -> i128 {
    let weight_bound = |w: &Widened| w.bound().clamp(1, MAX_WEIGHTED_BOUND) as u128;
    let Some(b_min) = truechimers.iter().map(|w| weight_bound(w)).min() else {
        return midpoint;
    };
    let (mut sum, mut total) = (0i128, 0i128);
    for w in truechimers {
        let weight = inverse_square_weight(b_min, weight_bound(w)) as i128;
        let delta = (w.offset - midpoint).clamp(-MAX_DELTA, MAX_DELTA);
        sum = sum.saturating_add(weight * delta);
        total += weight;
    }
    // The best source weighs 2^20, so `total` is never zero; kept cheap
    // rather than trusted.
    if total == 0 {
        midpoint
    } else {
        midpoint + div_round(sum, total)
    }
}

/// `floor(2^WEIGHT_BITS · b_min² / b²)` for `1 ≤ b_min ≤ b ≤ 2^63`.
///
/// `2^20 · b_min²` can need 146 bits, so the quotient is found one bit at
/// a time (binary long division): the remainder stays below `b² ≤ 2^126`
/// and its double fits a `u128`.
fn inverse_square_weight(b_min: u128, b: u128) -> u128 {
    let (x, y) = (b_min * b_min, b * b);
    let (mut quotient, mut remainder) = (x / y, x % y);
    for _ in 0..WEIGHT_BITS {
        quotient <<= 1;
        remainder <<= 1;
        if remainder >= y {
            remainder -= y;
            quotient |= 1;
        }
    }
    quotient
}

/// An exact result back in [`Nanos`], clamped to what an `i64` holds.
fn saturate(v: i128) -> Nanos {
    Nanos::from_nanos(v.clamp(i64::MIN.into(), i64::MAX.into()) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: i64 = 1_790_000_000_000_000_000;
    const MS: i64 = 1_000_000;
    const SEC: i64 = 1_000_000_000;

    fn ts(n: i64) -> Timestamp {
        Timestamp::from_nanos(T0 + n)
    }

    /// A candidate measured at `T0 + at`.
    fn cand(at: i64, offset: i64, low: i64, high: i64) -> Candidate {
        Candidate {
            at: ts(at),
            offset: Nanos::from_nanos(offset),
            low: Nanos::from_nanos(low),
            high: Nanos::from_nanos(high),
        }
    }

    /// `offset ± half`, measured at `T0`.
    fn around(offset: i64, half: i64) -> Candidate {
        cand(0, offset, offset - half, offset + half)
    }

    fn with(combine: Combine) -> SelectParams {
        SelectParams {
            combine,
            ..SelectParams::default()
        }
    }

    fn nanos(low: i64, high: i64) -> (Nanos, Nanos) {
        (Nanos::from_nanos(low), Nanos::from_nanos(high))
    }

    use Verdict::{Agrees, Falseticker, Selected};

    #[test]
    fn one_candidate_is_itself() {
        let c = cand(0, 30, 10, 100);
        let s = select(&[c], &SelectParams::default()).unwrap();
        assert_eq!((s.low, s.high), nanos(10, 100));
        assert_eq!(s.offset, Nanos::from_nanos(30));
        assert_eq!(s.reference, ts(0));
        assert_eq!(s.verdicts, [Selected]);
        assert_eq!((s.agreeing, s.needed), (1, 1));
        assert_eq!(s.bound(), Nanos::from_nanos(70));
        let best = select(&[c], &with(Combine::Best)).unwrap();
        assert_eq!(best.offset, Nanos::from_nanos(30));
        let mid = select(&[c], &with(Combine::Midpoint)).unwrap();
        assert_eq!(mid.offset, Nanos::from_nanos(55));
    }

    #[test]
    fn two_overlapping_give_their_intersection() {
        let s = select(&[around(0, 100), around(50, 100)], &SelectParams::default()).unwrap();
        assert_eq!((s.low, s.high), nanos(-50, 100));
        assert_eq!((s.agreeing, s.needed), (2, 2));
        // Equal bounds, equal widths: the smaller offset is selected.
        assert_eq!(s.verdicts, [Selected, Agrees]);
        // Equal weights: the plain mean.
        assert_eq!(s.offset, Nanos::from_nanos(25));
    }

    #[test]
    fn touching_intervals_share_their_endpoint() {
        let s = select(
            &[cand(0, 5, 0, 10), cand(0, 15, 10, 20)],
            &SelectParams::default(),
        )
        .unwrap();
        assert_eq!((s.low, s.high), nanos(10, 10));
        assert_eq!(s.offset, Nanos::from_nanos(10));
        assert_eq!(s.bound(), Nanos::ZERO);
    }

    #[test]
    fn two_disjoint_have_no_majority() {
        let err = select(&[around(0, 10), around(100, 10)], &SelectParams::default());
        assert_eq!(
            err,
            Err(SelectError::NoMajority {
                needed: 2,
                largest: 1,
                groups: vec![vec![0], vec![1]],
            })
        );
        let message = err.unwrap_err().to_string();
        assert!(message.contains("2 must agree, at most 1 do"), "{message}");
    }

    #[test]
    fn no_candidates_is_an_error() {
        assert_eq!(
            select(&[], &SelectParams::default()),
            Err(SelectError::NoCandidates)
        );
    }

    #[test]
    fn a_liar_among_three_honest_is_a_falseticker() {
        let candidates = [
            around(-2 * MS, 5 * MS),
            around(SEC, MS),
            around(MS, 4 * MS),
            around(3 * MS, 6 * MS),
        ];
        for combine in Combine::ALL {
            let s = select(&candidates, &with(combine)).unwrap();
            assert_eq!(s.needed, 3);
            assert_eq!(s.verdicts, [Agrees, Falseticker, Selected, Agrees]);
            assert_eq!(s.agreeing, 3);
            assert!(s.contains(Nanos::ZERO), "{combine}: {s:?}");
            // The three honest ones intersect in [-3 ms, 3 ms].
            assert_eq!((s.low, s.high), nanos(-3 * MS, 3 * MS));
            assert!(s.bound() <= Nanos::from_millis(4), "{combine}: {s:?}");
        }
    }

    #[test]
    fn two_against_two_has_no_majority() {
        let candidates = [
            around(0, MS),
            around(SEC, MS),
            around(100, MS),
            around(SEC + 100, MS),
        ];
        assert_eq!(
            select(&candidates, &SelectParams::default()),
            Err(SelectError::NoMajority {
                needed: 3,
                largest: 2,
                groups: vec![vec![0, 2], vec![1, 3]],
            })
        );
    }

    #[test]
    fn liars_overlapping_the_honest_group_cannot_exclude_the_truth() {
        // The truth is 0. Three honest sources hold it; two liars overlap
        // their upper half. The most covered stretch, [50, 100], misses
        // the truth; the hull of what three cover does not.
        let candidates = [
            around(0, 100),
            around(0, 100),
            around(0, 100),
            cand(0, 175, 50, 300),
            cand(0, 175, 50, 300),
        ];
        let s = select(&candidates, &with(Combine::Midpoint)).unwrap();
        assert_eq!((s.low, s.high), nanos(-100, 100));
        assert!(s.contains(Nanos::ZERO));
        assert_eq!(s.offset, Nanos::ZERO);
        // The liars meet the hull, so they count as agreeing.
        assert_eq!(s.agreeing, 5);
        assert_eq!(s.verdicts[0], Selected);
    }

    #[test]
    fn weighted_mean_leans_toward_the_tight_source() {
        // Tight at +10 µs ± 10 µs, wide at +900 µs ± 1 ms: weights 100:1.
        let tight = around(10_000, 10_000);
        let wide = around(900_000, 1_000_000);
        let s = select(&[wide, tight], &SelectParams::default()).unwrap();
        assert_eq!((s.low, s.high), nanos(0, 20_000));
        assert_eq!(s.verdicts, [Agrees, Selected]);
        // Bounds 1 ms and 10 µs: weights floor(2^20/10^4) = 104 and 2^20,
        // about 1:10 000. From the hull's midpoint, 10 µs, the wide source
        // is 890 µs away and moves the mean by 88 ns.
        let wide_weight = (1 << 20) / 10_000;
        assert_eq!(wide_weight, 104);
        let total = (1 << 20) + wide_weight;
        let pull = (wide_weight * 890_000 + total / 2) / total;
        assert_eq!(s.offset, Nanos::from_nanos(10_000 + pull));
        assert_eq!(s.offset, Nanos::from_nanos(10_088));

        // Unclamped: the hull is wide enough for the mean to show.
        let tight = around(0, 100_000);
        let wide = around(900_000, 1_000_000);
        let s = select(&[tight, wide], &SelectParams::default()).unwrap();
        assert_eq!((s.low, s.high), nanos(-100_000, 100_000));
        // Bounds 1 ms and 100 µs: weights floor(2^20/100) = 10 485 and 2^20,
        // about 1:100, so 900 µs pulls the mean 8.9 µs from the tight source.
        assert_eq!(s.offset, Nanos::from_nanos(8_910));
    }

    #[test]
    fn midpoint_and_best_combine() {
        let candidates = [cand(0, 90, 0, 100), cand(0, 40, 20, 60), around(50, 100)];
        let mid = select(&candidates, &with(Combine::Midpoint)).unwrap();
        assert_eq!((mid.low, mid.high), nanos(0, 100));
        assert_eq!(mid.offset, Nanos::from_nanos(50));
        let best = select(&candidates, &with(Combine::Best)).unwrap();
        assert_eq!(best.offset, Nanos::from_nanos(40));
        assert_eq!(best.verdicts, [Agrees, Selected, Agrees]);
    }

    #[test]
    fn best_is_clamped_into_the_hull() {
        // The tightest truechimer only grazes the majority's interval; a
        // tighter falseticker is never selected.
        let candidates = [
            around(0, 100),
            around(0, 100),
            around(0, 100),
            cand(0, 110, 95, 115),
            around(5_000, 10),
        ];
        let s = select(&candidates, &with(Combine::Best)).unwrap();
        assert_eq!(s.verdicts, [Agrees, Agrees, Agrees, Selected, Falseticker]);
        assert_eq!((s.low, s.high), nanos(-100, 100));
        assert_eq!(s.offset, Nanos::from_nanos(100));
    }

    #[test]
    fn ties_are_broken_by_width_then_offset() {
        // All bounds 10: the narrower interval wins, then the smaller offset.
        let candidates = [cand(0, 5, -5, 15), cand(0, 0, -10, 5), cand(0, 10, 0, 20)];
        let s = select(&candidates, &with(Combine::Best)).unwrap();
        assert_eq!(s.verdicts, [Agrees, Selected, Agrees]);
        assert_eq!((s.low, s.high), nanos(-5, 15));
        assert_eq!(s.offset, Nanos::ZERO);
        let same_width = [cand(0, 5, -5, 15), cand(0, 10, 0, 20)];
        let s = select(&same_width, &with(Combine::Best)).unwrap();
        assert_eq!(s.verdicts, [Selected, Agrees]);
        assert_eq!(s.offset, Nanos::from_nanos(5));
    }

    #[test]
    fn min_agree_raises_the_floor() {
        let candidates = [around(0, 10), around(5, 10)];
        let p = |min_agree| SelectParams {
            min_agree,
            ..SelectParams::default()
        };
        assert!(select(&candidates, &p(2)).is_ok());
        assert_eq!(
            select(&candidates, &p(3)),
            Err(SelectError::NoMajority {
                needed: 3,
                largest: 2,
                groups: vec![vec![0, 1]],
            })
        );
        // Below the majority it changes nothing.
        assert_eq!(select(&candidates, &p(0)).unwrap().needed, 2);
    }

    #[test]
    fn drift_widens_older_candidates() {
        // One second older at 100 ppm: 100 µs wider on each side.
        let old = cand(0, 0, -10, 10);
        let young = cand(SEC, 0, -MS, MS);
        let s = select(&[old, young], &SelectParams::default()).unwrap();
        assert_eq!(s.reference, ts(SEC));
        assert_eq!((s.low, s.high), nanos(-100_010, 100_010));
        assert_eq!(s.verdicts, [Selected, Agrees]);
        let no_drift = SelectParams {
            max_drift_ppm: 0,
            ..SelectParams::default()
        };
        let s = select(&[old, young], &no_drift).unwrap();
        assert_eq!((s.low, s.high), nanos(-10, 10));
        // Rounded up: 1 ns of age at 1 ppm still widens by 1 ns.
        let p = SelectParams {
            max_drift_ppm: 1,
            ..SelectParams::default()
        };
        let s = select(&[cand(0, 0, 0, 0), cand(1, 1, 1, 1)], &p).unwrap();
        assert_eq!((s.low, s.high), nanos(1, 1));
    }

    #[test]
    fn invalid_candidates_are_falsetickers_that_still_count() {
        let backwards = cand(0, 0, 10, -10);
        let outside = cand(0, 50, -10, 10);
        let s = select(
            &[around(0, 10), backwards, around(5, 10)],
            &SelectParams::default(),
        )
        .unwrap();
        assert_eq!(s.verdicts, [Selected, Falseticker, Agrees]);
        assert_eq!((s.agreeing, s.needed), (2, 2));
        // One good source and one invalid: 2 of 2 are needed.
        assert_eq!(
            select(&[around(0, 10), outside], &SelectParams::default()),
            Err(SelectError::NoMajority {
                needed: 2,
                largest: 1,
                groups: vec![vec![0]],
            })
        );
        // An invalid candidate's `at` does not move the reference.
        let late_garbage = cand(1_000 * SEC, 0, 1, -1);
        let s = select(
            &[around(0, 10), around(0, 10), late_garbage],
            &SelectParams::default(),
        )
        .unwrap();
        assert_eq!(s.reference, ts(0));
        assert_eq!((s.low, s.high), nanos(-10, 10));
        assert_eq!(
            select(&[backwards], &SelectParams::default()),
            Err(SelectError::NoMajority {
                needed: 1,
                largest: 0,
                groups: vec![],
            })
        );
    }

    #[test]
    fn groups_omit_subsets_and_sort_largest_first() {
        let candidates = [
            cand(0, 100, 100, 110),
            cand(0, 0, 0, 10),
            cand(0, 5, 5, 15),
            cand(0, 12, 12, 20),
            cand(0, 0, 0, 20),
        ];
        let everyone = SelectParams {
            min_agree: 6,
            ..SelectParams::default()
        };
        let Err(SelectError::NoMajority {
            groups, largest, ..
        }) = select(&candidates, &everyone)
        else {
            panic!("expected no majority");
        };
        assert_eq!(groups, [vec![1, 2, 4], vec![2, 3, 4], vec![0]]);
        assert_eq!(largest, 3);
    }

    #[test]
    fn extreme_values_saturate_without_panic() {
        let everything = Candidate {
            at: Timestamp::from_nanos(i64::MIN),
            offset: Nanos::from_nanos(i64::MIN),
            low: Nanos::from_nanos(i64::MIN),
            high: Nanos::from_nanos(i64::MAX),
        };
        let late = Candidate {
            at: Timestamp::from_nanos(i64::MAX),
            offset: Nanos::from_nanos(i64::MAX),
            low: Nanos::from_nanos(i64::MAX),
            high: Nanos::from_nanos(i64::MAX),
        };
        let p = SelectParams {
            max_drift_ppm: u32::MAX,
            ..SelectParams::default()
        };
        for combine in Combine::ALL {
            let s = select(&[everything, late], &SelectParams { combine, ..p }).unwrap();
            assert_eq!((s.low, s.high), (Nanos::MAX, Nanos::MAX));
            assert_eq!(s.offset, Nanos::MAX);
            assert_eq!(s.verdicts, [Agrees, Selected]);
            let s = select(&[everything], &SelectParams { combine, ..p }).unwrap();
            assert_eq!((s.low, s.high), (Nanos::from_nanos(i64::MIN), Nanos::MAX));
        }
    }

    #[test]
    fn inverse_square_weights_are_exact() {
        assert_eq!(inverse_square_weight(1, 1), 1 << 20);
        assert_eq!(inverse_square_weight(1, 2), 1 << 18);
        assert_eq!(inverse_square_weight(3, 5), (9 << 20) / 25);
        assert_eq!(inverse_square_weight(1, 1 << 10), 1);
        assert_eq!(inverse_square_weight(1, (1 << 10) + 1), 0);
        let max = MAX_WEIGHTED_BOUND as u128;
        assert_eq!(inverse_square_weight(max, max), 1 << 20);
        assert_eq!(inverse_square_weight(max - 1, max), (1 << 20) - 1);
        assert_eq!(inverse_square_weight(1, max), 0);
    }

    #[test]
    fn combine_names_round_trip() {
        for c in Combine::ALL {
            assert_eq!(c.name().parse::<Combine>(), Ok(c));
        }
        assert_eq!(Combine::default(), Combine::WeightedMean);
        let err = "median".parse::<Combine>().unwrap_err();
        assert!(
            err.contains("'median'") && err.contains("weighted-mean"),
            "{err}"
        );
        assert_eq!(
            [Selected, Agrees, Falseticker].map(Verdict::symbol),
            ['*', '+', 'x']
        );
    }

    #[test]
    fn a_sync_estimate_is_a_candidate() {
        let e = Estimate {
            estimator: crate::sync::Estimator::MidMedian,
            offset: Nanos::from_nanos(5),
            low: Nanos::from_nanos(1),
            high: Nanos::from_nanos(9),
            reference: ts(7),
        };
        assert_eq!(Candidate::from(e), cand(7, 5, 1, 9));
    }

    /// Offsets from a few ranges: nanoseconds, seconds, and the extremes.
    fn offset() -> impl Strategy<Value = i64> {
        prop_oneof![
            -1_000i64..1_000,
            -10 * SEC..10 * SEC,
            any::<i64>(),
            Just(i64::MIN),
            Just(i64::MAX),
        ]
    }

    /// Half-widths, from zero to everything.
    fn half_width() -> impl Strategy<Value = i64> {
        prop_oneof![0i64..1_000, 0..100 * MS, 0..i64::MAX, Just(i64::MAX)]
    }

    /// When a candidate was measured: within two seconds, or anywhere.
    fn at() -> impl Strategy<Value = i64> {
        prop_oneof![4 => 0..2 * SEC, 1 => any::<i64>()]
    }

    /// A valid candidate around `centre`, with its offset anywhere inside.
    fn candidate_around(centre: i64) -> impl Strategy<Value = Candidate> {
        (at(), half_width(), half_width(), any::<u64>()).prop_map(move |(at, below, above, pos)| {
            let low = centre.saturating_sub(below);
            let high = centre.saturating_add(above);
            let width = (i128::from(high) - i128::from(low)) as u128;
            let offset = i128::from(low) + (u128::from(pos) % (width + 1)) as i128;
            Candidate {
                at: Timestamp::from_nanos(T0.saturating_add(at)),
                offset: Nanos::from_nanos(offset as i64),
                low: Nanos::from_nanos(low),
                high: Nanos::from_nanos(high),
            }
        })
    }

    /// Candidates around a truth: mostly honest ones (centred on it), and
    /// others centred anywhere.
    fn candidates_and_truth() -> impl Strategy<Value = (i64, Vec<Candidate>)> {
        offset().prop_flat_map(|truth| {
            let one = prop_oneof![
                3 => candidate_around(truth),
                1 => offset().prop_flat_map(candidate_around),
            ];
            (Just(truth), prop::collection::vec(one, 1..=16))
        })
    }

    /// Any parameters.
    fn params() -> impl Strategy<Value = SelectParams> {
        (
            0usize..10,
            prop_oneof![Just(0u32), Just(100), any::<u32>()],
            prop::sample::select(Combine::ALL.to_vec()),
        )
            .prop_map(|(min_agree, max_drift_ppm, combine)| SelectParams {
                min_agree,
                max_drift_ppm,
                combine,
            })
    }

    /// How many candidates hold `truth` once brought to the reference,
    /// computed the long way.
    fn holding(candidates: &[Candidate], truth: i64, ppm: u32) -> usize {
        let valid = candidates.iter().filter(|c| c.is_valid());
        let Some(reference) = valid.clone().map(|c| c.at).max() else {
            return 0;
        };
        valid
            .filter(|c| {
                let by = drift_allowance(reference.diff_i128(c.at), ppm);
                let t = i128::from(truth);
                i128::from(c.low.as_nanos()) - by <= t && t <= i128::from(c.high.as_nanos()) + by
            })
            .count()
    }

    /// A candidate as plain numbers, for comparing without regard to order.
    fn key(c: &Candidate) -> (i64, i64, i64, i64) {
        (
            c.at.as_nanos(),
            c.offset.as_nanos(),
            c.low.as_nanos(),
            c.high.as_nanos(),
        )
    }

    /// Any candidate: three arbitrary numbers, often sorted into a valid
    /// `low ≤ offset ≤ high`.
    fn arbitrary_candidate() -> impl Strategy<Value = Candidate> {
        (any::<[i64; 4]>(), any::<bool>()).prop_map(|([at, a, b, c], sort)| {
            let [offset, low, high] = if sort {
                let mut v = [a, b, c];
                v.sort_unstable();
                [v[1], v[0], v[2]]
            } else {
                [a, b, c]
            };
            Candidate {
                at: Timestamp::from_nanos(at),
                offset: Nanos::from_nanos(offset),
                low: Nanos::from_nanos(low),
                high: Nanos::from_nanos(high),
            }
        })
    }

    /// Candidates from a small pool of values, so that ties and duplicates
    /// are common.
    fn tied_candidate() -> impl Strategy<Value = Candidate> {
        (0i64..3, -4i64..4, 0i64..4, 0i64..4).prop_map(|(at, offset, below, above)| {
            cand(
                at * SEC / 2,
                offset * 10,
                offset * 10 - below * 10,
                offset * 10 + above * 10,
            )
        })
    }

    proptest! {
        #[test]
        fn the_truth_is_inside_whenever_enough_sources_hold_it(
            (truth, candidates) in candidates_and_truth(),
            params in params(),
        ) {
            let needed = (candidates.len() / 2 + 1).max(params.min_agree);
            if holding(&candidates, truth, params.max_drift_ppm) >= needed {
                for combine in Combine::ALL {
                    let s = select(&candidates, &SelectParams { combine, ..params });
                    prop_assert!(s.is_ok(), "{combine}: {s:?}");
                    let s = s.unwrap();
                    prop_assert!(s.contains(Nanos::from_nanos(truth)), "{combine}: {s:?}");
                    prop_assert!(s.agreeing >= needed);
                }
            }
        }

        #[test]
        fn permuting_the_candidates_changes_nothing(
            (candidates, shuffled) in prop_oneof![
                prop::collection::vec(tied_candidate(), 1..=16),
                prop::collection::vec(arbitrary_candidate(), 1..=16),
                candidates_and_truth().prop_map(|(_, c)| c),
            ].prop_flat_map(|c| (Just(c.clone()), Just(c).prop_shuffle())),
            params in params(),
        ) {
            for combine in Combine::ALL {
                let p = SelectParams { combine, ..params };
                match (select(&candidates, &p), select(&shuffled, &p)) {
                    (Ok(a), Ok(b)) => {
                        prop_assert_eq!(
                            (a.reference, a.offset, a.low, a.high, a.agreeing, a.needed),
                            (b.reference, b.offset, b.low, b.high, b.agreeing, b.needed)
                        );
                        let verdicts = |s: &Selection, c: &[Candidate]| {
                            let mut v: Vec<_> = c.iter().map(key).zip(s.verdicts.iter().map(|v| v.symbol())).collect();
                            v.sort_unstable();
                            v
                        };
                        prop_assert_eq!(verdicts(&a, &candidates), verdicts(&b, &shuffled));
                    }
                    (
                        Err(SelectError::NoMajority { needed: na, largest: la, groups: ga }),
                        Err(SelectError::NoMajority { needed: nb, largest: lb, groups: gb }),
                    ) => {
                        prop_assert_eq!((na, la), (nb, lb));
                        let members = |groups: &[Vec<usize>], c: &[Candidate]| {
                            let mut g: Vec<Vec<_>> = groups
                                .iter()
                                .map(|g| {
                                    let mut m: Vec<_> = g.iter().map(|&i| key(&c[i])).collect();
                                    m.sort_unstable();
                                    m
                                })
                                .collect();
                            g.sort_unstable();
                            g
                        };
                        prop_assert_eq!(members(&ga, &candidates), members(&gb, &shuffled));
                    }
                    (a, b) => prop_assert!(false, "{combine}: {a:?} but shuffled {b:?}"),
                }
            }
        }

        #[test]
        fn arbitrary_inputs_never_panic_and_the_estimate_lies_inside(
            candidates in prop::collection::vec(arbitrary_candidate(), 0..=16),
            params in params(),
        ) {
            let n = candidates.len();
            match select(&candidates, &params) {
                Ok(s) => {
                    prop_assert!(s.low <= s.offset && s.offset <= s.high, "{s:?}");
                    prop_assert_eq!(s.needed, (n / 2 + 1).max(params.min_agree));
                    prop_assert_eq!(s.verdicts.len(), n);
                    prop_assert_eq!(s.verdicts.iter().filter(|v| **v == Selected).count(), 1);
                    let agreeing = s.verdicts.iter().filter(|v| **v != Falseticker).count();
                    prop_assert_eq!(agreeing, s.agreeing);
                    prop_assert!(s.agreeing >= s.needed);
                    for (c, v) in candidates.iter().zip(&s.verdicts) {
                        prop_assert!(c.is_valid() || *v == Falseticker);
                    }
                    let worst = s.offset.as_nanos().abs_diff(s.low.as_nanos())
                        .max(s.offset.as_nanos().abs_diff(s.high.as_nanos()));
                    prop_assert_eq!(s.bound().as_nanos() as u64, worst.min(i64::MAX as u64));
                }
                Err(SelectError::NoCandidates) => prop_assert_eq!(n, 0),
                Err(SelectError::NoMajority { needed, largest, groups }) => {
                    prop_assert!(n > 0);
                    prop_assert!(largest < needed);
                    prop_assert_eq!(largest, groups.first().map_or(0, Vec::len));
                    for pair in groups.windows(2) {
                        prop_assert!(pair[0].len() >= pair[1].len());
                    }
                }
            }
        }

        #[test]
        fn groups_are_the_maximal_agreeing_sets(
            intervals in prop::collection::vec((-20i64..20, 0i64..10), 1..=12),
        ) {
            let candidates: Vec<_> = intervals
                .iter()
                .map(|&(low, len)| cand(0, low, low, low + len))
                .collect();
            let params = SelectParams { min_agree: candidates.len() + 1, ..SelectParams::default() };
            let Err(SelectError::NoMajority { groups, .. }) = select(&candidates, &params) else {
                panic!("more than all cannot agree");
            };
            // The long way: the set covering each lower end, the maximal
            // ones, without repeats.
            let covering: Vec<Vec<usize>> = candidates
                .iter()
                .map(|c| {
                    (0..candidates.len())
                        .filter(|&i| candidates[i].low <= c.low && c.low <= candidates[i].high)
                        .collect()
                })
                .collect();
            let is_subset = |a: &[usize], b: &[usize]| a.iter().all(|i| b.contains(i));
            let mut expected: Vec<Vec<usize>> = Vec::new();
            for g in &covering {
                let contained = covering.iter().any(|h| h.len() > g.len() && is_subset(g, h));
                if !contained && !expected.contains(g) {
                    expected.push(g.clone());
                }
            }
            expected.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
            prop_assert_eq!(groups, expected);
        }
    }
}
