//! Load: a generator that keeps a window of requests in flight, and the
//! minimal UDP echo server it is compared against.
//!
//! The generator speaks the real wire format: it encodes `probe` requests
//! with [`service::wire`] and checks that every reply decodes and answers a
//! request it sent. It sends the same 48-byte datagrams to the echo server,
//! so both targets see identical traffic from an identical client, and the
//! ratio of their throughputs is the server's cost over the bare minimum a
//! request-reply service can do on this machine.
//!
//! It speaks NTP too, plain ([`Target::Ntp`]) and protected by NTS
//! ([`Target::Nts`], with the keys and a cookie from a real key exchange,
//! [`nts_credentials`]), so cerv's two NTP faces can be compared with each
//! other in the same run.

use hdrhistogram::Histogram;
use service::clock::{Clock, SystemClock};
use service::ntp::{self, HEADER_LEN, NtpTimestamp};
use service::nts::{self, Key, ef};
use service::wire::{self, Call, ClientFrame, DatagramBuf, MAX_DATAGRAM, Reply};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The longest any load run may last.
pub const MAX_DURATION: Duration = Duration::from_secs(60);

/// What the server at the other end is, and so what is sent.
#[derive(Clone)]
pub enum Target {
    /// A cerv server: replies are probe replies.
    Cerv,
    /// An echo server: replies are our requests, sent back.
    Echo,
    /// An NTP server: 48-byte client requests, each transmit timestamp the
    /// request's id; a reply is valid when it passes the checks fient's
    /// NTP source makes (mode, origin, stratum, leap, timestamps).
    Ntp,
    /// An NTS-protected NTP server, with these credentials.
    Nts(NtsCredentials),
}

/// What NTS requests need: the keys and a cookie from a key exchange.
///
/// The generator seals one request per slot of its in-flight ring before
/// it starts (a unique identifier and nonce each, all with this cookie; a
/// server keeps no state, so a cookie opens as often as it is sent) and
/// sends those again, so sealing is not in its loop. Every reply must echo
/// its request's transmit timestamp and pass NTP's header checks; one in
/// [`NTS_VERIFY_EVERY`] is also opened with the server-to-client key and
/// its unique identifier checked, and counts as invalid if either fails.
/// The server does all of its work for every request: open the cookie,
/// check the authenticator, seal a fresh cookie and the reply.
#[derive(Clone)]
pub struct NtsCredentials {
    /// Client to server.
    pub c2s: Key,
    /// Server to client.
    pub s2c: Key,
    /// A cookie.
    pub cookie: Vec<u8>,
    /// Where to send the requests (the key exchange says).
    pub ntp: SocketAddr,
}

/// One NTS reply in this many is opened and checked in full.
pub const NTS_VERIFY_EVERY: u64 = 8;

/// Runs NTS-KE with cerv's key-exchange port at `ke` (its certificate for
/// `localhost`, signed by the CA in `ca`).
pub fn nts_credentials(ke: SocketAddr, ca: &std::path::Path) -> Result<NtsCredentials, String> {
    let config =
        service::tls::client_config(Some(ca), &[nts::ke::ALPN], true).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (response, c2s, s2c) = runtime.block_on(service::source::nts_key_exchange(
        ke,
        "localhost",
        &connector,
        Duration::from_secs(5),
    ))?;
    if response.server.is_some() {
        return Err("the key exchange names another NTP server".into());
    }
    let cookie = response.cookies.into_iter().next().ok_or("no cookie")?;
    Ok(NtsCredentials {
        c2s,
        s2c,
        cookie,
        ntp: SocketAddr::new(ke.ip(), response.port.unwrap_or(123)),
    })
}

/// The NTS requests of one socket, one per ring slot: the bytes, and the
/// unique identifier the reply must echo.
struct SealedRequests {
    packets: Vec<Vec<u8>>,
    uids: Vec<[u8; ef::UID_LEN]>,
}

impl SealedRequests {
    fn seal(credentials: &NtsCredentials, slots: usize) -> io::Result<SealedRequests> {
        let mut packets = Vec::with_capacity(slots);
        let mut uids = Vec::with_capacity(slots);
        for slot in 0..slots {
            let uid: [u8; ef::UID_LEN] = rand::random();
            let mut buf = vec![0u8; MAX_DATAGRAM];
            // Transmit timestamps start at 1: a zero origin is never a match.
            ntp::write_request(NtpTimestamp(slot as u64 + 1), 0, &mut buf);
            let len = ef::write_request(
                &mut buf,
                HEADER_LEN,
                &uid,
                &credentials.cookie,
                0,
                &credentials.c2s,
                &rand::random(),
            )
            .map_err(|e| io::Error::other(e.to_string()))?;
            buf.truncate(len);
            packets.push(buf);
            uids.push(uid);
        }
        Ok(SealedRequests { packets, uids })
    }
}

/// What a reply answers: a request's id, or (NTS, whose requests are
/// sealed in advance, one per slot) its slot in the ring.
enum Answers {
    Id(u64),
    Slot(usize),
}

/// How to load.
#[derive(Clone, Copy, Debug)]
pub struct LoadConfig {
    /// Requests kept in flight, over all sockets.
    pub window: usize,
    /// Client sockets (distinct source ports), each with its own thread.
    pub sockets: usize,
    /// How long to measure (after a short warm-up); at most [`MAX_DURATION`].
    pub duration: Duration,
    /// A request unanswered this long is counted lost and replaced.
    pub timeout: Duration,
    /// At most one request per this interval and socket (zero: as fast as
    /// the window allows).
    pub pace: Duration,
    /// Poll for replies instead of sleeping until one comes: a generator
    /// that never sleeps costs the server no wake-ups (on loopback the
    /// sender of a datagram pays for waking its receiver), so the server
    /// is measured alone. Only with the generator on a core of its own.
    pub spin: bool,
}

/// What a load run measured.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// Valid replies in the measured interval.
    pub replies: u64,
    /// Requests that timed out.
    pub lost: u64,
    /// Replies that did not answer a request in flight (should be zero).
    pub invalid: u64,
    /// The measured interval.
    pub elapsed: Duration,
    /// Round-trip times, nanoseconds.
    pub rtt: Histogram<u64>,
}

impl LoadReport {
    /// Replies per second.
    pub fn rate(&self) -> f64 {
        self.replies as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A round-trip percentile in microseconds.
    pub fn rtt_us(&self, q: f64) -> f64 {
        self.rtt.value_at_quantile(q) as f64 / 1e3
    }
}

/// Datagrams per batched system call, in the generator and in the echo.
const BATCH: usize = 64;
/// Room for one datagram in a batch: an NTS request or reply is a few
/// hundred bytes, every other one 48; a longer one is cut, flagged, and
/// counted invalid.
const SLOT: usize = 512;

/// Buffers for one `sendmmsg` or `recvmmsg` of up to [`BATCH`] datagrams,
/// with their lengths and (for the echo's unconnected socket) their peers'
/// addresses. The kernel's headers point into these buffers, so they are
/// built for each call, a few stores per datagram.
struct Mmsg {
    bufs: Box<[[u8; SLOT]; BATCH]>,
    lens: [usize; BATCH],
    names: Box<[libc::sockaddr_storage; BATCH]>,
    namelens: [libc::socklen_t; BATCH],
    truncated: [bool; BATCH],
    /// Room for each datagram's arrival stamp, when the socket asks for
    /// them (the stamped echo).
    controls: Option<Box<[[u64; 8]; BATCH]>>,
}

impl Mmsg {
    fn new() -> Mmsg {
        Mmsg {
            bufs: Box::new([[0; SLOT]; BATCH]),
            lens: [0; BATCH],
            // SAFETY: an all-zero sockaddr_storage is valid (AF_UNSPEC).
            names: Box::new(unsafe { std::mem::zeroed() }),
            namelens: [0; BATCH],
            truncated: [false; BATCH],
            controls: None,
        }
    }

    /// Calls `f` with headers for datagrams `0..n`: for receiving (whole
    /// slots) or for sending (their lengths); with peer addresses when
    /// `named`.
    fn with_headers<R>(
        &mut self,
        n: usize,
        named: bool,
        receiving: bool,
        f: impl FnOnce(&mut [libc::mmsghdr]) -> R,
    ) -> R {
        // SAFETY: zeroed iovecs and headers are valid; every pointer set
        // here points into `self` or `iovs`, which outlive `f`.
        let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..n {
            iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: if receiving { SLOT } else { self.lens[i] },
            };
            let h = &mut headers[i].msg_hdr;
            if named {
                h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = if receiving {
                    std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t
                } else {
                    self.namelens[i]
                };
            }
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            if let (true, Some(controls)) = (receiving, self.controls.as_mut()) {
                h.msg_control = controls[i].as_mut_ptr().cast();
                h.msg_controllen = std::mem::size_of::<[u64; 8]>() as _;
            }
        }
        f(&mut headers[..n])
    }

    /// Receives what is waiting, up to [`BATCH`] datagrams: blocking (up
    /// to the socket's read timeout) for the first, or, when `spin`, none
    /// if none is waiting.
    fn recv(&mut self, fd: RawFd, named: bool, spin: bool) -> io::Result<usize> {
        let mut got = [(0usize, 0 as libc::socklen_t, false); BATCH];
        let n = self.with_headers(BATCH, named, true, |headers| {
            // SAFETY: the headers are valid, as built above.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    headers.as_mut_ptr(),
                    headers.len() as libc::c_uint,
                    if spin {
                        libc::MSG_DONTWAIT
                    } else {
                        libc::MSG_WAITFORONE
                    },
                    std::ptr::null_mut(),
                )
            };
            for (g, h) in got.iter_mut().zip(headers.iter()).take(n.max(0) as usize) {
                *g = (
                    h.msg_len as usize,
                    h.msg_hdr.msg_namelen,
                    h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
                );
                if h.msg_hdr.msg_controllen > 0 {
                    // Read the stamp as a time server would.
                    std::hint::black_box(arrival_stamp(&h.msg_hdr));
                }
            }
            n
        });
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for (i, &(len, namelen, truncated)) in got.iter().enumerate().take(n as usize) {
            self.lens[i] = len.min(SLOT);
            self.namelens[i] = namelen;
            self.truncated[i] = truncated;
        }
        Ok(n as usize)
    }

    /// Sends datagrams `start..n` (to their peers, when `named`); returns
    /// how many the kernel took.
    fn send(&mut self, fd: RawFd, n: usize, named: bool) -> io::Result<usize> {
        if n == 0 {
            return Ok(0);
        }
        let sent = self.with_headers(n, named, false, |headers| {
            // SAFETY: the headers are valid, as built above.
            unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), headers.len() as libc::c_uint, 0) }
        });
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }

    fn datagram(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }
}

/// The `SCM_TIMESTAMPNS` stamp of a received message, in nanoseconds.
fn arrival_stamp(h: &libc::msghdr) -> Option<i64> {
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // within `msg_controllen`; the data of an SCM_TIMESTAMPNS message is a
    // timespec, read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(h);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                return Some(ts.tv_sec * 1_000_000_000 + ts.tv_nsec);
            }
            cmsg = libc::CMSG_NXTHDR(h, cmsg);
        }
    }
    None
}

/// Round trips as they come in: a counter per 32 ns up to about 4 ms (an
/// increment in a flat array), the rare longer ones straight into the
/// histogram, which is built after the run.
struct RttLog {
    fine: Vec<u32>,
    coarse: Histogram<u64>,
}

const FINE_SHIFT: u32 = 5;
const FINE_BUCKETS: usize = 1 << 17;

impl RttLog {
    fn new() -> io::Result<RttLog> {
        Ok(RttLog {
            fine: vec![0; FINE_BUCKETS],
            coarse: new_histogram()?,
        })
    }

    fn record(&mut self, ns: u64) {
        match self.fine.get_mut((ns >> FINE_SHIFT) as usize) {
            Some(n) => *n += 1,
            None => {
                let _ = self.coarse.record(ns);
            }
        }
    }

    /// Every round trip; each short one at the middle of its bucket.
    fn into_histogram(self) -> Histogram<u64> {
        let mut h = self.coarse;
        for (bucket, &n) in self.fine.iter().enumerate() {
            if n > 0 {
                let mid = ((bucket as u64) << FINE_SHIFT) + (1 << (FINE_SHIFT - 1));
                let _ = h.record_n(mid, u64::from(n));
            }
        }
        h
    }
}

fn new_histogram() -> io::Result<Histogram<u64>> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|e| io::Error::other(e.to_string()))
}

/// Writes request `id` into `buf` (for NTS, its slot's sealed packet);
/// returns its length.
fn write_request(
    kind: &Target,
    sealed: Option<&[u8]>,
    id: u64,
    ts1: service::Timestamp,
    timeout: Duration,
    scratch: &mut DatagramBuf,
    buf: &mut [u8; SLOT],
) -> usize {
    match (kind, sealed) {
        (Target::Cerv | Target::Echo, _) => {
            let (len, _) = wire::encode_client(
                &ClientFrame::Request {
                    id,
                    deadline: timeout,
                    call: Call::Probe { ts1 },
                },
                scratch,
                None,
            );
            let len = len.min(SLOT);
            buf[..len].copy_from_slice(&scratch[..len]);
            len
        }
        // Transmit timestamps start at 1: a zero origin is never a match.
        (Target::Ntp, _) => ntp::write_request(NtpTimestamp(id + 1), 0, buf),
        (Target::Nts(_), Some(packet)) => {
            let len = packet.len().min(SLOT);
            buf[..len].copy_from_slice(&packet[..len]);
            len
        }
        (Target::Nts(_), None) => 0,
    }
}

/// The request a reply answers, if it checks out.
fn answers(
    kind: &Target,
    sealed: Option<&SealedRequests>,
    ring_len: usize,
    verify: bool,
    bytes: &[u8],
) -> Option<Answers> {
    match kind {
        Target::Cerv => match wire::decode_server(bytes, None, |_| None) {
            Ok(frame) if matches!(frame.reply, Reply::Probe { .. }) => Some(Answers::Id(frame.id)),
            _ => None,
        },
        Target::Echo => match wire::decode_client(bytes, None) {
            Ok((ClientFrame::Request { id, .. }, _)) => Some(Answers::Id(id)),
            _ => None,
        },
        Target::Ntp => ntp::Header::read(bytes)
            .map(|h| h.origin)
            .filter(|&origin| ntp::check_reply(bytes, origin).is_ok())
            .map(|origin| Answers::Id(origin.0 - 1)),
        Target::Nts(credentials) => ntp::Header::read(bytes)
            .map(|h| h.origin)
            .filter(|&origin| {
                bytes.len() > HEADER_LEN
                    && (1..=ring_len as u64).contains(&origin.0)
                    && ntp::check_reply(bytes, origin).is_ok()
            })
            .map(|origin| origin.0 as usize - 1)
            .filter(|&slot| {
                !verify
                    || sealed.is_some_and(|s| {
                        ef::check_reply(bytes, &s.uids[slot], &credentials.s2c).is_ok()
                    })
            })
            .map(Answers::Slot),
    }
}

/// A request in flight.
#[derive(Clone, Copy)]
struct InFlight {
    id: u64,
    /// When it left, nanoseconds after the run's start.
    sent: u64,
}

/// One socket's share of the load.
///
/// The generator must be the fastest thing in the room (DESIGN.md, *keep
/// the generator out of the way*), or a ratio to echo measures the
/// generator. So its I/O is batched: one `sendmmsg` for every request the
/// window has room for, one `recvmmsg` for every reply waiting; the clock
/// is read once per batch; per reply it does a lookup in a ring and an
/// increment in a flat array of 32 ns buckets.
fn run_socket(
    target: SocketAddr,
    kind: Target,
    window: usize,
    config: LoadConfig,
    started: Instant,
    start_measuring: Instant,
    stop_at: Instant,
) -> io::Result<LoadReport> {
    let socket = UdpSocket::bind((target.ip(), 0))?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(Duration::from_millis(5)))?;
    let fd = socket.as_raw_fd();
    let clock = SystemClock;
    let ns = |t: Instant| t.saturating_duration_since(started).as_nanos() as u64;
    let (measure_from, stop_ns) = (ns(start_measuring), ns(stop_at));
    // In flight, in a ring indexed by id (ids are sequential and the
    // window is far smaller than the ring).
    let ring_len = (window * 4).next_power_of_two().max(64);
    let mut ring: Vec<Option<InFlight>> = vec![None; ring_len];
    let mut outstanding = 0usize;
    let mut next_id = 0u64;
    let mut scratch: DatagramBuf = [0; MAX_DATAGRAM];
    let (mut tx, mut rx) = (Mmsg::new(), Mmsg::new());
    let sealed = match &kind {
        Target::Nts(credentials) => Some(SealedRequests::seal(credentials, ring_len)?),
        _ => None,
    };
    let mut rtt = RttLog::new()?;
    let (mut replies, mut lost, mut invalid) = (0u64, 0u64, 0u64);
    let mut last_sweep = 0u64;
    let mut next_send = 0u64;
    let pace = config.pace.as_nanos() as u64;
    let timeout = config.timeout.as_nanos() as u64;

    loop {
        let now = ns(Instant::now());
        if now >= stop_ns {
            break;
        }
        // Fill the window, in one system call.
        let mut room = (window - outstanding).min(BATCH);
        if pace > 0 {
            room = room.min(usize::from(now >= next_send));
        }
        if room > 0 {
            let ts1 = clock.now();
            for k in 0..room {
                let id = next_id + k as u64;
                let slot = (id as usize) & (ring_len - 1);
                tx.lens[k] = write_request(
                    &kind,
                    sealed.as_ref().map(|s| s.packets[slot].as_slice()),
                    id,
                    ts1,
                    config.timeout,
                    &mut scratch,
                    &mut tx.bufs[k],
                );
            }
            let sent_at = ns(Instant::now());
            // A refused or failed send: the requests are lost.
            let sent = tx.send(fd, room, false).unwrap_or(0);
            lost += (room - sent) as u64;
            for k in 0..sent {
                let id = next_id + k as u64;
                let slot = &mut ring[(id as usize) & (ring_len - 1)];
                if slot.is_some() {
                    // The ring wrapped onto a request still in flight: it
                    // is far older than the timeout allows; count it lost.
                    lost += 1;
                    outstanding -= 1;
                }
                *slot = Some(InFlight { id, sent: sent_at });
                outstanding += 1;
            }
            next_id += room as u64;
            next_send = sent_at + pace;
        }
        if pace > 0 && outstanding == 0 {
            // Nothing in flight: wait for the next send time.
            let wait = next_send.min(stop_ns).saturating_sub(ns(Instant::now()));
            thread::sleep(Duration::from_nanos(wait));
            continue;
        }
        // Every reply waiting (blocking for the first, 5 ms at most,
        // unless spinning).
        let got = rx.recv(fd, false, config.spin).unwrap_or(0);
        let now = ns(Instant::now());
        for i in 0..got {
            let verify = (replies + invalid) % NTS_VERIFY_EVERY == 0;
            let checked = (!rx.truncated[i])
                .then(|| answers(&kind, sealed.as_ref(), ring_len, verify, rx.datagram(i)))
                .flatten();
            let matched = checked.and_then(|a| {
                let (slot, id) = match a {
                    Answers::Id(id) => ((id as usize) & (ring_len - 1), Some(id)),
                    Answers::Slot(slot) => (slot, None),
                };
                let flight = ring[slot]?;
                id.is_none_or(|id| id == flight.id)
                    .then_some((slot, flight.sent))
            });
            match matched {
                Some((slot, sent)) => {
                    ring[slot] = None;
                    outstanding -= 1;
                    if sent >= measure_from {
                        replies += 1;
                        rtt.record(now.saturating_sub(sent));
                    }
                }
                None => invalid += 1,
            }
        }
        if now.saturating_sub(last_sweep) >= 10_000_000 {
            last_sweep = now;
            for slot in ring.iter_mut() {
                if slot.is_some_and(|f| now.saturating_sub(f.sent) > timeout) {
                    *slot = None;
                    outstanding -= 1;
                    lost += 1;
                }
            }
        }
    }
    Ok(LoadReport {
        replies,
        lost,
        invalid,
        elapsed: stop_at.saturating_duration_since(start_measuring),
        rtt: rtt.into_histogram(),
    })
}

/// Loads `target` as `config` says and merges what every socket measured.
/// The generator's threads run where the calling thread may (see
/// [`pin_thread`]).
pub fn run(target: SocketAddr, kind: Target, config: LoadConfig) -> io::Result<LoadReport> {
    let sockets = config.sockets.clamp(1, 1024);
    let duration = config.duration.min(MAX_DURATION);
    let warmup = Duration::from_millis(200);
    let started = Instant::now();
    let start_measuring = started + warmup;
    let stop_at = start_measuring + duration;
    let handles: Vec<_> = (0..sockets)
        .map(|i| {
            // Spread the window; the first sockets take the remainder.
            let share = config.window / sockets + usize::from(i < config.window % sockets);
            let kind = kind.clone();
            thread::spawn(move || {
                run_socket(
                    target,
                    kind,
                    share.max(1),
                    config,
                    started,
                    start_measuring,
                    stop_at,
                )
            })
        })
        .collect();
    let mut total: Option<LoadReport> = None;
    for h in handles {
        let r = h
            .join()
            .map_err(|_| io::Error::other("load thread panicked"))??;
        match total.as_mut() {
            None => total = Some(r),
            Some(t) => {
                t.replies += r.replies;
                t.lost += r.lost;
                t.invalid += r.invalid;
                let _ = t.rtt.add(&r.rtt);
            }
        }
    }
    total.ok_or_else(|| io::Error::other("no sockets"))
}

/// The reference: the simplest request-reply server that is still as
/// good at I/O as cerv, one thread echoing every datagram back to its
/// sender, in batches (`recvmmsg`, then one `sendmmsg` for all of them).
pub struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EchoServer {
    /// Starts on a free loopback port, its thread on `cpu` if given.
    pub fn start(cpu: Option<usize>) -> io::Result<EchoServer> {
        EchoServer::start_with(cpu, false)
    }

    /// An echo that also asks the kernel to stamp every arrival
    /// (`SO_TIMESTAMPNS`, as cerv does) and reads each stamp: the ceiling
    /// for a time server, which needs them.
    pub fn start_stamped(cpu: Option<usize>) -> io::Result<EchoServer> {
        EchoServer::start_with(cpu, true)
    }

    fn start_with(cpu: Option<usize>, stamped: bool) -> io::Result<EchoServer> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        if stamped {
            service::transport::socket::enable_timestamps(&socket)?;
        }
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let addr = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (pinned_tx, pinned) = std::sync::mpsc::channel();
        let thread = thread::spawn({
            let stop = stop.clone();
            move || {
                let _ = pinned_tx.send(cpu.map_or(Ok(()), pin_thread));
                let fd = socket.as_raw_fd();
                let mut batch = Mmsg::new();
                if stamped {
                    // SAFETY: all-zero bytes are a valid array of u64.
                    batch.controls = Some(Box::new(unsafe { std::mem::zeroed() }));
                }
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = batch.recv(fd, true, false) {
                        let _ = batch.send(fd, n, true);
                    }
                }
            }
        });
        pinned
            .recv()
            .map_err(|_| io::Error::other("echo thread ended"))??;
        Ok(EchoServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A memory figure of a process from `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Peak resident memory of a process (`VmHWM`), KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// Current resident memory of a process (`VmRSS`), KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity writes
    // at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    let ok = unsafe { libc::sched_getaffinity(0, size, &mut set) } == 0;
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads the set within its size.
        .filter(|&c| ok && unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Pins thread `tid` (0: the calling thread) to `cpu`.
fn set_affinity(tid: libc::pid_t, cpu: usize) -> io::Result<()> {
    // SAFETY: as in `allowed_cpus`; CPU_SET writes within the set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    if unsafe { libc::sched_setaffinity(tid, size, &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to `cpu`; the threads it starts afterwards
/// (the generator's) inherit it.
pub fn pin_thread(cpu: usize) -> io::Result<()> {
    set_affinity(0, cpu)
}

/// Pins every thread of process `pid` to `cpu` (what `taskset -a -p -c`
/// does); threads it starts later inherit the pinning of their parent.
pub fn pin_process(pid: u32, cpu: usize) -> io::Result<()> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            set_affinity(tid, cpu)?;
        }
    }
    Ok(())
}

/// CPU time a process (all its threads, and its children that ended)
/// has used, user and system, from `/proc/PID/stat` (in clock ticks,
/// 10 ms).
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: count fields after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime, stime, cutime, cstime: fields 14 to 17, here 11 to 14.
    let ticks: u64 = fields
        .get(11..15)?
        .iter()
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// Sends one probe from each of `count` distinct source addresses
/// (127.1.x.y, all loopback), waiting briefly for each answer; returns how
/// many were answered. Sockets are opened and closed one at a time.
pub fn many_peers(target: SocketAddr, count: usize, wait: Duration) -> io::Result<usize> {
    let mut tx: DatagramBuf = [0; MAX_DATAGRAM];
    let mut rx = [0u8; 2048];
    let mut answered = 0;
    for i in 0..count.min(65_536) {
        let source = std::net::Ipv4Addr::new(127, 1, (i >> 8) as u8, i as u8);
        let socket = UdpSocket::bind((source, 0))?;
        socket.connect(target)?;
        socket.set_read_timeout(Some(wait))?;
        let (len, _) = wire::encode_client(
            &ClientFrame::Request {
                id: i as u64,
                deadline: Duration::from_secs(1),
                call: Call::Probe {
                    ts1: SystemClock.now(),
                },
            },
            &mut tx,
            None,
        );
        socket.send(&tx[..len])?;
        if socket.recv(&mut rx).is_ok() {
            answered += 1;
        }
    }
    Ok(answered)
}

/// Sends valid probe requests from `source` to `target` as fast as one
/// thread can, until `stop` is set or `limit` passes; returns how many.
pub fn flood(
    target: SocketAddr,
    source: std::net::IpAddr,
    stop: &AtomicBool,
    limit: Duration,
) -> io::Result<u64> {
    let socket = UdpSocket::bind((source, 0))?;
    socket.connect(target)?;
    socket.set_nonblocking(true)?;
    let mut tx: DatagramBuf = [0; MAX_DATAGRAM];
    let mut rx = [0u8; 2048];
    let started = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
        let (len, _) = wire::encode_client(
            &ClientFrame::Request {
                id: sent,
                deadline: Duration::from_secs(1),
                call: Call::Probe {
                    ts1: SystemClock.now(),
                },
            },
            &mut tx,
            None,
        );
        if socket.send(&tx[..len]).is_ok() {
            sent += 1;
        }
        // Drain whatever came back, so our own buffer never fills.
        while socket.recv(&mut rx).is_ok() {}
    }
    Ok(sent)
}

/// Sends one probe request from each of `count` distinct loopback source
/// addresses (127.16.0.0 upward), without waiting for answers: what a
/// server sees of a flood with spoofed source addresses.
pub fn spoof(target: SocketAddr, count: u32) -> io::Result<u32> {
    let mut tx: DatagramBuf = [0; MAX_DATAGRAM];
    let base = u32::from(std::net::Ipv4Addr::new(127, 16, 0, 0));
    let mut sent = 0;
    for i in 0..count.min(1 << 20) {
        let socket = UdpSocket::bind((std::net::Ipv4Addr::from(base + i), 0))?;
        let (len, _) = wire::encode_client(
            &ClientFrame::Request {
                id: u64::from(i),
                deadline: Duration::from_secs(30),
                call: Call::Now,
            },
            &mut tx,
            None,
        );
        if socket.send_to(&tx[..len], target).is_ok() {
            sent += 1;
        }
    }
    Ok(sent)
}
