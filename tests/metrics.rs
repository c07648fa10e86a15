//! The metrics as Prometheus reads them: both renderings, and a page
//! scraped from the real endpoint, pass `promtool check metrics` (its
//! parser and its lint) with nothing to say.

use lab::peers::Peer;
use service::metrics::{
    self, CervMetrics, CombinedMetrics, FientMetrics, ListenerMetrics, Render, SourceMetrics,
};
use service::transport::server::ServerStats;
use service::transport::tcp::TcpStats;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// A server with every kind of listener, every counter moved.
fn cerv() -> CervMetrics {
    let ntp = ServerStats::default();
    ntp.received.add(1000);
    ntp.replied.add(950);
    ntp.malformed.add(20);
    ntp.rate_limited.add(30);
    ntp.kiss_sent.add(10);
    ntp.kiss_suppressed.add(20);
    ntp.nts_requests.add(400);
    ntp.nts_naks.add(3);
    ntp.nts_failed.add(1);
    for size in [1, 1, 2, 5, 17, 32] {
        ntp.batches.observe(size);
    }
    let ntp = ListenerMetrics::datagram("ntp", "127.0.0.1:123", &ntp);
    let tls = TcpStats::default();
    tls.accepted.add(12);
    tls.requests.add(60);
    tls.replied.add(60);
    tls.handshake_failed.add(2);
    tls.handshake_timeout.add(1);
    tls.idle_closed.add(4);
    CervMetrics {
        uptime: Duration::from_secs(3600),
        listeners: vec![
            ListenerMetrics::datagram("cerv", "[::]:8081", &ServerStats::default()),
            ntp,
            ListenerMetrics::stream("tcp", "0.0.0.0:8081", &TcpStats::default()),
            ListenerMetrics::stream("tls", "0.0.0.0:8443", &tls),
            ListenerMetrics::stream("nts-ke", "[::1]:4460", &TcpStats::default()),
        ],
    }
}

/// A client with sources in every state, one with a name that needs
/// escaping.
fn fient() -> FientMetrics {
    FientMetrics {
        sources: vec![
            SourceMetrics {
                name: "ntp://time.example:123".into(),
                wire: "ntp".into(),
                status: "selected".into(),
                offset_seconds: Some(0.000_125),
                bound_seconds: Some(0.002),
                rtt_seconds: Some(0.003_5),
                reachability: 0xff,
                stratum: Some(2),
            },
            SourceMetrics {
                name: "nts://\"quoted\"\\back\nslash".into(),
                wire: "nts".into(),
                status: "falseticker".into(),
                offset_seconds: Some(-1.5),
                bound_seconds: Some(1e-9),
                rtt_seconds: Some(0.02),
                reachability: 0b0111_1110,
                stratum: Some(1),
            },
            SourceMetrics {
                name: "cerv://127.0.0.1:8081".into(),
                wire: "cerv".into(),
                status: "no_answer".into(),
                reachability: 0,
                ..SourceMetrics::default()
            },
        ],
        combined: Some(CombinedMetrics {
            offset_seconds: 0.000_125,
            bound_seconds: 0.002,
            agreeing: 1,
            answered: 2,
        }),
        syncs: vec![
            ("synced".into(), 41),
            ("no majority".into(), 2),
            ("failed".into(), 1),
        ],
        last_sync_age: Some(Duration::from_millis(64_250)),
        frequency_ppm: Some(-3.75),
    }
}

/// Runs `promtool check metrics` with `text` on stdin, at most 30 s;
/// returns its exit code and everything it printed.
fn promtool_check(promtool: &Path, text: &str) -> (Option<i32>, String) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = text.to_string();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    let _ = writer.join();
    let printed = format!(
        "{}{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    (status.and_then(|s| s.code()), printed)
}

fn assert_clean(promtool: &Path, what: &str, text: &str) {
    let (code, printed) = promtool_check(promtool, text);
    assert_eq!(
        (code, printed.trim()),
        (Some(0), ""),
        "promtool check metrics on {what}:\n{printed}\n--- input ---\n{text}"
    );
}

#[test]
fn promtool_accepts_cervs_metrics() {
    let Some(promtool) = Peer::Promtool.require("promtool_accepts_cervs_metrics") else {
        return;
    };
    // The check is not vacuous: a counter without help or `_total` fails.
    let (code, printed) =
        promtool_check(&promtool, "# TYPE cerv_requests counter\ncerv_requests 1\n");
    assert_ne!(code, Some(0), "{printed}");
    assert!(printed.contains("_total"), "{printed}");
    let text = metrics::render_cerv(&cerv());
    assert!(text.contains("cerv_receive_batch_size_bucket"), "{text}");
    assert_clean(&promtool, "render_cerv", &text);
    assert_clean(
        &promtool,
        "an idle server",
        &metrics::render_cerv(&CervMetrics::default()),
    );
}

#[test]
fn promtool_accepts_fients_metrics() {
    let Some(promtool) = Peer::Promtool.require("promtool_accepts_fients_metrics") else {
        return;
    };
    let text = metrics::render_fient(&fient());
    assert!(
        text.contains(r#"source="nts://\"quoted\"\\back\nslash""#),
        "{text}"
    );
    assert_clean(&promtool, "render_fient", &text);
    assert_clean(
        &promtool,
        "a client that knows nothing yet",
        &metrics::render_fient(&FientMetrics::default()),
    );
}

/// The page as a scraper gets it: over a real connection to the endpoint.
#[test]
fn promtool_accepts_a_scraped_page() {
    let Some(promtool) = Peer::Promtool.require("promtool_accepts_a_scraped_page") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (body, content_type) = runtime.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let snapshot = fient();
        let render: Render = Arc::new(move || metrics::render_fient(&snapshot));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(metrics::serve(listener, render, async {
            let _ = stopped.await;
        }));
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept-Encoding: gzip\r\n\r\n",
        )
        .await
        .expect("send");
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut reply))
            .await
            .expect("answered in time")
            .expect("read");
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        let reply = String::from_utf8(reply).expect("utf-8");
        let (head, body) = reply.split_once("\r\n\r\n").expect("a head");
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        let content_type = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Type: "))
            .unwrap_or_default()
            .to_string();
        (body.to_string(), content_type)
    });
    assert_eq!(content_type, metrics::CONTENT_TYPE);
    assert_clean(&promtool, "the scraped page", &body);
}

/// `GET /metrics` from `addr`, over a plain connection: the body.
fn scrape(addr: &str) -> String {
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to the metrics port");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("send");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).expect("read");
    let (head, body) = reply.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    body.to_string()
}

/// A free loopback TCP port (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The value of the sample whose line starts with `series` (name and
/// labels), if there is one.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The real binaries: cerv and a fient daemon, each with --metrics-listen,
/// scraped over HTTP; the pages pass promtool and hold what happened.
#[test]
fn the_daemons_serve_metrics_that_promtool_accepts() {
    let Some(promtool) = Peer::Promtool.require("the_daemons_serve_metrics_that_promtool_accepts")
    else {
        return;
    };
    let cerv_metrics = format!("127.0.0.1:{}", free_port());
    let server = lab::Cerv::start(&[
        "--ntp-listen",
        "127.0.0.1:0",
        "--ntp-stratum",
        "2",
        "--metrics-listen",
        &cerv_metrics,
    ]);
    let fient_metrics = format!("127.0.0.1:{}", free_port());
    let mut daemon = Command::new(lab::bin("fient"))
        .args([
            &server.target(),
            &server.ntp_target(),
            "--watch",
            "200ms",
            "--probes",
            "2",
            "--metrics-listen",
            &fient_metrics,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fient");
    // Three rounds in, both pages say so.
    let deadline = Instant::now() + Duration::from_secs(15);
    let page = loop {
        let page = std::net::TcpStream::connect(&fient_metrics)
            .ok()
            .map(|_| scrape(&fient_metrics));
        if let Some(p) = page
            && sample(&p, r#"fient_syncs_total{outcome="synced"}"#).unwrap_or(0.0) >= 3.0
        {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "fient's metrics never showed 3 syncs"
        );
        thread::sleep(Duration::from_millis(100));
    };
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert_clean(&promtool, "fient's page", &page);
    let ntp = format!(r#"{{source="{}",wire="ntp"}}"#, server.ntp_target());
    assert_eq!(
        sample(&page, &format!("fient_source_stratum{ntp}")),
        Some(2.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, &format!("fient_source_reachability{ntp}")).map(|r| r as u64 & 0b111),
        Some(0b111),
        "{page}"
    );
    let offset = sample(&page, "fient_offset_seconds").expect("a combined offset");
    let bound = sample(&page, "fient_error_bound_seconds").expect("a bound");
    assert!(
        offset.abs() <= bound,
        "one host, one clock: {offset} ± {bound}"
    );
    assert_eq!(sample(&page, "fient_sources_agreeing"), Some(2.0), "{page}");

    let page = scrape(&cerv_metrics);
    assert_clean(&promtool, "cerv's page", &page);
    let cerv = format!(r#"{{wire="cerv",listener="{}"}}"#, server.target());
    let ntp = format!(r#"{{wire="ntp",listener="{}"}}"#, server.ntp_addrs[0]);
    // Each round asks each server 2 probes and a now().
    for face in [&cerv, &ntp] {
        let replies = sample(&page, &format!("cerv_replies_total{face}")).expect("replies");
        assert!(replies >= 9.0, "{face}: {replies}\n{page}");
        // Every datagram read came in some receive batch.
        let received = sample(&page, &format!("cerv_requests_total{face}")).expect("requests");
        let batched = sample(&page, &format!("cerv_receive_batch_size_sum{face}")).expect("sum");
        assert_eq!(batched, received, "{face}\n{page}");
        let batches =
            sample(&page, &format!("cerv_receive_batch_size_count{face}")).expect("count");
        assert!((1.0..=batched).contains(&batches), "{face}\n{page}");
    }
    assert!(sample(&page, "cerv_uptime_seconds").unwrap() > 0.0);
}

/// The Prometheus configuration and alert rules under deploy/ pass
/// promtool, and the rules name only metrics the daemons export.
#[test]
fn promtool_accepts_the_example_prometheus_config() {
    let Some(promtool) = Peer::Promtool.require("promtool_accepts_the_example_prometheus_config")
    else {
        return;
    };
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let out = lab::run(
        Command::new(&promtool)
            .args(["check", "config"])
            .arg(deploy.join("prometheus.yml")),
        Duration::from_secs(30),
    );
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("4 rules found"), "{}", out.stdout);
    let rules = std::fs::read_to_string(deploy.join("fient-alerts.yml")).unwrap();
    let exported = format!(
        "{}{}",
        metrics::render_cerv(&cerv()),
        metrics::render_fient(&fient())
    );
    for name in rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("fient_") || w.starts_with("cerv_"))
    {
        assert!(
            exported.contains(&format!("# TYPE {name} ")),
            "the rules use {name}, which is not exported"
        );
    }
}
