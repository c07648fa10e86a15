//! Receiving with the kernel's arrival time (`SO_TIMESTAMPNS`).
//!
//! A timestamp read in user space after `recv` returns includes however long
//! the process took to wake up and get to the socket: tens of microseconds
//! on a busy machine, and not the same on both ends of an exchange, so it
//! biases the offset. The kernel stamps each datagram as it arrives; reading
//! that stamp takes the wake-up out of the measurement.

use crate::clock::Clock;
use crate::time::Timestamp;
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::task::{Context, Poll, ready};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Where timestamps of received datagrams come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stamping {
    /// The kernel's arrival time (`SO_TIMESTAMPNS`), falling back to a
    /// user-space reading for datagrams without one.
    #[default]
    Kernel,
    /// A clock reading taken as soon as `recv` returns.
    User,
}

impl std::str::FromStr for Stamping {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kernel" => Ok(Stamping::Kernel),
            "user" => Ok(Stamping::User),
            _ => Err(format!(
                "unknown timestamping '{s}': expected kernel or user"
            )),
        }
    }
}

/// One datagram read from a socket.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    /// Bytes copied into the buffer.
    pub len: usize,
    /// The sender, when the socket reports it.
    pub from: Option<SocketAddr>,
    /// The kernel's arrival time on the system clock, if stamped.
    pub kernel_time: Option<Timestamp>,
    /// The datagram was larger than the buffer.
    pub truncated: bool,
}

impl Arrival {
    /// The arrival time on `clock`: the kernel's stamp carried over to
    /// `clock` (which may be skewed from the system clock), or `clock`'s
    /// reading now when there is no stamp.
    pub fn time_on(&self, clock: &dyn Clock) -> Timestamp {
        match self.kernel_time {
            Some(t) => clock.at_system_time(t),
            None => clock.now(),
        }
    }
}

/// Asks the kernel to stamp every datagram this socket receives.
pub fn enable_timestamps(socket: &impl AsFd) -> io::Result<()> {
    setsockopt(socket, sockopt::ReceiveTimestampns, &true).map_err(io::Error::from)
}

fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

/// One `recvmsg` on a non-blocking or blocking socket.
pub fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> io::Result<Arrival> {
    // Room for one timespec control message, aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: viewing a u64 array as bytes of the same length.
    let control_bytes = unsafe {
        std::slice::from_raw_parts_mut(control.as_mut_ptr().cast::<u8>(), size_of_val(&control))
    };
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(control_bytes), MsgFlags::empty())
        .map_err(io::Error::from)?;
    let mut kernel_time = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmTimestampns(ts) = cmsg {
                let nanos = i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec());
                kernel_time = i64::try_from(nanos).ok().map(Timestamp::from_nanos);
            }
        }
    }
    Ok(Arrival {
        len: msg.bytes,
        from: msg
            .address
            .as_ref()
            .filter(|a| a.len() > 0)
            .and_then(to_std),
        kernel_time,
        truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
    })
}

/// Polls a Tokio socket for one datagram with its arrival time.
pub fn poll_recv_stamped(
    socket: &UdpSocket,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Poll<io::Result<Arrival>> {
    loop {
        ready!(socket.poll_recv_ready(cx))?;
        match socket.try_io(Interest::READABLE, || recv_stamped(socket.as_raw_fd(), buf)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return Poll::Ready(result),
        }
    }
}

/// Waits for one datagram with its arrival time.
pub async fn recv_stamped_async(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<Arrival> {
    socket
        .async_io(Interest::READABLE, || recv_stamped(socket.as_raw_fd(), buf))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{SkewedClock, SystemClock};
    use crate::time::Nanos;

    #[tokio::test]
    async fn the_kernel_stamps_arrivals() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        enable_timestamps(&rx).unwrap();
        // The kernel turns arrival stamping on system-wide from a work
        // queue, a moment after the first socket asks; until then it stamps
        // at read time.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = SystemClock.now();
        tx.send_to(b"hello", rx.local_addr().unwrap()).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut buf = [0u8; 3];
        let arrival = recv_stamped_async(&rx, &mut buf).await.unwrap();
        let after = SystemClock.now();
        assert_eq!(arrival.len, 3);
        assert!(arrival.truncated);
        assert_eq!(arrival.from, Some(tx.local_addr().unwrap()));
        let stamp = arrival.kernel_time.expect("kernel timestamp");
        assert!(before <= stamp && stamp <= after);
        // Read 20 ms later, but stamped when it arrived.
        assert!(
            after.diff_i128(stamp) >= 19_000_000,
            "{before} {stamp} {after}"
        );
        // Carried over to a skewed clock.
        let skewed = SkewedClock::new(SystemClock, Nanos::from_secs(5));
        let on_skewed = arrival.time_on(&skewed);
        assert_eq!(on_skewed.diff_i128(stamp), 5_000_000_000);
    }

    #[tokio::test]
    async fn without_the_option_there_is_no_stamp() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"x", rx.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 16];
        let arrival = recv_stamped_async(&rx, &mut buf).await.unwrap();
        assert_eq!(
            (arrival.len, arrival.truncated, arrival.kernel_time),
            (1, false, None)
        );
    }
}
