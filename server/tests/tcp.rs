//! Hostile clients against cerv's TCP and TLS listeners, in-process on
//! real loopback sockets: each abuse is closed or refused, counted under
//! its reason, and costs an honest client nothing. Every test is bounded
//! in time (the waits below give up after a few seconds).

use lab::certs::TestCerts;
use server::{Config, Running, Server};
use service::clock::SystemClock;
use service::source::{Source, SourceOptions, SourceSpec, SyncOptions};
use service::time::Timestamp;
use service::transport::limit::RateLimit;
use service::transport::stream::{MAX_FRAME, PREFIX};
use service::transport::tcp::{TcpConfig, TcpStats};
use service::wire::{self, Call, ClientFrame, ErrorCode, Reply, ServerFrame};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A server on TCP (listener 0) and, with `certs`, TLS (listener 1), with
/// these limits.
async fn start(tcp: TcpConfig, certs: Option<&TestCerts>) -> Running {
    let tls = certs.map(|c| {
        service::tls::server_config(&c.good.cert, &c.good.key, &[], false).expect("TLS config")
    });
    Server::spawn(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        tcp_listen: vec!["127.0.0.1:0".parse().unwrap()],
        tls_listen: if tls.is_some() {
            vec!["127.0.0.1:0".parse().unwrap()]
        } else {
            vec![]
        },
        tls,
        tcp,
        ..Config::default()
    })
    .await
    .expect("bind")
}

/// Limits for a test: a generous idle timeout unless the test is about it,
/// no rate limit unless the test is about it.
fn limits() -> TcpConfig {
    TcpConfig {
        idle_timeout: Duration::from_secs(20),
        rate_limit: RateLimit { rate: 0, burst: 0 },
        ..TcpConfig::default()
    }
}

/// A request, framed as it goes on a stream.
fn request(id: u64, call: Call) -> Vec<u8> {
    let mut buf = [0u8; wire::MAX_DATAGRAM];
    let frame = ClientFrame::Request {
        id,
        deadline: Duration::from_secs(1),
        call,
    };
    let (len, _) = wire::encode_client(&frame, &mut buf, None);
    let mut out = Vec::new();
    service::transport::stream::frame(&buf[..len], &mut out);
    out
}

fn probe(id: u64) -> Vec<u8> {
    request(
        id,
        Call::Probe {
            ts1: Timestamp::from_nanos(1),
        },
    )
}

/// Reads one reply frame; `None` if the connection ends (or errs) first,
/// or nothing comes within 5 s.
async fn read_reply(stream: &mut TcpStream) -> Option<ServerFrame> {
    let read = async {
        let mut prefix = [0u8; PREFIX];
        stream.read_exact(&mut prefix).await.ok()?;
        let len = u32::from_be_bytes(prefix) as usize;
        assert!(len <= MAX_FRAME, "a reply of {len} bytes");
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await.ok()?;
        Some(wire::decode_server(&body, None, |_| None).expect("a valid reply"))
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
}

/// Waits (at most `limit`) until the server closes `stream`; returns how
/// long that took, or `None` if it stayed open. Whatever the server sent
/// before closing is discarded.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Waits (at most 10 s, checking every 10 ms) until `done` holds.
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A connection from `local` (any 127/8 address is this machine's).
async fn connect_from(local: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(local.parse::<IpAddr>().unwrap(), 0))?;
    tokio::time::timeout(Duration::from_secs(5), socket.connect(to))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// One whole sync over `tcp://addr`, as fient makes it.
async fn sync(addr: SocketAddr) -> Result<(), String> {
    let spec: SourceSpec = format!("tcp://{addr}").parse().unwrap();
    let source = Source::open(spec, addr, Arc::new(SystemClock), SourceOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let options = SyncOptions {
        timeout: Duration::from_secs(1),
        ..SyncOptions::default()
    };
    source
        .sync(&options)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn stats(server: &Running, i: usize) -> &TcpStats {
    server.stream_stats(i).expect("a stream listener")
}

#[tokio::test]
async fn honest_syncs_leave_nothing_counted_as_failed() {
    let certs = TestCerts::generate();
    let server = start(limits(), Some(&certs)).await;
    let ca = service::tls::client_config(Some(&certs.ca), &[], false).expect("CA");
    for (i, wire) in [(0, "tcp"), (1, "tls")] {
        let addr = server.stream_addrs[i];
        let spec: SourceSpec = format!("{wire}://localhost:{}", addr.port())
            .parse()
            .unwrap();
        let options = SourceOptions {
            tls: Some(ca.clone()),
            ..SourceOptions::default()
        };
        let source = Source::open(spec, addr, Arc::new(SystemClock), options)
            .await
            .expect("source");
        for _ in 0..3 {
            source.sync(&SyncOptions::default()).await.expect("sync");
        }
        // The server sees each close once the client has gone.
        wait_until("the connections to end", || {
            stats(&server, i).replied.get() == 18
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = stats(&server, i);
        assert_eq!((s.accepted.get(), s.requests.get()), (3, 18), "{wire}: {s}");
        // Nothing else: in particular a TLS client that hangs up without
        // close_notify between requests is a close, not an I/O failure.
        assert_eq!(
            s.to_string(),
            "connections 3, requests 18, replied 18",
            "{wire}"
        );
    }
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_idle_timeout() {
    let server = start(
        TcpConfig {
            idle_timeout: Duration::from_millis(300),
            ..limits()
        },
        None,
    )
    .await;
    let addr = server.stream_addrs[0];
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // And a slowloris: half a length prefix, then nothing.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(&[0, 0]).await.unwrap();
    silent.push(slow);
    for s in &mut silent {
        let took = closed_within(s, Duration::from_secs(5))
            .await
            .expect("a silent connection stayed open");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    wait_until("the idle count", || {
        stats(&server, 0).idle_closed.get() == 6
    })
    .await;
    // The listener is as good as new.
    sync(addr).await.expect("an honest client syncs");
}

#[tokio::test]
async fn a_huge_length_prefix_is_closed_at_once() {
    let server = start(limits(), None).await;
    let addr = server.stream_addrs[0];
    for prefix in [u32::MAX, MAX_FRAME as u32 + 1] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Only the prefix: the server must not wait for the 4 GiB it
        // announces (nor buffer any of it) before hanging up.
        s.write_all(&prefix.to_be_bytes()).await.unwrap();
        let took = closed_within(&mut s, Duration::from_secs(5))
            .await
            .expect("stayed open");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
    wait_until("the oversized count", || {
        stats(&server, 0).oversized.get() == 2
    })
    .await;
    // A frame of exactly the largest size is read (and, being junk,
    // refused as malformed): the limit is where the documentation says.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut junk = (MAX_FRAME as u32).to_be_bytes().to_vec();
    junk.resize(PREFIX + MAX_FRAME, 0xaa);
    s.write_all(&junk).await.unwrap();
    closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("stayed open");
    wait_until("the malformed count", || {
        stats(&server, 0).malformed.get() == 1
    })
    .await;
    assert_eq!(stats(&server, 0).oversized.get(), 2);
}

#[tokio::test]
async fn garbage_after_a_valid_request_is_answered_then_closed() {
    let server = start(limits(), None).await;
    let addr = server.stream_addrs[0];
    let mut s = TcpStream::connect(addr).await.unwrap();
    // A valid probe, then a frame of garbage, in one write.
    let mut bytes = probe(7);
    bytes.extend_from_slice(&[0, 0, 0, 48]);
    bytes.extend_from_slice(&[0x5a; 48]);
    s.write_all(&bytes).await.unwrap();
    let reply = read_reply(&mut s)
        .await
        .expect("the valid request is answered");
    assert_eq!(reply.id, 7);
    assert!(matches!(reply.reply, Reply::Probe { .. }), "{reply:?}");
    closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("stayed open after garbage");
    wait_until("the malformed count", || {
        stats(&server, 0).malformed.get() == 1
    })
    .await;
    assert_eq!(stats(&server, 0).replied.get(), 1);
}

#[tokio::test]
async fn a_connection_over_its_rate_is_answered_busy() {
    let server = start(
        TcpConfig {
            rate_limit: RateLimit { rate: 5, burst: 5 },
            ..limits()
        },
        None,
    )
    .await;
    let addr = server.stream_addrs[0];
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (mut answered, mut busy) = (0, 0);
    for id in 0..20 {
        s.write_all(&probe(id)).await.unwrap();
        match read_reply(&mut s).await.expect("an answer").reply {
            Reply::Probe { .. } => answered += 1,
            Reply::Error {
                code: ErrorCode::Busy,
                ..
            } => busy += 1,
            other => panic!("{other:?}"),
        }
    }
    // The burst, and perhaps one more token earned meanwhile.
    assert!((5..=7).contains(&answered), "{answered} answered");
    assert_eq!(answered + busy, 20);
    assert_eq!(stats(&server, 0).rate_limited.get(), busy as u64);
    // Busy is an answer, not an end: the connection is still served once
    // tokens come back, and another connection has a bucket of its own.
    let mut other = TcpStream::connect(addr).await.unwrap();
    other.write_all(&probe(99)).await.unwrap();
    let reply = read_reply(&mut other).await.expect("an answer");
    assert!(matches!(reply.reply, Reply::Probe { .. }), "{reply:?}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(&probe(100)).await.unwrap();
    let reply = read_reply(&mut s).await.expect("an answer");
    assert!(matches!(reply.reply, Reply::Probe { .. }), "{reply:?}");
}

#[tokio::test]
async fn a_tls_handshake_that_never_ends_is_cut_off() {
    let certs = TestCerts::generate();
    let server = start(
        TcpConfig {
            handshake_timeout: Duration::from_millis(300),
            ..limits()
        },
        Some(&certs),
    )
    .await;
    let tls = server.stream_addrs[1];
    // Nothing at all, and half a ClientHello record header.
    let mut silent = TcpStream::connect(tls).await.unwrap();
    let mut partial = TcpStream::connect(tls).await.unwrap();
    partial.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    for s in [&mut silent, &mut partial] {
        let took = closed_within(s, Duration::from_secs(5))
            .await
            .expect("stayed open");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    wait_until("the handshake timeouts", || {
        stats(&server, 1).handshake_timeout.get() == 2
    })
    .await;
    assert_eq!(stats(&server, 1).idle_closed.get(), 0);
}

#[tokio::test]
async fn a_plaintext_client_on_the_tls_port_fails_its_handshake() {
    let certs = TestCerts::generate();
    let server = start(limits(), Some(&certs)).await;
    let tls = server.stream_addrs[1];
    let mut s = TcpStream::connect(tls).await.unwrap();
    s.write_all(&probe(1)).await.unwrap();
    // The server answers with a TLS alert record, then hangs up.
    let mut header = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut header))
        .await
        .expect("an answer in time")
        .expect("a TLS alert");
    assert_eq!(header[0], 0x15, "{header:?}");
    closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("stayed open");
    wait_until("the handshake failure", || {
        stats(&server, 1).handshake_failed.get() == 1
    })
    .await;
    assert_eq!(stats(&server, 1).requests.get(), 0);
}

/// The most descriptors this process may hold.
fn fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(ok, 0);
    limit.rlim_cur
}

/// Opens `n` connections from `local`, in batches the listen queue can
/// hold, each batch taken in by the server (admitted or turned away)
/// before the next; returns them all.
async fn crowd(server: &Running, local: &str, n: usize) -> Vec<TcpStream> {
    let addr = server.stream_addrs[0];
    let seen = |s: &TcpStats| s.accepted.get() + s.over_limit.get() + s.over_address_limit.get();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let before = seen(stats(server, 0));
        let batch = (n - out.len()).min(200);
        for _ in 0..batch {
            out.push(connect_from(local, addr).await.expect("connect"));
        }
        wait_until("the server to take the batch in", || {
            seen(stats(server, 0)) >= before + batch as u64
        })
        .await;
    }
    out
}

/// How many of `conns` the server has closed (at once: turned away).
async fn closed_among(conns: &mut [TcpStream]) -> usize {
    let mut closed = 0;
    for c in conns.iter_mut() {
        if closed_within(c, Duration::from_millis(1)).await.is_some() {
            closed += 1;
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_connections_are_bounded_and_counted() {
    // Each connection costs this process two descriptors (both ends);
    // stay well under the limit.
    let (total, per_address) = (1500usize, 1000usize);
    let needed = 2 * (total + 300) as u64 + 200;
    assert!(
        fd_limit() >= needed,
        "ulimit -n is {}, this test needs {needed}",
        fd_limit()
    );
    let server = start(
        TcpConfig {
            max_connections: total,
            max_per_address: per_address,
            ..limits()
        },
        None,
    )
    .await;
    let addr = server.stream_addrs[0];

    // One address asks for more than its share: the excess is turned away.
    let mut first = crowd(&server, "127.0.0.1", per_address + 200).await;
    let s = stats(&server, 0);
    assert_eq!(s.accepted.get(), per_address as u64);
    assert_eq!(s.over_address_limit.get(), 200);
    assert_eq!(closed_among(&mut first).await, 200);

    // Another address fills the rest, and then some.
    let mut second = crowd(&server, "127.0.0.2", total - per_address + 100).await;
    assert_eq!(s.accepted.get(), total as u64);
    assert_eq!(s.over_limit.get(), 100);
    assert_eq!(closed_among(&mut second).await, 100);

    // Full: an honest client is turned away too, with a message that
    // says the server hung up.
    let refused = sync(addr).await.expect_err("synced with the listener full");
    assert!(refused.contains("closed the connection"), "{refused}");
    assert!(s.over_limit.get() > 100);

    // When some leave, it is served again (the server notices a close
    // as soon as it reads it: each connection's task is waiting in a
    // read).
    // The admitted are the first of the crowd; the turned away came last.
    first.drain(..50);
    let started = Instant::now();
    let mut synced = sync(addr).await;
    while synced.is_err() && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        synced = sync(addr).await;
    }
    synced.expect("a freed slot serves an honest client");
    drop((first, second));
    server.stop().await;
}

#[test]
fn the_counters_reach_the_log_line() {
    // Every reason has a name in the line cerv logs.
    let s = TcpStats::default();
    s.accepted.incr();
    s.idle_closed.incr();
    s.oversized.incr();
    s.handshake_timeout.incr();
    let line = s.to_string();
    for word in [
        "connections 1",
        "idle 1",
        "oversized 1",
        "handshake timeout 1",
    ] {
        assert!(line.contains(word), "{line}");
    }
}
