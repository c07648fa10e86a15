//! A TCP proxy on loopback that rewrites what the server sends: the
//! attacker on the path that TLS is there to stop.
//!
//! ```text
//!  client ──▶ proxy ──────────────────────────▶ server
//!  client ◀── proxy ◀── (split into units, one rewritten) ── server
//! ```
//!
//! The server's stream is cut into the units its protocol is made of,
//! TLS records (a 5-byte header and its length) or cerv frames (a 4-byte
//! length and the message), each forwarded whole once it has arrived, so
//! a rewrite can aim at one unit: one byte of the third TLS record, say,
//! or the timestamps of every plaintext reply. The proxy cuts by the
//! headers it read, so a rewritten length field misleads only the client.
//!
//! Bounded like the relay: at most [`MAX_CONNECTIONS`] connections, reads
//! that wake every 20 ms to look at the stop flag, and everything stops
//! when the proxy is dropped.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// Most connections one proxy serves, in all.
pub const MAX_CONNECTIONS: usize = 64;
/// How often blocked reads look at the stop flag.
const POLL: Duration = Duration::from_millis(20);

/// How the server's stream is cut into units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Units {
    /// TLS records: type (1), version (2), length (2, big-endian), payload.
    TlsRecords,
    /// cerv frames: length (4, big-endian), message.
    CervFrames,
}

impl Units {
    /// The header's length, and the whole unit's length once the header
    /// is in.
    fn header(self) -> usize {
        match self {
            Units::TlsRecords => 5,
            Units::CervFrames => 4,
        }
    }

    fn total(self, header: &[u8]) -> usize {
        match self {
            Units::TlsRecords => 5 + usize::from(u16::from_be_bytes([header[3], header[4]])),
            Units::CervFrames => {
                4 + u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize
            }
        }
    }
}

/// Rewrites one unit: given its index on the connection (0 first) and its
/// bytes, header included.
pub type Rewrite = Arc<dyn Fn(usize, &mut [u8]) + Send + Sync>;

/// A rewrite that flips the lowest bit of byte `byte` (header included)
/// of unit `unit` only.
pub fn flip(unit: usize, byte: usize) -> Rewrite {
    Arc::new(move |i, bytes: &mut [u8]| {
        if i == unit
            && let Some(b) = bytes.get_mut(byte)
        {
            *b ^= 0x01;
        }
    })
}

/// A running proxy.
pub struct TamperProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<thread::JoinHandle<()>>>>,
    accept: Option<thread::JoinHandle<()>>,
    units: Arc<Mutex<Vec<Vec<usize>>>>,
}

impl TamperProxy {
    /// Starts a proxy on a free loopback port toward `server`, cutting
    /// what the server sends into `units` and passing each through
    /// `rewrite`.
    pub fn start(server: SocketAddr, units: Units, rewrite: Rewrite) -> io::Result<TamperProxy> {
        let listener = TcpListener::bind((server.ip(), 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accept = thread::spawn({
            let (stop, threads, seen) = (stop.clone(), threads.clone(), seen.clone());
            move || {
                let mut served = 0;
                while !stop.load(Ordering::Relaxed) && served < MAX_CONNECTIONS {
                    let client = match listener.accept() {
                        Ok((client, _)) => client,
                        Err(_) => {
                            thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                    };
                    served += 1;
                    let Ok(upstream) = TcpStream::connect(server) else {
                        continue;
                    };
                    let index = {
                        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                        seen.push(Vec::new());
                        seen.len() - 1
                    };
                    let pair = (|| -> io::Result<_> {
                        for s in [&client, &upstream] {
                            s.set_nonblocking(false)?;
                            s.set_nodelay(true)?;
                            s.set_read_timeout(Some(POLL))?;
                        }
                        Ok((client.try_clone()?, upstream.try_clone()?))
                    })();
                    let Ok((client_w, upstream_w)) = pair else {
                        continue;
                    };
                    let up = {
                        let stop = stop.clone();
                        thread::spawn(move || copy(client, upstream_w, &stop))
                    };
                    let down = {
                        let (stop, rewrite, seen) = (stop.clone(), rewrite.clone(), seen.clone());
                        thread::spawn(move || {
                            relay_units(upstream, client_w, units, &rewrite, &stop, |len| {
                                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                                seen[index].push(len);
                            })
                        })
                    };
                    let mut threads = threads.lock().unwrap_or_else(|p| p.into_inner());
                    threads.push(up);
                    threads.push(down);
                }
            }
        });
        Ok(TamperProxy {
            addr,
            stop,
            threads,
            accept: Some(accept),
            units: seen,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The length of each unit the server sent so far (header
    /// included), for each connection in the order they were made.
    pub fn units_seen(&self) -> Vec<Vec<usize>> {
        self.units.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits (at most `limit`) until no unit has passed for 200 ms, and
    /// returns [`units_seen`](Self::units_seen).
    pub fn settle(&self, limit: Duration) -> Vec<Vec<usize>> {
        let started = std::time::Instant::now();
        let mut last = self.units_seen();
        while started.elapsed() < limit {
            thread::sleep(Duration::from_millis(200));
            let now = self.units_seen();
            if now == last {
                break;
            }
            last = now;
        }
        last
    }
}

impl Drop for TamperProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Reads into `buf`, riding out the poll timeouts; `Ok(0)` at the end of
/// the stream or when told to stop.
fn read_some(from: &mut TcpStream, buf: &mut [u8], stop: &AtomicBool) -> io::Result<usize> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(0);
        }
        match from.read(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            other => return other,
        }
    }
}

/// Copies the client's bytes to the server as they come.
fn copy(mut from: TcpStream, mut to: TcpStream, stop: &AtomicBool) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = read_some(&mut from, &mut buf, stop) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Forwards the server's stream unit by unit, rewritten; reports the
/// length of each as it goes through.
fn relay_units(
    mut from: TcpStream,
    mut to: TcpStream,
    units: Units,
    rewrite: &Rewrite,
    stop: &AtomicBool,
    counted: impl Fn(usize),
) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut index = 0;
    'read: while let Ok(n) = read_some(&mut from, &mut buf, stop) {
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        // Every whole unit in what has arrived, each rewritten and sent.
        loop {
            if pending.len() < units.header() {
                break;
            }
            let total = units.total(&pending);
            if pending.len() < total {
                break;
            }
            let mut unit: Vec<u8> = pending.drain(..total).collect();
            rewrite(index, &mut unit);
            index += 1;
            counted(total);
            if to.write_all(&unit).is_err() {
                break 'read;
            }
        }
    }
    // A partial unit at the end goes as it is.
    let _ = to.write_all(&pending);
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_cut_by_their_headers() {
        assert_eq!(
            Units::TlsRecords.total(&[0x17, 3, 3, 0x01, 0x02]),
            5 + 0x102
        );
        assert_eq!(Units::CervFrames.total(&[0, 0, 0, 48]), 52);
    }

    #[test]
    fn a_flip_touches_one_byte_of_one_unit() {
        let f = flip(1, 2);
        let mut a = vec![0u8; 4];
        f(0, &mut a);
        assert_eq!(a, [0, 0, 0, 0]);
        f(1, &mut a);
        assert_eq!(a, [0, 0, 1, 0]);
        // Past the end: nothing.
        flip(1, 9)(1, &mut a);
        assert_eq!(a, [0, 0, 1, 0]);
    }
}
