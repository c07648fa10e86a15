//! The server side of the UDP transport: one socket, one tarpc channel per
//! peer.
//!
//! ```text
//!             ┌────────── reader task ──────────┐
//!  datagram ─▶│ stamp ts2 → decode → peer table │──queue──▶ peer channel ─▶ handler
//!             └─────────────────────────────────┘   (bounded)   │
//!  reply  ◀──────────────── stamp ts3, encode, send_to ◀────────┘
//! ```
//!
//! A peer is a source address. tarpc request ids restart at zero in every
//! client, so each peer gets its own [`tarpc::server::BaseChannel`], run by
//! the caller-supplied function in a task of its own. The peer table is
//! bounded; idle peers are evicted, and when the table is full new peers are
//! turned away (and counted) until an idle one can be evicted. Each peer's
//! queue is bounded, and a datagram that finds it full is dropped: UDP
//! semantics, and the client retries.

use super::socket::{Stamping, enable_timestamps, recv_stamped_async};
use super::{Counter, is_transient};
use crate::clock::Clock;
use crate::rpc::{TimeServiceRequest, TimeServiceResponse};
use crate::time::Timestamp;
use crate::wire::{
    self, Call, ClientFrame, DatagramBuf, DecodeError, MAX_DATAGRAM, MIN_REQUEST_LEN, Reply,
    ServerFrame,
};
use futures::{Sink, Stream, StreamExt};
use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tarpc::server::{BaseChannel, Channel, Serve};
use tarpc::{ClientMessage, Request, Response};
use tokio::net::UdpSocket;
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_peers: 4096,
            peer_queue: 32,
            idle_timeout: Duration::from_secs(30),
            max_in_flight: 32,
            shutdown_grace: Duration::from_secs(2),
            stamping: Stamping::Kernel,
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
    /// Dropped because the peer's queue was full.
    pub queue_full: Counter,
    /// Dropped because the peer table was full.
    pub table_full: Counter,
    /// Cancels from peers with nothing in flight.
    pub stray: Counter,
    /// Replies that could not be sent.
    pub send_failed: Counter,
    /// Errors reading the socket.
    pub recv_failed: Counter,
    /// Peers added to the table.
    pub peers_created: Counter,
    /// Peers evicted for being idle.
    pub peers_evicted: Counter,
}

impl ServerStats {
    /// Every datagram dropped for any reason.
    pub fn dropped(&self) -> u64 {
        self.oversized.get()
            + self.unpadded.get()
            + self.malformed.get()
            + self.queue_full.get()
            + self.table_full.get()
            + self.stray.get()
    }

    fn count_decode_error(&self, e: DecodeError) {
        match e {
            DecodeError::Oversized => self.oversized.incr(),
            DecodeError::Unpadded => self.unpadded.incr(),
            _ => self.malformed.incr(),
        }
    }
}

impl fmt::Display for ServerStats {
    /// `received 12, replied 10, peers 2; dropped: malformed 2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received {}, replied {}, peers {}",
            self.received.get(),
            self.replied.get(),
            self.peers_created.get()
        )?;
        let drops = [
            ("oversized", &self.oversized),
            ("unpadded", &self.unpadded),
            ("malformed", &self.malformed),
            ("queue full", &self.queue_full),
            ("table full", &self.table_full),
            ("stray", &self.stray),
            ("send failed", &self.send_failed),
            ("recv failed", &self.recv_failed),
        ];
        let mut first = true;
        for (name, counter) in drops {
            let n = counter.get();
            if n > 0 {
                f.write_str(if first { "; dropped: " } else { ", " })?;
                first = false;
                write!(f, "{name} {n}")?;
            }
        }
        Ok(())
    }
}

/// A decoded datagram on its way to a peer's channel.
struct Inbound {
    frame: ClientFrame,
    received: Timestamp,
}

/// How many arrival stamps each peer keeps (indexed by request id).
const ARRIVALS: usize = 32;

/// The tarpc transport of one peer: requests come from the reader task's
/// queue, replies go straight out of the shared socket.
pub struct PeerTransport {
    peer: SocketAddr,
    inbox: mpsc::Receiver<Inbound>,
    socket: Arc<UdpSocket>,
    clock: Arc<dyn Clock>,
    stats: Arc<ServerStats>,
    context: tarpc::context::Context,
    /// When each request in flight arrived: its ts2.
    arrivals: [Option<(u64, Timestamp)>; ARRIVALS],
    outbox: Option<Response<TimeServiceResponse>>,
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
                self.arrivals[(id % ARRIVALS as u64) as usize] = Some((id, inbound.received));
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

    /// Sends the queued reply, stamping ts3 (or now()'s time) just before
    /// the send.
    fn poll_send_outbox(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(response) = &self.outbox else {
            return Poll::Ready(());
        };
        let id = response.request_id;
        let slot = &mut self.arrivals[(id % ARRIVALS as u64) as usize];
        let arrival = slot.filter(|(sid, _)| *sid == id).map(|(_, at)| at);
        let reply = match &response.message {
            Ok(TimeServiceResponse::Probe(p)) => Reply::Probe {
                ts1: p.ts1,
                ts2: arrival.unwrap_or(p.ts2),
                ts3: self.clock.now(),
            },
            Ok(TimeServiceResponse::Now(_)) => Reply::Now {
                time: self.clock.now(),
            },
            Err(e) => Reply::Error {
                code: wire::ErrorCode::from_io_kind(e.kind),
                detail: e.detail.clone(),
            },
        };
        let mut buf: DatagramBuf = [0; MAX_DATAGRAM];
        // Every request was at least MIN_REQUEST_LEN bytes, so a reply of at
        // most that size is never larger than what caused it.
        let Some(len) = wire::encode_server(&ServerFrame { id, reply }, &mut buf, MIN_REQUEST_LEN)
        else {
            warn!(peer = %self.peer, id, "reply does not fit its request; dropped");
            self.stats.send_failed.incr();
            self.outbox = None;
            return Poll::Ready(());
        };
        match self.socket.poll_send_to(cx, &buf[..len], self.peer) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(_)) => self.stats.replied.incr(),
            Poll::Ready(Err(e)) => {
                self.stats.send_failed.incr();
                debug!(peer = %self.peer, error = %e, "reply not sent");
            }
        }
        *slot = None;
        self.outbox = None;
        Poll::Ready(())
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

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.poll_send_outbox(cx).map(Ok)
    }

    fn start_send(
        mut self: Pin<&mut Self>,
        response: Response<TimeServiceResponse>,
    ) -> Result<(), Infallible> {
        self.outbox = Some(response);
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.poll_send_outbox(cx).map(Ok)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.poll_send_outbox(cx).map(Ok)
    }
}

/// Runs one peer's channel to completion: every request is handled
/// concurrently inside the peer's task, at most `max_in_flight` at a time.
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
    let limit = channel.get_ref().max_in_flight;
    channel
        .max_concurrent_requests(limit)
        .execute(serve)
        .for_each_concurrent(None, |handler| handler)
        .await;
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

    /// Serves until `shutdown` completes, then lets requests in flight finish
    /// (within the configured grace) and returns the counters.
    ///
    /// `run_channel` is called once per new peer with that peer's channel
    /// and must return the future that serves it (usually
    /// [`run_channel`](fn@run_channel)); each runs in a task of its own.
    pub async fn run<F, Fut>(
        self,
        mut run_channel: F,
        shutdown: impl Future<Output = ()>,
    ) -> Arc<ServerStats>
    where
        F: FnMut(PeerChannel) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut peers: HashMap<SocketAddr, Peer> = HashMap::new();
        let mut tasks = JoinSet::new();
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let idle_ticks =
            (self.config.idle_timeout.as_millis() / SWEEP_EVERY.as_millis()).max(1) as u64;
        let mut tick: u64 = 0;
        // When the table fills, idle peers are evicted at most once per tick.
        let mut evicted_at_tick = None;
        let context = tarpc::context::current();
        tokio::pin!(shutdown);

        loop {
            let (arrival, from) = tokio::select! {
                biased;
                () = &mut shutdown => break,
                _ = sweep.tick() => {
                    tick += 1;
                    self.evict_idle(&mut peers, tick.saturating_sub(idle_ticks));
                    while tasks.try_join_next().is_some() {}
                    continue;
                }
                received = recv_stamped_async(&self.socket, &mut buf) => match received {
                    Ok(arrival) => match arrival.from {
                        Some(from) => (arrival, from),
                        None => continue,
                    },
                    Err(e) => {
                        if !is_transient(&e) {
                            warn!(error = %e, "udp receive failed");
                        }
                        self.stats.recv_failed.incr();
                        tokio::task::yield_now().await;
                        continue;
                    }
                },
            };
            let received = arrival.time_on(&*self.clock);
            self.stats.received.incr();
            let frame = match wire::decode_client(&buf[..arrival.len]) {
                Ok(frame) => frame,
                Err(reason) => {
                    self.stats.count_decode_error(reason);
                    debug!(peer = %from, len = arrival.len, %reason, "dropping datagram");
                    continue;
                }
            };
            let creates_peer = matches!(frame, ClientFrame::Request { .. });
            let mut inbound = Inbound { frame, received };
            if let Some(peer) = peers.get_mut(&from) {
                peer.last_seen = tick;
                match peer.inbox.try_send(inbound) {
                    Ok(()) => continue,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        self.stats.queue_full.incr();
                        debug!(peer = %from, "peer queue full; dropping datagram");
                        continue;
                    }
                    // The peer's channel ended: start a fresh one below.
                    Err(mpsc::error::TrySendError::Closed(back)) => {
                        peers.remove(&from);
                        inbound = back;
                    }
                }
            }
            if !creates_peer {
                self.stats.stray.incr();
                continue;
            }
            if peers.len() >= self.config.max_peers && evicted_at_tick != Some(tick) {
                evicted_at_tick = Some(tick);
                self.evict_idle(&mut peers, tick);
            }
            if peers.len() >= self.config.max_peers {
                self.stats.table_full.incr();
                debug!(peer = %from, "peer table full; dropping datagram");
                continue;
            }
            let (tx, rx) = mpsc::channel(self.config.peer_queue.max(1));
            let transport = PeerTransport {
                peer: from,
                inbox: rx,
                socket: self.socket.clone(),
                clock: self.clock.clone(),
                stats: self.stats.clone(),
                context,
                arrivals: [None; ARRIVALS],
                outbox: None,
                max_in_flight: self.config.max_in_flight.max(1),
            };
            // A fresh queue has room for one.
            let _ = tx.try_send(inbound);
            self.stats.peers_created.incr();
            peers.insert(
                from,
                Peer {
                    inbox: tx,
                    last_seen: tick,
                },
            );
            tasks.spawn(run_channel(BaseChannel::with_defaults(transport)));
        }

        // Closing every queue ends each channel once its requests are done.
        drop(peers);
        let grace = self.config.shutdown_grace;
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
        info!(stats = %self.stats, "server stopped");
        self.stats
    }

    /// Forgets peers last heard from before the sweep tick `before`.
    fn evict_idle(&self, peers: &mut HashMap<SocketAddr, Peer>, before: u64) {
        let len = peers.len();
        peers.retain(|_, p| p.last_seen >= before);
        let evicted = len - peers.len();
        if evicted > 0 {
            self.stats.peers_evicted.add(evicted as u64);
            debug!(evicted, remaining = peers.len(), "evicted idle peers");
        }
    }
}
