//! The server and the client library in one process, over real loopback
//! sockets: the transport's promises, checked datagram by datagram.

use proptest::prelude::prop;
use server::{Config, Dispatch, Running, Server};
use service::auth::{Key, Keys};
use service::clock::{Clock, SkewedClock, SystemClock};
use service::source::{Source, SourceOptions, SourceSpec, SyncOptions, Wire};
use service::sync::Estimator;
use service::time::{Nanos, Timestamp};
use service::transport::client::{UdpClientTransport, client_config};
use service::transport::limit::RateLimit;
use service::transport::server::ServerConfig;
use service::wire::{self, Call, ClientFrame, MIN_REQUEST_LEN, Reply};
use service::{TimeServiceClient, wire::DatagramBuf};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

async fn start(config: Config) -> Running {
    Server::spawn(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..config
    })
    .await
    .expect("bind")
}

fn skewed(offset_ms: i64) -> Config {
    Config {
        offset: Nanos::from_millis(offset_ms),
        ..Config::default()
    }
}

/// Both ways of dispatching requests must keep every promise.
const DISPATCHES: [Dispatch; 2] = [Dispatch::Inline, Dispatch::Channels];

#[tokio::test]
async fn a_plain_tarpc_client_can_call_the_service() {
    for dispatch in DISPATCHES {
        plain_tarpc_client(dispatch).await;
    }
}

async fn plain_tarpc_client(dispatch: Dispatch) {
    let server = start(Config {
        dispatch,
        ..skewed(250)
    })
    .await;
    let transport = UdpClientTransport::connect(server.addr).await.unwrap();
    let client = TimeServiceClient::new(client_config(), transport).spawn();

    let before = SystemClock.now();
    let reply = client
        .probe(tarpc::context::current(), Timestamp::EPOCH)
        .await
        .expect("probe");
    let after = SystemClock.now();
    // The transport stamped ts1 and ts4 itself, next to the socket.
    assert!(before <= reply.ts1 && reply.ts1 <= after, "{reply:?}");
    let ts4 = reply.ts4.expect("ts4 stamped by the transport");
    assert!(reply.ts1 <= ts4 && ts4 <= after);
    assert!(reply.ts2 <= reply.ts3);
    let skew = reply.ts2.diff_i128(reply.ts1);
    assert!((250_000_000..260_000_000).contains(&skew), "{skew}");

    let now = client.now(tarpc::context::current()).await.expect("now");
    let skew = now.diff_i128(SystemClock.now());
    assert!((240_000_000..=250_000_000).contains(&skew), "{skew}");
    server.stop().await;
}

#[tokio::test]
async fn a_client_250ms_behind_measures_plus_250ms() {
    let server = start(Config::default()).await;
    let behind: Arc<dyn Clock> = Arc::new(SkewedClock::new(SystemClock, Nanos::from_millis(-250)));
    let client = Source::cerv(server.addr, behind).await.unwrap();
    let report = client.sync(&SyncOptions::default()).await.expect("sync");
    let truth = Nanos::from_millis(250);
    for e in &report.estimates {
        assert!(e.contains(truth), "{e:?}");
    }
    assert_eq!(report.samples.len(), 5);
    assert_eq!(report.lost, 0);
    assert!(report.estimate.bound() < Nanos::from_millis(5));
    server.stop().await;
}

#[tokio::test]
async fn every_estimator_can_be_chosen() {
    let server = start(skewed(-40)).await;
    let client = Source::cerv(server.addr, Arc::new(SystemClock))
        .await
        .unwrap();
    for estimator in Estimator::ALL {
        let options = SyncOptions {
            estimator,
            ..SyncOptions::default()
        };
        let report = client.sync(&options).await.expect("sync");
        assert_eq!(report.estimate.estimator, estimator);
        assert!(
            report.estimate.contains(Nanos::from_millis(-40)),
            "{estimator}"
        );
    }
    server.stop().await;
}

/// A raw client socket speaking the wire format by hand.
async fn raw_client(server: SocketAddr) -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(server).await.unwrap();
    sock
}

fn request(id: u64, call: Call) -> Vec<u8> {
    let mut buf: DatagramBuf = [0; wire::MAX_DATAGRAM];
    let (len, _) = wire::encode_client(
        &ClientFrame::Request {
            id,
            deadline: Duration::from_secs(5),
            call,
        },
        &mut buf,
        None,
    );
    buf[..len].to_vec()
}

async fn recv_reply(sock: &UdpSocket, within: Duration) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    match tokio::time::timeout(within, sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

#[tokio::test]
async fn replies_are_never_larger_than_requests() {
    for dispatch in DISPATCHES {
        replies_never_larger(dispatch).await;
    }
}

async fn replies_never_larger(dispatch: Dispatch) {
    let server = start(Config {
        transport: ServerConfig {
            max_in_flight: 1,
            ..ServerConfig::default()
        },
        processing_delay: Duration::from_millis(50),
        dispatch,
        ..skewed(1)
    })
    .await;
    let sock = raw_client(server.addr).await;
    let ts1 = Timestamp::from_nanos(i64::MIN);
    // A probe, a now(), and a second request while the first is in flight
    // (answered with an error: the largest reply the server makes).
    let requests = [
        request(u64::MAX, Call::Probe { ts1 }),
        request(u64::MAX - 1, Call::Now),
    ];
    for r in &requests {
        assert_eq!(r.len(), MIN_REQUEST_LEN);
        sock.send(r).await.unwrap();
    }
    let mut kinds = Vec::new();
    while let Some(reply) = recv_reply(&sock, Duration::from_millis(500)).await {
        assert!(
            reply.len() <= MIN_REQUEST_LEN,
            "reply of {} bytes",
            reply.len()
        );
        let frame = wire::decode_server(&reply, None, |_| None).expect("valid reply");
        kinds.push(match frame.reply {
            Reply::Probe { ts1: echoed, .. } => {
                assert_eq!(echoed, ts1);
                "probe"
            }
            Reply::Now { .. } => "now",
            Reply::Error { .. } => "error",
        });
    }
    kinds.sort();
    assert_eq!(
        kinds,
        ["error", "probe"],
        "one answered, one refused as busy"
    );
    server.stop().await;
}

#[tokio::test]
async fn duplicated_and_stale_replies_never_make_a_wrong_sample() {
    // A fake server that answers every request twice, once with a lie
    // first: a reply to the right id but with another ts1 (stale), then
    // the true answer, then the true answer again (duplicate).
    let fake = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = fake.local_addr().unwrap();
    let theta = Nanos::from_millis(80);
    let responder = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        let mut out: DatagramBuf = [0; wire::MAX_DATAGRAM];
        for _ in 0..50 {
            let Ok(Ok((n, from))) =
                tokio::time::timeout(Duration::from_secs(2), fake.recv_from(&mut buf)).await
            else {
                break;
            };
            let Ok((ClientFrame::Request { id, call, .. }, _)) =
                wire::decode_client(&buf[..n], None)
            else {
                continue;
            };
            let now = SystemClock.now().saturating_add(theta);
            let replies = match call {
                Call::Probe { ts1 } => vec![
                    Reply::Probe {
                        ts1: ts1.saturating_add(Nanos::from_nanos(1)),
                        ts2: now.saturating_add(Nanos::from_secs(9)),
                        ts3: now.saturating_add(Nanos::from_secs(9)),
                    },
                    Reply::Probe {
                        ts1,
                        ts2: now,
                        ts3: now,
                    },
                    Reply::Probe {
                        ts1,
                        ts2: now.saturating_add(Nanos::from_secs(5)),
                        ts3: now.saturating_add(Nanos::from_secs(5)),
                    },
                ],
                Call::Now => vec![Reply::Now { time: now }, Reply::Now { time: now }],
            };
            for reply in replies {
                let len =
                    wire::encode_server(&wire::ServerFrame { id, reply }, &mut out[..48], None)
                        .unwrap();
                let _ = fake.send_to(&out[..len], from).await;
            }
        }
    });
    let client = Source::cerv(addr, Arc::new(SystemClock)).await.unwrap();
    let report = client.sync(&SyncOptions::default()).await.expect("sync");
    assert!(report.estimate.contains(theta), "{:?}", report.estimate);
    for s in &report.samples {
        assert!(
            (s.offset().as_nanos() - theta.as_nanos()).abs() < 5_000_000,
            "{s:?}"
        );
    }
    // Per probe: the stale lie and the late duplicate were dropped.
    assert!(client.stats().unmatched.get() >= 2 * report.samples.len() as u64);
    responder.abort();
}

#[tokio::test]
async fn a_full_peer_table_turns_new_peers_away_until_one_idles_out() {
    // Only channel dispatch keeps a table of peers.
    let server = start(Config {
        transport: ServerConfig {
            max_peers: 2,
            idle_timeout: Duration::from_millis(500),
            ..ServerConfig::default()
        },
        dispatch: Dispatch::Channels,
        ..Config::default()
    })
    .await;
    let socks = [
        raw_client(server.addr).await,
        raw_client(server.addr).await,
        raw_client(server.addr).await,
    ];
    let ts1 = SystemClock.now();
    for s in &socks[..2] {
        s.send(&request(1, Call::Probe { ts1 })).await.unwrap();
        assert!(recv_reply(s, Duration::from_secs(1)).await.is_some());
    }
    // The table is full of peers seen this very moment: the third waits.
    socks[2]
        .send(&request(1, Call::Probe { ts1 }))
        .await
        .unwrap();
    // The table is full of peers seen this very moment (unless a sweep tick
    // has just passed, which lets the newcomer evict them): either way the
    // outcome is counted.
    match recv_reply(&socks[2], Duration::from_millis(100)).await {
        None => assert_eq!(server.stats().table_full.get(), 1),
        Some(_) => assert!(server.stats().peers_evicted.get() >= 1),
    }
    // Once the first two have been idle a while, the third gets in.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let started = Instant::now();
    let mut answered = false;
    while !answered && started.elapsed() < Duration::from_secs(3) {
        socks[2]
            .send(&request(2, Call::Probe { ts1 }))
            .await
            .unwrap();
        answered = recv_reply(&socks[2], Duration::from_millis(200))
            .await
            .is_some();
    }
    assert!(answered, "third peer never admitted");
    let stats = server.stop().await;
    assert!(stats.peers_evicted.get() >= 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_corrupted_under_a_burst() {
    for dispatch in DISPATCHES {
        burst(dispatch).await;
    }
}

async fn burst(dispatch: Dispatch) {
    // One client at full speed: not a case for the rate limiter.
    let server = start(Config {
        dispatch,
        transport: ServerConfig {
            rate_limit: RateLimit::OFF,
            ..ServerConfig::default()
        },
        ..skewed(3)
    })
    .await;
    let sock = raw_client(server.addr).await;
    const N: u64 = 2_000;
    let ts1 = |id: u64| Timestamp::from_nanos(1_000_000 + id as i64);
    let mut replies = 0u64;
    let mut buf = [0u8; 2048];
    for id in 0..N {
        sock.send(&request(id, Call::Probe { ts1: ts1(id) }))
            .await
            .unwrap();
        // Read whatever has arrived, without waiting.
        while let Ok(n) = sock.try_recv(&mut buf) {
            check_burst_reply(&buf[..n], ts1);
            replies += 1;
        }
    }
    while let Some(reply) = recv_reply(&sock, Duration::from_millis(500)).await {
        check_burst_reply(&reply, ts1);
        replies += 1;
    }
    let stats = server.stop().await;
    // The kernel may drop some of a burst before the server reads them;
    // every datagram the server did read was either answered or dropped
    // and counted.
    assert!(stats.received.get() <= N, "{stats}");
    assert_eq!(
        stats.replied.get()
            + stats.queue_full.get()
            + stats.send_failed.get()
            + stats.rate_limited.get(),
        stats.received.get(),
        "{dispatch:?}: {stats}"
    );
    assert!(replies <= stats.replied.get());
    assert!(replies > 0);
}

fn check_burst_reply(bytes: &[u8], ts1: impl Fn(u64) -> Timestamp) {
    let frame = wire::decode_server(bytes, None, |_| None).expect("valid reply");
    match frame.reply {
        Reply::Probe {
            ts1: echoed,
            ts2,
            ts3,
        } => {
            assert_eq!(echoed, ts1(frame.id), "reply carries another request's ts1");
            assert!(ts2 <= ts3);
        }
        Reply::Error { .. } => {}
        other => panic!("unexpected reply {other:?}"),
    }
}

fn keyed(config: Config, key: &Key) -> Config {
    Config {
        transport: ServerConfig {
            keys: Some(Arc::new(Keys::single(key.clone()).into())),
            ..config.transport
        },
        ..config
    }
}

async fn connect_keyed(addr: SocketAddr, key: Option<Key>) -> Source {
    let options = SourceOptions {
        key,
        ..SourceOptions::default()
    };
    let spec = SourceSpec::new(Wire::Cerv, addr);
    Source::open(spec, addr, Arc::new(SystemClock), options)
        .await
        .unwrap()
}

#[tokio::test]
async fn authenticated_time_needs_the_right_key() {
    for dispatch in DISPATCHES {
        let key = Key::generate(7);
        let server = start(keyed(
            Config {
                dispatch,
                ..skewed(30)
            },
            &key,
        ))
        .await;
        let fast = SyncOptions {
            timeout: Duration::from_millis(200),
            ..SyncOptions::default()
        };

        let good = connect_keyed(server.addr, Some(key.clone())).await;
        let report = good.sync(&fast).await.expect("sync with the right key");
        assert!(report.estimate.contains(Nanos::from_millis(30)));

        for (client_key, why) in [
            (Some(Key::generate(7)), "same id, other secret"),
            (Some(Key::generate(8)), "unknown id"),
            (None, "no key"),
        ] {
            let client = connect_keyed(server.addr, client_key.clone()).await;
            let err = client.sync(&fast).await.expect_err(why).to_string();
            assert!(err.starts_with("no answer from"), "{why}: {err}");
            if client_key.is_some() {
                assert!(
                    err.contains("authentication may have failed"),
                    "{why}: {err}"
                );
            }
        }
        let stats = server.stop().await;
        assert!(stats.auth_failed.get() >= 3, "{stats}");
    }
}

/// A man in the middle who knows the protocol: forwards every datagram,
/// but sends each reply first in a forged form, its server timestamps a
/// second later (re-encoded properly, with the original tag
/// if it had one), then as it came. Returns its address.
async fn forger(server: SocketAddr) -> SocketAddr {
    let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut client = None;
        let (mut a, mut b) = ([0u8; 2048], [0u8; 2048]);
        for _ in 0..10_000 {
            tokio::select! {
                Ok((n, from)) = front.recv_from(&mut a) => {
                    client = Some(from);
                    let _ = back.send(&a[..n]).await;
                }
                Ok(n) = back.recv(&mut b) => {
                    let Some(to) = client else { continue };
                    if let Some(forged) = forge(&b[..n]) {
                        let _ = front.send_to(&forged, to).await;
                    }
                    let _ = front.send_to(&b[..n], to).await;
                }
                () = tokio::time::sleep(Duration::from_secs(5)) => break,
            }
        }
    });
    addr
}

/// The reply with its server timestamps moved a second later.
fn forge(reply: &[u8]) -> Option<Vec<u8>> {
    let tagged = reply.get(3)? & 0x80 != 0;
    let plain_len = if tagged {
        reply.len().checked_sub(20)?
    } else {
        reply.len()
    };
    let mut plain = reply[..plain_len].to_vec();
    plain[3] &= 0x7f;
    let mut frame = wire::decode_server(&plain, None, |_| None).ok()?;
    let later = |t: &mut Timestamp| *t = t.saturating_add(Nanos::from_secs(1));
    match &mut frame.reply {
        Reply::Probe { ts2, ts3, .. } => {
            later(ts2);
            later(ts3);
        }
        Reply::Now { time } => later(time),
        Reply::Error { .. } => return None,
    }
    let mut out: DatagramBuf = [0; wire::MAX_DATAGRAM];
    let len = wire::encode_server(&frame, &mut out[..48], None)?;
    let mut forged = out[..len].to_vec();
    if tagged {
        forged[3] |= 0x80;
        forged.extend_from_slice(&reply[plain_len..]);
    }
    Some(forged)
}

#[tokio::test]
async fn without_keys_a_forger_moves_the_clock() {
    // The control for the test below: the forgery works on plain time.
    let server = start(skewed(0)).await;
    let mitm = forger(server.addr).await;
    let client = connect_keyed(mitm, None).await;
    let report = client.sync(&SyncOptions::default()).await.expect("sync");
    let off = report.estimate.offset.as_nanos();
    assert!(
        (900_000_000..1_100_000_000).contains(&off),
        "forgery not taken: {off} ns"
    );
    server.stop().await;
}

#[tokio::test]
async fn forged_replies_never_change_an_authenticated_result() {
    let key = Key::generate(3);
    let server = start(keyed(skewed(0), &key)).await;
    let mitm = forger(server.addr).await;
    let client = connect_keyed(mitm, Some(key)).await;
    for _ in 0..3 {
        let report = client.sync(&SyncOptions::default()).await.expect("sync");
        assert!(
            report.estimate.contains(Nanos::ZERO),
            "{:?}",
            report.estimate
        );
        assert!(report.estimate.bound() < Nanos::from_millis(5));
        for s in &report.samples {
            assert!(s.offset().abs() < Nanos::from_millis(5), "{s:?}");
        }
    }
    assert!(
        client.stats().auth_failed.get() >= 15,
        "forgeries were not even seen"
    );
    server.stop().await;
}

/// Datagrams of every kind a hostile or broken network can produce.
fn junk_datagram() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let valid =
        (any::<u64>(), any::<u32>(), any::<i64>(), 0..3u8).prop_map(|(id, us, ts1, kind)| {
            let frame = match kind {
                0 => ClientFrame::Request {
                    id,
                    deadline: Duration::from_micros(u64::from(us)),
                    call: Call::Probe {
                        ts1: Timestamp::from_nanos(ts1),
                    },
                },
                1 => ClientFrame::Request {
                    id,
                    deadline: Duration::from_micros(u64::from(us)),
                    call: Call::Now,
                },
                _ => ClientFrame::Cancel { id },
            };
            let mut buf: DatagramBuf = [0; wire::MAX_DATAGRAM];
            let (len, _) = wire::encode_client(&frame, &mut buf, None);
            buf[..len].to_vec()
        });
    let reply = (any::<u64>(), any::<i64>()).prop_map(|(id, t)| {
        let frame = wire::ServerFrame {
            id,
            reply: Reply::Now {
                time: Timestamp::from_nanos(t),
            },
        };
        let mut buf: DatagramBuf = [0; wire::MAX_DATAGRAM];
        let len = wire::encode_server(&frame, &mut buf[..48], None).unwrap_or(0);
        let mut v = buf[..len].to_vec();
        v.resize(48, 0);
        v
    });
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..1300),
        (
            valid.clone(),
            prop::collection::vec((any::<usize>(), any::<u8>()), 1..8)
        )
            .prop_map(|(mut d, flips)| {
                for (i, v) in flips {
                    let i = i % d.len();
                    d[i] ^= v;
                }
                d
            }),
        (valid.clone(), any::<usize>()).prop_map(|(d, n)| d[..n % (d.len() + 1)].to_vec()),
        (valid.clone(), prop::collection::vec(any::<u8>(), 1..1300)).prop_map(|(mut d, more)| {
            d.extend(more);
            d
        }),
        valid,
        reply,
    ]
}

#[test]
fn junk_datagrams_never_stop_the_server() {
    use proptest::test_runner::{Config as Cases, TestCaseError, TestRunner};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for dispatch in DISPATCHES {
        let server = rt.block_on(start(Config {
            dispatch,
            transport: ServerConfig {
                // Let every datagram reach the decoder.
                rate_limit: RateLimit::OFF,
                ..ServerConfig::default()
            },
            ..skewed(9)
        }));
        let junk = std::net::UdpSocket::bind("127.0.0.3:0").unwrap();
        let client = rt
            .block_on(Source::cerv(server.addr, Arc::new(SystemClock)))
            .unwrap();
        let fast = SyncOptions {
            timeout: Duration::from_millis(300),
            ..SyncOptions::default()
        };
        let mut runner = TestRunner::new(Cases {
            cases: 24,
            failure_persistence: None,
            ..Cases::default()
        });
        runner
            .run(&prop::collection::vec(junk_datagram(), 1..200), |batch| {
                for d in &batch {
                    let _ = junk.send_to(d, server.addr);
                }
                let report = rt
                    .block_on(client.sync(&fast))
                    .map_err(|e| TestCaseError::fail(format!("{dispatch:?}: {e}")))?;
                proptest::prop_assert!(report.estimate.contains(Nanos::from_millis(9)));
                Ok(())
            })
            .unwrap();
        let stats = rt.block_on(server.stop());
        assert!(
            stats.malformed.get() + stats.unpadded.get() + stats.oversized.get() > 100,
            "{dispatch:?}: {stats}"
        );
    }
}
