//! cerv's wire over a connection: TCP, or TLS with the server's
//! certificate checked against the trust roots and the source's host name.
//! One connection per sync, opened (and, for TLS, shaken hands) before the
//! first probe, so no probe ever times a handshake; closed after the sync.

use super::cerv::CervExchanger;
use super::{CallError, CallFuture, Exchanger, Probe, SourceOptions, Wire};
use crate::clock::Clock;
use crate::sync::NowExchange;
use crate::tls;
use crate::transport::client::ClientStats;
use crate::transport::stream::{EndCell, FrameError, FramedIo, MAX_FRAME, StampedTcp};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// How to open a connection to one server.
pub(super) struct StreamLink {
    addr: SocketAddr,
    host: String,
    tls: Option<tokio_rustls::TlsConnector>,
    clock: Arc<dyn Clock>,
    options: SourceOptions,
    stats: Arc<ClientStats>,
}

impl StreamLink {
    pub(super) fn new(
        wire: Wire,
        addr: SocketAddr,
        host: &str,
        clock: Arc<dyn Clock>,
        options: SourceOptions,
        stats: Arc<ClientStats>,
    ) -> io::Result<Self> {
        let tls = match wire {
            Wire::Tls => {
                let config = match &options.tls {
                    Some(config) => config.clone(),
                    None => tls::client_config(None, &[], false).map_err(io::Error::other)?,
                };
                Some(tokio_rustls::TlsConnector::from(config))
            }
            _ => None,
        };
        Ok(StreamLink {
            addr,
            host: host.to_owned(),
            tls,
            clock,
            options,
            stats,
        })
    }

    /// Connects (and shakes hands), each step within `timeout`; the error
    /// says in words what failed.
    pub(super) async fn connect(&self, timeout: Duration) -> Result<StreamExchanger, String> {
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect(self.addr)).await {
            Err(_) => return Err(format!("timed out connecting (after {timeout:?})")),
            Ok(Err(e)) => return Err(describe_connect(&e)),
            Ok(Ok(tcp)) => tcp,
        };
        let stamped = StampedTcp::new(tcp, self.options.stamping).map_err(|e| e.to_string())?;
        let stamp = stamped.stamp();
        let key = self.options.key.clone();
        match &self.tls {
            None => {
                let io = FramedIo::new(stamped, stamp);
                let ended = io.ended();
                Ok(StreamExchanger {
                    inner: CervExchanger::over(io, self.clock.clone(), key, self.stats.clone()),
                    ended,
                    wire: Wire::Tcp,
                })
            }
            Some(connector) => {
                let name = tls::server_name(&self.host)?;
                let tls =
                    match tokio::time::timeout(timeout, connector.connect(name, stamped)).await {
                        Err(_) => {
                            return Err(format!("the TLS handshake timed out (after {timeout:?})"));
                        }
                        Ok(Err(e)) => return Err(tls::describe(&e, &self.host)),
                        Ok(Ok(tls)) => tls,
                    };
                let io = FramedIo::new(tls, stamp);
                let ended = io.ended();
                Ok(StreamExchanger {
                    inner: CervExchanger::over(io, self.clock.clone(), key, self.stats.clone()),
                    ended,
                    wire: Wire::Tls,
                })
            }
        }
    }
}

/// cerv's exchanger on one connection, which explains a call that failed
/// with the connection by what ended it.
pub(super) struct StreamExchanger {
    inner: CervExchanger,
    ended: EndCell,
    wire: Wire,
}

impl StreamExchanger {
    /// A call that failed because the connection ended, said in words.
    fn explain(&self, e: CallError) -> CallError {
        let CallError::Failed(fallback) = e else {
            return e;
        };
        self.ended
            .with(|end| describe_end(end, self.wire))
            .unwrap_or(CallError::Failed(fallback))
    }
}

impl Exchanger for StreamExchanger {
    fn probe(&self, timeout: Duration) -> CallFuture<'_, Probe> {
        Box::pin(async move { self.inner.probe(timeout).await.map_err(|e| self.explain(e)) })
    }

    fn now(&self, timeout: Duration) -> CallFuture<'_, NowExchange> {
        Box::pin(async move { self.inner.now(timeout).await.map_err(|e| self.explain(e)) })
    }
}

/// What ended a connection, as the call that failed with it reports it.
fn describe_end(e: &io::Error, wire: Wire) -> CallError {
    if let Some((why, altered)) = tls::describe_session(e) {
        return if altered {
            CallError::Tampered(why)
        } else {
            CallError::Failed(why)
        };
    }
    let frame = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<FrameError>());
    CallError::Failed(match (frame, wire) {
        (Some(f), Wire::Tcp) if f.looks_like_tls() => {
            "the server answered in TLS: this is a TLS port (try tls://)".into()
        }
        (Some(FrameError::Oversized(n)), _) => format!(
            "the server announced a frame of {n} bytes (at most {MAX_FRAME}): is this a cerv server?"
        ),
        (None, _) => match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => match wire {
                Wire::Tcp => "the server closed the connection without answering (a TLS port? try tls://; or a server at its connection limit)".into(),
                _ => "the server closed the connection without answering".into(),
            },
            _ => format!("the connection failed: {e}"),
        },
    })
}

fn describe_connect(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused: nothing is listening there".into(),
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            "host or network unreachable".into()
        }
        io::ErrorKind::TimedOut => "timed out connecting".into(),
        _ => format!("cannot connect: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(prefix: [u8; 4]) -> io::Error {
        let e = FrameError::Oversized(u32::from_be_bytes(prefix));
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    fn said(e: CallError) -> String {
        match e {
            CallError::Failed(why) => why,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_tls_alert_on_a_plaintext_connection_names_the_port() {
        let alert = framing([0x15, 0x03, 0x03, 0x00]);
        assert!(said(describe_end(&alert, Wire::Tcp)).contains("this is a TLS port (try tls://)"));
        let junk = framing([0x7f, 0, 0, 0]);
        assert!(said(describe_end(&junk, Wire::Tcp)).contains("is this a cerv server?"));
    }

    #[test]
    fn a_hang_up_is_said_so() {
        for kind in [io::ErrorKind::UnexpectedEof, io::ErrorKind::ConnectionReset] {
            let tcp = said(describe_end(&kind.into(), Wire::Tcp));
            assert!(
                tcp.contains("closed the connection without answering"),
                "{tcp}"
            );
            assert!(tcp.contains("try tls://"), "{tcp}");
            let tls = said(describe_end(&kind.into(), Wire::Tls));
            assert!(!tls.contains("try tls://"), "{tls}");
        }
    }

    #[test]
    fn a_record_that_fails_its_check_is_tampering() {
        let bad_mac = io::Error::new(io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert!(matches!(
            describe_end(&bad_mac, Wire::Tls),
            CallError::Tampered(why) if why.contains("altered on the way")
        ));
        // The server saying goodbye is no tampering.
        let alert = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::InternalError),
        );
        assert!(matches!(
            describe_end(&alert, Wire::Tls),
            CallError::Failed(_)
        ));
    }
}
