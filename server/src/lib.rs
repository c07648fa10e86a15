//! cerv, the time server, as a library: the binary is a thin shell around
//! [`Server`].
//!
//! - [`TimeServer`]: the handlers of [`service::TimeService`].
//! - [`Config`] and [`Server`]: bind a socket, serve until told to stop.

use service::clock::{Clock, SkewedClock, SystemClock};
use service::rpc::{ProbeReply, TimeService};
use service::time::{Nanos, Timestamp};
use service::transport::server::{
    HandlerFuture, ServerConfig, ServerStats, UdpServer, run_channel,
};
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
    clock: Arc<dyn Clock>,
    processing_delay: Duration,
}

impl TimeServer {
    /// Handlers reading `clock`, pausing `processing_delay` in each call
    /// (simulated work, for demos and tests; zero in production).
    pub fn new(clock: Arc<dyn Clock>, processing_delay: Duration) -> Self {
        TimeServer {
            clock,
            processing_delay,
        }
    }

    async fn work(&self) {
        if !self.processing_delay.is_zero() {
            tokio::time::sleep(self.processing_delay).await;
        }
    }
}

impl TimeService for TimeServer {
    /// ts2 and ts3 are read here as a fallback; the UDP transport replaces
    /// them with readings taken next to the socket.
    async fn probe(self, _: Context, ts1: Timestamp) -> ProbeReply {
        let ts2 = self.clock.now();
        self.work().await;
        let ts3 = self.clock.now();
        ProbeReply {
            ts1,
            ts2,
            ts3,
            ts4: None,
        }
    }

    async fn now(self, _: Context) -> Timestamp {
        self.work().await;
        self.clock.now()
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

/// A server running in a task of its own (see [`Server::spawn`]). Dropping
/// it stops it too, without waiting.
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    stats: Arc<ServerStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Arc<ServerStats>>,
}

impl Running {
    /// Live counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
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

/// A bound, not yet running server.
pub struct Server {
    udp: UdpServer,
    handlers: TimeServer,
    dispatch: Dispatch,
}

impl Server {
    /// Binds the socket. Must run inside a Tokio runtime.
    pub async fn bind(config: Config) -> Result<Server, BindError> {
        let addr = config.listen;
        let socket =
            tokio::net::UdpSocket::bind(addr)
                .await
                .map_err(|source| match source.kind() {
                    io::ErrorKind::AddrInUse => BindError::InUse { addr },
                    io::ErrorKind::PermissionDenied => BindError::PermissionDenied { addr },
                    io::ErrorKind::AddrNotAvailable => BindError::NotAvailable { addr },
                    _ => BindError::Other { addr, source },
                })?;
        let clock: Arc<dyn Clock> = if config.offset == Nanos::ZERO {
            Arc::new(SystemClock)
        } else {
            Arc::new(SkewedClock::new(SystemClock, config.offset))
        };
        Ok(Server {
            udp: UdpServer::new(socket, clock.clone(), config.transport),
            handlers: TimeServer::new(clock, config.processing_delay),
            dispatch: config.dispatch,
        })
    }

    /// The address actually bound (useful after binding port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<ServerStats> {
        self.udp.stats()
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
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Ok(Running {
            addr,
            stats,
            stop: Some(stop),
            task,
        })
    }

    /// Serves until `shutdown` completes; returns the final counters.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Arc<ServerStats> {
        let handlers = self.handlers;
        match self.dispatch {
            Dispatch::Inline => {
                self.udp
                    .run_inline(
                        move |ctx, request| -> HandlerFuture {
                            Box::pin(handlers.clone().serve().serve(ctx, request))
                        },
                        shutdown,
                    )
                    .await
            }
            Dispatch::Channels => {
                self.udp
                    .run(
                        move |channel| run_channel(channel, handlers.clone().serve()),
                        shutdown,
                    )
                    .await
            }
        }
    }
}
