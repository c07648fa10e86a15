//! The server side of the UDP transport: one socket, demultiplexed by peer.
//!
//! ```text
//!            ┌──────────── reader task ────────────┐   inline:   handler, polled in place
//! datagrams ─▶ recvmmsg → kernel ts2 → decode       ├─▶ or
//!            └─────────────────────────────────────┘   channels: peer table → queue → BaseChannel → handler
//!                                                                          │
//! replies ◀──── sendmmsg ◀── stamp ts3, encode ◀── reader (after each batch) ◀── outbox (bounded)
//!                                              ◀── or writer task (later replies)
//! ```
//!
//! Two ways to dispatch requests share the reader and the writer:
//!
//! - **Inline** ([`UdpServer::run_inline`]): each request's handler is
//!   called through tarpc's generated `Serve` and polled as its datagram is
//!   read. A handler that answers at once (a time server's always do) is
//!   answered then and there, with no state kept for the peer; one that must
//!   wait gets a task of its own, bounded per peer and in total, and ends at
//!   its deadline or on the client's cancel. The reply goes to the source
//!   address of the request.
//! - **Channels** ([`UdpServer::run`]): a peer is a source address; tarpc
//!   request ids restart at zero in every client, so each peer gets its own
//!   [`tarpc::server::BaseChannel`], run by the caller-supplied function in a
//!   task of its own. The peer table is bounded; idle peers are evicted,
//!   and when the table is full new peers are turned away (and counted)
//!   until an idle one can be evicted. Each peer's queue is bounded, and a
//!   datagram that finds it full is dropped: UDP semantics, and the client
//!   retries. tarpc's per-request tracking (a span, a timer entry, a map
//!   entry) costs about as much as the rest of the server together, and each
//!   peer holds about 14 KiB (mostly tarpc's timer wheel); inline dispatch
//!   keeps neither.
//!
//! Datagrams are read and replies sent in batches ([`super::batch`]): one
//! system call for up to 64 datagrams. Replies from every peer go to one
//! outbox. After each batch it reads, the reader sends what the outbox
//! holds (the answers given at once, in one `sendmmsg`, with no hop to
//! another task); a writer task sends what comes later (handlers that
//! waited, tarpc channels). Either takes what is there, reads the clock
//! once, stamps ts3 (and `now()`'s answer) with it and sends the lot, so
//! the stamp is taken just before the replies leave, however many there
//! are.

use super::batch::{BATCH, RecvBatch, SendBatch};
use super::face::{self, Decoded, Face, Inbound, NtpState, NtsReply, ReplyAs};
use super::limit::{DEFAULT_SLOTS, Limiter, RateLimit};
use super::socket::{Stamping, enable_timestamps};
use super::{Counter, is_transient};
use crate::auth::{KeyRing, Keys};
use crate::clock::Clock;
use crate::ntp::{self, RefId};
use crate::rpc::{TimeServiceRequest, TimeServiceResponse};
use crate::time::Timestamp;
use crate::wire::{self, Call, ClientFrame, ErrorCode, MAX_REPLY_LEN, Reply, ServerFrame};
use futures::{Sink, Stream, StreamExt};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tarpc::server::{BaseChannel, Serve};
use tarpc::{ClientMessage, Request, Response};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// Limits of the server transport.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Most peers (source addresses) tracked at once.
    pub max_peers: usize,
    /// Datagrams queued for one peer before more are dropped.
    pub peer_queue: usize,
    /// A peer silent this long is forgotten.
    pub idle_timeout: Duration,
    /// Requests one peer may have in flight; more are answered "busy".
    pub max_in_flight: usize,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
    /// Where ts2 comes from.
    pub stamping: Stamping,
    /// With keys, only datagrams tagged with one of them are accepted, and
    /// replies are tagged with the request's key, bound to the request.
    pub keys: Option<Arc<KeyRing>>,
    /// How fast one source address may send.
    pub rate_limit: RateLimit,
    /// How often the counters are logged (when they changed); zero: never,
    /// only at shutdown.
    pub stats_interval: Duration,
    /// The protocol the socket answers.
    pub face: Face,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_peers: 1024,
            peer_queue: 128,
            idle_timeout: Duration::from_secs(30),
            max_in_flight: 128,
            shutdown_grace: Duration::from_secs(2),
            stamping: Stamping::Kernel,
            keys: None,
            rate_limit: RateLimit::default(),
            stats_interval: Duration::from_secs(60),
            face: Face::Cerv,
        }
    }
}

/// What the server did with the datagrams it saw.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Datagrams read from the socket.
    pub received: Counter,
    /// Replies sent.
    pub replied: Counter,
    /// Larger than the protocol allows.
    pub oversized: Counter,
    /// Not padded to the minimum request size (would allow amplification).
    pub unpadded: Counter,
    /// Not this protocol, another version or kind, or a bad body.
    pub malformed: Counter,
    /// Missing, unexpected or wrong authentication.
    pub auth_failed: Counter,
    /// Over their source's rate limit.
    pub rate_limited: Counter,
    /// Dropped because the peer's queue was full.
    pub queue_full: Counter,
    /// Dropped because the peer table was full.
    pub table_full: Counter,
    /// Cancels from peers with nothing in flight.
    pub stray: Counter,
    /// Replies that could not be sent (outbox full, or the send failed).
    pub send_failed: Counter,
    /// Errors reading the socket.
    pub recv_failed: Counter,
    /// Peers added to the table.
    pub peers_created: Counter,
    /// Peers evicted for being idle.
    pub peers_evicted: Counter,
    /// NTP control (mode 6) and private (mode 7) queries, never answered.
    pub control: Counter,
    /// NTP packets of another mode than a client request.
    pub wrong_mode: Counter,
    /// NTP packets of a version other than 3 or 4.
    pub bad_version: Counter,
    /// NTP requests with a legacy symmetric-key MAC (not supported).
    pub mac: Counter,
    /// Kiss-o'-Death RATE replies sent to rate-limited NTP clients.
    pub kiss_sent: Counter,
    /// Rate-limited NTP requests that got no Kiss-o'-Death either (the
    /// kisses are rate limited too).
    pub kiss_suppressed: Counter,
    /// NTS requests opened and answered.
    pub nts_requests: Counter,
    /// NTS requests answered with a NAK (a cookie that did not open, an
    /// authenticator that failed).
    pub nts_naks: Counter,
    /// Malformed NTS requests, dropped.
    pub nts_failed: Counter,
    /// How many datagrams each receive batch held.
    pub batches: super::BatchCounter,
}

impl ServerStats {
    /// Every datagram dropped for any reason.
    pub fn dropped(&self) -> u64 {
        self.drops().iter().map(|(_, n)| n).sum()
    }

    /// Each reason a datagram was dropped, with its count (zeros
    /// included), in a fixed order.
    pub fn drops(&self) -> [(&'static str, u64); 14] {
        [
            ("oversized", self.oversized.get()),
            ("unpadded", self.unpadded.get()),
            ("malformed", self.malformed.get()),
            ("auth failed", self.auth_failed.get()),
            ("rate limited", self.rate_limited.get()),
            ("queue full", self.queue_full.get()),
            ("table full", self.table_full.get()),
            ("stray", self.stray.get()),
            ("control query", self.control.get()),
            ("wrong mode", self.wrong_mode.get()),
            ("bad version", self.bad_version.get()),
            ("mac", self.mac.get()),
            ("nts failed", self.nts_failed.get()),
            ("send failed", self.send_failed.get()),
        ]
    }
}

impl fmt::Display for ServerStats {
    /// `received 12, replied 10; dropped: malformed 2` (and, with channel
    /// dispatch, the peers seen).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received {}, replied {}",
            self.received.get(),
            self.replied.get()
        )?;
        if self.peers_created.get() > 0 {
            write!(f, ", peers {}", self.peers_created.get())?;
        }
        if self.kiss_sent.get() > 0 {
            write!(f, ", kiss-o'-death sent {}", self.kiss_sent.get())?;
        }
        if self.nts_requests.get() + self.nts_naks.get() > 0 {
            write!(
                f,
                ", nts {}, nts naks {}",
                self.nts_requests.get(),
                self.nts_naks.get()
            )?;
        }
        let mut first = true;
        let recv_failed = ("recv failed", self.recv_failed.get());
        let kiss_suppressed = ("kiss suppressed", self.kiss_suppressed.get());
        for (name, n) in self
            .drops()
            .into_iter()
            .chain([recv_failed, kiss_suppressed])
        {
            if n > 0 {
                f.write_str(if first { "; dropped: " } else { ", " })?;
                first = false;
                write!(f, "{name} {n}")?;
            }
        }
        Ok(())
    }
}

/// A reply on its way to the writer; its send time is stamped there.
struct Outgoing {
    to: SocketAddr,
    id: u64,
    reply: PendingReply,
    reply_as: ReplyAs,
}

enum PendingReply {
    Probe {
        ts1: Timestamp,
        ts2: Timestamp,
    },
    Now,
    Error {
        code: ErrorCode,
        detail: String,
    },
    /// A Kiss-o'-Death (NTP only).
    Kiss(RefId),
    /// An NTS NAK (its request is in the reply's `ReplyAs`).
    NtsNak,
}

/// Replies waiting to be sent, from every peer.
struct Outbox {
    queue: Mutex<VecDeque<Outgoing>>,
    ready: Notify,
    closed: AtomicBool,
}

/// Most replies waiting for the writer; more are dropped and counted.
const MAX_OUTBOX: usize = 16 * 1024;

impl Outbox {
    /// Queues a reply for the writer task, and wakes it.
    fn push(&self, item: Outgoing, stats: &ServerStats) {
        if self.queue(item, stats) {
            self.ready.notify_one();
        }
    }

    /// Queues a reply the reader sends itself after its batch: waking the
    /// writer for it would only have it find the outbox empty.
    fn push_for_reader(&self, item: Outgoing, stats: &ServerStats) {
        self.queue(item, stats);
    }

    fn queue(&self, item: Outgoing, stats: &ServerStats) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= MAX_OUTBOX {
            drop(q);
            stats.send_failed.incr();
            return false;
        }
        q.push_back(item);
        true
    }

    /// Moves up to one batch into `into`.
    fn take(&self, into: &mut Vec<Outgoing>) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let n = q.len().min(BATCH);
        into.extend(q.drain(..n));
    }
}

/// How many arrival stamps each peer keeps (indexed by request id).
const ARRIVALS: usize = 32;

/// The tarpc transport of one peer: requests come from the reader task's
/// queue, replies go to the shared outbox.
pub struct PeerTransport {
    peer: SocketAddr,
    inbox: mpsc::Receiver<Inbound>,
    outbox: Arc<Outbox>,
    stats: Arc<ServerStats>,
    context: tarpc::context::Context,
    /// When each request in flight arrived (its ts2), and its tag.
    arrivals: [Option<(u64, Timestamp, ReplyAs)>; ARRIVALS],
    max_in_flight: usize,
    has_keys: bool,
}

/// A peer's tarpc channel, as handed to the function that runs it.
pub type PeerChannel = BaseChannel<TimeServiceRequest, TimeServiceResponse, PeerTransport>;

impl PeerTransport {
    /// The address this channel serves.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn message_for(&mut self, inbound: Inbound) -> ClientMessage<TimeServiceRequest> {
        match inbound.frame {
            ClientFrame::Request { id, deadline, call } => {
                self.arrivals[(id % ARRIVALS as u64) as usize] =
                    Some((id, inbound.received, inbound.reply_as));
                let message = match call {
                    Call::Probe { ts1 } => TimeServiceRequest::Probe { ts1 },
                    Call::Now => TimeServiceRequest::Now {},
                };
                debug!(peer = %self.peer, id, call = ?call, "request");
                let mut context = self.context;
                // The wire decoder clamped `deadline`, so this cannot
                // overflow nor reach past tarpc's timer horizon.
                context.deadline = Instant::now() + deadline;
                ClientMessage::Request(Request {
                    context,
                    id,
                    message,
                })
            }
            ClientFrame::Cancel { id } => ClientMessage::Cancel {
                trace_context: Default::default(),
                request_id: id,
            },
        }
    }

    /// Hands a reply to the writer, with ts2 from the request's arrival.
    fn send(&mut self, response: Response<TimeServiceResponse>) {
        let id = response.request_id;
        let slot = &mut self.arrivals[(id % ARRIVALS as u64) as usize];
        let Some((_, arrival, reply_as)) = slot.take_if(|(sid, ..)| *sid == id) else {
            // The request's record was overwritten by later ones (more than
            // ARRIVALS in flight): its tag is gone, so an authenticated
            // reply cannot be made; an untagged one goes out with the
            // handler's own ts2.
            if self.has_keys {
                self.stats.send_failed.incr();
            } else {
                let reply = pending_reply(response.message, None);
                self.outbox.push(
                    Outgoing {
                        to: self.peer,
                        id,
                        reply,
                        reply_as: ReplyAs::Cerv(None),
                    },
                    &self.stats,
                );
            }
            return;
        };
        let reply = pending_reply(response.message, Some(arrival));
        self.outbox.push(
            Outgoing {
                to: self.peer,
                id,
                reply,
                reply_as,
            },
            &self.stats,
        );
    }
}

impl Stream for PeerTransport {
    type Item = Result<ClientMessage<TimeServiceRequest>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        this.inbox
            .poll_recv(cx)
            .map(|inbound| inbound.map(|i| Ok(this.message_for(i))))
    }
}

impl Sink<Response<TimeServiceResponse>> for PeerTransport {
    type Error = Infallible;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(
        mut self: Pin<&mut Self>,
        response: Response<TimeServiceResponse>,
    ) -> Result<(), Infallible> {
        self.send(response);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
}

/// Runs one peer's channel to completion: every request is handled
/// concurrently inside the peer's task, at most `max_in_flight` at a time
/// (more are answered "busy").
///
/// This drives tarpc's [`BaseChannel`] directly rather than through
/// `Channel::execute`: a handler's response goes straight back to the
/// channel instead of through a queue, a tracing span and a second poll of
/// the channel, which halves tarpc's cost per request. Deadlines and
/// cancellations still apply: the channel aborts a handler whose request
/// expired or was cancelled, and drops its response.
///
/// The caller passes this to [`UdpServer::run`], where the concrete type of
/// `serve` is known, which lets the compiler check that the future is
/// `Send`:
///
/// ```ignore
/// server.run(move |channel| run_channel(channel, handler.clone().serve()), shutdown)
/// ```
pub async fn run_channel<S>(channel: PeerChannel, serve: S)
where
    S: Serve<Req = TimeServiceRequest, Resp = TimeServiceResponse> + Clone,
{
    use futures::SinkExt;
    use futures::future::{Abortable, FutureExt};
    use futures::stream::FuturesUnordered;

    let limit = channel.get_ref().max_in_flight;
    let mut channel = std::pin::pin!(channel);
    let mut handlers = FuturesUnordered::new();
    let mut open = true;
    while open || !handlers.is_empty() {
        tokio::select! {
            biased;
            Some((request_id, result)) = handlers.next(), if !handlers.is_empty() => {
                // An aborted handler (expired or cancelled) has no answer.
                if let Ok(message) = result {
                    let _ = channel.send(Response { request_id, message }).await;
                }
            }
            next = channel.next(), if open => match next {
                Some(Ok(tracked)) => {
                    let request = tracked.request;
                    if handlers.len() >= limit {
                        let busy = tarpc::ServerError::new(
                            io::ErrorKind::WouldBlock,
                            "too many requests in flight".into(),
                        );
                        let _ = channel
                            .send(Response { request_id: request.id, message: Err(busy) })
                            .await;
                        continue;
                    }
                    let id = request.id;
                    let handler = serve.clone().serve(request.context, request.message);
                    handlers.push(
                        Abortable::new(handler, tracked.abort_registration)
                            .map(move |result| (id, result)),
                    );
                }
                // The transport never fails; the channel ends when the
                // reader drops this peer's queue.
                Some(Err(_)) | None => open = false,
            },
        }
    }
}

/// Sends what the peers put in the outbox, a batch at a time, until the
/// outbox is closed and empty.
/// Encodes and sends what the outbox holds: the writer task's work, and
/// the reader's after each batch it reads (so that answers given at once
/// leave in one `sendmmsg` per batch read, with no hop to another task).
struct Sender {
    socket: Arc<UdpSocket>,
    clock: Arc<dyn Clock>,
    stats: Arc<ServerStats>,
    keys: Option<Arc<KeyRing>>,
    taken: Vec<Outgoing>,
    batch: SendBatch,
    ntp_state: Option<NtpState>,
}

impl Sender {
    fn new(
        socket: Arc<UdpSocket>,
        clock: Arc<dyn Clock>,
        stats: Arc<ServerStats>,
        keys: Option<Arc<KeyRing>>,
        face: &Face,
    ) -> Sender {
        Sender {
            socket,
            clock,
            stats,
            keys,
            taken: Vec::with_capacity(BATCH),
            batch: SendBatch::default(),
            ntp_state: match face {
                Face::Ntp(ntp) => Some(NtpState::new(ntp.clone())),
                Face::Cerv => None,
            },
        }
    }

    /// Sends everything in the outbox, a batch at a time.
    async fn flush(&mut self, outbox: &Outbox) {
        loop {
            self.taken.clear();
            outbox.take(&mut self.taken);
            if self.taken.is_empty() {
                return;
            }
            self.send_taken().await;
        }
    }

    async fn send_taken(&mut self) {
        let fd = self.socket.as_raw_fd();
        let stats = &*self.stats;
        let batch = &mut self.batch;
        // One reading for the whole batch, taken just before it leaves;
        // the keys in force for the whole batch too.
        let now = self.clock.now();
        let keys_now = self.keys.as_ref().map(|k| k.current());
        // The NTP face's account of the clock, once per batch.
        let state = self.ntp_state.as_mut().map(|s| s.current(now));
        batch.clear();
        for out in self.taken.drain(..) {
            let to = out.to;
            match out.reply_as {
                ReplyAs::Cerv(auth) => {
                    let auth = auth.zip(keys_now.as_deref());
                    batch.push(to, |buf| encode_cerv(out, now, auth, buf, stats));
                }
                ReplyAs::Ntp(request) => {
                    let Some(state) = state else {
                        continue;
                    };
                    batch.push(to, |buf| encode_ntp(&request, out.reply, state, now, buf));
                }
                ReplyAs::Nts(nts) => {
                    let Some(state) = state else {
                        continue;
                    };
                    batch.push(to, |buf| {
                        encode_nts(&nts, out.reply, state, now, buf, stats)
                    });
                }
                ReplyAs::NtsNak(request) => {
                    batch.push(to, |buf| crate::nts::ef::write_nak(buf, &request).ok());
                }
            }
        }
        let mut start = 0;
        while start < batch.len() {
            match self
                .socket
                .async_io(Interest::WRITABLE, || batch.send(fd, start))
                .await
            {
                Ok(sent) => {
                    stats.replied.add(sent as u64);
                    start += sent.max(1);
                }
                Err(e) => {
                    // The first datagram of the rest failed (an unroutable
                    // peer, say): drop it and go on with the others.
                    stats.send_failed.incr();
                    debug!(error = %e, "reply not sent");
                    start += 1;
                }
            }
        }
    }
}

/// The writer task: sends replies that were not ready when their batch
/// was read (handlers that waited, tarpc channels), until the outbox
/// closes.
async fn write_replies(mut sender: Sender, outbox: Arc<Outbox>) {
    loop {
        sender.flush(&outbox).await;
        if outbox.closed.load(Ordering::Acquire) {
            // Anything pushed between the flush and the close goes too.
            sender.flush(&outbox).await;
            return;
        }
        outbox.ready.notified().await;
    }
}

/// Encodes a cerv reply, tagged with the key its request used, bound to
/// the request's tag. Every request was at least `MIN_REQUEST_LEN` bytes
/// (plus the trailer, when tagged) and a reply is cut to `MAX_REPLY_LEN`
/// (plus the trailer), so it is never larger than what caused it.
fn encode_cerv(
    out: Outgoing,
    now: Timestamp,
    auth: Option<(wire::Authenticated, &Keys)>,
    buf: &mut [u8],
    stats: &ServerStats,
) -> Option<usize> {
    let reply = match out.reply {
        PendingReply::Probe { ts1, ts2 } => Reply::Probe { ts1, ts2, ts3: now },
        PendingReply::Now => Reply::Now { time: now },
        PendingReply::Error { code, detail } => Reply::Error { code, detail },
        PendingReply::Kiss(_) | PendingReply::NtsNak => return None,
    };
    let frame = ServerFrame { id: out.id, reply };
    // The request was tagged with one of our keys (or decoding it would
    // have failed), and its reply is tagged with the same.
    let key = auth.and_then(|(a, keys)| keys.get(a.key_id).map(|key| (key, a.tag)));
    let len = match &key {
        Some((key, tag)) => wire::encode_server(&frame, buf, Some((key, tag))),
        None => wire::encode_server(&frame, &mut buf[..MAX_REPLY_LEN], None),
    };
    if len.is_none() {
        warn!(id = frame.id, "reply does not fit its request; dropped");
        stats.send_failed.incr();
    }
    len
}

/// Encodes an NTP reply: 48 bytes, never more than the request. A busy
/// server (too many requests waiting) answers with a Kiss-o'-Death RATE;
/// other errors have no NTP form and are dropped.
fn encode_ntp(
    request: &ntp::Header,
    reply: PendingReply,
    state: &ntp::ServerState,
    now: Timestamp,
    buf: &mut [u8],
) -> Option<usize> {
    match reply {
        PendingReply::Probe { ts2, .. } => Some(ntp::write_reply(request, state, ts2, now, buf)),
        PendingReply::Kiss(code) => Some(ntp::write_kiss(request, code, buf)),
        PendingReply::Error {
            code: ErrorCode::Busy,
            ..
        } => Some(ntp::write_kiss(request, RefId::RATE, buf)),
        PendingReply::Now | PendingReply::Error { .. } | PendingReply::NtsNak => None,
    }
}

/// Encodes an NTS reply: the NTP header, the unique identifier echoed,
/// then the authenticator over all of it with the fresh cookies inside
/// (no larger than the request: its placeholders made room). Errors have
/// no authenticated form (a client ignores unauthenticated kisses): they
/// are dropped.
fn encode_nts(
    nts: &NtsReply,
    reply: PendingReply,
    state: &ntp::ServerState,
    now: Timestamp,
    buf: &mut [u8],
    stats: &ServerStats,
) -> Option<usize> {
    let PendingReply::Probe { ts2, .. } = reply else {
        return None;
    };
    let header = ntp::write_reply(&nts.header, state, ts2, now, buf);
    match crate::nts::ef::write_reply(buf, header, &nts.request, &nts.cookies, &rand::random()) {
        Ok(len) => Some(len),
        Err(e) => {
            debug!(error = %e, "NTS reply not sent");
            stats.send_failed.incr();
            None
        }
    }
}

/// A tarpc server on one UDP socket.
pub struct UdpServer {
    socket: Arc<UdpSocket>,
    clock: Arc<dyn Clock>,
    config: ServerConfig,
    stats: Arc<ServerStats>,
}

struct Peer {
    inbox: mpsc::Sender<Inbound>,
    last_seen: u64,
}

/// How often idle peers are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// What the reader does with each decoded datagram.
trait Dispatch {
    /// Hands over one datagram from `from`; `tick` counts sweeps.
    fn dispatch(&mut self, from: SocketAddr, inbound: Inbound, tick: u64);
    /// Called every [`SWEEP_EVERY`].
    fn sweep(&mut self, tick: u64);
    /// Stops taking requests; returns the tasks still serving some.
    fn close(self) -> JoinSet<()>;
}

/// One tarpc channel per peer, in a bounded table (the design's server).
struct Channels<'a, F> {
    config: &'a ServerConfig,
    stats: Arc<ServerStats>,
    outbox: Arc<Outbox>,
    context: tarpc::context::Context,
    peers: HashMap<SocketAddr, Peer>,
    tasks: JoinSet<()>,
    run_channel: F,
    /// When the table fills, idle peers are evicted at most once per tick.
    evicted_at_tick: Option<u64>,
}

impl<F> Channels<'_, F> {
    /// Forgets peers last heard from before the sweep tick `before`.
    fn evict_idle(&mut self, before: u64) {
        let len = self.peers.len();
        self.peers.retain(|_, p| p.last_seen >= before);
        let evicted = len - self.peers.len();
        if evicted > 0 {
            self.stats.peers_evicted.add(evicted as u64);
            debug!(evicted, remaining = self.peers.len(), "evicted idle peers");
        }
    }
}

impl<F, Fut> Dispatch for Channels<'_, F>
where
    F: FnMut(PeerChannel) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn dispatch(&mut self, from: SocketAddr, mut inbound: Inbound, tick: u64) {
        let creates_peer = matches!(inbound.frame, ClientFrame::Request { .. });
        if let Some(peer) = self.peers.get_mut(&from) {
            peer.last_seen = tick;
            match peer.inbox.try_send(inbound) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.stats.queue_full.incr();
                    debug!(peer = %from, "peer queue full; dropping datagram");
                    return;
                }
                // The peer's channel ended: start a fresh one below.
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    self.peers.remove(&from);
                    inbound = back;
                }
            }
        }
        if !creates_peer {
            self.stats.stray.incr();
            return;
        }
        let max_peers = self.config.max_peers;
        if self.peers.len() >= max_peers && self.evicted_at_tick != Some(tick) {
            self.evicted_at_tick = Some(tick);
            self.evict_idle(tick);
        }
        if self.peers.len() >= max_peers {
            self.stats.table_full.incr();
            debug!(peer = %from, "peer table full; dropping datagram");
            return;
        }
        let (tx, rx) = mpsc::channel(self.config.peer_queue.max(1));
        let transport = PeerTransport {
            peer: from,
            inbox: rx,
            outbox: self.outbox.clone(),
            stats: self.stats.clone(),
            context: self.context,
            arrivals: std::array::from_fn(|_| None),
            max_in_flight: self.config.max_in_flight.max(1),
            has_keys: self.config.keys.is_some(),
        };
        // A fresh queue has room for one.
        let _ = tx.try_send(inbound);
        self.stats.peers_created.incr();
        self.peers.insert(
            from,
            Peer {
                inbox: tx,
                last_seen: tick,
            },
        );
        self.tasks
            .spawn((self.run_channel)(BaseChannel::with_defaults(transport)));
    }

    fn sweep(&mut self, tick: u64) {
        let idle_ticks =
            (self.config.idle_timeout.as_millis() / SWEEP_EVERY.as_millis()).max(1) as u64;
        self.evict_idle(tick.saturating_sub(idle_ticks));
        while self.tasks.try_join_next().is_some() {}
    }

    fn close(self) -> JoinSet<()> {
        // Closing every queue ends each channel once its requests are done.
        self.tasks
    }
}

/// The future a handler returns, boxed so that it can be polled in place
/// and, if it must wait, moved into a task of its own.
pub type HandlerFuture =
    Pin<Box<dyn Future<Output = Result<TimeServiceResponse, tarpc::ServerError>> + Send>>;

/// Most handlers waiting at once (over all peers) in inline dispatch.
const MAX_PENDING: usize = 4096;

/// Requests served in place, without per-peer state: each handler is
/// polled once as its datagram is read; one that answers at once (every
/// handler of cerv's, without a simulated processing delay) is answered
/// then and there, one that must wait gets a task of its own.
struct Inline<H> {
    config: ServerConfig,
    stats: Arc<ServerStats>,
    outbox: Arc<Outbox>,
    context: tarpc::context::Context,
    handler: H,
    pending: JoinSet<()>,
    /// How to abort each waiting handler on a cancel.
    waiting: HashMap<(SocketAddr, u64), tokio::task::AbortHandle>,
    /// Handlers waiting, per peer (each task counts itself out).
    per_peer: HashMap<SocketAddr, Arc<std::sync::atomic::AtomicUsize>>,
}

impl<H> Inline<H> {
    fn reply(
        &self,
        to: SocketAddr,
        id: u64,
        message: Result<TimeServiceResponse, tarpc::ServerError>,
        inbound: &Inbound,
    ) {
        self.outbox.push_for_reader(
            Outgoing {
                to,
                id,
                reply: pending_reply(message, Some(inbound.received)),
                reply_as: inbound.reply_as.clone(),
            },
            &self.stats,
        );
    }
}

impl<H> Dispatch for Inline<H>
where
    H: Fn(tarpc::context::Context, TimeServiceRequest) -> HandlerFuture,
{
    fn dispatch(&mut self, from: SocketAddr, inbound: Inbound, _tick: u64) {
        let (id, deadline, call) = match inbound.frame {
            ClientFrame::Request { id, deadline, call } => (id, deadline, call),
            ClientFrame::Cancel { id } => {
                match self.waiting.remove(&(from, id)) {
                    Some(handle) => handle.abort(),
                    None => self.stats.stray.incr(),
                }
                return;
            }
        };
        debug!(peer = %from, id, call = ?call, "request");
        let request = match call {
            Call::Probe { ts1 } => TimeServiceRequest::Probe { ts1 },
            Call::Now => TimeServiceRequest::Now {},
        };
        let mut context = self.context;
        // The wire decoder clamped `deadline`.
        let deadline = Instant::now() + deadline;
        context.deadline = deadline;
        let mut handler = (self.handler)(context, request);
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        if let Poll::Ready(message) = handler.as_mut().poll(&mut cx) {
            self.reply(from, id, message, &inbound);
            return;
        }
        // It must wait: give it a task, within the limits.
        let waiting_here = self
            .per_peer
            .get(&from)
            .map_or(0, |c| c.load(Ordering::Relaxed));
        if waiting_here >= self.config.max_in_flight || self.pending.len() >= MAX_PENDING {
            let busy = tarpc::ServerError::new(
                io::ErrorKind::WouldBlock,
                "too many requests in flight".into(),
            );
            self.reply(from, id, Err(busy), &inbound);
            return;
        }
        let waiting = InFlight::enter(self.per_peer.entry(from).or_default().clone());
        let outbox = self.outbox.clone();
        let stats = self.stats.clone();
        let received = inbound.received;
        let reply_as = inbound.reply_as;
        let handle = self.pending.spawn(async move {
            // Past its deadline the client has stopped waiting: no answer.
            if let Ok(message) = tokio::time::timeout_at(deadline.into(), handler).await {
                outbox.push(
                    Outgoing {
                        to: from,
                        id,
                        reply: pending_reply(message, Some(received)),
                        reply_as,
                    },
                    &stats,
                );
            }
            drop(waiting);
        });
        self.waiting.insert((from, id), handle);
    }

    fn sweep(&mut self, _tick: u64) {
        while self.pending.try_join_next().is_some() {}
        self.waiting.retain(|_, h| !h.is_finished());
        self.per_peer
            .retain(|_, count| Arc::strong_count(count) > 1);
    }

    fn close(self) -> JoinSet<()> {
        self.pending
    }
}

/// One waiting handler, counted in its peer's total while it lives (also
/// when its task is aborted).
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn enter(count: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a tarpc response becomes a reply for the writer, with ts2 taken from
/// the request's arrival when known.
fn pending_reply(
    message: Result<TimeServiceResponse, tarpc::ServerError>,
    arrival: Option<Timestamp>,
) -> PendingReply {
    match message {
        Ok(TimeServiceResponse::Probe(p)) => PendingReply::Probe {
            ts1: p.ts1,
            ts2: arrival.unwrap_or(p.ts2),
        },
        Ok(TimeServiceResponse::Now(_)) => PendingReply::Now,
        Err(e) => PendingReply::Error {
            code: ErrorCode::from_io_kind(e.kind),
            detail: e.detail,
        },
    }
}

impl UdpServer {
    /// A server reading `socket`, stamping with `clock`. Asks the kernel
    /// to stamp arrivals unless `config.stamping` says otherwise (and falls
    /// back to user-space stamps, with a warning, if it cannot).
    pub fn new(socket: UdpSocket, clock: Arc<dyn Clock>, config: ServerConfig) -> Self {
        if config.stamping == Stamping::Kernel
            && let Err(e) = enable_timestamps(&socket)
        {
            warn!(error = %e, "kernel receive timestamps unavailable; stamping in user space");
        }
        UdpServer {
            socket: Arc::new(socket),
            clock,
            config,
            stats: Arc::default(),
        }
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The server's counters, shared.
    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    fn new_outbox() -> Arc<Outbox> {
        Arc::new(Outbox {
            queue: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
        })
    }

    /// Serves with one tarpc channel per peer until `shutdown` completes,
    /// then lets requests in flight finish (within the configured grace) and
    /// returns the counters.
    ///
    /// `run_channel` is called once per new peer with that peer's channel
    /// and must return the future that serves it (usually
    /// [`run_channel`](fn@run_channel)); each runs in a task of its own.
    pub async fn run<F, Fut>(
        self,
        run_channel: F,
        shutdown: impl Future<Output = ()>,
    ) -> Arc<ServerStats>
    where
        F: FnMut(PeerChannel) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let outbox = Self::new_outbox();
        let config = self.config.clone();
        let channels = Channels {
            config: &config,
            stats: self.stats.clone(),
            outbox: outbox.clone(),
            context: tarpc::context::current(),
            peers: HashMap::new(),
            tasks: JoinSet::new(),
            run_channel,
            evicted_at_tick: None,
        };
        self.serve(channels, outbox, shutdown).await
    }

    /// Serves requests in place, without per-peer state, until `shutdown`
    /// completes. `handler` is called for every request and returns the
    /// handler's future boxed (for cerv:
    /// `move |ctx, req| Box::pin(handlers.clone().serve().serve(ctx, req))`).
    /// A handler that answers when first polled is answered at once; one
    /// that must wait runs in a task of its own, at most `max_in_flight`
    /// per peer, until its deadline.
    pub async fn run_inline<H>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Arc<ServerStats>
    where
        H: Fn(tarpc::context::Context, TimeServiceRequest) -> HandlerFuture,
    {
        let outbox = Self::new_outbox();
        let inline = Inline {
            config: self.config.clone(),
            stats: self.stats.clone(),
            outbox: outbox.clone(),
            context: tarpc::context::current(),
            handler,
            pending: JoinSet::new(),
            waiting: HashMap::new(),
            per_peer: HashMap::new(),
        };
        self.serve(inline, outbox, shutdown).await
    }

    /// The reader loop both dispatches share.
    async fn serve<D: Dispatch>(
        self,
        mut dispatch: D,
        outbox: Arc<Outbox>,
        shutdown: impl Future<Output = ()>,
    ) -> Arc<ServerStats> {
        let sender = || {
            Sender::new(
                self.socket.clone(),
                self.clock.clone(),
                self.stats.clone(),
                self.config.keys.clone(),
                &self.config.face,
            )
        };
        let writer = tokio::spawn(write_replies(sender(), outbox.clone()));
        let mut replier = sender();
        let mut batch = RecvBatch::default();
        let fd = self.socket.as_raw_fd();
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick: u64 = 0;
        let mut limiter = Limiter::new(self.config.rate_limit, DEFAULT_SLOTS);
        // The kisses sent to rate-limited NTP clients are limited too, per
        // source, in a smaller table.
        let mut kiss_limiter = match &self.config.face {
            Face::Ntp(ntp) => Limiter::new(ntp.kiss_limit, DEFAULT_SLOTS / 16),
            Face::Cerv => Limiter::new(RateLimit::OFF, 0),
        };
        let face = self.config.face.clone();
        let mut next_id = 0u64;
        let started = Instant::now();
        let mut last_log = (started, 0u64);
        tokio::pin!(shutdown);

        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                _ = sweep.tick() => {
                    tick += 1;
                    dispatch.sweep(tick);
                    let interval = self.config.stats_interval;
                    let received = self.stats.received.get();
                    if !interval.is_zero() && last_log.0.elapsed() >= interval && received != last_log.1 {
                        info!(stats = %self.stats, "counters");
                        last_log = (Instant::now(), received);
                    }
                }
                received = self.socket.async_io(Interest::READABLE, || batch.recv(fd)) => {
                    match received {
                        Ok(n) => {
                            self.stats.batches.observe(n as u64);
                            // One clock reading per batch for the limiter,
                            // and the keys in force (a reload swaps them).
                            let now = started.elapsed().as_nanos() as u64;
                            let keys_now = self.config.keys.as_ref().map(|k| k.current());
                            for (bytes, arrival) in batch.iter() {
                                self.stats.received.incr();
                                if let Some(from) = arrival.from
                                    && !limiter.allow(from.ip(), now)
                                {
                                    self.stats.rate_limited.incr();
                                    if let Some(request) = face::kiss_candidate(&face, bytes) {
                                        if kiss_limiter.allow(from.ip(), now) {
                                            self.stats.kiss_sent.incr();
                                            outbox.push_for_reader(Outgoing {
                                                to: from,
                                                id: 0,
                                                reply: PendingReply::Kiss(face::RATE_KISS),
                                                reply_as: ReplyAs::Ntp(request),
                                            }, &self.stats);
                                        } else {
                                            self.stats.kiss_suppressed.incr();
                                        }
                                    }
                                    continue;
                                }
                                match face::decode(
                                    &face,
                                    &self.stats,
                                    &*self.clock,
                                    keys_now.as_deref(),
                                    bytes,
                                    arrival,
                                    &mut next_id,
                                ) {
                                    Decoded::Request(from, inbound) => {
                                        dispatch.dispatch(from, inbound, tick);
                                    }
                                    Decoded::Nak(from, request) => outbox.push_for_reader(
                                        Outgoing {
                                            to: from,
                                            id: 0,
                                            reply: PendingReply::NtsNak,
                                            reply_as: ReplyAs::NtsNak(request),
                                        },
                                        &self.stats,
                                    ),
                                    Decoded::Dropped => {}
                                }
                            }
                            // The answers given at once leave now, together.
                            replier.flush(&outbox).await;
                        }
                        Err(e) => {
                            if !is_transient(&e) {
                                warn!(error = %e, "udp receive failed");
                            }
                            self.stats.recv_failed.incr();
                            tokio::task::yield_now().await;
                        }
                    }
                }
            }
        }

        // Let requests in flight finish; then the writer sends what is
        // left and stops.
        let grace = self.config.shutdown_grace;
        let mut tasks = dispatch.close();
        if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            warn!(
                remaining = tasks.len(),
                "requests still in flight at shutdown; abandoned"
            );
            tasks.abort_all();
        }
        outbox.closed.store(true, Ordering::Release);
        outbox.ready.notify_one();
        if tokio::time::timeout(grace, writer).await.is_err() {
            warn!("replies still unsent at shutdown; abandoned");
        }
        info!(stats = %self.stats, "server stopped");
        self.stats
    }
}
