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
use socket2::{SockAddr, SockAddrStorage};
use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// Datagrams per system call.
pub const BATCH: usize = 64;
/// Receive buffer per datagram: one byte more than the protocol allows, so
/// that an oversized datagram shows as such.
const RECV_LEN: usize = crate::wire::MAX_DATAGRAM + 1;

/// Room for one `SCM_TIMESTAMPNS` control message, aligned for `cmsghdr`.
type Control = [u64; 8];

/// Buffers for one `recvmmsg`.
pub struct RecvBatch {
    bufs: Box<[[u8; RECV_LEN]; BATCH]>,
    addrs: Box<[SockAddrStorage; BATCH]>,
    controls: Box<[Control; BATCH]>,
    arrivals: [Arrival; BATCH],
    filled: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: Box::new([[0; RECV_LEN]; BATCH]),
            addrs: Box::new(std::array::from_fn(|_| SockAddrStorage::zeroed())),
            controls: Box::new([[0; 8]; BATCH]),
            arrivals: [Arrival {
                len: 0,
                from: None,
                kernel_time: None,
                truncated: false,
            }; BATCH],
            filled: 0,
        }
    }
}

impl RecvBatch {
    /// Reads as many datagrams as are waiting, up to [`BATCH`], without
    /// blocking; returns how many (an error of kind `WouldBlock` if none).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.filled = 0;
        // SAFETY: zeroed iovec and mmsghdr values are valid; every pointer
        // set below points into buffers owned by `self` that outlive the call
        // and are not otherwise borrowed during it.
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for i in 0..BATCH {
            iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: RECV_LEN,
            };
            let h = &mut headers[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut SockAddrStorage).cast();
            h.msg_namelen = size_of::<SockAddrStorage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.controls[i].as_mut_ptr().cast();
            h.msg_controllen = size_of::<Control>() as _;
        }
        // SAFETY: `headers` holds BATCH valid headers as set up above.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, header) in headers.iter().enumerate().take(n) {
            let h = &header.msg_hdr;
            // SAFETY: the kernel wrote a valid address of `msg_namelen`
            // bytes into our storage.
            let storage = std::mem::replace(&mut self.addrs[i], SockAddrStorage::zeroed());
            let from = unsafe { SockAddr::new(storage, h.msg_namelen) }.as_socket();
            self.arrivals[i] = Arrival {
                len: (header.msg_len as usize).min(RECV_LEN),
                from,
                kernel_time: kernel_time(h),
                truncated: h.msg_flags & libc::MSG_TRUNC != 0,
            };
        }
        self.filled = n;
        Ok(n)
    }

    /// The datagrams of the last [`recv`](Self::recv).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Arrival)> {
        self.bufs[..self.filled]
            .iter()
            .zip(&self.arrivals[..self.filled])
            .map(|(buf, a)| (&buf[..a.len], a))
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

/// Buffers for one `sendmmsg`.
pub struct SendBatch {
    bufs: Box<[[u8; SEND_LEN]; BATCH]>,
    lens: [usize; BATCH],
    addrs: Vec<SockAddr>,
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            bufs: Box::new([[0; SEND_LEN]; BATCH]),
            lens: [0; BATCH],
            addrs: Vec::with_capacity(BATCH),
        }
    }
}

impl SendBatch {
    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// True when no more fit.
    pub fn is_full(&self) -> bool {
        self.addrs.len() == BATCH
    }

    /// Queues a datagram for `to`, written by `fill` into a buffer of
    /// [`SEND_LEN`] bytes; `fill` returns the length or `None` to skip.
    pub fn push(
        &mut self,
        to: SocketAddr,
        fill: impl FnOnce(&mut [u8; SEND_LEN]) -> Option<usize>,
    ) {
        let i = self.addrs.len();
        if i == BATCH {
            return;
        }
        if let Some(len) = fill(&mut self.bufs[i]) {
            self.lens[i] = len.min(SEND_LEN);
            self.addrs.push(SockAddr::from(to));
        }
    }

    /// Sends the queued datagrams from the `start`-th on, without blocking;
    /// returns how many the kernel took (an error of kind `WouldBlock` if
    /// none). The caller drops what it cannot send.
    pub fn send(&mut self, fd: RawFd, start: usize) -> io::Result<usize> {
        let n = self.addrs.len().saturating_sub(start);
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: as in `RecvBatch::recv`: all pointers point into buffers
        // owned by `self`, alive and unborrowed for the call.
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for k in 0..n {
            let i = start + k;
            iovs[k] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            };
            let h = &mut headers[k].msg_hdr;
            h.msg_name = self.addrs[i].as_ptr() as *mut libc::c_void;
            h.msg_namelen = self.addrs[i].len();
            h.msg_iov = &mut iovs[k];
            h.msg_iovlen = 1;
        }
        // SAFETY: `headers[..n]` are valid as set up above.
        let sent = unsafe {
            libc::sendmmsg(
                fd,
                headers.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }

    /// Empties the batch.
    pub fn clear(&mut self) {
        self.addrs.clear();
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
        let n = inbox.recv(rx.as_raw_fd()).unwrap();
        assert_eq!(n, 5);
        for (i, (bytes, arrival)) in inbox.iter().enumerate() {
            assert_eq!(bytes, &[i as u8; 3]);
            assert_eq!(arrival.from, Some(tx.local_addr().unwrap()));
            assert!(!arrival.truncated);
        }
        let again = inbox.recv(rx.as_raw_fd()).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn oversized_datagrams_are_marked() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[7u8; 5000], rx.local_addr().unwrap()).unwrap();
        let mut inbox = RecvBatch::default();
        assert_eq!(inbox.recv(rx.as_raw_fd()).unwrap(), 1);
        let (bytes, arrival) = inbox.iter().next().unwrap();
        assert_eq!(bytes.len(), RECV_LEN);
        assert!(arrival.truncated);
    }
}
