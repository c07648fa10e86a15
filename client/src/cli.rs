//! The command line of `fient`.

use clap::Parser;
use service::auth::{Key, KeyFileError, Keys};
use service::discipline::DisciplineConfig;
use service::source::{AddressError, GIVE_UP_AFTER, SourceSpec, SyncOptions, Wire};
use service::sync::{Estimator, SyncParams};
use service::time::Nanos;
use service::transport::socket::Stamping;
use std::time::Duration;

const AFTER_HELP: &str = "\
By default fient only reports (like `chronyd -Q` or `ntpdig`); --set steps
the system clock to the synchronized time, which needs root or CAP_SYS_TIME.

Each call (probe or now) has --timeout to answer; a request still unanswered
after a few round trips is sent again, up to --retries more times within that
timeout. A sync takes at most (probes + 1) x timeout; a server that has never
answered is given up after 2 probes (a refused port after 1).

Exit codes:
  0   synced (and, with --set, the clock was stepped)
  1   no usable answer (unreachable server, every probe lost, contradictory answers)
  2   usage error or an address that does not resolve
  77  permission denied setting the clock (nothing was changed)";

/// fient: measure this machine's clock against a cerv time server, and
/// optionally correct it.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "fient",
    version,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    /// `fient status`: ask a running fient daemon.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Read options from this TOML file: keys are the long options without
    /// the dashes (`max-drift = 50`), the servers under `servers`; the
    /// command line wins.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    /// Check the options (and the config file and the files it names) and
    /// exit: 0 if fient would start with them, 2 if not.
    #[arg(long)]
    pub check_config: bool,

    /// The servers (up to 16), asked at once: host[:port] or
    /// cerv://host[:port] for cerv's wire (port 8081 if left out),
    /// ntp://host[:port] for NTP (port 123), tcp://host[:port] and
    /// tls://host[:port] for cerv's wire over TCP (8081) and TLS (8443),
    /// nts://host[:port] for NTP with NTS (the key exchange's port, 4460).
    /// `pool:` in front makes each address of the name a server of its own
    /// (up to 4).
    #[arg(default_value = "127.0.0.1:8081", value_name = "SERVER")]
    pub servers: Vec<String>,

    /// With several servers: how many must agree, at least (a majority of
    /// those that answered always must).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub min_agree: usize,

    /// With several servers: how the ones that agree are combined:
    /// weighted-mean (weights 1/bound²), midpoint (of what they allow
    /// together) or best (the tightest one's).
    #[arg(long, default_value = "weighted-mean", value_name = "NAME")]
    pub combine: service::select::Combine,

    /// Probe exchanges to make (1 to 64).
    #[arg(short = 'n', long, default_value_t = 5, value_name = "N")]
    pub probes: u32,

    /// Time each call has to answer, retries included, such as 500ms.
    #[arg(long, default_value = "500ms", value_name = "DURATION")]
    pub timeout: Nanos,

    /// Extra sends of an unanswered request within its timeout (0 to 10).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub retries: u32,

    /// How the samples become one offset: mid-median (halfway between the
    /// intersection's midpoint and the median sample), intersection (the
    /// midpoint of what every exchange allows), min-rtt (the quietest
    /// sample) or mean-delay (the classic flow: now() plus the mean one-way
    /// delay).
    #[arg(long, default_value = "mid-median", value_name = "NAME")]
    pub estimator: Estimator,

    /// Least one-way transfer time the path can have; tightens the bound,
    /// which is dishonest if the path is ever faster.
    #[arg(long, default_value = "0", value_name = "DURATION")]
    pub min_transfer: Nanos,

    /// The most this machine's clock may drift from the servers', in parts
    /// per million: bounds widen by this times the age of what they rest
    /// on. 100 covers two ordinary crystals; raise it for a worse clock.
    #[arg(long, default_value_t = 100, value_name = "PPM")]
    pub max_drift: u32,

    /// Where receive timestamps come from: kernel (the arrival time, the
    /// default) or user (when the program reads the reply; for comparison).
    #[arg(long, default_value = "kernel", value_name = "SOURCE")]
    pub timestamping: Stamping,

    /// Authenticate with a pre-shared key from this file (lines of
    /// `<key id> <64 hex digits>`); the first key is used unless --key-id
    /// says otherwise.
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<std::path::PathBuf>,

    /// Which key of --key-file to use.
    #[arg(long, value_name = "ID", requires = "key_file")]
    pub key_id: Option<u32>,

    /// Trust the certificates of this PEM file (a CA) for tls:// and
    /// nts:// sources, instead of the system's trust roots.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,

    /// Print one JSON object instead of the human report.
    #[arg(long)]
    pub json: bool,

    /// Step the system clock to the synchronized time.
    #[arg(long, conflicts_with_all = ["slew", "watch"])]
    pub set: bool,

    /// Correct the system clock gradually, at most 500 ppm (stepping only
    /// above --step-threshold); with --watch, keep it disciplined.
    #[arg(long)]
    pub slew: bool,

    /// With --slew: offsets above this are stepped, not slewed (at most
    /// 500ms: the kernel slews no more than half a second).
    #[arg(
        long,
        default_value = "100ms",
        value_name = "DURATION",
        requires = "slew"
    )]
    pub step_threshold: Nanos,

    /// With --slew: offsets above this are refused unless --force (0: no
    /// limit).
    #[arg(
        long,
        default_value = "1000s",
        value_name = "DURATION",
        requires = "slew"
    )]
    pub max_correction: Nanos,

    /// With --slew: correct even beyond --max-correction.
    #[arg(long, requires = "slew")]
    pub force: bool,

    /// Keep syncing every INTERVAL (with a little random spread), one line
    /// per sync, until Ctrl-C or SIGTERM; `auto` chooses the interval
    /// between --min-interval and --max-interval (faster while
    /// converging or when the path gets noisier, slower when settled).
    #[arg(long, value_name = "INTERVAL|auto")]
    pub watch: Option<WatchArg>,

    /// With --watch auto: the shortest interval.
    #[arg(
        long,
        default_value = "16s",
        value_name = "DURATION",
        requires = "watch"
    )]
    pub min_interval: Nanos,

    /// With --watch auto: the longest interval.
    #[arg(
        long,
        default_value = "1024s",
        value_name = "DURATION",
        requires = "watch"
    )]
    pub max_interval: Nanos,

    /// With --watch: stop after N syncs (0: never).
    #[arg(long, default_value_t = 0, value_name = "N", requires = "watch")]
    pub count: u64,

    /// With --watch: keep the clock's frequency estimate in this file
    /// across restarts (read at start; with --slew the correction is set
    /// from it at once).
    #[arg(long, value_name = "FILE", requires = "watch")]
    pub drift_file: Option<std::path::PathBuf>,

    /// With --watch: answer `fient status` on this Unix socket
    /// (/run/fient/fient.sock under systemd).
    #[arg(long, value_name = "PATH", requires = "watch")]
    pub control_socket: Option<std::path::PathBuf>,

    /// With --watch: publish the interval for every process on the host to
    /// this shared-memory segment (/dev/shm/fient-clock; see docs/SHM.md).
    #[arg(long, value_name = "PATH", requires = "watch")]
    pub shm: Option<std::path::PathBuf>,

    /// With --watch: serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR", requires = "watch")]
    pub metrics_listen: Option<String>,
}

/// fient's subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Ask a running fient daemon what it knows: the tracking view (offset,
    /// bound, frequency) and its sources.
    Status(StatusArgs),
}

/// `fient status`'s options.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// The daemon's control socket.
    #[arg(long, default_value = service::control::FIENT_SOCKET, value_name = "PATH")]
    pub socket: std::path::PathBuf,

    /// Print one JSON object instead of the tables.
    #[arg(long)]
    pub json: bool,

    /// How long to wait for the answer.
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    pub timeout: Nanos,
}

/// `--watch`'s argument: an interval, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchArg {
    /// Every this long.
    Every(Nanos),
    /// Adaptive.
    Auto,
}

impl std::str::FromStr for WatchArg {
    type Err = service::time::ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("auto") {
            Ok(WatchArg::Auto)
        } else {
            s.parse().map(WatchArg::Every)
        }
    }
}

/// How often `--watch` syncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Polling {
    /// Every this long (with a little spread).
    Every(Duration),
    /// Between these, as [`service::filter::next_interval`] decides.
    Auto {
        /// The shortest interval.
        min: Duration,
        /// The longest.
        max: Duration,
    },
}

impl Polling {
    /// The interval to start with (and to come back to after a miss).
    pub fn first(&self) -> Duration {
        match *self {
            Polling::Every(d) => d,
            Polling::Auto { min, .. } => min,
        }
    }

    /// The longest interval: backing off stops at 64 of it (fixed) or at
    /// the maximum (auto).
    pub fn longest(&self) -> Duration {
        match *self {
            Polling::Every(d) => d * 64,
            Polling::Auto { max, .. } => max,
        }
    }
}

/// What to do to the clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Correction {
    /// Report only.
    None,
    /// Step to the synchronized time (`--set`).
    Step,
    /// Slew, or step above the threshold (`--slew`).
    Slew,
}

/// A validated invocation.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The servers as typed; resolved when the sync starts.
    pub servers: Vec<SourceSpec>,
    /// How several servers are selected and combined.
    pub select: service::select::SelectParams,
    /// log2 of the interval between syncs, as NTP requests announce it.
    pub poll: i8,
    /// How to sync.
    pub options: SyncOptions,
    /// Render JSON.
    pub json: bool,
    /// What to do to the clock.
    pub correction: Correction,
    /// How `--slew` decides.
    pub discipline: DisciplineConfig,
    /// Keep syncing at this interval.
    pub watch: Option<Polling>,
    /// Stop after this many syncs (0: never).
    pub count: u64,
    /// What the daemon publishes (with --watch).
    pub daemon: crate::daemon::DaemonPlan,
    /// Receive timestamps.
    pub stamping: Stamping,
    /// The key to authenticate with.
    pub key: Option<Key>,
    /// The TLS client configuration, for tls:// sources.
    pub tls: Option<std::sync::Arc<service::tls::TlsClientConfig>>,
    /// The same for the NTS key exchange of nts:// sources.
    pub nts_tls: Option<std::sync::Arc<service::tls::TlsClientConfig>>,
}

/// A bad option or key file; the message names it.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// An option outside its range.
    #[error("invalid {option} '{value}': {expected}")]
    Range {
        /// The option.
        option: &'static str,
        /// What was given.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// The key file cannot be used.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// --key-id names no key of the file.
    #[error("invalid --key-id '{0}': no such key in the key file")]
    NoSuchKey(u32),
    /// A source that does not parse.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// A CA file that cannot be used.
    #[error(transparent)]
    Tls(#[from] service::tls::TlsError),
    /// An option that does not apply to the source's wire.
    #[error("{option} works with cerv's wire only (udp, tcp, tls), not with {wire}:// sources")]
    WrongWire {
        /// The option.
        option: &'static str,
        /// The source's wire.
        wire: Wire,
    },
}

impl Args {
    /// Checks ranges and builds the plan.
    pub fn plan(&self) -> Result<Plan, UsageError> {
        let bad = |option, value: String, expected| UsageError::Range {
            option,
            value,
            expected,
        };
        if !(1..=64).contains(&self.probes) {
            return Err(bad("--probes", self.probes.to_string(), "expected 1 to 64"));
        }
        if self.retries > 10 {
            return Err(bad(
                "--retries",
                self.retries.to_string(),
                "expected 0 to 10",
            ));
        }
        if self.timeout <= Nanos::ZERO || self.timeout > Nanos::from_secs(60) {
            return Err(bad(
                "--timeout",
                self.timeout.to_string(),
                "expected more than 0 and at most 60s",
            ));
        }
        if !(1..=1000).contains(&self.max_drift) {
            return Err(bad(
                "--max-drift",
                self.max_drift.to_string(),
                "expected 1 to 1000 (ppm)",
            ));
        }
        if self.min_transfer.is_negative() {
            return Err(bad(
                "--min-transfer",
                self.min_transfer.to_string(),
                "must not be negative",
            ));
        }
        let servers = self
            .servers
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<SourceSpec>, _>>()?;
        if servers.len() > service::ensemble::MAX_SOURCES {
            return Err(bad(
                "SERVER",
                servers.len().to_string(),
                "at most 16 servers",
            ));
        }
        if !(1..=service::ensemble::MAX_SOURCES).contains(&self.min_agree) {
            return Err(bad(
                "--min-agree",
                self.min_agree.to_string(),
                "expected 1 to 16",
            ));
        }
        let tls = if servers.iter().any(|s| s.wire == Wire::Tls) {
            Some(service::tls::client_config(self.ca.as_deref(), &[], false)?)
        } else {
            None
        };
        let nts_tls = if servers.iter().any(|s| s.wire == Wire::Nts) {
            Some(service::tls::client_config(
                self.ca.as_deref(),
                &[service::nts::ke::ALPN],
                true,
            )?)
        } else {
            None
        };
        if let Some(s) = servers
            .iter()
            .find(|s| !matches!(s.wire, Wire::Cerv | Wire::Tcp | Wire::Tls))
            && self.key_file.is_some()
        {
            return Err(UsageError::WrongWire {
                option: "--key-file",
                wire: s.wire,
            });
        }
        let key = match &self.key_file {
            None => None,
            Some(path) => {
                let keys = Keys::load(path)?;
                warn_if_readable_by_others(path);
                let key = match self.key_id {
                    Some(id) => keys.get(id).ok_or(UsageError::NoSuchKey(id))?,
                    None => keys.first().ok_or(UsageError::NoSuchKey(0))?,
                };
                Some(key.clone())
            }
        };
        let in_range = |option: &'static str, w: Nanos| {
            if w < Nanos::from_millis(10) || w > Nanos::from_secs(86_400) {
                Err(bad(option, w.to_string(), "expected 10ms to 24h"))
            } else {
                Ok(w.unsigned_duration())
            }
        };
        let watch = match self.watch {
            None => None,
            Some(WatchArg::Every(w)) => Some(Polling::Every(in_range("--watch", w)?)),
            Some(WatchArg::Auto) => {
                let min = in_range("--min-interval", self.min_interval)?;
                let max = in_range("--max-interval", self.max_interval)?;
                if max < min {
                    return Err(bad(
                        "--max-interval",
                        self.max_interval.to_string(),
                        "must not be shorter than --min-interval",
                    ));
                }
                Some(Polling::Auto { min, max })
            }
        };
        if self.step_threshold.is_negative() {
            return Err(bad(
                "--step-threshold",
                self.step_threshold.to_string(),
                "must not be negative",
            ));
        }
        if self.max_correction.is_negative() {
            return Err(bad(
                "--max-correction",
                self.max_correction.to_string(),
                "must not be negative",
            ));
        }
        let correction = match (self.set, self.slew) {
            (true, _) => Correction::Step,
            (false, true) => Correction::Slew,
            (false, false) => Correction::None,
        };
        let discipline = DisciplineConfig {
            correct: self.slew,
            step_threshold: self.step_threshold,
            max_correction: (self.max_correction > Nanos::ZERO).then_some(self.max_correction),
            force: self.force,
            ..DisciplineConfig::default()
        };
        Ok(Plan {
            key,
            tls,
            nts_tls,
            correction,
            discipline,
            watch,
            count: self.count,
            servers,
            select: service::select::SelectParams {
                min_agree: self.min_agree,
                combine: self.combine,
                max_drift_ppm: self.max_drift,
            },
            poll: poll_of(watch),
            options: SyncOptions {
                probes: self.probes,
                timeout: self.timeout.unsigned_duration(),
                retries: self.retries,
                estimator: self.estimator,
                params: SyncParams {
                    min_transfer: self.min_transfer,
                    max_drift_ppm: self.max_drift,
                },
            },
            json: self.json,
            stamping: self.timestamping,
            daemon: crate::daemon::DaemonPlan {
                drift_file: self.drift_file.clone(),
                control_socket: self.control_socket.clone(),
                shm: self.shm.clone(),
                metrics_listen: match &self.metrics_listen {
                    None => None,
                    Some(a) => Some(listen_address(a, "--metrics-listen")?),
                },
            },
        })
    }
}

/// A listening address given as host:port.
fn listen_address(addr: &str, option: &'static str) -> Result<std::net::SocketAddr, UsageError> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| UsageError::Range {
            option,
            value: addr.to_string(),
            expected: "expected host:port",
        })
}

/// Warns when a key file can be read by other users.
fn warn_if_readable_by_others(path: &std::path::Path) {
    if service::auth::readable_by_others(path) {
        tracing::warn!(
            "key file '{}' is readable by other users; chmod 600 it",
            path.display()
        );
    }
}

/// log2 of the poll interval in seconds, for NTP requests: that of
/// `--watch`, or 6 (64 s, NTP's usual minimum) for a one-shot sync.
fn poll_of(watch: Option<Polling>) -> i8 {
    match watch.map(|w| w.first()) {
        None => 6,
        Some(w) => (63 - w.as_secs().max(1).leading_zeros()) as i8,
    }
}

/// The longest a no-answer takes to be reported for these options.
pub fn give_up_within(options: &SyncOptions) -> Duration {
    options.timeout * GIVE_UP_AFTER
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Plan, String> {
        let mut argv = vec!["fient"];
        argv.extend_from_slice(args);
        let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        args.plan().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let plan = parse(&[]).unwrap();
        assert_eq!(plan.servers.len(), 1);
        assert_eq!(plan.servers[0].to_string(), "127.0.0.1:8081");
        assert_eq!(plan.select.min_agree, 1);
        assert_eq!(plan.poll, 6);
        assert_eq!(plan.options.probes, 5);
        assert_eq!(plan.options.timeout, Duration::from_millis(500));
        assert_eq!(plan.options.estimator, Estimator::MidMedian);
        assert!(!plan.json && plan.correction == Correction::None && plan.watch.is_none());
        assert_eq!(give_up_within(&plan.options), Duration::from_secs(1));
    }

    #[test]
    fn options_parse() {
        let plan = parse(&[
            "[::1]:9",
            "-n",
            "9",
            "--timeout",
            "1.5s",
            "--retries",
            "0",
            "--estimator",
            "min-rtt",
            "--json",
            "--set",
        ])
        .unwrap();
        assert_eq!(plan.servers[0].to_string(), "[::1]:9");
        assert_eq!(plan.options.probes, 9);
        assert_eq!(plan.options.timeout, Duration::from_millis(1500));
        assert_eq!(plan.options.retries, 0);
        assert_eq!(plan.options.estimator, Estimator::MinRtt);
        assert!(plan.json && plan.correction == Correction::Step);
    }

    #[test]
    fn out_of_range_options_are_named() {
        for (args, needle) in [
            (&["--probes", "0"][..], "invalid --probes '0'"),
            (&["--probes", "65"][..], "invalid --probes '65'"),
            (&["--retries", "11"][..], "invalid --retries '11'"),
            (&["--timeout", "0"][..], "invalid --timeout '0ns'"),
            (&["--timeout", "2m"][..], "invalid --timeout"),
            (&["--timeout", "soon"][..], "invalid duration 'soon'"),
            (&["--estimator", "best"][..], "unknown estimator 'best'"),
            (&["--probes", "-1"][..], "unexpected argument '-1'"),
            (&["--watch", "1ms"][..], "invalid --watch '1.000ms'"),
            (&["--set", "--slew"][..], "cannot be used with"),
            (&["--set", "--watch", "1s"][..], "cannot be used with"),
            (&["--count", "3"][..], "--watch"),
            (
                &[
                    "--watch",
                    "auto",
                    "--min-interval",
                    "10s",
                    "--max-interval",
                    "5s",
                ][..],
                "must not be shorter",
            ),
            (
                &["--watch", "sometimes"][..],
                "invalid duration 'sometimes'",
            ),
            (&["--force"][..], "--slew"),
            (&["ftp://x"][..], "unknown scheme 'ftp://'"),
            (&["--min-agree", "0"][..], "invalid --min-agree '0'"),
            (&["--combine", "vote"][..], "unknown combining rule 'vote'"),
            (
                &["ntp://127.0.0.1", "--key-file", "/dev/null"][..],
                "--key-file works with cerv's wire only",
            ),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
