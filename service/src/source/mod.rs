//! Sources: one server over one wire, and the sync that gets samples from
//! it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use service::source::{Source, SyncOptions};
//!
//! let source = Source::connect("ntp://127.0.0.1:12300".parse()?).await?;
//! let report = source.sync(&SyncOptions::default()).await?;
//! println!("offset {} ± {}", report.estimate.offset, report.estimate.bound());
//! # Ok(())
//! # }
//! ```
//!
//! ```text
//!  Source ──sync()──▶ probes with retries ──▶ Samples ──▶ sync::estimate ──▶ SyncReport
//!    │
//!    └─ Exchanger (one per wire): one probe, one now(), typed errors
//!         cerv: the tarpc service over UDP      ntp: NTP client mode
//!         tcp, tls: the tarpc service over a connection opened per sync
//! ```
//!
//! Every wire yields the same [`Sample`] (its interval widened by the
//! server's root distance, for NTP), so the estimators, the reports,
//! `--watch`, the discipline and [`crate::synced::SyncedClock`] never learn
//! which wire a sample came over.
//!
//! [`Source::sync`] runs the flow of the design: `probes` exchanges, the
//! mean one-way delay, then `now()`, and the estimate. Each call has a
//! time budget (`timeout`); a request that gets no answer is sent again
//! within that budget, up to `retries` more times: first after four round
//! trips (25 ms before any round trip is known), then after twice as long
//! each time. A lost datagram costs milliseconds, not the whole timeout.
//! A probe whose budget runs out is skipped and counted as lost.
//!
//! A server that says no is obeyed: a Kiss-o'-Death RATE ends the sync
//! with what it has (and `--watch` waits longer), DENY or RSTR stops the
//! source for good, and a server that says its clock is unsynchronised is
//! not used.

mod cerv;
mod ntp;
mod nts;
pub use nts::key_exchange as nts_key_exchange;
pub mod spec;
mod stream;

pub use spec::{AddressError, SourceSpec, Wire};

use crate::auth::Key;
use crate::clock::{Clock, SystemClock};
use crate::ntp::{Kiss, ServerState};
use crate::sync::{
    self, Estimate, EstimateError, Estimator, NowExchange, Sample, SampleError, SyncParams,
};
use crate::time::{Nanos, Timestamp};
use crate::transport::client::ClientStats;
use crate::transport::socket::Stamping;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a sync is run.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// Probe exchanges to make (the `now()` call comes on top).
    pub probes: u32,
    /// Time budget of each call, retries included.
    pub timeout: Duration,
    /// Extra sends of a request that got no answer, within its budget.
    pub retries: u32,
    /// The estimator whose answer is reported as *the* offset.
    pub estimator: Estimator,
    /// What the math may assume.
    pub params: SyncParams,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            probes: 5,
            timeout: Duration::from_millis(500),
            retries: 3,
            estimator: Estimator::MidMedian,
            params: SyncParams::default(),
        }
    }
}

impl SyncOptions {
    /// The longest a sync can take: every probe and the `now()` call use
    /// their whole budget.
    pub fn max_duration(&self) -> Duration {
        self.timeout * (self.probes + 1)
    }
}

/// How a source's connection works.
#[derive(Clone, Debug, Default)]
pub struct SourceOptions {
    /// Where receive timestamps (ts4) come from.
    pub stamping: Stamping,
    /// With a key (cerv wire only), every request is tagged with it and
    /// only replies tagged with it, bound to their request, are accepted.
    pub key: Option<Key>,
    /// log2 of the interval between syncs, in seconds, as NTP requests
    /// announce it (servers may use it to judge a client's rate).
    pub poll: i8,
    /// TLS client configuration (trust roots) for `tls://` sources; the
    /// system's roots when `None`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The same for the NTS key exchange of `nts://` sources (TLS 1.3,
    /// ALPN `ntske/1`: see [`crate::tls::client_config`]).
    pub nts_tls: Option<Arc<rustls::ClientConfig>>,
}

/// `d` ± 10 %, at random: the wait between periodic syncs, spread so that
/// many clients started together do not all ask at once.
pub fn spread(d: Duration) -> Duration {
    d.mul_f64(0.9 + 0.2 * rand::random::<f64>())
}

/// The first retry of the first call, before any round trip is known.
/// Shorter than most round trips across the internet, so such a path may
/// see a needless retry or two (harmless: the first answer to any of them
/// is used); far longer than any on a LAN.
pub const FIRST_RETRY: Duration = Duration::from_millis(25);

/// Consecutive unanswered probes, from a server that has not answered once,
/// after which a sync gives up: a dead server is reported within
/// `GIVE_UP_AFTER × timeout` rather than `(probes + 1) × timeout`.
pub const GIVE_UP_AFTER: u32 = 2;

/// One answered probe: the sample, and what the server said of its own
/// clock (NTP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The exchange, its interval widened by the server's root distance.
    pub sample: Sample,
    /// The server's account of its clock, when the wire carries one.
    pub server: Option<ServerState>,
}

/// Why one call (one request) gave no sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// No answer within the time allowed.
    Lost,
    /// An answer whose timestamps contradict each other.
    Rejected(SampleError),
    /// The server refused the call (busy, over a limit).
    Busy(String),
    /// A Kiss-o'-Death (NTP).
    Kiss(Kiss),
    /// The server says its clock is not synchronised (NTP leap 3 or
    /// stratum 16).
    Unsynchronized {
        /// Leap indicator bits.
        leap: u8,
        /// Stratum.
        stratum: u8,
    },
    /// The local end failed (the socket, the connection).
    Failed(String),
    /// An NTS NAK: the server could not open our cookie (it restarted, or
    /// rotated its keys past ours); a new key exchange is needed.
    NtsNak,
    /// The connection shows that its bytes were altered on the way (a TLS
    /// record failed its integrity check): nothing from it is trusted.
    Tampered(String),
}

/// A boxed call of an [`Exchanger`].
pub type CallFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, CallError>> + Send + 'a>>;

/// What a wire must do for a [`Source`]: one exchange at a time, no
/// retries (the source retries), typed errors. Implementations own their
/// sockets, stamp ts1 just before sending and ts4 on arrival (the
/// kernel's stamp where there is one), and check every reply against the
/// request it claims to answer.
pub trait Exchanger: Send + Sync {
    /// One probe exchange: one request, answered within `timeout`.
    fn probe(&self, timeout: Duration) -> CallFuture<'_, Probe>;
    /// The server's clock once, as the classic flow's `now()` asks.
    fn now(&self, timeout: Duration) -> CallFuture<'_, NowExchange>;
}

/// The result of a sync: the measurements and what they say.
#[derive(Clone, Debug)]
pub struct SyncReport {
    /// The server asked.
    pub server: SocketAddr,
    /// The wire it was asked over.
    pub wire: Wire,
    /// The probe exchanges used, in the order made.
    pub samples: Vec<Sample>,
    /// Requests sent that got no answer in time.
    pub lost: u32,
    /// Answers that did not make a valid sample (inconsistent timestamps).
    pub rejected: u32,
    /// The `now()` exchange, if it was answered.
    pub now: Option<NowExchange>,
    /// Mean one-way delay of the samples: the seeds' figure.
    pub mean_delay: Nanos,
    /// The smallest round trip among the samples.
    pub min_rtt: Nanos,
    /// What the server last said of its own clock (NTP).
    pub server_state: Option<ServerState>,
    /// The answer of the chosen estimator.
    pub estimate: Estimate,
    /// The answers of every estimator that could run, for comparison.
    pub estimates: Vec<Estimate>,
    /// What the estimate assumed (the minimum transfer time, the drift).
    pub params: SyncParams,
    /// Wall time the sync took.
    pub elapsed: Duration,
}

impl SyncReport {
    /// The local clock reading the offset refers to.
    pub fn local_time(&self) -> Timestamp {
        self.estimate.reference
    }

    /// The seeds' flow: the server's `now()` answer plus the mean one-way
    /// delay.
    pub fn flow_time(&self) -> Option<Timestamp> {
        self.now
            .map(|n| n.server_time.saturating_add(self.mean_delay))
    }

    /// What the local clock should have read at [`local_time`](Self::local_time):
    /// the time a `--set` steps to.
    pub fn synchronized_time(&self) -> Timestamp {
        self.local_time().saturating_add(self.estimate.offset)
    }

    /// The answer of one estimator, if it could run.
    pub fn estimate_of(&self, estimator: Estimator) -> Option<&Estimate> {
        self.estimates.iter().find(|e| e.estimator == estimator)
    }

    /// Cristian's flow on the `now()` exchange, as the TCP design states
    /// it: the client's time is the server's time plus half the round
    /// trip, within `±(rtt/2 − min)`, where `min` is the least transfer
    /// time (`--min-transfer`). Returns (the synchronised time, at the
    /// local time the answer arrived; the error).
    pub fn cristian(&self) -> Option<(Timestamp, Nanos)> {
        let now = self.now?;
        let half = Nanos::from_nanos(now.rtt().as_nanos() / 2);
        let error = half
            .saturating_sub(self.params.min_transfer)
            .max(Nanos::ZERO);
        Some((now.server_time.saturating_add(half), error))
    }
}

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The server never gave a usable answer.
    #[error("{0}")]
    NoAnswer(NoAnswer),
    /// The connection (or its TLS handshake) could not be made.
    #[error("cannot connect to {source_name}: {reason}")]
    Connect {
        /// The source, as reports name it.
        source_name: String,
        /// What failed, in words.
        reason: String,
    },
    /// The connection's bytes were altered on the way (TLS saw it): the
    /// samples it carried, however many, are not used.
    #[error("{source_name}: {reason}; nothing from this connection was used")]
    Tampered {
        /// The source, as reports name it.
        source_name: String,
        /// What showed it, in words.
        reason: String,
    },
    /// Answers came, but no estimate could be made from them.
    #[error("cannot estimate the offset from {server}: {source}")]
    Estimate {
        /// The server asked.
        server: SocketAddr,
        /// What went wrong.
        #[source]
        source: EstimateError,
    },
}

impl SyncError {
    /// The Kiss-o'-Death that ended the sync, if one did.
    pub fn kiss(&self) -> Option<Kiss> {
        match self {
            SyncError::NoAnswer(n) => n.kiss,
            SyncError::Estimate { .. } | SyncError::Connect { .. } | SyncError::Tampered { .. } => {
                None
            }
        }
    }

    /// Whether the server said its clock is not synchronised.
    pub fn unsynchronized(&self) -> bool {
        matches!(self, SyncError::NoAnswer(n) if n.unsynchronized.is_some())
    }
}

/// The details of a server that did not answer, for a useful message.
#[derive(Debug, Clone)]
pub struct NoAnswer {
    /// The server asked.
    pub server: SocketAddr,
    /// The wire.
    pub wire: Wire,
    /// Requests sent.
    pub sent: u64,
    /// How long we tried.
    pub elapsed: Duration,
    /// ICMP "port unreachable" seen.
    pub refused: u64,
    /// ICMP "host/network unreachable" seen.
    pub unreachable: u64,
    /// Replies that were not valid replies of this protocol.
    pub malformed: u64,
    /// Replies that matched no request.
    pub unmatched: u64,
    /// Answers that were errors from the server (busy, refused).
    pub server_errors: u64,
    /// Answers that did not make valid samples.
    pub rejected: u32,
    /// Replies whose authentication failed.
    pub auth_failed: u64,
    /// The key the requests were tagged with, if any.
    pub key_id: Option<u32>,
    /// Set when the local end itself failed.
    pub transport_failed: Option<String>,
    /// The Kiss-o'-Death the server sent, if it sent one.
    pub kiss: Option<Kiss>,
    /// The server said its clock is unsynchronised: (leap, stratum).
    pub unsynchronized: Option<(u8, u8)>,
    /// The server sent an NTS NAK.
    pub nts_nak: bool,
}

impl fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.wire {
            Wire::Cerv => self.server.to_string(),
            wire => format!("{wire}://{}", self.server),
        };
        write!(
            f,
            "no answer from {name} ({} request{} in {:.1}s)",
            self.sent,
            if self.sent == 1 { "" } else { "s" },
            self.elapsed.as_secs_f64()
        )?;
        let hint = if self.nts_nak {
            "NTS NAK: the server could not open our cookie, even after a new key exchange"
                .to_string()
        } else if let Some(why) = &self.transport_failed {
            why.clone()
        } else if let Some(kiss) = self.kiss {
            kiss.to_string()
        } else if let Some((leap, stratum)) = self.unsynchronized {
            format!(
                "the server says its clock is not synchronised (leap {leap}, stratum {stratum}); not used"
            )
        } else if self.refused > 0 {
            "connection refused: nothing is listening there".to_string()
        } else if self.unreachable > 0 {
            "host or network unreachable".to_string()
        } else if self.auth_failed > 0 {
            format!(
                "{} replies failed authentication: the server does not hold the same key{}",
                self.auth_failed,
                self.key_id
                    .map_or(String::new(), |id| format!(" (id {id})"))
            )
        } else if self.malformed > 0 {
            let expected = match self.wire {
                Wire::Cerv | Wire::Tcp | Wire::Tls => "is this a cerv server?",
                Wire::Ntp | Wire::Nts => "is this an NTP server?",
            };
            format!("{} malformed replies: {expected}", self.malformed)
        } else if self.unmatched > 0 {
            format!("{} replies matched no request", self.unmatched)
        } else if self.server_errors > 0 {
            format!("the server refused {} requests (busy?)", self.server_errors)
        } else if self.rejected > 0 {
            format!("{} replies had inconsistent timestamps", self.rejected)
        } else if let Some(id) = self.key_id {
            format!(
                "every request timed out; authentication may have failed: does the server hold key {id}, and require keys?"
            )
        } else {
            "every request timed out".to_string()
        };
        write!(f, ": {hint}")
    }
}

/// How a source reaches its server.
enum Link {
    /// Datagrams: one exchanger for the source's life.
    Datagram(Arc<dyn Exchanger>),
    /// A connection per sync.
    Stream(stream::StreamLink),
    /// NTS: a key exchange when needed, then datagrams.
    Nts(nts::NtsLink),
}

/// One time server over one wire.
pub struct Source {
    spec: SourceSpec,
    server: SocketAddr,
    clock: Arc<dyn Clock>,
    link: Link,
    stats: Arc<ClientStats>,
    key_id: Option<u32>,
    /// A DENY or RSTR from the server: asked no more.
    stopped: Mutex<Option<Kiss>>,
}

/// How one call (with its retries) ended.
enum CallOutcome<T> {
    Answered(T),
    Refused(CallError),
    Lost,
}

impl Source {
    /// Resolves `spec` and opens it, stamping with the system clock. Must
    /// run inside a Tokio runtime.
    pub async fn connect(spec: SourceSpec) -> Result<Source, ConnectError> {
        let server = spec.resolve().await?;
        Ok(Source::open(
            spec,
            server,
            Arc::new(SystemClock),
            SourceOptions::default(),
        )
        .await?)
    }

    /// Opens a source to `server` (one address `spec` resolves to),
    /// reading `clock`. Must run inside a Tokio runtime (the wires spawn
    /// their receive tasks on it).
    pub async fn open(
        spec: SourceSpec,
        server: SocketAddr,
        clock: Arc<dyn Clock>,
        options: SourceOptions,
    ) -> io::Result<Source> {
        let key_id = options.key.as_ref().map(Key::id);
        let stats = Arc::new(ClientStats::default());
        let link = match spec.wire {
            Wire::Cerv => Link::Datagram(Arc::new(
                cerv::CervExchanger::open_udp(server, clock.clone(), &options, stats.clone())
                    .await?,
            )),
            Wire::Ntp => Link::Datagram(Arc::new(
                ntp::NtpExchanger::open(server, clock.clone(), &options, stats.clone(), None)
                    .await?,
            )),
            Wire::Nts => Link::Nts(nts::NtsLink::new(
                server,
                &spec.host,
                clock.clone(),
                options,
                stats.clone(),
            )?),
            Wire::Tcp | Wire::Tls => Link::Stream(stream::StreamLink::new(
                spec.wire,
                server,
                &spec.host,
                clock.clone(),
                options,
                stats.clone(),
            )?),
        };
        Ok(Source {
            spec,
            server,
            clock,
            link,
            stats,
            key_id,
            stopped: Mutex::new(None),
        })
    }

    /// The cerv wire to `server`, with another clock (a shorthand for
    /// tests and examples).
    pub async fn cerv(server: SocketAddr, clock: Arc<dyn Clock>) -> io::Result<Source> {
        let spec = SourceSpec::new(Wire::Cerv, server);
        Source::open(spec, server, clock, SourceOptions::default()).await
    }

    /// The source as written.
    pub fn spec(&self) -> &SourceSpec {
        &self.spec
    }

    /// The server's address.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The wire.
    pub fn wire(&self) -> Wire {
        self.spec.wire
    }

    /// The source as written, with its port: `ntp://127.0.0.1:123`,
    /// `tls://localhost:8443` (cerv's UDP wire without a scheme). How
    /// reports and errors name it.
    pub fn name(&self) -> String {
        self.spec.to_string()
    }

    /// The wire's counters (over every connection, for stream wires).
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// The Kiss-o'-Death that stopped this source (DENY, RSTR), if one did.
    pub fn stopped_by(&self) -> Option<Kiss> {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `attempt` until one answers, sending it again after `interval`,
    /// then twice that, and so on (at most `retries` more times), while
    /// earlier ones stay in flight, all within `budget`. Returns the outcome
    /// and the number of sends left unanswered.
    async fn call_with_retries<T, F, Fut>(
        &self,
        budget: Duration,
        retries: u32,
        interval: Duration,
        attempt: F,
    ) -> (CallOutcome<T>, u32)
    where
        F: Fn(Duration) -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let deadline = tokio::time::Instant::now() + budget;
        let mut in_flight = FuturesUnordered::new();
        let mut sent = 0u32;
        let mut next_send = tokio::time::Instant::now();
        let mut interval = interval;
        let mut busy: Option<CallError> = None;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            if sent <= retries && now >= next_send {
                in_flight.push(attempt(deadline - now));
                sent += 1;
                next_send = now + interval;
                interval = interval.saturating_mul(2);
            }
            let wake = if sent <= retries {
                next_send.min(deadline)
            } else {
                deadline
            };
            tokio::select! {
                Some(result) = in_flight.next() => match result {
                    Ok(value) => return (CallOutcome::Answered(value), sent - 1),
                    Err(CallError::Lost) => {}
                    Err(e @ CallError::Busy(_)) => {
                        tracing::debug!(server = %self.server, error = ?e, "server refused a request");
                        busy = Some(e);
                        // An answer: no point waiting for this one, try again.
                        next_send = tokio::time::Instant::now();
                    }
                    // A rejected sample, a kiss, an unsynchronised server or
                    // a local failure: asking again will not change it.
                    Err(e) => return (CallOutcome::Refused(e), sent - 1),
                },
                () = tokio::time::sleep_until(wake) => {}
            }
        }
        match busy {
            Some(e) => (CallOutcome::Refused(e), sent - 1),
            None => (CallOutcome::Lost, sent),
        }
    }

    /// The wait before the first retry (later ones double it): four of the
    /// longest round trips seen so far (at least 2 ms), or
    /// [`FIRST_RETRY`] before any is known. A retry that turns out
    /// needless costs one small datagram; a late one costs the time.
    fn retry_interval(options: &SyncOptions, samples: &[Sample]) -> Duration {
        let cap = options.timeout / 2;
        match samples.iter().map(|s| s.ts4().diff_i128(s.ts1())).max() {
            Some(rtt) => {
                let rtt = Duration::from_nanos(u64::try_from(rtt).unwrap_or(u64::MAX));
                (rtt * 4).max(Duration::from_millis(2)).min(cap)
            }
            None => FIRST_RETRY.min(cap),
        }
    }

    /// Measures the offset to the server: probes, mean delay, `now()`, the
    /// estimate. See the module documentation for the retry rules. An NTS
    /// source whose server NAKs its cookies (it restarted, say) shakes hands
    /// again and tries once more at once.
    pub async fn sync(&self, options: &SyncOptions) -> Result<SyncReport, SyncError> {
        match self.sync_once(options).await {
            Err(SyncError::NoAnswer(n)) if n.nts_nak => {
                tracing::info!(server = %self.name(), "NTS NAK: a new key exchange");
                self.sync_once(options).await
            }
            other => other,
        }
    }

    async fn sync_once(&self, options: &SyncOptions) -> Result<SyncReport, SyncError> {
        let started = Instant::now();
        // A connection retransmits by itself: sending a request again on
        // it would only queue a second copy.
        let (exchanger, retries): (Arc<dyn Exchanger>, u32) = match &self.link {
            Link::Datagram(e) => (e.clone(), options.retries),
            Link::Stream(link) => match link.connect(options.timeout).await {
                Ok(e) => (Arc::new(e), 0),
                Err(reason) => {
                    return Err(SyncError::Connect {
                        source_name: self.name(),
                        reason,
                    });
                }
            },
            Link::Nts(link) => match link.prepare(options.timeout).await {
                Ok(e) => (e, options.retries),
                Err(reason) => {
                    return Err(SyncError::Connect {
                        source_name: self.name(),
                        reason,
                    });
                }
            },
        };
        let stats = &*self.stats;
        let sent_before = stats.sent.get();
        let mut samples = Vec::with_capacity(options.probes as usize);
        let mut server_state = None;
        let mut lost = 0u32;
        let mut rejected = 0u32;
        let mut server_errors = 0u64;
        let mut unanswered_run = 0u32;
        let mut transport_failed = None;
        let mut tampered = None;
        let mut kiss = self.stopped_by();
        let mut unsynchronized = None;
        let mut nts_nak = false;

        for _ in 0..options.probes {
            if kiss.is_some()
                || unsynchronized.is_some()
                || transport_failed.is_some()
                || tampered.is_some()
                || nts_nak
            {
                break;
            }
            let interval = Self::retry_interval(options, &samples);
            let (outcome, unanswered) = self
                .call_with_retries(options.timeout, retries, interval, |left| {
                    exchanger.probe(left)
                })
                .await;
            lost += unanswered;
            match outcome {
                CallOutcome::Answered(probe) => {
                    samples.push(probe.sample);
                    server_state = probe.server.or(server_state);
                    unanswered_run = 0;
                    continue;
                }
                CallOutcome::Refused(e) => match e {
                    CallError::Rejected(why) => {
                        tracing::debug!(server = %self.server, error = %why, "rejected sample");
                        rejected += 1;
                    }
                    CallError::Busy(_) => server_errors += 1,
                    CallError::Kiss(k) => {
                        tracing::warn!(server = %self.name(), "{k}");
                        if k.stops() {
                            *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(k);
                        }
                        kiss = Some(k);
                    }
                    CallError::Unsynchronized { leap, stratum } => {
                        unsynchronized = Some((leap, stratum));
                    }
                    CallError::Failed(why) => transport_failed = Some(why),
                    CallError::NtsNak => nts_nak = true,
                    CallError::Tampered(why) => tampered = Some(why),
                    CallError::Lost => {}
                },
                CallOutcome::Lost => {}
            }
            unanswered_run += 1;
            let never_answered = samples.is_empty() && stats.received.get() == 0;
            let refused = stats.refused.get() > 0;
            if never_answered && (unanswered_run >= GIVE_UP_AFTER || refused) {
                break;
            }
        }

        let mut now = None;
        if !samples.is_empty()
            && transport_failed.is_none()
            && tampered.is_none()
            && kiss.is_none()
            && unsynchronized.is_none()
        {
            let interval = Self::retry_interval(options, &samples);
            let (outcome, unanswered) = self
                .call_with_retries(options.timeout, retries, interval, |left| {
                    exchanger.now(left)
                })
                .await;
            lost += unanswered;
            match outcome {
                CallOutcome::Answered(exchange) => now = Some(exchange),
                CallOutcome::Refused(CallError::Rejected(_)) => rejected += 1,
                CallOutcome::Refused(CallError::Tampered(why)) => tampered = Some(why),
                _ => {}
            }
        }

        if let Some(reason) = tampered {
            return Err(SyncError::Tampered {
                source_name: self.name(),
                reason,
            });
        }

        if samples.is_empty() {
            return Err(SyncError::NoAnswer(NoAnswer {
                server: self.server,
                wire: self.spec.wire,
                sent: stats.sent.get() - sent_before,
                elapsed: started.elapsed(),
                refused: stats.refused.get(),
                unreachable: stats.unreachable.get(),
                malformed: stats.malformed.get(),
                unmatched: stats.unmatched.get(),
                server_errors,
                rejected,
                auth_failed: stats.auth_failed.get(),
                key_id: self.key_id,
                transport_failed,
                kiss,
                unsynchronized,
                nts_nak,
            }));
        }

        let estimates: Vec<Estimate> = Estimator::ALL
            .into_iter()
            .filter_map(|e| sync::estimate(&samples, now.as_ref(), e, &options.params).ok())
            .collect();
        let estimate = sync::estimate(&samples, now.as_ref(), options.estimator, &options.params)
            .map_err(|source| SyncError::Estimate {
            server: self.server,
            source,
        })?;
        Ok(SyncReport {
            server: self.server,
            wire: self.spec.wire,
            mean_delay: sync::mean_delay(&samples).unwrap_or_default(),
            min_rtt: sync::min_rtt_sample(&samples).map_or(Nanos::ZERO, |(_, s)| s.rtt()),
            samples,
            lost,
            rejected,
            now,
            server_state,
            estimate,
            estimates,
            params: options.params,
            elapsed: started.elapsed(),
        })
    }

    /// The local clock this source reads.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
}

/// Why a source could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address does not resolve.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The local socket could not be opened.
    #[error("cannot open a socket: {0}")]
    Io(#[from] io::Error),
}
