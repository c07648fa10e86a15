//! cerv's wire over a connection: TCP, or TLS with the server's
//! certificate checked against the trust roots and the source's host name.
//! One connection per sync, opened (and, for TLS, shaken hands) before the
//! first probe, so no probe ever times a handshake; closed after the sync.

use super::cerv::CervExchanger;
use super::{SourceOptions, Wire};
use crate::clock::Clock;
use crate::tls;
use crate::transport::client::ClientStats;
use crate::transport::stream::{FramedIo, StampedTcp};
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
    pub(super) async fn connect(&self, timeout: Duration) -> Result<CervExchanger, String> {
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect(self.addr)).await {
            Err(_) => return Err(format!("timed out connecting (after {timeout:?})")),
            Ok(Err(e)) => return Err(describe_connect(&e)),
            Ok(Ok(tcp)) => tcp,
        };
        let stamped = StampedTcp::new(tcp, self.options.stamping).map_err(|e| e.to_string())?;
        let stamp = stamped.stamp();
        let key = self.options.key.clone();
        match &self.tls {
            None => Ok(CervExchanger::over(
                FramedIo::new(stamped, stamp),
                self.clock.clone(),
                key,
                self.stats.clone(),
            )),
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
                Ok(CervExchanger::over(
                    FramedIo::new(tls, stamp),
                    self.clock.clone(),
                    key,
                    self.stats.clone(),
                ))
            }
        }
    }
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
