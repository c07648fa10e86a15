//! Several sources at once: ask them all concurrently, keep the ones that
//! agree, and combine them into one honest answer (the rules are
//! [`crate::select`]'s).
//!
//! ```text
//!  Ensemble ──sync()──▶ every Source::sync, concurrently ──▶ a SyncReport (or why not) each
//!                                                           │
//!                      select::select over their intervals ─┴─▶ Round: a status per source,
//!                                                                the combined offset ± bound
//! ```
//!
//! A round takes as long as the slowest source, not the sum. A source that
//! does not answer (or refuses, or says its clock is unsynchronised) takes
//! no part in the selection; a majority of those that answered must agree,
//! and `min_agree` raises that floor.

use crate::clock::Clock;
use crate::filter::{self, Filter, FilterConfig};
use crate::select::{self, Candidate, SelectError, SelectParams, Selection, Verdict};
use crate::source::spec::{POOL_MAX, Resolve, SystemResolver};
use crate::source::{Source, SourceOptions, SourceSpec, SyncError, SyncOptions, SyncReport};
use crate::time::{Nanos, Timestamp};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most sources an ensemble asks.
pub const MAX_SOURCES: usize = 16;

/// Why an ensemble could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum EnsembleError {
    /// No source was given.
    #[error("no time source given")]
    Empty,
    /// More than [`MAX_SOURCES`].
    #[error("too many time sources ({0}); at most {MAX_SOURCES}")]
    TooMany(usize),
    /// A source does not resolve.
    #[error(transparent)]
    Address(#[from] crate::source::AddressError),
    /// A source's socket could not be opened.
    #[error("cannot open a socket toward {0}: {1}")]
    Open(String, std::io::Error),
}

/// One member of an ensemble: a source, and the pool it came from.
pub struct Member {
    /// The source.
    pub source: Source,
    /// The `pool:` spec this address came from, if any.
    pub pool: Option<SourceSpec>,
}

impl Member {
    /// How reports name it: the source, and its pool if it has one.
    pub fn name(&self) -> String {
        match &self.pool {
            Some(pool) => format!("{} ({pool})", self.source.name()),
            None => self.source.name(),
        }
    }
}

/// Several sources, asked together.
pub struct Ensemble {
    members: Vec<Member>,
    params: SelectParams,
}

/// How one source fared in a round, for people and programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// The best of those that agree (chrony's `*`).
    Selected,
    /// Agrees with the majority, and is combined with it (chrony's `+`).
    Agrees,
    /// Answered, but its interval misses what the majority allows.
    Falseticker,
    /// Answered, but no majority formed; the number is its group (1 is
    /// the largest) among those that agree with each other.
    NoMajority(usize),
    /// Did not answer.
    NoAnswer,
    /// Asked us to slow down (Kiss-o'-Death RATE).
    RateLimited,
    /// Denied us (Kiss-o'-Death DENY or RSTR): no longer asked.
    Denied,
    /// Says its clock is not synchronised.
    Unsynchronized,
    /// The connection (or its TLS handshake) failed.
    ConnectFailed,
    /// The connection showed its bytes were altered: nothing from it used.
    Tampered,
    /// Answered with exchanges that contradict each other.
    Inconsistent,
}

impl Status {
    /// The name in JSON (`selected`, `falseticker`, `no_answer`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Status::Selected => "selected",
            Status::Agrees => "agrees",
            Status::Falseticker => "falseticker",
            Status::NoMajority(_) => "no_majority",
            Status::NoAnswer => "no_answer",
            Status::RateLimited => "rate_limited",
            Status::Denied => "denied",
            Status::Unsynchronized => "unsynchronized",
            Status::ConnectFailed => "connect_failed",
            Status::Tampered => "tampered",
            Status::Inconsistent => "inconsistent",
        }
    }

    /// Whether the source answered with a usable estimate.
    pub fn answered(self) -> bool {
        matches!(
            self,
            Status::Selected | Status::Agrees | Status::Falseticker | Status::NoMajority(_)
        )
    }

    fn of_error(e: &SyncError) -> Status {
        match (e, e.kiss()) {
            (_, Some(k)) if k.stops() => Status::Denied,
            (_, Some(_)) => Status::RateLimited,
            (SyncError::Connect { .. }, None) => Status::ConnectFailed,
            (SyncError::Tampered { .. }, None) => Status::Tampered,
            (SyncError::Estimate { .. }, None) => Status::Inconsistent,
            (SyncError::NoAnswer(_), None) if e.unsynchronized() => Status::Unsynchronized,
            (SyncError::NoAnswer(_), None) => Status::NoAnswer,
        }
    }
}

impl fmt::Display for Status {
    /// For people: `selected`, `falseticker`, `no majority (group 2)`, ...
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::NoMajority(g) => write!(f, "no majority (group {g})"),
            other => f.write_str(&other.name().replace('_', " ")),
        }
    }
}

/// The combined answer of a round: the offset, and the interval that holds
/// the truth whenever at least `needed` of the sources are honest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Combined {
    /// The local time the offset refers to.
    pub reference: Timestamp,
    /// The combined offset, server time minus local.
    pub offset: Nanos,
    /// The least offset the majority allows.
    pub low: Nanos,
    /// The greatest offset the majority allows.
    pub high: Nanos,
    /// Sources that agree.
    pub agreeing: usize,
    /// Sources that had to agree.
    pub needed: usize,
    /// Sources that answered.
    pub answered: usize,
}

impl Combined {
    /// The farthest the truth can be from `offset`.
    pub fn bound(&self) -> Nanos {
        Nanos::from_nanos(
            (self.offset.as_nanos().abs_diff(self.low.as_nanos()))
                .max(self.offset.as_nanos().abs_diff(self.high.as_nanos()))
                .min(i64::MAX as u64) as i64,
        )
    }

    /// Whether `offset` lies in the interval.
    pub fn contains(&self, offset: Nanos) -> bool {
        self.low <= offset && offset <= self.high
    }

    /// What the local clock should have read at `reference`.
    pub fn synchronized_time(&self) -> Timestamp {
        self.reference.saturating_add(self.offset)
    }
}

/// One round: every source's sync, and what they say together.
pub struct Round {
    /// Each source's result, in the ensemble's order.
    pub results: Vec<Result<SyncReport, SyncError>>,
    /// The selection over the sources that answered.
    pub selection: Result<Selection, SelectError>,
    /// For each source, its index among the candidates (if it answered).
    candidate_of: Vec<Option<usize>>,
    /// For each source, what its filter says (when the round was filtered).
    filtered: Vec<Option<filter::Estimate>>,
    /// Wall time of the round.
    pub elapsed: Duration,
}

impl Round {
    /// How source `i` fared.
    pub fn status(&self, i: usize) -> Status {
        let result = &self.results[i];
        let Some(c) = self.candidate_of[i] else {
            return match result {
                Err(e) => Status::of_error(e),
                Ok(_) => Status::Inconsistent,
            };
        };
        match &self.selection {
            Ok(sel) => match sel.verdicts[c] {
                Verdict::Selected => Status::Selected,
                Verdict::Agrees => Status::Agrees,
                Verdict::Falseticker => Status::Falseticker,
            },
            Err(SelectError::NoMajority { groups, .. }) => groups
                .iter()
                .position(|g| g.contains(&c))
                .map_or(Status::Falseticker, |g| Status::NoMajority(g + 1)),
            Err(SelectError::NoCandidates) => Status::NoAnswer,
        }
    }

    /// The combined answer, when a majority agreed.
    pub fn combined(&self) -> Option<Combined> {
        let sel = self.selection.as_ref().ok()?;
        Some(Combined {
            reference: sel.reference,
            offset: sel.offset,
            low: sel.low,
            high: sel.high,
            agreeing: sel.agreeing,
            needed: sel.needed,
            answered: self.answered(),
        })
    }

    /// What source `i`'s filter says, when the round went through
    /// [`Filters::apply`].
    pub fn filtered(&self, i: usize) -> Option<&filter::Estimate> {
        self.filtered.get(i)?.as_ref()
    }

    /// The filter's view of the round: that of the selected source (or the
    /// only one).
    pub fn selected_filter(&self) -> Option<&filter::Estimate> {
        (0..self.results.len())
            .find(|&i| self.status(i) == Status::Selected)
            .and_then(|i| self.filtered(i))
    }

    /// How many sources answered with an estimate.
    pub fn answered(&self) -> usize {
        self.candidate_of.iter().filter(|c| c.is_some()).count()
    }

    /// Why there is no combined answer, in one line; `names` names the
    /// sources (in the ensemble's order).
    pub fn failure(&self, names: &[String]) -> Option<String> {
        match &self.selection {
            Ok(_) => None,
            Err(SelectError::NoCandidates) => Some(match self.results.as_slice() {
                [Err(e)] => e.to_string(),
                _ => format!("none of the {} sources answered", self.results.len()),
            }),
            Err(SelectError::NoMajority {
                needed,
                largest,
                groups,
            }) => {
                let index_of = |c: usize| self.candidate_of.iter().position(|&x| x == Some(c));
                let described: Vec<String> = groups
                    .iter()
                    .map(|g| {
                        let members: Vec<&str> = g
                            .iter()
                            .filter_map(|&c| index_of(c))
                            .map(|i| names.get(i).map_or("?", String::as_str))
                            .collect();
                        let offset = g
                            .first()
                            .and_then(|&c| index_of(c))
                            .and_then(|i| self.results[i].as_ref().ok())
                            .map(|r| format!("{:+}", r.estimate.offset))
                            .unwrap_or_default();
                        format!("{{{}}} near {offset}", members.join(", "))
                    })
                    .collect();
                Some(format!(
                    "the sources disagree: {needed} of the {} that answered must agree, at most {largest} do: {}",
                    self.answered(),
                    described.join(" against ")
                ))
            }
        }
    }
}

impl Ensemble {
    /// Resolves and opens every source (`pool:` ones become one source per
    /// address, at most [`POOL_MAX`] each), at most [`MAX_SOURCES`] in all,
    /// with the system's resolver.
    pub async fn open(
        specs: &[SourceSpec],
        clock: Arc<dyn Clock>,
        options: SourceOptions,
        params: SelectParams,
    ) -> Result<Ensemble, EnsembleError> {
        Self::open_with(specs, clock, options, params, &SystemResolver).await
    }

    /// Like [`open`](Self::open), with another resolver.
    pub async fn open_with(
        specs: &[SourceSpec],
        clock: Arc<dyn Clock>,
        options: SourceOptions,
        params: SelectParams,
        resolver: &dyn Resolve,
    ) -> Result<Ensemble, EnsembleError> {
        if specs.is_empty() {
            return Err(EnsembleError::Empty);
        }
        if specs.len() > MAX_SOURCES {
            return Err(EnsembleError::TooMany(specs.len()));
        }
        let mut wanted: Vec<(SourceSpec, SocketAddr, Option<SourceSpec>)> = Vec::new();
        for spec in specs {
            let addrs = spec.resolve_all_with(resolver).await?;
            if spec.pool {
                for addr in addrs.into_iter().take(POOL_MAX) {
                    wanted.push((SourceSpec::new(spec.wire, addr), addr, Some(spec.clone())));
                }
            } else {
                wanted.push((spec.clone(), addrs[0], None));
            }
        }
        // The same server over the same wire, named twice (or found in a
        // pool and named too), is one source: two votes from one clock
        // would fake agreement.
        let mut seen = std::collections::HashSet::new();
        wanted.retain(|(spec, addr, _)| seen.insert((spec.wire, *addr)));
        // Pools fill what explicit sources leave, up to the limit.
        wanted.truncate(MAX_SOURCES);
        let mut members = Vec::with_capacity(wanted.len());
        for (spec, addr, pool) in wanted {
            let name = spec.to_string();
            let source = Source::open(spec, addr, clock.clone(), options.clone())
                .await
                .map_err(|e| EnsembleError::Open(name, e))?;
            members.push(Member { source, pool });
        }
        Ok(Ensemble { members, params })
    }

    /// The members, in order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The members' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.members.iter().map(Member::name).collect()
    }

    /// How the sources are selected and combined.
    pub fn params(&self) -> &SelectParams {
        &self.params
    }

    /// Syncs with every source at once and selects.
    pub async fn sync(&self, options: &SyncOptions) -> Round {
        let started = Instant::now();
        let results =
            futures::future::join_all(self.members.iter().map(|m| m.source.sync(options))).await;
        self.select(results, started.elapsed())
    }

    /// The selection over results already in hand (one per member), each
    /// answering source a candidate with its burst's estimate.
    pub fn select(&self, results: Vec<Result<SyncReport, SyncError>>, elapsed: Duration) -> Round {
        let candidates = results
            .iter()
            .map(|r| {
                r.as_ref()
                    .ok()
                    .map(|report| Candidate::from(report.estimate))
            })
            .collect();
        self.select_candidates(results, candidates, Vec::new(), elapsed)
    }

    fn select_candidates(
        &self,
        results: Vec<Result<SyncReport, SyncError>>,
        per_source: Vec<Option<Candidate>>,
        filtered: Vec<Option<filter::Estimate>>,
        elapsed: Duration,
    ) -> Round {
        let mut candidates = Vec::new();
        let candidate_of = per_source
            .into_iter()
            .map(|c| {
                c.map(|c| {
                    candidates.push(c);
                    candidates.len() - 1
                })
            })
            .collect();
        let selection = select::select(&candidates, &self.params);
        Round {
            results,
            selection,
            candidate_of,
            filtered,
            elapsed,
        }
    }
}

/// A filter per source of an ensemble: the history a daemon keeps (see
/// [`crate::filter`]).
pub struct Filters {
    filters: Vec<Filter>,
}

impl Filters {
    /// An empty filter for each of `ensemble`'s sources.
    pub fn new(ensemble: &Ensemble, config: FilterConfig) -> Self {
        Filters {
            filters: (0..ensemble.members().len())
                .map(|_| Filter::new(config))
                .collect(),
        }
    }

    /// Feeds each answering source's samples (made while the clock's total
    /// correction was `correction`: see [`crate::discipline::Discipline::correction`])
    /// to its filter, and selects over what the filters say: the round,
    /// again, better informed.
    pub fn apply(&mut self, ensemble: &Ensemble, round: Round, correction: Nanos) -> Round {
        let filtered: Vec<Option<filter::Estimate>> = round
            .results
            .iter()
            .zip(&mut self.filters)
            .map(|(r, f)| {
                r.as_ref()
                    .ok()
                    .and_then(|report| f.update(&report.samples, correction))
            })
            .collect();
        let candidates = filtered
            .iter()
            .map(|e| {
                e.map(|e| Candidate {
                    at: e.reference,
                    offset: e.offset,
                    low: e.low,
                    high: e.high,
                })
            })
            .collect();
        ensemble.select_candidates(round.results, candidates, filtered, round.elapsed)
    }
}
