//! `nts://host[:port]`: NTP protected by NTS (RFC 8915). The source first
//! runs the key exchange (TLS 1.3, ALPN `ntske/1`, the server's
//! certificate checked against the trust roots and the source's host
//! name) on the given port (4460 by default): it brings keys exported from
//! the TLS session and eight cookies. Then it speaks NTS-protected NTP to
//! the server and port the exchange names (the same host and 123 by
//! default), spending a cookie per request and keeping the fresh ones each
//! reply brings, across syncs. The key exchange runs again before a sync
//! when there is no session, its cookies are spent, or the server sent a
//! NAK: never inside a probe.

use super::ntp::{NtpExchanger, NtsSession};
use super::{Exchanger, SourceOptions};
use crate::clock::Clock;
use crate::nts::{Aead, KeResponse, ke};
use crate::tls;
use crate::transport::client::ClientStats;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What an `nts://` source keeps: how to shake hands, and the session.
pub(super) struct NtsLink {
    ke: SocketAddr,
    host: String,
    tls: tokio_rustls::TlsConnector,
    clock: Arc<dyn Clock>,
    options: SourceOptions,
    stats: Arc<ClientStats>,
    session: tokio::sync::Mutex<Option<(Arc<NtpExchanger>, Arc<NtsSession>)>>,
}

/// The AEAD algorithms offered, in order of preference.
const OFFERED: [Aead; 1] = [Aead::AesSivCmac256];

impl NtsLink {
    pub(super) fn new(
        ke: SocketAddr,
        host: &str,
        clock: Arc<dyn Clock>,
        options: SourceOptions,
        stats: Arc<ClientStats>,
    ) -> io::Result<Self> {
        let config = match &options.nts_tls {
            Some(c) => c.clone(),
            None => tls::client_config(None, &[ke::ALPN], true).map_err(io::Error::other)?,
        };
        Ok(NtsLink {
            ke,
            host: host.to_owned(),
            tls: tokio_rustls::TlsConnector::from(config),
            clock,
            options,
            stats,
            session: tokio::sync::Mutex::new(None),
        })
    }

    /// The exchanger of a live session, shaking hands first if there is
    /// none; the error says in words what failed.
    pub(super) async fn prepare(&self, timeout: Duration) -> Result<Arc<dyn Exchanger>, String> {
        let mut session = self.session.lock().await;
        if let Some((exchanger, s)) = &*session
            && s.usable()
        {
            return Ok(exchanger.clone());
        }
        *session = None;
        let (response, c2s, s2c) = key_exchange(self.ke, &self.host, &self.tls, timeout).await?;
        let ntp = self.ntp_address(&response).await?;
        let fresh = Arc::new(NtsSession::new(c2s, s2c, response.cookies));
        let exchanger = Arc::new(
            NtpExchanger::open(
                ntp,
                self.clock.clone(),
                &self.options,
                self.stats.clone(),
                Some(fresh.clone()),
            )
            .await
            .map_err(|e| format!("cannot open a socket toward {ntp}: {e}"))?,
        );
        *session = Some((exchanger.clone(), fresh));
        Ok(exchanger)
    }

    /// Where NTP goes: the server and port the exchange named, or this
    /// host and port 123.
    async fn ntp_address(&self, response: &KeResponse) -> Result<SocketAddr, String> {
        let port = response.port.unwrap_or(123);
        match &response.server {
            None => Ok(SocketAddr::new(self.ke.ip(), port)),
            Some(host) => {
                let spec = super::SourceSpec {
                    wire: super::Wire::Ntp,
                    host: host.clone(),
                    port,
                    pool: false,
                };
                spec.resolve().await.map_err(|e| e.to_string())
            }
        }
    }
}

/// NTS-KE with the server at `ke` known as `host` (the name its
/// certificate must carry), each step within `timeout`: the response (the
/// AEAD, the cookies, where to send NTP) and the keys exported from the TLS
/// session, client to server then server to client. The error says in
/// words what failed. The `nts://` source runs it before its first sync;
/// `cerv-bench` runs it to load cerv with NTS requests.
pub async fn key_exchange(
    ke: SocketAddr,
    host: &str,
    tls: &tokio_rustls::TlsConnector,
    timeout: Duration,
) -> Result<(KeResponse, crate::nts::Key, crate::nts::Key), String> {
    let within = |what: &'static str| move |_| format!("{what} timed out (after {timeout:?})");
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(ke))
        .await
        .map_err(within("connecting to the key exchange"))?
        .map_err(|e| match e.kind() {
            io::ErrorKind::ConnectionRefused => {
                "key exchange: connection refused: nothing is listening there".to_string()
            }
            _ => format!("key exchange: cannot connect: {e}"),
        })?;
    let _ = tcp.set_nodelay(true);
    let name = tls::server_name(host)?;
    let mut stream = tokio::time::timeout(timeout, tls.connect(name, tcp))
        .await
        .map_err(within("the key exchange's TLS handshake"))?
        .map_err(|e| format!("key exchange: {}", tls::describe(&e, host)))?;
    if stream.get_ref().1.alpn_protocol() != Some(ke::ALPN) {
        return Err("key exchange: the server does not speak NTS-KE (ALPN ntske/1)".into());
    }
    let exchange = async {
        stream.write_all(&ke::write_request(&OFFERED)).await?;
        stream.flush().await?;
        let mut decoder = ke::Decoder::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection before its answer was complete",
                ));
            }
            match decoder.feed(&buf[..n]) {
                Ok(ke::Decoded::NeedMore) => {}
                Ok(ke::Decoded::Complete(message)) => return Ok(message),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
    };
    let message = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(within("the key exchange"))?
        .map_err(|e| format!("key exchange: {e}"))?;
    let response =
        ke::parse_response(&message, &OFFERED).map_err(|e| format!("key exchange: {e}"))?;
    let conn = &stream.get_ref().1;
    let keys = ke::export_keys(response.aead, |out, label, context| {
        conn.export_keying_material(out, label, Some(context))
            .map(|_| ())
    })
    .map_err(|e| format!("key exchange: cannot export the keys: {e}"))?;
    let _ = stream.shutdown().await;
    Ok((response, keys.c2s, keys.s2c))
}
