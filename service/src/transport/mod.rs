//! tarpc over UDP: one message per datagram.
//!
//! - [`client`]: a socket connected to one server, as the `Stream`/`Sink`
//!   pair a tarpc client runs on.
//! - [`server`]: one socket shared by all clients; a reader demultiplexes
//!   datagrams by peer address into one tarpc channel per peer.
//! - [`face`]: what a server socket speaks, cerv's wire or NTP.
//! - [`stream`]: the same messages over TCP or TLS, one frame each, with
//!   the kernel's receive stamps; [`tcp`]: the TCP and TLS listener.
//!
//! Both sides follow the same rule: anything the network can do (garbage,
//! loss, ICMP errors, a full queue) is dropped and counted, never turned
//! into an error that would end a tarpc channel.

pub mod batch;
pub mod client;
pub mod face;
pub mod limit;
pub mod server;
pub mod socket;
pub mod stream;
pub mod tcp;

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// How many datagrams each receive batch held: counts over
/// [`crate::metrics::BATCH_BUCKETS`], safe to bump from any task.
#[derive(Debug, Default)]
pub struct BatchCounter {
    counts: [Counter; crate::metrics::BATCH_BUCKETS.len() + 1],
    sum: Counter,
}

impl BatchCounter {
    /// Counts one batch of `size` datagrams.
    pub fn observe(&self, size: u64) {
        let i = crate::metrics::BATCH_BUCKETS
            .iter()
            .position(|&le| size <= le)
            .unwrap_or(crate::metrics::BATCH_BUCKETS.len());
        self.counts[i].incr();
        self.sum.add(size);
    }

    /// The counts now.
    pub fn snapshot(&self) -> crate::metrics::BatchSizes {
        crate::metrics::BatchSizes {
            counts: std::array::from_fn(|i| self.counts[i].get()),
            sum: self.sum.get(),
        }
    }
}

/// A statistics counter, safe to bump from any task.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn incr(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.get())
    }
}

/// Errors a UDP socket reports because of something the network did (an
/// ICMP message, a full buffer), not because the socket is broken.
pub(crate) fn is_transient(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionRefused
            | K::ConnectionReset
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::NetworkDown
            | K::AddrNotAvailable
            | K::WouldBlock
            | K::Interrupted
    ) || matches!(
        e.raw_os_error(),
        Some(
            libc::EMSGSIZE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPERM
                | libc::EHOSTDOWN
                | libc::EPROTO
        )
    )
}
