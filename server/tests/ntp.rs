//! cerv's NTP face, in process: a third-party client crate (rsntp) against
//! it, hostile datagrams, Kiss-o'-Death rate limiting, and fient's NTP
//! source against forged replies.

use server::{Config, Running, Server};
use service::clock::SystemClock;
use service::ntp::{self, Header, Leap, Mode, NtpTimestamp, RefId};
use service::source::{Source, SourceOptions, SourceSpec, SyncOptions, Wire};
use service::time::Nanos;
use service::transport::face::NtpFace;
use service::transport::limit::RateLimit;
use service::transport::server::ServerConfig;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

async fn start(offset: Nanos, rate_limit: RateLimit) -> Running {
    Server::spawn(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        offset,
        ntp_listen: vec!["127.0.0.1:0".parse().unwrap()],
        ntp: NtpFace {
            local_stratum: Some(1),
            ..NtpFace::default()
        },
        transport: ServerConfig {
            rate_limit,
            ..ServerConfig::default()
        },
        ..Config::default()
    })
    .await
    .expect("server")
}

fn ntp_source_spec(addr: SocketAddr) -> SourceSpec {
    SourceSpec::new(Wire::Ntp, addr)
}

#[tokio::test]
async fn rsntp_measures_cerv() {
    let server = start(Nanos::from_millis(250), RateLimit::default()).await;
    let addr = server.ntp_addrs[0];
    let result = tokio::task::spawn_blocking(move || {
        let mut client = rsntp::SntpClient::new();
        client.set_timeout(Duration::from_secs(2));
        client.synchronize(addr)
    })
    .await
    .unwrap()
    .expect("rsntp synchronize");
    let offset = result.clock_offset().as_secs_f64();
    assert!(
        (offset - 0.25).abs() < 0.001,
        "rsntp says {offset} s, cerv is 250 ms ahead"
    );
    assert_eq!(result.stratum(), 1);
}

/// Sends `bytes` from a fresh socket and returns what comes back within
/// `wait`, if anything.
fn ask(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(wait)).unwrap();
    socket.send_to(bytes, server).unwrap();
    let mut buf = [0u8; 2048];
    socket.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

fn request(transmit: u64) -> Vec<u8> {
    let mut buf = [0u8; 48];
    ntp::write_request(NtpTimestamp(transmit), 4, &mut buf);
    buf.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_datagrams_never_crash_nor_amplify() {
    let server = start(Nanos::ZERO, RateLimit::OFF).await;
    let addr = server.ntp_addrs[0];
    tokio::task::spawn_blocking(move || {
        // Every length from 0 to 1200, of junk and of a valid request
        // padded with junk: no reply is ever larger than its request.
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut junk = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect()
        };
        for len in 0..=1200 {
            let mut bytes = junk(len);
            socket.send_to(&bytes, addr).unwrap();
            if len >= 48 {
                bytes[..48].copy_from_slice(&request(len as u64 + 1));
                socket.send_to(&bytes, addr).unwrap();
            }
        }
        // Every reply is 48 bytes (no request here was shorter than that
        // and got an answer).
        std::thread::sleep(Duration::from_millis(300));
        let mut buf = [0u8; 2048];
        let mut replies = 0;
        while let Ok(n) = socket.recv(&mut buf) {
            assert_eq!(n, 48, "a reply of {n} bytes");
            replies += 1;
        }
        assert!(replies > 0);

        // Control and private queries (the monlist amplifier) get nothing.
        for mode in [6u8, 7] {
            let mut q = request(1);
            q[0] = (2 << 3) | mode;
            assert_eq!(
                ask(addr, &q, Duration::from_millis(200)),
                None,
                "mode {mode}"
            );
        }
        // Unknown extension fields are ignored: a plain 48-byte reply.
        let mut with_fields = request(77);
        let mut field = [0u8; 64];
        let n = ntp::write_field(&mut field, 0x7f01, &[9u8; 40]).unwrap();
        with_fields.extend_from_slice(&field[..n]);
        let reply = ask(addr, &with_fields, Duration::from_secs(1)).expect("reply");
        assert_eq!(reply.len(), 48);
        let h = Header::read(&reply).unwrap();
        assert_eq!((h.mode, h.origin), (Mode::Server, NtpTimestamp(77)));
        // A legacy MAC is not ours to verify: no answer.
        let mut with_mac = request(78);
        with_mac.extend_from_slice(&[0u8; 20]);
        assert_eq!(ask(addr, &with_mac, Duration::from_millis(200)), None);
        // Version 2 is not served; version 3 is, and answered as 3.
        let mut v2 = request(79);
        v2[0] = (2 << 3) | 3;
        assert_eq!(ask(addr, &v2, Duration::from_millis(200)), None);
        let mut v3 = request(80);
        v3[0] = (3 << 3) | 3;
        let reply = ask(addr, &v3, Duration::from_secs(1)).expect("v3 reply");
        assert_eq!(Header::read(&reply).unwrap().version, 3);
    })
    .await
    .unwrap();
    let stats = server.ntp_stats(0).unwrap();
    assert!(stats.malformed.get() > 0);
    assert!(stats.unpadded.get() >= 48);
    assert!(stats.control.get() >= 2);
    assert!(stats.mac.get() >= 1);
    assert!(stats.bad_version.get() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_echoes_the_request_and_stamps_it() {
    let server = start(Nanos::from_millis(-40), RateLimit::OFF).await;
    let addr = server.ntp_addrs[0];
    let (before, reply, after) = tokio::task::spawn_blocking(move || {
        let mut q = request(0x0123_4567_89ab_cdef);
        q[2] = 7; // poll
        let before = service::Clock::now(&SystemClock);
        let reply = ask(addr, &q, Duration::from_secs(1));
        (before, reply, service::Clock::now(&SystemClock))
    })
    .await
    .unwrap();
    let reply = reply.expect("reply");
    let h = Header::read(&reply).unwrap();
    assert_eq!(h.origin, NtpTimestamp(0x0123_4567_89ab_cdef));
    assert_eq!((h.mode, h.version, h.poll), (Mode::Server, 4, 7));
    assert_eq!(
        (h.leap, h.stratum, h.reference_id),
        (Leap::None, 1, RefId::LOCAL)
    );
    assert!(h.precision < -10, "precision {}", h.precision);
    let ts2 = h.receive.to_timestamp(after);
    let ts3 = h.transmit.to_timestamp(after);
    // ts3 is read after ts2, and both while the request was out, on a
    // clock 40 ms behind ours (NTP timestamps resolve 0.23 ns: allow 1 ns).
    assert!(ts2 <= ts3);
    let forty = Nanos::from_millis(40);
    let ns = Nanos::from_nanos(1);
    assert!(
        ts2.saturating_add(forty).saturating_add(ns) >= before,
        "{before:?} {ts2:?}"
    );
    assert!(
        ts3.saturating_add(forty) <= after.saturating_add(ns),
        "{ts3:?} {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_clients_get_a_kiss_itself_rate_limited() {
    let server = start(Nanos::ZERO, RateLimit { rate: 1, burst: 2 }).await;
    let addr = server.ntp_addrs[0];
    let (answers, kisses) = tokio::task::spawn_blocking(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        for i in 0..40u64 {
            socket.send_to(&request(i + 1), addr).unwrap();
        }
        let (mut answers, mut kisses) = (0, 0);
        let mut buf = [0u8; 128];
        while let Ok(n) = socket.recv(&mut buf) {
            let h = Header::read(&buf[..n]).unwrap();
            if h.stratum == 0 {
                assert_eq!(h.reference_id, RefId::RATE);
                assert_eq!(h.leap, Leap::Unsynchronized);
                // No time in a kiss: every timestamp is the request's own.
                assert_eq!(h.receive, h.origin);
                kisses += 1;
            } else {
                answers += 1;
            }
        }
        (answers, kisses)
    })
    .await
    .unwrap();
    let stats = server.ntp_stats(0).unwrap();
    assert_eq!(answers, 2, "the burst");
    // The kisses have a budget of their own (1/s, bursts of 2).
    assert_eq!(kisses, 2);
    assert_eq!(stats.rate_limited.get(), 38);
    assert_eq!(stats.kiss_sent.get(), 2);
    assert_eq!(stats.kiss_suppressed.get(), 36);
}

/// A man in the middle between fient's NTP source and cerv that, before
/// every genuine reply, sends spoofed Kiss-o'-Death DENYs (wrong origin,
/// zero origin) and a spoofed reply with a wrong origin and a time a
/// second off.
fn spoofing_relay(server: SocketAddr) -> SocketAddr {
    let front = UdpSocket::bind("127.0.0.1:0").unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").unwrap();
    back.connect(server).unwrap();
    front
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    back.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let addr = front.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            let Ok((n, client)) = front.recv_from(&mut buf) else {
                continue;
            };
            let request = Header::read(&buf[..n]).unwrap();
            let forge = |origin: u64, stratum: u8, refid: RefId, shift: u64| {
                let h = Header {
                    mode: Mode::Server,
                    stratum,
                    reference_id: refid,
                    origin: NtpTimestamp(origin),
                    receive: NtpTimestamp(request.transmit.0.wrapping_add(shift)),
                    transmit: NtpTimestamp(request.transmit.0.wrapping_add(shift)),
                    ..Header::default()
                };
                let mut out = [0u8; 48];
                h.write(&mut out);
                out
            };
            let cookie = request.transmit.0;
            for spoof in [
                forge(cookie.wrapping_add(1), 0, RefId::DENY, 0),
                forge(0, 0, RefId::DENY, 0),
                forge(cookie ^ 0xffff, 1, RefId::LOCAL, 1 << 32),
            ] {
                let _ = front.send_to(&spoof, client);
            }
            let _ = back.send(&buf[..n]);
            if let Ok(m) = back.recv(&mut buf) {
                let _ = front.send_to(&buf[..m], client);
            }
        }
    });
    addr
}

#[tokio::test]
async fn spoofed_kisses_and_replies_change_nothing() {
    let server = start(Nanos::from_millis(250), RateLimit::OFF).await;
    let relay = spoofing_relay(server.ntp_addrs[0]);
    let source = Source::open(
        ntp_source_spec(relay),
        relay,
        Arc::new(SystemClock),
        SourceOptions::default(),
    )
    .await
    .unwrap();
    let report = source.sync(&SyncOptions::default()).await.expect("sync");
    let e = report.estimate;
    assert!(e.contains(Nanos::from_millis(250)), "{e:?}");
    assert_eq!(report.samples.len(), 5);
    assert_eq!(
        source.stopped_by(),
        None,
        "a spoofed DENY stopped the source"
    );
    // Three forgeries per request, all unmatched.
    assert!(source.stats().unmatched.get() >= 15, "{:?}", source.stats());
}

#[tokio::test]
async fn a_genuine_deny_stops_the_source() {
    // A server that answers every request with a genuine DENY.
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok((n, from)) = socket.recv_from(&mut buf)
                && let Ok(req) = ntp::parse_request(&buf[..n])
            {
                let mut out = [0u8; 48];
                ntp::write_kiss(req.header.echo(), RefId::DENY, &mut out);
                let _ = socket.send_to(&out, from);
            }
        }
    });
    let source = Source::open(
        ntp_source_spec(addr),
        addr,
        Arc::new(SystemClock),
        SourceOptions::default(),
    )
    .await
    .unwrap();
    let err = source.sync(&SyncOptions::default()).await.unwrap_err();
    assert!(err.to_string().contains("kiss-o'-death DENY"), "{err}");
    assert_eq!(source.stats().sent.get(), 1, "asked again after a DENY");
    assert!(source.stopped_by().is_some());
    // And never again.
    let again = source.sync(&SyncOptions::default()).await.unwrap_err();
    assert!(again.to_string().contains("DENY"), "{again}");
    assert_eq!(source.stats().sent.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ntp_is_answered_by_the_transport_not_the_handlers() {
    // The handlers simulate two seconds of work in every tarpc call; an
    // NTP request is no tarpc call, and its answer does not wait for them.
    let server = Server::spawn(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ntp_listen: vec!["127.0.0.1:0".parse().unwrap()],
        ntp: NtpFace {
            local_stratum: Some(1),
            ..NtpFace::default()
        },
        processing_delay: Duration::from_secs(2),
        ..Config::default()
    })
    .await
    .expect("server");
    let (ntp_addr, cerv_addr) = (server.ntp_addrs[0], server.addr);
    let (ntp_reply, early, late) = tokio::task::spawn_blocking(move || {
        let ntp_reply = ask(ntp_addr, &request(42), Duration::from_secs(1));
        let mut probe = [0u8; service::wire::MAX_DATAGRAM];
        let (len, _) = service::wire::encode_client(
            &service::wire::ClientFrame::Request {
                id: 7,
                deadline: Duration::from_secs(10),
                call: service::wire::Call::Probe {
                    ts1: service::time::Timestamp::from_nanos(1),
                },
            },
            &mut probe,
            None,
        );
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.send_to(&probe[..len], cerv_addr).unwrap();
        let mut buf = [0u8; 1500];
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let early = socket.recv(&mut buf).is_ok();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let late = socket.recv(&mut buf).is_ok();
        (ntp_reply, early, late)
    })
    .await
    .unwrap();
    let reply = ntp_reply.expect("an NTP reply within a second");
    assert_eq!(Header::read(&reply).unwrap().origin, NtpTimestamp(42));
    assert!(!early, "the tarpc call did its two seconds of work");
    assert!(late, "and was answered after them");
    server.stop().await;
}
