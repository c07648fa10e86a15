//! Connect, probe and sync: the client side in a few lines.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use service::client::{SyncOptions, TimeClient};
//!
//! let client = TimeClient::connect("127.0.0.1:8081".parse()?).await?;
//! let report = client.sync(&SyncOptions::default()).await?;
//! println!("offset {} ± {}", report.estimate.offset, report.estimate.bound());
//! # Ok(())
//! # }
//! ```
//!
//! [`TimeClient::sync`] runs the flow of the design: `probes` exchanges,
//! the mean one-way delay, then `now()`, and the estimate. Each call has a
//! time budget (`timeout`); a request that gets no answer is sent again
//! within that budget, up to `retries` more times: first after four round
//! trips (25 ms before any round trip is known), then after twice as long
//! each time. A lost datagram costs milliseconds, not the whole timeout.
//! A probe whose budget runs out is skipped and counted as lost.

use crate::auth::Key;
use crate::clock::{Clock, SystemClock};
use crate::rpc::TimeServiceClient;
use crate::sync::{
    self, Estimate, EstimateError, Estimator, NowExchange, Sample, SampleError, SyncParams,
};
use crate::time::{Nanos, Timestamp};
use crate::transport::client::{ClientOptions, ClientStats, UdpClientTransport, client_config};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tarpc::client::RpcError;
use tarpc::context;

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

/// The result of a sync: the measurements and what they say.
#[derive(Clone, Debug)]
pub struct SyncReport {
    /// The server asked.
    pub server: SocketAddr,
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
    /// The answer of the chosen estimator.
    pub estimate: Estimate,
    /// The answers of every estimator that could run, for comparison.
    pub estimates: Vec<Estimate>,
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
}

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The server never gave a usable answer.
    #[error("{0}")]
    NoAnswer(NoAnswer),
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

/// The details of a server that did not answer, for a useful message.
#[derive(Debug, Clone)]
pub struct NoAnswer {
    /// The server asked.
    pub server: SocketAddr,
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
    /// Set when the local transport itself failed.
    pub transport_failed: bool,
}

impl fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no answer from {} ({} requests in {:.1}s)",
            self.server,
            self.sent,
            self.elapsed.as_secs_f64()
        )?;
        let hint = if self.transport_failed {
            "the local socket failed".to_string()
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
            format!(
                "{} malformed replies: is this a cerv server?",
                self.malformed
            )
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

/// A connection to one time server.
#[derive(Clone)]
pub struct TimeClient {
    rpc: TimeServiceClient,
    clock: Arc<dyn Clock>,
    stats: Arc<ClientStats>,
    server: SocketAddr,
    key_id: Option<u32>,
}

/// How one call (with its retries) ended.
enum CallOutcome<T> {
    Answered(T),
    ServerError,
    Lost,
    TransportFailed,
}

impl TimeClient {
    /// Connects to `server` over UDP, stamping with the system clock. Must
    /// run inside a Tokio runtime (the tarpc dispatch task is spawned on it).
    pub async fn connect(server: SocketAddr) -> io::Result<Self> {
        Self::connect_with_clock(server, Arc::new(SystemClock)).await
    }

    /// Like [`connect`](Self::connect), with another clock.
    pub async fn connect_with_clock(server: SocketAddr, clock: Arc<dyn Clock>) -> io::Result<Self> {
        Self::connect_with(server, clock, ClientOptions::default()).await
    }

    /// Like [`connect`](Self::connect), with another clock, and the
    /// transport's options (timestamps, key).
    pub async fn connect_with(
        server: SocketAddr,
        clock: Arc<dyn Clock>,
        options: ClientOptions,
    ) -> io::Result<Self> {
        let socket = UdpClientTransport::bind_connected(server).await?;
        let key_id = options.key.as_ref().map(Key::id);
        let transport = UdpClientTransport::new(socket, clock.clone(), options);
        let stats = transport.stats();
        let rpc = TimeServiceClient::new(client_config(), transport).spawn();
        Ok(TimeClient {
            rpc,
            clock,
            stats,
            server,
            key_id,
        })
    }

    /// The tarpc stub, for calls of your own.
    pub fn rpc(&self) -> &TimeServiceClient {
        &self.rpc
    }

    /// The transport's counters.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// The server address.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// One probe exchange, one request, no retry.
    pub async fn probe(&self, timeout: Duration) -> Result<Result<Sample, SampleError>, RpcError> {
        let mut ctx = context::current();
        ctx.deadline = Instant::now() + timeout;
        let reply = self.rpc.probe(ctx, self.clock.now()).await?;
        let ts4 = reply.ts4.unwrap_or_else(|| self.clock.now());
        Ok(Sample::new(reply.ts1, reply.ts2, reply.ts3, ts4))
    }

    /// One `now()` exchange, one request, no retry.
    pub async fn now(
        &self,
        timeout: Duration,
    ) -> Result<Result<NowExchange, SampleError>, RpcError> {
        let mut ctx = context::current();
        ctx.deadline = Instant::now() + timeout;
        let sent = self.clock.now();
        let server_time = self.rpc.now(ctx).await?;
        let received = self.clock.now();
        Ok(NowExchange::new(sent, server_time, received))
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
        Fut: Future<Output = Result<T, RpcError>>,
    {
        let deadline = tokio::time::Instant::now() + budget;
        let mut in_flight = FuturesUnordered::new();
        let mut sent = 0u32;
        let mut next_send = tokio::time::Instant::now();
        let mut interval = interval;
        let mut server_errors = 0u32;
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
                    Err(RpcError::Server(e)) => {
                        tracing::debug!(server = %self.server, error = %e, "server refused a request");
                        server_errors += 1;
                        // An answer: no point waiting for this one, try again.
                        next_send = tokio::time::Instant::now();
                    }
                    Err(RpcError::DeadlineExceeded) => {}
                    Err(e) => {
                        tracing::debug!(server = %self.server, error = %e, "transport failed");
                        return (CallOutcome::TransportFailed, sent);
                    }
                },
                () = tokio::time::sleep_until(wake) => {}
            }
        }
        let outcome = if server_errors > 0 {
            CallOutcome::ServerError
        } else {
            CallOutcome::Lost
        };
        (outcome, sent - server_errors)
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
    /// estimate. See the module documentation for the retry rules.
    pub async fn sync(&self, options: &SyncOptions) -> Result<SyncReport, SyncError> {
        let started = Instant::now();
        let sent_before = self.stats.sent.get();
        let mut samples = Vec::with_capacity(options.probes as usize);
        let mut lost = 0u32;
        let mut rejected = 0u32;
        let mut server_errors = 0u64;
        let mut unanswered_run = 0u32;
        let mut transport_failed = false;

        for _ in 0..options.probes {
            let interval = Self::retry_interval(options, &samples);
            let (outcome, unanswered) = self
                .call_with_retries(options.timeout, options.retries, interval, |left| {
                    self.probe(left)
                })
                .await;
            lost += unanswered;
            match outcome {
                CallOutcome::Answered(Ok(sample)) => {
                    samples.push(sample);
                    unanswered_run = 0;
                    continue;
                }
                CallOutcome::Answered(Err(e)) => {
                    tracing::debug!(server = %self.server, error = %e, "rejected sample");
                    rejected += 1;
                }
                CallOutcome::ServerError => server_errors += 1,
                CallOutcome::Lost => {}
                CallOutcome::TransportFailed => {
                    transport_failed = true;
                    break;
                }
            }
            unanswered_run += 1;
            let never_answered = samples.is_empty() && self.stats.received.get() == 0;
            let refused = self.stats.refused.get() > 0;
            if never_answered && (unanswered_run >= GIVE_UP_AFTER || refused) {
                break;
            }
        }

        let mut now = None;
        if !samples.is_empty() && !transport_failed {
            let interval = Self::retry_interval(options, &samples);
            let (outcome, unanswered) = self
                .call_with_retries(options.timeout, options.retries, interval, |left| {
                    self.now(left)
                })
                .await;
            lost += unanswered;
            match outcome {
                CallOutcome::Answered(Ok(exchange)) => now = Some(exchange),
                CallOutcome::Answered(Err(_)) => rejected += 1,
                _ => {}
            }
        }

        if samples.is_empty() {
            return Err(SyncError::NoAnswer(NoAnswer {
                server: self.server,
                sent: self.stats.sent.get() - sent_before,
                elapsed: started.elapsed(),
                refused: self.stats.refused.get(),
                unreachable: self.stats.unreachable.get(),
                malformed: self.stats.malformed.get(),
                unmatched: self.stats.unmatched.get(),
                server_errors,
                rejected,
                auth_failed: self.stats.auth_failed.get(),
                key_id: self.key_id,
                transport_failed,
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
            mean_delay: sync::mean_delay(&samples).unwrap_or_default(),
            min_rtt: sync::min_rtt_sample(&samples).map_or(Nanos::ZERO, |(_, s)| s.rtt()),
            samples,
            lost,
            rejected,
            now,
            estimate,
            estimates,
            elapsed: started.elapsed(),
        })
    }
}
