//! Many datagrams per system call: `recvmmsg` and `sendmmsg`.
//!
//! Under load, most of a UDP server's time is spent in the kernel, and a
//! good part of that is the fixed cost of each system call and, on the
//! sending side, of waking the receiver once per datagram. Reading up to
//! [`BATCH`] datagrams with one `recvmmsg` and answering with one
//! `sendmmsg` pays those costs once per batch. With one datagram waiting
//! the calls cost what `recvmsg` and `sendto` do, so an idle server loses
//! nothing.
//!
//! The buffers are owned here and the kernel's header arrays are rebuilt on
//! each call, so the types are plain data that can move between threads.

use super::socket::Arrival;
use crate::time::Timestamp;
use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// Datagrams per system call.
pub const BATCH: usize = 64;
/// Receive buffer per datagram: one byte more than the protocol allows, so
/// that an oversized datagram shows as such.
const RECV_LEN: usize = crate::wire::MAX_DATAGRAM + 1;

/// Room for one `SCM_TIMESTAMPNS` control message, aligned for `cmsghdr`.
type Control = [u64; 8];

/// What the kernel reads and writes in one `recvmmsg`: the buffers, and the
/// headers that point into them. They live in one heap block that never
/// moves, so the headers are built once, and each call only resets the
/// lengths the kernel overwrote in the last one.
struct RecvBuffers {
    bufs: [[u8; RECV_LEN]; BATCH],
    addrs: [libc::sockaddr_storage; BATCH],
    controls: [Control; BATCH],
    iovs: [libc::iovec; BATCH],
    headers: [libc::mmsghdr; BATCH],
}

/// Buffers for one `recvmmsg`.
pub struct RecvBatch {
    buffers: Box<RecvBuffers>,
    arrivals: [Arrival; BATCH],
    filled: usize,
}

// SAFETY: as for `SendBatch`: the headers point into the batch's own heap
// block, which moves with it.
unsafe impl Send for RecvBatch {}

impl Default for RecvBatch {
    fn default() -> Self {
        // SAFETY: every field of RecvBuffers is plain data (bytes, C
        // structs of integers and pointers) for which all-zero is valid.
        let mut buffers: Box<RecvBuffers> = unsafe { Box::new_zeroed().assume_init() };
        let b = &mut *buffers;
        for i in 0..BATCH {
            b.iovs[i] = libc::iovec {
                iov_base: b.bufs[i].as_mut_ptr().cast(),
                iov_len: RECV_LEN,
            };
            let h = &mut b.headers[i].msg_hdr;
            h.msg_name = (&mut b.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_iov = &mut b.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = b.controls[i].as_mut_ptr().cast();
        }
        let mut batch = RecvBatch {
            buffers,
            arrivals: [Arrival {
                len: 0,
                from: None,
                kernel_time: None,
                truncated: false,
            }; BATCH],
            filled: BATCH,
        };
        batch.reset();
        batch
    }
}

impl RecvBatch {
    /// Gives back the room the last call's datagrams used.
    fn reset(&mut self) {
        for header in &mut self.buffers.headers[..self.filled] {
            let h = &mut header.msg_hdr;
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_controllen = size_of::<Control>() as _;
            h.msg_flags = 0;
        }
        self.filled = 0;
    }

    /// Reads as many datagrams as are waiting, up to [`BATCH`]; returns how
    /// many. Without `wait` it never blocks (an error of kind `WouldBlock`
    /// if none is waiting); with `wait` it blocks for the first as a
    /// blocking socket does (up to its receive timeout), then takes what
    /// else is waiting.
    pub fn recv(&mut self, fd: RawFd, wait: bool) -> io::Result<usize> {
        self.reset();
        let flags = if wait {
            libc::MSG_WAITFORONE
        } else {
            libc::MSG_DONTWAIT
        };
        // SAFETY: the headers point into `self.buffers`, which lives (and
        // stays put) for the call and is not otherwise borrowed during it.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.buffers.headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let b = &*self.buffers;
        for (i, header) in b.headers.iter().enumerate().take(n) {
            let h = &header.msg_hdr;
            self.arrivals[i] = Arrival {
                len: (header.msg_len as usize).min(RECV_LEN),
                from: socket_addr(&b.addrs[i], h.msg_namelen),
                kernel_time: kernel_time(h),
                truncated: h.msg_flags & libc::MSG_TRUNC != 0,
            };
        }
        self.filled = n;
        Ok(n)
    }

    /// The datagrams of the last [`recv`](Self::recv).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Arrival)> {
        self.buffers.bufs[..self.filled]
            .iter()
            .zip(&self.arrivals[..self.filled])
            .map(|(buf, a)| (&buf[..a.len], a))
    }
}

/// The address the kernel wrote, if it is an IPv4 or IPv6 one.
fn socket_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, and
            // sockaddr_storage is aligned for every address type.
            let a =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                u32::from_be(a.sin6_flowinfo),
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The `SCM_TIMESTAMPNS` stamp of a received message, if any.
fn kernel_time(h: &libc::msghdr) -> Option<Timestamp> {
    if h.msg_controllen == 0 || h.msg_flags & libc::MSG_CTRUNC != 0 {
        return None;
    }
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // within `msg_controllen`; the data of an SCM_TIMESTAMPNS message is a
    // timespec (read unaligned, as the macros do not promise alignment).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(h);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                let nanos = i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec);
                return i64::try_from(nanos).ok().map(Timestamp::from_nanos);
            }
            cmsg = libc::CMSG_NXTHDR(h, cmsg);
        }
    }
    None
}

/// Largest datagram a [`SendBatch`] holds: the largest datagram (an NTS
/// reply can be as long as its request).
pub const SEND_LEN: usize = crate::wire::MAX_DATAGRAM;

/// What the kernel reads in one `sendmmsg`: the datagrams, their
/// destinations (an IPv4 address in the first bytes of the room an IPv6
/// one takes) and the headers that point at them, built once, in one heap
/// block that never moves.
struct SendBuffers {
    bufs: [[u8; SEND_LEN]; BATCH],
    addrs: [libc::sockaddr_in6; BATCH],
    iovs: [libc::iovec; BATCH],
    headers: [libc::mmsghdr; BATCH],
}

/// Buffers for one `sendmmsg`.
pub struct SendBatch {
    buffers: Box<SendBuffers>,
    queued: usize,
}

// SAFETY: the raw pointers in the headers point into the batch's own heap
// block, which moves with it (the box's contents never move); nothing else
// holds them between calls.
unsafe impl Send for SendBatch {}

impl Default for SendBatch {
    fn default() -> Self {
        // SAFETY: every field of SendBuffers is plain data (bytes, C
        // structs of integers and pointers) for which all-zero is valid.
        let mut buffers: Box<SendBuffers> = unsafe { Box::new_zeroed().assume_init() };
        let b = &mut *buffers;
        for i in 0..BATCH {
            b.iovs[i].iov_base = b.bufs[i].as_mut_ptr().cast();
            let h = &mut b.headers[i].msg_hdr;
            h.msg_name = (&mut b.addrs[i] as *mut libc::sockaddr_in6).cast();
            h.msg_iov = &mut b.iovs[i];
            h.msg_iovlen = 1;
        }
        SendBatch { buffers, queued: 0 }
    }
}

/// Writes `to` as the kernel reads it into `room`; returns its length.
fn write_sockaddr(to: SocketAddr, room: &mut libc::sockaddr_in6) -> libc::socklen_t {
    match to {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a sockaddr_in is smaller than a sockaddr_in6 and
            // needs no stricter alignment.
            unsafe { std::ptr::write((room as *mut libc::sockaddr_in6).cast(), sin) };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(v6) => {
            *room = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo().to_be(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

impl SendBatch {
    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.queued
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// True when no more fit.
    pub fn is_full(&self) -> bool {
        self.queued == BATCH
    }

    /// Queues a datagram for `to`, written by `fill` into a buffer of
    /// [`SEND_LEN`] bytes; `fill` returns the length or `None` to skip.
    pub fn push(
        &mut self,
        to: SocketAddr,
        fill: impl FnOnce(&mut [u8; SEND_LEN]) -> Option<usize>,
    ) {
        let i = self.queued;
        if i == BATCH {
            return;
        }
        let b = &mut *self.buffers;
        if let Some(len) = fill(&mut b.bufs[i]) {
            b.iovs[i].iov_len = len.min(SEND_LEN);
            b.headers[i].msg_hdr.msg_namelen = write_sockaddr(to, &mut b.addrs[i]);
            self.queued += 1;
        }
    }

    /// Sends the queued datagrams from the `start`-th on; returns how many
    /// the kernel took. On a blocking socket it waits for room (up to the
    /// socket's send timeout); on a non-blocking one, an error of kind
    /// `WouldBlock` says there was room for none. The caller drops what
    /// it cannot send.
    pub fn send(&mut self, fd: RawFd, start: usize) -> io::Result<usize> {
        let n = self.queued.saturating_sub(start);
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: the headers from `start` on were filled by `push` and
        // point into `self.buffers`, alive and unborrowed for the call.
        let sent = unsafe {
            libc::sendmmsg(
                fd,
                self.buffers.headers[start..].as_mut_ptr(),
                n as libc::c_uint,
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }

    /// Empties the batch.
    pub fn clear(&mut self) {
        self.queued = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_goes_out_and_comes_in() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        crate::transport::socket::enable_timestamps(&rx).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut out = SendBatch::default();
        for i in 0..5u8 {
            out.push(to, |buf| {
                buf[..3].copy_from_slice(&[i, i, i]);
                Some(3)
            });
        }
        out.push(to, |_| None); // skipped
        assert_eq!(out.len(), 5);
        assert_eq!(out.send(tx.as_raw_fd(), 0).unwrap(), 5);
        assert_eq!(out.send(tx.as_raw_fd(), 5).unwrap(), 0);

        let mut inbox = RecvBatch::default();
        let n = inbox.recv(rx.as_raw_fd(), false).unwrap();
        assert_eq!(n, 5);
        for (i, (bytes, arrival)) in inbox.iter().enumerate() {
            assert_eq!(bytes, &[i as u8; 3]);
            assert_eq!(arrival.from, Some(tx.local_addr().unwrap()));
            assert!(!arrival.truncated);
        }
        let again = inbox.recv(rx.as_raw_fd(), false).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn oversized_datagrams_are_marked() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[7u8; 5000], rx.local_addr().unwrap()).unwrap();
        let mut inbox = RecvBatch::default();
        assert_eq!(inbox.recv(rx.as_raw_fd(), false).unwrap(), 1);
        let (bytes, arrival) = inbox.iter().next().unwrap();
        assert_eq!(bytes.len(), RECV_LEN);
        assert!(arrival.truncated);
    }
}
