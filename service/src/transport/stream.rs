//! cerv's wire over a byte stream (TCP, or TLS over TCP): each message of
//! [`crate::wire`] in a frame of its own.
//!
//! ```text
//! | length: u32, big-endian | message (as one UDP datagram would carry it) |
//! ```
//!
//! The frame is what tokio-util's `LengthDelimitedCodec` reads by default;
//! frames longer than [`MAX_FRAME`] end the connection (a peer that sends
//! a huge length prefix gets nothing buffered for it). The message inside
//! is decoded and validated exactly as a datagram is, deadline clamp
//! included.
//!
//! **Timestamps.** [`StampedTcp`] reads with `recvmsg` and keeps the
//! kernel's arrival stamp of the last read (`SO_TIMESTAMPNS` works for TCP
//! too): the arrival of the latest segment delivered. A frame's stamp is
//! that of the read that completed it, which can only be later than its
//! true arrival, never earlier, so it only ever widens a bound. Under TLS
//! the same stamp is taken from the TCP socket beneath the decryption.

use super::client::{ClientOptions, ClientTransport, MessageIo};
use super::socket::{Arrival, Stamping, enable_timestamps, recv_stamped};
use crate::clock::{Clock, SystemClock};
use crate::time::Timestamp;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// The longest message a frame may carry: the largest datagram.
pub const MAX_FRAME: usize = crate::wire::MAX_DATAGRAM;
/// Bytes of the length prefix.
pub const PREFIX: usize = 4;

/// Why a stream's bytes are not frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME`].
    #[error("frame of {0} bytes announced (at most {MAX_FRAME})")]
    Oversized(u32),
}

/// Splits a byte stream into frames: feed it what was read, take whole
/// frames out. Pure, and bounded: it never holds more than one frame and
/// its prefix.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
}

impl Default for Framer {
    fn default() -> Self {
        Framer {
            buf: Vec::with_capacity(PREFIX + MAX_FRAME),
        }
    }
}

impl Framer {
    /// How many bytes to read next: what the frame under way still lacks
    /// (so that no byte of the next frame is read before this one is
    /// taken, and a frame's stamp is that of its own last read).
    pub fn wanted(&self) -> usize {
        if self.buf.len() < PREFIX {
            return PREFIX - self.buf.len();
        }
        (PREFIX + self.announced().min(MAX_FRAME)).saturating_sub(self.buf.len())
    }

    fn announced(&self) -> usize {
        u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize
    }

    /// Takes bytes read (at most [`Framer::wanted`] of them). Returns the
    /// frame they complete, if they do.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<Vec<u8>>, FrameError> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() < PREFIX {
            return Ok(None);
        }
        let len = self.announced();
        if len > MAX_FRAME {
            return Err(FrameError::Oversized(len as u32));
        }
        if self.buf.len() < PREFIX + len {
            return Ok(None);
        }
        let frame = self.buf[PREFIX..PREFIX + len].to_vec();
        self.buf.drain(..PREFIX + len);
        Ok(Some(frame))
    }

    /// True when no frame is under way.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

impl FrameError {
    /// Whether the "length prefix" is in fact the header of a TLS record
    /// (an alert or a handshake, TLS 1.0 to 1.3): a TLS peer answering a
    /// plaintext one.
    pub fn looks_like_tls(&self) -> bool {
        let FrameError::Oversized(prefix) = *self;
        let [kind, major, minor, _] = prefix.to_be_bytes();
        (0x14..=0x17).contains(&kind) && major == 3 && minor <= 4
    }
}

/// Writes `message` as a frame into `out`; returns its length.
pub fn frame(message: &[u8], out: &mut Vec<u8>) -> usize {
    out.clear();
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.len()
}

/// The kernel's arrival stamp of the last read on a stream, shared between
/// the stream (which sets it) and whoever decodes the frames (which reads
/// it, possibly through a TLS layer in between). Zero when none.
#[derive(Clone, Debug, Default)]
pub struct StampCell(Arc<AtomicI64>);

impl StampCell {
    fn set(&self, t: Option<Timestamp>) {
        self.0
            .store(t.map_or(0, Timestamp::as_nanos), Ordering::Relaxed);
    }

    /// The stamp of the last read, if the kernel gave one.
    pub fn get(&self) -> Option<Timestamp> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Timestamp::from_nanos(n)),
        }
    }
}

/// Why a connection ended: the first error its reads or writes met (the
/// end of the stream included), kept for whoever explains the calls that
/// failed because of it (the transport above only sees the connection
/// close).
#[derive(Clone, Debug, Default)]
pub struct EndCell(Arc<Mutex<Option<io::Error>>>);

impl EndCell {
    /// Keeps `e` if it is the first; returns a stand-in of the same kind
    /// and message for the caller.
    fn record(&self, e: io::Error) -> io::Error {
        let copy = io::Error::new(e.kind(), e.to_string());
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        copy
    }

    /// Applies `f` to the error that ended the connection, if one did.
    pub fn with<T>(&self, f: impl FnOnce(&io::Error) -> T) -> Option<T> {
        let slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().map(f)
    }
}

/// A TCP stream that reads with `recvmsg`, keeping the kernel's arrival
/// stamp of each read in a [`StampCell`]. `TCP_NODELAY` is set: a probe
/// must leave at once, not wait for more bytes to join it.
#[derive(Debug)]
pub struct StampedTcp {
    inner: TcpStream,
    stamp: StampCell,
}

impl StampedTcp {
    /// Wraps a connected stream, asking the kernel to stamp arrivals
    /// unless `stamping` says otherwise.
    pub fn new(inner: TcpStream, stamping: Stamping) -> io::Result<Self> {
        inner.set_nodelay(true)?;
        if stamping == Stamping::Kernel
            && let Err(e) = enable_timestamps(&inner)
        {
            tracing::debug!(error = %e, "kernel receive timestamps unavailable on TCP");
        }
        Ok(StampedTcp {
            inner,
            stamp: StampCell::default(),
        })
    }

    /// The cell holding the last read's stamp.
    pub fn stamp(&self) -> StampCell {
        self.stamp.clone()
    }

    /// The stream beneath.
    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }
}

impl AsyncRead for StampedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let fd = this.inner.as_raw_fd();
            let unfilled = buf.initialize_unfilled();
            match this
                .inner
                .try_io(Interest::READABLE, || recv_stamped(fd, unfilled))
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
                Ok(arrival) => {
                    if arrival.len > 0 {
                        this.stamp.set(arrival.kernel_time);
                    }
                    buf.advance(arrival.len);
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl AsyncWrite for StampedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Messages as frames of a stream: the client side's [`MessageIo`] for
/// TCP and TLS.
pub struct FramedIo<S> {
    stream: S,
    stamp: StampCell,
    ended: EndCell,
    framer: Framer,
    /// The frame being written, and how much of it is out.
    out: Vec<u8>,
    written: usize,
    read_buf: Box<[u8; PREFIX + MAX_FRAME]>,
}

impl<S> FramedIo<S> {
    /// Frames over `stream`, whose arrival stamps land in `stamp`.
    pub fn new(stream: S, stamp: StampCell) -> Self {
        FramedIo {
            stream,
            stamp,
            ended: EndCell::default(),
            framer: Framer::default(),
            out: Vec::with_capacity(PREFIX + MAX_FRAME),
            written: 0,
            read_buf: Box::new([0; PREFIX + MAX_FRAME]),
        }
    }

    /// Where the error that ends the connection will be kept.
    pub fn ended(&self) -> EndCell {
        self.ended.clone()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MessageIo for FramedIo<S> {
    fn poll_send(&mut self, cx: &mut Context<'_>, message: &[u8]) -> Poll<io::Result<()>> {
        self.send(cx, message).map_err(|e| self.ended.record(e))
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<Arrival>> {
        self.recv(cx, buf).map_err(|e| self.ended.record(e))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FramedIo<S> {
    fn send(&mut self, cx: &mut Context<'_>, message: &[u8]) -> Poll<io::Result<()>> {
        if self.written == 0 {
            frame(message, &mut self.out);
        }
        while self.written < self.out.len() {
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                self.written = 0;
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        // A probe must leave now (TLS buffers until flushed).
        ready!(Pin::new(&mut self.stream).poll_flush(cx))?;
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    fn recv(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<Arrival>> {
        loop {
            let want = self.framer.wanted();
            let mut read = ReadBuf::new(&mut self.read_buf[..want]);
            ready!(Pin::new(&mut self.stream).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            let framed = self
                .framer
                .push(&self.read_buf[..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if let Some(message) = framed {
                let len = message.len().min(buf.len());
                buf[..len].copy_from_slice(&message[..len]);
                return Poll::Ready(Ok(Arrival {
                    len,
                    from: None,
                    kernel_time: self.stamp.get(),
                    truncated: message.len() > buf.len(),
                }));
            }
        }
    }
}

/// A plain tarpc transport to a cerv TCP listener: what any tarpc program
/// needs to call the service over TCP.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use service::transport::client::client_config;
/// use service::{TimeServiceClient, Timestamp};
///
/// let transport = service::transport::stream::connect_tcp("127.0.0.1:8081".parse()?).await?;
/// let rpc = TimeServiceClient::new(client_config(), transport).spawn();
/// let reply = rpc.probe(tarpc::context::current(), Timestamp::EPOCH).await?;
/// # Ok(())
/// # }
/// ```
pub async fn connect_tcp(
    server: std::net::SocketAddr,
) -> io::Result<ClientTransport<FramedIo<StampedTcp>>> {
    let stream = StampedTcp::new(TcpStream::connect(server).await?, Stamping::Kernel)?;
    let stamp = stream.stamp();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    Ok(ClientTransport::over(
        FramedIo::new(stream, stamp),
        clock,
        ClientOptions::default(),
    ))
}

/// Like [`connect_tcp`], inside TLS: the server's certificate is checked
/// against `config`'s roots (see [`crate::tls::client_config`]) and
/// `host`.
pub async fn connect_tls(
    server: std::net::SocketAddr,
    host: &str,
    config: Arc<rustls::ClientConfig>,
) -> io::Result<ClientTransport<FramedIo<tokio_rustls::client::TlsStream<StampedTcp>>>> {
    let stream = StampedTcp::new(TcpStream::connect(server).await?, Stamping::Kernel)?;
    let stamp = stream.stamp();
    let name = crate::tls::server_name(host)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    Ok(ClientTransport::over(
        FramedIo::new(tls, stamp),
        clock,
        ClientOptions::default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_come_out_whole_whatever_the_reads() {
        let mut stream = Vec::new();
        let mut out = Vec::new();
        for m in [&b"hello"[..], &[], &[7u8; MAX_FRAME]] {
            frame(m, &mut out);
            stream.extend_from_slice(&out);
        }
        let mut framer = Framer::default();
        let mut got = Vec::new();
        let mut rest = &stream[..];
        while !rest.is_empty() {
            // One byte at a time where it can, never more than wanted.
            let n = framer.wanted().min(rest.len()).min(3);
            if let Some(f) = framer.push(&rest[..n]).unwrap() {
                got.push(f);
            }
            rest = &rest[n..];
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], b"hello");
        assert!(got[1].is_empty());
        assert_eq!(got[2].len(), MAX_FRAME);
        assert!(framer.is_empty());
    }

    #[test]
    fn a_huge_length_prefix_is_refused_at_once() {
        let mut framer = Framer::default();
        assert_eq!(
            framer.push(&[0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::Oversized(u32::MAX))
        );
        let mut framer = Framer::default();
        let just_over = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(framer.push(&just_over).is_err());
    }

    #[test]
    fn a_tls_record_header_is_told_from_a_long_frame() {
        // A TLS 1.2 record carrying an alert, as rustls answers garbage.
        let alert = FrameError::Oversized(u32::from_be_bytes([0x15, 0x03, 0x03, 0x00]));
        assert!(alert.looks_like_tls());
        // A ClientHello record (TLS 1.0 in the record layer).
        let hello = FrameError::Oversized(u32::from_be_bytes([0x16, 0x03, 0x01, 0x02]));
        assert!(hello.looks_like_tls());
        assert!(!FrameError::Oversized(u32::MAX).looks_like_tls());
        assert!(!FrameError::Oversized(MAX_FRAME as u32 + 1).looks_like_tls());
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic_and_never_buffer_past_a_frame(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..64),
        ) {
            let mut framer = Framer::default();
            for chunk in chunks {
                let n = framer.wanted().min(chunk.len());
                match framer.push(&chunk[..n]) {
                    Err(_) => break,
                    Ok(_) => prop_assert!(framer.buf.len() <= PREFIX + MAX_FRAME),
                }
            }
        }
    }
}
