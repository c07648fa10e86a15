//! What a listening socket speaks: cerv's own wire ([`crate::wire`]) or
//! NTP ([`crate::ntp`]). Both faces share the server's machinery (batched
//! reads with kernel arrival stamps, rate limiting, the handlers of
//! [`crate::rpc::TimeService`], the writer that stamps ts3 last); this
//! module holds only what differs: how a datagram becomes a request, and
//! how an answer becomes a datagram.
//!
//! An NTP request becomes a `probe` call like any other: its ts2 is the
//! kernel's arrival stamp, its ts3 is read by the writer just before the
//! reply leaves, and the reply echoes the request's transmit timestamp as
//! its origin.
//!
//! **NTS** (RFC 8915): with master keys configured, a request carrying NTS
//! extension fields is opened here (its cookie with the master keys, its
//! authenticator with the keys inside the cookie), and the fresh cookies
//! its reply carries are sealed here too, so the writer has only the
//! reply's own encryption left to do after it reads ts3. A cookie that
//! does not open, or an authenticator that fails, is answered with an NTS
//! NAK (as chrony does); anything malformed is dropped.

use super::limit::RateLimit;
use super::server::ServerStats;
use super::socket::Arrival;
use crate::auth::Keys;
use crate::clock::{self, Clock};
use crate::ntp::{self, PacketError, RefId, ServerState};
use crate::nts::cookie::COOKIE_LEN;
use crate::nts::ef::MAX_COOKIES;
use crate::nts::{MasterKeys, NtsRequest, ef};
use crate::time::Timestamp;
use crate::wire::{self, Authenticated, ClientFrame, DecodeError};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tracing::debug;

/// The protocol a server socket answers.
#[derive(Clone, Debug, Default)]
pub enum Face {
    /// cerv's wire: tarpc `probe` and `now` calls (see `docs/PROTOCOL.md`).
    #[default]
    Cerv,
    /// NTPv4 and v3 client requests (mode 3), answered in mode 4.
    Ntp(NtpFace),
}

/// How the NTP face describes and protects the server's clock.
#[derive(Clone, Debug)]
pub struct NtpFace {
    /// Serve an unsynchronised clock as this stratum (`--ntp-stratum`,
    /// chrony's `local stratum`); `None`: while the kernel says the clock
    /// is unsynchronised, tell clients so (leap 3, stratum 16).
    pub local_stratum: Option<u8>,
    /// log2 of the clock's precision, in seconds (measured at start).
    pub precision: i8,
    /// Kiss-o'-Death RATE replies to a rate-limited source: at most this
    /// many, so that a spoofed flood cannot turn them into a flood of
    /// their own toward the victim.
    pub kiss_limit: RateLimit,
    /// NTS: the master keys that open cookies (shared with the key
    /// exchange, which seals them, and rotated by the server).
    pub nts: Option<SharedMasterKeys>,
}

/// Master keys shared between the NTS key exchange, the NTP sockets and
/// the task that rotates them.
pub type SharedMasterKeys = Arc<RwLock<MasterKeys>>;

impl Default for NtpFace {
    fn default() -> Self {
        NtpFace {
            local_stratum: None,
            precision: -20,
            kiss_limit: RateLimit { rate: 1, burst: 2 },
            nts: None,
        }
    }
}

/// What a reply needs of its request, by wire.
#[derive(Clone, Debug)]
pub(crate) enum ReplyAs {
    /// A cerv reply, tagged like its request (if it was).
    Cerv(Option<Authenticated>),
    /// An NTP reply to a request (its version, poll and transmit
    /// timestamp are echoed).
    Ntp(ntp::Echo),
    /// An NTS-authenticated NTP reply.
    Nts(Arc<NtsReply>),
    /// An NTS NAK to this request (its bytes: the NAK echoes its unique
    /// identifier).
    NtsNak(Arc<Vec<u8>>),
}

/// What an NTS reply needs: the request's header and NTS fields (its
/// keys), and the fresh cookies, already sealed (in place: one allocation
/// per request, this).
#[derive(Debug)]
pub(crate) struct NtsReply {
    pub header: ntp::Echo,
    pub request: NtsRequest,
    sealed: [[u8; COOKIE_LEN]; MAX_COOKIES],
    count: usize,
}

impl NtsReply {
    /// The fresh cookies.
    pub fn cookies(&self) -> &[[u8; COOKIE_LEN]] {
        &self.sealed[..self.count]
    }
}

/// What became of a datagram.
pub(crate) enum Decoded {
    /// A request for the handlers (the cerv wire: a tarpc call).
    Request(SocketAddr, Inbound),
    /// An NTP request, which the transport answers itself: its reply is
    /// the arrival stamp, the send stamp and the server's account of its
    /// clock, and there is no call for a handler to serve.
    Answer {
        to: SocketAddr,
        received: Timestamp,
        reply_as: ReplyAs,
    },
    /// An NTS request whose cookie or authenticator failed: it gets a NAK
    /// at once.
    Nak(SocketAddr, Arc<Vec<u8>>),
    /// Dropped (and counted).
    Dropped,
}

/// A decoded datagram on its way to the handlers.
pub(crate) struct Inbound {
    pub frame: ClientFrame,
    pub received: Timestamp,
    pub reply_as: ReplyAs,
}

/// Checks and decodes one datagram; counts and drops what is not a valid
/// request of this face.
pub(crate) fn decode(
    face: &Face,
    stats: &ServerStats,
    clock: &dyn Clock,
    keys: Option<&Keys>,
    bytes: &[u8],
    arrival: &Arrival,
) -> Decoded {
    let Some(from) = arrival.from else {
        stats.malformed.incr();
        return Decoded::Dropped;
    };
    if arrival.truncated {
        stats.oversized.incr();
        return Decoded::Dropped;
    }
    match face {
        Face::Cerv => match wire::decode_client(bytes, keys) {
            Ok((frame, auth)) => Decoded::Request(
                from,
                Inbound {
                    frame,
                    received: arrival.time_on(clock),
                    reply_as: ReplyAs::Cerv(auth),
                },
            ),
            Err(reason) => {
                count_cerv_error(stats, reason);
                debug!(peer = %from, len = bytes.len(), %reason, "dropping datagram");
                Decoded::Dropped
            }
        },
        // Most requests are a bare header: what the reply echoes is all
        // there is to keep of them.
        Face::Ntp(_) if bytes.len() == ntp::HEADER_LEN => match ntp::read_bare_request(bytes) {
            Ok(echo) => ntp_answer(from, ReplyAs::Ntp(echo), arrival, clock),
            Err(reason) => dropped_ntp(stats, from, bytes, reason),
        },
        Face::Ntp(ntp) => match ntp::parse_request(bytes) {
            Ok(request) => {
                let is_nts = request
                    .fields
                    .iter()
                    .any(|f| matches!(f.kind, ef::UNIQUE_IDENTIFIER | ef::COOKIE));
                // Unknown extension fields are ignored (RFC 7822): the
                // reply is a plain 48-byte one, no larger than the request.
                // So are NTS fields when this server does not do NTS: the
                // client will not trust the unauthenticated reply.
                let reply_as = match (&ntp.nts, is_nts) {
                    (Some(master), true) => {
                        let master = master.read().unwrap_or_else(|p| p.into_inner());
                        match ef::open_parsed(bytes, &request, &master) {
                            Ok(opened) => {
                                stats.nts_requests.incr();
                                let count = opened.cookies_wanted.min(MAX_COOKIES);
                                let mut sealed = [[0u8; COOKIE_LEN]; MAX_COOKIES];
                                for cookie in &mut sealed[..count] {
                                    master.seal_into(&opened.keys, &rand::random(), cookie);
                                }
                                ReplyAs::Nts(Arc::new(NtsReply {
                                    header: request.header.echo(),
                                    request: opened,
                                    sealed,
                                    count,
                                }))
                            }
                            Err(e) if e.nak() => {
                                stats.nts_naks.incr();
                                debug!(peer = %from, error = %e, "NTS NAK");
                                return Decoded::Nak(from, Arc::new(bytes.to_vec()));
                            }
                            Err(e) => {
                                stats.nts_failed.incr();
                                debug!(peer = %from, error = %e, "dropping NTS request");
                                return Decoded::Dropped;
                            }
                        }
                    }
                    _ => ReplyAs::Ntp(request.header.echo()),
                };
                ntp_answer(from, reply_as, arrival, clock)
            }
            Err(reason) => dropped_ntp(stats, from, bytes, reason),
        },
    }
}

/// An NTP request that passed its checks, to be answered with `reply_as`.
fn ntp_answer(
    from: SocketAddr,
    reply_as: ReplyAs,
    arrival: &Arrival,
    clock: &dyn Clock,
) -> Decoded {
    debug!(peer = %from, "NTP request");
    Decoded::Answer {
        to: from,
        received: arrival.time_on(clock),
        reply_as,
    }
}

fn count_cerv_error(stats: &ServerStats, e: DecodeError) {
    match e {
        DecodeError::Oversized => stats.oversized.incr(),
        DecodeError::Unpadded => stats.unpadded.incr(),
        DecodeError::Auth(_) => stats.auth_failed.incr(),
        _ => stats.malformed.incr(),
    }
}

/// An NTP datagram that is not a request this server answers: counted by
/// its reason and dropped.
fn dropped_ntp(
    stats: &ServerStats,
    from: SocketAddr,
    bytes: &[u8],
    reason: PacketError,
) -> Decoded {
    count_ntp_error(stats, reason);
    debug!(peer = %from, len = bytes.len(), %reason, "dropping NTP datagram");
    Decoded::Dropped
}

fn count_ntp_error(stats: &ServerStats, e: PacketError) {
    match e {
        PacketError::TooShort(_) => stats.unpadded.incr(),
        PacketError::Control(_) => stats.control.incr(),
        PacketError::Mode(_) => stats.wrong_mode.incr(),
        PacketError::Version(_) => stats.bad_version.incr(),
        PacketError::Mac => stats.mac.incr(),
        PacketError::Malformed(_) => stats.malformed.incr(),
    }
}

/// The header of a rate-limited datagram, if it is an NTP client request
/// worth a Kiss-o'-Death (anything else is dropped without a word).
pub(crate) fn kiss_candidate(face: &Face, bytes: &[u8]) -> Option<ntp::Echo> {
    match face {
        // Under a flood this runs for every datagram: a bare request is
        // read as `decode` reads it.
        Face::Ntp(_) if bytes.len() == ntp::HEADER_LEN => ntp::read_bare_request(bytes).ok(),
        Face::Ntp(_) => ntp::parse_request(bytes).ok().map(|r| r.header.echo()),
        Face::Cerv => None,
    }
}

/// The server's account of its clock for NTP replies, refreshed from the
/// kernel once a second by the writer.
pub(crate) struct NtpState {
    face: NtpFace,
    current: ServerState,
    refreshed: Option<Instant>,
}

/// How often the kernel's view of the clock is read again.
const REFRESH: Duration = Duration::from_secs(1);

impl NtpState {
    pub fn new(face: NtpFace) -> Self {
        NtpState {
            current: ServerState::serving(
                &unsynchronized(),
                face.local_stratum,
                face.precision,
                Timestamp::EPOCH,
            ),
            face,
            refreshed: None,
        }
    }

    /// The state to put in replies sent at `now` (on the server's clock),
    /// read again from the kernel when it is [`REFRESH`] old. Call it once
    /// per batch of replies, not per reply: the age check reads a clock.
    pub fn current(&mut self, now: Timestamp) -> &ServerState {
        if self.refreshed.is_none_or(|at| at.elapsed() >= REFRESH) {
            let kernel = clock::kernel_clock().unwrap_or_else(|e| {
                debug!(error = %e, "cannot read the kernel clock state; serving as unsynchronised");
                unsynchronized()
            });
            self.current =
                ServerState::serving(&kernel, self.face.local_stratum, self.face.precision, now);
            self.refreshed = Some(Instant::now());
        }
        &self.current
    }
}

fn unsynchronized() -> clock::KernelClock {
    clock::KernelClock {
        synchronized: false,
        leap: ntp::Leap::None,
        max_error: crate::time::Nanos::from_secs(16),
        est_error: crate::time::Nanos::from_secs(16),
    }
}

/// The Kiss-o'-Death sent to a rate-limited NTP client.
pub(crate) const RATE_KISS: RefId = RefId::RATE;
