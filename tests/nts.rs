//! NTS end to end: chrony uses cerv over NTS, fient uses chrony over NTS,
//! and a man in the middle cannot move fient's time (without NTS, the same
//! attacker does). chronyd runs only with -x (it never touches the clock).

use lab::certs::TestCerts;
use lab::peers::{Chronyd, Peer, faketime_env, free_udp_port};
use lab::{Cerv, fient, json};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const MS: i64 = 1_000_000;

/// cerv serving NTS (and plain NTP) with the good test certificate.
fn cerv_nts(certs: &TestCerts, offset: &str) -> Cerv {
    Cerv::start_nts(certs, &["--offset", offset])
}

#[test]
fn fient_speaks_nts_to_cerv() {
    let certs = TestCerts::generate();
    let cerv = cerv_nts(&certs, "+250ms");
    let ca = certs.ca.display().to_string();
    let out = fient(&[&cerv.nts_target(), "--ca", &ca, "--json"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let doc = json(&out.stdout);
    assert_eq!(doc["protocol"], "nts");
    let (offset, bound) = (
        doc["offset_ns"].as_i64().unwrap(),
        doc["error_bound_ns"].as_i64().unwrap(),
    );
    assert!((offset - 250 * MS).abs() <= bound, "{doc}");
    // Without the CA: the certificate is refused, in words, exit 1.
    let out = fient(&[&cerv.nts_target()]);
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("key exchange") && out.stderr.contains("--ca"),
        "{}",
        out.stderr
    );
    // A watch spends and refills its cookies: one key exchange for all.
    let out = fient(&[
        &cerv.nts_target(),
        "--ca",
        &ca,
        "--watch",
        "50ms",
        "--count",
        "12",
        "--json",
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(
        out.stdout
            .lines()
            .filter(|l| l.contains(r#""status":"synced""#))
            .count(),
        12
    );
    let (_, log) = cerv.stop();
    let ke = log
        .lines()
        .find(|l| l.contains("wire=\"nts-ke\"") && l.contains("server stopped"))
        .unwrap_or_else(|| panic!("no nts-ke counters in {log}"));
    // Three key exchanges: the first run, the refused one never got past
    // its handshake, the watch's one.
    assert!(ke.contains("requests 2,"), "{ke}");
    assert!(log.contains("nts naks 0"), "{log}");
}

#[test]
fn chronyd_uses_cerv_over_nts() {
    let (Some(chronyd), Some(chronyc)) = (
        Peer::Chronyd.require("chronyd_uses_cerv_over_nts"),
        Peer::Chronyc.require("chronyd_uses_cerv_over_nts"),
    ) else {
        return;
    };
    let certs = TestCerts::generate();
    let cerv = cerv_nts(&certs, "+250ms");
    let ntp = cerv.ntp_addrs[0];
    let ke = cerv.stream_addr(service::source::Wire::Nts);
    let conf = format!(
        "server localhost port {} nts ntsport {} iburst minpoll -4 maxpoll -4\nntstrustedcerts {}\nport 0\n",
        ntp.port(),
        ke.port(),
        certs.ca.display()
    );
    let daemon = Chronyd::start(&chronyd, Some(chronyc), &conf, &[]);
    let (selected, sources) = daemon.wait_for(&["-c", "sources"], Duration::from_secs(30), |out| {
        out.lines().any(|l| l.split(',').nth(1) == Some("*"))
    });
    eprintln!("chronyc sources: {sources}\nchronyd log: {}", daemon.log());
    assert!(selected, "chronyd did not select cerv over NTS: {sources}");
    // `chronyc -c authdata`: name, mode, key id, type, key length, last,
    // attempts, naks, cookies, cookie length.
    let auth = daemon.chronyc(&["-c", "authdata"]);
    eprintln!("chronyc authdata: {}", auth.stdout);
    let fields: Vec<&str> = auth.stdout.trim().split(',').collect();
    assert_eq!(fields.get(1), Some(&"NTS"), "{}", auth.stdout);
    assert_eq!(
        fields.get(3),
        Some(&"15"),
        "AEAD_AES_SIV_CMAC_256: {}",
        auth.stdout
    );
    assert_eq!(fields.get(7), Some(&"0"), "NAKs: {}", auth.stdout);
    assert!(
        fields
            .get(8)
            .and_then(|c| c.parse::<u32>().ok())
            .unwrap_or(0)
            > 0,
        "{}",
        auth.stdout
    );
    // And the time is cerv's: chronyd's clock is 0.25 s slow of it.
    let tracking = daemon.chronyc(&["-c", "tracking"]);
    let system_time: f64 = tracking
        .stdout
        .trim()
        .split(',')
        .nth(4)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{}", tracking.stdout));
    assert!(
        (system_time.abs() - 0.25).abs() < 0.001,
        "{}",
        tracking.stdout
    );
}

#[test]
fn fient_uses_a_chronyd_nts_server() {
    let (Some(chronyd), Some(faketime)) = (
        Peer::Chronyd.require("fient_uses_a_chronyd_nts_server"),
        Peer::Faketime.require("fient_uses_a_chronyd_nts_server"),
    ) else {
        return;
    };
    let certs = TestCerts::generate();
    let port = free_udp_port("127.0.0.1");
    let ke = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let conf = format!(
        "port {port}\nbindaddress 127.0.0.1\nallow 127.0.0.1\nlocal stratum 1\nacquisitionport 0\nntsserverkey {}\nntsservercert {}\nntsport {ke}\n",
        certs.good.key.display(),
        certs.good.cert.display(),
    );
    let daemon = Chronyd::start(&chronyd, None, &conf, &faketime_env(&faketime, "+1.5"));
    let target = format!("nts://localhost:{ke}");
    let ca = certs.ca.display().to_string();
    let mut out = fient(&[&target, "--ca", &ca, "--json"]);
    let started = Instant::now();
    while out.code() != Some(0) && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(250));
        out = fient(&[&target, "--ca", &ca, "--json"]);
    }
    assert_eq!(
        out.code(),
        Some(0),
        "fient: {}\nchronyd: {}",
        out.stderr,
        daemon.log()
    );
    eprintln!("fient vs chronyd over NTS: {}", out.stdout.trim());
    let doc = json(&out.stdout);
    assert_eq!(doc["protocol"], "nts");
    let (offset, bound) = (
        doc["offset_ns"].as_i64().unwrap(),
        doc["error_bound_ns"].as_i64().unwrap(),
    );
    assert!((offset - 1_500 * MS).abs() <= bound, "{doc}");
    assert!(bound < MS, "{doc}");
}

/// What the man in the middle does to each reply, besides passing it on.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Attack {
    /// A copy with both timestamps a second later, sent first.
    Forge,
    /// The first reply it saw, its origin set to the new request's, sent
    /// first.
    Replay,
    /// The genuine reply with one byte of its NTS fields (or, without
    /// NTS, of its transmit timestamp) flipped, sent first.
    Alter,
}

/// A UDP proxy toward `server` that sends, ahead of every genuine reply,
/// the attack's version of it.
fn man_in_the_middle(server: SocketAddr, attack: Attack) -> (SocketAddr, Arc<AtomicBool>) {
    let front = UdpSocket::bind("127.0.0.1:0").unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").unwrap();
    back.connect(server).unwrap();
    front
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    back.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let addr = front.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut first: Option<Vec<u8>> = None;
        let started = Instant::now();
        while !stopped.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
            let Ok((n, client)) = front.recv_from(&mut buf) else {
                continue;
            };
            let origin: [u8; 8] = buf[40..48].try_into().unwrap();
            let _ = back.send(&buf[..n]);
            let Ok(m) = back.recv(&mut buf) else {
                continue;
            };
            let genuine = buf[..m].to_vec();
            let mut fake = genuine.clone();
            match attack {
                Attack::Forge => {
                    for at in [32, 40] {
                        let secs = u32::from_be_bytes(fake[at..at + 4].try_into().unwrap());
                        fake[at..at + 4].copy_from_slice(&secs.wrapping_add(1).to_be_bytes());
                    }
                }
                Attack::Replay => {
                    let old = first.get_or_insert_with(|| genuine.clone());
                    fake = old.clone();
                    fake[24..32].copy_from_slice(&origin);
                }
                Attack::Alter => {
                    let at = if m > 48 { m - 20 } else { 43 };
                    fake[at] ^= 0x40;
                }
            }
            let _ = front.send_to(&fake, client);
            let _ = front.send_to(&genuine, client);
        }
    });
    (addr, stop)
}

/// cerv with NTS, its NTP on `ntp`, telling clients to use NTP port
/// `announced` (where the man in the middle waits).
fn cerv_nts_behind(certs: &TestCerts, ntp: u16, announced: u16) -> Cerv {
    Cerv::start_nts(
        certs,
        &[
            "--offset",
            "+250ms",
            "--ntp-listen",
            &format!("127.0.0.1:{ntp}"),
            "--nts-ntp-port",
            &announced.to_string(),
        ],
    )
}

#[test]
fn a_man_in_the_middle_cannot_move_nts_time() {
    let certs = TestCerts::generate();
    let ca = certs.ca.display().to_string();
    for attack in [Attack::Forge, Attack::Replay, Attack::Alter] {
        let ntp = free_udp_port("127.0.0.1");
        let (proxy, stop) = man_in_the_middle(format!("127.0.0.1:{ntp}").parse().unwrap(), attack);
        let cerv = cerv_nts_behind(&certs, ntp, proxy.port());
        // With NTS: every fake (sent first) is ignored, the genuine reply
        // used: the time is cerv's.
        let out = fient(&[&cerv.nts_target(), "--ca", &ca, "--json"]);
        assert_eq!(out.code(), Some(0), "{attack:?}: {}", out.stderr);
        let doc = json(&out.stdout);
        let (offset, bound) = (
            doc["offset_ns"].as_i64().unwrap(),
            doc["error_bound_ns"].as_i64().unwrap(),
        );
        assert!(
            (offset - 250 * MS).abs() <= bound,
            "{attack:?} moved NTS time: {doc}"
        );
        assert!(bound < MS, "{attack:?}: {doc}");
        // The control: plain NTP through the same attacker is moved (the
        // fakes come first and nothing tells them apart).
        let plain = fient(&[&format!("ntp://{proxy}"), "--json"]);
        let moved = match plain.code() {
            Some(0) => {
                let doc = json(&plain.stdout);
                let (o, b) = (
                    doc["offset_ns"].as_i64().unwrap(),
                    doc["error_bound_ns"].as_i64().unwrap(),
                );
                (o - 250 * MS).abs() > b
            }
            // Fakes that contradict the genuine samples make the sync
            // fail: no wrong time, but no time either.
            _ => true,
        };
        assert!(
            moved,
            "{attack:?}: the attack did nothing to plain NTP: {}",
            plain.stdout
        );
        stop.store(true, Ordering::Relaxed);
    }
}

/// The load generator of `cerv-bench --only ntp`: its NTS requests are
/// answered and its replies verify, and a reply checked against the wrong
/// key is counted invalid (the check is not a formality).
#[test]
fn the_bench_loads_cerv_with_real_nts_requests() {
    use lab::load::{self, LoadConfig, Target};
    let certs = TestCerts::generate();
    let cerv = cerv_nts(&certs, "0s");
    let ke = cerv.stream_addr(service::source::Wire::Nts);
    let credentials = load::nts_credentials(ke, &certs.ca).expect("key exchange");
    assert_eq!(credentials.ntp, cerv.ntp_addrs[0]);
    let config = LoadConfig {
        window: 4,
        sockets: 1,
        duration: Duration::from_millis(300),
        timeout: Duration::from_millis(200),
        pace: Duration::ZERO,
        spin: false,
    };
    let good = load::run(credentials.ntp, Target::Nts(credentials.clone()), config).unwrap();
    assert!(good.replies > 100, "{good:?}");
    assert_eq!((good.invalid, good.lost), (0, 0), "{good:?}");
    let plain = load::run(credentials.ntp, Target::Ntp, config).unwrap();
    assert!(plain.replies > 100, "{plain:?}");
    assert_eq!((plain.invalid, plain.lost), (0, 0), "{plain:?}");

    let mut forged = credentials;
    forged.s2c = service::nts::Key::generate();
    let bad = load::run(forged.ntp, Target::Nts(forged), config).unwrap();
    assert!(bad.invalid > 0, "{bad:?}");
    let (_, log) = cerv.stop();
    assert!(!log.contains("panicked"), "{log}");
}
