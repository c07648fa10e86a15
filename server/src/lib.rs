//! cerv, the time server, as a library: the binary is a thin shell around
//! [`Server`].
//!
//! - [`TimeServer`]: the handlers of [`service::TimeService`].
//! - [`Config`] and [`Server`]: bind the sockets (cerv's wire, and NTP
//!   with `ntp_listen`), serve until told to stop.
//! - [`measure_precision`]: the clock's precision, for NTP replies.
//! - [`Monitor`] and [`status`]: `cerv status`, live counters in a table.

pub mod status;

use service::clock::{Clock, SkewedClock, SystemClock};
use service::rpc::{ProbeReply, TimeService};
use service::time::{Nanos, Timestamp};
use service::transport::face::SharedMasterKeys;
use service::transport::face::{Face, NtpFace};
use service::transport::server::{
    HandlerFuture, ServerConfig, ServerStats, UdpServer, run_channel,
};
use service::transport::tcp::{Handler, KeService, Protocol, TcpConfig, TcpServer, TcpStats};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tarpc::context::Context;
use tarpc::server::Serve;

/// The handlers. Stateless apart from the clock, so it is cloned per request.
#[derive(Clone, Debug)]
pub struct TimeServer {
    clock: HandlerClock,
    processing_delay: Duration,
    /// The transport replaces ts2, ts3 and `now`'s answer with its own
    /// readings next to the socket: the handlers need not read the clock.
    transport_stamps: bool,
}

/// The clock the handlers read. tarpc's methods take `self`, so the
/// handlers are cloned for every request: the usual clock (the system
/// clock, shifted by `--offset` or not) is held by value, with no reference
/// count to bump on each request and no virtual call to read it.
#[derive(Clone, Debug)]
enum HandlerClock {
    System(SkewedClock<SystemClock>),
    Shared(Arc<dyn Clock>),
}

impl HandlerClock {
    fn now(&self) -> Timestamp {
        match self {
            HandlerClock::System(clock) => clock.now(),
            HandlerClock::Shared(clock) => clock.now(),
        }
    }
}

impl TimeServer {
    /// Handlers reading `clock`, pausing `processing_delay` in each call
    /// (simulated work, for demos and tests; zero in production).
    pub fn new(clock: Arc<dyn Clock>, processing_delay: Duration) -> Self {
        TimeServer {
            clock: HandlerClock::Shared(clock),
            processing_delay,
            transport_stamps: false,
        }
    }

    /// Handlers reading the system clock shifted by `offset`.
    pub fn system(offset: Nanos, processing_delay: Duration) -> Self {
        TimeServer {
            clock: HandlerClock::System(SkewedClock::new(SystemClock, offset)),
            processing_delay,
            transport_stamps: false,
        }
    }

    /// The same handlers for transports that stamp ts2 and ts3 (and
    /// `now()`'s answer) themselves, next to the socket, as every one of
    /// cerv's does (`UdpServer`, `TcpServer`): the handlers then read no
    /// clock, whose readings would only be replaced (one reading per
    /// request is about a hundredth of a busy server's time). Their
    /// answers then carry the epoch instead.
    pub fn stamped_by_transport(self) -> Self {
        TimeServer {
            transport_stamps: true,
            ..self
        }
    }

    /// The clock now, unless the transport will stamp the answer itself.
    fn reading(&self) -> Timestamp {
        if self.transport_stamps {
            Timestamp::EPOCH
        } else {
            self.clock.now()
        }
    }

    async fn work(&self) {
        if !self.processing_delay.is_zero() {
            // Boxed: a timer held in place would make every handler's
            // future, which the datagram servers move into place for each
            // request, several times larger, also when it never waits.
            Box::pin(tokio::time::sleep(self.processing_delay)).await;
        }
    }
}

impl TimeService for TimeServer {
    /// ts2 and ts3 are read here for transports that do not stamp them
    /// (tarpc's in-memory channel, say); cerv's own replace them with
    /// readings taken next to the socket.
    async fn probe(self, _: Context, ts1: Timestamp) -> ProbeReply {
        let ts2 = self.reading();
        // With no work between them, ts3 is ts2: a second reading would
        // only add the cost of reading the clock to every request.
        let ts3 = if self.processing_delay.is_zero() {
            ts2
        } else {
            self.work().await;
            self.reading()
        };
        ProbeReply {
            ts1,
            ts2,
            ts3,
            ts4: None,
        }
    }

    async fn now(self, _: Context) -> Timestamp {
        self.work().await;
        self.reading()
    }
}

/// How to run a server.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Simulated clock skew: the server answers with the system clock plus
    /// this. Gives a test on one machine a known true offset.
    pub offset: Nanos,
    /// Simulated work in every call, between ts2 and ts3.
    pub processing_delay: Duration,
    /// Limits of the UDP transport.
    pub transport: ServerConfig,
    /// How requests reach the handlers.
    pub dispatch: Dispatch,
    /// Addresses to answer NTP on (none: no NTP).
    pub ntp_listen: Vec<SocketAddr>,
    /// How the NTP face describes the clock. Its precision is measured
    /// when the server binds.
    pub ntp: NtpFace,
    /// Addresses to serve cerv's wire on over TCP.
    pub tcp_listen: Vec<SocketAddr>,
    /// Addresses to serve cerv's wire on over TLS (needs `tls`).
    pub tls_listen: Vec<SocketAddr>,
    /// The TLS certificate and key, for `tls_listen`.
    pub tls: Option<Arc<service::tls::TlsServerConfig>>,
    /// Limits of the TCP and TLS listeners.
    pub tcp: TcpConfig,
    /// Serve this clock instead of the system clock skewed by `offset`
    /// (a test's clock, whose time it can move while the server runs).
    pub clock: Option<Arc<dyn Clock>>,
    /// NTS: where the key exchange listens (needs `nts_tls` and
    /// `ntp_listen`); the NTP sockets then take NTS requests too.
    pub nts_ke_listen: Vec<SocketAddr>,
    /// The key exchange's TLS (TLS 1.3, ALPN `ntske/1`).
    pub nts_tls: Option<Arc<service::tls::TlsServerConfig>>,
    /// How often the NTS master key is replaced (the last three open
    /// cookies, so a client's cookies outlive two rotations).
    pub nts_key_rotation: Duration,
    /// The NTP server the key exchange names (by default none: clients
    /// use the key exchange's host).
    pub nts_ntp_server: Option<String>,
    /// The NTP port it names (by default the first NTP socket's, when it
    /// is not 123): another when a port mapping or a proxy stands between.
    pub nts_ntp_port: Option<u16>,
}

/// How requests reach the handlers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dispatch {
    /// Each request is handled as its datagram is read, without per-peer
    /// state; a handler that must wait (`--processing-delay`) gets a task.
    #[default]
    Inline,
    /// One tarpc `BaseChannel` per peer, in a bounded table with idle
    /// eviction: tarpc's own request tracking, at about twice the cost per
    /// request and 14 KiB per peer.
    Channels,
}

impl std::str::FromStr for Dispatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "inline" => Ok(Dispatch::Inline),
            "channels" => Ok(Dispatch::Channels),
            _ => Err(format!(
                "unknown dispatch '{s}': expected inline or channels"
            )),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ([127, 0, 0, 1], 8081).into(),
            offset: Nanos::ZERO,
            processing_delay: Duration::ZERO,
            transport: ServerConfig::default(),
            dispatch: Dispatch::default(),
            ntp_listen: Vec::new(),
            ntp: NtpFace::default(),
            tcp_listen: Vec::new(),
            tls_listen: Vec::new(),
            tls: None,
            tcp: TcpConfig::default(),
            clock: None,
            nts_ke_listen: Vec::new(),
            nts_tls: None,
            nts_key_rotation: Duration::from_secs(86_400),
            nts_ntp_server: None,
            nts_ntp_port: None,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another process holds the port.
    #[error("cannot listen on {addr}: address already in use")]
    InUse {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// A privileged port without the privilege.
    #[error(
        "cannot listen on {addr}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    )]
    PermissionDenied {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The address is not one of this machine's.
    #[error("cannot listen on {addr}: address not available on this machine")]
    NotAvailable {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// TLS listeners without a certificate.
    #[error("--tls-listen and --nts-ke-listen need --tls-cert and --tls-key")]
    NoCertificate,
    /// A key exchange without NTP sockets to use its cookies.
    #[error("--nts-ke-listen needs --ntp-listen (NTS protects NTP)")]
    NtsWithoutNtp,
    /// Anything else.
    #[error("cannot listen on {addr}: {source}")]
    Other {
        /// The address asked for.
        addr: SocketAddr,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

impl BindError {
    /// What binding `addr` failed with, by kind.
    pub fn from_io(addr: SocketAddr, source: io::Error) -> BindError {
        match source.kind() {
            io::ErrorKind::AddrInUse => BindError::InUse { addr },
            io::ErrorKind::PermissionDenied => BindError::PermissionDenied { addr },
            io::ErrorKind::AddrNotAvailable => BindError::NotAvailable { addr },
            _ => BindError::Other { addr, source },
        }
    }
}

/// A server running in a task of its own (see [`Server::spawn`]). Dropping
/// it stops it too, without waiting.
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The addresses it answers NTP on, in the order configured.
    pub ntp_addrs: Vec<SocketAddr>,
    /// The addresses it serves over TCP, then TLS, in the order configured.
    pub stream_addrs: Vec<SocketAddr>,
    /// The addresses of its NTS key exchange.
    pub nts_ke_addrs: Vec<SocketAddr>,
    ntp_stats: Vec<Arc<ServerStats>>,
    stream_stats: Vec<Arc<TcpStats>>,
    ke_stats: Vec<Arc<TcpStats>>,
    stats: Arc<ServerStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Arc<ServerStats>>,
}

impl Running {
    /// Live counters of the cerv socket.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Live counters of the `i`-th NTP socket.
    pub fn ntp_stats(&self, i: usize) -> Option<&ServerStats> {
        self.ntp_stats.get(i).map(|s| &**s)
    }

    /// Live counters of the `i`-th TCP or TLS listener.
    pub fn stream_stats(&self, i: usize) -> Option<&TcpStats> {
        self.stream_stats.get(i).map(|s| &**s)
    }

    /// Live counters of the `i`-th NTS key-exchange listener.
    pub fn nts_ke_stats(&self, i: usize) -> Option<&TcpStats> {
        self.ke_stats.get(i).map(|s| &**s)
    }

    /// Stops it, lets requests in flight finish, and returns the counters.
    pub async fn stop(mut self) -> Arc<ServerStats> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(stats) => stats,
            Err(_) => self.stats.clone(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One socket's live counters, for [`Monitor`].
#[derive(Clone)]
enum FaceCounters {
    Datagram(Arc<ServerStats>),
    Stream(Arc<TcpStats>),
}

/// A running server's status, read live: uptime, each socket's counters,
/// what it says of its clock. What `cerv status` and the metrics show.
#[derive(Clone)]
pub struct Monitor {
    started: std::time::Instant,
    faces: Vec<(&'static str, SocketAddr, FaceCounters)>,
    local_stratum: Option<u8>,
    reloads: Arc<(service::transport::Counter, service::transport::Counter)>,
    loaded_at: Arc<std::sync::Mutex<Timestamp>>,
}

impl Monitor {
    /// Counts a reload (SIGHUP), and whether it worked.
    pub fn reloaded(&self, ok: bool) {
        if ok {
            self.reloads.0.incr();
            *self.loaded_at.lock().unwrap_or_else(|p| p.into_inner()) = SystemClock.now();
        } else {
            self.reloads.1.incr();
        }
    }

    /// The Prometheus view now: the same counters as [`status`](Self::status).
    pub fn metrics(&self) -> service::metrics::CervMetrics {
        use service::metrics::ListenerMetrics;
        service::metrics::CervMetrics {
            uptime: self.started.elapsed(),
            listeners: self
                .faces
                .iter()
                .map(|(wire, addr, counters)| match counters {
                    FaceCounters::Datagram(s) => {
                        ListenerMetrics::datagram(wire, addr.to_string(), s)
                    }
                    FaceCounters::Stream(s) => ListenerMetrics::stream(wire, addr.to_string(), s),
                })
                .collect(),
        }
    }

    /// The status now.
    pub fn status(&self) -> service::control::ServerStatus {
        use std::collections::BTreeMap;
        let nonzero = |pairs: &[(&'static str, u64)]| -> BTreeMap<String, u64> {
            pairs
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(k, n)| (k.replace(' ', "_"), *n))
                .collect()
        };
        let faces = self
            .faces
            .iter()
            .map(|(wire, addr, counters)| match counters {
                FaceCounters::Datagram(s) => service::control::FaceStatus {
                    wire: (*wire).into(),
                    address: addr.to_string(),
                    received: s.received.get(),
                    replied: s.replied.get(),
                    connections: None,
                    drops: nonzero(&s.drops()),
                    events: nonzero(&[
                        ("kiss_sent", s.kiss_sent.get()),
                        ("kiss_suppressed", s.kiss_suppressed.get()),
                        ("nts_requests", s.nts_requests.get()),
                        ("nts_naks", s.nts_naks.get()),
                        ("peers_created", s.peers_created.get()),
                        ("peers_evicted", s.peers_evicted.get()),
                        ("recv_failed", s.recv_failed.get()),
                    ]),
                },
                FaceCounters::Stream(s) => service::control::FaceStatus {
                    wire: (*wire).into(),
                    address: addr.to_string(),
                    received: s.requests.get(),
                    replied: s.replied.get(),
                    connections: Some(s.accepted.get()),
                    drops: nonzero(&s.drops()),
                    events: BTreeMap::new(),
                },
            })
            .collect();
        let kernel = service::clock::kernel_clock().ok();
        let synced = kernel.as_ref().is_some_and(|k| k.synchronized);
        let stratum = match (self.local_stratum, synced) {
            (Some(s), _) => s,
            (None, true) => service::ntp::DEFAULT_SYNCED_STRATUM,
            (None, false) => 16,
        };
        service::control::ServerStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_ns: self.started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64,
            stratum,
            kernel_synchronized: synced,
            faces,
            loaded_at: self
                .loaded_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .to_string(),
            reloads: self.reloads.0.get(),
            reload_failures: self.reloads.1.get(),
        }
    }
}

/// A bound, not yet running server.
pub struct Server {
    udp: UdpServer,
    ntp: Vec<UdpServer>,
    streams: Vec<TcpServer>,
    ke: Vec<TcpServer>,
    nts: Option<(Arc<KeService>, Duration)>,
    handlers: TimeServer,
    dispatch: Dispatch,
    local_stratum: Option<u8>,
}

/// Binds a UDP socket, naming the address in the error.
fn bind_udp(addr: SocketAddr) -> Result<std::net::UdpSocket, BindError> {
    std::net::UdpSocket::bind(addr).map_err(|source| BindError::from_io(addr, source))
}

/// Binds a TCP listener, naming the address in the error.
async fn bind_tcp(addr: SocketAddr) -> Result<tokio::net::TcpListener, BindError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError::from_io(addr, source))
}

/// The clock's precision as NTP states it: log2 of the smallest step seen
/// between two successive readings, in seconds (chrony measures it the
/// same way). Reads the clock a few hundred times.
pub fn measure_precision(clock: &dyn Clock) -> i8 {
    let mut smallest = i128::MAX;
    let mut last = clock.now();
    for _ in 0..400 {
        let now = clock.now();
        let step = now.diff_i128(last);
        if step > 0 {
            smallest = smallest.min(step);
        }
        last = now;
    }
    let step = Nanos::try_from_i128(smallest).unwrap_or(Nanos::from_millis(1));
    service::ntp::precision_log2(step)
}

impl Server {
    /// Binds the socket. Must run inside a Tokio runtime.
    pub async fn bind(config: Config) -> Result<Server, BindError> {
        let socket = bind_udp(config.listen)?;
        let clock: Arc<dyn Clock> = match (&config.clock, config.offset) {
            (Some(clock), _) => clock.clone(),
            (None, Nanos::ZERO) => Arc::new(SystemClock),
            (None, offset) => Arc::new(SkewedClock::new(SystemClock, offset)),
        };
        // NTS: master keys shared by the key exchange and the NTP sockets.
        let master: Option<SharedMasterKeys> = if config.nts_ke_listen.is_empty() {
            None
        } else {
            if config.ntp_listen.is_empty() {
                return Err(BindError::NtsWithoutNtp);
            }
            Some(Arc::new(std::sync::RwLock::new(
                service::nts::MasterKeys::generate(),
            )))
        };
        let mut ntp = Vec::with_capacity(config.ntp_listen.len());
        if !config.ntp_listen.is_empty() {
            let face = Face::Ntp(NtpFace {
                precision: measure_precision(&*clock),
                nts: master.clone(),
                ..config.ntp.clone()
            });
            for &addr in &config.ntp_listen {
                let socket = bind_udp(addr)?;
                let transport = ServerConfig {
                    face: face.clone(),
                    ..config.transport.clone()
                };
                ntp.push(UdpServer::new(socket, clock.clone(), transport));
            }
        }
        let mut streams = Vec::new();
        for &addr in &config.tcp_listen {
            streams.push(TcpServer::new(
                bind_tcp(addr).await?,
                clock.clone(),
                config.tcp.clone(),
            ));
        }
        if !config.tls_listen.is_empty() {
            let tls = config.tls.clone().ok_or(BindError::NoCertificate)?;
            for &addr in &config.tls_listen {
                let tcp = TcpConfig {
                    tls: Some(tls.clone()),
                    ..config.tcp.clone()
                };
                streams.push(TcpServer::new(bind_tcp(addr).await?, clock.clone(), tcp));
            }
        }
        let mut ke = Vec::new();
        let mut nts = None;
        if let Some(master) = master {
            let tls = config.nts_tls.clone().ok_or(BindError::NoCertificate)?;
            let ntp_port = config
                .nts_ntp_port
                .or_else(|| {
                    ntp.first()
                        .and_then(|s| s.local_addr().ok())
                        .map(|a| a.port())
                })
                .filter(|&p| p != 123);
            let service = Arc::new(KeService {
                master,
                options: service::nts::ke::ServerOptions {
                    server: config.nts_ntp_server.clone(),
                    port: ntp_port,
                },
            });
            for &addr in &config.nts_ke_listen {
                let tcp = TcpConfig {
                    tls: Some(tls.clone()),
                    ..config.tcp.clone()
                };
                ke.push(TcpServer::new(bind_tcp(addr).await?, clock.clone(), tcp));
            }
            nts = Some((service, config.nts_key_rotation));
        }
        Ok(Server {
            udp: UdpServer::new(socket, clock.clone(), config.transport),
            ntp,
            streams,
            ke,
            nts,
            handlers: match &config.clock {
                Some(clock) => TimeServer::new(clock.clone(), config.processing_delay),
                None => TimeServer::system(config.offset, config.processing_delay),
            }
            .stamped_by_transport(),
            dispatch: config.dispatch,
            local_stratum: config.ntp.local_stratum,
        })
    }

    /// The address actually bound (useful after binding port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// The NTP addresses actually bound, in the order configured.
    pub fn ntp_addrs(&self) -> io::Result<Vec<SocketAddr>> {
        self.ntp.iter().map(UdpServer::local_addr).collect()
    }

    /// The NTS key-exchange addresses actually bound.
    pub fn nts_ke_addrs(&self) -> io::Result<Vec<SocketAddr>> {
        self.ke.iter().map(TcpServer::local_addr).collect()
    }

    /// The TCP, then TLS, addresses actually bound, with whether each
    /// speaks TLS.
    pub fn stream_addrs(&self) -> io::Result<Vec<(SocketAddr, bool)>> {
        self.streams
            .iter()
            .map(|s| Ok((s.local_addr()?, s.is_tls())))
            .collect()
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<ServerStats> {
        self.udp.stats()
    }

    /// A live view of every socket, for `cerv status` and the metrics.
    pub fn monitor(&self) -> io::Result<Monitor> {
        let mut faces = vec![(
            "cerv",
            self.udp.local_addr()?,
            FaceCounters::Datagram(self.udp.stats()),
        )];
        for ntp in &self.ntp {
            faces.push((
                "ntp",
                ntp.local_addr()?,
                FaceCounters::Datagram(ntp.stats()),
            ));
        }
        for s in &self.streams {
            let wire = if s.is_tls() { "tls" } else { "tcp" };
            faces.push((wire, s.local_addr()?, FaceCounters::Stream(s.stats())));
        }
        for s in &self.ke {
            faces.push(("nts-ke", s.local_addr()?, FaceCounters::Stream(s.stats())));
        }
        Ok(Monitor {
            started: std::time::Instant::now(),
            faces,
            local_stratum: self.local_stratum,
            reloads: Arc::default(),
            loaded_at: Arc::new(std::sync::Mutex::new(SystemClock.now())),
        })
    }

    /// Binds and serves in a task of its own on the current Tokio runtime,
    /// until [`Running::stop`]: the one way the tests (and a program that
    /// embeds a time server) start one.
    pub async fn spawn(config: Config) -> Result<Running, BindError> {
        let listen = config.listen;
        let server = Server::bind(config).await?;
        let addr = server.local_addr().map_err(|source| BindError::Other {
            addr: listen,
            source,
        })?;
        let stats = server.stats();
        let ntp_addrs = server.ntp_addrs().map_err(|source| BindError::Other {
            addr: listen,
            source,
        })?;
        let ntp_stats = server.ntp.iter().map(UdpServer::stats).collect();
        let stream_addrs = server
            .stream_addrs()
            .map_err(|source| BindError::Other {
                addr: listen,
                source,
            })?
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        let stream_stats = server.streams.iter().map(TcpServer::stats).collect();
        let nts_ke_addrs = server.nts_ke_addrs().map_err(|source| BindError::Other {
            addr: listen,
            source,
        })?;
        let ke_stats = server.ke.iter().map(TcpServer::stats).collect();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Ok(Running {
            addr,
            ntp_addrs,
            stream_addrs,
            nts_ke_addrs,
            ntp_stats,
            stream_stats,
            ke_stats,
            stats,
            stop: Some(stop),
            task,
        })
    }

    /// Serves until `shutdown` completes; returns the final counters of
    /// the cerv socket (each NTP socket logs its own as it stops).
    ///
    /// Each datagram socket (cerv's wire, each NTP address) is read by a
    /// thread of its own, which answers what it can at once; the TCP, TLS
    /// and key-exchange listeners, and handlers that must wait, run on the
    /// current task (see the README's speed section). NTP requests never
    /// reach the handlers: the transport answers them from its own stamps
    /// (there is no tarpc call in them to serve).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Arc<ServerStats> {
        let handlers = self.handlers;
        // Every socket stops when `shutdown` completes.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|&stop| stop).await;
            }
        };
        let inline = |handlers: TimeServer| {
            move |ctx, request| -> HandlerFuture {
                Box::pin(handlers.clone().serve().serve(ctx, request))
            }
        };
        // The datagram sockets poll each handler in place, in a room they
        // reuse, so their handlers are not boxed.
        let unboxed =
            |handlers: TimeServer| move |ctx, request| handlers.clone().serve().serve(ctx, request);
        let ntp = futures::future::join_all(
            self.ntp
                .into_iter()
                .map(|udp| udp.run_inline(unboxed(handlers.clone()), stopped())),
        );
        let handler: Handler = Arc::new(inline(handlers.clone()));
        let streams = futures::future::join_all(
            self.streams
                .into_iter()
                .map(|tcp| tcp.run(Protocol::Cerv(handler.clone()), stopped())),
        );
        let (ke_service, rotation) = match self.nts {
            Some((service, every)) => (Some(service), Some(every)),
            None => (None, None),
        };
        let ke = futures::future::join_all(self.ke.into_iter().filter_map(|tcp| {
            let service = ke_service.clone()?;
            Some(tcp.run(Protocol::NtsKe(service), stopped()))
        }));
        // The master key is replaced every `rotation`; the keys of the last
        // rotations still open the cookies they sealed.
        let rotate = {
            let stop = stopped();
            let service = ke_service.clone();
            async move {
                let (Some(service), Some(every)) = (service, rotation) else {
                    return;
                };
                tokio::pin!(stop);
                loop {
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(every) => {}
                    }
                    let mut keys = service.master.write().unwrap_or_else(|p| p.into_inner());
                    keys.rotate(service::nts::Key::generate());
                    tracing::info!(key_id = keys.current_id(), "rotated the NTS master key");
                }
            }
        };
        let cerv = async {
            match self.dispatch {
                Dispatch::Inline => {
                    self.udp
                        .run_inline(unboxed(handlers.clone()), stopped())
                        .await
                }
                Dispatch::Channels => {
                    let handlers = handlers.clone();
                    self.udp
                        .run(
                            move |channel| run_channel(channel, handlers.clone().serve()),
                            stopped(),
                        )
                        .await
                }
            }
        };
        let signal = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        let (stats, _, _, _, (), ()) = futures::join!(cerv, ntp, streams, ke, rotate, signal);
        stats
    }
}
