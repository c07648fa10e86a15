//! The shared vocabulary of cerv (the time server) and fient (the client).
//!
//! - [`time`]: [`Timestamp`] and [`Nanos`], integer nanoseconds.
//! - [`clock`]: the [`Clock`] seam, with the system clock and test clocks.
//! - [`sync`]: the clock math, pure: samples, offsets, honest error bounds.
//! - [`discipline`]: keeping a clock right over time (step, slew, frequency), pure.
//! - [`rpc`]: the tarpc service trait, [`TimeService`].
//! - [`wire`]: the datagram format, decoded and validated.
//! - [`auth`]: pre-shared keys and the tags that authenticate datagrams.
//! - [`transport`]: tarpc over UDP, client and server side.
//! - [`client`]: connect, probe and sync in a few lines.
//! - [`signals`]: Ctrl-C and SIGTERM, for the binaries.
//! - [`shm`]: the clock for every process: fient publishes to a shared-memory
//!   segment, any process reads an interval from it without a system call.
//! - [`synced`]: [`synced::SyncedClock`], an interval that holds the server's time, kept in sync in the background.

pub mod auth;
pub mod client;
pub mod clock;
pub mod discipline;
pub mod rpc;
pub mod shm;
pub mod signals;
pub mod sync;
pub mod synced;
pub mod time;
pub mod transport;
pub mod wire;

pub use clock::{
    Clock, ManualClock, MonotonicClock, OffsetClock, SimulatedClock, SkewedClock, SystemClock,
};
pub use rpc::{ProbeReply, TimeService, TimeServiceClient};
pub use time::{Nanos, Timestamp};
