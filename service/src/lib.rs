//! The shared vocabulary of cerv (the time server) and fient (the client).
//!
//! - [`time`]: [`Timestamp`] and [`Nanos`], integer nanoseconds.
//! - [`clock`]: the [`Clock`] seam, with the system clock and test clocks.
//! - [`sync`]: the clock math, pure: samples, offsets, honest error bounds.
//! - [`select`]: choosing among several sources (majority, truechimers) and combining them, pure.
//! - [`discipline`]: keeping a clock right over time (step, slew, frequency), pure.
//! - [`rpc`]: the tarpc service trait, [`TimeService`].
//! - [`wire`]: the datagram format, decoded and validated.
//! - [`ntp`]: the NTP packet format (RFC 5905, 7822), decoded and validated.
//! - [`nts`]: Network Time Security (RFC 8915): NTS-KE records, cookies, NTS extension fields, pure.
//! - [`auth`]: pre-shared keys and the tags that authenticate datagrams.
//! - [`tls`]: rustls set up from PEM files, and handshake failures in words.
//! - [`transport`]: tarpc over UDP, client and server side.
//! - [`source`]: one server over one wire (cerv's or NTP): connect, probe and
//!   sync, with retries, Kiss-o'-Death handling and an honest estimate.
//! - [`control`]: the control socket (`fient status`, `cerv status`): a tarpc service on a Unix socket.
//! - [`config`]: TOML config files whose keys are the programs' long options.
//! - [`signals`]: Ctrl-C and SIGTERM, for the binaries.
//! - [`filter`]: a source's history over syncs: a tighter estimate, the frequency, steps (pure).
//! - [`ensemble`]: several sources asked at once, selected and combined.
//! - [`shm`]: the clock for every process: fient publishes to a shared-memory
//!   segment, any process reads an interval from it without a system call.
//! - [`synced`]: [`synced::SyncedClock`], an interval that holds the server's time, kept in sync in the background.
//! - [`metrics`]: snapshots of cerv's and fient's numbers, the Prometheus
//!   text format, and a small `GET /metrics` endpoint.
//! - [`systemd`]: `sd_notify` (ready, reloading, stopping, status) and the
//!   watchdog, without libsystemd.

pub mod auth;
pub mod clock;
pub mod config;
pub mod control;
pub mod discipline;
pub mod ensemble;
pub mod filter;
pub mod metrics;
pub mod ntp;
pub mod nts;
pub mod rpc;
pub mod select;
pub mod shm;
pub mod signals;
pub mod source;
pub mod sync;
pub mod synced;
pub mod systemd;
pub mod time;
pub mod tls;
pub mod transport;
pub mod wire;

pub use clock::{
    Clock, ManualClock, MonotonicClock, OffsetClock, SimulatedClock, SkewedClock, SystemClock,
};
pub use rpc::{ProbeReply, TimeService, TimeServiceClient};
pub use time::{Nanos, Timestamp};
