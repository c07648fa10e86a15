//! The server side of the UDP transport: one socket, demultiplexed by peer.
//!
//! ```text
//!            ┌────────────── reader thread ──────────────┐   inline:   handler, polled in place
//! datagrams ─▶ recvmmsg (blocking) → kernel ts2 → decode  ├─▶ or
//!            └───────────────────────────────────────────┘   channels: peer table → queue → BaseChannel → handler
//!                                                                                 │ (tasks on the runtime)
//! replies ◀──── sendmmsg ◀── stamp ts3, encode ◀── reader (after each batch)       │
//!                                              ◀── writer thread ◀── outbox ◀─────┘ (later replies)
//! ```
//!
//! An NTP face's requests are answered by the reader itself: an NTP
//! reply is the arrival stamp, the send stamp and the server's account of
//! its clock, with no tarpc call in it for a handler to serve. The cerv
//! wire's requests are tarpc calls, and two ways to dispatch them share
//! the reader and the writer:
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
//! **Threads, not the runtime.** The socket is read by a thread of its own
//! that blocks in `recvmmsg`, as a bare echo server does: the kernel wakes
//! it straight from the socket. Registered with the runtime's epoll
//! instance instead, the socket would wake that instance for every datagram
//! that arrives and for every reply the kernel frees (about a twentieth of
//! a busy server's time), and a request that finds the server idle would
//! wait for the runtime, then for the task. The runtime keeps only what
//! must wait (handlers that sleep, tarpc channels); the replies those give
//! later reach a writer thread through the outbox.
//!
//! Datagrams are read and replies sent in batches ([`super::batch`]): one
//! system call for up to 64 datagrams. After each batch it reads, the reader
//! sends the answers given at once, in one `sendmmsg`; the writer sends
//! what comes later. Either reads the clock once, stamps ts3 (and `now()`'s
//! answer) with it and sends the lot, so the stamp is taken just before the
//! replies leave, however many there are.
//!
//! A stop sets a flag and shuts the socket for reading, which ends the
//! reader's blocked `recvmmsg` at once; nothing is answered once
//! [`UdpServer::run`] or [`UdpServer::run_inline`] has returned.

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
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tarpc::server::{BaseChannel, Serve};
use tarpc::{ClientMessage, Request, Response};
use tokio::sync::mpsc;
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

/// Replies that were not ready when their request was read (handlers
/// that waited, tarpc channels), from every peer, for the writer thread.
struct Outbox {
    state: Mutex<OutboxState>,
    ready: Condvar,
}

struct OutboxState {
    queue: VecDeque<Outgoing>,
    closed: bool,
}

/// Most replies waiting for the writer; more are dropped and counted.
const MAX_OUTBOX: usize = 16 * 1024;

impl Outbox {
    fn new() -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(OutboxState {
                queue: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a reply for the writer, and wakes it.
    fn push(&self, item: Outgoing, stats: &ServerStats) {
        let mut state = self.lock();
        if state.queue.len() >= MAX_OUTBOX || state.closed {
            drop(state);
            stats.send_failed.incr();
            return;
        }
        state.queue.push_back(item);
        drop(state);
        self.ready.notify_one();
    }

    /// Waits for replies and moves up to one batch into `into`; false once
    /// the outbox is closed and empty.
    fn take(&self, into: &mut Vec<Outgoing>) -> bool {
        let mut state = self.lock();
        while state.queue.is_empty() && !state.closed {
            state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        let n = state.queue.len().min(BATCH);
        into.extend(state.queue.drain(..n));
        n > 0 || !state.closed
    }

    /// No more replies: the writer sends what is queued and stops.
    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

/// How many arrival stamps each peer keeps (indexed by request id).
const ARRIVALS: usize = 32;

/// The tarpc transport of one peer: requests come from the reader thread's
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
            // ARRIVALS in flight): its arrival time and its tag are gone,
            // and a reply without them would be no answer (the client
            // asks again).
            self.stats.send_failed.incr();
            debug!(peer = %self.peer, id, "arrival of a request forgotten; no reply");
            return;
        };
        let reply = pending_reply(response.message, arrival);
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

/// Encodes and sends replies: the reader's after each batch it reads (the
/// answers given at once leave in one `sendmmsg`, with no hop to another
/// thread), and the writer's (replies that came later).
struct Sender {
    socket: Arc<UdpSocket>,
    clock: Arc<dyn Clock>,
    stats: Arc<ServerStats>,
    keys: Option<Arc<KeyRing>>,
    batch: SendBatch,
    ntp_state: Option<NtpState>,
}

impl Sender {
    fn new(server: &UdpServer) -> Sender {
        Sender {
            socket: server.socket.clone(),
            clock: server.clock.clone(),
            stats: server.stats.clone(),
            keys: server.config.keys.clone(),
            batch: SendBatch::default(),
            ntp_state: match &server.config.face {
                Face::Ntp(ntp) => Some(NtpState::new(ntp.clone())),
                Face::Cerv => None,
            },
        }
    }

    /// Encodes and sends `replies` (at most one batch), emptying it.
    fn send(&mut self, replies: &mut Vec<Outgoing>) {
        if replies.is_empty() {
            return;
        }
        let fd = self.socket.as_raw_fd();
        let stats = &*self.stats;
        let batch = &mut self.batch;
        // One reading for the whole batch, taken just before it leaves;
        // the keys in force for the whole batch too.
        let now = self.clock.now();
        let keys_now = self.keys.as_ref().map(|k| k.current());
        // The NTP face's account of the clock and the reply header it
        // makes, with ts3 in place, once per batch.
        let template = self
            .ntp_state
            .as_mut()
            .map(|s| ntp::ReplyTemplate::new(s.current(now), now));
        batch.clear();
        for out in replies.drain(..) {
            let to = out.to;
            match out.reply_as {
                ReplyAs::Cerv(auth) => {
                    let auth = auth.zip(keys_now.as_deref());
                    batch.push(to, |buf| {
                        encode_cerv(out.id, out.reply, now, auth, buf, stats)
                    });
                }
                ReplyAs::Ntp(request) => {
                    let Some(template) = &template else {
                        continue;
                    };
                    batch.push(to, |buf| encode_ntp(request, out.reply, template, buf));
                }
                ReplyAs::Nts(nts) => {
                    let Some(template) = &template else {
                        continue;
                    };
                    batch.push(to, |buf| encode_nts(&nts, out.reply, template, buf, stats));
                }
                ReplyAs::NtsNak(request) => {
                    batch.push(to, |buf| crate::nts::ef::write_nak(buf, &request).ok());
                }
            }
        }
        // The socket blocks (a full send buffer holds the sender back, up
        // to its send timeout); a datagram the kernel refuses is dropped.
        let mut start = 0;
        while start < batch.len() {
            match batch.send(fd, start) {
                Ok(sent) => {
                    stats.replied.add(sent as u64);
                    start += sent.max(1);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
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

/// The writer thread: sends the replies that were not ready when their
/// batch was read (handlers that waited, tarpc channels), until the outbox
/// is closed and empty.
fn write_replies(mut sender: Sender, outbox: &Outbox) {
    let mut taken = Vec::with_capacity(BATCH);
    while outbox.take(&mut taken) {
        sender.send(&mut taken);
    }
}

/// Encodes a cerv reply, tagged with the key its request used, bound to
/// the request's tag. Every request was at least `MIN_REQUEST_LEN` bytes
/// (plus the trailer, when tagged) and a reply is cut to `MAX_REPLY_LEN`
/// (plus the trailer), so it is never larger than what caused it.
fn encode_cerv(
    id: u64,
    reply: PendingReply,
    now: Timestamp,
    auth: Option<(wire::Authenticated, &Keys)>,
    buf: &mut [u8],
    stats: &ServerStats,
) -> Option<usize> {
    let reply = match reply {
        PendingReply::Probe { ts1, ts2 } => Reply::Probe { ts1, ts2, ts3: now },
        PendingReply::Now => Reply::Now { time: now },
        PendingReply::Error { code, detail } => Reply::Error { code, detail },
        PendingReply::Kiss(_) | PendingReply::NtsNak => return None,
    };
    let frame = ServerFrame { id, reply };
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

/// Encodes an NTP reply (48 bytes, never more than the request) or a
/// Kiss-o'-Death. NTP requests are answered by the transport, never by a
/// handler, so nothing else reaches here.
fn encode_ntp(
    request: ntp::Echo,
    reply: PendingReply,
    template: &ntp::ReplyTemplate,
    buf: &mut [u8],
) -> Option<usize> {
    match reply {
        PendingReply::Probe { ts2, .. } => Some(template.write(request, ts2, buf)),
        PendingReply::Kiss(code) => Some(ntp::write_kiss(request, code, buf)),
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
    template: &ntp::ReplyTemplate,
    buf: &mut [u8],
    stats: &ServerStats,
) -> Option<usize> {
    let PendingReply::Probe { ts2, .. } = reply else {
        return None;
    };
    let header = template.write(nts.header, ts2, buf);
    match crate::nts::ef::write_reply(buf, header, &nts.request, nts.cookies(), &rand::random()) {
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

/// How long the reader blocks in `recvmmsg` at most, so that it sweeps
/// (and sees a stop that did not wake it) on time while idle.
const RECV_TIMEOUT: Duration = Duration::from_millis(100);

/// How long a reply may wait for room in the socket's send buffer before
/// it is dropped.
const SEND_TIMEOUT: Duration = Duration::from_millis(100);

/// What holds for every datagram of one batch.
struct BatchContext {
    /// When the batch was read (a monotonic reading, once per batch).
    now: Instant,
    /// Sweeps so far.
    tick: u64,
}

/// What the reader does with each decoded datagram.
trait Dispatch {
    /// Hands over one datagram from `from`; an answer given at once goes
    /// in `replies`, to leave with the rest of the batch's.
    fn dispatch(
        &mut self,
        from: SocketAddr,
        inbound: Inbound,
        batch: &BatchContext,
        replies: &mut Vec<Outgoing>,
    );
    /// Called every [`SWEEP_EVERY`].
    fn sweep(&mut self, tick: u64);
    /// Stops taking requests; returns the tasks still serving some.
    fn close(self) -> JoinSet<()>;
}

/// One tarpc channel per peer, in a bounded table (the design's server).
struct Channels<F> {
    config: ServerConfig,
    stats: Arc<ServerStats>,
    outbox: Arc<Outbox>,
    context: tarpc::context::Context,
    peers: HashMap<SocketAddr, Peer>,
    tasks: JoinSet<()>,
    run_channel: F,
    /// When the table fills, idle peers are evicted at most once per tick.
    evicted_at_tick: Option<u64>,
}

impl<F> Channels<F> {
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

impl<F, Fut> Dispatch for Channels<F>
where
    F: FnMut(PeerChannel) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn dispatch(
        &mut self,
        from: SocketAddr,
        mut inbound: Inbound,
        batch: &BatchContext,
        _: &mut Vec<Outgoing>,
    ) {
        let tick = batch.tick;
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
struct Inline<H, F> {
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
    /// The room the last handler that answered at once was polled in:
    /// the next one is written into it, so a server whose handlers all
    /// answer at once allocates nothing per request.
    spare: Option<Pin<Box<F>>>,
}

impl<H, F> Dispatch for Inline<H, F>
where
    H: Fn(tarpc::context::Context, TimeServiceRequest) -> F,
    F: Future<Output = Result<TimeServiceResponse, tarpc::ServerError>> + Send + 'static,
{
    fn dispatch(
        &mut self,
        from: SocketAddr,
        inbound: Inbound,
        batch: &BatchContext,
        replies: &mut Vec<Outgoing>,
    ) {
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
        let deadline = batch.now + deadline;
        context.deadline = deadline;
        let future = (self.handler)(context, request);
        let mut handler = match self.spare.take() {
            Some(mut room) => {
                room.set(future);
                room
            }
            None => Box::pin(future),
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let answer = match handler.as_mut().poll(&mut cx) {
            Poll::Ready(message) => {
                self.spare = Some(handler);
                message
            }
            Poll::Pending => {
                let waiting_here = self
                    .per_peer
                    .get(&from)
                    .map_or(0, |c| c.load(Ordering::Relaxed));
                if waiting_here < self.config.max_in_flight && self.pending.len() < MAX_PENDING {
                    self.wait(from, id, deadline, handler, inbound);
                    return;
                }
                Err(tarpc::ServerError::new(
                    io::ErrorKind::WouldBlock,
                    "too many requests in flight".into(),
                ))
            }
        };
        replies.push(Outgoing {
            to: from,
            id,
            reply: pending_reply(answer, inbound.received),
            reply_as: inbound.reply_as,
        });
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

impl<H, F> Inline<H, F>
where
    F: Future<Output = Result<TimeServiceResponse, tarpc::ServerError>> + Send + 'static,
{
    /// Gives a handler that must wait a task of its own; its answer goes
    /// to the writer, unless its deadline passes first.
    fn wait(
        &mut self,
        from: SocketAddr,
        id: u64,
        deadline: Instant,
        handler: Pin<Box<F>>,
        inbound: Inbound,
    ) {
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
                        reply: pending_reply(message, received),
                        reply_as,
                    },
                    &stats,
                );
            }
            drop(waiting);
        });
        self.waiting.insert((from, id), handle);
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
/// the request's arrival (the handler's own readings are never used).
fn pending_reply(
    message: Result<TimeServiceResponse, tarpc::ServerError>,
    arrival: Timestamp,
) -> PendingReply {
    match message {
        Ok(TimeServiceResponse::Probe(p)) => PendingReply::Probe {
            ts1: p.ts1,
            ts2: arrival,
        },
        Ok(TimeServiceResponse::Now(_)) => PendingReply::Now,
        Err(e) => PendingReply::Error {
            code: ErrorCode::from_io_kind(e.kind),
            detail: e.detail,
        },
    }
}

/// The reader thread's state: it reads the socket, blocking in
/// `recvmmsg` as a bare echo server does (a thread woken straight from the
/// socket, which no epoll instance watches), checks and decodes each
/// datagram, dispatches it, and sends the batch's answers itself.
struct Reader<D> {
    socket: Arc<UdpSocket>,
    clock: Arc<dyn Clock>,
    config: ServerConfig,
    stats: Arc<ServerStats>,
    dispatch: D,
    sender: Sender,
}

impl<D: Dispatch> Reader<D> {
    /// Serves until `stop` is set (and the socket shut for reading, which
    /// wakes it); returns the dispatch, whose waiting tasks the caller
    /// lets finish.
    fn run(mut self, stop: &AtomicBool) -> D {
        let mut batch = RecvBatch::default();
        let mut replies: Vec<Outgoing> = Vec::with_capacity(BATCH);
        let fd = self.socket.as_raw_fd();
        let started = Instant::now();
        let mut last_sweep = started;
        let mut tick: u64 = 0;
        let mut limiter = Limiter::new(self.config.rate_limit, DEFAULT_SLOTS);
        // The kisses sent to rate-limited NTP clients are limited too, per
        // source, in a smaller table.
        let mut kiss_limiter = match &self.config.face {
            Face::Ntp(ntp) => Limiter::new(ntp.kiss_limit, DEFAULT_SLOTS / 16),
            Face::Cerv => Limiter::new(RateLimit::OFF, 0),
        };
        let face = self.config.face.clone();
        let mut last_log = (started, 0u64);
        loop {
            let received = batch.recv(fd, true);
            if stop.load(Ordering::Acquire) {
                break;
            }
            let now = Instant::now();
            if now.duration_since(last_sweep) >= SWEEP_EVERY {
                last_sweep = now;
                tick += 1;
                self.dispatch.sweep(tick);
                let interval = self.config.stats_interval;
                let count = self.stats.received.get();
                if !interval.is_zero() && last_log.0.elapsed() >= interval && count != last_log.1 {
                    info!(stats = %self.stats, "counters");
                    last_log = (now, count);
                }
            }
            let n = match received {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    if !is_transient(&e) {
                        warn!(error = %e, "udp receive failed");
                        // Not something the network did: do not spin on it.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    self.stats.recv_failed.incr();
                    continue;
                }
            };
            self.stats.batches.observe(n as u64);
            // One clock reading per batch for the limiter, and the keys in
            // force (a reload swaps them).
            let context = BatchContext { now, tick };
            let now_ns = now.duration_since(started).as_nanos() as u64;
            let keys_now = self.config.keys.as_ref().map(|k| k.current());
            self.stats.received.add(n as u64);
            for (bytes, arrival) in batch.iter() {
                if let Some(from) = arrival.from
                    && !limiter.allow(from.ip(), now_ns)
                {
                    self.stats.rate_limited.incr();
                    if let Some(request) = face::kiss_candidate(&face, bytes) {
                        if kiss_limiter.allow(from.ip(), now_ns) {
                            self.stats.kiss_sent.incr();
                            replies.push(Outgoing {
                                to: from,
                                id: 0,
                                reply: PendingReply::Kiss(face::RATE_KISS),
                                reply_as: ReplyAs::Ntp(request),
                            });
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
                ) {
                    Decoded::Request(from, inbound) => {
                        self.dispatch
                            .dispatch(from, inbound, &context, &mut replies);
                    }
                    Decoded::Answer {
                        to,
                        received,
                        reply_as,
                    } => replies.push(Outgoing {
                        to,
                        id: 0,
                        reply: PendingReply::Probe {
                            ts1: Timestamp::EPOCH,
                            ts2: received,
                        },
                        reply_as,
                    }),
                    Decoded::Nak(from, request) => replies.push(Outgoing {
                        to: from,
                        id: 0,
                        reply: PendingReply::NtsNak,
                        reply_as: ReplyAs::NtsNak(request),
                    }),
                    Decoded::Dropped => {}
                }
            }
            // The answers given at once leave now, together.
            self.sender.send(&mut replies);
        }
        self.dispatch
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

    /// Serves with one tarpc channel per peer until `shutdown` completes,
    /// then lets requests in flight finish (within the configured grace) and
    /// returns the counters.
    ///
    /// `run_channel` is called once per new peer with that peer's channel
    /// and must return the future that serves it (usually
    /// [`run_channel`](fn@run_channel)); each runs in a task of its own on
    /// the runtime this is called from.
    pub async fn run<F, Fut>(
        self,
        run_channel: F,
        shutdown: impl Future<Output = ()>,
    ) -> Arc<ServerStats>
    where
        F: FnMut(PeerChannel) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let outbox = Outbox::new();
        let channels = Channels {
            config: self.config.clone(),
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
    /// handler's future (for cerv:
    /// `move |ctx, req| handlers.clone().serve().serve(ctx, req)`).
    /// A handler that answers when first polled is answered at once; one
    /// that must wait runs in a task of its own on the runtime this is
    /// called from, at most `max_in_flight` per peer, until its deadline.
    pub async fn run_inline<H, F>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Arc<ServerStats>
    where
        H: Fn(tarpc::context::Context, TimeServiceRequest) -> F + Send + 'static,
        F: Future<Output = Result<TimeServiceResponse, tarpc::ServerError>> + Send + 'static,
    {
        let outbox = Outbox::new();
        let inline = Inline {
            config: self.config.clone(),
            stats: self.stats.clone(),
            outbox: outbox.clone(),
            context: tarpc::context::current(),
            handler,
            pending: JoinSet::new(),
            waiting: HashMap::new(),
            per_peer: HashMap::new(),
            spare: None,
        };
        self.serve(inline, outbox, shutdown).await
    }

    /// Runs the reader and writer threads until `shutdown` completes.
    ///
    /// The socket is served by threads of its own, not by the runtime: a
    /// socket an epoll instance watches wakes that instance for every
    /// datagram that arrives and every reply the kernel frees, which costs
    /// a busy server about a twentieth of its time, and a request that
    /// finds the server idle would wait for the runtime to wake, then for
    /// the task. The runtime keeps what must wait (handlers that sleep,
    /// tarpc channels); their replies reach the writer thread through the
    /// outbox.
    async fn serve<D: Dispatch + Send + 'static>(
        self,
        dispatch: D,
        outbox: Arc<Outbox>,
        shutdown: impl Future<Output = ()>,
    ) -> Arc<ServerStats> {
        let runtime = tokio::runtime::Handle::current();
        if let Err(e) = self.socket.set_nonblocking(false).and_then(|()| {
            let s = socket2::SockRef::from(&*self.socket);
            s.set_read_timeout(Some(RECV_TIMEOUT))?;
            s.set_write_timeout(Some(SEND_TIMEOUT))
        }) {
            warn!(error = %e, "cannot set the socket's timeouts");
        }
        let name = |role| match &self.config.face {
            Face::Cerv => format!("cerv-{role}"),
            Face::Ntp(_) => format!("ntp-{role}"),
        };
        let writer = {
            let (sender, outbox) = (Sender::new(&self), outbox.clone());
            std::thread::Builder::new()
                .name(name("writer"))
                .spawn(move || write_replies(sender, &outbox))
        };
        let stop = Arc::new(AtomicBool::new(false));
        // However this future ends (also dropped with its runtime), the
        // threads stop.
        let _stop_threads = StopThreads {
            stop: stop.clone(),
            socket: self.socket.clone(),
            outbox: outbox.clone(),
        };
        let (done, finished) = tokio::sync::oneshot::channel();
        let reader = Reader {
            sender: Sender::new(&self),
            socket: self.socket.clone(),
            clock: self.clock.clone(),
            config: self.config.clone(),
            stats: self.stats.clone(),
            dispatch,
        };
        let reader = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(name("reader"))
                .spawn(move || {
                    // Handlers that must wait are spawned onto the runtime.
                    let _runtime = runtime.enter();
                    let _ = done.send(reader.run(&stop));
                })
        };
        let (writer, reader) = match (writer, reader) {
            (Ok(w), Ok(r)) => (w, r),
            (w, r) => {
                let e = w
                    .err()
                    .or(r.err())
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                warn!(error = %e, "cannot start the socket's threads");
                return self.stats;
            }
        };
        shutdown.await;
        stop_reader(&stop, &self.socket);
        let dispatch = finished.await;
        let _ = reader.join();

        // Let requests in flight finish; then the writer sends what is
        // left and stops.
        let grace = self.config.shutdown_grace;
        if let Ok(dispatch) = dispatch {
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
        } else {
            warn!("the socket's reader thread failed");
        }
        outbox.close();
        let writer = tokio::task::spawn_blocking(move || writer.join());
        if tokio::time::timeout(grace, writer).await.is_err() {
            warn!("replies still unsent at shutdown; abandoned");
        }
        info!(stats = %self.stats, "server stopped");
        self.stats
    }
}

/// Tells the reader thread to stop and wakes it: a socket shut for
/// reading ends a blocked receive at once (the call reports ENOTCONN on an
/// unconnected UDP socket, and does it all the same).
fn stop_reader(stop: &AtomicBool, socket: &UdpSocket) {
    stop.store(true, Ordering::Release);
    // SAFETY: shutdown(2) on a descriptor the server owns.
    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RD) };
}

/// Stops a server's threads when dropped.
struct StopThreads {
    stop: Arc<AtomicBool>,
    socket: Arc<UdpSocket>,
    outbox: Arc<Outbox>,
}

impl Drop for StopThreads {
    fn drop(&mut self) {
        stop_reader(&self.stop, &self.socket);
        self.outbox.close();
    }
}
