//! A user-space impairment relay for UDP on loopback.
//!
//! ```text
//!  client ──▶ front socket ──(to_server: delay, jitter, loss, dup, reorder)──▶ back socket ──▶ server
//!  client ◀── front socket ◀──(to_client: delay, jitter, loss, dup, reorder)── back socket ◀── server
//! ```
//!
//! The relay listens on a loopback port; each client address gets its own
//! back socket toward the server, so the server sees one peer per client,
//! as it would without the relay. Every datagram's fate is drawn from a
//! seeded generator, one per direction, so a run with the same traffic
//! repeats exactly.
//!
//! Timing: arrivals are stamped by the kernel (`SO_TIMESTAMPNS`), so the
//! relay's own wake-up latency is absorbed into the delay instead of added
//! to it; sends are scheduled by one thread that sleeps with a 1 ns timer
//! slack until just before each deadline and spins the last few
//! microseconds. Delays are then accurate to a few microseconds on an idle
//! machine. A zero delay is forwarded at once.
//!
//! [`Relay::retarget`] points every back socket at another server mid-run
//! (a server replaced by one with another time, a route that changes):
//! replies still on their way from the old server are then refused by the
//! kernel, as they would be after a real change.
//!
//! Everything is bounded: the relay stops when [`Relay::stop`] is called or
//! it is dropped, every blocking read has a short timeout, and the number
//! of clients and queued datagrams is capped.
//!
//! **Streams.** [`Relay::start_stream`] relays TCP (so TLS too) the same
//! way: each client connection gets one of its own to the server, and each
//! chunk read (kernel-stamped like a datagram) is held for the direction's
//! delay with its jitter, on the same scheduler, but never sent before the
//! chunk read before it: a connection's bytes keep their order, as on a
//! real path. Loss, duplication and reordering do not apply to a stream.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Normal};
use service::clock::{Clock, SystemClock};
use service::transport::socket::{enable_timestamps, recv_stamped};
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How delay varies around its mean.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Jitter {
    /// Every datagram takes exactly the delay.
    None,
    /// Uniform within ± this.
    Uniform(Duration),
    /// Normal with this standard deviation (negative draws become zero).
    Normal(Duration),
}

/// What happens to datagrams going one way.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Direction {
    /// Mean one-way delay added.
    pub delay: Duration,
    /// Variation around it.
    pub jitter: Jitter,
    /// Share dropped, 0 to 1.
    pub loss: f64,
    /// Share sent twice (the copy with its own delay), 0 to 1.
    pub duplicate: f64,
    /// Share held back by [`Direction::reorder_hold`] more, so that later
    /// datagrams overtake them, 0 to 1.
    pub reorder: f64,
    /// Extra delay of a reordered datagram.
    pub reorder_hold: Duration,
}

impl Default for Direction {
    fn default() -> Self {
        Direction::CLEAN
    }
}

impl Direction {
    /// Nothing added.
    pub const CLEAN: Direction = Direction {
        delay: Duration::ZERO,
        jitter: Jitter::None,
        loss: 0.0,
        duplicate: 0.0,
        reorder: 0.0,
        reorder_hold: Duration::from_millis(2),
    };

    /// A fixed delay.
    pub fn delay(delay: Duration) -> Self {
        Direction {
            delay,
            ..Direction::CLEAN
        }
    }

    /// With jitter.
    pub fn jitter(self, jitter: Jitter) -> Self {
        Direction { jitter, ..self }
    }

    /// With loss.
    pub fn loss(self, loss: f64) -> Self {
        Direction { loss, ..self }
    }

    /// With duplication.
    pub fn duplicate(self, duplicate: f64) -> Self {
        Direction { duplicate, ..self }
    }

    /// With reordering.
    pub fn reorder(self, reorder: f64) -> Self {
        Direction { reorder, ..self }
    }

    fn draw_delay(&self, rng: &mut StdRng) -> Duration {
        let mean = self.delay.as_secs_f64();
        let secs = match self.jitter {
            Jitter::None => mean,
            Jitter::Uniform(j) => {
                let j = j.as_secs_f64();
                mean + (rng.random::<f64>() * 2.0 - 1.0) * j
            }
            Jitter::Normal(sd) => match Normal::new(mean, sd.as_secs_f64()) {
                Ok(normal) => normal.sample(rng),
                Err(_) => mean,
            },
        };
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// The send times of one datagram: none if lost, two if duplicated.
    fn fate(&self, rng: &mut StdRng) -> Fate {
        // Draw every number every time, so one datagram's fate does not
        // shift the draws of the next.
        let lost = rng.random::<f64>() < self.loss;
        let duplicated = rng.random::<f64>() < self.duplicate;
        let reordered = rng.random::<f64>() < self.reorder;
        let first = self.draw_delay(rng);
        let second = self.draw_delay(rng);
        if lost {
            return Fate::Lost;
        }
        let hold = if reordered {
            self.reorder_hold
        } else {
            Duration::ZERO
        };
        Fate::Send {
            delays: [Some(first + hold), duplicated.then_some(second)],
            reordered,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.delay)?;
        match self.jitter {
            Jitter::None => {}
            Jitter::Uniform(j) => write!(f, " ± {j:?} uniform")?,
            Jitter::Normal(j) => write!(f, " ± {j:?} normal")?,
        }
        for (share, what) in [
            (self.loss, "loss"),
            (self.duplicate, "dup"),
            (self.reorder, "reorder"),
        ] {
            if share > 0.0 {
                write!(f, ", {:.0}% {what}", share * 100.0)?;
            }
        }
        Ok(())
    }
}

enum Fate {
    Lost,
    Send {
        delays: [Option<Duration>; 2],
        reordered: bool,
    },
}

/// Both directions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Impairment {
    /// Client to server.
    pub to_server: Direction,
    /// Server to client.
    pub to_client: Direction,
}

impl Impairment {
    /// The same both ways.
    pub fn symmetric(d: Direction) -> Self {
        Impairment {
            to_server: d,
            to_client: d,
        }
    }
}

/// Per-direction counters.
#[derive(Debug, Default)]
pub struct DirectionStats {
    /// Datagrams read.
    pub received: AtomicU64,
    /// Datagrams sent on (copies included).
    pub sent: AtomicU64,
    /// Dropped on purpose.
    pub lost: AtomicU64,
    /// Extra copies sent.
    pub duplicated: AtomicU64,
    /// Held back to be overtaken.
    pub reordered: AtomicU64,
    /// Largest lateness of a send against its schedule, in nanoseconds.
    pub max_late_ns: AtomicU64,
}

/// What the relay did.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Client to server.
    pub to_server: DirectionStats,
    /// Server to client.
    pub to_client: DirectionStats,
}

/// Most clients one relay serves.
const MAX_SESSIONS: usize = 256;
/// Most datagrams waiting to be sent.
const MAX_QUEUED: usize = 100_000;
/// How often blocked reads look at the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// The scheduler spins this long before a deadline instead of sleeping.
const SPIN: Duration = Duration::from_micros(60);

struct Scheduled {
    due: Instant,
    seq: u64,
    bytes: Vec<u8>,
    out: Out,
    to_server: bool,
}

/// Where a scheduled send goes.
enum Out {
    /// A datagram on this socket (to this address, unless connected).
    Datagram(Arc<UdpSocket>, Option<SocketAddr>),
    /// Bytes on this connection; none: the end of the stream (FIN).
    Stream(Arc<TcpStream>),
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Reversed: the heap's top is the earliest.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// Where the back sockets send: the server, and every back socket opened
/// so far, so that [`Relay::retarget`] can move them all at once.
struct Backs {
    server: SocketAddr,
    sockets: Vec<Arc<UdpSocket>>,
}

impl Backs {
    /// Opens a back socket toward the current server, and keeps it.
    fn open(&mut self) -> io::Result<Arc<UdpSocket>> {
        let back = UdpSocket::bind((self.server.ip(), 0))?;
        back.connect(self.server)?;
        enable_timestamps(&back)?;
        back.set_read_timeout(Some(POLL))?;
        let back = Arc::new(back);
        self.sockets.push(back.clone());
        Ok(back)
    }
}

/// What both kinds of relay start with: the stop flag, the counters, the
/// sequence of scheduled chunks, where the back sockets go, and the
/// scheduler thread that sends what is due.
struct Core {
    stop: Arc<AtomicBool>,
    stats: Arc<RelayStats>,
    seq: Arc<AtomicU64>,
    backs: Arc<Mutex<Backs>>,
    schedule: mpsc::SyncSender<Scheduled>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Core {
    fn start(server: SocketAddr) -> Core {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(RelayStats::default());
        let (schedule, queue) = mpsc::sync_channel::<Scheduled>(MAX_QUEUED);
        let scheduler = thread::spawn({
            let stop = stop.clone();
            let stats = stats.clone();
            move || run_scheduler(queue, &stop, &stats)
        });
        Core {
            stop,
            stats,
            seq: Arc::new(AtomicU64::new(0)),
            backs: Arc::new(Mutex::new(Backs {
                server,
                sockets: Vec::new(),
            })),
            schedule,
            threads: vec![scheduler],
        }
    }
}

/// A running relay.
pub struct Relay {
    addr: SocketAddr,
    backs: Arc<Mutex<Backs>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
    stats: Arc<RelayStats>,
}

/// The half of the relay that reads one socket and schedules what it reads.
struct Reader {
    socket: Arc<UdpSocket>,
    direction: Direction,
    rng: Arc<Mutex<StdRng>>,
    stats: Arc<RelayStats>,
    to_server: bool,
    schedule: mpsc::SyncSender<Scheduled>,
    seq: Arc<AtomicU64>,
}

impl Reader {
    fn stats(&self) -> &DirectionStats {
        if self.to_server {
            &self.stats.to_server
        } else {
            &self.stats.to_client
        }
    }

    /// Decides the fate of one datagram and queues its sends.
    fn relay(&self, bytes: &[u8], arrived: Instant, via: &Arc<UdpSocket>, to: Option<SocketAddr>) {
        let stats = self.stats();
        stats.received.fetch_add(1, Ordering::Relaxed);
        let fate = match self.rng.lock() {
            Ok(mut rng) => self.direction.fate(&mut rng),
            Err(_) => return,
        };
        let Fate::Send { delays, reordered } = fate else {
            stats.lost.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if reordered {
            stats.reordered.fetch_add(1, Ordering::Relaxed);
        }
        if delays[1].is_some() {
            stats.duplicated.fetch_add(1, Ordering::Relaxed);
        }
        for delay in delays.into_iter().flatten() {
            let item = Scheduled {
                due: arrived + delay,
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
                bytes: bytes.to_vec(),
                out: Out::Datagram(via.clone(), to),
                to_server: self.to_server,
            };
            // A full queue drops, like a full router buffer.
            let _ = self.schedule.try_send(item);
        }
    }
}

/// Reads one datagram (or what a stream has) with its arrival time mapped
/// onto `Instant`.
fn read(socket: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, Option<SocketAddr>, Instant)> {
    let arrival = recv_stamped(socket.as_raw_fd(), buf)?;
    let now = Instant::now();
    let at = match arrival.kernel_time {
        Some(kernel) => {
            let age = SystemClock.now().diff_i128(kernel).clamp(0, 1_000_000_000);
            now - Duration::from_nanos(age as u64)
        }
        None => now,
    };
    Ok((arrival.len, arrival.from, at))
}

fn set_timer_slack_1ns() {
    // SAFETY: prctl with PR_SET_TIMERSLACK only changes this thread's timer
    // slack.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

impl Relay {
    /// Starts a relay on a free loopback port toward `server`.
    pub fn start(server: SocketAddr, impairment: Impairment, seed: u64) -> io::Result<Relay> {
        Self::start_on((server.ip(), 0).into(), server, impairment, seed)
    }

    /// Starts a relay listening on `listen` toward `server`.
    pub fn start_on(
        listen: SocketAddr,
        server: SocketAddr,
        impairment: Impairment,
        seed: u64,
    ) -> io::Result<Relay> {
        let front = Arc::new(UdpSocket::bind(listen)?);
        enable_timestamps(&*front)?;
        front.set_read_timeout(Some(POLL))?;
        let addr = front.local_addr()?;
        let Core {
            stop,
            stats,
            seq,
            backs,
            schedule,
            mut threads,
        } = Core::start(server);

        let to_client_rng = Arc::new(Mutex::new(StdRng::seed_from_u64(seed ^ 0x5eed_0002)));
        let front_reader = Reader {
            socket: front.clone(),
            direction: impairment.to_server,
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(seed ^ 0x5eed_0001))),
            stats: stats.clone(),
            to_server: true,
            schedule: schedule.clone(),
            seq: seq.clone(),
        };
        threads.push(thread::spawn({
            let stop = stop.clone();
            let backs = backs.clone();
            move || {
                let mut sessions: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
                let mut back_threads = Vec::new();
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, Some(client), arrived)) = read(&front_reader.socket, &mut buf)
                    else {
                        continue;
                    };
                    let back = match sessions.get(&client) {
                        Some(back) => back.clone(),
                        None if sessions.len() >= MAX_SESSIONS => continue,
                        None => {
                            let opened = match backs.lock() {
                                Ok(mut backs) => backs.open(),
                                Err(_) => continue,
                            };
                            let Ok(back) = opened else {
                                continue;
                            };
                            sessions.insert(client, back.clone());
                            let reader = Reader {
                                socket: back.clone(),
                                direction: impairment.to_client,
                                rng: to_client_rng.clone(),
                                stats: front_reader.stats.clone(),
                                to_server: false,
                                schedule: front_reader.schedule.clone(),
                                seq: front_reader.seq.clone(),
                            };
                            let front = front_reader.socket.clone();
                            let stop = stop.clone();
                            back_threads.push(thread::spawn(move || {
                                let mut buf = vec![0u8; 65_536];
                                while !stop.load(Ordering::Relaxed) {
                                    if let Ok((len, _, arrived)) = read(&reader.socket, &mut buf) {
                                        reader.relay(&buf[..len], arrived, &front, Some(client));
                                    }
                                }
                            }));
                            back
                        }
                    };
                    front_reader.relay(&buf[..len], arrived, &back, None);
                }
                for b in back_threads {
                    let _ = b.join();
                }
            }
        }));
        Ok(Relay {
            addr,
            backs,
            stop,
            threads,
            stats,
        })
    }

    /// The address clients send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// The server datagrams go to now.
    pub fn server(&self) -> SocketAddr {
        self.backs
            .lock()
            .map_or_else(|b| b.into_inner().server, |b| b.server)
    }

    /// Sends everything from now on to `server` instead: every client's
    /// back socket is reconnected, so datagrams queued in the relay go to
    /// the new server when due, and replies still coming from the old one
    /// are dropped by the kernel. A stream relay sends the connections it
    /// accepts from now on to the new server.
    pub fn retarget(&self, server: SocketAddr) -> io::Result<()> {
        let mut backs = self
            .backs
            .lock()
            .map_err(|_| io::Error::other("relay state poisoned"))?;
        for back in &backs.sockets {
            back.connect(server)?;
        }
        backs.server = server;
        Ok(())
    }

    /// Stops every thread and waits for them.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Relay {
    /// Starts a relay for TCP (and so TLS) on a free loopback port toward
    /// `server`: each connection is relayed over one of its own to the
    /// server, and each chunk read is held for the direction's delay,
    /// jitter included, but never sent before the chunk read before it (a
    /// stream's bytes do not overtake each other). Loss, duplication and
    /// reordering are for datagrams and are ignored here: TCP would
    /// retransmit a loss, and bytes are never duplicated or reordered on a
    /// connection.
    pub fn start_stream(
        server: SocketAddr,
        impairment: Impairment,
        seed: u64,
    ) -> io::Result<Relay> {
        let listener = TcpListener::bind((server.ip(), 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        // Streams have no back sockets to reconnect: a retarget sends the
        // connections opened after it to the new server.
        let Core {
            stop,
            stats,
            seq,
            backs,
            schedule,
            mut threads,
        } = Core::start(server);
        let rngs = [0x5eed_0001, 0x5eed_0002]
            .map(|s| Arc::new(Mutex::new(StdRng::seed_from_u64(seed ^ s))));
        threads.push(thread::spawn({
            let stop = stop.clone();
            let stats = stats.clone();
            let backs = backs.clone();
            move || {
                let mut pumps = Vec::new();
                while !stop.load(Ordering::Relaxed) && pumps.len() < 2 * MAX_SESSIONS {
                    if !readable(&listener, POLL) {
                        continue;
                    }
                    let Ok((client, _)) = listener.accept() else {
                        continue;
                    };
                    let server = backs.lock().map_or(server, |b| b.server);
                    let Ok((client, back)) = open_stream_pair(client, server) else {
                        continue;
                    };
                    for (from, to, direction, rng, to_server) in [
                        (
                            client.clone(),
                            back.clone(),
                            impairment.to_server,
                            rngs[0].clone(),
                            true,
                        ),
                        (back, client, impairment.to_client, rngs[1].clone(), false),
                    ] {
                        let pump = StreamPump {
                            from,
                            to,
                            direction,
                            rng,
                            stats: stats.clone(),
                            to_server,
                            schedule: schedule.clone(),
                            seq: seq.clone(),
                        };
                        let stop = stop.clone();
                        pumps.push(thread::spawn(move || pump.run(&stop)));
                    }
                }
                for p in pumps {
                    let _ = p.join();
                }
            }
        }));
        Ok(Relay {
            addr,
            backs,
            stop,
            threads,
            stats,
        })
    }
}

/// Waits at most `limit` for `fd` to be readable (a listener: to have a
/// connection to accept).
fn readable(fd: &impl AsRawFd, limit: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd we own, for a bounded time.
    let n = unsafe { libc::poll(&mut pfd, 1, limit.as_millis() as libc::c_int) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// The accepted client and a connection of its own to the server, both
/// stamping arrivals, without Nagle (a probe must leave at once), with
/// reads that wake up to look at the stop flag.
fn open_stream_pair(
    client: TcpStream,
    server: SocketAddr,
) -> io::Result<(Arc<TcpStream>, Arc<TcpStream>)> {
    let back = TcpStream::connect_timeout(&server, Duration::from_secs(2))?;
    for s in [&client, &back] {
        s.set_nonblocking(false)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(POLL))?;
        // The scheduler writes; a peer that stops reading must not hold
        // it for long.
        s.set_write_timeout(Some(Duration::from_secs(1)))?;
        enable_timestamps(s)?;
    }
    Ok((Arc::new(client), Arc::new(back)))
}

/// One direction of a relayed connection: reads chunks, schedules each
/// after its delay and never before the one read before it.
struct StreamPump {
    from: Arc<TcpStream>,
    to: Arc<TcpStream>,
    direction: Direction,
    rng: Arc<Mutex<StdRng>>,
    stats: Arc<RelayStats>,
    to_server: bool,
    schedule: mpsc::SyncSender<Scheduled>,
    seq: Arc<AtomicU64>,
}

impl StreamPump {
    fn run(self, stop: &AtomicBool) {
        let stats = if self.to_server {
            &self.stats.to_server
        } else {
            &self.stats.to_client
        };
        let mut buf = vec![0u8; 65_536];
        let mut last_due: Option<Instant> = None;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let (len, arrived) = match read(&*self.from, &mut buf) {
                Ok((len, _, arrived)) => (len, arrived),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                // A reset or any other failure ends the direction like a
                // close does.
                Err(_) => (0, Instant::now()),
            };
            let delay = match self.rng.lock() {
                Ok(mut rng) => self.direction.draw_delay(&mut rng),
                Err(_) => return,
            };
            // A chunk leaves no earlier than the one before it.
            let due = last_due.map_or(arrived + delay, |last| (arrived + delay).max(last));
            last_due = Some(due);
            if len > 0 {
                stats.received.fetch_add(1, Ordering::Relaxed);
            }
            let item = Scheduled {
                due,
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
                // Empty: the end of the stream, passed on in its turn.
                bytes: buf[..len].to_vec(),
                out: Out::Stream(self.to.clone()),
                to_server: self.to_server,
            };
            if self.schedule.send(item).is_err() || len == 0 {
                return;
            }
        }
    }
}

fn run_scheduler(queue: mpsc::Receiver<Scheduled>, stop: &AtomicBool, stats: &RelayStats) {
    set_timer_slack_1ns();
    let mut heap: BinaryHeap<Scheduled> = BinaryHeap::new();
    while !stop.load(Ordering::Relaxed) {
        // Take in new work, waiting at most until the next deadline.
        let wait = heap
            .peek()
            .map(|s| {
                s.due
                    .saturating_duration_since(Instant::now())
                    .saturating_sub(SPIN)
            })
            .unwrap_or(POLL)
            .min(POLL);
        match queue.recv_timeout(wait) {
            Ok(item) => {
                heap.push(item);
                while let Ok(item) = queue.try_recv() {
                    heap.push(item);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if heap.is_empty() {
                    return;
                }
            }
        }
        // Send what is due, spinning through the last microseconds.
        while let Some(next) = heap.peek() {
            let now = Instant::now();
            if next.due > now + SPIN {
                break;
            }
            while Instant::now() < next.due {
                std::hint::spin_loop();
            }
            let Some(item) = heap.pop() else { break };
            let late = Instant::now()
                .saturating_duration_since(item.due)
                .as_nanos() as u64;
            let dir = if item.to_server {
                &stats.to_server
            } else {
                &stats.to_client
            };
            dir.max_late_ns.fetch_max(late, Ordering::Relaxed);
            let sent = match &item.out {
                Out::Datagram(via, Some(to)) => via.send_to(&item.bytes, to).map(|_| ()),
                Out::Datagram(via, None) => via.send(&item.bytes).map(|_| ()),
                Out::Stream(conn) if item.bytes.is_empty() => conn.shutdown(Shutdown::Write),
                Out::Stream(conn) => (&**conn).write_all(&item.bytes),
            };
            if sent.is_ok() && !item.bytes.is_empty() {
                dir.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fates_repeat_from_a_seed() {
        let d = Direction::delay(Duration::from_millis(2))
            .jitter(Jitter::Normal(Duration::from_millis(1)))
            .loss(0.2)
            .duplicate(0.1)
            .reorder(0.1);
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..200)
                .map(|_| match d.fate(&mut rng) {
                    Fate::Lost => None,
                    Fate::Send { delays, .. } => Some(delays),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn shares_come_out_near_their_settings() {
        let d = Direction::delay(Duration::from_millis(1))
            .jitter(Jitter::Uniform(Duration::from_micros(100)))
            .loss(0.2)
            .duplicate(0.1);
        let mut rng = StdRng::seed_from_u64(1);
        let (mut lost, mut dup, mut n) = (0, 0, 0);
        for _ in 0..10_000 {
            n += 1;
            match d.fate(&mut rng) {
                Fate::Lost => lost += 1,
                Fate::Send { delays, .. } => {
                    let first = delays[0].unwrap();
                    assert!(
                        first >= Duration::from_micros(900) && first <= Duration::from_micros(1100)
                    );
                    if delays[1].is_some() {
                        dup += 1;
                    }
                }
            }
        }
        let loss = lost as f64 / n as f64;
        let dups = dup as f64 / n as f64;
        assert!((0.18..0.22).contains(&loss), "{loss}");
        assert!((0.07..0.10).contains(&dups), "{dups}");
    }

    /// A server that answers every datagram with `tag`, until `stop`.
    fn tagged_server(tag: u8, stop: Arc<AtomicBool>) -> (SocketAddr, thread::JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(POLL)).unwrap();
        let addr = socket.local_addr().unwrap();
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&[tag], from);
                }
            }
        });
        (addr, thread)
    }

    #[test]
    fn retarget_moves_a_running_session_to_another_server() {
        let stop = Arc::new(AtomicBool::new(false));
        let (a, a_thread) = tagged_server(b'a', stop.clone());
        let (b, b_thread) = tagged_server(b'b', stop.clone());
        let relay = Relay::start(a, Impairment::symmetric(Direction::CLEAN), 1).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        client.connect(relay.addr()).unwrap();
        let ask = || {
            client.send(b"?").unwrap();
            let mut buf = [0u8; 8];
            let n = client.recv(&mut buf).expect("an answer within 2 s");
            buf[..n].to_vec()
        };
        assert_eq!(ask(), b"a");
        relay.retarget(b).unwrap();
        assert_eq!(relay.server(), b);
        // The same client, so the same back socket: now toward b.
        assert_eq!(ask(), b"b");
        assert_eq!(ask(), b"b");
        relay.stop();
        stop.store(true, Ordering::Relaxed);
        a_thread.join().unwrap();
        b_thread.join().unwrap();
    }

    #[test]
    fn a_stream_is_delayed_each_way_and_keeps_its_order() {
        use std::io::Read;
        // An echo server: every byte back, as it comes.
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = echo.local_addr().unwrap();
        let echoing = thread::spawn(move || {
            let (mut c, _) = echo.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 4096];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        // Jitter far larger than the gap between chunks: a relay that
        // reordered would scramble the bytes.
        let way = Direction::delay(Duration::from_millis(2))
            .jitter(Jitter::Uniform(Duration::from_micros(1_900)));
        let relay = Relay::start_stream(server, Impairment::symmetric(way), 3).unwrap();
        let mut c = TcpStream::connect(relay.addr()).unwrap();
        c.set_nodelay(true).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        let sent: Vec<u8> = (0..=255u8).collect();
        for chunk in sent.chunks(8) {
            c.write_all(chunk).unwrap();
            thread::sleep(Duration::from_micros(200));
        }
        let mut got = vec![0u8; sent.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, sent, "the bytes came back out of order");
        // Two ways, each at least 0.1 ms and at most 3.9 ms late.
        let took = started.elapsed();
        assert!(took >= Duration::from_micros(200), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        let s = relay.stats();
        assert!(s.to_server.received.load(Ordering::Relaxed) >= 1);
        assert!(s.to_client.sent.load(Ordering::Relaxed) >= 1);
        drop(c);
        relay.stop();
        echoing.join().unwrap();
    }

    #[test]
    fn a_stream_round_trip_takes_both_delays() {
        use std::io::Read;
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = echo.local_addr().unwrap();
        let echoing = thread::spawn(move || {
            let (mut c, _) = echo.accept().unwrap();
            c.set_nodelay(true).unwrap();
            let mut buf = [0u8; 64];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let relay = Relay::start_stream(
            server,
            Impairment {
                to_server: Direction::delay(Duration::from_millis(3)),
                to_client: Direction::delay(Duration::from_millis(1)),
            },
            1,
        )
        .unwrap();
        let mut c = TcpStream::connect(relay.addr()).unwrap();
        c.set_nodelay(true).unwrap();
        let mut rtts = Vec::new();
        for i in 0..5u8 {
            let started = Instant::now();
            c.write_all(&[i]).unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i);
            rtts.push(started.elapsed());
        }
        rtts.sort();
        // 4 ms added; the relay's own cost on an idle machine is tens of
        // microseconds, on a busy one more: only the floor is strict.
        assert!(rtts[0] >= Duration::from_millis(4), "{rtts:?}");
        assert!(rtts[2] < Duration::from_millis(50), "{rtts:?}");
        drop(c);
        relay.stop();
        echoing.join().unwrap();
    }

    #[test]
    fn normal_jitter_never_goes_negative() {
        let d = Direction::delay(Duration::from_micros(100))
            .jitter(Jitter::Normal(Duration::from_millis(5)));
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..1000 {
            if let Fate::Send { delays, .. } = d.fate(&mut rng) {
                assert!(delays[0].is_some());
            }
        }
    }
}
