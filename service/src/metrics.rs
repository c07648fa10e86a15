//! Prometheus metrics: snapshots of plain numbers, their rendering in the
//! text exposition format (version 0.0.4), and a tiny HTTP endpoint that
//! serves them.
//!
//! ```text
//!  ServerStats, TcpStats ──▶ CervMetrics  ──render_cerv──┐
//!  Round, filters, syncs ──▶ FientMetrics ──render_fient─┤
//!                                                       ▼
//!  GET /metrics ──▶ serve(listener, render, shutdown) ──▶ 200 text/plain; version=0.0.4
//! ```
//!
//! A scrape takes a snapshot: the binaries read their counters and state
//! when asked, build a [`CervMetrics`] or [`FientMetrics`], and render it.
//! Nothing here holds state between scrapes.
//!
//! **Why the text format is written here, not with `prometheus-client`.**
//! That crate (the official Rust client) is built around metrics that
//! live in a registry and are bumped in place; a snapshot would mean
//! building a registry, its families and their atomics on every scrape,
//! only to print them. And it writes OpenMetrics 1.0, not the Prometheus
//! text format: a counter's `# TYPE` line names `x` while its sample is
//! `x_total`, and the output ends in `# EOF`. Served as `text/plain;
//! version=0.0.4`, Prometheus's parser then reads `x_total` as another,
//! untyped family without help (promtool says so), and serving it as
//! `application/openmetrics-text` instead would make every scraper speak
//! OpenMetrics. The 0.0.4 format is small (HELP and TYPE lines, samples,
//! three escapes), and the `Family` type below is all of it that we need;
//! `promtool check metrics` checks the output in the tests.
//!
//! **Why the endpoint is on plain tokio, not hyper.** One path, one
//! method, no keep-alive, no body to read: the request line is all that
//! matters. hyper (with hyper-util for a server loop) would bring an HTTP
//! stack and its dependencies to the service crate for that; its limits
//! (header size, read timeout, connections) would have to be set up just
//! as carefully. The whole exchange here is: read at most
//! [`ServeConfig::max_request`] bytes until the blank line that ends the
//! head, within [`ServeConfig::read_timeout`]; answer; close.

use crate::time::Nanos;
use crate::transport::server::ServerStats;
use crate::transport::tcp::TcpStats;
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// The media type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

// ---------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------

/// What cerv has done, as numbers: one scrape's worth.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CervMetrics {
    /// How long the server has been running.
    pub uptime: Duration,
    /// Each socket it answers on.
    pub listeners: Vec<ListenerMetrics>,
}

/// One listening socket of cerv and its counters (all since start).
///
/// Every counter is rendered for every listener, zeros included (a
/// counter that appears only once it is non-zero breaks `rate()`), except
/// the `Option`s, which are rendered only when `Some`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListenerMetrics {
    /// The protocol: `cerv`, `ntp`, `tcp`, `tls` or `nts-ke`.
    pub wire: &'static str,
    /// The address it listens on (`127.0.0.1:123`), the `listener` label.
    pub addr: String,
    /// Requests received: datagrams read, or requests read on connections.
    pub received: u64,
    /// Replies sent.
    pub replied: u64,
    /// What was thrown away, by reason: datagrams on a datagram listener,
    /// connections closed or refused on a stream listener. Zeros included.
    /// Rendered with `_` for spaces (`auth failed` becomes `auth_failed`).
    pub drops: Vec<(&'static str, u64)>,
    /// Requests over their source's rate limit: dropped (datagrams, also
    /// among `drops`) or answered "busy" (connections).
    pub rate_limited: u64,
    /// Kiss-o'-Death RATE replies sent (NTP).
    pub kiss_sent: u64,
    /// Rate-limited NTP requests that got no kiss either.
    pub kiss_suppressed: u64,
    /// NTS requests opened and answered.
    pub nts_requests: u64,
    /// NTS requests answered with a NAK.
    pub nts_naks: u64,
    /// Malformed NTS requests, dropped (also among `drops`).
    pub nts_failed: u64,
    /// Connections accepted (stream listeners only).
    pub connections: Option<u64>,
    /// TLS handshakes that failed (TLS and NTS-KE listeners only).
    pub handshake_failed: Option<u64>,
    /// TLS handshakes that took too long (TLS and NTS-KE listeners only).
    pub handshake_timeout: Option<u64>,
    /// How many datagrams each receive batch held, if the listener counts
    /// them.
    pub batch_sizes: Option<BatchSizes>,
}

impl ListenerMetrics {
    /// A datagram listener (`cerv` or `ntp`) from its server's counters.
    pub fn datagram(wire: &'static str, addr: impl Into<String>, stats: &ServerStats) -> Self {
        ListenerMetrics {
            wire,
            addr: addr.into(),
            received: stats.received.get(),
            replied: stats.replied.get(),
            drops: stats.drops().to_vec(),
            rate_limited: stats.rate_limited.get(),
            kiss_sent: stats.kiss_sent.get(),
            kiss_suppressed: stats.kiss_suppressed.get(),
            nts_requests: stats.nts_requests.get(),
            nts_naks: stats.nts_naks.get(),
            nts_failed: stats.nts_failed.get(),
            batch_sizes: Some(stats.batches.snapshot()),
            ..ListenerMetrics::default()
        }
    }

    /// A stream listener (`tcp`, `tls` or `nts-ke`) from its counters.
    /// Its drops are the connections closed or refused, by reason; the
    /// handshake failures are counted apart, for every wire but `tcp`
    /// (which has no handshake); rate-limited requests were answered
    /// "busy", so they are no drop.
    pub fn stream(wire: &'static str, addr: impl Into<String>, stats: &TcpStats) -> Self {
        let tls = wire != "tcp";
        ListenerMetrics {
            wire,
            addr: addr.into(),
            received: stats.requests.get(),
            replied: stats.replied.get(),
            drops: vec![
                ("over limit", stats.over_limit.get()),
                ("over address limit", stats.over_address_limit.get()),
                ("idle", stats.idle_closed.get()),
                ("oversized", stats.oversized.get()),
                ("malformed", stats.malformed.get()),
                ("auth failed", stats.auth_failed.get()),
                ("io failed", stats.io_failed.get()),
                ("accept failed", stats.accept_failed.get()),
            ],
            rate_limited: stats.rate_limited.get(),
            connections: Some(stats.accepted.get()),
            handshake_failed: tls.then(|| stats.handshake_failed.get()),
            handshake_timeout: tls.then(|| stats.handshake_timeout.get()),
            ..ListenerMetrics::default()
        }
    }
}

/// The upper bounds of the batch-size histogram's buckets. A server reads
/// and sends at most 64 datagrams per system call.
pub const BATCH_BUCKETS: [u64; 7] = [1, 2, 4, 8, 16, 32, 64];

/// How many datagrams the receive batches held: a histogram over
/// [`BATCH_BUCKETS`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchSizes {
    /// Batches per bucket, not cumulative: `counts[i]` holds those larger
    /// than `BATCH_BUCKETS[i - 1]` and at most `BATCH_BUCKETS[i]`; the
    /// last, those larger than 64 (none, today).
    pub counts: [u64; BATCH_BUCKETS.len() + 1],
    /// The datagrams in all batches.
    pub sum: u64,
}

/// What fient knows, as numbers: one scrape's worth.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FientMetrics {
    /// Each source, in the configuration's order.
    pub sources: Vec<SourceMetrics>,
    /// The combined answer of the last round, when a majority agreed.
    pub combined: Option<CombinedMetrics>,
    /// Syncs (rounds) so far, by outcome (`synced`, `no_majority`, ...).
    pub syncs: Vec<(String, u64)>,
    /// How long ago the last successful sync was.
    pub last_sync_age: Option<Duration>,
    /// The local clock's frequency error as estimated, parts per million
    /// (positive: it runs fast).
    pub frequency_ppm: Option<f64>,
}

/// One source as of its last poll.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceMetrics {
    /// How the configuration names it (`ntp://time.example`), the
    /// `source` label.
    pub name: String,
    /// Its wire: `cerv`, `ntp`, `tcp`, `tls` or `nts`.
    pub wire: String,
    /// How it fared ([`crate::ensemble::Status::name`]: `selected`,
    /// `falseticker`, `no_answer`, ...).
    pub status: String,
    /// Its offset, server minus local, seconds.
    pub offset_seconds: Option<f64>,
    /// The farthest the truth can be from that offset, seconds.
    pub bound_seconds: Option<f64>,
    /// The smallest round trip of its last sync, seconds.
    pub rtt_seconds: Option<f64>,
    /// The last 8 polls, newest in the lowest bit, 1 if answered (NTP's
    /// reach register; see [`reach`]).
    pub reachability: u8,
    /// The server's stratum (NTP wires).
    pub stratum: Option<u8>,
}

/// The combined answer of a round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CombinedMetrics {
    /// The combined offset, server time minus local, seconds.
    pub offset_seconds: f64,
    /// The farthest the truth can be from it, seconds.
    pub bound_seconds: f64,
    /// Sources that agree.
    pub agreeing: usize,
    /// Sources that answered.
    pub answered: usize,
}

/// A reach register after one more poll: shifted left, the new poll's
/// outcome in the lowest bit.
pub fn reach(previous: u8, answered: bool) -> u8 {
    (previous << 1) | u8::from(answered)
}

/// Nanoseconds as seconds, for display and metrics only.
pub fn seconds(n: Nanos) -> f64 {
    n.as_nanos() as f64 / 1e9
}

/// A duration as seconds, printed in the fewest digits
/// (`Duration::as_secs_f64` gives 15.780402390999999 where this gives
/// 15.780402391).
fn duration_seconds(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e9
}

// ---------------------------------------------------------------------
// The text format
// ---------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

struct Sample {
    /// `_bucket`, `_sum`, `_count` for a histogram; empty otherwise.
    suffix: &'static str,
    labels: Vec<(&'static str, String)>,
    value: Value,
}

/// One metric family: its HELP and TYPE lines and all its samples, which
/// the format wants together. A family without samples is not written.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<Sample>,
}

impl Family {
    fn new(name: &'static str, kind: Kind, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    fn push(&mut self, labels: Vec<(&'static str, String)>, value: Value) {
        self.samples.push(Sample {
            suffix: "",
            labels,
            value,
        });
    }

    /// The samples of a histogram over `bounds`, from per-bucket (not
    /// cumulative) `counts` whose last entry is above the last bound.
    fn push_histogram(
        &mut self,
        labels: Vec<(&'static str, String)>,
        bounds: &[u64],
        counts: &[u64],
        sum: u64,
    ) {
        let mut cumulative = 0u64;
        for (i, &count) in counts.iter().enumerate() {
            cumulative = cumulative.saturating_add(count);
            let le = bounds.get(i).map_or("+Inf".to_string(), u64::to_string);
            let mut with_le = labels.clone();
            with_le.push(("le", le));
            self.samples.push(Sample {
                suffix: "_bucket",
                labels: with_le,
                value: Value::Int(cumulative),
            });
        }
        self.samples.push(Sample {
            suffix: "_sum",
            labels: labels.clone(),
            value: Value::Int(sum),
        });
        self.samples.push(Sample {
            suffix: "_count",
            labels,
            value: Value::Int(cumulative),
        });
    }

    fn write(&self, out: &mut String) {
        if self.samples.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {} {}", self.name, escape_help(self.help));
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind.name());
        for s in &self.samples {
            out.push_str(self.name);
            out.push_str(s.suffix);
            if !s.labels.is_empty() {
                out.push('{');
                for (i, (name, value)) in s.labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(name);
                    out.push_str("=\"");
                    escape_label_value(value, out);
                    out.push('"');
                }
                out.push('}');
            }
            out.push(' ');
            write_value(s.value, out);
            out.push('\n');
        }
    }
}

/// A label value as the format wants it: `\`, `"` and newline escaped.
/// Everything else (any UTF-8) goes as it is.
fn escape_label_value(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A HELP text: `\` and newline escaped (quotes are not, there).
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Integers as they are; floats so that Go's `ParseFloat` reads them back
/// (Rust's `{:?}` switches to exponents for very large or small values,
/// which it accepts), with the format's spellings of the special values.
fn write_value(value: Value, out: &mut String) {
    match value {
        Value::Int(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Float(f) if f.is_nan() => out.push_str("NaN"),
        Value::Float(f) if f == f64::INFINITY => out.push_str("+Inf"),
        Value::Float(f) if f == f64::NEG_INFINITY => out.push_str("-Inf"),
        Value::Float(f) => {
            let _ = write!(out, "{f:?}");
        }
    }
}

/// Label values that are identifiers (reasons, outcomes): snake_case.
fn identifier(s: &str) -> String {
    s.replace(' ', "_")
}

/// cerv's metrics in the text format.
///
/// | name | type | labels |
/// |---|---|---|
/// | `cerv_uptime_seconds` | gauge | |
/// | `cerv_requests_total` | counter | wire, listener |
/// | `cerv_replies_total` | counter | wire, listener |
/// | `cerv_dropped_total` | counter | wire, listener, reason |
/// | `cerv_rate_limited_total` | counter | wire, listener |
/// | `cerv_kiss_sent_total` | counter | wire, listener |
/// | `cerv_kiss_suppressed_total` | counter | wire, listener |
/// | `cerv_nts_requests_total` | counter | wire, listener |
/// | `cerv_nts_naks_total` | counter | wire, listener |
/// | `cerv_nts_failed_total` | counter | wire, listener |
/// | `cerv_connections_total` | counter | wire, listener (stream listeners) |
/// | `cerv_tls_handshake_failures_total` | counter | wire, listener, reason (`error`, `timeout`) |
/// | `cerv_receive_batch_size` | histogram | wire, listener (when counted) |
pub fn render_cerv(m: &CervMetrics) -> String {
    let mut out = String::with_capacity(2048 + 1024 * m.listeners.len());
    let labels =
        |l: &ListenerMetrics| vec![("wire", l.wire.to_string()), ("listener", l.addr.clone())];
    let counter = |out: &mut String,
                   name: &'static str,
                   help: &'static str,
                   get: fn(&ListenerMetrics) -> Option<u64>| {
        let mut f = Family::new(name, Kind::Counter, help);
        for l in &m.listeners {
            if let Some(n) = get(l) {
                f.push(labels(l), Value::Int(n));
            }
        }
        f.write(out);
    };

    let mut uptime = Family::new(
        "cerv_uptime_seconds",
        Kind::Gauge,
        "How long the server has been running.",
    );
    uptime.push(vec![], Value::Float(duration_seconds(m.uptime)));
    uptime.write(&mut out);

    counter(
        &mut out,
        "cerv_requests_total",
        "Requests received: datagrams read, or requests read on connections.",
        |l| Some(l.received),
    );
    counter(&mut out, "cerv_replies_total", "Replies sent.", |l| {
        Some(l.replied)
    });

    let mut dropped = Family::new(
        "cerv_dropped_total",
        Kind::Counter,
        "Datagrams dropped, or connections closed or refused, by reason.",
    );
    for l in &m.listeners {
        for &(reason, n) in &l.drops {
            let mut ls = labels(l);
            ls.push(("reason", identifier(reason)));
            dropped.push(ls, Value::Int(n));
        }
    }
    dropped.write(&mut out);

    counter(
        &mut out,
        "cerv_rate_limited_total",
        "Requests over their source's rate limit (dropped, or answered busy on connections).",
        |l| Some(l.rate_limited),
    );
    counter(
        &mut out,
        "cerv_kiss_sent_total",
        "Kiss-o'-Death RATE replies sent to rate-limited NTP clients.",
        |l| Some(l.kiss_sent),
    );
    counter(
        &mut out,
        "cerv_kiss_suppressed_total",
        "Rate-limited NTP requests that got no Kiss-o'-Death either.",
        |l| Some(l.kiss_suppressed),
    );
    counter(
        &mut out,
        "cerv_nts_requests_total",
        "NTS requests opened and answered.",
        |l| Some(l.nts_requests),
    );
    counter(
        &mut out,
        "cerv_nts_naks_total",
        "NTS requests answered with a NAK (a cookie that did not open, an authenticator that failed).",
        |l| Some(l.nts_naks),
    );
    counter(
        &mut out,
        "cerv_nts_failed_total",
        "Malformed NTS requests, dropped.",
        |l| Some(l.nts_failed),
    );
    counter(
        &mut out,
        "cerv_connections_total",
        "Connections accepted.",
        |l| l.connections,
    );

    let mut handshakes = Family::new(
        "cerv_tls_handshake_failures_total",
        Kind::Counter,
        "TLS handshakes that failed (error) or took too long (timeout).",
    );
    for l in &m.listeners {
        for (reason, n) in [
            ("error", l.handshake_failed),
            ("timeout", l.handshake_timeout),
        ] {
            if let Some(n) = n {
                let mut ls = labels(l);
                ls.push(("reason", reason.to_string()));
                handshakes.push(ls, Value::Int(n));
            }
        }
    }
    handshakes.write(&mut out);

    let mut batches = Family::new(
        "cerv_receive_batch_size",
        Kind::Histogram,
        "Datagrams read per receive batch (one system call).",
    );
    for l in &m.listeners {
        if let Some(b) = &l.batch_sizes {
            batches.push_histogram(labels(l), &BATCH_BUCKETS, &b.counts, b.sum);
        }
    }
    batches.write(&mut out);
    out
}

/// fient's metrics in the text format.
///
/// | name | type | labels |
/// |---|---|---|
/// | `fient_source_offset_seconds` | gauge | source, wire |
/// | `fient_source_error_bound_seconds` | gauge | source, wire |
/// | `fient_source_rtt_seconds` | gauge | source, wire |
/// | `fient_source_status` | gauge, 1 | source, wire, status |
/// | `fient_source_reachability` | gauge, 0–255 | source, wire |
/// | `fient_source_stratum` | gauge | source, wire |
/// | `fient_offset_seconds` | gauge | |
/// | `fient_error_bound_seconds` | gauge | |
/// | `fient_sources_agreeing` | gauge | |
/// | `fient_sources_answered` | gauge | |
/// | `fient_frequency_ppm` | gauge | |
/// | `fient_syncs_total` | counter | outcome |
/// | `fient_last_sync_age_seconds` | gauge | |
///
/// What is not known (a source that did not answer has no offset; no
/// majority, no combined offset) is left out rather than written as NaN.
pub fn render_fient(m: &FientMetrics) -> String {
    let mut out = String::with_capacity(2048 + 768 * m.sources.len());
    let labels = |s: &SourceMetrics| vec![("source", s.name.clone()), ("wire", s.wire.to_string())];
    let per_source = |out: &mut String,
                      name: &'static str,
                      help: &'static str,
                      get: fn(&SourceMetrics) -> Option<Value>| {
        let mut f = Family::new(name, Kind::Gauge, help);
        for s in &m.sources {
            if let Some(v) = get(s) {
                f.push(labels(s), v);
            }
        }
        f.write(out);
    };
    let single = |out: &mut String, name: &'static str, help: &'static str, v: Option<Value>| {
        let mut f = Family::new(name, Kind::Gauge, help);
        if let Some(v) = v {
            f.push(vec![], v);
        }
        f.write(out);
    };

    per_source(
        &mut out,
        "fient_source_offset_seconds",
        "The source's offset, server time minus local, at its last sync.",
        |s| s.offset_seconds.map(Value::Float),
    );
    per_source(
        &mut out,
        "fient_source_error_bound_seconds",
        "The farthest the truth can be from the source's offset.",
        |s| s.bound_seconds.map(Value::Float),
    );
    per_source(
        &mut out,
        "fient_source_rtt_seconds",
        "The smallest round trip of the source's last sync.",
        |s| s.rtt_seconds.map(Value::Float),
    );

    let mut status = Family::new(
        "fient_source_status",
        Kind::Gauge,
        "How the source fared at its last poll: 1 for its status.",
    );
    for s in &m.sources {
        let mut ls = labels(s);
        ls.push(("status", s.status.to_string()));
        status.push(ls, Value::Int(1));
    }
    status.write(&mut out);

    per_source(
        &mut out,
        "fient_source_reachability",
        "The last 8 polls of the source, newest in the lowest bit, 1 if answered.",
        |s| Some(Value::Int(s.reachability.into())),
    );
    per_source(
        &mut out,
        "fient_source_stratum",
        "The server's stratum, as it says.",
        |s| s.stratum.map(|n| Value::Int(n.into())),
    );

    let c = m.combined.as_ref();
    single(
        &mut out,
        "fient_offset_seconds",
        "The combined offset, server time minus local, when a majority agreed.",
        c.map(|c| Value::Float(c.offset_seconds)),
    );
    single(
        &mut out,
        "fient_error_bound_seconds",
        "The farthest the truth can be from the combined offset.",
        c.map(|c| Value::Float(c.bound_seconds)),
    );
    single(
        &mut out,
        "fient_sources_agreeing",
        "Sources that agree with the combined answer.",
        c.map(|c| Value::Int(c.agreeing as u64)),
    );
    single(
        &mut out,
        "fient_sources_answered",
        "Sources that answered in the last round.",
        c.map(|c| Value::Int(c.answered as u64)),
    );
    single(
        &mut out,
        "fient_frequency_ppm",
        "The local clock's frequency error as estimated, parts per million (positive: it runs fast).",
        m.frequency_ppm.map(Value::Float),
    );

    let mut syncs = Family::new("fient_syncs_total", Kind::Counter, "Syncs, by outcome.");
    for (outcome, n) in &m.syncs {
        syncs.push(vec![("outcome", identifier(outcome))], Value::Int(*n));
    }
    syncs.write(&mut out);

    single(
        &mut out,
        "fient_last_sync_age_seconds",
        "How long ago the last successful sync was.",
        m.last_sync_age.map(|d| Value::Float(duration_seconds(d))),
    );
    out
}

// ---------------------------------------------------------------------
// The endpoint
// ---------------------------------------------------------------------

/// What renders the page, called once per `GET /metrics`.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The endpoint's limits.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The most bytes of request (request line and headers) read; a
    /// longer head is answered 431.
    pub max_request: usize,
    /// How long a client has to send its request head; then it is cut off
    /// without an answer.
    pub read_timeout: Duration,
    /// How long writing the response may take.
    pub write_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_request: 8 * 1024,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            max_connections: 64,
        }
    }
}

/// After the response, what the client still sends is read and thrown
/// away for at most this long and this many bytes before the socket is
/// closed: closing with unread bytes makes the kernel send a reset, which
/// can destroy the response before the client has read it (the oversized
/// request's 431, say).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// How long to wait after a failed accept (out of file descriptors, say)
/// before the next, instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `GET /metrics` on `listener` with the default limits until
/// `shutdown` completes. See [`serve_with`].
pub async fn serve(listener: TcpListener, render: Render, shutdown: impl Future<Output = ()>) {
    serve_with(listener, render, shutdown, ServeConfig::default()).await;
}

/// Serves `GET /metrics` (and `HEAD`) on `listener` until `shutdown`
/// completes, then stops accepting and ends the connections still open.
///
/// Each connection gets one response and is closed: `200` with
/// `render()`'s text, `404` for another path, `405` for another method,
/// `400` for what is not an HTTP/1 request, `505` for another version,
/// `431` for a head longer than `max_request`. A client that has not sent
/// its head within `read_timeout` is closed without an answer.
pub async fn serve_with(
    listener: TcpListener,
    render: Render,
    shutdown: impl Future<Output = ()>,
    config: ServeConfig,
) {
    let limit = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let config = Arc::new(config);
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // A permit first, then the connection: at the limit, new clients
        // wait in the kernel's backlog rather than being accepted and
        // dropped.
        let next = async {
            let permit = limit.clone().acquire_owned().await;
            (permit, listener.accept().await)
        };
        tokio::select! {
            () = &mut shutdown => break,
            // Reap finished connections, so the set holds only open ones.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            (permit, accepted) = next => {
                let Ok(permit) = permit else { break };
                match accepted {
                    Ok((stream, peer)) => {
                        let render = render.clone();
                        let config = config.clone();
                        tasks.spawn(async move {
                            connection(stream, &render, &config).await;
                            debug!(%peer, "metrics: connection closed");
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "metrics: cannot accept a connection");
                        tokio::select! {
                            () = &mut shutdown => break,
                            () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        }
                    }
                }
            }
        }
    }
    tasks.shutdown().await;
}

/// The head of a request as read.
#[derive(Debug, PartialEq)]
enum Head {
    /// Up to the blank line that ends it (not included).
    Complete(Vec<u8>),
    /// The client stopped sending before the blank line.
    Incomplete(Vec<u8>),
    /// `max` bytes and still no blank line.
    TooLarge,
}

/// Reads until the blank line that ends the head, at most `max` bytes.
async fn read_head(stream: &mut (impl AsyncReadExt + Unpin), max: usize) -> io::Result<Head> {
    let mut buf = vec![0u8; max];
    let mut len = 0;
    // Each pass reads at least one byte or returns: at most `max` passes.
    loop {
        if len == buf.len() {
            return Ok(Head::TooLarge);
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            buf.truncate(len);
            return Ok(Head::Incomplete(buf));
        }
        // The end may straddle the previous read: look 3 bytes back.
        let from = len.saturating_sub(3);
        len += n;
        if let Some(end) = head_end(&buf[from..len]) {
            buf.truncate(from + end);
            return Ok(Head::Complete(buf));
        }
    }
}

/// Where the blank line that ends a head starts: CRLF CRLF, or LF LF
/// (RFC 9112 lets a recipient take a bare LF as a line end).
fn head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = bytes.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// One connection: read the head, answer, close.
async fn connection(mut stream: TcpStream, render: &Render, config: &ServeConfig) {
    let head = tokio::time::timeout(
        config.read_timeout,
        read_head(&mut stream, config.max_request),
    )
    .await;
    let response = match head {
        Err(_) => {
            debug!("metrics: no request in time, closing");
            return;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "metrics: reading the request failed");
            return;
        }
        Ok(Ok(Head::Incomplete(bytes))) if bytes.is_empty() => return,
        // A head cut short by the client's half-close can still be judged
        // (and is, usually, garbage).
        Ok(Ok(Head::Complete(bytes) | Head::Incomplete(bytes))) => respond(&bytes, render),
        Ok(Ok(Head::TooLarge)) => error_response(431, "Request Header Fields Too Large", None),
    };
    let write = async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(config.write_timeout, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            debug!(error = %e, "metrics: writing the response failed");
            return;
        }
        Err(_) => {
            debug!("metrics: response not taken in time, closing");
            return;
        }
    }
    let _ = tokio::time::timeout(LINGER, drain(&mut stream)).await;
}

/// Reads and discards until end of stream, at most [`LINGER_BYTES`].
async fn drain(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut left = LINGER_BYTES;
    while left > 0 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        left = left.saturating_sub(n);
    }
    Ok(())
}

/// The response to a request head.
fn respond(head: &[u8], render: &Render) -> Vec<u8> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return error_response(400, "Bad Request", None);
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return error_response(400, "Bad Request", None);
    };
    if method.is_empty() || !method.bytes().all(is_token) || !target.starts_with('/') {
        return error_response(400, "Bad Request", None);
    }
    match version {
        "HTTP/1.0" | "HTTP/1.1" => {}
        v if v.starts_with("HTTP/") => {
            return error_response(505, "HTTP Version Not Supported", None);
        }
        _ => return error_response(400, "Bad Request", None),
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return error_response(404, "Not Found", None);
    }
    match method {
        "GET" => response(200, "OK", CONTENT_TYPE, &render(), true, None),
        "HEAD" => response(200, "OK", CONTENT_TYPE, &render(), false, None),
        _ => error_response(405, "Method Not Allowed", Some("Allow: GET, HEAD")),
    }
}

/// A character of an HTTP token (RFC 9110), such as a method.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn error_response(code: u16, reason: &str, header: Option<&str>) -> Vec<u8> {
    let body = format!("{code} {reason}\n");
    response(
        code,
        reason,
        "text/plain; charset=utf-8",
        &body,
        true,
        header,
    )
}

fn response(
    code: u16,
    reason: &str,
    content_type: &str,
    body: &str,
    with_body: bool,
    header: Option<&str>,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(h) = header {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    if with_body {
        out.push_str(body);
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::time::Instant;
    use tokio::sync::oneshot;

    fn cerv_sample() -> CervMetrics {
        let counter = crate::transport::BatchCounter::default();
        for size in [1, 1, 3, 32, 40, 65] {
            counter.observe(size);
        }
        let batches = counter.snapshot();
        CervMetrics {
            uptime: Duration::from_millis(12_500),
            listeners: vec![
                ListenerMetrics {
                    wire: "ntp",
                    addr: "127.0.0.1:123".into(),
                    received: 10,
                    replied: 7,
                    drops: vec![("malformed", 2), ("auth failed", 1)],
                    rate_limited: 1,
                    kiss_sent: 1,
                    batch_sizes: Some(batches),
                    ..ListenerMetrics::default()
                },
                ListenerMetrics {
                    wire: "tls",
                    addr: "[::1]:8443".into(),
                    received: 4,
                    replied: 4,
                    connections: Some(3),
                    handshake_failed: Some(2),
                    handshake_timeout: Some(0),
                    ..ListenerMetrics::default()
                },
            ],
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn cerv_counters_carry_their_listener() {
        let text = render_cerv(&cerv_sample());
        let l = lines(&text);
        for want in [
            "cerv_uptime_seconds 12.5",
            r#"cerv_requests_total{wire="ntp",listener="127.0.0.1:123"} 10"#,
            r#"cerv_replies_total{wire="tls",listener="[::1]:8443"} 4"#,
            r#"cerv_dropped_total{wire="ntp",listener="127.0.0.1:123",reason="auth_failed"} 1"#,
            r#"cerv_kiss_sent_total{wire="ntp",listener="127.0.0.1:123"} 1"#,
            r#"cerv_nts_naks_total{wire="tls",listener="[::1]:8443"} 0"#,
            r#"cerv_connections_total{wire="tls",listener="[::1]:8443"} 3"#,
            r#"cerv_tls_handshake_failures_total{wire="tls",listener="[::1]:8443",reason="error"} 2"#,
            r#"cerv_tls_handshake_failures_total{wire="tls",listener="[::1]:8443",reason="timeout"} 0"#,
            "# TYPE cerv_requests_total counter",
            "# TYPE cerv_uptime_seconds gauge",
        ] {
            assert!(l.contains(&want), "missing {want:?} in\n{text}");
        }
        // The datagram listener has no connections.
        assert!(
            !text.contains(r#"cerv_connections_total{wire="ntp""#),
            "{text}"
        );
    }

    #[test]
    fn durations_print_in_the_fewest_digits() {
        let m = CervMetrics {
            uptime: Duration::from_nanos(15_780_402_391),
            listeners: vec![],
        };
        let text = render_cerv(&m);
        assert!(
            text.contains("cerv_uptime_seconds 15.780402391\n"),
            "{text}"
        );
    }

    #[test]
    fn batch_sizes_render_as_a_cumulative_histogram() {
        let text = render_cerv(&cerv_sample());
        let labels = r#"wire="ntp",listener="127.0.0.1:123""#;
        for (le, n) in [
            ("1", 2),
            ("2", 2),
            ("4", 3),
            ("8", 3),
            ("16", 3),
            ("32", 4),
            ("64", 5),
            ("+Inf", 6),
        ] {
            let want = format!(r#"cerv_receive_batch_size_bucket{{{labels},le="{le}"}} {n}"#);
            assert!(text.lines().any(|l| l == want), "missing {want} in\n{text}");
        }
        assert!(text.contains(&format!("cerv_receive_batch_size_sum{{{labels}}} 142\n")));
        assert!(text.contains(&format!("cerv_receive_batch_size_count{{{labels}}} 6\n")));
        assert!(text.contains("# TYPE cerv_receive_batch_size histogram\n"));
    }

    #[test]
    fn every_family_has_one_help_and_one_type_before_its_samples() {
        let text = render_cerv(&cerv_sample());
        let mut seen: Vec<&str> = Vec::new();
        let mut current = "";
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(!seen.contains(&name), "{name} twice");
                seen.push(name);
                current = name;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert_eq!(rest.split(' ').next(), Some(current));
            } else {
                assert!(line.starts_with(current), "{line} outside {current}");
            }
        }
        assert!(seen.len() >= 12, "{seen:?}");
    }

    #[test]
    fn label_values_are_escaped() {
        let m = FientMetrics {
            sources: vec![SourceMetrics {
                name: "odd \"name\" \\ with\nnewline".into(),
                wire: "ntp".into(),
                status: "selected".into(),
                reachability: 0b1011,
                ..SourceMetrics::default()
            }],
            ..FientMetrics::default()
        };
        let text = render_fient(&m);
        let want = r#"fient_source_status{source="odd \"name\" \\ with\nnewline",wire="ntp",status="selected"} 1"#;
        assert!(text.lines().any(|l| l == want), "{text}");
        assert!(text.contains(
            r#"fient_source_reachability{source="odd \"name\" \\ with\nnewline",wire="ntp"} 11"#
        ));
        // One line per sample: the newline did not split it.
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 2);
    }

    #[test]
    fn fient_leaves_out_what_it_does_not_know() {
        let m = FientMetrics {
            sources: vec![
                SourceMetrics {
                    name: "ntp://a".into(),
                    wire: "ntp".into(),
                    status: "selected".into(),
                    offset_seconds: Some(0.0015),
                    bound_seconds: Some(2.5e-7),
                    rtt_seconds: Some(0.004),
                    reachability: 255,
                    stratum: Some(2),
                },
                SourceMetrics {
                    name: "cerv://b".into(),
                    wire: "cerv".into(),
                    status: "no_answer".into(),
                    ..SourceMetrics::default()
                },
            ],
            combined: None,
            syncs: vec![("synced".into(), 9), ("no majority".into(), 1)],
            last_sync_age: Some(Duration::from_secs(64)),
            frequency_ppm: Some(-12.25),
        };
        let text = render_fient(&m);
        for want in [
            r#"fient_source_offset_seconds{source="ntp://a",wire="ntp"} 0.0015"#,
            r#"fient_source_error_bound_seconds{source="ntp://a",wire="ntp"} 2.5e-7"#,
            r#"fient_source_stratum{source="ntp://a",wire="ntp"} 2"#,
            r#"fient_source_status{source="cerv://b",wire="cerv",status="no_answer"} 1"#,
            r#"fient_source_reachability{source="cerv://b",wire="cerv"} 0"#,
            r#"fient_syncs_total{outcome="no_majority"} 1"#,
            "fient_frequency_ppm -12.25",
            "fient_last_sync_age_seconds 64.0",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want} in\n{text}");
        }
        assert!(!text.contains(r#"fient_source_offset_seconds{source="cerv://b""#));
        assert!(!text.contains("fient_offset_seconds"), "{text}");
        assert!(!text.contains("fient_sources_agreeing"), "{text}");
    }

    #[test]
    fn combined_answer_is_rendered() {
        let m = FientMetrics {
            combined: Some(CombinedMetrics {
                offset_seconds: -0.25,
                bound_seconds: 0.001,
                agreeing: 2,
                answered: 3,
            }),
            ..FientMetrics::default()
        };
        let text = render_fient(&m);
        for want in [
            "fient_offset_seconds -0.25",
            "fient_error_bound_seconds 0.001",
            "fient_sources_agreeing 2",
            "fient_sources_answered 3",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want} in\n{text}");
        }
    }

    #[test]
    fn special_floats_use_the_formats_spelling() {
        let mut out = String::new();
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e-12, 3e20] {
            write_value(Value::Float(v), &mut out);
            out.push(' ');
        }
        assert_eq!(out, "NaN +Inf -Inf 1e-12 3e20 ");
    }

    #[test]
    fn reach_shifts_in_the_newest_poll() {
        assert_eq!(reach(0, true), 1);
        assert_eq!(reach(0b1000_0001, false), 0b0000_0010);
        assert_eq!(reach(0xff, true), 0xff);
    }

    #[test]
    fn stream_listeners_from_their_counters() {
        let stats = TcpStats::default();
        stats.accepted.add(5);
        stats.handshake_failed.add(2);
        stats.over_limit.incr();
        let tls = ListenerMetrics::stream("tls", "127.0.0.1:8443", &stats);
        assert_eq!(tls.connections, Some(5));
        assert_eq!(tls.handshake_failed, Some(2));
        assert!(tls.drops.contains(&("over limit", 1)));
        let tcp = ListenerMetrics::stream("tcp", "127.0.0.1:8081", &stats);
        assert_eq!(tcp.handshake_failed, None);
        let udp = ListenerMetrics::datagram("cerv", "127.0.0.1:8081", &ServerStats::default());
        assert_eq!(udp.drops.len(), ServerStats::default().drops().len());
        assert_eq!(udp.connections, None);
    }

    #[tokio::test]
    async fn head_is_read_up_to_its_blank_line() {
        let mut input: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nignored";
        assert_eq!(
            read_head(&mut input, 1024).await.unwrap(),
            Head::Complete(b"GET /metrics HTTP/1.1\r\nHost: x".to_vec())
        );
        let mut bare: &[u8] = b"GET / HTTP/1.0\n\n";
        assert_eq!(
            read_head(&mut bare, 1024).await.unwrap(),
            Head::Complete(b"GET / HTTP/1.0".to_vec())
        );
        let mut long: &[u8] = &[b'a'; 100];
        assert_eq!(read_head(&mut long, 64).await.unwrap(), Head::TooLarge);
        let mut cut: &[u8] = b"GET /";
        assert_eq!(
            read_head(&mut cut, 64).await.unwrap(),
            Head::Incomplete(b"GET /".to_vec())
        );
    }

    struct Running {
        addr: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(config: ServeConfig) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let render: Render = Arc::new(|| "# HELP up Up.\n# TYPE up gauge\nup 1\n".to_string());
        let task = tokio::spawn(serve_with(
            listener,
            render,
            async {
                let _ = stopped.await;
            },
            config,
        ));
        Running {
            addr,
            stop: Some(stop),
            task,
        }
    }

    fn quick() -> ServeConfig {
        ServeConfig {
            read_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_secs(2),
            ..ServeConfig::default()
        }
    }

    /// Sends `request` (then half-closes if `close`), reads to the end,
    /// at most 5 s.
    async fn exchange(addr: SocketAddr, request: &[u8], close: bool) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        if close {
            s.shutdown().await.unwrap();
        }
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("answered in time")
            .expect("read");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn get_metrics_is_answered_with_the_text_format() {
        let server = start(quick()).await;
        let reply = exchange(
            server.addr,
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
            false,
        )
        .await;
        let (head, body) = reply.split_once("\r\n\r\n").expect("a head");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(
            head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
        assert!(head.contains("\r\nConnection: close"));
        assert_eq!(body, "# HELP up Up.\n# TYPE up gauge\nup 1\n");

        // A query string is no other path; HEAD gets the head alone.
        let reply = exchange(server.addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", false).await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        let reply = exchange(server.addr, b"HEAD /metrics HTTP/1.1\r\n\r\n", false).await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\n"), "{reply}");
    }

    #[tokio::test]
    async fn other_paths_methods_and_garbage_are_refused() {
        let server = start(quick()).await;
        let cases: [(&[u8], &str); 7] = [
            (b"GET / HTTP/1.1\r\n\r\n", "404 Not Found"),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", "404 Not Found"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", "405 Method Not Allowed"),
            (
                b"GET /metrics HTTP/2.0\r\n\r\n",
                "505 HTTP Version Not Supported",
            ),
            (b"\x00\xff\xfe garbage\r\n\r\n", "400 Bad Request"),
            (b"GET  /metrics HTTP/1.1\r\n\r\n", "400 Bad Request"),
            (b"GET /metrics\r\n\r\n", "400 Bad Request"),
        ];
        for (request, status) in cases {
            let reply = exchange(server.addr, request, false).await;
            assert!(
                reply.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{:?} got {reply:?}",
                String::from_utf8_lossy(request)
            );
        }
        let reply = exchange(server.addr, b"PUT /metrics HTTP/1.1\r\n\r\n", false).await;
        assert!(reply.contains("\r\nAllow: GET, HEAD\r\n"), "{reply}");
        // Garbage that never ends its head, then a half-close.
        let reply = exchange(server.addr, &[0xc3; 100], true).await;
        assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{reply}");
        // And the server still serves.
        let reply = exchange(server.addr, b"GET /metrics HTTP/1.1\r\n\r\n", false).await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    }

    #[tokio::test]
    async fn an_oversized_request_gets_431() {
        let server = start(quick()).await;
        let mut request = b"GET /metrics HTTP/1.1\r\n".to_vec();
        while request.len() < 16 * 1024 {
            request
                .extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        request.extend_from_slice(b"\r\n");
        let reply = exchange(server.addr, &request, false).await;
        assert!(
            reply.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{reply:?}"
        );
    }

    #[tokio::test]
    async fn a_silent_client_is_cut_off() {
        let server = start(quick()).await;
        let started = Instant::now();
        let reply = exchange(server.addr, b"", false).await;
        assert_eq!(reply, "");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        // One that stops halfway through its head too.
        let started = Instant::now();
        let reply = exchange(server.addr, b"GET /metrics HTTP/1.1\r\nHost:", false).await;
        assert_eq!(reply, "");
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_their_turn() {
        let server = start(ServeConfig {
            max_connections: 1,
            ..quick()
        })
        .await;
        // A silent client holds the only slot until it is cut off.
        let _silent = TcpStream::connect(server.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let reply = exchange(server.addr, b"GET /metrics HTTP/1.1\r\n\r\n", false).await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
    }

    #[tokio::test]
    async fn shutdown_stops_the_server() {
        let mut server = start(quick()).await;
        let _open = TcpStream::connect(server.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = server.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(2), &mut server.task)
            .await
            .expect("stopped in time")
            .expect("no panic");
        assert!(TcpStream::connect(server.addr).await.is_err());
    }
}
