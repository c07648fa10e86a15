//! TLS for cerv and fient: rustls (with the `ring` provider, no OpenSSL),
//! certificates and keys from PEM files, trust roots from a CA file or
//! the system's store, and every handshake failure in one line a person
//! can act on.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use std::io;
use std::path::Path;
use std::sync::Arc;

pub use rustls::{ClientConfig as TlsClientConfig, ServerConfig as TlsServerConfig};

/// A certificate, key or trust file that cannot be used; the message names
/// the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read or holds no PEM item of the kind wanted.
    #[error("cannot use {what} '{path}': {reason}")]
    File {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration (a key that does not match the
    /// certificate, say).
    #[error("cannot set up TLS: {0}")]
    Config(String),
}

fn file_error(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        what,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file (the server's first, then its
/// chain).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error("certificate file", path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error("certificate file", path, e))?;
    if certs.is_empty() {
        return Err(file_error("certificate file", path, "no CERTIFICATE in it"));
    }
    Ok(certs)
}

/// Reads the private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error("key file", path, e))
}

/// A server configuration from a certificate chain and key in PEM files,
/// offering `alpn` (empty: none). `tls13_only` for NTS-KE, which RFC 8915
/// allows only over TLS 1.3.
pub fn server_config(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
    tls13_only: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_from(CertStore::load(cert, key)?, alpn, tls13_only)
}

/// A server configuration whose certificate comes from `store`: replaced
/// there (on SIGHUP), it is what the next handshake presents.
pub fn server_config_from(
    store: Arc<CertStore>,
    alpn: &[&[u8]],
    tls13_only: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider());
    let builder = if tls13_only {
        builder.with_protocol_versions(&[&rustls::version::TLS13])
    } else {
        builder.with_safe_default_protocol_versions()
    }
    .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = builder.with_no_client_auth().with_cert_resolver(store);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The server's certificate and key, replaceable while serving: after
/// [`reload`](CertStore::reload) new handshakes present the new pair,
/// while connections already open keep theirs.
#[derive(Debug)]
pub struct CertStore {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl CertStore {
    /// Reads the pair, checking that the key fits the certificate.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertStore>, TlsError> {
        Ok(Arc::new(CertStore {
            current: std::sync::RwLock::new(Arc::new(certified(cert, key)?)),
            cert: cert.to_owned(),
            key: key.to_owned(),
        }))
    }

    /// Reads the files again; on any error the pair in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = Arc::new(certified(&self.cert, &self.key)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }
}

impl rustls::server::ResolvesServerCert for CertStore {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

fn certified(cert: &Path, key: &Path) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    rustls::sign::CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| TlsError::Config(format!("the key does not fit the certificate: {e}")))
}

/// The trust roots: the certificates of `ca` (PEM), or the system's store
/// when `None`.
pub fn roots(ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in load_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| file_error("CA file", path, e))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A broken certificate in the system store is skipped.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(TlsError::Config(
                    "the system has no trust roots; give the CA with --ca".into(),
                ));
            }
        }
    }
    Ok(roots)
}

/// A client configuration trusting `ca` (or the system's roots), offering
/// `alpn`; TLS 1.3 only when `tls13_only`.
pub fn client_config(
    ca: Option<&Path>,
    alpn: &[&[u8]],
    tls13_only: bool,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider());
    let builder = if tls13_only {
        builder.with_protocol_versions(&[&rustls::version::TLS13])
    } else {
        builder.with_safe_default_protocol_versions()
    }
    .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = builder
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The name a client checks the server's certificate against: a DNS name
/// or an IP address, as written in the source.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("'{host}' is not a valid TLS server name"))
}

/// A certificate time (`notAfter`, say), as RFC 3339.
fn cert_time(t: rustls::pki_types::UnixTime) -> String {
    let secs = i64::try_from(t.as_secs()).unwrap_or(i64::MAX);
    jiff::Timestamp::from_second(secs)
        .map_or_else(|_| format!("{secs} s after 1970"), |t| t.to_string())
}

/// The names a certificate was presented for, quoted: `'a', 'b'`.
/// webpki writes them as `DnsName("a")` and `IpAddress(192.0.2.1)`.
fn quoted(names: &[String]) -> String {
    let plain = |n: &str| -> String {
        for (prefix, suffix) in [("DnsName(\"", "\")"), ("IpAddress(", ")")] {
            if let Some(inner) = n.strip_prefix(prefix).and_then(|r| r.strip_suffix(suffix)) {
                return inner.to_string();
            }
        }
        n.to_string()
    };
    let quoted: Vec<String> = names.iter().map(|n| format!("'{}'", plain(n))).collect();
    quoted.join(", ")
}

/// What went wrong in a client's handshake, in words a person can act on.
pub fn describe(e: &io::Error, host: &str) -> String {
    let Some(err) = rustls_error(e) else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => {
                "the server closed the connection during the TLS handshake: not a TLS port (try tcp://), or a server at its connection limit"
                    .into()
            }
            _ => e.to_string(),
        };
    };
    use rustls::Error as E;
    match err {
        E::InvalidCertificate(cert) => match cert {
            CertificateError::ExpiredContext { not_after, .. } => format!(
                "the server's certificate expired at {} (or this machine's clock is far ahead)",
                cert_time(*not_after)
            ),
            CertificateError::Expired => {
                "the server's certificate has expired (or this machine's clock is far ahead)".into()
            }
            CertificateError::NotValidYetContext { not_before, .. } => format!(
                "the server's certificate is not valid before {} (or this machine's clock is far behind)",
                cert_time(*not_before)
            ),
            CertificateError::NotValidYet => {
                "the server's certificate is not valid yet (or this machine's clock is far behind)"
                    .into()
            }
            CertificateError::NotValidForNameContext { presented, .. } if !presented.is_empty() => {
                format!(
                    "the server's certificate is for {}, not '{host}'",
                    quoted(presented)
                )
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the server's certificate is not valid for the name '{host}'")
            }
            CertificateError::UnknownIssuer => {
                "the server's certificate is signed by an unknown issuer (give its CA with --ca)"
                    .into()
            }
            // The issuer named in the certificate is a trusted CA, but its
            // key did not sign it (or cannot: another key type): a CA of
            // the same name, not the one that signed it.
            CertificateError::BadSignature
            | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
                "the server's certificate is not signed by the trusted CA of its issuer's name (another key; give its CA with --ca)"
                    .into()
            }
            CertificateError::Revoked => "the server's certificate has been revoked".into(),
            other => format!("the server's certificate was refused: {other}"),
        },
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            "the server does not speak TLS here (a plaintext port?), or the bytes were altered on the way"
                .into()
        }
        E::DecryptError | E::PeerMisbehaved(_) => {
            "the handshake failed its integrity check: the bytes were altered on the way".into()
        }
        E::AlertReceived(alert) => format!("the server refused the handshake ({alert:?})"),
        E::NoApplicationProtocol => {
            "the server does not offer the protocol asked for (ALPN)".into()
        }
        other => format!("TLS failed: {other}"),
    }
}

/// The rustls error inside an I/O error from tokio-rustls, if it is one.
fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// What ended an established TLS session, in words, and whether it shows
/// that the bytes were altered on the way (a record that fails its
/// integrity check, or one the protocol does not allow): then nothing
/// from the session should be trusted. `None` if `e` is no TLS error.
pub fn describe_session(e: &io::Error) -> Option<(String, bool)> {
    use rustls::Error as E;
    Some(match rustls_error(e)? {
        E::DecryptError => (
            "a TLS record failed its integrity check: the bytes were altered on the way".into(),
            true,
        ),
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. }
        | E::PeerMisbehaved(_) => (
            "the server's TLS records are malformed: the bytes were altered on the way".into(),
            true,
        ),
        E::AlertReceived(alert) => (
            format!("the server ended the TLS session ({alert:?})"),
            false,
        ),
        other => (format!("the TLS session failed: {other}"), false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presented_names_are_shown_as_written() {
        let names = [
            "DnsName(\"elsewhere.example\")".to_string(),
            "IpAddress(192.0.2.1)".to_string(),
            "UniformResourceIdentifier(\"https://example.com\")".to_string(),
        ];
        assert_eq!(
            quoted(&names),
            "'elsewhere.example', '192.0.2.1', 'UniformResourceIdentifier(\"https://example.com\")'"
        );
    }

    #[test]
    fn certificate_times_are_rfc3339() {
        let t = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            1_609_459_200,
        ));
        assert_eq!(cert_time(t), "2021-01-01T00:00:00Z");
    }

    fn self_signed(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn a_reload_swaps_the_pair_and_a_bad_one_keeps_the_old() {
        use rustls::server::ResolvesServerCert as _;
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = self_signed(dir.path(), "a.example");
        let (cert_b, key_b) = self_signed(dir.path(), "b.example");
        let e = CertStore::load(&cert_a, &key_b).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        let store = CertStore::load(&cert_a, &key_a).unwrap();
        let current = |s: &CertStore| s.current.read().unwrap().cert[0].clone();
        let first = current(&store);
        // A half-written renewal: the old pair stays.
        std::fs::write(&cert_a, "-----BEGIN CERTIFICATE-----\ngarbage").unwrap();
        assert!(store.reload().is_err());
        assert_eq!(current(&store), first);
        // The renewal in place: the new pair.
        std::fs::copy(&cert_b, &cert_a).unwrap();
        std::fs::copy(&key_b, &key_a).unwrap();
        store.reload().unwrap();
        assert_ne!(current(&store), first);
        assert_eq!(current(&store), load_certs(&cert_b).unwrap()[0]);
        let _ = store.only_raw_public_keys();
    }
}
