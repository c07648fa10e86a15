//! The NTP wire, client mode: a good citizen of RFC 5905 and RFC 9109.
//!
//! - One socket per source on a random ephemeral port, `connect()`ed to
//!   the server, so the kernel drops datagrams from anyone else.
//! - Each request's transmit timestamp is 64 random bits (a cookie the
//!   reply must echo as its origin); the true send time (ts1) never
//!   leaves this machine.
//! - A receive task reads every datagram with the kernel's arrival stamp
//!   (ts4) and hands it to the request whose cookie it echoes; a reply
//!   that echoes none is counted and dropped, a Kiss-o'-Death included
//!   (so an attacker off the path cannot stop us with a forged DENY).
//! - Replies are checked as [`crate::ntp::check_reply`] says (mode,
//!   version, origin, stratum, leap, zero timestamps); ts2 and ts3 are
//!   placed in the NTP era nearest ts1, so the 2036 wrap is harmless.
//! - With NTS ([`NtsSession`], from a key exchange), every request
//!   carries a cookie, a fresh unique identifier and an authenticator, and
//!   a reply counts only if it echoes that identifier and authenticates
//!   under the session's key: anything else with the right origin (a
//!   forgery, an altered reply, a replay of another request's reply, an
//!   unauthenticated kiss) is counted and ignored, and the request goes on
//!   waiting for the genuine answer. An NTS NAK ends the session: the
//!   next sync shakes hands again.

use super::{CallError, CallFuture, Exchanger, Probe, SourceOptions};
use crate::clock::Clock;
use crate::ntp::{self, NtpTimestamp, Reply, ReplyError};
use crate::nts::{CookieJar, Key, NtsError, ef};
use crate::sync::{NowExchange, Sample};
use crate::time::Timestamp;
use crate::transport::client::{ClientStats, UdpClientTransport};
use crate::transport::is_transient;
use crate::transport::socket::{Stamping, enable_timestamps, recv_stamped_async};
use crate::wire::MAX_DATAGRAM;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

/// A reply handed to the request it answers.
struct Arrived {
    reply: Result<Reply, ReplyError>,
    ts4: Timestamp,
    /// The server's NTS NAK.
    nak: bool,
}

/// The keys and cookies of one NTS key exchange.
pub(super) struct NtsSession {
    c2s: Key,
    s2c: Key,
    jar: Mutex<CookieJar>,
    /// The server said it cannot open our cookies: shake hands again.
    nak: std::sync::atomic::AtomicBool,
}

impl NtsSession {
    pub(super) fn new(c2s: Key, s2c: Key, cookies: Vec<Vec<u8>>) -> Self {
        NtsSession {
            c2s,
            s2c,
            jar: Mutex::new(CookieJar::from_cookies(cookies)),
            nak: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether it can still make requests.
    pub(super) fn usable(&self) -> bool {
        !self.nak.load(std::sync::atomic::Ordering::Relaxed)
            && !self
                .jar
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
    }
}

/// A request waiting for its reply.
struct Waiter {
    tx: oneshot::Sender<Arrived>,
    /// With NTS: the request's unique identifier, and the session.
    nts: Option<([u8; ef::UID_LEN], Arc<NtsSession>)>,
}

type Pending = Arc<Mutex<HashMap<u64, Waiter>>>;

fn lock(p: &Pending) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Requests waiting for a reply at once, at most; more are refused
/// locally (a sync has a handful in flight).
const MAX_PENDING: usize = 256;

/// An NTP client of one server.
pub(super) struct NtpExchanger {
    socket: Arc<UdpSocket>,
    clock: Arc<dyn Clock>,
    stats: Arc<ClientStats>,
    pending: Pending,
    reader: tokio::task::AbortHandle,
    poll: i8,
    nts: Option<Arc<NtsSession>>,
}

impl Drop for NtpExchanger {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Forgets a request that no longer waits (answered, timed out, or its
/// future dropped by the retry logic).
struct Forget<'a> {
    pending: &'a Pending,
    cookie: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.pending).remove(&self.cookie);
    }
}

impl NtpExchanger {
    pub(super) async fn open(
        server: SocketAddr,
        clock: Arc<dyn Clock>,
        options: &SourceOptions,
        stats: Arc<ClientStats>,
        nts: Option<Arc<NtsSession>>,
    ) -> io::Result<Self> {
        let socket = UdpClientTransport::bind_connected(server).await?;
        if options.stamping == Stamping::Kernel
            && let Err(e) = enable_timestamps(&socket)
        {
            tracing::debug!(error = %e, "kernel receive timestamps unavailable");
        }
        let socket = Arc::new(socket);
        let pending: Pending = Arc::default();
        let reader = tokio::spawn(receive(
            socket.clone(),
            clock.clone(),
            stats.clone(),
            pending.clone(),
        ))
        .abort_handle();
        Ok(NtpExchanger {
            socket,
            clock,
            stats,
            pending,
            reader,
            poll: options.poll,
            nts,
        })
    }

    /// One request and its reply: (ts1, the checked reply, ts4).
    async fn exchange(
        &self,
        timeout: Duration,
    ) -> Result<(Timestamp, Reply, Timestamp), CallError> {
        let cookie = loop {
            let c: u64 = rand::random();
            if c != 0 {
                break c;
            }
        };
        let (tx, rx) = oneshot::channel();
        let mut request = [0u8; MAX_DATAGRAM];
        let mut len = ntp::write_request(NtpTimestamp(cookie), self.poll, &mut request);
        let nts = match &self.nts {
            None => None,
            Some(session) => {
                // One cookie spent; ask for enough back to fill the jar.
                let (nts_cookie, placeholders) = {
                    let mut jar = session.jar.lock().unwrap_or_else(|e| e.into_inner());
                    let Some(c) = jar.take() else {
                        return Err(CallError::Failed("no NTS cookie left".into()));
                    };
                    (c, jar.placeholders())
                };
                let uid: [u8; ef::UID_LEN] = rand::random();
                len = ef::write_request(
                    &mut request,
                    len,
                    &uid,
                    &nts_cookie,
                    placeholders,
                    &session.c2s,
                    &rand::random(),
                )
                .map_err(|e| CallError::Failed(format!("cannot write the NTS request: {e}")))?;
                Some((uid, session.clone()))
            }
        };
        {
            let mut pending = lock(&self.pending);
            if pending.len() >= MAX_PENDING {
                return Err(CallError::Failed("too many requests in flight".into()));
            }
            pending.insert(cookie, Waiter { tx, nts });
        }
        let _forget = Forget {
            pending: &self.pending,
            cookie,
        };
        let ts1 = self.clock.now();
        if let Err(e) = self.socket.send(&request[..len]).await {
            self.stats.count_error(&e);
            if is_transient(&e) {
                self.stats.send_failed.incr();
                return Err(CallError::Lost);
            }
            return Err(CallError::Failed(format!("cannot send: {e}")));
        }
        self.stats.sent.incr();
        let arrived = match tokio::time::timeout(timeout, rx).await {
            Err(_) => return Err(CallError::Lost),
            Ok(Err(_)) => return Err(CallError::Failed("the socket failed".into())),
            Ok(Ok(arrived)) => arrived,
        };
        if arrived.nak {
            if let Some(session) = &self.nts {
                session
                    .nak
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            return Err(CallError::NtsNak);
        }
        match arrived.reply {
            Ok(Reply::Kiss(kiss)) => Err(CallError::Kiss(kiss)),
            Ok(reply) => Ok((ts1, reply, arrived.ts4)),
            Err(ReplyError::Unsynchronized { leap, stratum }) => {
                Err(CallError::Unsynchronized { leap, stratum })
            }
            Err(e) => Err(CallError::Failed(e.to_string())),
        }
    }
}

impl Exchanger for NtpExchanger {
    fn probe(&self, timeout: Duration) -> CallFuture<'_, Probe> {
        Box::pin(async move {
            let (ts1, reply, ts4) = self.exchange(timeout).await?;
            let Reply::Time {
                receive,
                transmit,
                state,
            } = reply
            else {
                return Err(CallError::Failed("unexpected reply".into()));
            };
            let ts2 = receive.to_timestamp(ts1);
            let ts3 = transmit.to_timestamp(ts1);
            let sample = Sample::new(ts1, ts2, ts3, ts4)
                .map_err(CallError::Rejected)?
                .with_root_distance(state.uncertainty());
            Ok(Probe {
                sample,
                server: Some(state),
            })
        })
    }

    /// An NTP exchange whose transmit timestamp is taken as the server's
    /// `now()`: the classic flow, over NTP.
    fn now(&self, timeout: Duration) -> CallFuture<'_, NowExchange> {
        Box::pin(async move {
            let (sent, reply, received) = self.exchange(timeout).await?;
            let Reply::Time {
                transmit, state, ..
            } = reply
            else {
                return Err(CallError::Failed("unexpected reply".into()));
            };
            let mut now = NowExchange::new(sent, transmit.to_timestamp(sent), received)
                .map_err(CallError::Rejected)?;
            now.root_distance = state.uncertainty();
            Ok(now)
        })
    }
}

/// Reads replies until the socket fails (or the task is aborted), handing
/// each to the request whose cookie its origin echoes.
async fn receive(
    socket: Arc<UdpSocket>,
    clock: Arc<dyn Clock>,
    stats: Arc<ClientStats>,
    pending: Pending,
) {
    let mut buf = [0u8; MAX_DATAGRAM + 1];
    loop {
        let arrival = match recv_stamped_async(&socket, &mut buf).await {
            Ok(arrival) => arrival,
            Err(e) if is_transient(&e) => {
                stats.count_error(&e);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "ntp client socket failed");
                // Dropping the senders tells every waiting request.
                lock(&pending).clear();
                return;
            }
        };
        let ts4 = arrival.time_on(&*clock);
        let bytes = &buf[..arrival.len];
        let origin = match ntp::Header::read(bytes) {
            Some(header) if !arrival.truncated => header.origin.0,
            _ => {
                stats.malformed.incr();
                continue;
            }
        };
        let mut waiting = lock(&pending);
        let Some(waiter) = waiting.get(&origin).filter(|_| origin != 0) else {
            drop(waiting);
            stats.unmatched.incr();
            tracing::debug!("dropping NTP reply that matches no request");
            continue;
        };
        // With NTS, only what authenticates for this very request counts.
        let mut nak = false;
        if let Some((uid, session)) = &waiter.nts {
            match ef::check_reply(bytes, uid, &session.s2c) {
                Ok(cookies) => {
                    let mut jar = session.jar.lock().unwrap_or_else(|e| e.into_inner());
                    for c in cookies {
                        jar.add(c);
                    }
                }
                Err(NtsError::Nak) => nak = true,
                Err(why) => {
                    drop(waiting);
                    stats.auth_failed.incr();
                    tracing::debug!(%why, "dropping an NTS reply that does not authenticate");
                    continue;
                }
            }
        }
        let reply = ntp::check_reply(bytes, NtpTimestamp(origin));
        if let (Err(ReplyError::Packet(why)), false) = (&reply, nak) {
            // Not a reply at all: the request goes on waiting.
            drop(waiting);
            stats.malformed.incr();
            tracing::debug!(%why, "dropping malformed NTP reply");
            continue;
        }
        if let Some(waiter) = waiting.remove(&origin) {
            stats.received.incr();
            let _ = waiter.tx.send(Arrived { reply, ts4, nak });
        }
    }
}
