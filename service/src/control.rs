//! The control socket: a running daemon (fient with `--watch`, or cerv)
//! answers `fient status` and `cerv status` over a Unix socket, the way
//! `chronyc tracking` asks chronyd.
//!
//! It is a tarpc service of its own, [`Control`], framed as length-prefixed
//! JSON: any tarpc client can ask it, and `socat` plus a few bytes can too.
//! It only reports: nothing on it changes the daemon, so the socket is
//! left readable by every local user (mode 0666), like chronyd's
//! read-only commands.
//!
//! What the answer holds is plain data ([`ClientStatus`], [`ServerStatus`])
//! that the daemons fill in; the Prometheus metrics are rendered from the
//! same snapshots, so the two views never disagree.

use crate::time::Nanos;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tarpc::server::Channel as _;
use tarpc::tokio_serde::formats::Json;

/// Where the fient daemon listens unless told otherwise (the systemd unit's
/// `RuntimeDirectory=fient`).
pub const FIENT_SOCKET: &str = "/run/fient/fient.sock";
/// Where cerv listens unless told otherwise.
pub const CERV_SOCKET: &str = "/run/cerv/cerv.sock";

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;
/// A connection is closed after this long, whatever it does.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);

/// The control service.
#[tarpc::service]
pub trait Control {
    /// What the daemon knows now.
    async fn status() -> DaemonStatus;
}

/// The answer: which daemon, and what it knows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "daemon", rename_all = "snake_case")]
pub enum DaemonStatus {
    /// A fient daemon.
    Fient(Box<ClientStatus>),
    /// A cerv server.
    Cerv(ServerStatus),
}

/// The fient daemon's view (`fient status`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClientStatus {
    /// The program's version.
    pub version: String,
    /// Process id.
    pub pid: u32,
    /// How long it has run, ns.
    pub uptime_ns: u64,
    /// Whether it corrects the clock (`--slew`) or only reports.
    pub correcting: bool,
    /// The combined estimate of the last round that formed one.
    pub tracking: Option<Tracking>,
    /// Each source, in the configured order.
    pub sources: Vec<SourceRow>,
    /// Rounds by outcome: `synced`, `no_answer`, `no_majority`.
    pub syncs: BTreeMap<String, u64>,
    /// The interval until the next round, ns.
    pub next_poll_ns: u64,
    /// The shared-memory segment it publishes to, if any.
    pub shm: Option<PathBuf>,
    /// The drift file, if any.
    pub drift_file: Option<PathBuf>,
}

/// The tracking view: chrony's `tracking`, for fient.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Tracking {
    /// The sources combined (those that agree with the majority).
    pub reference: Vec<String>,
    /// The local clock reading the estimate refers to (RFC 3339).
    pub reference_time: String,
    /// How long ago that was, ns, when the answer was made.
    pub age_ns: u64,
    /// The true time minus this clock, ns (the filter's, when it has one).
    pub offset_ns: i64,
    /// The farthest the truth can be from `offset_ns`, ns, at the reference
    /// time; it widens by `max_drift_ppm` of the age since.
    pub bound_ns: i64,
    /// The bound carried forward to now: `bound_ns` plus the drift allowed
    /// over `age_ns`.
    pub bound_now_ns: i64,
    /// The most this clock may drift, ppm, as configured.
    pub max_drift_ppm: u32,
    /// This clock's frequency error, ppm (positive: fast), once measured.
    pub frequency_ppm: Option<f64>,
    /// Its uncertainty, ppm.
    pub frequency_uncertainty_ppm: Option<f64>,
    /// Where the frequency figure came from: `filter`, `discipline` or
    /// `drift_file`.
    pub frequency_from: Option<String>,
    /// The frequency correction fient has set, ppm (with `--slew`).
    pub frequency_correction_ppm: Option<f64>,
    /// The leap indicator the sources agree on: `normal`, `insert`,
    /// `delete`, or `unknown` when no NTP source says.
    pub leap: String,
    /// One more than the least stratum among the agreeing NTP sources
    /// (cerv's wire does not say).
    pub stratum: Option<u8>,
    /// Sources that agreed, of those that answered.
    pub agreeing: usize,
    /// Sources that answered.
    pub answered: usize,
}

/// One source, as `fient status` lists it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SourceRow {
    /// Its name (as configured, and the address when a name resolved).
    pub name: String,
    /// The wire: cerv, ntp, tcp, tls or nts.
    pub wire: String,
    /// Its status in the last round (`selected`, `agrees`, `falseticker`,
    /// `no_answer`, ...).
    pub status: String,
    /// Which of the last 8 rounds it answered in, newest in the lowest bit
    /// (NTP's reach register; 0o377 when all).
    pub reach: u8,
    /// Its offset (the filter's), ns, from its last answer.
    pub offset_ns: Option<i64>,
    /// The bound on it, ns.
    pub bound_ns: Option<i64>,
    /// The least round trip of its last answer, ns.
    pub rtt_ns: Option<i64>,
    /// Its stratum (NTP sources).
    pub stratum: Option<u8>,
    /// How long ago it last answered, ns.
    pub last_answer_age_ns: Option<u64>,
    /// Samples in its filter's window.
    pub samples: Option<usize>,
    /// Why the last round failed for it, if it did.
    pub error: Option<String>,
}

/// cerv's view (`cerv status`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ServerStatus {
    /// The program's version.
    pub version: String,
    /// Process id.
    pub pid: u32,
    /// How long it has served, ns.
    pub uptime_ns: u64,
    /// What cerv says of its clock over NTP: the stratum it serves (16:
    /// unsynchronised), and whether the kernel says the clock is synced.
    pub stratum: u8,
    /// Whether the kernel says the clock is synchronised.
    pub kernel_synchronized: bool,
    /// Each listening socket.
    pub faces: Vec<FaceStatus>,
    /// When the configuration (keys, certificates) was last loaded, RFC 3339.
    pub loaded_at: String,
    /// Reloads (SIGHUP) done, and failed.
    pub reloads: u64,
    /// Reloads that failed (the old configuration stayed).
    pub reload_failures: u64,
}

impl ServerStatus {
    /// Requests answered, over every face.
    pub fn served(&self) -> u64 {
        self.faces.iter().map(|f| f.replied).sum()
    }

    /// Requests dropped, over every face.
    pub fn dropped(&self) -> u64 {
        self.faces.iter().flat_map(|f| f.drops.values()).sum()
    }
}

/// One of cerv's sockets.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FaceStatus {
    /// `cerv` (UDP), `ntp`, `tcp`, `tls` or `nts-ke`.
    pub wire: String,
    /// The address it listens on.
    pub address: String,
    /// Requests (datagrams, or requests on connections) received.
    pub received: u64,
    /// Replies sent.
    pub replied: u64,
    /// Connections accepted (stream faces).
    pub connections: Option<u64>,
    /// Drops by reason (zeros left out).
    pub drops: BTreeMap<String, u64>,
    /// Other events by name (Kiss-o'-Death sent, NTS NAKs, ...; zeros
    /// left out).
    pub events: BTreeMap<String, u64>,
}

/// A status request that failed, in words.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens there.
    #[error("no {daemon} daemon at '{path}' (is it running, with --control-socket {path}?)")]
    NotRunning {
        /// Which daemon was looked for.
        daemon: &'static str,
        /// The socket.
        path: String,
    },
    /// Not allowed to connect.
    #[error("cannot connect to '{path}': permission denied")]
    Permission {
        /// The socket.
        path: String,
    },
    /// Connecting failed otherwise.
    #[error("cannot connect to '{path}': {source}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The daemon did not answer in time, or answered with something else.
    #[error("'{path}' did not answer: {message}")]
    NoAnswer {
        /// The socket.
        path: String,
        /// Why.
        message: String,
    },
}

/// Asks the daemon at `path` for its status, within `timeout`; `daemon`
/// names it in errors.
pub async fn query(
    path: &Path,
    daemon: &'static str,
    timeout: Duration,
) -> Result<DaemonStatus, ControlError> {
    let shown = path.display().to_string();
    let connect = tarpc::serde_transport::unix::connect(path, Json::default);
    let transport = match tokio::time::timeout(timeout, connect).await {
        Err(_) => {
            return Err(ControlError::NoAnswer {
                path: shown,
                message: "timed out connecting".into(),
            });
        }
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return Err(match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    ControlError::NotRunning {
                        daemon,
                        path: shown,
                    }
                }
                io::ErrorKind::PermissionDenied => ControlError::Permission { path: shown },
                _ => ControlError::Connect {
                    path: shown,
                    source: e,
                },
            });
        }
    };
    let client = ControlClient::new(tarpc::client::Config::default(), transport).spawn();
    let mut ctx = tarpc::context::current();
    ctx.deadline = std::time::Instant::now() + timeout;
    client
        .status(ctx)
        .await
        .map_err(|e| ControlError::NoAnswer {
            path: shown,
            message: e.to_string(),
        })
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on control socket '{path}': {reason}")]
pub struct ListenError {
    /// The socket.
    pub path: String,
    /// Why.
    pub reason: String,
}

/// A bound control socket, ready to [`serve`](ControlSocket::serve).
pub struct ControlSocket {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path`. A socket file left by a daemon that is gone is
    /// replaced; one a running daemon answers on is not (the error says
    /// so), nor is any other kind of file.
    pub async fn bind(path: &Path) -> Result<ControlSocket, ListenError> {
        let fail = |reason: String| ListenError {
            path: path.display().to_string(),
            reason,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(fail("a file that is not a socket is in the way".into()));
            }
            match tokio::net::UnixStream::connect(path).await {
                Ok(_) => return Err(fail("another daemon is answering on it".into())),
                Err(_) => std::fs::remove_file(path).map_err(|e| fail(e.to_string()))?,
            }
        }
        let listener = tokio::net::UnixListener::bind(path).map_err(|e| {
            fail(match e.kind() {
                io::ErrorKind::NotFound => "its directory does not exist".into(),
                io::ErrorKind::PermissionDenied => "permission denied".into(),
                _ => e.to_string(),
            })
        })?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Read-only service: any local user may ask.
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666));
        }
        Ok(ControlSocket {
            listener,
            path: path.to_owned(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers every request with `status()` until `shutdown` completes,
    /// then removes the socket file. At most 16 connections at once, each
    /// for at most 10 s.
    pub async fn serve<F>(self, status: F, shutdown: impl Future<Output = ()>)
    where
        F: Fn() -> DaemonStatus + Clone + Send + Sync + 'static,
    {
        let ControlSocket { listener, path } = self;
        let incoming = match tarpc::serde_transport::unix::listen_on(listener, Json::default).await
        {
            Ok(incoming) => incoming,
            Err(e) => {
                tracing::warn!("control socket '{}': {e}", path.display());
                return;
            }
        };
        let server = StatusServer(Arc::new(status));
        let serving = incoming
            .filter_map(|conn| async move {
                conn.map_err(|e| tracing::debug!("control socket accept: {e}"))
                    .ok()
            })
            .map(tarpc::server::BaseChannel::with_defaults)
            .map(move |channel| {
                let server = server.clone();
                async move {
                    let served = channel
                        .execute(server.serve())
                        .for_each(|response| async move {
                            tokio::spawn(response);
                        });
                    let _ = tokio::time::timeout(CONNECTION_LIFETIME, served).await;
                }
            })
            .buffer_unordered(MAX_CONNECTIONS)
            .for_each(|()| async {});
        tokio::select! {
            () = serving => {}
            () = shutdown => {}
        }
        let _ = std::fs::remove_file(&path);
    }
}

struct StatusServer<F>(Arc<F>);

impl<F> Clone for StatusServer<F> {
    fn clone(&self) -> Self {
        StatusServer(self.0.clone())
    }
}

impl<F> Control for StatusServer<F>
where
    F: Fn() -> DaemonStatus + Send + Sync + 'static,
{
    async fn status(self, _: tarpc::context::Context) -> DaemonStatus {
        (self.0)()
    }
}

/// `12.3s`, `4m05s`, `3h02m`, `2d04h`: an age or uptime in a few
/// characters, for the human views.
pub fn short_duration(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        0..60 => format!("{:.1}s", ns as f64 / 1e9),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `bound` carried `age` forward at `max_drift_ppm`.
pub fn bound_after(bound: Nanos, age: Duration, max_drift_ppm: u32) -> Nanos {
    let widen = age.as_nanos().saturating_mul(u128::from(max_drift_ppm)) / 1_000_000;
    bound.saturating_add(Nanos::from_nanos(widen.min(i64::MAX as u128) as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DaemonStatus {
        DaemonStatus::Fient(Box::new(ClientStatus {
            version: "0.1.0".into(),
            pid: 7,
            uptime_ns: 3_000_000_000,
            tracking: Some(Tracking {
                reference: vec!["127.0.0.1:123".into()],
                offset_ns: -1200,
                bound_ns: 5000,
                leap: "normal".into(),
                ..Tracking::default()
            }),
            sources: vec![SourceRow {
                name: "127.0.0.1:123".into(),
                wire: "ntp".into(),
                status: "selected".into(),
                reach: 0o377,
                ..SourceRow::default()
            }],
            ..ClientStatus::default()
        }))
    }

    #[tokio::test]
    async fn a_status_goes_over_the_socket_and_the_file_goes_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let socket = ControlSocket::bind(&path).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(socket.serve(sample, async {
            let _ = stopped.await;
        }));
        let got = query(&path, "fient", Duration::from_secs(5)).await.unwrap();
        assert_eq!(got, sample());
        // A second daemon on the same path is refused while this one runs.
        let again = ControlSocket::bind(&path).await.err().unwrap();
        assert!(again.to_string().contains("another daemon"), "{again}");
        stop.send(()).unwrap();
        server.await.unwrap();
        assert!(!path.exists());
        let e = query(&path, "fient", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("no fient daemon at"), "{e}");
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a socket file left behind");
        ControlSocket::bind(&path).await.unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        let e = ControlSocket::bind(&file).await.err().unwrap();
        assert!(e.to_string().contains("not a socket"), "{e}");
        let e = ControlSocket::bind(&dir.path().join("nope/c.sock"))
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("directory does not exist"), "{e}");
    }

    #[test]
    fn durations_read_short() {
        assert_eq!(short_duration(1_500_000_000), "1.5s");
        assert_eq!(short_duration(245_000_000_000), "4m05s");
        assert_eq!(
            short_duration(3 * 3600 * 1_000_000_000 + 120_000_000_000),
            "3h02m"
        );
        assert_eq!(short_duration(52 * 3600 * 1_000_000_000), "2d04h");
        let b = bound_after(Nanos::from_micros(10), Duration::from_secs(10), 100);
        assert_eq!(b, Nanos::from_micros(1010));
    }
}
