//! `cerv`: serve the time over tarpc on UDP.

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use server::{BindError, Config, Server};
use service::time::Nanos;
use service::transport::face::NtpFace;
use service::transport::limit::RateLimit;
use service::transport::server::ServerConfig;
use service::transport::socket::Stamping;
use service::transport::tcp::TcpConfig;
use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;
use tracing::info;

const EXIT_CODES: &str = "\
Exit codes:
  0   stopped cleanly (Ctrl-C or SIGTERM)
  1   could not serve (address in use or not available)
  2   usage error (bad option or address)
  77  permission denied (a port below 1024 without the privilege)

Logs go to stderr; RUST_LOG sets the level (default info; \
RUST_LOG=service=debug logs one line per request).";

/// The cerv time server: answers probe() and now() over tarpc on UDP.
#[derive(Parser, Debug)]
#[command(
    name = "cerv",
    version,
    after_help = EXIT_CODES,
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// `cerv status`: ask a running cerv.
    #[command(subcommand)]
    command: Option<Command>,

    /// Read options from this TOML file: keys are the long options without
    /// the dashes (`ntp-listen = ["0.0.0.0:123"]`); the command line wins.
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,

    /// Check the options (and the config file, certificates and key files
    /// they name) and exit: 0 if cerv would start with them, 2 if not.
    #[arg(long)]
    check_config: bool,

    /// Address to listen on, host:port.
    #[arg(long, default_value = "127.0.0.1:8081", value_name = "ADDR")]
    listen: String,

    /// Simulated clock skew added to every answer, such as +250ms or -1.5s
    /// (for demos and tests).
    #[arg(
        long,
        default_value = "0",
        value_name = "DURATION",
        allow_hyphen_values = true
    )]
    offset: Nanos,

    /// Simulated work in every tarpc call (cerv's wire, TCP, TLS; not NTP), between receipt and reply, such as 20ms.
    #[arg(long, default_value = "0", value_name = "DURATION")]
    processing_delay: Nanos,

    /// With --dispatch channels: most clients tracked at once.
    #[arg(long, default_value_t = ServerConfig::default().max_peers, value_name = "N")]
    max_peers: usize,

    /// With --dispatch channels: forget a client after this long without a
    /// request.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    idle_timeout: Nanos,

    /// Where receive timestamps (ts2) come from: kernel (the arrival time,
    /// the default) or user (when the server reads the request; for
    /// comparison).
    #[arg(long, default_value = "kernel", value_name = "SOURCE")]
    timestamping: Stamping,

    /// How requests reach the handlers: inline (each answered as it is
    /// read, no per-client state) or channels (one tarpc channel per
    /// client, the original design; for comparison).
    #[arg(long, default_value = "inline", value_name = "MODE")]
    dispatch: server::Dispatch,

    /// Worker threads (1: one thread, the fastest on a small machine; 0:
    /// one per core).
    #[arg(long, default_value_t = 1, value_name = "N")]
    threads: usize,

    /// Accept only requests authenticated with a key from this file (lines
    /// of `<key id> <64 hex digits>`), and authenticate the replies.
    #[arg(long, value_name = "PATH")]
    key_file: Option<std::path::PathBuf>,

    /// Datagrams per second one client address may send (an IPv6 client:
    /// its /64); more are dropped. 0 turns limiting off.
    #[arg(long, default_value_t = RateLimit::default().rate, value_name = "N")]
    rate_limit: u32,

    /// Datagrams one client address may send at once after a quiet spell.
    #[arg(long, default_value_t = RateLimit::default().burst, value_name = "N")]
    rate_burst: u32,

    /// Log the counters this often when they change (0: only at shutdown).
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    stats_interval: Nanos,

    /// Print a new random key line for a key file, with this id, and exit.
    #[arg(long, value_name = "ID")]
    generate_key: Option<u32>,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Also answer NTP (v3 and v4 client requests) on this address,
    /// host:port; repeat for several. 0.0.0.0:123 in production.
    #[arg(long = "ntp-listen", value_name = "ADDR")]
    ntp_listen: Vec<String>,

    /// Serve the clock over NTP as this stratum (1 to 15) even while the
    /// kernel says it is not synchronised (like chrony's `local stratum`);
    /// while the kernel says it is, claim this stratum instead of 2.
    /// Without it an unsynchronised clock is served as such (leap 3,
    /// stratum 16), and clients will not use it.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=15))]
    ntp_stratum: Option<u8>,

    /// Also serve cerv's wire over TCP on this address (repeatable): the
    /// Cristian-over-TCP flavour, for networks that drop UDP.
    #[arg(long = "tcp-listen", value_name = "ADDR")]
    tcp_listen: Vec<String>,

    /// Also serve cerv's wire over TLS on this address (repeatable); needs
    /// --tls-cert and --tls-key.
    #[arg(long = "tls-listen", value_name = "ADDR", requires_all = ["tls_cert", "tls_key"])]
    tls_listen: Vec<String>,

    /// The server's certificate chain, PEM (for --tls-listen).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<std::path::PathBuf>,

    /// The certificate's private key, PEM (for --tls-listen).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<std::path::PathBuf>,

    /// TCP and TLS: most connections open at once; more are closed at once.
    #[arg(long, default_value_t = TcpConfig::default().max_connections, value_name = "N")]
    tcp_max_connections: usize,

    /// TCP and TLS: most connections open at once from one address.
    #[arg(long, default_value_t = TcpConfig::default().max_per_address, value_name = "N")]
    tcp_max_per_address: usize,

    /// TCP and TLS: close a connection that sends no complete request for
    /// this long.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    tcp_idle_timeout: Nanos,

    /// TLS: close a connection whose handshake takes longer than this.
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    tls_handshake_timeout: Nanos,

    /// Run NTS key establishment on this address (repeatable; 0.0.0.0:4460
    /// in production), with the certificate of --tls-cert and --tls-key:
    /// clients get keys and cookies there, and the --ntp-listen sockets
    /// then answer NTS-protected requests.
    #[arg(long = "nts-ke-listen", value_name = "ADDR", requires_all = ["tls_cert", "tls_key", "ntp_listen"])]
    nts_ke_listen: Vec<String>,

    /// How often the NTS master key is replaced (cookies sealed under the
    /// last three still open).
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    nts_key_rotation: Nanos,

    /// The NTP server name the key exchange tells clients to use (by
    /// default none: they use the key exchange's host).
    #[arg(long, value_name = "HOST")]
    nts_ntp_server: Option<String>,

    /// Serve Prometheus metrics at http://ADDR/metrics (127.0.0.1:9123,
    /// say).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,

    /// Answer `cerv status` on this Unix socket (/run/cerv/cerv.sock under
    /// systemd).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<std::path::PathBuf>,

    /// The NTP port the key exchange tells clients to use (by default the
    /// first --ntp-listen port): another when a port mapping stands
    /// between them and cerv.
    #[arg(long, value_name = "PORT")]
    nts_ntp_port: Option<u16>,
}

/// cerv's subcommands.
#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Ask a running cerv how it fares: uptime, what it has served and
    /// dropped, socket by socket.
    Status {
        /// Its control socket.
        #[arg(long, default_value = service::control::CERV_SOCKET, value_name = "PATH")]
        socket: std::path::PathBuf,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// A failure and the exit code it maps to: the one place codes are decided.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    fn usage(error: anyhow::Error) -> Self {
        Failure { code: 2, error }
    }
}

impl From<BindError> for Failure {
    fn from(e: BindError) -> Self {
        let code = match e {
            BindError::PermissionDenied { .. } => 77,
            _ => 1,
        };
        Failure {
            code,
            error: e.into(),
        }
    }
}

fn main() -> ExitCode {
    let (args, file) = match service::config::parse::<Args>(std::env::args_os().collect()) {
        Ok(layered) => (layered.args, layered.file.unwrap_or_default()),
        Err(service::config::LayerError::Clap(e)) => e.exit(),
        Err(service::config::LayerError::Config(e)) => {
            eprintln!("cerv: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Status { socket, json }) = &args.command {
        return ask_status(socket, *json);
    }
    if let Some(id) = args.generate_key {
        if id == 0 {
            eprintln!("cerv: invalid --generate-key '0': key ids run from 1 to 4294967295");
            return ExitCode::from(2);
        }
        println!("{}", service::auth::Key::generate(id).to_line());
        return ExitCode::SUCCESS;
    }
    let fail = |Failure { code, error }: Failure| {
        eprintln!("cerv: {}", file.locate(&format!("{error:#}")));
        ExitCode::from(code)
    };
    if args.check_config {
        return match config_from(&args) {
            Ok(_) => {
                match &args.config {
                    Some(path) => println!("cerv: {}: the configuration is valid", path.display()),
                    None => println!("cerv: the configuration is valid"),
                }
                ExitCode::SUCCESS
            }
            Err(failure) => fail(failure),
        };
    }
    init_logging(args.log_format);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => fail(failure),
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // rustls warns of every bad handshake: a hostile client could fill
    // the log. They are counted (handshake failed) instead.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tarpc=warn,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// What SIGHUP reads again: the TLS certificate and key, the key file.
#[derive(Default)]
struct Reloadable {
    cert: Option<std::sync::Arc<service::tls::CertStore>>,
    keys: Option<std::sync::Arc<service::auth::KeyRing>>,
}

impl Reloadable {
    /// Reads every file again; what fails keeps what was in use. Returns
    /// the errors, one line each.
    fn reload(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(cert) = &self.cert {
            match cert.reload() {
                Ok(()) => info!("reloaded the certificate '{}'", cert.cert_path().display()),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if let Some(keys) = &self.keys {
            match keys.reload() {
                Ok(()) => info!(
                    keys = keys.current().len(),
                    "reloaded the key file '{}'",
                    keys.path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
                Err(e) => errors.push(e.to_string()),
            }
        }
        errors
    }
}

fn config_from(args: &Args) -> Result<(Config, Reloadable), Failure> {
    let listen = resolve(&args.listen, "--listen").map_err(Failure::usage)?;
    let resolve_all = |addrs: &[String], flag: &str| {
        addrs
            .iter()
            .map(|a| resolve(a, flag))
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(Failure::usage)
    };
    let ntp_listen = resolve_all(&args.ntp_listen, "--ntp-listen")?;
    let tcp_listen = resolve_all(&args.tcp_listen, "--tcp-listen")?;
    let tls_listen = resolve_all(&args.tls_listen, "--tls-listen")?;
    // One certificate store for TLS and NTS-KE alike: a reload swaps it
    // for both.
    let cert = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(service::tls::CertStore::load(cert, key).map_err(|e| Failure::usage(e.into()))?)
        }
        (None, None) => None,
        _ => {
            return Err(Failure::usage(anyhow::anyhow!(
                "--tls-cert and --tls-key go together"
            )));
        }
    };
    let tls = match &cert {
        Some(store) => Some(
            service::tls::server_config_from(store.clone(), &[], false)
                .map_err(|e| Failure::usage(e.into()))?,
        ),
        None => None,
    };
    let nts_ke_listen = resolve_all(&args.nts_ke_listen, "--nts-ke-listen")?;
    let nts_tls = match (&cert, nts_ke_listen.is_empty()) {
        (Some(store), false) => Some(
            service::tls::server_config_from(store.clone(), &[service::nts::ke::ALPN], true)
                .map_err(|e| Failure::usage(e.into()))?,
        ),
        _ => None,
    };
    let nts_key_rotation = non_negative_duration(args.nts_key_rotation, "--nts-key-rotation")?;
    if nts_key_rotation < Duration::from_secs(1) {
        return Err(Failure::usage(anyhow::anyhow!(
            "invalid --nts-key-rotation '{}': at least 1s",
            args.nts_key_rotation
        )));
    }
    let tcp_idle_timeout = non_negative_duration(args.tcp_idle_timeout, "--tcp-idle-timeout")?;
    let tls_handshake_timeout =
        non_negative_duration(args.tls_handshake_timeout, "--tls-handshake-timeout")?;
    if args.tcp_max_connections == 0 || args.tcp_max_per_address == 0 {
        return Err(Failure::usage(anyhow::anyhow!(
            "invalid --tcp-max-connections or --tcp-max-per-address '0': must be at least 1"
        )));
    }
    let non_negative = |d: Nanos, what: &str| {
        if d.is_negative() {
            Err(Failure::usage(anyhow::anyhow!(
                "invalid {what} '{d}': must not be negative"
            )))
        } else {
            Ok(d.unsigned_duration())
        }
    };
    let processing_delay = non_negative(args.processing_delay, "--processing-delay")?;
    let idle_timeout = non_negative(args.idle_timeout, "--idle-timeout")?;
    let stats_interval = non_negative(args.stats_interval, "--stats-interval")?;
    if args.rate_limit > 0 && args.rate_burst == 0 {
        return Err(Failure::usage(anyhow::anyhow!(
            "invalid --rate-burst '0': must be at least 1 when --rate-limit is on"
        )));
    }
    let keys = match &args.key_file {
        None => None,
        Some(path) => {
            let keys = service::auth::KeyRing::load(path).map_err(|e| Failure::usage(e.into()))?;
            if service::auth::readable_by_others(path) {
                tracing::warn!(
                    "key file '{}' is readable by other users; chmod 600 it",
                    path.display()
                );
            }
            Some(std::sync::Arc::new(keys))
        }
    };
    let tcp_keys = keys.clone();
    let reload_keys = keys.clone();
    if args.max_peers == 0 {
        return Err(Failure::usage(anyhow::anyhow!(
            "invalid --max-peers '0': must be at least 1"
        )));
    }
    if let Some(m) = &args.metrics_listen {
        resolve(m, "--metrics-listen").map_err(Failure::usage)?;
    }
    let config = Config {
        listen,
        offset: args.offset,
        processing_delay,
        transport: ServerConfig {
            max_peers: args.max_peers,
            idle_timeout: idle_timeout.max(Duration::from_millis(500)),
            stamping: args.timestamping,
            keys,
            rate_limit: RateLimit {
                rate: args.rate_limit,
                burst: args.rate_burst,
            },
            stats_interval,
            ..ServerConfig::default()
        },
        dispatch: args.dispatch,
        ntp_listen,
        ntp: NtpFace {
            local_stratum: args.ntp_stratum,
            ..NtpFace::default()
        },
        tcp_listen,
        tls_listen,
        tls,
        clock: None,
        nts_ke_listen,
        nts_tls,
        nts_key_rotation,
        nts_ntp_server: args.nts_ntp_server.clone(),
        nts_ntp_port: args.nts_ntp_port,
        tcp: TcpConfig {
            max_connections: args.tcp_max_connections,
            max_per_address: args.tcp_max_per_address,
            idle_timeout: tcp_idle_timeout.max(Duration::from_millis(10)),
            handshake_timeout: tls_handshake_timeout.max(Duration::from_millis(10)),
            rate_limit: RateLimit {
                rate: args.rate_limit,
                burst: args.rate_burst,
            },
            stamping: args.timestamping,
            keys: tcp_keys,
            tls: None,
            shutdown_grace: Duration::from_secs(2),
            stats_interval,
        },
    };
    Ok((
        config,
        Reloadable {
            cert,
            keys: reload_keys,
        },
    ))
}

fn non_negative_duration(d: Nanos, what: &str) -> Result<Duration, Failure> {
    if d.is_negative() {
        Err(Failure::usage(anyhow::anyhow!(
            "invalid {what} '{d}': must not be negative"
        )))
    } else {
        Ok(d.unsigned_duration())
    }
}

fn resolve(addr: &str, flag: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("invalid {flag} address '{addr}'"))?
        .next()
        .with_context(|| format!("invalid {flag} address '{addr}': resolves to nothing"))
}

fn run(args: Args) -> Result<(), Failure> {
    let (config, reloadable) = config_from(&args)?;
    let mut builder = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if args.threads > 1 {
            b.worker_threads(args.threads);
        }
        b
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(|error| Failure { code: 1, error })?;
    runtime.block_on(async {
        let shutdown = shutdown_signal();
        let mut hangups = service::signals::hangups();
        let server = Server::bind(config.clone()).await?;
        let addr = server.local_addr().map_err(|e| Failure {
            code: 1,
            error: e.into(),
        })?;
        // The NTP lines come first: a test that waits for "listening on"
        // then knows every address.
        for ntp in server.ntp_addrs().map_err(|e| Failure {
            code: 1,
            error: e.into(),
        })? {
            info!(
                stratum = config
                    .ntp
                    .local_stratum
                    .map_or("kernel".to_string(), |s| s.to_string()),
                "answering NTP on {ntp}"
            );
        }
        for (addr, tls) in server.stream_addrs().map_err(|e| Failure {
            code: 1,
            error: e.into(),
        })? {
            let wire = if tls { "tls" } else { "tcp" };
            info!("serving {wire} on {addr}");
        }
        for addr in server.nts_ke_addrs().map_err(|e| Failure {
            code: 1,
            error: e.into(),
        })? {
            info!("serving nts-ke on {addr}");
        }
        let monitor = server.monitor().map_err(|e| Failure {
            code: 1,
            error: e.into(),
        })?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let control = match &args.control_socket {
            None => None,
            Some(path) => {
                let socket = service::control::ControlSocket::bind(path)
                    .await
                    .map_err(|e| Failure::usage(e.into()))?;
                info!("answering cerv status on {}", path.display());
                let monitor = monitor.clone();
                let mut stopped = stopped.clone();
                Some(tokio::spawn(socket.serve(
                    move || service::control::DaemonStatus::Cerv(monitor.status()),
                    async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    },
                )))
            }
        };
        let metrics = match &args.metrics_listen {
            None => None,
            Some(m) => {
                let at = resolve(m, "--metrics-listen").map_err(Failure::usage)?;
                let listener = tokio::net::TcpListener::bind(at)
                    .await
                    .map_err(|source| Failure::from(BindError::from_io(at, source)))?;
                let at = listener.local_addr().unwrap_or(at);
                info!("serving metrics on http://{at}/metrics");
                let monitor = monitor.clone();
                let mut stopped = stopped.clone();
                Some(tokio::spawn(service::metrics::serve(
                    listener,
                    std::sync::Arc::new(move || service::metrics::render_cerv(&monitor.metrics())),
                    async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    },
                )))
            }
        };
        // SIGHUP: read the certificate (and key files) again; clients
        // stay connected, handshakes from now on use the new files.
        let reload = {
            let monitor = monitor.clone();
            async move {
                let Some(hangups) = hangups.as_mut() else {
                    return std::future::pending().await;
                };
                while hangups.recv().await.is_some() {
                    let _ = service::systemd::reloading();
                    let errors = reloadable.reload();
                    monitor.reloaded(errors.is_empty());
                    if errors.is_empty() {
                        info!("SIGHUP: reloaded");
                    }
                    for e in errors {
                        tracing::error!("SIGHUP: {e}; still using what was loaded before");
                    }
                    let _ = service::systemd::ready();
                }
                std::future::pending().await
            }
        };
        info!(
            offset = %config.offset,
            processing_delay = ?config.processing_delay,
            "listening on {addr}"
        );
        let _ = service::systemd::ready();
        let _ = service::systemd::status(&format!("serving on {addr}"));
        tokio::select! {
            _ = server.run(async {
                shutdown.await;
                let _ = service::systemd::stopping();
            }) => {}
            // Neither ends by itself.
            () = reload => {}
            () = service::systemd::feed_watchdog() => {}
        }
        let _ = stop.send(true);
        for task in [control, metrics].into_iter().flatten() {
            let _ = task.await;
        }
        Ok(())
    })
}

/// `cerv status`: 0 when cerv answered, 1 when it cannot be asked.
fn ask_status(socket: &std::path::Path, json: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cerv: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let answer = runtime.block_on(service::control::query(
        socket,
        "cerv",
        Duration::from_secs(2),
    ));
    let status = match answer {
        Ok(service::control::DaemonStatus::Cerv(s)) => s,
        Ok(service::control::DaemonStatus::Fient(_)) => {
            eprintln!(
                "cerv: '{}' is fient's control socket; ask it with `fient status`",
                socket.display()
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("cerv: {e}");
            return ExitCode::from(1);
        }
    };
    let mut stdout = std::io::stdout();
    let written = if json {
        use std::io::Write;
        serde_json::to_writer_pretty(&mut stdout, &status)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(stdout))
    } else {
        server::status::write_human(&mut stdout, &status)
    };
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("cerv: cannot write the status: {e}");
            ExitCode::from(1)
        }
        _ => ExitCode::SUCCESS,
    }
}

/// Completes on Ctrl-C or SIGTERM, logging which; the handlers are in
/// place before the server says it is listening.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let signal = service::signals::on_signal();
    async move {
        let what = signal.await;
        info!("{what}; shutting down");
    }
}
