//! End to end: fient over `tcp://` and `tls://` against the real cerv, the
//! ways a connection fails (each one clear line, exit 1, within the time
//! bound), and a proxy that rewrites bytes: under TLS it gets an error,
//! never a wrong time; without TLS it moves the time (so the test can
//! fail).

use lab::certs::{ServerCert, TestCerts};
use lab::tamper::{Rewrite, TamperProxy, Units};
use lab::{Cerv, Finished, fient, json};
use service::Nanos;
use service::source::Wire;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

const TRUTH_NS: i64 = 250_000_000;

/// cerv 250 ms ahead, on UDP, TCP and TLS (with `cert`), not rate
/// limited (a test makes many connections from one address).
fn cerv(cert: &ServerCert) -> Cerv {
    Cerv::start(&[
        "--offset",
        "+250ms",
        "--rate-limit",
        "0",
        "--tcp-listen",
        "127.0.0.1:0",
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert.cert.to_str().expect("utf-8 path"),
        "--tls-key",
        cert.key.to_str().expect("utf-8 path"),
    ])
}

/// One line on stderr, `fient: ` and `needle` in it, nothing on stdout,
/// exit 1, and no panic.
fn assert_fails_with(out: &Finished, needle: &str) {
    assert_eq!(out.code(), Some(1), "{}{}", out.stdout, out.stderr);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {}", out.stderr);
    assert!(lines[0].starts_with("fient: "), "{}", out.stderr);
    assert!(
        lines[0].contains(needle),
        "'{needle}' not in: {}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

/// The offset is the truth within the stated bound.
fn assert_synced(out: &Finished, protocol: &str) -> serde_json::Value {
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let doc = json(&out.stdout);
    assert_eq!(doc["protocol"], protocol, "{doc}");
    assert_eq!(doc["samples_used"], 5, "{doc}");
    let offset = doc["offset_ns"].as_i64().expect("offset");
    let bound = doc["error_bound_ns"].as_i64().expect("bound");
    assert!((offset - TRUTH_NS).abs() <= bound, "{doc}");
    // Loopback, even on a busy machine in a debug build.
    assert!(bound < 5_000_000, "{doc}");
    doc
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn tcp_and_tls_measure_the_offset_within_the_bound() {
    let certs = TestCerts::generate();
    let server = cerv(&certs.good);
    assert_synced(&fient(&[&server.tcp_target(), "--json"]), "tcp");
    assert_synced(
        &fient(&[&server.tls_target(), "--ca", path(&certs.ca), "--json"]),
        "tls",
    );
    // The certificate names the address too.
    let by_ip = format!("tls://{}", server.stream_addr(Wire::Tls));
    assert_synced(&fient(&[&by_ip, "--ca", path(&certs.ca), "--json"]), "tls");
}

/// A duration as fient prints it (`181.520µs`).
fn duration(text: &str) -> i64 {
    text.trim()
        .parse::<Nanos>()
        .unwrap_or_else(|e| panic!("{e}"))
        .as_nanos()
}

/// The text between `before` and the next `after` on `line`.
fn between<'a>(line: &'a str, before: &str, after: &str) -> &'a str {
    let rest = line
        .split(before)
        .nth(1)
        .unwrap_or_else(|| panic!("no '{before}' in {line}"));
    rest.split(after).next().unwrap_or(rest)
}

#[test]
fn the_human_report_shows_cristians_line_and_min_transfer_narrows_it() {
    let certs = TestCerts::generate();
    let server = cerv(&certs.good);
    for (target, ca) in [
        (server.tcp_target(), None),
        (server.tls_target(), Some(path(&certs.ca))),
    ] {
        // A floor below what either leg takes on loopback (about 2.5 µs
        // each way here): a larger one is a false claim, and fient says
        // the exchanges contradict it.
        for min in ["0", "1us"] {
            let mut args = vec![target.as_str(), "--min-transfer", min];
            if let Some(ca) = ca {
                args.extend(["--ca", ca]);
            }
            let out = fient(&args);
            assert_eq!(out.code(), Some(0), "{}", out.stderr);
            let line_of = |label: &str| {
                out.stdout
                    .lines()
                    .find(|l| l.starts_with(label))
                    .unwrap_or_else(|| panic!("no '{label}' line in:\n{}", out.stdout))
                    .to_string()
            };
            // server time  2026-...Z  (now(), rtt 363.041µs)
            let rtt = duration(between(&line_of("server time"), "rtt ", ")"));
            // Cristian  2026-...Z  (server time + rtt/2, error ±(rtt/2 − min) = ±181.520µs, min 0ns)
            let cristian = line_of("Cristian");
            assert!(cristian.contains("±(rtt/2 − min) = ±"), "{cristian}");
            let error = duration(between(&cristian, "= ±", ","));
            let shown_min = duration(between(&cristian, "min ", ")"));
            assert_eq!(shown_min, duration(min), "{cristian}");
            // The error is printed to the nanosecond, the rtt to three
            // decimals of its unit: to the nanosecond below 1 ms, to the
            // microsecond above (a loaded machine gets there). So the two
            // agree to a quarter of the rtt's last digit, plus a rounding.
            let rtt_digit = if rtt >= 1_000_000 { 1_000 } else { 1 };
            let expected = (rtt / 2 - shown_min).max(0);
            assert!(
                (error - expected).abs() <= rtt_digit / 4 + 1,
                "{cristian} (rtt {rtt})"
            );
        }
    }
}

/// A loopback port with nothing listening (bound, then released).
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn nothing_listening_is_refused_at_once() {
    let port = closed_port();
    for target in [
        format!("tcp://127.0.0.1:{port}"),
        format!("tls://localhost:{port}"),
    ] {
        let out = fient(&[&target]);
        assert_fails_with(
            &out,
            &format!("cannot connect to {target}: connection refused"),
        );
        assert!(out.elapsed < Duration::from_secs(5), "{:?}", out.elapsed);
    }
}

/// A listener that accepts connections and never says a word (nor
/// closes them) until dropped.
struct Silent {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Silent {
    fn start() -> Silent {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut held = Vec::new();
                // Bounded: a minute at most, and at most 64 connections.
                let until = std::time::Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
                    match listener.accept() {
                        Ok((s, _)) if held.len() < 64 => held.push(s),
                        _ => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }
        });
        Silent {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_server_that_accepts_and_never_answers_times_out_within_the_timeout() {
    let certs = TestCerts::generate();
    // Build fient first: the first build can take longer than the silent
    // listener's minute.
    lab::bin("fient");
    let silent = Silent::start();
    let port = silent.addr.port();
    // TLS: the handshake never completes; the timeout ends it.
    let out = fient(&[
        &format!("tls://localhost:{port}"),
        "--ca",
        path(&certs.ca),
        "--timeout",
        "300ms",
    ]);
    assert_fails_with(&out, "the TLS handshake timed out (after 300ms)");
    assert!(out.elapsed < Duration::from_secs(3), "{:?}", out.elapsed);
    // TCP: connected, but no probe is answered: given up after two.
    let out = fient(&[&format!("tcp://{}", silent.addr), "--timeout", "300ms"]);
    assert_fails_with(&out, "every request timed out");
    assert!(out.elapsed < Duration::from_secs(3), "{:?}", out.elapsed);
}

#[test]
fn a_blackhole_times_out_connecting_within_the_timeout() {
    use std::os::fd::AsRawFd;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    // A backlog of 0 holds one connection that is never accepted; the
    // kernel then drops further SYNs, as a firewall that drops would.
    // SAFETY: listen(2) on a socket we own, changing only its backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let mut fillers = Vec::new();
    for _ in 0..4 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => fillers.push(s),
            Err(_) => break,
        }
    }
    let full = TcpStream::connect_timeout(&addr, Duration::from_millis(200));
    assert!(full.is_err(), "the backlog did not fill: {full:?}");
    for target in [
        format!("tcp://{addr}"),
        format!("tls://localhost:{}", addr.port()),
    ] {
        let out = fient(&[&target, "--timeout", "300ms"]);
        assert_fails_with(&out, "timed out connecting (after 300ms)");
        assert!(out.elapsed < Duration::from_secs(3), "{:?}", out.elapsed);
    }
    drop(fillers);
}

#[test]
fn certificates_that_do_not_prove_the_server_are_refused() {
    let certs = TestCerts::generate();
    let ca = path(&certs.ca);
    for (cert, ca, needle) in [
        (&certs.expired, Some(ca), "the server's certificate expired"),
        (
            &certs.wrong_name,
            Some(ca),
            "the server's certificate is for 'elsewhere.example', not 'localhost'",
        ),
        (
            &certs.other_ca,
            Some(ca),
            "the server's certificate is signed by an unknown issuer",
        ),
        // A CA of the same name as the trusted one, with another key.
        (
            &certs.impostor,
            Some(ca),
            "the server's certificate is not signed by the trusted CA of its issuer's name",
        ),
        // Without --ca, the system's roots know nothing of the test CA.
        (
            &certs.good,
            None,
            "the server's certificate is signed by an unknown issuer (give its CA with --ca)",
        ),
    ] {
        let server = cerv(cert);
        let target = server.tls_target();
        let mut args = vec![target.as_str()];
        if let Some(ca) = ca {
            args.extend(["--ca", ca]);
        }
        let out = fient(&args);
        assert_fails_with(&out, &format!("cannot connect to {target}: {needle}"));
        // The JSON says the same.
        args.push("--json");
        let out = fient(&args);
        assert_eq!(out.code(), Some(1), "{}", out.stderr);
        let doc = json(&out.stdout);
        assert_eq!(doc["status"], "connect_failed", "{doc}");
        assert_eq!(doc["protocol"], "tls", "{doc}");
        assert!(
            doc["error"].as_str().unwrap_or("").contains(needle),
            "{doc}"
        );
    }
}

#[test]
fn the_wrong_wire_for_the_port_says_which_to_use() {
    let certs = TestCerts::generate();
    let server = cerv(&certs.good);
    // Plaintext to the TLS port: the server's TLS alert comes back.
    let tls = server.stream_addr(Wire::Tls);
    let out = fient(&[&format!("tcp://{tls}")]);
    assert_fails_with(&out, "this is a TLS port (try tls://)");
    // TLS to the plaintext port: the server hangs up on the hello.
    let tcp = server.stream_addr(Wire::Tcp);
    let out = fient(&[
        &format!("tls://localhost:{}", tcp.port()),
        "--ca",
        path(&certs.ca),
    ]);
    assert_fails_with(&out, "not a TLS port");
}

/// fient through `proxy` (which stands between it and cerv's TLS port),
/// with a short timeout: a rewrite that swallows bytes costs little.
fn fient_via(proxy: &TamperProxy, wire: &str, ca: &str) -> Finished {
    let target = match wire {
        "tls" => format!("tls://localhost:{}", proxy.addr().port()),
        _ => format!("tcp://{}", proxy.addr()),
    };
    fient(&[&target, "--ca", ca, "--timeout", "300ms", "--json"])
}

/// An encrypted TLS 1.3 alert record: header (5), alert (2), inner content
/// type (1), AEAD tag (16). The last record of a session is the server's
/// close_notify, sent after fient has hung up.
const ALERT_RECORD: usize = 5 + 2 + 1 + 16;

#[test]
fn bytes_rewritten_under_tls_give_an_error_never_a_wrong_time() {
    let certs = TestCerts::generate();
    let ca = path(&certs.ca);
    let server = cerv(&certs.good);
    let tls = server.stream_addr(Wire::Tls);

    // A clean pass: the records the server sends in one sync (the
    // ServerHello, a ChangeCipherSpec, the encrypted handshake, session
    // tickets, six replies, and the close_notify after fient has gone).
    let clean =
        TamperProxy::start(tls, Units::TlsRecords, Arc::new(|_, _: &mut [u8]| {})).expect("proxy");
    assert_synced(&fient_via(&clean, "tls", ca), "tls");
    let sizes = clean.settle(Duration::from_secs(3)).remove(0);
    drop(clean);
    let records = sizes.len();
    let read_by_fient = match sizes.last() {
        Some(&ALERT_RECORD) => records - 1,
        _ => records,
    };
    assert!(read_by_fient >= 9, "records of {sizes:?} bytes");

    // Each record, altered in its type, its length, its first and its last
    // byte: in the handshake and after it.
    let (mut caught, mut stalled) = (0, 0);
    for record in 0..records {
        for byte in [0, 4, 5, usize::MAX] {
            let rewrite: Rewrite = Arc::new(move |i, bytes: &mut [u8]| {
                if i == record {
                    let at = byte.min(bytes.len() - 1);
                    bytes[at] ^= 0x01;
                }
            });
            let proxy = TamperProxy::start(tls, Units::TlsRecords, rewrite).expect("proxy");
            let out = fient_via(&proxy, "tls", ca);
            let doc = json(&out.stdout);
            let at = format!("record {record} of {records}, byte {byte}");
            // Never a wrong time: an error (exit 1, with its status and
            // message), or the truth within the bound.
            match out.code() {
                Some(1) => {
                    assert_ne!(doc["status"], "synced", "{at}: {doc}");
                    assert_one_line(&out.stderr);
                    eprintln!("{at}: {} ({})", doc["error"], doc["status"]);
                    caught += 1;
                }
                Some(0) => {
                    let offset = doc["offset_ns"].as_i64().unwrap_or(0);
                    let bound = doc["error_bound_ns"].as_i64().unwrap_or(0);
                    assert!(
                        (offset - TRUTH_NS).abs() <= bound,
                        "{at}: a wrong time: {doc}"
                    );
                    // What may pass unnoticed: the record fient never reads;
                    // the outer type of a protected record, which TLS 1.3
                    // fixes (RFC 8446, 5.2) and rustls neither uses nor
                    // authenticates: it changes nothing; and a length that
                    // promises a byte more than comes, when nothing follows
                    // to show it: that answer never completes, as if the
                    // path had dropped it (which an attacker on it can
                    // always do), and is counted lost.
                    let lost = doc["samples_lost"].as_u64().unwrap_or(0);
                    let stalls = byte == 4 && lost > 0;
                    assert!(
                        record >= read_by_fient || (byte == 0 && record >= 2) || stalls,
                        "{at}: an alteration went unnoticed: {doc}"
                    );
                    stalled += usize::from(stalls);
                    eprintln!("{at}: synced, truth within the bound, {lost} lost");
                }
                other => panic!("{at}: exit {other:?}: {}{}", out.stdout, out.stderr),
            }
        }
    }
    // Every length and content byte fient reads was caught (or stalled
    // the answer it carried).
    assert!(
        caught + stalled >= read_by_fient * 3,
        "{caught} caught, {stalled} stalled"
    );
}

/// One line on stderr, starting with `fient: `.
fn assert_one_line(stderr: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("fient: "), "{stderr}");
}

/// Adds `1 << (7 * byte_index)` or so to every timestamp the server
/// sends: flips bit 4 of byte `byte_index` of each timestamp varint
/// (ts2 and ts3 of a probe reply, the time of a now() reply), leaving
/// ts1, which the client checks, alone.
fn shift_timestamps(byte_index: usize) -> Rewrite {
    fn varint_end(b: &[u8], from: usize) -> usize {
        let mut at = from;
        while at < b.len() && b[at] & 0x80 != 0 {
            at += 1;
        }
        at + 1
    }
    Arc::new(move |_, frame: &mut [u8]| {
        // length (4) | "cf" version kind (4) | id | variant | fields
        let after_id = varint_end(frame, 8);
        let variant = frame.get(after_id).copied();
        let mut at = after_id + 1;
        let targets = match variant {
            // Probe { ts1, ts2, ts3 }: skip ts1.
            Some(0) => {
                at = varint_end(frame, at);
                2
            }
            // Now { time }.
            Some(1) => 1,
            _ => 0,
        };
        for _ in 0..targets {
            let end = varint_end(frame, at);
            if at + byte_index < end.saturating_sub(1) {
                frame[at + byte_index] ^= 0x10;
            }
            at = end;
        }
    })
}

#[test]
fn without_tls_the_same_proxy_moves_the_time() {
    // The control: the very same attack on plaintext TCP succeeds, so the
    // TLS test above can fail.
    let certs = TestCerts::generate();
    let server = cerv(&certs.good);
    let tcp = server.stream_addr(Wire::Tcp);
    // Byte 4 of a 9-byte varint holds bits 28 to 34 of the zigzag value:
    // bit 4 of it is 2^32 zigzag, 2^31 ns (2.1 s) of time.
    let proxy = TamperProxy::start(tcp, Units::CervFrames, shift_timestamps(4)).expect("proxy");
    let out = fient_via(&proxy, "tcp", path(&certs.ca));
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let doc = json(&out.stdout);
    let offset = doc["offset_ns"].as_i64().expect("offset");
    let bound = doc["error_bound_ns"].as_i64().expect("bound");
    let moved = offset - TRUTH_NS;
    assert!(
        (moved.abs() - (1 << 31)).abs() < 1_000_000,
        "moved by {moved} ns: {doc}"
    );
    // And the bound, honest about the path, knows nothing of it.
    assert!(moved.abs() > bound, "{doc}");
}
