//! The lab: everything needed to test and measure cerv and fient as a user
//! runs them, on one machine.
//!
//! - [`harness`]: build and start the real binaries, collect their output.
//! - [`relay`]: a user-space impairment relay on loopback (delay, jitter,
//!   loss, duplication, reordering, per direction, from a seed), because
//!   this kernel has no `netem`.
//! - [`tamper`]: a TCP proxy that rewrites bytes of the server's TLS
//!   records or cerv frames: the attacker on the path.
//! - [`certs`]: a test CA and server certificates (good, expired, wrong
//!   name, another CA) for the TLS tests and the lab.
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
pub mod certs;
pub mod harness;
pub mod load;
pub mod peers;
pub mod plot;
pub mod relay;
pub mod scenario;
pub mod several;
pub mod tamper;
pub mod watch;

pub use harness::{Cerv, Finished, bin, fient, json, run, without_clock_privilege};
