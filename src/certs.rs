//! Certificates for TLS tests and the lab, generated with `rcgen` into a
//! temporary directory: a test CA, and server certificates that are good,
//! expired, for another name, signed by another CA, or signed by an
//! impostor (a CA of the test CA's name with another key).
//!
//! ```no_run
//! let certs = lab::certs::TestCerts::generate();
//! // cerv --tls-cert certs.good.cert --tls-key certs.good.key
//! // fient tls://localhost:PORT --ca certs.ca
//! ```
//!
//! Every server certificate is for `localhost` and `127.0.0.1` (the wrong
//! one: `elsewhere.example` only), so `tls://localhost:PORT` and
//! `tls://127.0.0.1:PORT` both verify against a good one.

use crate::peers::TempDir;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};
use std::path::{Path, PathBuf};

/// A server certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct ServerCert {
    /// The certificate (`--tls-cert`).
    pub cert: PathBuf,
    /// Its private key (`--tls-key`).
    pub key: PathBuf,
}

/// The files of one generation, removed when dropped.
pub struct TestCerts {
    dir: TempDir,
    /// The CA that signed every server certificate but `other_ca` (`--ca`).
    pub ca: PathBuf,
    /// Valid now, for `localhost` and `127.0.0.1`.
    pub good: ServerCert,
    /// For the right names, but valid only during 2020.
    pub expired: ServerCert,
    /// Valid now, but for `elsewhere.example` only.
    pub wrong_name: ServerCert,
    /// Valid now, for the right names, but signed by another CA.
    pub other_ca: ServerCert,
    /// Valid now, for the right names, signed by an impostor: a CA with
    /// the same name as [`ca`](Self::ca) but another key.
    pub impostor: ServerCert,
}

/// The names a good server certificate is for.
pub const NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

impl TestCerts {
    /// Generates a CA, a second CA, and the four server certificates.
    pub fn generate() -> TestCerts {
        let dir = TempDir::new("cerv-certs");
        let new_ca = |name: &str| {
            let key = KeyPair::generate().expect("CA key");
            let params = ca_params(name);
            let cert = params.self_signed(&key).expect("self-signed CA");
            (cert, Issuer::new(params, key))
        };
        let (ca_cert, ca) = new_ca("cerv test CA");
        let (_, other) = new_ca("another test CA");
        let (_, impostor) = new_ca("cerv test CA");
        let ca_path = dir.path().join("ca.pem");
        write(&ca_path, &ca_cert.pem());

        let server = |file: &str, names: &[&str], expired: bool, issuer: &Issuer<KeyPair>| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let mut params = CertificateParams::new(names.clone()).expect("server names");
            params
                .distinguished_name
                .push(DnType::CommonName, &names[0]);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.use_authority_key_identifier_extension = true;
            if expired {
                params.not_before = date_time_ymd(2020, 1, 1);
                params.not_after = date_time_ymd(2021, 1, 1);
            }
            let key = KeyPair::generate().expect("server key");
            let cert = params.signed_by(&key, issuer).expect("sign");
            let out = ServerCert {
                cert: dir.path().join(format!("{file}.pem")),
                key: dir.path().join(format!("{file}.key")),
            };
            write(&out.cert, &cert.pem());
            write(&out.key, &key.serialize_pem());
            out
        };
        TestCerts {
            good: server("good", &NAMES, false, &ca),
            expired: server("expired", &NAMES, true, &ca),
            wrong_name: server("wrong-name", &["elsewhere.example"], false, &ca),
            other_ca: server("other-ca", &NAMES, false, &other),
            impostor: server("impostor", &NAMES, false, &impostor),
            ca: ca_path,
            dir,
        }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_loads_as_tls_wants_it() {
        let certs = TestCerts::generate();
        service::tls::client_config(Some(&certs.ca), &[], false).expect("CA");
        for c in [
            &certs.good,
            &certs.expired,
            &certs.wrong_name,
            &certs.other_ca,
        ] {
            service::tls::server_config(&c.cert, &c.key, &[], false).expect("server cert");
        }
    }
}
