//! The server side of cerv's wire over TCP, optionally inside TLS: the
//! Cristian-over-TCP design this project grew from, with the defences a
//! TCP server on the internet needs.
//!
//! ```text
//! accept ─▶ limits (total, per address) ─▶ [TLS handshake, within a time limit]
//!        ─▶ frames (≤ MAX_FRAME) ─▶ decode ─▶ rate limit ─▶ handler ─▶ reply frame (ts3 read last)
//! ```
//!
//! The same listener serves NTS key establishment (RFC 8915 §4): TLS 1.3,
//! ALPN `ntske/1`, one request read (bounded, within the idle timeout), the
//! keys exported from the TLS session, eight cookies sealed under the
//! server's master keys, and the connection closed.
//!
//! Each connection is served in order by a task of its own: a client asks
//! once and waits (fient makes one connection per sync and a handful of
//! calls on it). A connection ends when the client closes it, when it is
//! silent for the idle timeout (slowloris), when it sends a frame longer
//! than allowed or bytes that do not decode (garbage after a valid frame
//! included), and at shutdown. Every reason is counted.

use super::Counter;
use super::face::SharedMasterKeys;
use super::limit::{Limiter, RateLimit};
use super::server::HandlerFuture;
use super::socket::Stamping;
use super::stream::{Framer, MAX_FRAME, PREFIX, StampCell, StampedTcp, frame};
use crate::auth::KeyRing;
use crate::clock::Clock;
use crate::nts::ke;
use crate::rpc::{TimeServiceRequest, TimeServiceResponse};
use crate::wire::{
    self, Call, ClientFrame, DecodeError, ErrorCode, MAX_REPLY_LEN, Reply, ServerFrame,
};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// Limits of a TCP (or TLS) listener.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// Connections open at once, in all; more are closed at once.
    pub max_connections: usize,
    /// Connections open at once from one address.
    pub max_per_address: usize,
    /// Time a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// A connection that sends no complete frame for this long is closed.
    pub idle_timeout: Duration,
    /// Requests one connection may make (a token bucket); over it, the
    /// server answers "busy".
    pub rate_limit: RateLimit,
    /// Where ts2 comes from.
    pub stamping: Stamping,
    /// With keys, only requests tagged with one of them are served.
    pub keys: Option<Arc<KeyRing>>,
    /// TLS, when this listener speaks it.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// How long shutdown waits for connections to finish.
    pub shutdown_grace: Duration,
    /// How often the counters are logged (when they changed); zero: only
    /// at shutdown.
    pub stats_interval: Duration,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            max_connections: 1024,
            max_per_address: 16,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            rate_limit: RateLimit::default(),
            stamping: Stamping::Kernel,
            keys: None,
            tls: None,
            shutdown_grace: Duration::from_secs(2),
            stats_interval: Duration::from_secs(60),
        }
    }
}

/// What a TCP listener did, by reason.
#[derive(Debug, Default)]
pub struct TcpStats {
    /// Connections accepted and served.
    pub accepted: Counter,
    /// Closed at once: the listener was full.
    pub over_limit: Counter,
    /// Closed at once: that address had too many open.
    pub over_address_limit: Counter,
    /// TLS handshakes that failed (a plaintext client, a bad hello).
    pub handshake_failed: Counter,
    /// TLS handshakes that took too long.
    pub handshake_timeout: Counter,
    /// Connections closed for being silent too long.
    pub idle_closed: Counter,
    /// Connections that announced a frame longer than allowed.
    pub oversized: Counter,
    /// Connections whose bytes did not decode.
    pub malformed: Counter,
    /// Requests with missing, unexpected or wrong authentication.
    pub auth_failed: Counter,
    /// Requests over their connection's rate limit (answered "busy").
    pub rate_limited: Counter,
    /// Requests served.
    pub requests: Counter,
    /// Replies written.
    pub replied: Counter,
    /// Connections that failed while reading or writing.
    pub io_failed: Counter,
    /// Errors accepting connections (out of file descriptors, say).
    pub accept_failed: Counter,
}

impl TcpStats {
    /// Each reason a connection was closed or refused, or a request
    /// refused, with its count (zeros included), in a fixed order.
    pub fn drops(&self) -> [(&'static str, u64); 11] {
        [
            ("over limit", self.over_limit.get()),
            ("over address limit", self.over_address_limit.get()),
            ("handshake failed", self.handshake_failed.get()),
            ("handshake timeout", self.handshake_timeout.get()),
            ("idle", self.idle_closed.get()),
            ("oversized", self.oversized.get()),
            ("malformed", self.malformed.get()),
            ("auth failed", self.auth_failed.get()),
            ("rate limited", self.rate_limited.get()),
            ("io failed", self.io_failed.get()),
            ("accept failed", self.accept_failed.get()),
        ]
    }
}

impl fmt::Display for TcpStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connections {}, requests {}, replied {}",
            self.accepted.get(),
            self.requests.get(),
            self.replied.get()
        )?;
        let reasons = self.drops();
        let mut first = true;
        for (name, n) in reasons {
            if n > 0 {
                f.write_str(if first { "; closed or refused: " } else { ", " })?;
                first = false;
                write!(f, "{name} {n}")?;
            }
        }
        Ok(())
    }
}

/// Connections open, in all and per address.
#[derive(Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One open connection, counted while it lives.
struct Slot {
    open: Arc<Mutex<Open>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total -= 1;
        if let Some(n) = open.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.by_address.remove(&self.ip);
            }
        }
    }
}

/// What a listener serves.
#[derive(Clone)]
pub enum Protocol {
    /// cerv's wire: each request to the handler.
    Cerv(Handler),
    /// NTS key establishment, sealing cookies with these master keys (the
    /// listener's TLS must be TLS 1.3 with ALPN `ntske/1`).
    NtsKe(Arc<KeService>),
}

/// An NTS key-establishment service.
#[derive(Debug)]
pub struct KeService {
    /// The master keys cookies are sealed under (the NTP sockets open them).
    pub master: SharedMasterKeys,
    /// The NTP server and port the response names, if not the defaults.
    pub options: ke::ServerOptions,
}

/// A TCP (or TLS) listener serving [`crate::rpc::TimeService`] or NTS-KE.
pub struct TcpServer {
    listener: TcpListener,
    clock: Arc<dyn Clock>,
    config: TcpConfig,
    stats: Arc<TcpStats>,
}

/// The handler each request goes to (cerv's handlers through tarpc's
/// generated `Serve`).
pub type Handler =
    Arc<dyn Fn(tarpc::context::Context, TimeServiceRequest) -> HandlerFuture + Send + Sync>;

impl TcpServer {
    /// A server on a bound listener.
    pub fn new(listener: TcpListener, clock: Arc<dyn Clock>, config: TcpConfig) -> Self {
        TcpServer {
            listener,
            clock,
            config,
            stats: Arc::default(),
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Its counters, shared.
    pub fn stats(&self) -> Arc<TcpStats> {
        self.stats.clone()
    }

    /// Whether it speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.config.tls.is_some()
    }

    /// Serves until `shutdown` completes, then lets open connections
    /// finish within the grace period; returns the counters.
    pub async fn run(
        self,
        protocol: Protocol,
        shutdown: impl Future<Output = ()>,
    ) -> Arc<TcpStats> {
        let open = Arc::new(Mutex::new(Open::default()));
        let mut tasks = JoinSet::new();
        let acceptor = self.config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let name = match (&protocol, acceptor.is_some()) {
            (Protocol::NtsKe(_), _) => "nts-ke",
            (Protocol::Cerv(_), true) => "tls",
            (Protocol::Cerv(_), false) => "tcp",
        };
        let mut log_every =
            tokio::time::interval(self.config.stats_interval.max(Duration::from_secs(1)));
        log_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_logged = 0;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                _ = log_every.tick() => {
                    while tasks.try_join_next().is_some() {}
                    let seen = self.stats.requests.get() + self.stats.accepted.get();
                    if !self.config.stats_interval.is_zero() && seen != last_logged {
                        info!(wire = name, stats = %self.stats, "counters");
                        last_logged = seen;
                    }
                }
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of descriptors, say: wait a little rather
                            // than spin.
                            self.stats.accept_failed.incr();
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Some(slot) = self.admit(&open, peer.ip()) else {
                        drop(stream);
                        continue;
                    };
                    self.stats.accepted.incr();
                    let stamped = match StampedTcp::new(stream, self.config.stamping) {
                        Ok(s) => s,
                        Err(e) => {
                            self.stats.io_failed.incr();
                            debug!(%peer, error = %e, "cannot set up the connection");
                            continue;
                        }
                    };
                    let connection = Connection {
                        peer,
                        stamp: stamped.stamp(),
                        clock: self.clock.clone(),
                        config: self.config.clone(),
                        stats: self.stats.clone(),
                    };
                    let acceptor = acceptor.clone();
                    let protocol = protocol.clone();
                    tasks.spawn(async move {
                        let _slot = slot;
                        match (acceptor, protocol) {
                            (None, Protocol::Cerv(handler)) => connection.serve(stamped, &handler).await,
                            // Key establishment is only ever over TLS.
                            (None, Protocol::NtsKe(_)) => {}
                            (Some(acceptor), protocol) => {
                                let timeout = connection.config.handshake_timeout;
                                match tokio::time::timeout(timeout, acceptor.accept(stamped)).await {
                                    Ok(Ok(tls)) => match protocol {
                                        Protocol::Cerv(handler) => connection.serve(tls, &handler).await,
                                        Protocol::NtsKe(ke) => connection.serve_ke(tls, &ke).await,
                                    },
                                    Ok(Err(e)) => {
                                        connection.stats.handshake_failed.incr();
                                        debug!(peer = %connection.peer, error = %e, "TLS handshake failed");
                                    }
                                    Err(_) => {
                                        connection.stats.handshake_timeout.incr();
                                        debug!(peer = %connection.peer, "TLS handshake timed out");
                                    }
                                }
                            }
                        }
                    });
                }
            }
        }
        let grace = self.config.shutdown_grace;
        if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tasks.abort_all();
        }
        info!(wire = name, stats = %self.stats, "server stopped");
        self.stats
    }

    /// Takes a slot for a connection from `ip`, or counts why not.
    fn admit(&self, open: &Arc<Mutex<Open>>, ip: IpAddr) -> Option<Slot> {
        let mut o = open.lock().unwrap_or_else(|p| p.into_inner());
        if o.total >= self.config.max_connections {
            self.stats.over_limit.incr();
            return None;
        }
        let mine = o.by_address.entry(ip).or_insert(0);
        if *mine >= self.config.max_per_address {
            self.stats.over_address_limit.incr();
            return None;
        }
        *mine += 1;
        o.total += 1;
        Some(Slot {
            open: open.clone(),
            ip,
        })
    }
}

/// Why a connection's read ended.
enum ReadEnd {
    Closed,
    Oversized,
    Failed(io::Error),
}

/// One connection being served.
struct Connection {
    peer: SocketAddr,
    stamp: StampCell,
    clock: Arc<dyn Clock>,
    config: TcpConfig,
    stats: Arc<TcpStats>,
}

impl Connection {
    /// NTS-KE on a TLS connection: one request, one response, closed.
    async fn serve_ke(self, mut tls: tokio_rustls::server::TlsStream<StampedTcp>, ke: &KeService) {
        if tls.get_ref().1.alpn_protocol() != Some(ke::ALPN) {
            self.stats.handshake_failed.incr();
            debug!(peer = %self.peer, "NTS-KE without ALPN ntske/1");
            return;
        }
        let mut decoder = ke::Decoder::new();
        let mut buf = [0u8; 2048];
        let idle = self.config.idle_timeout;
        let request = loop {
            let n = match tokio::time::timeout(idle, tls.read(&mut buf)).await {
                Err(_) => {
                    self.stats.idle_closed.incr();
                    return;
                }
                Ok(Err(e)) => {
                    self.stats.io_failed.incr();
                    debug!(peer = %self.peer, error = %e, "NTS-KE read failed");
                    return;
                }
                Ok(Ok(0)) => return,
                Ok(Ok(n)) => n,
            };
            match decoder.feed(&buf[..n]) {
                Ok(ke::Decoded::NeedMore) => continue,
                Ok(ke::Decoded::Complete(message)) => break Ok(message),
                Err(e) => break Err(e),
            }
        };
        self.stats.requests.incr();
        let response = match request {
            Ok(message) => {
                let conn = &tls.get_ref().1;
                let master = ke.master.read().unwrap_or_else(|p| p.into_inner());
                ke::respond(
                    &message,
                    |aead| {
                        ke::export_keys(aead, |out, label, context| {
                            conn.export_keying_material(out, label, Some(context))
                                .map(|_| ())
                        })
                        .ok()
                    },
                    &master,
                    &ke.options,
                )
            }
            Err(e) => {
                self.stats.malformed.incr();
                debug!(peer = %self.peer, error = %e, "bad NTS-KE request");
                ke::write_error(ke::ErrorCode::BAD_REQUEST)
            }
        };
        let sent = async {
            tls.write_all(&response).await?;
            tls.flush().await?;
            tls.shutdown().await
        };
        match tokio::time::timeout(idle, sent).await {
            Ok(Ok(())) => self.stats.replied.incr(),
            _ => self.stats.io_failed.incr(),
        }
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(self, mut stream: S, handler: &Handler) {
        let mut framer = Framer::default();
        let mut buf = vec![0u8; PREFIX + MAX_FRAME];
        let mut out = Vec::with_capacity(PREFIX + MAX_FRAME);
        // One bucket: this connection's own.
        let mut bucket = Limiter::new(self.config.rate_limit, 1);
        let opened = Instant::now();
        let keys = self.config.keys.clone();
        loop {
            let idle = self.config.idle_timeout;
            let message =
                match tokio::time::timeout(idle, read_frame(&mut stream, &mut framer, &mut buf))
                    .await
                {
                    Err(_) => {
                        self.stats.idle_closed.incr();
                        debug!(peer = %self.peer, "closing an idle connection");
                        break;
                    }
                    Ok(Err(ReadEnd::Closed)) => break,
                    Ok(Err(ReadEnd::Oversized)) => {
                        self.stats.oversized.incr();
                        debug!(peer = %self.peer, "closing: frame too long");
                        break;
                    }
                    Ok(Err(ReadEnd::Failed(e))) => {
                        self.stats.io_failed.incr();
                        debug!(peer = %self.peer, error = %e, "read failed");
                        break;
                    }
                    Ok(Ok(message)) => message,
                };
            let received = match self.stamp.get() {
                Some(t) => self.clock.at_system_time(t),
                None => self.clock.now(),
            };
            // The keys in force for this request and its reply.
            let keys = keys.as_ref().map(|k| k.current());
            let (id, deadline, call, auth) = match wire::decode_client(&message, keys.as_deref()) {
                Ok((ClientFrame::Request { id, deadline, call }, auth)) => {
                    (id, deadline, call, auth)
                }
                // Requests are served in order: nothing is in flight to cancel.
                Ok((ClientFrame::Cancel { .. }, _)) => continue,
                Err(e) => {
                    match e {
                        DecodeError::Auth(_) => self.stats.auth_failed.incr(),
                        _ => self.stats.malformed.incr(),
                    }
                    debug!(peer = %self.peer, error = %e, "closing: undecodable frame");
                    break;
                }
            };
            self.stats.requests.incr();
            let reply = if bucket.allow(self.peer.ip(), opened.elapsed().as_nanos() as u64) {
                let request = match call {
                    Call::Probe { ts1 } => TimeServiceRequest::Probe { ts1 },
                    Call::Now => TimeServiceRequest::Now {},
                };
                let mut ctx = tarpc::context::current();
                ctx.deadline = Instant::now() + deadline;
                // Past its deadline the client has stopped waiting.
                match tokio::time::timeout(deadline, handler(ctx, request)).await {
                    Err(_) => continue,
                    Ok(result) => result,
                }
            } else {
                self.stats.rate_limited.incr();
                Err(tarpc::ServerError::new(
                    io::ErrorKind::WouldBlock,
                    "rate limited".into(),
                ))
            };
            // ts3: read last, just before the reply is written.
            let now = self.clock.now();
            let reply = match reply {
                Ok(TimeServiceResponse::Probe(p)) => Reply::Probe {
                    ts1: p.ts1,
                    ts2: received,
                    ts3: now,
                },
                Ok(TimeServiceResponse::Now(_)) => Reply::Now { time: now },
                Err(e) => Reply::Error {
                    code: ErrorCode::from_io_kind(e.kind),
                    detail: e.detail,
                },
            };
            let key = auth.and_then(|a| keys.as_deref()?.get(a.key_id).map(|k| (k, a.tag)));
            let mut encoded = [0u8; MAX_REPLY_LEN + crate::auth::TRAILER_LEN];
            let len = match &key {
                Some((key, tag)) => {
                    wire::encode_server(&ServerFrame { id, reply }, &mut encoded, Some((key, tag)))
                }
                None => wire::encode_server(
                    &ServerFrame { id, reply },
                    &mut encoded[..MAX_REPLY_LEN],
                    None,
                ),
            };
            let Some(len) = len else {
                continue;
            };
            frame(&encoded[..len], &mut out);
            let written = async {
                stream.write_all(&out).await?;
                stream.flush().await
            };
            match tokio::time::timeout(idle, written).await {
                Ok(Ok(())) => self.stats.replied.incr(),
                _ => {
                    self.stats.io_failed.incr();
                    break;
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), stream.shutdown()).await;
    }
}

/// Reads one frame: exactly what it lacks at each step, so that a read
/// never takes bytes of the next one (whose stamp would then be wrong).
async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    framer: &mut Framer,
    buf: &mut [u8],
) -> Result<Vec<u8>, ReadEnd> {
    loop {
        let want = framer.wanted().min(buf.len());
        let n = match stream.read(&mut buf[..want]).await {
            Ok(n) => n,
            // A TLS client that hangs up without close_notify (fient
            // does: it exits once it has its answer) ends its session
            // between frames: a close, not a failure. Within a frame it
            // is a truncation.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && framer.is_empty() => 0,
            Err(e) => return Err(ReadEnd::Failed(e)),
        };
        if n == 0 {
            return Err(ReadEnd::Closed);
        }
        match framer.push(&buf[..n]) {
            Err(_) => return Err(ReadEnd::Oversized),
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
        }
    }
}
