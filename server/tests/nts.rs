//! NTS in process: a restarted server NAKs old cookies and the source
//! recovers with a new key exchange; rotated master keys still open recent
//! cookies; the key exchange's defences.

use lab::certs::TestCerts;
use server::{Config, Running, Server};
use service::clock::SystemClock;
use service::ntp::Kiss;
use service::source::{Source, SourceOptions, SourceSpec, SyncOptions};
use service::time::Nanos;
use service::transport::face::NtpFace;
use service::transport::tcp::TcpConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

async fn start(certs: &TestCerts, ntp: SocketAddr, ke: SocketAddr, rotation: Duration) -> Running {
    let tls = service::tls::server_config(
        &certs.good.cert,
        &certs.good.key,
        &[service::nts::ke::ALPN],
        true,
    )
    .unwrap();
    Server::spawn(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        offset: Nanos::from_millis(250),
        ntp_listen: vec![ntp],
        ntp: NtpFace {
            local_stratum: Some(1),
            ..NtpFace::default()
        },
        nts_ke_listen: vec![ke],
        nts_tls: Some(tls),
        nts_key_rotation: rotation,
        tcp: TcpConfig {
            handshake_timeout: Duration::from_millis(300),
            ..TcpConfig::default()
        },
        ..Config::default()
    })
    .await
    .expect("server")
}

async fn nts_source(certs: &TestCerts, ke: SocketAddr) -> Source {
    let spec: SourceSpec = format!("nts://localhost:{}", ke.port()).parse().unwrap();
    let options = SourceOptions {
        nts_tls: Some(
            service::tls::client_config(Some(&certs.ca), &[service::nts::ke::ALPN], true).unwrap(),
        ),
        ..SourceOptions::default()
    };
    Source::open(spec, ke, Arc::new(SystemClock), options)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_restarted_server_naks_old_cookies_and_the_source_recovers() {
    let certs = TestCerts::generate();
    let first = start(
        &certs,
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        Duration::from_secs(3600),
    )
    .await;
    let (ntp, ke) = (first.ntp_addrs[0], first.nts_ke_addrs[0]);
    let source = nts_source(&certs, ke).await;
    let report = source
        .sync(&SyncOptions::default())
        .await
        .expect("first sync");
    assert!(report.estimate.contains(Nanos::from_millis(250)));
    // The server restarts with new master keys: our cookies no longer open.
    first.stop().await;
    let second = start(&certs, ntp, ke, Duration::from_secs(3600)).await;
    // The first request gets a NAK; the source shakes hands again at
    // once, and the sync goes on.
    let report = source
        .sync(&SyncOptions::default())
        .await
        .expect("through the NAK");
    assert!(report.estimate.contains(Nanos::from_millis(250)));
    assert_eq!(second.ntp_stats(0).unwrap().nts_naks.get(), 1);
    assert_eq!(second.nts_ke_stats(0).unwrap().requests.get(), 1);
    assert!(second.ntp_stats(0).unwrap().nts_requests.get() >= 5);
    assert_eq!(source.stopped_by(), None::<Kiss>);
}

#[tokio::test]
async fn cookies_outlive_two_rotations_of_the_master_key() {
    let certs = TestCerts::generate();
    let server = start(
        &certs,
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        Duration::from_secs(1),
    )
    .await;
    let source = nts_source(&certs, server.nts_ke_addrs[0]).await;
    let fast = SyncOptions {
        probes: 2,
        ..SyncOptions::default()
    };
    // Syncs spaced past several rotations: each reply brings cookies
    // sealed under the current key, and a cookie is spent within eight
    // requests (three syncs here, under a second), so it never meets a
    // key rotated out twice: no NAK ever comes.
    for _ in 0..8 {
        source.sync(&fast).await.expect("sync");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let stats = server.ntp_stats(0).unwrap();
    assert_eq!(stats.nts_naks.get(), 0, "{stats}");
    let ke = server.nts_ke_stats(0).unwrap();
    assert_eq!(ke.requests.get(), 1, "one key exchange: {ke}");
}

#[tokio::test]
async fn a_key_exchange_that_never_finishes_its_handshake_is_cut_off() {
    let certs = TestCerts::generate();
    let server = start(
        &certs,
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        Duration::from_secs(3600),
    )
    .await;
    let ke = server.nts_ke_addrs[0];
    // Connects and says nothing.
    let mut silent = tokio::net::TcpStream::connect(ke).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await
    .expect("not cut off");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert_eq!(server.nts_ke_stats(0).unwrap().handshake_timeout.get(), 1);
    // A plaintext client on it fails its handshake, counted.
    let mut plain = tokio::net::TcpStream::connect(ke).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut plain, b"\\x00\\x00\\x00\\x30 hello, time please")
        .await
        .unwrap();
    let _ = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::io::AsyncReadExt::read(&mut plain, &mut buf),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.nts_ke_stats(0).unwrap().handshake_failed.get(), 1);
}
