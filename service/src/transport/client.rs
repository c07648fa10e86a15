//! The client side of the transport: one server, as a tarpc `Stream`/`Sink`
//! pair, over a UDP socket `connect()`ed to it ([`UdpClientTransport`]) or
//! over a framed byte stream (TCP, TLS: see [`super::stream`]).
//!
//! Both carry the same messages, encoded by [`crate::wire`]; only how a
//! message is sent and received differs ([`MessageIo`]).

use super::socket::{Arrival, Stamping, enable_timestamps, poll_recv_stamped};
use super::{Counter, is_transient};
use crate::auth::{Key, Tag};
use crate::clock::{Clock, SystemClock};
use crate::rpc::{ProbeReply, TimeServiceRequest, TimeServiceResponse};
use crate::time::Timestamp;
use crate::wire::{self, Call, ClientFrame, DatagramBuf, MAX_DATAGRAM, Reply, ServerFrame};
use futures::{Sink, Stream};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tarpc::{ClientMessage, Response, ServerError};
use tokio::net::UdpSocket;

/// How many requests the transport remembers, to check each reply against
/// the request it answers. tarpc's client is limited to fewer calls in
/// flight than this (see [`client_config`]).
const SENT_RING: usize = 1024;

/// A tarpc client configuration whose in-flight limit matches what the
/// transport can check.
pub fn client_config() -> tarpc::client::Config {
    let mut config = tarpc::client::Config::default();
    config.max_in_flight_requests = SENT_RING - 24;
    config
}

/// What happened to datagrams on one client transport. Shared, so a caller
/// can explain a call that got no answer.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Datagrams sent.
    pub sent: Counter,
    /// Valid replies handed to tarpc.
    pub received: Counter,
    /// Sends that failed and were dropped.
    pub send_failed: Counter,
    /// ICMP port unreachable, reported by the kernel: nothing listens there.
    pub refused: Counter,
    /// ICMP host or network unreachable.
    pub unreachable: Counter,
    /// Datagrams that are not valid replies of this protocol.
    pub malformed: Counter,
    /// Replies that match no request we sent (stale, duplicated, forged).
    pub unmatched: Counter,
    /// Replies whose authentication failed (missing, unexpected or wrong
    /// tag).
    pub auth_failed: Counter,
}

impl ClientStats {
    /// Counts an error a client socket reported: ICMP "port unreachable"
    /// and "host unreachable" have counters of their own (they explain a
    /// silent server); others are logged.
    pub fn count_error(&self, e: &io::Error) {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => self.refused.incr(),
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                self.unreachable.incr()
            }
            _ => tracing::debug!(error = %e, "udp client socket error"),
        }
    }
}

/// How a client transport works.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// Where ts4 comes from.
    pub stamping: Stamping,
    /// With a key, every request is tagged with it and only replies tagged
    /// with it, bound to their request, are accepted.
    pub key: Option<Key>,
}

/// How a client transport moves whole messages: one datagram, or one frame
/// of a stream.
pub trait MessageIo: Unpin + Send + 'static {
    /// Sends one message. A transient error (see `is_transient`) costs
    /// that message only; any other ends the transport.
    fn poll_send(&mut self, cx: &mut Context<'_>, message: &[u8]) -> Poll<io::Result<()>>;
    /// Receives one message into `buf`, with its arrival time. The end of
    /// a stream is an error of kind `UnexpectedEof`.
    fn poll_recv(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<Arrival>>;
}

/// A UDP socket connected to the server.
pub struct UdpIo(UdpSocket);

impl MessageIo for UdpIo {
    fn poll_send(&mut self, cx: &mut Context<'_>, message: &[u8]) -> Poll<io::Result<()>> {
        self.0.poll_send(cx, message).map_ok(|_| ())
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<Arrival>> {
        poll_recv_stamped(&self.0, cx, buf)
    }
}

/// A request as sent, kept to check the reply that claims to answer it.
#[derive(Clone, Copy)]
struct Sent {
    wire_id: u64,
    probe_ts1: Option<Timestamp>,
    tag: Option<Tag>,
}

/// The client end of the transport for [`crate::rpc::TimeService`], over
/// UDP.
pub type UdpClientTransport = ClientTransport<UdpIo>;

/// The client end of the transport for [`crate::rpc::TimeService`].
///
/// - One datagram (or frame) per message, encoded by [`crate::wire`].
/// - Probe requests are stamped (`ts1`) just before the datagram is sent and
///   replies (`ts4`) as soon as they are read from the socket.
/// - tarpc's request ids (0, 1, 2, ...) are sent offset by a random 64-bit
///   base, and a reply must carry the id and, for probes, the `ts1` of a
///   request this transport sent: a stale reply to an earlier process on the
///   same port, or a forged one from someone who cannot see our traffic, is
///   dropped.
/// - Nothing the network does ends the transport: malformed replies and
///   ICMP errors are counted in [`ClientStats`] and dropped, and a lost
///   datagram simply leaves its call to its deadline.
pub struct ClientTransport<Io> {
    io: Io,
    clock: Arc<dyn Clock>,
    id_base: u64,
    sent: Box<[Option<Sent>; SENT_RING]>,
    outbox: Option<ClientFrame>,
    rx: Box<[u8; MAX_DATAGRAM + 1]>,
    tx: Box<DatagramBuf>,
    stats: Arc<ClientStats>,
    closed: bool,
    key: Option<Key>,
}

impl ClientTransport<UdpIo> {
    /// Binds an ephemeral port of the right address family and connects it
    /// to `server`, stamping with the system clock.
    pub async fn connect(server: SocketAddr) -> io::Result<Self> {
        Self::connect_with_clock(server, Arc::new(SystemClock)).await
    }

    /// Like [`connect`](Self::connect), reading timestamps from `clock`.
    pub async fn connect_with_clock(server: SocketAddr, clock: Arc<dyn Clock>) -> io::Result<Self> {
        Ok(Self::from_connected(
            Self::bind_connected(server).await?,
            clock,
        ))
    }

    /// A socket on an ephemeral port of `server`'s address family,
    /// connected to it.
    pub async fn bind_connected(server: SocketAddr) -> io::Result<UdpSocket> {
        let local: SocketAddr = if server.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).await?;
        socket.connect(server).await?;
        Ok(socket)
    }

    /// Wraps a socket already connected to the server, with kernel
    /// receive timestamps and no key.
    pub fn from_connected(socket: UdpSocket, clock: Arc<dyn Clock>) -> Self {
        Self::new(socket, clock, ClientOptions::default())
    }

    /// Wraps a connected socket, taking ts4 as `options.stamping` says
    /// (falling back to user-space stamps if the kernel cannot), and
    /// authenticating with `options.key`.
    pub fn new(socket: UdpSocket, clock: Arc<dyn Clock>, options: ClientOptions) -> Self {
        if options.stamping == Stamping::Kernel
            && let Err(e) = enable_timestamps(&socket)
        {
            tracing::debug!(error = %e, "kernel receive timestamps unavailable");
        }
        ClientTransport::over(UdpIo(socket), clock, options)
    }

    /// The local address of the socket.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.0.local_addr()
    }
}

impl<Io: MessageIo> ClientTransport<Io> {
    /// A transport over `io`, reading `clock`, authenticating with
    /// `options.key` (`options.stamping` is for the caller to arrange on
    /// the socket).
    pub fn over(io: Io, clock: Arc<dyn Clock>, options: ClientOptions) -> Self {
        ClientTransport {
            io,
            clock,
            id_base: rand::random(),
            sent: Box::new([None; SENT_RING]),
            outbox: None,
            rx: Box::new([0; MAX_DATAGRAM + 1]),
            tx: Box::new([0; MAX_DATAGRAM]),
            stats: Arc::default(),
            closed: false,
            key: options.key,
        }
    }

    /// The counters of this transport, shared.
    pub fn stats(&self) -> Arc<ClientStats> {
        self.stats.clone()
    }

    /// Counts into `stats` instead of a fresh set (a source keeps one set
    /// across the connections of its syncs).
    pub fn with_stats(mut self, stats: Arc<ClientStats>) -> Self {
        self.stats = stats;
        self
    }

    fn frame_for(&self, message: ClientMessage<TimeServiceRequest>) -> Option<ClientFrame> {
        match message {
            ClientMessage::Request(request) => {
                let call = match request.message {
                    TimeServiceRequest::Probe { ts1 } => Call::Probe { ts1 },
                    TimeServiceRequest::Now {} => Call::Now,
                };
                Some(ClientFrame::Request {
                    id: request.id.wrapping_add(self.id_base),
                    deadline: request
                        .context
                        .deadline
                        .saturating_duration_since(Instant::now()),
                    call,
                })
            }
            ClientMessage::Cancel { request_id, .. } => Some(ClientFrame::Cancel {
                id: request_id.wrapping_add(self.id_base),
            }),
            // ClientMessage is non-exhaustive; nothing else exists today.
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// Sends the queued frame, stamping a probe's ts1 just before the send.
    fn poll_send_outbox(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Bounded: the kernel reports at most one pending ICMP error per
        // send, so a second failure is a real one.
        for _ in 0..2 {
            let Some(frame) = self.outbox.as_mut() else {
                return Poll::Ready(());
            };
            let mut probe_ts1 = None;
            if let ClientFrame::Request {
                call: Call::Probe { ts1 },
                ..
            } = frame
            {
                *ts1 = self.clock.now();
                probe_ts1 = Some(*ts1);
            }
            let (len, tag) = wire::encode_client(frame, &mut self.tx, self.key.as_ref());
            match self.io.poll_send(cx, &self.tx[..len]) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(_)) => {
                    self.stats.sent.incr();
                    if let Some(ClientFrame::Request { id, .. }) = self.outbox.take() {
                        self.sent[(id % SENT_RING as u64) as usize] = Some(Sent {
                            wire_id: id,
                            probe_ts1,
                            tag,
                        });
                    }
                    return Poll::Ready(());
                }
                Poll::Ready(Err(e)) => {
                    self.count_error(&e);
                    if !is_transient(&e) {
                        break;
                    }
                }
            }
        }
        self.stats.send_failed.incr();
        self.outbox = None;
        Poll::Ready(())
    }

    fn count_error(&self, e: &io::Error) {
        self.stats.count_error(e);
    }

    /// Turns a decoded reply into tarpc's response, if it answers a request
    /// we sent.
    fn response_for(
        &mut self,
        frame: ServerFrame,
        ts4: Timestamp,
    ) -> Option<Response<TimeServiceResponse>> {
        let slot = &mut self.sent[(frame.id % SENT_RING as u64) as usize];
        let sent = slot.filter(|s| s.wire_id == frame.id)?;
        let message = match frame.reply {
            Reply::Probe { ts1, ts2, ts3 } => {
                if sent.probe_ts1 != Some(ts1) {
                    return None;
                }
                Ok(TimeServiceResponse::Probe(ProbeReply {
                    ts1,
                    ts2,
                    ts3,
                    ts4: Some(ts4),
                }))
            }
            Reply::Now { time } => {
                if sent.probe_ts1.is_some() {
                    return None;
                }
                Ok(TimeServiceResponse::Now(time))
            }
            Reply::Error { code, detail } => Err(ServerError::new(code.to_io_kind(), detail)),
        };
        // One answer per request: a duplicate of this reply is dropped.
        *slot = None;
        Some(Response {
            request_id: frame.id.wrapping_sub(self.id_base),
            message,
        })
    }
}

impl<Io: MessageIo> Stream for ClientTransport<Io> {
    type Item = Result<Response<TimeServiceResponse>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.closed {
            return Poll::Ready(None);
        }
        // Transient errors are skipped, but only so many per poll: one that
        // repeats (ENOBUFS under memory pressure, say) must not spin here.
        let mut errors = 0;
        loop {
            if errors >= 16 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match this.io.poll_recv(cx, &mut this.rx[..]) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(arrival)) => {
                    let ts4 = arrival.time_on(&*this.clock);
                    let len = arrival.len;
                    let sent = &this.sent;
                    let tag_of = |id: u64| {
                        sent[(id % SENT_RING as u64) as usize]
                            .filter(|s| s.wire_id == id)
                            .and_then(|s| s.tag)
                    };
                    let frame =
                        match wire::decode_server(&this.rx[..len], this.key.as_ref(), tag_of) {
                            Ok(frame) => frame,
                            Err(reason @ wire::DecodeError::Auth(_)) => {
                                this.stats.auth_failed.incr();
                                tracing::debug!(len, %reason, "dropping reply");
                                continue;
                            }
                            Err(reason) => {
                                this.stats.malformed.incr();
                                tracing::debug!(len, %reason, "dropping malformed reply");
                                continue;
                            }
                        };
                    match this.response_for(frame, ts4) {
                        Some(response) => {
                            this.stats.received.incr();
                            return Poll::Ready(Some(Ok(response)));
                        }
                        None => {
                            this.stats.unmatched.incr();
                            tracing::debug!("dropping reply that matches no request");
                        }
                    }
                }
                Poll::Ready(Err(e)) if is_transient(&e) => {
                    errors += 1;
                    this.count_error(&e);
                }
                Poll::Ready(Err(e)) => {
                    // The socket itself is broken (or the stream ended): end
                    // the transport, which fails the calls in flight instead
                    // of spinning here.
                    // The caller reports the calls that fail because of it.
                    tracing::debug!(error = %e, "client transport ended");
                    this.closed = true;
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl<Io: MessageIo> Sink<ClientMessage<TimeServiceRequest>> for ClientTransport<Io> {
    type Error = Infallible;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.poll_send_outbox(cx).map(Ok)
    }

    fn start_send(
        mut self: Pin<&mut Self>,
        message: ClientMessage<TimeServiceRequest>,
    ) -> Result<(), Infallible> {
        // poll_ready emptied the outbox.
        self.outbox = self.frame_for(message);
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.poll_send_outbox(cx).map(Ok)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.poll_send_outbox(cx).map(Ok)
    }
}
