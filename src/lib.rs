//! The lab: everything needed to test and measure cerv and fient as a user
//! runs them, on one machine.
//!
//! - [`harness`]: build and start the real binaries, collect their output.
//! - [`relay`]: a user-space impairment relay on loopback (delay, jitter,
//!   loss, duplication, reordering, per direction, from a seed), because
//!   this kernel has no `netem`.
//!
//! - [`watch`]: `fient --watch` for minutes against the truth, for the
//!   filter over syncs: steady paths, a drifting clock, a server whose
//!   time jumps.
//! - [`load`]: a load generator and the UDP echo server it compares with.
//! - [`peers`]: programs no one here wrote (ntpdig, chronyd, libfaketime,
//!   promtool), found or skipped, and chronyd run safely.
//!
//! Binaries: `relay` (run the relay by hand), `lab` (the accuracy
//! benchmark, one-shot or with `--watch` over time) and `cerv-bench` (the speed benchmark).

pub mod accuracy;
pub mod harness;
pub mod load;
pub mod peers;
pub mod plot;
pub mod relay;
pub mod scenario;
pub mod watch;

pub use harness::{Cerv, Finished, bin, fient, json, run, without_clock_privilege};
